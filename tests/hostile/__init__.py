"""Hostile devices against a live backbone service (issue 11): a seeded generator of attacks.

`judge` holds the rules a refusal must follow, `attacker` the raw-gRPC device that plays
attacks, `kinds` the kinds of hostile input and the seeded plan. `run` plays the plan against a service with several
enrolled hostile devices at once, until enough hostile frames were sent; `AttackProcess` does so
in a process of its own. Used by tests/integration/test_hostile.py, and by `make fuzz`.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time
from collections.abc import Callable

import psutil

from tests.hostile.attacker import CLOSE_WITHIN_S, SLACK_S, Attacker, Target, hidden, tensor
from tests.hostile.judge import STATUS_OF, Broken, Report
from tests.hostile.kinds import KINDS, Kind, plan

Devices = tuple[list[tuple[str, str]], list[tuple[str, str]]]  # an attacker's two devices' call metadata (see Attacker)

__all__ = [
    "CLOSE_WITHIN_S", "KINDS", "SLACK_S", "STATUS_OF", "AttackProcess", "Attacker", "Broken", "Kind", "Report", "Target", "hidden",
    "plan", "play_one", "run", "tensor",
]


async def _attack(
    target: Target, devices: list[Devices], seed: int, frames: int, keep_going: Callable[[], bool],
    alive: Callable[[], bool], deadline: float,
) -> Report:
    report = Report(seed, crowded=True)
    planned = enumerate(plan(seed))

    async def work(attacker: Attacker) -> None:
        try:
            while report.frames < frames or keep_going():
                if not alive():
                    report.find("service", -1, "the service process died")
                    return
                if time.monotonic() > deadline:
                    report.find("run", -1, f"stopped at its time limit after {report.frames} of {frames} hostile frames")
                    return
                index, kind = next(planned)
                await attacker.play(kind, index, seed)
        finally:
            await attacker.close()

    await asyncio.gather(*(work(Attacker(target, metadata, report, spare)) for metadata, spare in devices))
    return report


def run(
    target: Target,
    devices: list[Devices],
    seed: int,
    frames: int,
    keep_going: Callable[[], bool] = lambda: False,
    alive: Callable[[], bool] = lambda: True,
    time_limit_s: float = 600.0,
) -> Report:
    """Play attacks of `seed` with one attacker per pair of devices until `frames`
    hostile frames were sent and `keep_going()` is false."""
    return asyncio.run(_attack(target, devices, seed, frames, keep_going, alive, time.monotonic() + time_limit_s))


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _attack_on_command(target, devices, service_pid, commands, stop, results) -> None:
    for seed, frames, time_limit_s in iter(commands.get, None):
        results.put(run(target, devices, seed, frames, lambda: not stop.is_set(), lambda: _running(service_pid), time_limit_s))


class AttackProcess:
    """`run` in a process of its own, so that the attackers' CPU is not taken from honest devices
    in this one (real devices have machines of their own). Started once; attacks on command."""

    def __init__(self, target: Target, devices: list[Devices], service_pid: int):
        context = multiprocessing.get_context("spawn")
        self._commands, self._stop, self._results = context.Queue(), context.Event(), context.Queue()
        self._child = context.Process(
            target=_attack_on_command, args=(target, devices, service_pid, self._commands, self._stop, self._results),
            name="hostile-devices", daemon=True,
        )
        self._child.start()
        self.pid = self._child.pid

    def attack(self, seed: int, frames: int, until: Callable[[], bool], time_limit_s: float = 600.0) -> Report:
        """Play seed `seed` until `frames` hostile frames were sent and `until()` (polled here) is true."""
        self._stop.clear()
        self._commands.put((seed, frames, time_limit_s))
        while True:
            if until():
                self._stop.set()
            try:
                return self._results.get(timeout=0.1)
            except queue.Empty:
                if not self._child.is_alive():
                    raise RuntimeError(f"the attacking process ended with exit code {self._child.exitcode} and no report") from None

    def close(self) -> None:
        if self._child.is_alive():
            self._commands.put(None)
            self._child.join(30)
        if self._child.is_alive():
            self._child.kill()


def play_one(target: Target, devices: Devices, kind: Kind, seed: int, training_share: float = 0.3) -> Report:
    """One attack of `kind`, by one device, checking the session after a refused step: a case of
    a table of hostile inputs."""

    async def attack() -> Report:
        report = Report(seed)
        metadata, spare = devices
        attacker = Attacker(target, metadata, report, spare)
        attacker.training_share, attacker.check_share = training_share, 1.0
        try:
            await attacker.play(kind, 0, seed)
        finally:
            await attacker.close()
        return report

    return asyncio.run(attack())
