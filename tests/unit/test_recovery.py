"""Recovering from a lost connection: the retry schedule, which errors are retried, and the
replay that brings a new cloud session to the state of the lost one."""

from __future__ import annotations

import dataclasses
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from plora.clients import grpc_link
from plora.clients.device_model import DeviceModel
from plora.clients.generation import stream_tokens
from plora.clients.grpc_link import Endpoint, rpc_error
from plora.clients.recovery import ConnectionLost, RetryPolicy, SequenceHistory
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.compute import CloudHalf
from plora.cloud_backbone.protocol.link import InProcessLink
from plora.cloud_backbone.protocol.messages import CacheMode, ForwardRequest
from plora.storage.errors import AuthenticationError, CapacityError, ConfigError, TransportError, ValidationError, VersionMismatchError
from tests.conftest import tiny_backbone
from tests.unit.test_speculation import PEAKED, Scripted

CONFIG = PrivateLoRAConfig(rank=4, device_layers=1)


class FakeTime:
    """A clock that only sleeping moves."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def policy(self, **settings) -> RetryPolicy:
        return RetryPolicy(clock=lambda: self.now, sleep=self.sleep, random=lambda: 1.0, **settings)


def failing(times: int, error: Exception, result="done"):
    """An attempt that raises `error` its first `times` calls, then returns `result`."""
    calls = []

    def attempt():
        calls.append(None)
        if len(calls) <= times:
            raise error
        return result

    attempt.calls = calls
    return attempt


@pytest.mark.parametrize(
    "settings, expected",
    [
        (dict(first_delay_s=0.5, multiplier=2.0, max_delay_s=4.0, jitter=0.0), [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]),
        (dict(first_delay_s=1.0, multiplier=3.0, max_delay_s=20.0, jitter=0.0), [1.0, 3.0, 9.0, 20.0, 20.0, 20.0]),
        (dict(first_delay_s=0.5, multiplier=2.0, max_delay_s=4.0, jitter=0.5), [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]),
    ],
)
def test_backoff_grows_exponentially_up_to_its_cap_and_jitter_only_shortens_it(settings, expected):
    delays = FakeTime().policy(**settings).delays()
    assert [next(delays) for _ in expected] == pytest.approx(expected)


def test_a_lost_connection_is_retried_with_a_warning_per_attempt_until_the_step_succeeds(caplog):
    clock = FakeTime()
    attempt = failing(3, ConnectionLost("Socket closed"))
    with caplog.at_level(logging.WARNING, logger="plora.clients.recovery"):
        assert clock.policy(jitter=0.0).run(attempt, "forward step") == "done"
    assert len(attempt.calls) == 4 and clock.slept == [0.5, 1.0, 2.0]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3
    for number, (warning, left) in enumerate(zip(warnings, [60.0, 59.5, 58.5]), start=1):
        assert f"forward step failed (attempt {number}): Socket closed" in warning
        assert f"{left:.1f} s of the 60 s retry budget left" in warning


def test_once_the_budget_is_spent_the_step_fails_saying_how_long_it_tried():
    clock = FakeTime()
    attempt = failing(1000, ConnectionLost("Connection refused"))
    with pytest.raises(TransportError, match=r"tried 5 times over 5.0 s \(retry budget 5 s\); last error: Connection refused") as failed:
        clock.policy(budget_s=5.0, jitter=0.0).run(attempt, "backward step")
    assert not isinstance(failed.value, ConnectionLost)  # final: nothing above retries it again
    assert clock.slept == [0.5, 1.0, 2.0, 1.5]  # the last wait is cut to the budget, then one last try


def test_the_budget_counts_from_the_first_failure_not_from_a_slow_first_attempt():
    clock, calls = FakeTime(), []

    def attempt():
        calls.append(None)
        if len(calls) == 1:
            clock.now += 300.0  # e.g. a service that hung until the reply timeout, then went away
        raise ConnectionLost("Socket closed")

    with pytest.raises(TransportError, match=r"tried 3 times over 1\.5 s"):
        clock.policy(budget_s=1.5, jitter=0.0).run(attempt, "forward step")
    assert clock.slept == [0.5, 1.0]


@pytest.mark.parametrize(
    "error",
    [
        AuthenticationError("unknown device or wrong token"),
        VersionMismatchError("not hosted"),
        ValidationError("bad frame"),
        CapacityError("too many tokens"),
        TransportError("no reply for layer 2 from the device within 30 s; session closed"),  # a StepError from the service
    ],
    ids=lambda e: type(e).__name__,
)
def test_permanent_errors_are_raised_at_once_without_waiting(error):
    clock = FakeTime()
    attempt = failing(1, error)
    with pytest.raises(type(error)) as raised:
        clock.policy().run(attempt, "forward step")
    assert raised.value is error and len(attempt.calls) == 1 and clock.slept == []


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    "code, transient",
    [
        (grpc.StatusCode.UNAVAILABLE, True),  # the service is down, restarting, or the socket broke
        (grpc.StatusCode.CANCELLED, True),  # the service cancelled the stream, or the link's reply timeout did
        (grpc.StatusCode.UNAUTHENTICATED, False),
        (grpc.StatusCode.PERMISSION_DENIED, False),
        (grpc.StatusCode.INVALID_ARGUMENT, False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, False),
        (grpc.StatusCode.INTERNAL, False),
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_only_unreachable_and_cancelled_calls_count_as_a_lost_connection(code, transient):
    error = rpc_error(_Failed(code, "Socket closed"))
    assert isinstance(error, ConnectionLost) is transient
    assert "Socket closed" in str(error)


def request(cache: CacheMode, train: bool = False, tokens: int = 1) -> ForwardRequest:
    return ForwardRequest(torch.zeros(1, tokens, 32), cache=cache, train=train)


def test_the_history_keeps_the_forwards_since_the_last_start_and_the_graph_awaiting_backward():
    history, handler = SequenceHistory(), object()
    old, start, extend = request(CacheMode.START, tokens=5), request(CacheMode.START, tokens=3), request(CacheMode.EXTEND)
    scored, trained = request(CacheMode.NONE, tokens=7), request(CacheMode.NONE, train=True, tokens=4)
    for sent in (old, extend, start, scored, extend):
        history.forward_started()
        history.forwarded(sent, handler)
    assert [r for r, _ in history.replay()] == [start, extend] and history.cached_tokens == 4

    history.forward_started()
    history.forwarded(trained, handler)
    assert [r for r, _ in history.replay()] == [start, extend, trained]  # the training forward last
    history.backward_finished()
    assert [r for r, _ in history.replay()] == [start, extend]

    history.forward_started()
    history.forwarded(trained, handler)
    history.forward_started()  # a new forward: the cloud dropped the unfinished graph
    assert [r for r, _ in history.replay()] == [start, extend]


def test_a_step_that_drops_cached_positions_drops_them_from_the_replay_too():
    history = SequenceHistory()
    start, extend = request(CacheMode.START, tokens=5), request(CacheMode.EXTEND, tokens=4)
    masked = ForwardRequest(torch.zeros(1, 3, 32), CacheMode.EXTEND, attention_mask=torch.ones(1, 8, dtype=torch.int64))
    for sent in (start, masked, extend):
        history.forwarded(sent, handler=None)
    # Keep 6 of the 12: the start and the first of the masked step's 3 tokens, its mask cut alike.
    history.forwarded(dataclasses.replace(extend, keep_cached=6), handler=None)
    replay = [r for r, _ in history.replay()]
    assert [r.hidden.shape[1] for r in replay] == [5, 1, 4] and history.cached_tokens == 10
    assert replay[1].attention_mask.shape == (1, 6) and all(r.keep_cached is None for r in replay)
    history.forwarded(dataclasses.replace(extend, keep_cached=5), handler=None)  # a cut between two steps
    assert [r.hidden.shape[1] for r, _ in history.replay()] == [5, 4]


def test_a_cached_training_forward_is_replayed_with_its_graph_only_while_its_backward_is_pending():
    history = SequenceHistory()
    cached_training = request(CacheMode.START, train=True, tokens=3)
    history.forward_started()
    history.forwarded(cached_training, handler=None)
    assert [(r is cached_training, r.train) for r, _ in history.replay()] == [(True, True)]
    history.backward_finished()
    history.forwarded(request(CacheMode.EXTEND), handler=None)
    assert [(r.cache, r.train) for r, _ in history.replay()] == [(CacheMode.START, False), (CacheMode.EXTEND, False)]


class FailoverLink(InProcessLink):
    """An in-process link that can move to a fresh cloud session, brought up to date by
    SequenceHistory: the way a link fails over to another replica, without a network."""

    def __init__(self, half: CloudHalf):
        super().__init__(half.open_session())
        self.half, self.history = half, SequenceHistory()

    def forward(self, request, handler):
        self.history.forward_started()
        result = super().forward(request, handler)
        self.history.forwarded(request, handler)
        return result

    def backward(self, request, handler):
        try:
            return super().backward(request, handler)
        finally:
            self.history.backward_finished()

    def fail_over(self) -> None:
        self._endpoint.close()  # the lost session's cache and graph are gone
        self._endpoint = self.half.open_session()
        for replayed, handler in self.history.replay():
            super().forward(replayed, handler)


def split_model(**overrides) -> tuple[DeviceModel, FailoverLink]:
    backbone = tiny_backbone(**overrides)
    link = FailoverLink(CloudHalf(backbone, CONFIG))
    model = DeviceModel(backbone.model, CONFIG, link)
    torch.manual_seed(3)
    with torch.no_grad():
        for m in model.weights.ms.values():
            m.normal_(0, 0.5)
    return model, link


def test_a_new_session_rebuilt_from_the_history_continues_decoding_exactly():
    model, link = split_model()

    def decode(fail_over_after: set[int]) -> tuple[list[int], torch.Tensor]:
        tokens = []
        for token in stream_tokens(model, [5, 17, 3, 42, 8], 12, set()):
            tokens.append(token)
            if len(tokens) in fail_over_after:
                link.fail_over()
        with torch.no_grad():  # one step more on the cache the last session holds
            return tokens, model(torch.tensor([[60]]), CacheMode.EXTEND)[0, -1]

    tokens, logits = decode(set())
    recovered_tokens, recovered_logits = decode({6, 12})
    assert recovered_tokens == tokens and torch.equal(recovered_logits, logits)


def test_a_new_session_rebuilt_after_rejected_drafts_continues_decoding_exactly():
    model, link = split_model(**PEAKED)
    prompt = [5, 17, 3, 42, 8, 5, 17, 3, 42, 9]
    plain = list(stream_tokens(model, prompt, 14, set()))
    recovered = []
    for token in stream_tokens(model, prompt, 14, set(), drafter=Scripted(prompt, plain, wrong_every=2)):
        recovered.append(token)
        if len(recovered) in (3, 8):
            link.fail_over()
    assert recovered == plain


def test_a_backward_after_failover_gives_the_gradients_of_an_uninterrupted_step():
    model, link = split_model()
    ids = torch.tensor([[4, 9, 33, 2, 71, 15]])

    def gradients(fail_over: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = model(ids).logsumexp(-1).mean()
        if fail_over:
            link.fail_over()  # the graph of this forward died with the session
        loss.backward()
        return [m.grad.clone() for m in model.weights.ms.values()]

    expected, after_failover = gradients(False), gradients(True)
    assert all(torch.equal(a, b) for a, b in zip(expected, after_failover))


class AnsweringTwice(InProcessLink):
    """A link whose backward asks the device for every group twice, as a retried backward
    does for the groups answered before the connection was lost."""

    def backward(self, request, handler):
        def twice(adapter_request):
            handler(adapter_request)
            return handler(adapter_request)

        return super().backward(request, twice)


def test_a_backward_request_answered_twice_counts_its_gradient_once():
    ids = torch.tensor([[4, 9, 33, 2, 71, 15]])
    grads = []
    for kind in (InProcessLink, AnsweringTwice):
        backbone = tiny_backbone()
        model = DeviceModel(backbone.model, CONFIG, kind(CloudHalf(backbone, CONFIG).open_session()))
        with torch.no_grad():
            for i, m in enumerate(model.weights.ms.values()):
                m.fill_(0.01 * (i + 1))
        model(ids).logsumexp(-1).mean().backward()
        grads.append([m.grad for m in model.weights.ms.values()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_replicas_are_reached_through_grpcs_own_address_lists():
    assert Endpoint("cloud.example.org:50051").target == "cloud.example.org:50051"  # may resolve to several
    assert Endpoint("10.0.0.5:50051,10.0.0.6:50051").target == "ipv4:10.0.0.5:50051,10.0.0.6:50051"
    assert Endpoint("[fd00::5]:50051,[fd00::6]:50051").target == "ipv6:[fd00::5]:50051,[fd00::6]:50051"
    with pytest.raises(ConfigError, match="by IP address"):
        _ = Endpoint("a.example.org:50051,b.example.org:50051").target
    with pytest.raises(ConfigError, match="mix IPv4 and IPv6"):
        _ = Endpoint("10.0.0.5:50051,[fd00::6]:50051").target


def test_a_quiet_call_keeps_pinging_so_that_a_dead_service_is_found_in_time(monkeypatch):
    # A server that takes any ping without data as a strike (gRPC's default) sends GOAWAY at the
    # third strike: the device's quiet call must ping on, where gRPC's client would send two pings
    # and then one a minute.
    monkeypatch.setattr(grpc_link, "KEEPALIVE_MS", 1_000)  # gRPC's client pings at most once a second
    quiet = threading.Event()

    def hold(requests, context):
        next(requests)
        quiet.wait()
        return iter(())

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("quiet.Service", {
        "Hold": grpc.stream_stream_rpc_method_handler(hold)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = Endpoint(f"127.0.0.1:{port}", insecure=True).channel()

    def one_frame_then_quiet():
        yield b"open"
        quiet.wait()

    try:
        call = channel.stream_stream("/quiet.Service/Hold")(one_frame_then_quiet())
        ended = threading.Event()
        call.add_done_callback(lambda _: ended.set())
        assert ended.wait(timeout=10), "the quiet call stopped pinging"
        assert (call.code(), call.details()) == (grpc.StatusCode.UNAVAILABLE, "Too many pings")
    finally:
        quiet.set()
        channel.close()
        server.stop(grace=None)
