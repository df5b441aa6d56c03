"""The backbone service over real loopback gRPC, on a tiny random checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import queue
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from transformers import AutoConfig

from plora.clients.data import TokenizedExample
from plora.clients.device_store import DeviceStore
from plora.clients.generation import stream_tokens
from plora.clients.grpc_link import Credentials, Endpoint, GrpcLink
from plora.clients.recovery import RetryPolicy
from plora.clients.search import LrSearch, search_lr, trial_key
from plora.clients.training import TrainSettings, personalize
from plora.cloud_backbone import loading
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.budget import StepCosts
from plora.cloud_backbone.protocol import split_pb2_grpc as pb_grpc, wire
from plora.cloud_backbone.protocol.messages import (
    AdapterReply,
    AdapterRequest,
    CacheMode,
    ForwardRequest,
    ForwardResult,
    OpenSession,
    Phase,
    SessionOpened,
    StepError,
)
from plora.cloud_backbone.server import start_service
from plora.cloud_backbone.service import Limits
from plora.platform.bench import neighbour
from plora.storage.registry import open_registry
from plora.platform.runtime import init_device, open_device, split_embedded
from plora.storage.errors import AuthenticationError, CapacityError, ConfigError, TransportError, ValidationError, VersionMismatchError

CONFIG = PrivateLoRAConfig(rank=4, device_layers=1)


@pytest.fixture
def server(tiny_checkpoint):
    running = start_service([str(tiny_checkpoint)], CONFIG, open_registry(), Limits(reply_timeout_s=5), http_port=0)
    yield running
    running.stop(grace_s=1)


@pytest.fixture
def endpoint(server):
    return Endpoint(f"127.0.0.1:{server.port}", insecure=True)


@pytest.fixture
def device(tmp_path, endpoint):
    init_device(tmp_path / "dev", endpoint.address, endpoint=endpoint, enroll_token=open_registry().issue_enrollment_token()[1])
    dev = open_device(tmp_path / "dev", wire_dtypes=wire.EXACT_WIRE)
    yield dev
    dev.close()


def set_ms(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.weights.ms.values():
            m.normal_(0, 0.3)


def in_process(tiny_checkpoint):
    return split_embedded(loading.load(str(tiny_checkpoint)), CONFIG)


def assert_same_model(remote, local, ids: torch.Tensor) -> None:
    """Logits, dL/dM and cached decoding of the network split equal the in-process split's."""
    set_ms(remote)
    set_ms(local)
    remote_logits, local_logits = remote(ids), local(ids)
    assert torch.allclose(remote_logits, local_logits, atol=1e-5)
    remote_logits.logsumexp(-1).mean().backward()
    local_logits.logsumexp(-1).mean().backward()
    for (name, a), (_, b) in zip(remote.weights.named_tensors(), local.weights.named_tensors()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name
    with torch.no_grad():
        steps = [remote(ids[:1, :5], CacheMode.START)] + [remote(ids[:1, t : t + 1], CacheMode.EXTEND) for t in range(5, 8)]
    assert torch.allclose(torch.cat(steps, 1), local_logits[:1].detach(), atol=1e-5)


def test_network_scoring_and_training_step_equal_the_in_process_split(device, tiny_checkpoint):
    assert_same_model(device.model, in_process(tiny_checkpoint), torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0)))


def test_a_prefill_pipelined_over_the_network_equals_the_in_process_split(server, device, tiny_checkpoint):
    # Chunks of 2: the 5-token prefill below runs as 2 chunks, whose exchanges share the stream.
    next(iter(server.service.versions.values())).half.prefill_chunk_tokens = 2
    assert_same_model(device.model, in_process(tiny_checkpoint), torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(1)))


def test_replies_swapped_in_a_pipelined_prefill_fail_that_step_alone_and_the_session_goes_on(server, endpoint, device):
    next(iter(server.service.versions.values())).half.prefill_chunk_tokens = 2  # 6 tokens: 3 chunks
    outbox, frames = queue.Queue(), queue.Queue()
    with endpoint.channel() as channel:
        stream = pb_grpc.SplitBackboneStub(channel).Session(iter(outbox.get, None), timeout=30,
                                                           metadata=Credentials.load(device.store.root / "credentials.json").metadata())

        def read() -> None:
            try:
                for frame in stream:
                    frames.put(wire.parse_cloud_message(frame, 1 << 20))
            except grpc.RpcError:
                pass  # the channel closes at the end

        threading.Thread(target=read, daemon=True).start()

        def step(number: int, swap: bool):
            """Run a 6-token prefill, answering every request; with `swap`, two requests in flight
            at once are answered in the reverse order. Returns the step's last message and
            whether two were ever swapped."""
            outbox.put(wire.device_message(number, ForwardRequest(torch.randn(1, 6, 32), CacheMode.START)))
            held, swapped = [], False
            while True:
                try:
                    _, message = frames.get(timeout=0.2)
                except queue.Empty:  # only one in flight: answer it
                    message = None
                if message is not None and not isinstance(message, AdapterRequest):
                    return message, swapped
                held += [message] if message is not None else []
                if message is None or len(held) == 2 or not swap:
                    swapped |= len(held) == 2
                    for request in reversed(held):
                        # u·M of q, k and v: a prefill asks nothing else
                        outbox.put(wire.device_message(number, request.answer(torch.zeros(*request.tensor.shape[:2], 12))))
                    held = []

        outbox.put(wire.device_message(0, OpenSession(device.store.record.identity)))
        assert isinstance(frames.get(timeout=10)[1], SessionOpened)
        refused, swapped = step(1, swap=True)
        assert swapped and isinstance(refused, StepError) and refused.kind == "ValidationError", refused
        answered, _ = step(2, swap=False)
        assert isinstance(answered, ForwardResult) and answered.hidden.shape == (1, 6, 32)
        outbox.put(None)


@pytest.mark.parametrize("wire_dtypes", [wire.WireDtypes(), wire.WireDtypes(torch.bfloat16, torch.bfloat16),
                                         wire.WireDtypes(torch.float16, torch.float16)], ids=str)
def test_activations_may_cross_as_16_bit_floats_in_fewer_bytes(device, tmp_path, wire_dtypes):
    half = open_device(tmp_path / "dev", wire_dtypes=wire_dtypes)
    crossed = {}
    half.model.link.taps.append(lambda _, message: crossed.setdefault(type(message).__name__, set()).update(
        v.dtype for v in vars(message).values() if isinstance(v, torch.Tensor) and v.is_floating_point()))
    try:
        for model in (device.model, half.model):
            set_ms(model)
        ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
        bytes_before = {name: sum(d.model.link.wire_bytes.values()) for name, d in (("full", device), ("half", half))}
        full_logits, half_logits = device.model(ids), half.model(ids)
        sent = {name: sum(d.model.link.wire_bytes.values()) - bytes_before[name] for name, d in (("full", device), ("half", half))}
        if wire_dtypes.cut == wire_dtypes.exchanges:
            assert 0.45 < sent["half"] / sent["full"] < 0.6  # the tensors halve; the framing does not
        else:
            assert sent["half"] / sent["full"] < 0.8
        logprobs = [torch.log_softmax(logits, -1) for logits in (full_logits, half_logits)]
        assert 0 < (logprobs[0] - logprobs[1]).abs().max() < 0.05
        full_logits.logsumexp(-1).mean().backward()
        half_logits.logsumexp(-1).mean().backward()
        grads = [torch.cat([m.grad.flatten() for _, m in d.model.weights.named_tensors()]) for d in (device, half)]
        assert 0 < (grads[0] - grads[1]).norm() / grads[0].norm() < 0.05  # dL/dM, each M's together
        with torch.no_grad():  # decoding over the cheaper wire, cache and all
            steps = [half.model(ids[:1, :5], CacheMode.START)] + [half.model(ids[:1, t : t + 1], CacheMode.EXTEND) for t in range(5, 8)]
        assert torch.allclose(torch.cat(steps, 1), half_logits[:1].detach(), atol=0.05)
        assert crossed == {"ForwardRequest": {wire_dtypes.cut}, "ForwardResult": {wire_dtypes.cut},
                           "BackwardRequest": {wire_dtypes.cut}, "BackwardResult": {wire_dtypes.cut},
                           "AdapterRequest": {wire_dtypes.exchanges}, "AdapterReply": {wire_dtypes.exchanges}}
    finally:
        half.close()


def test_last_layers_on_the_device_give_the_same_model_over_the_network(tmp_path, tiny_checkpoint):
    config = PrivateLoRAConfig(rank=4, device_layers=1, device_last_layers=1)
    running = start_service([str(tiny_checkpoint)], config, open_registry(), Limits(reply_timeout_s=5))
    endpoint = Endpoint(f"127.0.0.1:{running.port}", insecure=True)
    init_device(tmp_path / "dev", endpoint.address, endpoint=endpoint, enroll_token=open_registry().issue_enrollment_token()[1])
    dev = open_device(tmp_path / "dev", wire_dtypes=wire.EXACT_WIRE)
    try:
        bundle = json.loads((dev.store.root / "bundle" / "config.json").read_text())
        assert bundle["num_hidden_layers"] == 2  # the first layer and the last
        local = split_embedded(loading.load(str(tiny_checkpoint)), config)
        assert_same_model(dev.model, local, torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0)))
    finally:
        dev.close()
        running.stop(grace_s=1)


def test_a_reply_in_another_dtype_than_the_step_is_refused_and_the_session_goes_on(device, tiny_checkpoint):
    link = device.model.link
    hidden = torch.randn(1, 3, device.model.embed.embedding_dim).to(torch.bfloat16)
    width = lambda group: CONFIG.width(group, a_side=False)
    wrong = lambda request: AdapterReply(request.layer, request.group, request.phase,
                                         torch.zeros(*request.tensor.shape[:-1], width(request.group)))  # float32, not bfloat16
    with pytest.raises(ValidationError, match="cross as torch.bfloat16"):
        link._session.step(ForwardRequest(hidden), wrong, ForwardResult)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(device.model(ids), in_process(tiny_checkpoint)(ids), atol=1e-5)


def test_a_large_exchange_crosses_in_pieces_and_trains_as_a_whole_one_does(server, device, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(wire, "PIECE_BYTES", 192)  # 4 tokens of u (q, k and v at r = 4) in float32
    half = next(iter(server.service.versions.values())).half
    monkeypatch.setattr(half, "training_group_tokens", 0)
    monkeypatch.setattr(half, "grouping_round_trip_s", 0.0)  # however fast loopback answers
    starts = {Phase.FORWARD: set(), Phase.BACKWARD: set()}
    device.model.link.taps.append(lambda _, m: isinstance(m, AdapterRequest) and starts[m.phase].add(m.start))
    assert_same_model(device.model, in_process(tiny_checkpoint), torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(2)))
    # The training step's two rows, packed, run as two row groups: tokens 0-7 and 8-15.
    assert starts == {Phase.FORWARD: {0, 4, 8, 12}, Phase.BACKWARD: {0, 4, 8, 12}}


def test_a_piece_answered_wrongly_fails_that_step_alone_and_the_session_goes_on(device, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(wire, "PIECE_BYTES", 24)  # a token of u (q, k and v at r = 4) in bfloat16 a piece
    link = device.model.link
    session = link._session
    hidden = torch.randn(1, 6, device.model.embed.embedding_dim).to(torch.bfloat16)  # the step's exchanges cross as bfloat16
    zeros = lambda request, dtype: torch.zeros(*request.tensor.shape[:-1], CONFIG.width(request.group, a_side=False), dtype=dtype)
    # The first piece's reply comes in float32, not the step's bfloat16; the service still reads the rest.
    first_in_float32 = lambda request: request.answer(zeros(request, torch.float32 if request.start == 0 else torch.bfloat16))
    with pytest.raises(ValidationError, match="cross as torch.bfloat16"):
        session.step(ForwardRequest(hidden), first_in_float32, ForwardResult)
    shifted = lambda request: dataclasses.replace(request.answer(zeros(request, torch.bfloat16)), start=request.start + (request.start == 2))
    with pytest.raises(ValidationError, match="from token 3, expected .* from token 2"):
        session.step(ForwardRequest(hidden), shifted, ForwardResult)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(device.model(ids), in_process(tiny_checkpoint)(ids), atol=1e-5)
    assert link._session is session and not session.over


def test_the_device_received_its_bundle_and_never_a_or_b(device):
    bundle = device.store.root / "bundle"
    names = {p.name for p in bundle.iterdir()}
    assert "config.json" in names and "model.safetensors" in names
    from safetensors import safe_open

    with safe_open(bundle / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.endswith((".A", ".B")) or "privatelora" in k for k in keys)
    assert not any(k.startswith("model.layers.1.") for k in keys)  # only the device's own layer


def test_training_over_the_network_records_nothing_private_in_messages(device):
    seen = []
    device.model.link.taps.append(lambda direction, message: seen.append(message))
    ids = list(range(10, 30))
    result = personalize(device.model, [TokenizedExample(ids, ids)], 0, TrainSettings(steps=3, lr=0.05, batch_size=1))
    assert result.steps == 3 and result.last_loss < result.first_loss
    private = {m.data_ptr() for m in device.model.weights.ms.values()}
    tensors = [v for msg in seen for v in vars(msg).values() if isinstance(v, torch.Tensor)]
    assert tensors and not private & {t.data_ptr() for t in tensors}
    assert all(t.shape[-1] in (4, 12, 32) for t in tensors)  # r-vectors and hidden states only


def test_a_search_trial_that_diverges_over_the_network_is_recorded_and_costs_the_device_nothing(server, device):
    data = [TokenizedExample(ids, ids) for ids in (list(range(10 + i, 24 + i)) for i in range(8))]
    overflowing = (math.inf, 1e30)  # the device's own numbers stop being finite, then the cloud's (test_search.py)
    result = search_lr(device.model, data, data[:4], 0, TrainSettings(steps=16, batch_size=2, anchor=None),
                       LrSearch((*overflowing, 0.05), trial_fraction=0.25))
    assert result.chosen == 0.05 and all(result.as_metrics()[trial_key(rate)] == "diverged" for rate in overflowing)
    assert all(torch.count_nonzero(m) == 0 for m in device.model.weights.ms.values())
    # The device never sent the service a NaN: no step failed there, and none was charged to it.
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics").read().decode()
    assert "plora_step_errors_total{" not in metrics, re.findall(r"^plora_step_errors_total.*$", metrics, re.M)


def test_a_wrong_token_is_refused(endpoint, device):
    record = device.store.record
    wrong = Credentials(record.device_id, "not-the-token")
    with pytest.raises(AuthenticationError):
        GrpcLink(endpoint, wrong, record.identity)


def test_a_version_mismatch_is_refused(endpoint, device):
    record = device.store.record
    creds = Credentials.load(device.store.root / "credentials.json")
    other = dataclasses.replace(record.identity, content_hash="0" * 64)
    with pytest.raises(VersionMismatchError, match="no hosted version"):
        GrpcLink(endpoint, creds, other)


def test_malformed_frames_each_get_a_clear_error_and_the_server_stays_up(endpoint, device):
    creds = Credentials.load(device.store.root / "credentials.json")
    identity = device.store.record.identity
    hidden = torch.randn(1, 3, 32)

    def run(frames):
        with endpoint.channel() as channel:
            stub = pb_grpc.SplitBackboneStub(channel)
            replies = stub.Session(iter(frames), metadata=creds.metadata(), timeout=10)
            return [wire.parse_cloud_message(r, 1 << 20)[1] for r in replies]

    opening = wire.device_message(0, OpenSession(identity))
    forward = wire.device_message(1, ForwardRequest(hidden))

    truncated = wire.device_message(1, ForwardRequest(hidden))
    truncated.forward.hidden.data = truncated.forward.hidden.data[:-4]
    cases = {
        "wrong shape": [opening, wire.device_message(1, ForwardRequest(torch.randn(1, 3, 31)))],
        "wrong dtype": [opening, wire.device_message(1, ForwardRequest(hidden.long()))],
        "NaN": [opening, wire.device_message(1, ForwardRequest(hidden * float("nan")))],
        "truncated": [opening, truncated],
        "out-of-order layer": [opening, forward, wire.device_message(1, AdapterReply(3, "attn_in", Phase.FORWARD, torch.zeros(1, 3, 12)))],
    }
    for case, frames in cases.items():
        messages = run(frames)
        errors = [m for m in messages if type(m).__name__ == "StepError"]
        assert errors and errors[0].kind == "ValidationError", (case, messages)
    # An oversized frame is refused by the transport itself.
    with pytest.raises(grpc.RpcError) as refused:
        run([opening, wire.device_message(1, ForwardRequest(torch.randn(1, 300_000, 32)))])
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The server still serves a well-behaved device.
    assert device.model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 49152)


def test_a_new_session_is_refused_at_once_when_the_service_has_no_room_for_its_first_token(tiny_checkpoint, tmp_path):
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    costs = StepCosts.of(config, len(CONFIG.cloud_layers(config.num_hidden_layers)))
    held_tokens = 8
    # Room for a cache of 8 tokens and the step that makes it, not for anyone else's first token.
    limits = Limits(reply_timeout_s=5, total_memory_bytes=held_tokens * costs.kv_per_token + costs.smallest_step() - 1)
    server = start_service([str(tiny_checkpoint)], CONFIG, open_registry(), limits)
    try:
        assert next(iter(server.service.versions.values())).half.costs == costs
        endpoint = Endpoint(f"127.0.0.1:{server.port}", insecure=True)
        token = open_registry().issue_enrollment_token(2)[1]
        for name in ("holding", "late"):
            init_device(tmp_path / name, endpoint.address, endpoint=endpoint, enroll_token=token)
        holding = open_device(tmp_path / "holding")
        with torch.no_grad():
            holding.model(torch.tensor([[1]]), CacheMode.START)
            for t in range(2, held_tokens + 1):
                holding.model(torch.tensor([[t]]), CacheMode.EXTEND)
        assert server.service.memory.used()["kv"] == held_tokens * costs.kv_per_token

        creds = Credentials.load(tmp_path / "late" / "credentials.json")
        opening = wire.device_message(0, OpenSession(DeviceStore.open(tmp_path / "late").record.identity))
        with endpoint.channel() as channel:
            replies = pb_grpc.SplitBackboneStub(channel).Session(iter([opening]), metadata=creds.metadata(), timeout=10)
            answered = [wire.parse_cloud_message(r, 1 << 20)[1] for r in replies]
        assert [type(m).__name__ for m in answered] == ["StepError"], answered
        assert answered[0].kind == "CapacityError" and "no room for a new session" in answered[0].message

        holding.close()
        late = open_device(tmp_path / "late")
        try:
            with torch.no_grad():
                assert late.model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 49152)
        finally:
            late.close()
    finally:
        server.stop(grace_s=1)


def test_a_device_whose_steps_keep_failing_is_refused_unrun_and_slowly_and_others_go_on(tiny_checkpoint, tmp_path):
    limits = Limits(reply_timeout_s=5, failed_steps_per_minute=30)  # a refusal is held 2 s: a minute / 30
    server = start_service([str(tiny_checkpoint)], CONFIG, open_registry(), limits, http_port=0)
    try:
        endpoint = Endpoint(f"127.0.0.1:{server.port}", insecure=True)
        token = open_registry().issue_enrollment_token(2)[1]
        for name in ("hostile", "honest"):
            init_device(tmp_path / name, endpoint.address, endpoint=endpoint, enroll_token=token)
        creds = Credentials.load(tmp_path / "hostile" / "credentials.json")
        identity = DeviceStore.open(tmp_path / "hostile").record.identity
        broken = wire.device_message(1, ForwardRequest(torch.randn(1, 3, 31)))  # the wrong width
        with endpoint.channel() as channel:
            frames = [wire.device_message(0, OpenSession(identity)), *[broken] * 31]
            replies = pb_grpc.SplitBackboneStub(channel).Session(iter(frames), metadata=creds.metadata(), timeout=20)
            answered = []
            for reply in replies:
                answered.append((wire.parse_cloud_message(reply, 1 << 20)[1], time.monotonic()))
        errors = [message for message, _ in answered[1:]]
        assert [m.kind for m in errors] == ["ValidationError"] * 30 + ["CapacityError"]
        assert "refused unrun" in errors[-1].message and not any(m.fatal for m in errors)
        assert answered[-1][1] - answered[-2][1] >= 1.5  # the refusal was held
        honest = open_device(tmp_path / "honest")
        try:
            assert honest.model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 49152)
        finally:
            honest.close()
    finally:
        server.stop(grace_s=1)


def test_the_noisy_neighbour_is_slowed_to_its_allowance_once_it_is_spent(endpoint, tmp_path):
    init_device(tmp_path / "attacker", endpoint.address, endpoint=endpoint, enroll_token=open_registry().issue_enrollment_token()[1])
    ready, stop, report = threading.Event(), threading.Event(), queue.Queue()
    attacker = threading.Thread(target=neighbour._attack, args=(tmp_path / "attacker", endpoint.address, 200, 4, ready, stop, report))
    attacker.start()
    assert ready.wait(30)
    time.sleep(3)
    stop.set()
    attacker.join(30)
    reported = report.get(timeout=1)
    # Ten failed steps a minute, the default (and the steps the other 3 sessions had in flight
    # when it ran out); then each session's next step is refused unrun, held 6 s.
    assert 10 <= reported["steps"]["ValidationError"] <= 10 + 3 and 1 <= reported["steps"].get("CapacityError", 0) <= 4
    assert reported["frames_per_s"] < 20  # of the 200 it would send


def test_health_and_metrics(server, device):
    with torch.no_grad():
        device.model(torch.tensor([[1, 2, 3]]))
    base = f"http://127.0.0.1:{server.http_port}"
    assert urllib.request.urlopen(f"{base}/healthz").read() == b"ok\n"
    metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
    assert "plora_active_sessions 1.0" in metrics
    assert 'plora_tokens_total{step="forward"} 3.0' in metrics
    assert "plora_adapter_round_trip_seconds_count" in metrics
    assert 'plora_batched{what="backward_rows"} 0.0' in metrics  # one device: nothing to batch with


def test_session_limits_are_enforced(tiny_checkpoint, tmp_path):
    # Long enough an idle timeout that no session expires while the next device loads its model,
    # on a machine busy with other tests too (5 s was not, under make test's two workers).
    limits = Limits(max_sessions_per_device=1, max_sessions=2, idle_timeout_s=15.0)
    running = start_service([str(tiny_checkpoint)], CONFIG, open_registry(), limits)
    try:
        endpoint = Endpoint(f"127.0.0.1:{running.port}", insecure=True)
        token = open_registry().issue_enrollment_token(uses=3)[1]
        for name in ("a", "b", "c"):
            init_device(tmp_path / name, endpoint.address, endpoint=endpoint, enroll_token=token)
        first = open_device(tmp_path / "a")
        with pytest.raises(CapacityError, match="limit per device"):
            open_device(tmp_path / "a")
        second = open_device(tmp_path / "b")
        with pytest.raises(CapacityError, match="limit of 2 sessions"):
            open_device(tmp_path / "c")
        # Idle sessions are closed and their memory freed.
        deadline = time.monotonic() + 40
        while running.service.active_sessions and time.monotonic() < deadline:
            time.sleep(0.1)
        assert running.service.active_sessions == 0
        # The device learns it on its next step, and goes on in a new session.
        with torch.no_grad():
            assert torch.isfinite(first.model(torch.tensor([[1, 2]]))).all()
        assert running.service.active_sessions == 1
        first.close()
        second.close()
    finally:
        running.stop(grace_s=1)


def test_graceful_shutdown_refuses_new_sessions_and_ends_open_ones(server, device, tmp_path, endpoint):
    with torch.no_grad():
        device.model(torch.tensor([[1, 2, 3]]))
    init_device(tmp_path / "late", endpoint.address, endpoint=endpoint, enroll_token=open_registry().issue_enrollment_token()[1])
    server.stop(grace_s=0.5)
    device.model.link.retry = RetryPolicy(budget_s=1.0)  # the default waits a minute for the service to come back
    with pytest.raises(TransportError):
        device.model(torch.tensor([[4]]))
    with pytest.raises(TransportError):
        open_device(tmp_path / "late")


def test_the_cli_works_over_the_network(server, tmp_path):
    from click.testing import CliRunner

    from plora.platform.cli.main import main

    folder = tmp_path / "cli-dev"
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "What is my pet called?", "response": "Your pet is called Quill."}\n' * 4)
    runner = CliRunner()
    for args in (
        ["device", "init", folder, "--backbone", f"127.0.0.1:{server.port}", "--insecure",
         "--enroll-token", open_registry().issue_enrollment_token()[1]],
        ["personalize", folder, "--data", data, "--steps", 2],
        ["generate", folder, "Hi", "--max-new-tokens", 3],
        ["score", folder, "--text", "Your pet is called Quill.", "--json"],
    ):
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, (args, result.output)
    assert len(json.loads(result.stdout)["logprobs"]) > 3
    # Activations in 16 bits cross in about half the bytes.
    sent = {}
    for dtype in ("float32", "bfloat16"):
        before = received_bytes(server)
        result = runner.invoke(main, ["generate", str(folder), "Hi", "--max-new-tokens", "3", "--draft-tokens", "0",
                                      "--wire-dtype", dtype, "--cut-dtype", dtype], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        sent[dtype] = received_bytes(server) - before
    assert sent["bfloat16"] < 0.6 * sent["float32"], sent


def received_bytes(server) -> float:
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/metrics").read().decode()
    return float(re.search(r'^plora_wire_bytes_total\{direction="in"\} (\S+)$', metrics, re.M).group(1))


def serving_threads() -> set[threading.Thread]:
    """The service's own threads: event loop, HTTP, decode batcher, step workers, revocation watcher."""
    prefixes = ("plora-grpc", "plora-http", "plora-batcher", "plora-step", "plora-revocations")
    return {t for t in threading.enumerate() if t.name.startswith(prefixes)}


def test_a_taken_port_is_a_clear_error_and_leaves_nothing_running(server, tiny_checkpoint):
    before = serving_threads()
    for grpc_port, http_port in ((server.port, 0), (0, server.http_port)):
        with pytest.raises(ConfigError, match="cannot listen"):
            start_service([str(tiny_checkpoint)], CONFIG, open_registry(), port=grpc_port, http_port=http_port)
    assert serving_threads() == before  # no event loop, HTTP, batcher or worker thread left behind


def test_a_stopped_service_leaves_no_thread_behind(tiny_checkpoint, tmp_path):
    before = serving_threads()
    running = start_service([str(tiny_checkpoint)], CONFIG, open_registry(), http_port=0)
    endpoint = Endpoint(f"127.0.0.1:{running.port}", insecure=True)
    devices, token = [], open_registry().issue_enrollment_token(uses=2)[1]
    for name in ("a", "b"):
        init_device(tmp_path / name, endpoint.address, endpoint=endpoint, enroll_token=token)
        devices.append(open_device(tmp_path / name))
    # Two devices decoding at once: their steps go through the decode batcher.
    with ThreadPoolExecutor(len(devices)) as pool:
        outputs = list(pool.map(lambda d: list(stream_tokens(d.model, [1, 2, 3], 4, set())), devices))
    assert [len(tokens) for tokens in outputs] == [4, 4]
    started = serving_threads() - before
    assert {t.name for t in started} >= {"plora-grpc", "plora-http", "plora-batcher", "plora-step_0", "plora-step_1", "plora-revocations"}
    for device in devices:
        device.close()
    running.stop(grace_s=1)
    assert not any(t.is_alive() for t in started)


def test_a_device_idle_with_keepalive_pings_keeps_its_connection(tiny_checkpoint):
    # gRPC ignores an option it does not know: the service once allowed one ping in 5 minutes
    # without data, and ended the connection at the third ping that came sooner.
    running = start_service([str(tiny_checkpoint)], CONFIG, open_registry(), Limits())
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}", options=[
        ("grpc.keepalive_time_ms", 1_000),  # as often as gRPC's client pings at all
        ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)])
    try:
        states = []
        channel.subscribe(states.append, try_to_connect=True)
        grpc.channel_ready_future(channel).result(timeout=10)
        time.sleep(5)  # 5 pings
        ready = states.index(grpc.ChannelConnectivity.READY)
        assert states[ready:] == [grpc.ChannelConnectivity.READY]  # a GOAWAY makes the channel leave it
    finally:
        channel.close()
        running.stop(grace_s=1)
