"""Devices of a fleet share their public half (the backbone's device half, the base model's
anchor text) in one PublicStore; their private state stays their own (tiny random checkpoint,
a backbone service on loopback, no Flower)."""

from __future__ import annotations

import hashlib
import shutil
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plora.clients import public_store
from plora.clients.anchor import AnchorSettings
from plora.clients.device_store import DeviceStore
from plora.clients.grpc_link import Endpoint
from plora.clients.training import TrainSettings
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.server import start_service
from plora.platform import jobs
from plora.platform.fleet import task
from plora.platform.fleet.settings import PUBLIC_DIR, FleetSettings, device_dir
from plora.platform.runtime import init_device, open_device
from plora.storage.errors import ValidationError
from plora.storage.models import utcnow
from plora.storage.registry import open_registry

SMALL = TrainSettings(lr=0.05, steps=3, batch_size=2, anchor=AnchorSettings(texts=2, new_tokens=6))


@pytest.fixture
def fleet(tiny_checkpoint, tmp_path):
    reg = open_registry()
    running = start_service([str(tiny_checkpoint)], PrivateLoRAConfig(rank=4, device_layers=1), reg)
    _, token = reg.issue_enrollment_token(10, utcnow() + timedelta(hours=1))
    public_store._loaded.clear()  # each test starts as a fresh process would
    yield FleetSettings(tmp_path / "fleet", f"127.0.0.1:{running.port}", enroll_token=token)
    running.stop(grace_s=1)


def files_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def personalize(folder: Path, data: Path) -> None:
    jobs.run_personalization(open_device(folder), data, SMALL, val_fraction=0.0)


def test_devices_share_the_public_half_and_keep_their_private_state_apart(fleet):
    first, second = (task.prepare_device(fleet, i, 2) for i in range(2))
    public = fleet.fleet_root / PUBLIC_DIR
    # One device half for the fleet, and none in a device's folder.
    assert len([folder for folder in (public / "bundles").iterdir() if folder.is_dir()]) == 1
    assert not (first / DeviceStore.BUNDLE).exists() and not (second / DeviceStore.BUNDLE).exists()
    assert all(not path.stat().st_mode & 0o222 for path in (public / "bundles").glob("*/*"))

    personalize(first, first / task.TRAIN_FILE)
    public_after_first = files_digest(public)
    personalize(second, second / task.TRAIN_FILE)
    # The anchor and the probe were written once, by the first job, for both devices.
    assert files_digest(public) == public_after_first
    assert any(name.endswith(jobs.ANCHOR) for name in public_after_first)
    assert any(name.endswith(jobs.PROBE) for name in public_after_first)

    # The devices hold different M, and training one changes nothing of the other's.
    first_m, second_m = (load_file(folder / DeviceStore.ADAPTER) for folder in (first, second))
    assert any(not torch.equal(first_m[name], second_m[name]) for name in first_m)
    second_before = files_digest(second)
    personalize(first, first / task.TRAIN_FILE)
    assert files_digest(second) == second_before
    assert not torch.equal(load_file(first / DeviceStore.ADAPTER)[next(iter(first_m))], first_m[next(iter(first_m))])
    # Nothing private lies in the public store: no M, no user's text, no credential.
    private = [f.read_bytes() for folder in (first, second)
               for f in (folder / DeviceStore.ADAPTER, folder / task.TRAIN_FILE, folder / DeviceStore.CREDENTIALS)]
    for path in public.rglob("*"):
        if path.is_file():
            assert all(blob not in path.read_bytes() for blob in private), path


def test_a_changed_shared_half_is_refused_by_its_hash(fleet):
    folder = task.prepare_device(fleet, 0, 1)
    bundle = DeviceStore.open(folder).bundle_folder()
    weights = bundle / "model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ValidationError, match="changed or corrupted"):
        open_device(folder)
    # The next device set up on the store fetches it afresh, and then both run.
    task.prepare_device(fleet, 1, 2)
    open_device(folder).close()
    # Deleted, as the error says, it is fetched again when a device that shares it is opened.
    shutil.rmtree(bundle)
    public_store._loaded.clear()
    open_device(folder).close()
    assert (bundle / "model.safetensors").read_bytes() != bytes(data)


def test_sharing_the_public_half_changes_nothing_of_a_devices_result(fleet, tmp_path):
    """The same user's data and settings give the same M, on a device of its own or in a fleet."""
    shared = task.prepare_device(fleet, 0, 1)
    alone = tmp_path / "alone"
    init_device(alone, fleet.backbone, endpoint=Endpoint(fleet.backbone, insecure=True), enroll_token=fleet.enroll_token)
    assert (alone / DeviceStore.BUNDLE / "config.json").is_file()
    for folder in (shared, alone):
        personalize(folder, shared / task.TRAIN_FILE)
    shared_m, alone_m = (load_file(folder / DeviceStore.ADAPTER) for folder in (shared, alone))
    assert shared_m.keys() == alone_m.keys()
    for name in shared_m:
        torch.testing.assert_close(shared_m[name], alone_m[name], atol=1e-5, rtol=0)
    assert device_dir(fleet.fleet_root, 0) == shared


def test_devices_of_one_process_loading_the_half_at_once_each_get_all_of_it(tiny_checkpoint):
    """transformers' loading is not thread-safe. Two devices of the demo, opened at once in one
    process, each got meta tensors and a random LM head, and answered gibberish."""
    loaded = []

    def load() -> None:
        loaded.append(public_store.load_device_half(tiny_checkpoint, None)[0])  # no digest: never from the cache

    for _ in range(3):
        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(loaded) == 12
    for model in loaded:
        assert not any(parameter.is_meta for parameter in model.parameters())
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as saved
