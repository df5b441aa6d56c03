"""Steps hold a compute slot only while they compute: never more teams of torch's threads at
once than the slots, and a step waiting for its device never keeps another from computing."""

from __future__ import annotations

import threading

import pytest
import torch

from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.compute import CloudHalf
from plora.cloud_backbone.protocol.messages import BackwardRequest, CacheMode, ForwardRequest
from plora.cloud_backbone.slots import STEP_TORCH_THREADS, ComputeSlots, set_step_threads
from tests.conftest import tiny_backbone
from tests.unit.test_batching import HeldReplies, decode, device

CONFIG = PrivateLoRAConfig(rank=4)


class CountedSlots(ComputeSlots):
    """Compute slots that keep the most ever held at once, in `peak`."""

    def __init__(self, slots: int):
        super().__init__(slots)
        self._lock, self._busy, self.peak = threading.Lock(), 0, 0

    def _acquire(self) -> None:
        super()._acquire()
        with self._lock:
            self._busy += 1
            self.peak = max(self.peak, self._busy)

    def _release(self) -> None:
        with self._lock:
            self._busy -= 1
        super()._release()


def test_a_slot_is_given_back_while_waiting_and_held_once_per_thread():
    slots = CountedSlots(1)
    with slots.computing():
        with slots.computing():  # a thread holding a slot keeps it, and does not wait for another
            assert slots.peak == 1
        taken = threading.Event()

        def other():
            with slots.computing():
                taken.set()

        thread = threading.Thread(target=other)
        thread.start()
        assert not taken.wait(0.2)  # the only slot is held
        with slots.waiting():
            assert taken.wait(5)  # given back while this thread waits
        thread.join()
    assert slots.peak == 1
    with pytest.raises(ValueError):
        ComputeSlots(-1)


def test_a_step_waiting_for_its_device_lets_another_session_compute():
    half = CloudHalf(tiny_backbone(), CONFIG, CountedSlots(1))
    gen = torch.Generator().manual_seed(0)
    slow = HeldReplies(device(0))
    slow.hold.set()
    stuck = threading.Thread(target=lambda: half.open_session().forward(
        ForwardRequest(torch.randn(1, 4, 32, generator=gen), CacheMode.NONE, train=True), slow))
    stuck.start()
    assert slow.asked.wait(5)
    # The slow device's step is at its first round trip: the only slot must be free.
    other, other_device = half.open_session(), device(1)
    done = threading.Event()

    def train_step():
        out = other.forward(ForwardRequest(torch.randn(2, 3, 32, generator=gen), CacheMode.NONE, train=True), other_device).hidden
        other.backward(BackwardRequest(torch.ones_like(out), want_input_grad=True), other_device)
        done.set()

    threading.Thread(target=train_step, daemon=True).start()
    finished = done.wait(10)
    slow.release.set()
    stuck.join(10)
    assert finished, "a session waiting for its device kept the only compute slot"
    assert half.compute.peak == 1


def test_concurrent_sessions_never_compute_in_more_slots_than_there_are_and_get_what_they_get_alone():
    alone_half = CloudHalf(tiny_backbone(), CONFIG)
    half = CloudHalf(tiny_backbone(), CONFIG, CountedSlots(2))  # unbatched: every session computes in its own thread
    gen = torch.Generator().manual_seed(1)
    sessions = [(device(i), torch.randn(1, 4 + i, 32, generator=gen), torch.randn(1, 3, 32, generator=gen)) for i in range(8)]
    alone = [decode(alone_half, *s) for s in sessions]
    together: list = [None] * len(sessions)
    barrier = threading.Barrier(len(sessions))

    def run(i):
        together[i] = decode(half, *sessions[i], barrier)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert half.compute.peak == 2  # eight sessions, two slots, and they were used
    for mine, reference in zip(together, alone):
        for a, b in zip(mine, reference):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_a_serving_process_narrows_torch_teams_to_the_step_threads_its_cli_names():
    from plora.platform.cli.backbone import serve

    default = next(option.default for option in serve.params if option.name == "torch_threads")
    assert default == STEP_TORCH_THREADS == 1
    before = torch.get_num_threads()
    try:
        set_step_threads(0)  # torch's default: left as it is
        assert torch.get_num_threads() == before
        set_step_threads(STEP_TORCH_THREADS)
        assert torch.get_num_threads() == STEP_TORCH_THREADS
    finally:
        torch.set_num_threads(before)


def test_a_step_computing_alone_takes_every_core_given_and_steps_computing_at_once_the_step_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the step threads, as set_step_threads leaves a serving process
    try:
        slots = ComputeSlots(lone_threads=2)
        seen: dict[str, list[int]] = {"first": [], "second": []}
        first_in, second_in, second_may_leave = threading.Event(), threading.Event(), threading.Event()

        def first():
            with slots.computing():
                seen["first"].append(torch.get_num_threads())  # alone
                first_in.set()
                assert second_in.wait(5)
                with slots.waiting():  # a round trip: it computes again beside the second
                    pass
                seen["first"].append(torch.get_num_threads())
            second_may_leave.set()

        def second():
            assert first_in.wait(5)
            with slots.computing():
                seen["second"].append(torch.get_num_threads())
                second_in.set()
                assert second_may_leave.wait(5)

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert seen == {"first": [2, 1], "second": [1]}
        with slots.computing():  # alone again
            assert torch.get_num_threads() == 2
        with slots.computing(spread=False):  # a batched pass keeps the step threads even alone
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
