"""`plora bench wan` as the README runs it, on the tiny random checkpoint: the service, the device,
the relay and a small replay fleet in processes of their own, over loopback and a delayed link."""

from __future__ import annotations

import json

import pytest

from plora.platform.bench.workloads import WORKLOADS
from tests.integration.test_cli import plora

pytestmark = pytest.mark.xdist_group("processes")

# 5 ms, not the README's 20: the same schedule and assertions, in a quarter of the waiting.
RTT_S, MBIT = 0.005, 100.0


def test_the_wan_bench_measures_every_link_and_drafting_keeps_every_greedy_reply(tmp_path, tiny_checkpoint):
    out = tmp_path / "wan.json"
    plora("bench", "wan", "--backbone", tiny_checkpoint, "--rtt", str(RTT_S * 1e3), "--mbit", str(MBIT), "--fleet", "2",
          "--repeats", "1", "--delayed-prompts", "1", "--reply-tokens", "4", "--out", out)
    results = json.loads(out.read_text())

    loopback, delayed = results["links"]
    assert (loopback["emulated"], delayed["emulated"], delayed["rtt_ms"]) == (False, True, RTT_S * 1e3)
    # A training step is a forward and a backward, each a round trip per adapted layer, and its
    # bytes cross the capped link: the relay holds it at least that long. The same tensors cross
    # either link; over the delayed one the step's rows compute in groups, whose exchanges each
    # add a message's framing.
    assert loopback["train_step_bytes"] <= delayed["train_step_bytes"] < 1.01 * loopback["train_step_bytes"]
    at_least = 2 * delayed["round_trips_per_pass"] * RTT_S + delayed["train_step_bytes"] / 2 / (MBIT * 1e6 / 8)
    assert delayed["train_step_s"] >= at_least
    assert 0 < delayed["decode_tok_s"] < loopback["decode_tok_s"]

    drafted = {(row["link"], row["workload"]): row for row in results["drafting"]}
    for name, prompts in WORKLOADS.items():
        on_loopback = drafted[loopback["link"], name]
        assert on_loopback["prompts"] == on_loopback["same_replies"] == len(prompts())
        assert drafted[delayed["link"], name]["prompts"] == 1 and on_loopback["tokens_per_pass"] >= 1

    (fleet,) = results["fleets"]
    assert fleet["clients"] == 2 and fleet["fleet_tok_s"] > 0 and 0 < fleet["ceiling"] <= 1
