"""Personalization jobs: recorded in the registry, checkpointed, resumable."""

from __future__ import annotations

import json

import pytest
import torch

from plora.clients.anchor import AnchorSettings
from plora.clients.training import TrainSettings
from plora.platform.jobs import CHECKPOINT, run_personalization
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


def test_the_anchor_and_its_targets_are_made_once_per_device_and_used_by_every_job(tmp_path, tiny_checkpoint, data, monkeypatch):
    from plora.clients import anchor
    from plora.platform import jobs

    written, computed = [], []
    write, compute = jobs.write_anchor, anchor.teacher_targets
    monkeypatch.setattr(jobs, "write_anchor", lambda *args: written.append(1) or write(*args))
    monkeypatch.setattr(anchor, "teacher_targets", lambda *args: computed.append(1) or compute(*args))
    init_device(tmp_path / "dev", str(tiny_checkpoint))
    for seed in (0, 1):
        settings = TrainSettings(lr=0.05, steps=2, seed=seed, anchor=SMALL_ANCHOR)
        outcome = run_personalization(open_device(tmp_path / "dev"), data, settings, val_fraction=0.0)
        assert outcome.result.anchor_kl is not None
    assert len(written) == 1 and (tmp_path / "dev" / jobs.ANCHOR).is_file()
    # The base model's forward over the anchor text, most of a short job, runs on the first job only.
    assert len(computed) == 1 and (tmp_path / "dev" / jobs.ANCHOR_TARGETS).is_file()
    (job, _) = open_registry().list_jobs(open_device(tmp_path / "dev").store.record.device_id)
    assert "anchor_kl" in job.metrics_after
