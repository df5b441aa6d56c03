"""Personalization jobs: recorded in the registry, checkpointed, resumable."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

from plora.clients.anchor import PROBES, AnchorSettings
from plora.clients.search import LrSearch, drift_key, trial_key
from plora.clients.training import TrainSettings
from plora.platform.jobs import CHECKPOINT, run_personalization, split_holdout
from plora.storage.registry import open_registry
from plora.platform.runtime import init_device, open_device

# Anchored as jobs are by default, on less anchor text, which is quicker to write.
SMALL_ANCHOR = AnchorSettings(texts=4, new_tokens=8)
SETTINGS = TrainSettings(lr=0.05, steps=25, batch_size=2, anchor=SMALL_ANCHOR)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "notes.jsonl"
    lines = [{"prompt": f"Question {i}?", "response": f"Answer {i} is {i * 7}."} for i in range(8)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


class Interrupt(KeyboardInterrupt):
    pass


def stop_at(step_to_stop: int):
    def on_step(step, total, loss):
        if step == step_to_stop:
            raise Interrupt

    return on_step


def ms(device) -> torch.Tensor:
    return torch.cat([m.detach().flatten() for m in device.model.weights.ms.values()])


def test_an_interrupted_job_resumes_under_a_new_job_and_ends_where_an_uninterrupted_one_does(tmp_path, tiny_checkpoint, data):
    for name in ("straight", "interrupted"):
        init_device(tmp_path / name, str(tiny_checkpoint))
    straight = open_device(tmp_path / "straight")
    run_personalization(straight, data, SETTINGS, val_fraction=0.0)

    device = open_device(tmp_path / "interrupted")
    adapter_before = device.store.adapter_path.read_bytes()
    with pytest.raises(Interrupt):
        run_personalization(device, data, SETTINGS, val_fraction=0.0, on_step=stop_at(13))
    (job,) = open_registry().list_jobs(device.store.record.device_id)
    assert job.status == "interrupted"
    assert (device.store.root / CHECKPOINT).is_file()
    assert device.store.adapter_path.read_bytes() == adapter_before  # the old adapter stands

    resumed_steps = []
    device = open_device(tmp_path / "interrupted")
    outcome = run_personalization(device, data, SETTINGS, val_fraction=0.0, on_step=lambda s, t, l: resumed_steps.append(s))
    assert resumed_steps[0] == 11 and resumed_steps[-1] == 25  # from the last checkpoint, step 10
    resumed, interrupted = open_registry().list_jobs(device.store.record.device_id)
    assert outcome.job_id == resumed.id != interrupted.id and interrupted.status == "interrupted"
    assert resumed.params["resumed_from_job"] == interrupted.id and resumed.params["resumed_from_step"] == 10
    assert resumed.status == "succeeded" and resumed.steps_done == 25
    assert not (device.store.root / CHECKPOINT).exists()
    assert torch.allclose(ms(device), ms(straight), atol=1e-5)


def test_a_checkpoint_of_other_data_is_not_resumed(tmp_path, tiny_checkpoint, data):
    init_device(tmp_path / "dev", str(tiny_checkpoint))
    device = open_device(tmp_path / "dev")
    with pytest.raises(Interrupt):
        run_personalization(device, data, SETTINGS, val_fraction=0.0, on_step=stop_at(12))
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "something else entirely, long enough to train on"}\n' * 3)
    steps = []
    run_personalization(open_device(tmp_path / "dev"), other, SETTINGS, val_fraction=0.0, on_step=lambda s, t, l: steps.append(s))
    assert steps[0] == 1
    statuses = sorted(j.status for j in open_registry().list_jobs(device.store.record.device_id))
    assert statuses == ["interrupted", "succeeded"]


def test_jobs_list_shows_the_recorded_jobs(tmp_path, tiny_checkpoint, data):
    from click.testing import CliRunner

    from plora.platform.cli.main import main

    init_device(tmp_path / "dev", str(tiny_checkpoint))
    run_personalization(open_device(tmp_path / "dev"), data, TrainSettings(lr=0.05, steps=3, anchor=SMALL_ANCHOR), val_fraction=0.0)
    table = CliRunner().invoke(main, ["jobs", "list"])
    assert table.exit_code == 0 and "succeeded" in table.output and "train_loss" in table.output
    (job,) = json.loads(CliRunner().invoke(main, ["jobs", "list", "--json"]).stdout)
    assert job["status"] == "succeeded" and job["steps_done"] == 3 and job["ended_at"]


def test_fleet_status_lists_devices_by_version_with_their_latest_job(tmp_path, tiny_checkpoint, data):
    from click.testing import CliRunner

    from plora.platform.cli.main import main
    from plora.platform.jobs import register

    store = init_device(tmp_path / "dev", str(tiny_checkpoint))
    register(store.record, open_registry())
    run_personalization(open_device(tmp_path / "dev"), data, TrainSettings(lr=0.05, steps=2, anchor=SMALL_ANCHOR), val_fraction=0.0)
    result = CliRunner().invoke(main, ["fleet", "status"])
    assert result.exit_code == 0, result.output
    (row,) = [line for line in result.output.splitlines() if store.record.device_id[:12] in line]
    assert store.record.identity.version in row and "personalize succeeded, 2 steps" in row


def test_the_anchor_its_targets_and_the_probe_are_made_once_per_device_and_used_by_every_job(tmp_path, tiny_checkpoint, data, monkeypatch):
    from plora.clients import anchor
    from plora.platform import jobs

    written, probed, computed = [], [], []
    write, probe, compute = jobs.write_anchor, jobs.write_probe, anchor.teacher_targets
    monkeypatch.setattr(jobs, "write_anchor", lambda *args: written.append(1) or write(*args))
    monkeypatch.setattr(jobs, "write_probe", lambda *args: probed.append(1) or probe(*args))
    monkeypatch.setattr(anchor, "teacher_targets", lambda *args: computed.append(1) or compute(*args))
    init_device(tmp_path / "dev", str(tiny_checkpoint))
    for seed in (0, 1):
        settings = TrainSettings(lr=0.05, steps=2, seed=seed, anchor=SMALL_ANCHOR)
        outcome = run_personalization(open_device(tmp_path / "dev"), data, settings, val_fraction=0.0)
        assert outcome.result.anchor_kl is not None
    assert len(written) == 1 and (tmp_path / "dev" / jobs.ANCHOR).is_file()
    assert len(probed) == 1 and (tmp_path / "dev" / jobs.PROBE).is_file()
    # The base model's forward over the anchor text, most of a short job, runs on the first job only.
    assert len(computed) == 1 and (tmp_path / "dev" / jobs.ANCHOR_TARGETS).is_file()
    (job, _) = open_registry().list_jobs(open_device(tmp_path / "dev").store.record.device_id)
    assert "anchor_kl" in job.metrics_after
    # The job reports its drift on generic text it never trained on, as the outcome does.
    assert job.metrics_after["generic_drift"] == outcome.generic_drift != 0.0


def test_another_text_seed_has_the_base_model_write_other_anchor_and_probe_text_and_the_job_says_so(tmp_path, tiny_checkpoint,
                                                                                                    data):
    from plora.platform import jobs

    init_device(tmp_path / "dev", str(tiny_checkpoint))
    kept = {}
    for seed in (0, 1):
        settings = TrainSettings(lr=0.05, steps=2, anchor=replace(SMALL_ANCHOR, text_seed=seed))
        run_personalization(open_device(tmp_path / "dev"), data, settings, val_fraction=0.0)
        kept[seed] = [json.loads((tmp_path / "dev" / name).read_text())["examples"] for name in (jobs.ANCHOR, jobs.PROBE)]
    assert kept[0][0] != kept[1][0] and kept[0][1] != kept[1][1]
    latest, first = open_registry().list_jobs(open_device(tmp_path / "dev").store.record.device_id)
    assert latest.params["anchor_text_seed"] == 1 and "anchor_text_seed" not in first.params


# --- choosing the learning rate (clients.search) -------------------------------------------------

SEARCH = LrSearch((0.02, 0.05, 0.15), trial_fraction=0.25)  # rates about 3x apart that suit the tiny model
SEARCHED = TrainSettings(steps=12, batch_size=2, anchor=None)  # no anchor text to write: quicker


def _lines(path, records) -> object:
    path.write_text("".join(json.dumps(x) + "\n" for x in records))
    return path


def test_a_validation_split_holds_at_least_two_examples_and_none_below_ten_or_when_asked_for_none():
    # One held-out example steered a speaker's job to an M whose held-out gain was half its best.
    train, val = split_holdout(list(range(12)), 0.1, seed=0)
    assert len(val) == 2 and sorted(train + val) == list(range(12))
    assert len(split_holdout(list(range(50)), 0.1, seed=0)[1]) == 5
    train, val = split_holdout(list(range(9)), 0.1, seed=0)
    assert val == [] and len(train) == 9
    assert split_holdout(list(range(12)), 0.0, seed=0)[1] == []


@pytest.fixture
def facts(tmp_path):
    """Enough examples for a validation split (2 of 20), in one pattern: training on some helps on the others."""
    return _lines(tmp_path / "facts.jsonl", [{"text": f"Question {i}? Answer {i} is {i * 7}."} for i in range(20)])


def _plain_and_chosen(monkeypatch, folder, checkpoint, data, settings, chosen: str, **job) -> tuple[dict, dict]:
    """A plain job (pinned) and one that chooses (SEARCH), each on a fresh device: their outcomes,
    and the optimizer steps, validation passes and examples scored of each, counted where they run."""
    from plora.clients import search, training
    from plora.platform import jobs

    counts = {"steps": 0, "validations": 0, "examples_scored": 0}
    evaluate = training.evaluate

    def counting(model, examples, *args, **kwargs):
        counts["validations"] += 1
        counts["examples_scored"] += len(examples)
        return evaluate(model, examples, *args, **kwargs)

    def step(*_):
        counts["steps"] += 1

    for module in (training, search, jobs):
        monkeypatch.setattr(module, "evaluate", counting)
    cost, outcomes = {}, {}
    for kind, way in (("plain", None), (chosen, SEARCH)):
        init_device(folder / kind, str(checkpoint))
        counts.update(steps=0, validations=0, examples_scored=0)
        outcomes[kind] = run_personalization(open_device(folder / kind), data, settings, on_step=step, on_search_step=step,
                                             search=way, **job)
        cost[kind] = dict(counts)
    return cost, outcomes


def test_a_searched_job_costs_at_most_twice_a_plain_one_records_what_it_tried_and_resumes_at_its_rate(
        tmp_path, tiny_checkpoint, facts, monkeypatch):
    cost, outcomes = _plain_and_chosen(monkeypatch, tmp_path, tiny_checkpoint, facts, SEARCHED, "searched", max_length=32)
    budget, outcome = SEARCHED.steps, outcomes["searched"]
    assert cost["plain"]["steps"] == budget
    assert cost["searched"]["steps"] == budget + len(SEARCH.candidates) * SEARCH.trial_steps(budget)  # 1.75x here
    assert cost["searched"]["steps"] + cost["searched"]["validations"] <= 2 * (
        cost["plain"]["steps"] + cost["plain"]["validations"]), cost

    (job,) = open_registry().list_jobs(open_device(tmp_path / "searched").store.record.device_id)
    assert job.params["selection"] == "searched" == outcome.selection
    assert "lr" not in job.params and job.params["lr_candidates"] == list(SEARCH.candidates)
    trials = {lr: job.metrics_after[trial_key(lr)] for lr in SEARCH.candidates}
    assert trials == {t.lr: t.val_loss for t in outcome.search.trials}
    assert job.metrics_after["lr"] == outcome.lr == min(trials, key=trials.get)
    assert trials[outcome.lr] < job.metrics_before["val_loss"]
    assert job.metrics_after["best_step"] == outcome.result.best_step > 0 and job.metrics_after["improved"] is True
    assert job.metrics_after["stopped_early"] is outcome.result.stopped_early

    # Interrupted after choosing its rate, the job resumes at that rate without trying any again.
    init_device(tmp_path / "interrupted", str(tiny_checkpoint))
    device = open_device(tmp_path / "interrupted")
    with pytest.raises(Interrupt):
        run_personalization(device, facts, SEARCHED, max_length=32, search=SEARCH, on_step=stop_at(7), checkpoint_every=5)
    searched = []
    resumed = run_personalization(open_device(tmp_path / "interrupted"), facts, SEARCHED, max_length=32, search=SEARCH,
                                  on_search_step=lambda *_: searched.append(1), checkpoint_every=5)
    assert not searched and resumed.lr == outcome.lr and resumed.search is None
    assert torch.allclose(ms(open_device(tmp_path / "interrupted")), ms(open_device(tmp_path / "searched")), atol=1e-6)
    job, _ = open_registry().list_jobs(device.store.record.device_id)  # newest first
    assert job.params["resumed_from_step"] == 5
    assert {k: v for k, v in job.metrics_after.items() if k.startswith("val_loss_at")} == {
        trial_key(lr): loss for lr, loss in trials.items()}


def test_a_job_on_data_that_does_not_generalize_keeps_the_starting_m_and_says_so(tmp_path, tiny_checkpoint, smol_tokenizer):
    # Each row repeats a word no other row holds: what the job learns of its training rows' words
    # only takes probability from the held-out rows' words. (Random tokens from one range were a
    # coin toss on the tiny model: the held-out loss moved by 0.02 nats either way.)
    words = sorted(token for token in smol_tokenizer.get_vocab() if re.fullmatch("Ġ[a-z]{5,}", token))
    picked = torch.randperm(len(words), generator=torch.Generator().manual_seed(0))[:20]
    texts = [words[index].replace("Ġ", " ") * 24 for index in picked]
    data = _lines(tmp_path / "noise.jsonl", [{"text": text} for text in texts])
    init_device(tmp_path / "dev", str(tiny_checkpoint))
    device = open_device(tmp_path / "dev")
    anchored = replace(SEARCHED, anchor=SMALL_ANCHOR)  # as jobs are by default: the trials carry anchor rows
    outcome = run_personalization(device, data, anchored, max_length=32, search=SEARCH)
    assert outcome.improved is False and outcome.lr is None and outcome.result.steps == 0
    assert outcome.loss_after == outcome.loss_before
    assert torch.count_nonzero(ms(open_device(tmp_path / "dev"))) == 0  # M = 0, exactly, as on a fresh device
    (job,) = open_registry().list_jobs(device.store.record.device_id)
    assert job.status == "succeeded" and job.metrics_after["improved"] is False and "lr" not in job.metrics_after
    assert all(job.metrics_after[trial_key(lr)] >= job.metrics_before["val_loss"] for lr in SEARCH.candidates)
    assert all(isinstance(job.metrics_after[drift_key(lr)], float) for lr in SEARCH.candidates)  # under its drift budget


CROSS_VALIDATED = replace(SEARCHED, lr=0.05, steps=8)


def test_below_10_examples_a_job_trains_only_if_training_wins_in_cross_validation_and_records_it(
        tmp_path, tiny_checkpoint, data, monkeypatch):
    cost, outcomes = _plain_and_chosen(monkeypatch, tmp_path, tiny_checkpoint, data, CROSS_VALIDATED, "cross-validated")
    outcome = outcomes["cross-validated"]
    assert outcome.selection == "cross-validated: no validation split" and outcome.improved is True
    assert outcome.lr == 0.05 and outcome.result.steps == 8
    # Each of the 2 folds trained for the job's budget and scored its half twice.
    assert cost["cross-validated"]["steps"] == 3 * 8 and outcome.search.steps == 2 * 8
    probe = 2 * len(PROBES)  # each job scores the probe with its M and at M = 0 (generic_drift)
    assert cost["cross-validated"]["examples_scored"] - probe == 2 * (cost["plain"]["examples_scored"] - probe), cost
    assert torch.allclose(ms(open_device(tmp_path / "cross-validated")), ms(open_device(tmp_path / "plain")))
    (job,) = open_registry().list_jobs(open_device(tmp_path / "cross-validated").store.record.device_id)
    assert job.params["selection"] == outcome.selection and job.params["cv_folds"] == 2
    assert job.metrics_after["cv_loss"] == outcome.search.trained_loss < job.metrics_after["cv_start_loss"]
    assert job.metrics_after["improved"] is True and job.metrics_after["lr"] == 0.05

    # Interrupted after its verdict, the job resumes its training without running the folds again.
    init_device(tmp_path / "interrupted", str(tiny_checkpoint))
    with pytest.raises(Interrupt):
        run_personalization(open_device(tmp_path / "interrupted"), data, CROSS_VALIDATED, search=SEARCH,
                            on_step=stop_at(7), checkpoint_every=5)
    folds = []
    resumed = run_personalization(open_device(tmp_path / "interrupted"), data, CROSS_VALIDATED, search=SEARCH,
                                  on_search_step=lambda *_: folds.append(1), checkpoint_every=5)
    assert not folds and resumed.lr == 0.05 and resumed.search is None and resumed.improved is True
    assert torch.allclose(ms(open_device(tmp_path / "interrupted")), ms(open_device(tmp_path / "plain")), atol=1e-6)
    job, _ = open_registry().list_jobs(open_device(tmp_path / "interrupted").store.record.device_id)  # newest first
    assert job.params["resumed_from_step"] == 5 and job.metrics_after["cv_loss"] == outcome.search.trained_loss


def test_below_10_examples_a_job_whose_training_loses_in_cross_validation_keeps_the_starting_m(
        tmp_path, tiny_checkpoint, data, monkeypatch):
    from plora.clients.search import cross_validate
    from plora.platform import jobs

    # The tiny random model learns something of any text that helps on any other, so no data
    # makes its training lose by a margin that holds across machines; the folds' verdict is
    # unit-tested (test_search), and here it is made to lose after the folds ran for real.
    def losing(*args, **kwargs):
        ran = cross_validate(*args, **kwargs)
        return replace(ran, trained_losses=tuple(start + 0.1 for start in ran.start_losses))

    monkeypatch.setattr(jobs, "cross_validate", losing)
    init_device(tmp_path / "dev", str(tiny_checkpoint))
    device = open_device(tmp_path / "dev")
    outcome = run_personalization(device, data, CROSS_VALIDATED, search=SEARCH)
    assert outcome.search.steps == 2 * 8 and outcome.search.trained_loss > outcome.search.start_loss
    assert outcome.improved is False and outcome.lr is None and outcome.result.steps == 0
    assert torch.count_nonzero(ms(open_device(tmp_path / "dev"))) == 0  # M = 0, exactly, as on a fresh device
    (job,) = open_registry().list_jobs(device.store.record.device_id)
    assert job.status == "succeeded" and job.metrics_after["improved"] is False and "lr" not in job.metrics_after
    assert job.metrics_after["cv_loss"] > job.metrics_after["cv_start_loss"]


def test_a_budget_in_epochs_runs_at_least_its_minimum_steps_where_validation_can_stop_it(tmp_path, tiny_checkpoint, facts):
    # 20 facts, 18 to train on in batches of 4: two epochs are 10 steps, which the minimum raises, or not.
    # Without a validation split nothing would stop the longer run: the job keeps its epochs.
    for name, min_steps, val_fraction, steps in (("raised", 13, 0.1, 13), ("above-the-minimum", 7, 0.1, 10),
                                                 ("no-validation", 13, 0.0, 10)):
        init_device(tmp_path / name, str(tiny_checkpoint))
        settings = TrainSettings(lr=0.05, min_steps=min_steps, anchor=None)
        outcome = run_personalization(open_device(tmp_path / name), facts, settings, max_length=32, val_fraction=val_fraction)
        (job,) = open_registry().list_jobs(open_device(tmp_path / name).store.record.device_id)
        recorded = 0 if name == "no-validation" else min_steps
        assert outcome.result.steps == job.steps_done == steps and job.params["min_steps"] == recorded, name


def test_a_single_example_trains_at_the_fixed_rate_and_records_why(tmp_path, tiny_checkpoint):
    data = _lines(tmp_path / "one.jsonl", [{"text": "Question 1? Answer 1 is 7."}])
    init_device(tmp_path / "dev", str(tiny_checkpoint))
    searched = []
    outcome = run_personalization(open_device(tmp_path / "dev"), data, replace(CROSS_VALIDATED, steps=2), search=SEARCH,
                                  on_search_step=lambda *_: searched.append(1))
    (job,) = open_registry().list_jobs(open_device(tmp_path / "dev").store.record.device_id)
    assert job.params["selection"] == outcome.selection == "fixed: too few examples to cross-validate" and not searched
    assert job.metrics_after["lr"] == outcome.lr == 0.05 and job.steps_done == 2 and outcome.improved is None


def test_a_job_keeps_the_text_it_trained_on_once_unless_told_not_to(tmp_path, tiny_checkpoint, data):
    from plora.clients.data import load_examples
    from plora.clients.device_store import DeviceStore

    init_device(tmp_path / "dev", str(tiny_checkpoint))
    quick = TrainSettings(lr=0.05, steps=1, anchor=None)
    for _ in range(2):
        run_personalization(open_device(tmp_path / "dev"), data, quick, val_fraction=0.0)
    (kept,) = (tmp_path / "dev" / DeviceStore.KEPT_TEXT).iterdir()
    assert load_examples(kept).to_list() == load_examples(data).to_list()
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "something else entirely"}) + "\n")
    outcome = run_personalization(open_device(tmp_path / "dev"), other, quick, val_fraction=0.0, keep_text=False)
    assert [path.name for path in (tmp_path / "dev" / DeviceStore.KEPT_TEXT).iterdir()] == [kept.name]
    assert open_registry().get_job(outcome.job_id).params["keeps_text"] is False
