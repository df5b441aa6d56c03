"""The bench's transport floor: the protocol's own messages, round-tripped through gRPC."""

from __future__ import annotations

import multiprocessing
import time

from plora.cloud_backbone.privatelora import PrivateLoRAConfig
from plora.platform.bench.serve import _cpu_seconds_per_token, bare_round_trip


def test_bare_round_trip_answers_every_message_and_times_each():
    started = time.perf_counter()
    per_trip = bare_round_trip(multiprocessing.get_context("spawn"), PrivateLoRAConfig(rank=4), count=50)
    # next() on the stream would block forever if a message went unanswered.
    assert 0 < per_trip < (time.perf_counter() - started) / 50


def test_cpu_per_token_reads_every_clock_around_one_run():
    ticks = {"a": iter([1.0, 4.0]), "b": iter([0.0, 10.0])}
    per_token = _cpu_seconds_per_token(lambda: 2, {name: lambda name=name: next(ticks[name]) for name in ticks})
    assert per_token == {"a": 1.5, "b": 5.0}
