"""The federated fleet (platform.fleet.federation) on a tiny random checkpoint: what its orchestrator
receives under SecAgg+, and without it; the aggregate; a device dropping out; a device opting out.

One fleet of 4 devices runs one round under SecAgg+, with the orchestrator keeping every reply it
receives (fleet_helpers.federation_spy). Device 2's data is broken, so it drops out mid-round,
after the key exchange; device 3's user declines the federation, and its own M is made non-zero
first so that its absence from the messages means something. The positive control asks a device
for its M in a round without SecAgg+, in this process, and reads the reply with the same spy.
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from plora.clients.device_store import DeviceStore, FederationChoice
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.privatelora import AdapterWeights
from plora.cloud_backbone.server import start_service
from plora.platform.fleet import client_app, federation, superlink, task
from plora.platform.fleet.launch import launch
from plora.platform.fleet.settings import FEDAVG, PERSONAL, FleetSettings, device_dir, start_path
from plora.platform.runtime import open_device
from plora.storage.errors import AdapterFileError, ConfigError
from plora.storage.models import JobStatus, utcnow
from plora.storage.registry import open_registry
from tests.integration.fleet_helpers import FEDERATION_SPY_APP, RECEIVED_ENV, flower_processes, numbers_in, ray_cluster

pytestmark = pytest.mark.xdist_group("processes")

REPO = Path(__file__).resolve().parents[2]
DEVICES, BROKEN, OPTED_OUT = 4, 2, 3
SECAGG_STAGES = {"setup", "share_keys", "collect_masked_vectors", "unmask"}
# SecAgg+ recovers the mean of values quantized in [-CLIPPING_RANGE, CLIPPING_RANGE] into
# QUANTIZATION_RANGE levels, with stochastic rounding: off by less than one level per entry.
TOLERANCE = 2 * federation.CLIPPING_RANGE / federation.QUANTIZATION_RANGE


def contributions(root: Path, partitions: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    return {i: load_file(device_dir(root, i) / DeviceStore.CONTRIBUTION) for i in partitions
            if (device_dir(root, i) / DeviceStore.CONTRIBUTION).is_file()}


def received(folder: Path) -> list[dict]:
    lines = [json.loads(line) for line in (folder / "received.jsonl").read_text().splitlines()]
    for line in lines:
        with np.load(folder / line["file"]) as arrays:
            line["arrays"] = [arrays[key] for key in arrays.files]
    return lines


def carries(array: np.ndarray, secret: torch.Tensor) -> bool:
    """Whether `array` holds `secret` (an r×r matrix) anywhere, as floats or as SecAgg+'s quantized integers."""
    target = secret.detach().double().numpy().ravel()
    values = array.ravel()
    if values.size < target.size or not np.issubdtype(values.dtype, np.number):
        return False
    readings = [values.astype(np.float64)]
    if np.issubdtype(values.dtype, np.integer):  # quantized: level k stands for -c + k * 2c / q
        readings.append(values.astype(np.float64) * TOLERANCE - federation.CLIPPING_RANGE)
    atol = 1e-3 * max(float(np.abs(target).max()), 1e-6)
    return any((np.abs(np.lib.stride_tricks.sliding_window_view(reading, target.size) - target) <= atol).all(axis=1).any()
               for reading in readings)


def leaks(replies: list[dict], secrets: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(secret, file) for every reply carrying one of the secrets."""
    return [(name, reply["file"]) for reply in replies for array in reply["arrays"] for name, secret in secrets.items()
            if carries(array, secret)]


@pytest.fixture(scope="module")
def federated_fleet(tiny_checkpoint, tmp_path_factory):
    """One round of a fleet under SecAgg+, what its orchestrator received, and what each device held."""
    base = tmp_path_factory.mktemp("federation")
    root = base / "fleet"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PLORA_DB_URL", f"sqlite:///{base / 'registry.db'}")
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        patch.setenv(RECEIVED_ENV, str(base / "received"))
        patch.setitem(superlink.FEDERATION_COMPONENTS, "serverapp", FEDERATION_SPY_APP)
        reg = open_registry()
        service = start_service([str(tiny_checkpoint)], PrivateLoRAConfig(rank=4, device_layers=1), reg)
        address = f"127.0.0.1:{service.port}"
        try:
            # Set up as the fleet would, to break device 2's data and give device 3 an M of its own.
            _, token = reg.issue_enrollment_token(DEVICES, utcnow() + timedelta(days=1))
            settings = FleetSettings(root, address, devices=DEVICES, enroll_token=token, strategy=FEDAVG, steps=2, lr=5e-2)
            for partition in range(DEVICES):
                task.prepare_device(settings, partition, DEVICES)
            (device_dir(root, BROKEN) / task.TRAIN_FILE).write_text("not json\n")
            opted_out = DeviceStore.open(device_dir(root, OPTED_OUT))
            weights = AdapterWeights(opted_out.record.identity.adapter, opted_out.record.identity.num_layers)
            with torch.no_grad():
                for _, tensor in weights.named_tensors():
                    tensor.normal_(0, 0.3)
            opted_out.write_adapter(weights, steps=7)
            adapters = {i: (device_dir(root, i) / DeviceStore.ADAPTER).read_bytes() for i in range(DEVICES)}
            # On a Ray cluster the fleet joins, as on an operator's (the other fleet tests start their own).
            with ray_cluster(cpus=2, log=base / "ray.log") as cluster:
                lines = launch(DEVICES, 1, backbone=address, root=root, steps=2, lr=5e-2, strategy=FEDAVG,
                               opt_out=str(OPTED_OUT), ray_address=cluster.address)
                assert len(cluster.drivers()) == 1  # the fleet's simulation joined it, and started no Ray of its own
            version = DeviceStore.open(device_dir(root, 0)).record.identity.version
            yield {"root": root, "settings": settings, "lines": lines, "received": received(base / "received"),
                   "contributions": contributions(root, list(range(DEVICES))), "start": load_file(start_path(root, version)),
                   "adapters": adapters, "opted_out_m": {name: m.detach().clone() for name, m in weights.named_tensors()}}
        finally:
            service.stop(grace_s=1)
            flower_processes(root, kill=True)


def ask_to_train_in_the_clear(fleet: dict, partition: int, monkeypatch) -> Message:
    """The message a round without SecAgg+ sends a device, answered by the device's ClientApp in
    this process (Flower builds a message's metadata from the task running it: pose as one)."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    settings = dataclasses.replace(fleet["settings"], secure_aggregation=False)
    context = Context(run_id=2, node_id=7, node_config={"partition-id": partition, "num-partitions": DEVICES},
                      state=RecordDict(), run_config=settings.to_run_config())
    fit = FitIns(federation.as_parameters(fleet["start"]), {"round": 2})
    client_app._settings.clear()
    return federation.client(Message(compat.fitins_to_recorddict(fit, True), dst_node_id=7, message_type="train"), context)


def node_of(run: dict, partition: int) -> int:
    """The Flower node of a device, from its reply to the question whether it joined."""
    for reply in run["received"]:
        if reply["type"] == "query.federation" and int(reply["arrays"][0][0]) == partition:
            return reply["node"]
    raise AssertionError(f"device {partition} never answered")


def test_under_secagg_the_orchestrator_receives_no_device_m_nor_update(federated_fleet):
    # The spy saw the whole protocol: a reply at every SecAgg+ stage, masked vectors included.
    assert SECAGG_STAGES <= {reply["stage"] for reply in federated_fleet["received"]}
    contributed = federated_fleet["contributions"]
    assert sorted(contributed) == [0, 1]  # M₀ was 0, so each device's M is its update too
    secrets = {f"device {i} {name}": m for i, contribution in contributed.items() for name, m in contribution.items()}
    secrets.update({f"device {OPTED_OUT} own {name}": m for name, m in federated_fleet["opted_out_m"].items()})
    assert leaks(federated_fleet["received"], secrets) == []


def test_the_same_spy_sees_a_device_m_and_update_in_a_round_without_secagg(federated_fleet, monkeypatch):
    """The positive control: the reply a device sends in a round without SecAgg+, once its owner
    allows that, carries its M, and its update is that M less the M₀ it was sent."""
    store = DeviceStore.open(device_dir(federated_fleet["root"], 0))
    store.choose_federation(FederationChoice(joined=True, in_the_clear=False))
    refused = ask_to_train_in_the_clear(federated_fleet, 0, monkeypatch)
    assert refused.has_error() and refused.error.reason == "ConfigError"
    store.choose_federation(FederationChoice(joined=True, in_the_clear=True))
    reply = ask_to_train_in_the_clear(federated_fleet, 0, monkeypatch)
    contribution = load_file(store.root / DeviceStore.CONTRIBUTION)
    sent = [{"file": "reply", "arrays": numbers_in(reply)}]
    secrets = {name: m for name, m in contribution.items()}
    assert {name for name, _ in leaks(sent, secrets)} == set(secrets)
    update = {name: m - federated_fleet["start"][name] for name, m in contribution.items()}
    assert all(float(delta.abs().max()) > 1e-3 for delta in update.values())
    received_m = compat.recorddict_to_fitres(reply.content, True).parameters
    for name, array in zip(federation.tensor_names(store.record.identity), parameters_to_ndarrays(received_m), strict=True):
        assert np.allclose(array - federated_fleet["start"][name].numpy(), update[name].numpy(), atol=1e-6)


def test_the_secure_aggregate_is_the_plain_mean_within_the_quantization(federated_fleet):
    run = federated_fleet
    mean = {name: sum(c[name] for c in run["contributions"].values()) / len(run["contributions"]) for name in run["start"]}
    assert max(float((run["start"][name] - mean[name]).abs().max()) for name in mean) <= TOLERANCE
    assert max(float(m.abs().max()) for m in mean.values()) > 100 * TOLERANCE  # a mean worth comparing


def test_a_device_dropping_out_mid_round_does_not_fail_the_round(federated_fleet):
    run = federated_fleet
    [line] = run["lines"]
    assert (line["sampled"], line["contributed"], line["dropped"], line["released"]) == (3, 2, 1, True)
    broken = node_of(run, BROKEN)
    # It had taken part in the key exchange: it dropped out after it, when asked for its M.
    asked_to_train = [reply for reply in run["received"] if reply["node"] == broken and reply["type"] == "train"]
    assert [(reply["stage"], reply["error"]) for reply in asked_to_train] == [
        ("setup", False), ("share_keys", False), ("collect_masked_vectors", True)]


def test_a_device_that_opted_out_is_asked_only_whether_it_joins_and_its_own_m_stays_as_it_was(federated_fleet):
    node = node_of(federated_fleet, OPTED_OUT)
    assert [reply["type"] for reply in federated_fleet["received"] if reply["node"] == node] == ["query.federation"]
    root = federated_fleet["root"]
    # Federated rounds train in a scratch copy: no device's own adapter changed.
    assert {i: (device_dir(root, i) / DeviceStore.ADAPTER).read_bytes() for i in range(DEVICES)} == federated_fleet["adapters"]


def test_a_device_starts_its_first_personalization_from_the_fleets_m_and_only_its_first(federated_fleet):
    root, address = federated_fleet["root"], federated_fleet["settings"].backbone
    path = start_path(root, DeviceStore.open(device_dir(root, 0)).record.identity.version)
    fresh = open_device(device_dir(root, 0), address)
    try:
        assert fresh.start_from_fleet(path) == 1  # learnt in one round
        assert all(torch.equal(m.detach(), federated_fleet["start"][name]) for name, m in fresh.model.weights.named_tensors())
    finally:
        fresh.close()
    personalized = open_device(device_dir(root, OPTED_OUT), address)  # holds 7 steps of its own
    try:
        with pytest.raises(ConfigError, match="first personalization"):
            personalized.start_from_fleet(path)
    finally:
        personalized.close()


def test_a_joined_devices_first_personal_fleet_job_starts_from_the_fleets_m_sent_and_its_next_does_not(federated_fleet, monkeypatch):
    # Last in the module: it changes device 0's adapter, which the tests above compare.
    settings, reg = dataclasses.replace(federated_fleet["settings"], strategy=PERSONAL), open_registry()
    store = DeviceStore.open(device_dir(settings.fleet_root, 0))
    version = store.record.identity.version
    # The device reads no fleet root, which a device on a host of its own lacks: the orchestrator
    # sends the starting M, checked whole before the job starts.
    with pytest.raises(AdapterFileError):
        task.personalize(settings, 0, 1, {version: b"not an adapter file"})
    # The first train message of a personal run, to the device's ClientApp (posing as Flower's task).
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    sent = {version: start_path(settings.fleet_root, version).read_bytes()}
    config = ConfigRecord({"round": 1, "steps": settings.steps, "lr": settings.lr, "baseline": False})
    question = Message(RecordDict({"config": config, "fleet_start": ConfigRecord(sent)}), dst_node_id=7, message_type="train")
    context = Context(run_id=3, node_id=7, node_config={"partition-id": 0, "num-partitions": DEVICES}, state=RecordDict(),
                      run_config=settings.to_run_config())
    client_app._settings.clear()
    assert client_app.app(question, context).content.metric_records["metrics"]["failed"] == 0
    first = reg.list_jobs(store.record.device_id, limit=1)[0]
    assert first.status == JobStatus.SUCCEEDED and first.params["fleet_start_rounds"] == 1
    assert first.params["drift_budget"] == settings.drift_budget == 0.02  # the fleet's jobs keep the job's budget
    # A run whose drift budget is 0 (the demo's) keeps the anchor at its weight.
    second = reg.get_job(task.personalize(dataclasses.replace(settings, drift_budget=0), 0, 2, sent)["job_id"])
    assert "fleet_start_rounds" not in second.params
    assert "drift_budget" not in second.params and second.params["anchor_weight"] == 3
    assert not list(device_dir(settings.fleet_root, 0).glob(".fleet-start-*"))
