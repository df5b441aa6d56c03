"""A device folder written by an older plora still works: its record opens, its adapter loads
and verifies, and the job it was killed in resumes from its checkpoint.

The folder is tests/fixtures/device-8473d77, made by that commit's code (see its README);
each test works on a copy, with conftest's tiny backbone where the folder expects it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from plora.clients.device_store import DeviceRecord, DeviceStore
from plora.platform.cli.main import main
from plora.platform.runtime import open_device
from plora.storage.registry import open_registry

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "device-8473d77"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture
def old_folder(tmp_path, tiny_checkpoint, monkeypatch) -> Path:
    """A copy of the fixture, run from where it was made: its device names the backbone
    folder `tiny-backbone`, relative, which holds conftest's tiny checkpoint here."""
    root = shutil.copytree(FIXTURE, tmp_path / "old")
    backbone = root / json.loads((FIXTURE / "dev" / "device.json").read_text())["backbone_spec"]
    backbone.mkdir()
    for file in tiny_checkpoint.iterdir():
        (backbone / file.name).symlink_to(file)
    monkeypatch.chdir(root)
    return root


def test_its_records_read_and_write_back_in_the_same_form():
    for path in (FIXTURE / "dev" / "device.json", FIXTURE / "networked-device.json"):
        written = json.loads(path.read_text())
        record = DeviceRecord.from_json(written, path)
        assert record.to_json() == written, path.name
        assert record.identity.version == EXPECTED["version"], path.name
    assert DeviceRecord.from_json(written, path).endpoint == {"insecure": False, "ca_file": "/etc/plora/ca.pem"}


def test_its_device_opens_with_the_adapter_it_was_trained_to(old_folder):
    with safe_open(old_folder / "dev" / DeviceStore.ADAPTER, "pt") as f:
        stored = {name: f.get_tensor(name) for name in f.keys()}
    device = open_device(old_folder / "dev")  # checks the backbone's hash and the adapter's checksum and binding
    try:
        assert device.steps == EXPECTED["adapter_steps"]
        assert device.store.record.identity.version == EXPECTED["version"]
        loaded = dict(device.model.weights.named_tensors())
        assert loaded.keys() == stored.keys() and any(torch.count_nonzero(t) for t in stored.values())
        assert all(torch.equal(loaded[name], stored[name]) for name in stored)
    finally:
        device.close()


def test_its_killed_job_resumes_from_its_checkpoint(old_folder):
    anchor = (old_folder / "dev" / "anchor.json").read_bytes()
    result = CliRunner().invoke(main, ["personalize", "dev", "--data", "notes.jsonl", *EXPECTED["killed_job"]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    device_id = json.loads((old_folder / "dev" / "device.json").read_text())["device_id"]
    (job,) = open_registry().list_jobs(device_id)
    assert job.status == "succeeded" and job.params["resumed_from_step"] == EXPECTED["checkpoint_step"]
    job_steps = int(EXPECTED["killed_job"][EXPECTED["killed_job"].index("--steps") + 1])
    reopened = open_device(old_folder / "dev")
    reopened.close()
    assert job.steps_done == job_steps and reopened.steps == EXPECTED["adapter_steps"] + job_steps
    assert not (old_folder / "dev" / "checkpoint.safetensors").exists()
    assert (old_folder / "dev" / "anchor.json").read_bytes() == anchor  # its anchor text was still its own
