"""Decode steps of several sessions batched into one pass equal each session run alone."""

from __future__ import annotations

import threading

import pytest
import torch

from plora.cloud_backbone.compute import CloudHalf
from plora.cloud_backbone.privatelora import AdapterWeights, PrivateLoRAConfig
from plora.cloud_backbone.protocol.messages import AdapterReply, CacheMode, ForwardRequest
from plora.storage.errors import SessionError, ValidationError
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
