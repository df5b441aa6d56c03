"""`plora bench quality`'s speakers, on the tiny model and a made-up play: plora's default job
against PEFT LoRA under the same protocol."""

from __future__ import annotations

import functools
import json
import math
import random

import datasets
import pytest
import torch

from plora.clients.search import LrSearch, trial_key
from plora.clients.training import TrainSettings
from plora.platform import jobs
from plora.platform.bench import adapters, quality
from plora.platform.bench.federated import NEW_MIN_BLOCKS, fewest_blocks, held_out_fraction
from plora.platform.fleet.partition import holdout
from plora.storage.errors import DataError

WORDS = "the a king queen sword night crown rose blood moon gold my thy lord lady heart".split()
SIZES = {"ALICE": 40, "BOB": 22, "CAROL": 16, "DAN": 5}  # DAN has too few blocks to compare on


@pytest.fixture(autouse=True)
def two_epochs(monkeypatch):
    """Jobs here run their two epochs, not the default's floor of steps: what is tested is what
    the benches compare, and the floor's steps would only add time."""
    epochs = functools.partial(TrainSettings, min_steps=0)
    monkeypatch.setattr(jobs, "TrainSettings", epochs)
    monkeypatch.setattr(quality, "TrainSettings", epochs)


@pytest.fixture
def data(tmp_path):
    rng = random.Random(0)
    blocks = [f"{speaker}:\n" + " ".join(rng.choice(WORDS) for _ in range(12)) for speaker, n in SIZES.items() for _ in range(n)]
    rng.shuffle(blocks)
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("\n\n".join(blocks) + "\n")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "dev.jsonl").write_text("".join(json.dumps({"answer": f"{i} + {i} = {2 * i}"}) + "\n" for i in range(8)))
    return tmp_path


def test_speakers_are_picked_across_the_sizes_of_those_with_enough_lines():
    sizes = {f"S{n}": n for n in (3, 15, 20, 30, 45, 60, 90, 200)}
    assert quality.pick_speakers(sizes, 3) == ["S15", "S45", "S200"]
    assert quality.pick_speakers(sizes, 7) == ["S15", "S20", "S30", "S45", "S60", "S90", "S200"]
    assert quality.pick_speakers(sizes, 1) == ["S15"] and quality.pick_speakers(sizes, 0) == []
    with pytest.raises(DataError, match="7 speakers with at least 15 blocks; 8 were asked for"):
        quality.pick_speakers(sizes, 8)


def test_speakers_are_picked_by_name_if_the_play_has_enough_of_their_lines():
    sizes = {"DERBY": 15, "Servant": 32, "DAN": 5}
    assert quality.named_speakers(sizes, ["Servant", "DERBY", "Servant"]) == ["Servant", "DERBY"]
    with pytest.raises(DataError, match=r"at least 15 blocks in the play: DAN \(5 blocks\), NOBODY \(0 blocks\)"):
        quality.named_speakers(sizes, ["DERBY", "DAN", "NOBODY"])


def test_the_spread_gives_each_anchor_sample_s_means_and_worst_then_all_of_them():
    def persona(seed, recall, change):
        return {"anchor_seed": seed, "after": {"recall": recall}, "generic_nll_change": change}

    def speaker(seed, ratio, change):
        return {"anchor_seed": seed, "gain_ratio": ratio, "privatelora": {"generic_change": change}}

    personas = [persona(0, 1.0, 0.01), persona(0, 0.75, -0.02), persona(1, 0.875, 0.03), persona(1, 1.0, 0.0)]
    speakers = [speaker(0, 0.9, 0.019), speaker(0, 0.5, 0.05), speaker(1, 1.2, 0.021), speaker(1, 0.12, -0.01)]
    first, second, overall = quality.spread(personas, speakers)
    assert first == {"anchor_seed": 0, "personas": 2, "recall_mean": 0.875, "recall_lowest": 0.75,
                     "persona_generic_worst": 0.01, "speakers": 2, "gain_ratio_mean": pytest.approx(0.7),
                     "gain_ratio_lowest": 0.5, "speakers_within_limit": 1}
    assert second["recall_mean"] == 0.9375 and second["gain_ratio_lowest"] == 0.12 and second["speakers_within_limit"] == 1
    assert overall["anchor_seed"] == "all" and overall["recall_lowest"] == 0.75 and overall["persona_generic_worst"] == 0.03
    assert overall["gain_ratio_mean"] == pytest.approx(0.68) and overall["speakers_within_limit"] == 2
    # One sample, one row; no speakers, no speakers' figures.
    (only,) = quality.spread(personas[:2], [])
    assert only["speakers"] == 0 and only["gain_ratio_mean"] is None and only["speakers_within_limit"] is None


@pytest.mark.timeout(300)
def test_a_speaker_compares_the_default_job_with_lora_searched_alike(data, tiny_checkpoint, monkeypatch):
    # The tiny random model wants rates ten times LoRA's usual ones.
    monkeypatch.setattr(quality, "LORA_SEARCH", LrSearch(candidates=(3e-3, 1e-2, 3e-2)))
    row, other_anchor = quality.speakers(data, 1, echo=lambda line: None, backbone=str(tiny_checkpoint), anchor_seeds=(0, 1))
    assert row["speaker"] == other_anchor["speaker"] == "CAROL"  # the smallest with enough blocks
    # Another sample of anchor text is another plora job on a device of its own; LoRA has no anchor and runs once.
    assert (row["anchor_seed"], other_anchor["anchor_seed"]) == (0, 1) and other_anchor["lora"] is row["lora"]
    assert other_anchor["privatelora"] != row["privatelora"]
    total = SIZES["CAROL"]
    assert row["train_blocks"] + row["heldout_blocks"] == total and row["heldout_blocks"] == int(total * 0.2)
    plora, lora = row["privatelora"], row["lora"]
    # The default job, as `plora personalize` runs it: its rate searched, like LoRA's, on the same split.
    assert plora["selection"] == "searched" and plora["lr"] in (None, *LrSearch().candidates)
    assert plora["chosen_by"].keys() >= {trial_key(lr) for lr in LrSearch().candidates}  # what the search scored
    assert lora["lr"] in (None, 3e-3, 1e-2, 3e-2)
    for side in (plora, lora):
        assert side["gain"] == pytest.approx(side["before"] - side["after"])
        assert side["params"] > 0
    assert row["param_ratio"] == plora["params"] / lora["params"]
    # Beside the bench's generic text, the job's own measure of its drift, on the device's probe.
    assert math.isfinite(plora["device_drift"]) and "device_drift" not in lora
    if plora["steps"] == 0:
        assert plora["device_drift"] == pytest.approx(0.0, abs=1e-6)
    assert (plora["anchor_weight"] is None) == (plora["steps"] == 0)  # where the drift budget left the anchor
    for side in (plora, lora):  # a search that found no rate worth it keeps the start exactly
        assert side["lr"] is not None or (side["gain"] == 0 and side["steps"] == 0)
        assert 0 <= side["kept_step"] <= side["steps"]
    if lora["gain"] > 0:
        assert row["gain_ratio"] == pytest.approx(plora["gain"] / lora["gain"])
    else:
        assert math.isnan(row["gain_ratio"])


@pytest.mark.timeout(120)
def test_lora_s_baseline_draws_the_same_adapter_whatever_ran_before(data, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(quality, "LORA_SEARCH", LrSearch(candidates=(1e-2,)))
    rng = random.Random(1)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(12))} for _ in range(14)]
    notes = data / "notes.jsonl"
    notes.write_text("".join(json.dumps(row) + "\n" for row in rows[:10]))
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # whatever drew from torch's generator before
        runs.append(quality._lora_same_protocol(notes, datasets.Dataset.from_list(rows[10:]), rows[10:], str(tiny_checkpoint)))
    assert runs[0]["after"] == runs[1]["after"] and runs[0]["steps"] > 0


@pytest.mark.timeout(300)
def test_each_configuration_of_the_adapter_bench_binds_its_devices_to_it(data, tiny_checkpoint):
    rows = adapters.adapters(data, ["all", "last-half"], 0, 1, echo=lambda line: None, backbone=str(tiny_checkpoint),
                             max_blocks=20)
    assert [row["config"] for row in rows] == ["all", "last-half"]
    every, half = rows
    layers = 4  # the tiny model's
    assert every["round_trips"] == layers and half["round_trips"] == layers // 2  # q/k/v: one group a layer
    assert half["adapter_config"]["adapt_layers"] == [2, 3]
    # What the speaker's device trained, counted on the device: so it was bound to the configuration.
    for row in rows:
        (speaker,) = row["speakers"]
        assert speaker["speaker"] == "CAROL" and "lora" not in speaker  # 16 blocks: the only one between 15 and 20
        assert speaker["privatelora"]["params"] == row["params"]
        assert row["speaker_gain"] == speaker["privatelora"]["gain"] and row["recall"] is None
    assert half["params"] * 2 == every["params"]
    assert every["gain_vs_first"] == 1 or every["speaker_gain"] <= 0


@pytest.mark.parametrize("flag, compared", [(None, True), ("--no-unanchored", False)])
def test_the_bench_runs_the_personas_without_the_anchor_too_unless_told_not_to(tmp_path, monkeypatch, flag, compared):
    from click.testing import CliRunner

    from plora.platform.cli.main import main

    calls = []
    monkeypatch.setattr(quality, "personas", lambda data, count, echo, compare=True, **job: calls.append((compare, job)) or [])
    monkeypatch.setattr(quality, "speakers", lambda *args, **kwargs: [])
    args = ["bench", "quality", "--data", str(tmp_path), "--personas", "1", "--speakers", "0"] + ([flag] if flag else [])
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert calls == [(compared, {"anchor_seeds": [0], "drift_budget": 0.02})]  # the default job: one sample, the budget
    assert "Shakespeare speakers" not in result.output and "Persona facts" not in result.output  # no empty table
    assert "anchor text" not in result.output


def test_the_bench_runs_the_jobs_on_each_anchor_sample_it_is_given_and_at_a_fixed_weight_for_a_budget_of_0(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from plora.platform.cli.main import main

    calls = []
    monkeypatch.setattr(quality, "personas", lambda *args, **job: calls.append(job) or [])
    monkeypatch.setattr(quality, "speakers", lambda *args, **job: calls.append(job) or [])
    args = ["bench", "quality", "--data", str(tmp_path), "--anchor-seed", "2", "--anchor-seed", "1", "--anchor-seed", "2",
            "--drift-budget", "0", "--json"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert [(job["anchor_seeds"], job["drift_budget"]) for job in calls] == [([2, 1], None)] * 2
    assert json.loads(result.stdout)["settings"] == {"anchor_seeds": [2, 1], "drift_budget": None}


@pytest.mark.parametrize("size", [5, 10, 20, 40, 60, 61, 100])
def test_a_new_speaker_of_the_federated_bench_has_blocks_for_its_size_and_one_block_fewer_would_not(size):
    def pool(blocks: int) -> int:
        train, _ = holdout(datasets.Dataset.from_dict({"text": [str(i) for i in range(blocks)]}), held_out_fraction(blocks))
        return len(train)

    fewest = fewest_blocks(size)
    assert pool(fewest) >= size
    assert fewest == NEW_MIN_BLOCKS or pool(fewest - 1) < size
