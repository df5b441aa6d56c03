"""Compute slots: how many of the service's threads run torch at once.

Every session's step runs in a thread of its own, and each thread that runs a torch op brings
its own OpenMP team of torch.get_num_threads() threads: 16 sessions computing at once made 32
compute threads on 2 cores. With slots, a step holds one while it computes and gives it back
while it waits for its device's reply, which over a real link is most of a step; so a slot is
never held by a thread that only waits.

By default the slots are unbounded: on 2 cores no bound paid. Sixteen devices each taking a
training step at once (`plora bench serve`, embedded backbone, two runs) got 0.82 and 1.01 of
the unbounded service's throughput with a slot per core, at 0.96 and 0.86 of its CPU, and 0.62
and 0.68 with one slot; sixteen 128-token prefills at once, before prefills were batched, took
the same time with a slot per core and 1.26× with one. A machine with many cores, where each
team is as wide as the machine, is where a bound may pay: `--compute-slots`.

The teams themselves are narrowed at start-up: a serving process runs torch with
STEP_TORCH_THREADS intra-op threads (`--torch-threads`), so that concurrent steps share the
cores instead of each team spinning on all of them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

STEP_TORCH_THREADS = 1
"""Intra-op threads of each computing thread in a serving process. With torch's default (one
per core) a thread's loop of small matmuls ran 2.9× slower here beside another thread that
only now and then computes, whose team holds the second core. `plora bench serve` (embedded
backbone, 2 cores, 8 devices; one run each, the service at 1 thread against the default)
moved every ratio but fleet decode: single gRPC decode ÷ monolithic 0.40 → 0.47, split
training ÷ LoRA 0.52 → 0.56, batched prefills ÷ the base model's 0.61 → 0.72, cloud CPU per
fleet token 126 → 106 ms, 8 concurrent training steps 55 → 68 tokens/s; fleet decode ÷
monolithic 0.16 → 0.15."""

def set_step_threads(threads: int) -> None:
    """Give each thread that computes in this process `threads` intra-op threads (0: torch's
    default). Process-wide: call it at a serving process's start, before any torch work."""
    if threads:
        torch.set_num_threads(threads)


class ComputeSlots:
    def __init__(self, slots: int = 0):
        """At most `slots` threads compute at once; 0: any number."""
        if slots < 0:
            raise ValueError(f"compute slots must be 0 (unbounded) or more, got {slots}")
        self._free = threading.Semaphore(slots) if slots else None
        self._held = threading.local()  # whether this thread holds a slot

    @contextmanager
    def computing(self) -> Iterator[None]:
        """Hold a slot for the block; a thread that holds one already keeps it."""
        if getattr(self._held, "slot", False):
            yield
            return
        self._acquire()
        try:
            yield
        finally:
            self._release()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Give this thread's slot back for the block (a wait for a device), and take one again after."""
        if not getattr(self._held, "slot", False):
            yield
            return
        self._release()
        try:
            yield
        finally:
            self._acquire()

    def _acquire(self) -> None:
        if self._free is not None:
            self._free.acquire()
        self._held.slot = True

    def _release(self) -> None:
        self._held.slot = False
        if self._free is not None:
            self._free.release()
