"""The noisy neighbour of `plora bench serve`: an honest device decoding while a hostile one
sends malformed frames into the same batches.

The attacker is an enrolled device in a process of its own, with as many sessions as a device
may hold. Each decodes one token at a time, so that its steps join the honest device's
batches, and answers each adapter request with a broken reply (bytes protobuf cannot parse, a
reply of the wrong width, NaN). Together they send a fixed rate of frames per second (at most:
each session waits for each answer, so a slow service caps the rate, which is reported with
how the attacker's steps ended: failed at the service's checks, or refused unrun once its
allowance of failed steps was spent). Its steps fail; the honest device's must not slow down.
The baseline is the honest device decoding while an idle process burns the CPU time the
attacker used, so that the ratio measures what the attack costs through the service, not the
cores the attacker took. Neither is measured before its process is at work.
"""

from __future__ import annotations

import itertools
import multiprocessing
import queue
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import torch

from plora.clients.device_store import DeviceStore
from plora.clients.grpc_link import Credentials, Endpoint
from plora.cloud_backbone.protocol import wire
from plora.cloud_backbone.protocol.messages import (
    AdapterRequest,
    CacheMode,
    ForwardRequest,
    OpenSession,
    StepError,
)


READY_TIMEOUT_S = 120  # for a neighbour process to be at work (spawned, it first imports torch and plora)


def _broken_replies(request: AdapterRequest, step: int) -> list[bytes]:
    """Three ways to answer `request` wrongly, each one frame."""
    wrong_width = request.answer(torch.zeros(*request.tensor.shape[:-1], 3))
    nan = request.answer(torch.full_like(request.tensor, float("nan")))
    return [b"\xff\xff\xff\xff", *(wire.device_frame(step, m) for m in (wrong_width, nan))]


class _Pacer:
    """Frames at a fixed rate, shared by the attacker's sessions; `ready` is set as the first goes."""

    def __init__(self, per_s: float, ready):
        self.interval, self.ready, self.frames = 1.0 / per_s, ready, 0
        self.first = self.due = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            if not self.frames:
                self.first = self.due = time.monotonic()
                self.ready.set()
            self.due = max(self.due + self.interval, time.monotonic())
            due = self.due
            self.frames += 1
        time.sleep(max(0.0, due - time.monotonic()))

    def rate(self) -> float:
        """Frames per second since the first."""
        return self.frames / (time.monotonic() - self.first) if self.frames else 0.0


def _attack_session(store: DeviceStore, credentials: Credentials, address: str, pacer: _Pacer, stop) -> Counter:
    """One session of the attacker: an honest prefill, so that its decode steps batch with the
    honest device's, then decode steps each answered with a broken reply, until stopped."""
    identity = store.record.identity
    outbox: queue.Queue = queue.Queue()
    ended: Counter = Counter()  # how its steps ended, by the kind of error

    def send(step: int, message) -> None:
        outbox.put(message if isinstance(message, bytes) else wire.device_frame(step, message))

    with Endpoint(address, insecure=True).channel() as channel:
        session = channel.stream_stream(wire.SESSION_METHOD)  # frames as bytes, both ways
        answers = session(iter(outbox.get, None), metadata=credentials.metadata())

        def receive():
            return wire.parse_cloud_frame(next(answers), 1 << 24)[1]

        send(0, OpenSession(identity))
        receive()
        hidden = torch.randn(1, 4, identity.hidden_size)
        send(1, ForwardRequest(hidden, CacheMode.START))
        while isinstance(message := receive(), AdapterRequest):
            send(1, message.answer(torch.zeros(*message.tensor.shape[:-1], identity.adapter.width(message.group, a_side=False))))
        for step in itertools.count(2):
            if stop.is_set():
                break
            pacer.wait()
            send(step, ForwardRequest(hidden[:, :1], CacheMode.EXTEND))
            message = receive()
            if isinstance(message, AdapterRequest):
                pacer.wait()
                send(step, _broken_replies(message, step)[step % 3])
                message = receive()
            if not isinstance(message, StepError) or message.fatal:
                raise RuntimeError(f"the attacker expected its step to fail alone, got {message}")
            ended[message.kind] += 1
        outbox.put(None)
        answers.cancel()
    return ended


def _attack(folder: Path, address: str, frames_per_s: float, sessions: int, ready, stop, report) -> None:
    """`sessions` sessions of one device sending `frames_per_s` frames in all: each session
    waits for each answer, so several keep the rate while some of their steps wait in a pass."""
    store = DeviceStore.open(folder)
    credentials = Credentials.load(folder / DeviceStore.CREDENTIALS)
    pacer, ended, failures = _Pacer(frames_per_s, ready), [], []

    def run() -> None:
        try:
            ended.append(_attack_session(store, credentials, address, pacer, stop))
        except BaseException as err:  # noqa: BLE001 - reported below, in the process's own traceback
            failures.append(err)
            stop.set()

    threads = [threading.Thread(target=run) for _ in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    report.put({"frames_per_s": pacer.rate(), "steps": dict(sum(ended, Counter()))})


def _burn(share: float, ready, stop, report) -> None:
    """Keep `share` of one core busy, in 10 ms periods, until stopped."""
    ready.set()
    while not stop.is_set():
        busy_until = time.perf_counter() + 0.01 * share
        while time.perf_counter() < busy_until:
            pass
        time.sleep(0.01 * (1 - share))
    report.put(None)


class Neighbour:
    """A process next to the honest device: the attacker, or a burner of its CPU share."""

    def __init__(self, context, target, *args):
        self.ready, self.stop, self.report = context.Event(), context.Event(), context.Queue()
        self.process = context.Process(target=target, args=(*args, self.ready, self.stop, self.report), daemon=True)
        self.process.start()
        if not self.ready.wait(READY_TIMEOUT_S):
            self.process.kill()
            raise RuntimeError(f"a noisy-neighbour process did not start within {READY_TIMEOUT_S} s; its traceback is above")

    def close(self):
        """What the process reported when it stopped."""
        self.stop.set()
        try:
            return self.report.get(timeout=60)
        except queue.Empty:
            raise RuntimeError("a noisy-neighbour process failed; its traceback is above") from None
        finally:
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()


def measure(context: multiprocessing.context.BaseContext, decode, attacker: Path, address: str, frames_per_s: float, sessions: int,
            repeats: int) -> dict:
    """The honest device's decode rate under attack over its rate beside a process burning the
    attacker's CPU share, alternated `repeats` times."""
    attacked, baseline, rates, shares, steps = [], [], [], [], Counter()
    for _ in range(repeats):
        attack = Neighbour(context, _attack, attacker, address, frames_per_s, sessions)
        time.sleep(1.0)  # every session is open and sending
        cpu, wall = _cpu(attack.process.pid), time.perf_counter()
        attacked.append(_timed(decode))
        shares.append((_cpu(attack.process.pid) - cpu) / (time.perf_counter() - wall))
        reported = attack.close()
        rates.append(reported["frames_per_s"])
        steps.update(reported["steps"])
        burner = Neighbour(context, _burn, min(1.0, shares[-1]))
        baseline.append(_timed(decode))
        burner.close()
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {
        "ratio": median(attacked) / median(baseline),
        "attacked_tok_s": median(attacked),
        "baseline_tok_s": median(baseline),
        "attack_frames_per_s": median(rates),
        "attacker_cpu_share": median(shares),
        "attacker_steps_failed_at_checks": steps["ValidationError"],
        "attacker_steps_refused_unrun": steps["CapacityError"],
    }


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _timed(run) -> float:
    started = time.perf_counter()
    tokens = run()
    return tokens / (time.perf_counter() - started)
