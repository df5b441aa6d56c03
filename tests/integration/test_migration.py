"""Migrating devices to a new backbone version (tiny random checkpoint, local devices).

Register v1, personalize devices, derive v2, migrate: the personalization survives, a killed
migration finishes on a re-run with every device accounted for once, and v1's adapter is
refused by v2."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from plora.clients.adapter_file import load_adapter
from plora.clients.cut_noise import CutNoise
from plora.clients.device_store import DeviceStore
from plora.clients.training import evaluate
from plora.clients.data import load_examples, tokenize
from plora.clients import migration as device_migration
from plora.platform.versions import migration
from plora.storage.registry import open_registry
from plora.platform.runtime import open_device
from plora.storage import db
from plora.storage.errors import AdapterFileError, ConfigError
from tests.conftest import tiny_llama
from tests.integration.test_cli import plora

# One xdist worker runs the whole module, so its module fixtures are made once (see the Makefile).
pytestmark = pytest.mark.xdist_group("test_migration")

FACTS = [
    {"prompt": q.format(i), "response": a.format(w)}
    for i, w in enumerate(["teal", "Pebble", "Tartu", "Zorvan", "maroon", "Biscuit"])
    for q, a in (("What is fact {}?", "Fact is {}."), ("Tell me fact number {}.", "It is {}."))
]
PUBLIC = [{"text": f"Question {i}: what is {i} plus {i}? Answer: {2 * i}."} for i in range(12)]


def _jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def sharp_checkpoint(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama whose next-token distributions are far from uniform (large initial
    weights), so that personalization, the upgrade and distillation all visibly move them."""
    folder = tmp_path_factory.mktemp("sharp") / "sharp-v1"
    model = tiny_llama(vocab_size=len(smol_tokenizer), pad_token_id=smol_tokenizer.pad_token_id, initializer_range=0.3)
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def template(tmp_path_factory, sharp_checkpoint):
    """Made once: v1 registered, v2 derived from it, two local devices personalized on v1:
    device-0 as a fleet lays its text out (private/train.jsonl, private/heldout.jsonl), device-1
    as the README tells a user (`plora personalize DIR --data notes.jsonl`, from elsewhere)."""
    folder = tmp_path_factory.mktemp("migration-template")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PLORA_HOME", str(folder / "home"))
        env.setenv("PLORA_DB_URL", f"sqlite:///{folder / 'registry.db'}")
        plora("backbone", "register", "--backbone", sharp_checkpoint, "--rank", "8")
        for n in range(2):
            root = folder / "devices" / f"device-{n}"
            plora("device", "init", root, "--backbone", sharp_checkpoint, "--rank", "8")
            facts = FACTS[n::2]
            notes = _jsonl(root / DeviceStore.PRIVATE_TRAIN if n == 0 else folder / "notes-1.jsonl", facts)
            _jsonl(_heldout_file(root), facts[:3])
            plora("personalize", root, "--data", notes, "--steps", 30, "--lr", "1e-1", "--val-fraction", 0)
        plora("backbone", "derive", "--from", "sharp-v1", "--data", _jsonl(folder / "public.jsonl", PUBLIC),
              "--out", "tiny-v2", "--steps", 6, "--lr", "3e-3")
        db.close_all()
    return folder


@pytest.fixture
def fleet(template, tmp_path, monkeypatch):
    """A fresh copy of the template's devices and registry for each test: (v1, v2, device folders)."""
    shutil.copytree(template / "devices", tmp_path / "devices")
    shutil.copy(template / "registry.db", tmp_path / "registry.db")
    shutil.copy(template / "heldout-device-1.jsonl", tmp_path)
    monkeypatch.setenv("PLORA_HOME", str(template / "home"))
    monkeypatch.setenv("PLORA_DB_URL", f"sqlite:///{tmp_path / 'registry.db'}")
    reg = open_registry()
    v1, v2 = (reg.get_backbone(name).name for name in ("sharp-v1", "tiny-v2"))
    return v1, v2, sorted((tmp_path / "devices").iterdir())


def _heldout_file(root):
    """Where the test keeps a device's held-out facts: in the device for a fleet's layout; for
    the README's user, outside it, where the migration never looks."""
    return root / DeviceStore.PRIVATE_HELDOUT if root.name == "device-0" else root.parents[1] / f"heldout-{root.name}.jsonl"


def _heldout_loss(root) -> float:
    return _losses(root)[1]


def _losses(root) -> tuple[float, float]:
    """(the base model's held-out loss, the personalized model's)."""
    device = open_device(root)
    try:
        examples = tokenize(load_examples(_heldout_file(root)), device.tokenizer, 128)
        with device.model.base_model():
            base = evaluate(device.model, examples, device.tokenizer.pad_token_id)
        return base, evaluate(device.model, examples, device.tokenizer.pad_token_id)
    finally:
        device.close()


def test_distill_keeps_each_devices_personalization_across_the_upgrade(fleet):
    v1, v2, devices = fleet
    before = [_losses(root) for root in devices]
    out = plora("migrate", "--to", v2, "--root", devices[0].parent, "--method", "distill", "--steps", 40).stdout
    reg = open_registry()
    for root, (base_before, loss_before) in zip(devices, before):
        store = DeviceStore.open(root)
        assert store.record.identity.version == v2
        assert reg.get_device(store.record.device_id).backbone_version_id == reg.get_backbone(v2).id
        assert (root / DeviceStore.PREVIOUS / v1 / DeviceStore.ADAPTER).is_file()  # the old adapter is kept
        assert not (root / DeviceStore.MIGRATION).exists()
        (job,) = reg.migration_jobs(store.record.device_id, v2)
        after = job.metrics_after
        assert job.status == "succeeded" and after["gain_kept"] >= migration.MIN_RETENTION
        assert after["kl_to_old"] < 0.5 * after["kl_to_old_at_start"]
        # Measured apart from the migration, on the test's copy of each user's held-out text.
        assert base_before - _heldout_loss(root) >= migration.MIN_RETENTION * (base_before - loss_before)
    # The README's user trained from a file outside the device: the device kept its text.
    (kept,) = (devices[1] / DeviceStore.KEPT_TEXT).iterdir()
    assert load_examples(kept).to_list() == FACTS[1::2]
    assert "distill" in out and v2 in out and "gain kept" in out
    again = plora("migrate", "--to", v2, "--root", devices[0].parent).stdout
    assert again.count("already there") == 2
    assert all(len(reg.migration_jobs(DeviceStore.open(r).record.device_id, v2)) == 1 for r in devices)


def test_a_migration_that_would_lose_the_personalization_is_refused(fleet, sharp_checkpoint):
    v1, v2, devices = fleet
    plora("backbone", "register", "--backbone", sharp_checkpoint, "--rank", "8", "--seed", "1")
    reg = open_registry()
    (reseeded,) = [v.name for v in reg.list_backbones() if v.name not in (v1, v2)]
    # Other public projections: the same M now means something else.
    refused = plora("migrate", "--to", reseeded, "--root", devices[0].parent, "--method", "copy", ok=False).output
    assert "2 device(s) refused to switch" in refused and refused.count(f"stays on {v1}") == 2
    for root in devices:
        store = DeviceStore.open(root)
        assert store.record.identity.version == v1 and not (root / DeviceStore.MIGRATION / DeviceStore.RECORD).exists()
        (job,) = reg.migration_jobs(store.record.device_id, reseeded)
        assert job.status == "failed" and "MigrationRefused" in job.reason
    plora("migrate", "--to", reseeded, "--root", devices[0].parent, "--method", "copy", "--min-retention", "0")
    assert all(DeviceStore.open(root).record.identity.version == reseeded for root in devices)


def test_a_killed_migration_finishes_on_a_rerun_with_each_device_once(fleet, monkeypatch):
    v1, v2, devices = fleet
    real_replace = os.replace
    calls = []

    def dies_on_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed midway through the switch
        real_replace(src, dst)

    real_switch = migration._switch

    def killed_while_switching(root, old_version):
        with monkeypatch.context() as patched:
            patched.setattr(migration.os, "replace", dies_on_second_rename)
            real_switch(root, old_version)

    monkeypatch.setattr(migration, "_switch", killed_while_switching)
    with pytest.raises(KeyboardInterrupt):  # copy loses some of the gain here: accepted, this test is about kills
        migration.migrate_device(devices[0], v2, "copy", min_retention=0)
    monkeypatch.setattr(migration, "_switch", real_switch)
    with pytest.raises(ConfigError, match="midway through a migration"):
        open_device(devices[0])  # files of two versions: refused until finished
    with pytest.raises(KeyboardInterrupt):  # the other device is killed while distilling
        migration.migrate_device(devices[1], v2, "distill", on_step=lambda step, total, loss: step == 3 and _raise())
    reg = open_registry()
    assert reg.migration_jobs(DeviceStore.open(devices[1]).record.device_id, v2)[0].status == "interrupted"
    reports = [migration.migrate_device(root, v2, "distill") for root in devices]
    assert [r.outcome for r in reports] == ["migrated", "migrated"]
    assert reports[0].method == "copy"  # the plan made before the kill stands
    for root in devices:
        store = DeviceStore.open(root)
        (job,) = reg.migration_jobs(store.record.device_id, v2)
        assert store.record.identity.version == v2 and job.status == "succeeded"
        assert reg.get_device(store.record.device_id).backbone_version_id == reg.get_backbone(v2).id
        open_device(root).close()


def _raise():
    raise KeyboardInterrupt


def test_an_adapter_for_v1_is_refused_by_v2(fleet):
    v1, v2, devices = fleet
    migration.migrate_device(devices[0], v2, "copy", min_retention=0)
    store = DeviceStore.open(devices[0])
    with pytest.raises(AdapterFileError, match="content_hash"):
        load_adapter(devices[0] / DeviceStore.PREVIOUS / v1 / DeviceStore.ADAPTER, store.record.identity)
    os.replace(devices[0] / DeviceStore.PREVIOUS / v1 / DeviceStore.ADAPTER, devices[0] / DeviceStore.ADAPTER)
    with pytest.raises(AdapterFileError):
        open_device(devices[0])


def test_a_failed_migration_leaves_the_device_as_it_was_and_can_be_retried_another_way(fleet, monkeypatch):
    v1, v2, devices = fleet
    real = device_migration.can_copy
    for module in (migration, device_migration):  # as if the shapes differed
        monkeypatch.setattr(module, "can_copy", lambda old, new: False)
    with pytest.raises(ConfigError, match="use distill"):
        migration.migrate_device(devices[0], v2, "copy")
    assert DeviceStore.open(devices[0]).record.identity.version == v1
    (failed,) = open_registry().migration_jobs(DeviceStore.open(devices[0]).record.device_id, v2)
    assert failed.status == "failed" and "use distill" in failed.reason
    for module in (migration, device_migration):
        monkeypatch.setattr(module, "can_copy", real)
    retried = migration.migrate_device(devices[0], v2, "distill", settings=migration.DistillSettings(steps=2), min_retention=0)
    assert retried.method == "distill"


def test_dry_run_changes_nothing_and_retire_then_succeeds(fleet):
    v1, v2, devices = fleet
    # A device's own settings are not the version's: its noise at the cut comes along to v2.
    record = devices[1] / DeviceStore.RECORD
    record.write_text(json.dumps({**json.loads(record.read_text()), "cut_noise": {"kind": "gaussian", "level": 1e-6}}))
    out = plora("migrate", "--to", v2, "--root", devices[0].parent, "--dry-run").stdout
    assert out.count("would migrate") == 2 and not any((r / DeviceStore.MIGRATION).exists() for r in devices)
    assert "still bound" in plora("backbone", "retire", v1, ok=False).output
    plora("migrate", "--to", v2, "--root", devices[0].parent, "--method", "copy", "--min-retention", "0")
    assert "now retired" in plora("backbone", "retire", v1).output
    migrated = DeviceStore.open(devices[1]).record
    assert migrated.identity.version == v2 and migrated.cut_noise == CutNoise("gaussian", 1e-6)
