"""The bench's transport floor: the protocol's own messages, round-tripped through gRPC."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.protocol import wire
from plora.platform.bench.serve import _cpu_seconds_per_token, bare_round_trip

TRIPS = 10
CONNECT_S = 1.0  # added to the first round trip, which connects and must not be timed
TRIP_S = 0.005  # added to every round trip after it


@pytest.mark.timeout(120)  # next() on the stream blocks for good if a message goes unanswered
def test_bare_round_trip_answers_every_message_and_times_only_the_trips_after_connecting(monkeypatch):
    parse = wire.parse_cloud_frame
    answers: list[bytes] = []

    def slow_parse(frame: bytes, max_elements: int):
        answers.append(frame)
        time.sleep(CONNECT_S if len(answers) == 1 else TRIP_S)
        return parse(frame, max_elements)

    monkeypatch.setattr(wire, "parse_cloud_frame", slow_parse)
    per_trip = bare_round_trip(multiprocessing.get_context("spawn"), PrivateLoRAConfig(rank=4), count=TRIPS)
    assert len(answers) == TRIPS + 1  # the connecting trip and the timed ones, each answered
    assert per_trip >= TRIP_S  # each timed trip includes its own delay: the time is per trip
    # The connecting trip's delay alone exceeds all timed trips together, unless it was timed too.
    assert per_trip * TRIPS < CONNECT_S


def test_cpu_per_token_reads_every_clock_around_one_run():
    ticks = {"a": iter([1.0, 4.0]), "b": iter([0.0, 10.0])}
    per_token = _cpu_seconds_per_token(lambda: 2, {name: lambda name=name: next(ticks[name]) for name in ticks})
    assert per_token == {"a": 1.5, "b": 5.0}
