"""A session's failure is its own: a bad row leaves its batch, a failed step leaves the
session's cache as it was, every input is checked, and memory is refused before it is taken."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import pytest
import torch

from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.budget import MemoryBudget
from plora.cloud_backbone.compute import CloudHalf
from plora.cloud_backbone.protocol.messages import BackwardRequest, CacheMode, ForwardRequest
from plora.cloud_backbone.servicer import FailedSteps
from plora.storage.errors import CapacityError, PloraError, SessionError, TransportError, ValidationError
from tests.conftest import tiny_backbone
from tests.unit.test_batching import decode, device, together

CONFIG = PrivateLoRAConfig(rank=4)
GEN = torch.Generator().manual_seed(7)


def hidden(batch: int, tokens: int) -> torch.Tensor:
    return torch.randn(batch, tokens, 32, generator=GEN)


def failing(handler, layer: int, error: BaseException):
    """`handler`, except that decode steps raise `error` at `layer`."""

    def call(request):
        if request.layer == layer and request.tensor.shape[1] == 1:
            raise error
        return handler(request)

    return call


class LateHandler:
    """A network-style handler (with `submit`) whose replies to decode steps arrive `delay_s` late."""

    def __init__(self, handler, delay_s: float):
        self.handler, self.delay_s = handler, delay_s

    def submit(self, request) -> Future:
        future = Future()
        delay = self.delay_s if request.tensor.shape[1] == 1 else 0.0
        timer = threading.Timer(delay, lambda: future.set_result(self.handler(request)))
        timer.daemon = True
        timer.start()
        return future

    def __call__(self, request):
        return self.submit(request).result()


def run_together(half: CloudHalf, specs: dict) -> tuple[dict, dict, dict]:
    """Decode every (handler, prompt, steps) in its own thread, first steps in one batch."""
    return together(specs, lambda spec, barrier: decode(half, *spec, barrier))


@pytest.mark.parametrize(
    "error", [RuntimeError("a bug in a handler"), KeyError("group"), TransportError("stream ended")], ids=type
)
def test_any_exception_of_one_row_fails_that_row_only(error):
    half = CloudHalf(tiny_backbone(), CONFIG)
    half.enable_batching(gather_s=0.5)
    good = (device(0), hidden(1, 4), hidden(1, 3))
    bad = (failing(device(1), 2, error), hidden(1, 4), hidden(1, 3))
    results, errors, _ = run_together(half, {"good": good, "bad": bad})
    assert set(errors) == {"bad"} and isinstance(errors["bad"], PloraError)
    expected = decode(CloudHalf(tiny_backbone(), CONFIG), *good)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(results["good"], expected))
    assert half.batcher.batches < half.batcher.rows  # the failing step shared a batch


def test_a_late_row_leaves_its_batch_without_delaying_the_others_and_runs_alone():
    half = CloudHalf(tiny_backbone(), CONFIG)
    half.enable_batching(gather_s=0.5, late_floor_s=0.25, late_factor=5.0)
    good = (device(0), hidden(1, 4), hidden(1, 2))
    late = (LateHandler(device(1), delay_s=1.0), hidden(1, 4), hidden(1, 2))
    results, errors, took = run_together(half, {"good": good, "late": late})
    assert errors == {}
    reference = CloudHalf(tiny_backbone(), CONFIG)
    for name, (handler, prompt, steps) in (("good", good), ("late", late)):
        expected = decode(reference, device(0 if name == "good" else 1), prompt, steps)
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(results[name], expected)), name
    # Two decode steps of 4 layers; waiting for the late device would hold the good one 2 × 1 s.
    assert took["good"] < 0.5 + 2 * 4 * 0.25 + 2.0 < took["late"]


def test_a_failed_decode_step_leaves_the_cache_as_it_was():
    half = CloudHalf(tiny_backbone(), CONFIG)
    handler, prompt, steps = device(0), hidden(1, 5), hidden(1, 2)
    expected = decode(CloudHalf(tiny_backbone(), CONFIG), handler, prompt, steps)
    session = half.open_session()
    outs = [session.forward(ForwardRequest(prompt, CacheMode.START), handler).hidden]
    with pytest.raises(ValidationError):  # a reply of the wrong width at layer 2 of 4
        session.forward(ForwardRequest(steps[:, :1], CacheMode.EXTEND), device(0, fail_at_layer=2))
    assert {layer.keys.shape[-2] for layer in session.cache.layers} == {5}
    for t in range(steps.shape[1]):
        outs.append(session.forward(ForwardRequest(steps[:, t : t + 1], CacheMode.EXTEND), handler).hidden)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(outs, expected))


def test_a_failed_start_keeps_the_earlier_sequence():
    half = CloudHalf(tiny_backbone(), CONFIG)
    handler, prompt, steps = device(0), hidden(1, 5), hidden(1, 1)
    expected = decode(CloudHalf(tiny_backbone(), CONFIG), handler, prompt, steps)
    session = half.open_session()
    session.forward(ForwardRequest(prompt, CacheMode.START), handler)
    with pytest.raises(TransportError):  # a new sequence whose prefill fails at layer 1
        session.forward(ForwardRequest(hidden(1, 3), CacheMode.START), failing_prefill(handler, 1))
    out = session.forward(ForwardRequest(steps, CacheMode.EXTEND), handler).hidden
    assert torch.allclose(out, expected[1], atol=1e-5)


def failing_prefill(handler, layer: int):
    def call(request):
        if request.layer == layer and request.tensor.shape[1] > 1:
            raise TransportError("the device went away")
        return handler(request)

    return call


def _mask(rows: list[list[int]], dtype=torch.int64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


BAD_MASKS = {
    "NaN": torch.tensor([[float("nan"), 1.0, 1.0]]),
    "int32": _mask([[1, 1, 1]], torch.int32),
    "too short": _mask([[1, 1]]),
    "too long": _mask([[1, 1, 1, 1]]),
    "4-D": torch.ones(1, 1, 1, 3, dtype=torch.int64),
    "value 7": _mask([[1, 7, 1]]),
    "negative": _mask([[1, -1, 1]]),
    "all zeros": _mask([[0, 0, 0]]),
    "batch mismatch": _mask([[1, 1, 1], [1, 1, 1]]),
}


@pytest.mark.parametrize("name", BAD_MASKS)
def test_a_bad_attention_mask_is_refused(name):
    session = CloudHalf(tiny_backbone(), CONFIG).open_session()
    request = ForwardRequest(hidden(1, 3), CacheMode.NONE, attention_mask=BAD_MASKS[name])
    with pytest.raises(ValidationError, match="attention mask"):
        session.forward(request, device(0))


def test_a_mask_covers_the_cached_positions_too():
    session = CloudHalf(tiny_backbone(), CONFIG).open_session()
    session.forward(ForwardRequest(hidden(1, 4), CacheMode.START, attention_mask=_mask([[0, 1, 1, 1]])), device(0))
    with pytest.raises(ValidationError, match=r"expected \(1, 5\)"):
        session.forward(ForwardRequest(hidden(1, 1), CacheMode.EXTEND, attention_mask=_mask([[1]])), device(0))
    session.forward(ForwardRequest(hidden(1, 1), CacheMode.EXTEND, attention_mask=_mask([[0, 1, 1, 1, 1]])), device(0))
    assert session.cache.get_seq_length() == 5


@pytest.mark.parametrize("shape", [(0, 3, 32), (1, 0, 32), (0, 0, 32), (2, 3), (1, 3, 31)])
def test_empty_or_misshapen_hidden_states_are_refused(shape):
    session = CloudHalf(tiny_backbone(), CONFIG).open_session()
    with pytest.raises(ValidationError):
        session.forward(ForwardRequest(torch.zeros(shape)), device(0))


def test_tokens_per_step_are_bounded():
    session = CloudHalf(tiny_backbone(), CONFIG).open_session(max_step_tokens=64)
    session.forward(ForwardRequest(hidden(8, 8)), device(0))
    with pytest.raises(CapacityError, match="per step"):
        session.forward(ForwardRequest(hidden(5, 13)), device(0))


def test_memory_is_refused_before_it_is_taken_and_released_after():
    half = CloudHalf(tiny_backbone(), CONFIG)
    per_token = half.costs.kv_per_token
    budget = MemoryBudget(total_bytes=None, session_bytes=10 * per_token + 2 * hidden(1, 6).numel() * 4)
    session = half.open_session(account=budget.open())
    session.forward(ForwardRequest(hidden(1, 6), CacheMode.START), device(0))
    assert budget.used() == {"kv": 6 * per_token, "graph": 0, "pending": 0}
    with pytest.raises(CapacityError, match="budget"):
        session.forward(ForwardRequest(hidden(1, 5), CacheMode.EXTEND), device(0))
    assert session.cache.get_seq_length() == 6 and budget.used()["kv"] == 6 * per_token
    with pytest.raises(CapacityError):  # a batch of 2 rows holds twice the keys and values
        session.forward(ForwardRequest(hidden(2, 6), CacheMode.START), device(0))
    assert session.cache.get_seq_length() == 6  # the earlier sequence is kept
    session.close()
    assert budget.used() == {"kv": 0, "graph": 0, "pending": 0}


def test_the_total_budget_is_shared_and_a_training_graph_is_held_until_its_backward():
    half = CloudHalf(tiny_backbone(), CONFIG)
    graph = half.costs.graph(2, 4)
    budget = MemoryBudget(total_bytes=graph + 4096, session_bytes=None)
    first, second = half.open_session(account=budget.open()), half.open_session(account=budget.open())
    x = hidden(2, 4)
    out = first.forward(ForwardRequest(x, train=True), device(0)).hidden
    assert budget.used()["graph"] == graph
    with pytest.raises(CapacityError, match="service holds"):
        second.forward(ForwardRequest(hidden(2, 4), train=True), device(1))
    first.backward(BackwardRequest(torch.ones_like(out)), device(0))
    assert budget.used()["graph"] == 0
    second.forward(ForwardRequest(hidden(2, 4), train=True), device(1))
    second.close()
    first.close()
    assert sum(budget.used().values()) == 0


def test_a_session_opens_only_where_its_first_token_would_fit():
    smallest = CloudHalf(tiny_backbone(), CONFIG).costs.smallest_step()
    with pytest.raises(CapacityError, match="cannot hold even one token"):
        MemoryBudget(total_bytes=None, session_bytes=smallest - 1).open(smallest)
    budget = MemoryBudget(total_bytes=3 * smallest, session_bytes=None)
    holding = budget.open(smallest)
    holding.hold("kv", 2 * smallest + 1)
    with pytest.raises(CapacityError, match="no room for a new session"):
        budget.open(smallest)
    holding.close()
    budget.open(smallest)


def test_a_backward_without_its_forward_is_a_session_error():
    session = CloudHalf(tiny_backbone(), CONFIG).open_session()
    with pytest.raises(SessionError, match="preceding forward"):
        session.backward(BackwardRequest(torch.ones(1, 2, 32)), device(0))


def test_a_device_that_spent_its_failed_steps_is_refused_until_they_refill_and_others_never():
    now, held = [0.0], []

    async def sleep(seconds):
        held.append(seconds)

    budget = FailedSteps(per_minute=6, clock=lambda: now[0], sleep=sleep)

    def refused(device: str) -> bool:
        try:
            asyncio.run(budget.refuse_spent(device))
        except CapacityError as err:
            assert "refused unrun" in str(err)
            return True
        return False

    for _ in range(6):
        assert not refused("hostile")
        budget.failed("hostile")
    assert refused("hostile") and held == [10.0]  # held until a step's worth refills: 60 s / 6
    assert not refused("honest")
    now[0] = 9.0
    assert refused("hostile") and held[-1] == pytest.approx(1.0)
    now[0] = 10.0
    assert not refused("hostile")
    budget.failed("hostile")
    assert refused("hostile")
    now[0] = 80.0
    assert not refused("hostile")
    assert not budget._left  # a device back to its full allowance is forgotten
    budget.failed("hostile")
    budget.forget("hostile")  # as `plora device forget` has it
    assert not budget._left
    unlimited = FailedSteps(per_minute=0)
    for _ in range(100):
        unlimited.failed("hostile")
        assert asyncio.run(unlimited.refuse_spent("hostile")) is None
