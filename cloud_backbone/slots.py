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
cores instead of each team spinning on all of them. A session's own step computing while no
other thread computes, though, takes every core (MACHINE_THREADS): narrowed, it left the other
cores idle. A batched pass and a pipelined prefill's chunks keep the step threads even then
(`computing(spread=False)`).
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

MACHINE_THREADS = torch.get_num_threads()
"""torch's default intra-op threads, one per core: what a session's step computing alone takes.
One device through a service on the same 2 cores (embedded backbone, two alternated rounds, alone;
README, **A step alone on every core**): a training step of the default job 3.5 to 3.8 s → 2.4 to
2.5 s on loopback, 6.6 to 6.8 s → 5.4 to 5.6 s over 20 ms (emulated); loopback decode 10.7 to
11.0 → 11.5 to 13.6 tokens/s. A pipelined prefill's chunks, which compute in threads of their
own by turns, lost time spread (first token over 20 ms 1.09 to 1.15 s → 1.12 to 1.20 s) and keep
the step threads (1.08 to 1.13 s)."""


def set_step_threads(threads: int) -> None:
    """Give each thread that computes in this process `threads` intra-op threads (0: torch's
    default). Process-wide: call it at a serving process's start, before any torch work."""
    if threads:
        torch.set_num_threads(threads)


class ComputeSlots:
    def __init__(self, slots: int = 0, lone_threads: int = MACHINE_THREADS):
        """At most `slots` threads compute at once; 0: any number. A session's own step computing
        while no other thread does takes `lone_threads` intra-op threads, and otherwise those the
        process was given (`set_step_threads`); it takes them anew each time it takes a slot, so a
        step that waited for its device computes as the load is then."""
        if slots < 0:
            raise ValueError(f"compute slots must be 0 (unbounded) or more, got {slots}")
        self._free = threading.Semaphore(slots) if slots else None
        self._held = threading.local()  # per thread: whether it holds a slot (`slot`), and may spread (`spread`)
        self._threads, self._lone_threads = torch.get_num_threads(), lone_threads
        self._count, self._computing = threading.Lock(), 0  # threads holding a slot

    @contextmanager
    def computing(self, spread: bool = True) -> Iterator[None]:
        """Hold a slot for the block; a thread that holds one already keeps it. With `spread`, it
        takes `lone_threads` while no other thread computes. A batched pass does not spread: the
        exchanges of its many sessions keep the service's event loop busy on another core."""
        if getattr(self._held, "slot", False):
            yield
            return
        self._held.spread = spread
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
        with self._count:
            self._computing += 1
            alone = self._computing == 1 and self._held.spread
        threads = self._lone_threads if alone else self._threads
        if torch.get_num_threads() != threads:  # this thread's own setting, which OpenMP keeps per thread
            torch.set_num_threads(threads)

    def _release(self) -> None:
        self._held.slot = False
        with self._count:
            self._computing -= 1
        if self._free is not None:
            self._free.release()
