"""Inference steps of several sessions (prefills, decode steps, drafted tokens to verify)
batched into one pass equal each session run alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
import torch

from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.compute import CloudHalf
from plora.cloud_backbone.privatelora import AdapterWeights
from plora.cloud_backbone.protocol.messages import AdapterReply, CacheMode, ForwardRequest
from plora.storage.errors import PloraError, SessionError, ValidationError
from plora.cloud_backbone import batching
from plora.cloud_backbone.batching import MAX_BATCHED_TOKENS
from tests.conftest import tiny_backbone

CONFIG = PrivateLoRAConfig(rank=4)


def device(seed: int, fail_at_layer: int | None = None):
    """A device answering with its own random M; optionally sending a bad reply at one layer
    of a decode step."""
    weights = AdapterWeights(CONFIG, 4)
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in weights.ms.values():
            m.normal_(0, 0.3)

    def handler(request):
        v = weights.products(request.layer, request.group, request.tensor).detach()
        if request.layer == fail_at_layer and request.tensor.shape[1] == 1:
            v = v[..., :-1]
        return AdapterReply(request.layer, request.group, request.phase, v)

    return handler


def together(specs: dict, run) -> tuple[dict, dict, dict]:
    """run(spec, barrier) for every spec, each in a thread of its own, all started together:
    their results, PloraErrors and seconds, by name."""
    results, errors, took = {}, {}, {}
    barrier = threading.Barrier(len(specs))

    def one(name, spec):
        started = time.monotonic()
        try:
            results[name] = run(spec, barrier)
        except PloraError as err:
            errors[name] = err
        took[name] = time.monotonic() - started

    threads = [threading.Thread(target=one, args=item) for item in specs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors, took


def decode(half: CloudHalf, handler, prompt: torch.Tensor, steps: torch.Tensor, barrier=None) -> list[torch.Tensor]:
    session = half.open_session()
    outs = [session.forward(ForwardRequest(prompt, CacheMode.START), handler).hidden]
    for t in range(steps.shape[1]):
        if barrier and t == 0:
            barrier.wait()
        outs.append(session.forward(ForwardRequest(steps[:, t : t + 1], CacheMode.EXTEND), handler).hidden)
    return outs


def test_batched_decode_equals_each_session_alone_with_different_lengths():
    alone_half = CloudHalf(tiny_backbone(), CONFIG)
    batched_half = CloudHalf(tiny_backbone(), CONFIG)
    batched_half.enable_batching(gather_s=0.05)
    gen = torch.Generator().manual_seed(0)
    sessions = [(device(i), torch.randn(1, 3 + 2 * i, 32, generator=gen), torch.randn(1, 5, 32, generator=gen)) for i in range(4)]
    alone = [decode(alone_half, *s) for s in sessions]
    together: list = [None] * 4
    barrier = threading.Barrier(4)

    def run(i):
        together[i] = decode(batched_half, *sessions[i], barrier)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b))
    batcher = batched_half.batcher
    assert batcher.batches < batcher.rows  # steps really were batched across sessions


def test_a_failing_device_fails_only_its_own_row():
    half = CloudHalf(tiny_backbone(), CONFIG)
    half.enable_batching(gather_s=0.5)  # long enough that both first decode steps share a batch
    reference = CloudHalf(tiny_backbone(), CONFIG)
    gen = torch.Generator().manual_seed(1)
    good = (device(0), torch.randn(1, 4, 32, generator=gen), torch.randn(1, 3, 32, generator=gen))
    bad = (device(1, fail_at_layer=2), torch.randn(1, 4, 32, generator=gen), torch.randn(1, 3, 32, generator=gen))
    results, errors = {}, {}
    barrier = threading.Barrier(2)

    def run(name, spec):
        try:
            results[name] = decode(half, *spec, barrier)
        except ValidationError as err:
            errors[name] = err

    threads = [threading.Thread(target=run, args=(n, s)) for n, s in (("good", good), ("bad", bad))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(errors) == {"bad"} and "shape" in str(errors["bad"])
    expected = decode(reference, *good)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(results["good"], expected))
    assert half.batcher.batches < half.batcher.rows  # the failing step was a shared batch


def test_a_closed_batcher_stops_its_thread_and_refuses_steps():
    half = CloudHalf(tiny_backbone(), CONFIG)
    half.enable_batching(gather_s=0.05)
    before = set(threading.enumerate())
    gen = torch.Generator().manual_seed(0)
    barrier = threading.Barrier(2)
    threads = [
        threading.Thread(target=decode, args=(half, device(i), torch.randn(1, 3, 32, generator=gen), torch.randn(1, 2, 32, generator=gen), barrier))
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = {t for t in set(threading.enumerate()) - before if t.name == "plora-batcher"}
    assert half.batcher.rows > 0 and len(started) == 1  # the decode steps ran batched
    half.close()
    assert not any(t.is_alive() for t in started)
    with pytest.raises(SessionError, match="stopping"):
        half.batcher.step(half.open_session(), torch.zeros(1, 1, 32))


def warm_up(session, handler) -> None:
    """A first step, which a session makes before the others it batches with are seen stepping:
    alone. The START of the next step drops its cache."""
    session.forward(ForwardRequest(torch.zeros(1, 1, 32), CacheMode.START), handler)


NEW_SEQUENCE = -1  # a step's keep_cached that stands for a START of a new sequence instead


def steps_of(half: CloudHalf, handler, prompt: torch.Tensor, steps: list[tuple[int, int | None]], barrier) -> list[torch.Tensor]:
    """A prefill, then steps of (new tokens, keep_cached): drafted tokens verified, rejected
    ones dropped on the next step, or a new sequence. Every step starts together with the other
    sessions'."""
    gen = torch.Generator().manual_seed(prompt.shape[1])
    session = half.open_session()
    warm_up(session, handler)
    barrier.wait()
    outs = [session.forward(ForwardRequest(prompt, CacheMode.START), handler).hidden]
    for tokens, keep in steps:
        barrier.wait()
        hidden = torch.randn(1, tokens, 32, generator=gen)
        request = ForwardRequest(hidden, CacheMode.START) if keep == NEW_SEQUENCE else ForwardRequest(hidden, CacheMode.EXTEND, keep_cached=keep)
        outs.append(session.forward(request, handler).hidden)
    return outs


def spy_on_batches(half: CloudHalf, cached: list | None = None) -> list[list[int]]:
    """The new tokens of each batch's rows, sorted, as the batcher runs them; the rows' cached
    positions, sorted, go to `cached`."""
    shapes, run = [], half.batcher._run

    def spied(batch):
        shapes.append(sorted(t.tokens for t in batch))
        if cached is not None:
            cached.append(sorted(t.session.cache.get_seq_length() for t in batch))
        return run(batch)

    half.batcher._run = spied
    return shapes


def test_batched_prefills_and_drafted_steps_of_different_lengths_equal_each_session_alone():
    gen = torch.Generator().manual_seed(3)
    # Prompts of 5 to 8 tokens batch together, as do the steps of 3 and 4 tokens on caches of 4
    # to 7 positions, three of them after rolling back a draft; a 16-token prompt comes alone in
    # its bucket, as does a new sequence.
    plans = [
        (torch.randn(1, 5, 32, generator=gen), [(1, None), (4, None), (2, 4)]),
        (torch.randn(1, 8, 32, generator=gen), [(2, None), (3, 7), (1, None)]),
        (torch.randn(1, 7, 32, generator=gen), [(1, None), (4, 6), (9, None)]),
        (torch.randn(1, 16, 32, generator=gen), [(1, None), (3, 5), (2, NEW_SEQUENCE)]),
    ]
    solo = CloudHalf(tiny_backbone(), CONFIG)
    alone = [steps_of(solo, device(i), prompt, steps, threading.Barrier(1)) for i, (prompt, steps) in enumerate(plans)]
    half = CloudHalf(tiny_backbone(), CONFIG)
    half.enable_batching(gather_s=0.5)
    shapes = spy_on_batches(half)
    together: list = [None] * len(plans)
    barrier = threading.Barrier(len(plans))
    devices = [device(i) for i in range(len(plans))]  # made here: each seeds torch's global generator

    def go(i):
        together[i] = steps_of(half, devices[i], *plans[i], barrier)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for mine, reference in zip(together, alone):
        assert [x.shape for x in mine] == [x.shape for x in reference]
        for a, b in zip(mine, reference):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert [5, 7, 8] in shapes and [3, 3, 4, 4] in shapes  # prefills and drafted steps shared passes
    assert all(batch[-1] <= 2 * batch[0] for batch in shapes)  # never a row padded past twice its length


def test_a_long_cache_never_batches_with_short_ones():
    """Its neighbours would attend over its padded length, and the batch would copy it once per row."""
    half = CloudHalf(tiny_backbone(), CONFIG)
    half.enable_batching(gather_s=0.5)
    gen = torch.Generator().manual_seed(5)
    cached: list[list[int]] = []
    spy_on_batches(half, cached)
    prompts = [torch.randn(1, n, 32, generator=gen) for n in (4, 5, 200)]
    devices = [device(i) for i in range(len(prompts))]
    barrier = threading.Barrier(len(prompts))
    threads = [threading.Thread(target=steps_of, args=(half, devices[i], prompts[i], [(1, None)] * 2, barrier)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [4, 5] in cached or [5, 6] in cached  # the short caches' decode steps shared a pass
    assert all(rows[-1] < 2 * max(rows[0], 1) for rows in cached)  # and the long one shared none


def test_a_step_too_long_to_batch_runs_alone():
    half = CloudHalf(tiny_backbone(), CONFIG)
    half.enable_batching(gather_s=0.5)
    gen = torch.Generator().manual_seed(4)
    barrier = threading.Barrier(2)
    shapes = spy_on_batches(half)
    prompts = [torch.randn(1, MAX_BATCHED_TOKENS + 1, 32, generator=gen) for _ in range(2)]
    devices = [device(i) for i in range(2)]
    threads = [threading.Thread(target=steps_of, args=(half, devices[i], prompts[i], [(1, None)], barrier)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [1, 1] in shapes and max(max(batch) for batch in shapes) == 1  # the decode steps batched, the prompts not


def test_a_pass_holds_at_most_the_tokens_a_step_may_and_the_rest_run_side_by_side():
    """More would gain no matmul efficiency, and the passes in flight each compute on a core."""
    half = CloudHalf(tiny_backbone(), CONFIG)
    half.enable_batching(gather_s=0.5, max_tokens=12)
    gen = torch.Generator().manual_seed(6)
    shapes = spy_on_batches(half)
    prompts = [torch.randn(1, 5, 32, generator=gen) for _ in range(4)]
    barrier = threading.Barrier(len(prompts))
    threads = [threading.Thread(target=steps_of, args=(half, device(i), prompts[i], [], barrier)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    prefills = [batch for batch in shapes if max(batch) == 5]
    assert sorted(len(batch) for batch in prefills) == [2, 2]  # 4 prompts of 5 tokens, 12 a pass


def test_a_failing_device_in_a_batched_prefill_fails_only_its_own_row_and_keeps_no_cache():
    half = CloudHalf(tiny_backbone(), CONFIG)
    half.enable_batching(gather_s=0.5)
    reference = CloudHalf(tiny_backbone(), CONFIG)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randn(1, n, 32, generator=gen) for n in (6, 7)]
    honest, failing = device(0), device(1)

    def broken(request):  # a reply one column short, for the prefill's layer 2
        reply = failing(request)
        if request.layer == 2 and request.tensor.shape[1] > 1:
            return AdapterReply(reply.layer, reply.group, reply.phase, reply.tensor[..., :-1])
        return reply

    sessions = [half.open_session(), half.open_session()]
    outcome: dict = {}
    barrier = threading.Barrier(2)

    def start(i, handler):
        warm_up(sessions[i], handler)
        barrier.wait()
        try:
            outcome[i] = sessions[i].forward(ForwardRequest(prompts[i], CacheMode.START), handler).hidden
        except ValidationError as err:
            outcome[i] = err

    threads = [threading.Thread(target=start, args=(0, honest)), threading.Thread(target=start, args=(1, broken))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert half.batcher.rows - half.batcher.batches == 1  # the prefills shared a pass
    assert isinstance(outcome[1], ValidationError) and sessions[1].cache.get_seq_length() == 1  # its cache as before
    expected = reference.open_session().forward(ForwardRequest(prompts[0], CacheMode.START), honest).hidden
    torch.testing.assert_close(outcome[0], expected, atol=1e-5, rtol=0)
    assert sessions[0].cache.get_seq_length() == 6


class HeldReplies:
    """A network-style handler (with `submit`): once `hold` is set, its replies from layer
    `from_layer` on wait for `release`."""

    def __init__(self, handler, from_layer: int = 0):
        self.handler, self.from_layer = handler, from_layer
        self.hold, self.asked, self.release = threading.Event(), threading.Event(), threading.Event()

    def submit(self, request) -> Future:
        future = Future()
        if not self.hold.is_set() or request.layer < self.from_layer:
            future.set_result(self.handler(request))
            return future
        self.asked.set()

        def answer():
            self.release.wait()
            future.set_result(self.handler(request))

        threading.Thread(target=answer, daemon=True).start()
        return future


def test_a_batch_waiting_for_its_devices_does_not_hold_up_the_next_batch():
    half = CloudHalf(tiny_backbone(), CONFIG)
    half.enable_batching(gather_s=0.05)
    reference = CloudHalf(tiny_backbone(), CONFIG)
    gen = torch.Generator().manual_seed(6)
    slow, fast = HeldReplies(device(0)), [device(1), device(2)]
    handlers = [slow, *fast]
    prompts = [torch.randn(1, 3, 32, generator=gen) for _ in handlers]
    steps = [torch.randn(1, 1, 32, generator=gen) for _ in handlers]
    sessions = [half.open_session() for _ in handlers]
    for session, handler, prompt in zip(sessions, handlers, prompts):
        session.forward(ForwardRequest(prompt, CacheMode.START), handler)
    out: dict = {}

    def step(i):
        out[i] = sessions[i].forward(ForwardRequest(steps[i], CacheMode.EXTEND), handlers[i]).hidden

    slow.hold.set()
    waiting = threading.Thread(target=step, args=(0,))
    waiting.start()
    assert slow.asked.wait(5)  # its pass is waiting for the slow device's reply
    others = [threading.Thread(target=step, args=(i,)) for i in (1, 2)]
    for t in others:
        t.start()
    for t in others:
        t.join(10)
    passed = sorted(out)
    slow.release.set()
    waiting.join(10)
    assert passed == [1, 2], "the next batch waited for a batch whose device was slow"
    assert half.batcher.rows - half.batcher.batches >= 1  # the two fast sessions shared a pass
    for i, handler in enumerate([device(0), *fast]):
        alone = reference.open_session()
        alone.forward(ForwardRequest(prompts[i], CacheMode.START), handler)
        torch.testing.assert_close(out[i], alone.forward(ForwardRequest(steps[i], CacheMode.EXTEND), handler).hidden, atol=1e-5, rtol=0)


def test_a_failed_row_hears_of_it_at_once_while_its_pass_goes_on():
    half = CloudHalf(tiny_backbone(), CONFIG)
    half.enable_batching(gather_s=0.5)
    gen = torch.Generator().manual_seed(7)
    honest, broken = HeldReplies(device(0), from_layer=2), device(1, fail_at_layer=1)
    prompts = [torch.randn(1, 3, 32, generator=gen) for _ in range(2)]
    sessions = [half.open_session() for _ in range(2)]
    for session, handler, prompt in zip(sessions, (honest, broken), prompts):
        session.forward(ForwardRequest(prompt, CacheMode.START), handler)
    outcome: dict = {}

    def step(i, handler):
        try:
            outcome[i] = sessions[i].forward(ForwardRequest(torch.randn(1, 1, 32), CacheMode.EXTEND), handler).hidden
        except ValidationError as err:
            outcome[i] = err

    honest.hold.set()  # the pass stops at layer 2, waiting for the honest device
    threads = [threading.Thread(target=step, args=(0, honest)), threading.Thread(target=step, args=(1, broken))]
    for t in threads:
        t.start()
    assert honest.asked.wait(5)
    threads[1].join(5)
    failed_while_the_pass_waits = not threads[1].is_alive()
    honest.release.set()
    threads[0].join(10)
    assert half.batcher.rows - half.batcher.batches == 1  # the two steps shared a pass
    assert failed_while_the_pass_waits, "the broken row's session waited for the end of its pass"
    assert isinstance(outcome[1], ValidationError) and sessions[1].cache.get_seq_length() == 3
    assert isinstance(outcome[0], torch.Tensor) and sessions[0].cache.get_seq_length() == 4


class DelayedReplies:
    """A network-style handler whose every reply comes `delay_s` after its request, as over a slow link."""

    def __init__(self, handler, delay_s: float):
        self.handler, self.delay_s = handler, delay_s

    def submit(self, request) -> Future:
        future = Future()
        threading.Timer(self.delay_s, lambda: future.set_result(self.handler(request))).start()
        return future


def decode_in_step(half: CloudHalf, delay_s: float, pause_s, warm_steps: int, steps: int) -> tuple[int, int]:
    """Three devices whose replies take `delay_s` decode `warm_steps` + `steps` steps at once, device i
    pausing pause_s(i) before each step, as its own layers and its link take; they align once
    before the last `steps`. Returns the rows and passes those steps took in batches."""
    gen = torch.Generator().manual_seed(8)
    handlers = [DelayedReplies(device(i), delay_s) for i in range(3)]
    prompts = [torch.randn(1, 3, 32, generator=gen) for _ in handlers]
    inputs = torch.randn(1, warm_steps + steps, 32, generator=gen)
    before: list[tuple[int, int]] = []
    aligned = threading.Barrier(len(handlers), action=lambda: before.append((half.batcher.rows, half.batcher.batches)))

    def decode(i):
        session = half.open_session()
        session.forward(ForwardRequest(prompts[i], CacheMode.START), handlers[i])
        for t in range(inputs.shape[1]):
            if t == warm_steps:
                aligned.wait(30)
            time.sleep(pause_s(i))
            session.forward(ForwardRequest(inputs[:, t : t + 1], CacheMode.EXTEND), handlers[i])

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(len(handlers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    (rows, batches), = before
    return half.batcher.rows - rows, half.batcher.batches - batches


def test_sessions_whose_passes_outlast_the_company_window_keep_batching(monkeypatch):
    """Over a slow link a pass lasts longer than the window in which a session counts as
    company. Its sessions still count, and a pass waits for those on their way back to it, so
    devices that decode together keep sharing passes although they come back one after another."""
    monkeypatch.setattr(batching, "COMPANY_WINDOW_S", 0.2)
    half = CloudHalf(tiny_backbone(), CONFIG)
    half.enable_batching(gather_s=0.1)
    rows, batches = decode_in_step(half, 0.06, lambda i: 0.01 * i, 0, 4)  # a pass: 4 round trips, over 0.24 s
    assert rows == 3 * 4, "a session decoded alone"
    assert batches == 4, "the sessions' steps did not share passes"


def test_a_pass_waits_for_its_sessions_about_as_long_as_their_way_back_usually_takes():
    """Devices that spend tens of milliseconds between steps come back from a pass tens of
    milliseconds apart, more than the shortest wait for company; the next pass waits as long as
    their way back usually takes, so they keep sharing passes."""
    half = CloudHalf(tiny_backbone(), CONFIG)
    half.enable_batching()
    rows, batches = decode_in_step(half, 0.01, lambda i: 0.03 + 0.02 * i, 2, 4)
    assert half.batcher.gather_s < 0.02  # the devices come back 20 and 40 ms after the first
    assert (rows, batches) == (3 * 4, 4), "the sessions' steps did not share passes"


def test_sessions_that_began_apart_come_to_share_one_pass_per_step():
    """Devices that began decoding half a pass apart would each keep a pass of their own, step
    after step: when one group comes back, the other is in its pass. A pass waits for another
    that is past its middle, so the groups soon step in one pass together."""
    half = CloudHalf(tiny_backbone(), CONFIG)
    half.enable_batching()
    gen = torch.Generator().manual_seed(9)
    handlers = [DelayedReplies(device(i), 0.03) for i in range(3)]  # a pass: 4 round trips, over 0.12 s
    prompts = [torch.randn(1, 16, 32, generator=gen) for _ in handlers]  # every step's cache in one bucket
    steps = torch.randn(1, 10, 32, generator=gen)

    def decode(i, _barrier):
        if i == 2:
            time.sleep(0.06)
        session = half.open_session()
        session.forward(ForwardRequest(prompts[i], CacheMode.START), handlers[i])
        for t in range(steps.shape[1]):
            time.sleep(0.005)
            session.forward(ForwardRequest(steps[:, t : t + 1], CacheMode.EXTEND), handlers[i])

    _, errors, _ = together({i: i for i in range(len(handlers))}, decode)
    assert not errors
    assert half.batcher.rows >= 3 * 11 - 1, "a session stepped alone after the very first step"
    # Two passes per step, one per group, would take 2 for the prefills and 20 for the steps.
    assert half.batcher.batches <= 2 + 10 + 3, f"{half.batcher.batches} passes: the groups kept passes of their own"
