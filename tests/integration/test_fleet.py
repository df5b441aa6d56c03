"""A fleet of simulated devices orchestrated by Flower, over the backbone service on loopback,
on a tiny random checkpoint."""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from plora.clients.device_store import DeviceStore
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.server import RunningServer, start_service
from plora.cloud_backbone.versions import register as register_version
from plora.platform.fleet import client_app, server_app, superlink, task
from plora.platform.fleet import launch as launch_module
from plora.platform.fleet.launch import FleetTally, _device_progress, echo_progress, launch, launch_migration, read_rounds
from plora.platform.fleet.settings import PUBLIC_DIR, FleetSettings, NodeConfig, device_dir, device_name, start_path
from plora.platform.fleet.task import report_progress
from plora.storage.errors import ConfigError, TransportError
from plora.storage.registry import open_registry
from tests.conftest import OfflineProbe, probe_offline
from tests.integration.fleet_helpers import MESSAGES_ENV, SPY_APP, flower_processes

# Runs in one xdist worker with the other tests that start many processes (see the Makefile).
pytestmark = pytest.mark.xdist_group("processes")

REPO = Path(__file__).resolve().parents[2]
# A fleet of Flower scale that samples as many devices a round as train at once on 2 cores.
DEVICES, SAMPLED, ROUNDS = 200, 2, 2
DECOY_RAN = "decoy-ran"  # what a decoy flwr-simulation, first on PATH, leaves if it is run


@dataclass(frozen=True)
class LaunchedFleet:
    root: Path
    server: RunningServer
    summary: list[dict]
    echoed: list[str]  # what the launcher printed
    messages: Path  # every message Flower carried, one JSON line each (fleet_helpers.spy_app)
    launched: list[dict]  # those of the launch
    database: str  # the registry's URL
    probe: OfflineProbe


@pytest.fixture(scope="module")
def fleet(tiny_checkpoint, tmp_path_factory) -> Iterator[LaunchedFleet]:
    """A fleet of DEVICES simulated devices, launched from nothing once for the tests that read
    it: the suite's durations show the launch alone, as this fixture's set-up."""
    folder = tmp_path_factory.mktemp("fleet")
    with pytest.MonkeyPatch.context() as patch:
        database = f"sqlite:///{folder / 'registry.db'}"
        patch.setenv("PLORA_DB_URL", database)
        messages = folder / "flower-messages.jsonl"
        patch.setenv(MESSAGES_ENV, str(messages))
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        patch.setitem(superlink.COMPONENTS, "serverapp", SPY_APP)
        probe = probe_offline(folder / "offline-probe", patch)
        # A decoy first on PATH: Flower's processes must start this environment's commands.
        decoys = folder / "decoys"
        decoys.mkdir()
        (decoys / "flwr-simulation").write_text(f"#!/bin/sh\ntouch {folder / DECOY_RAN}\nexit 1\n")
        (decoys / "flwr-simulation").chmod(0o755)
        patch.setenv("PATH", os.pathsep.join([str(decoys), os.environ["PATH"]]))
        server = start_service([str(tiny_checkpoint)], PrivateLoRAConfig(rank=4, device_layers=1), open_registry())
        try:
            root, echoed = folder / "fleet", []
            summary = launch(DEVICES, ROUNDS, backbone=f"127.0.0.1:{server.port}", root=root, steps=2, lr=1e-2,
                             fraction=SAMPLED / DEVICES, echo=echoed.append)
            yield LaunchedFleet(root, server, summary, echoed, messages, read_messages(messages), database, probe)
        finally:
            server.stop(grace_s=1)


def read_messages(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def is_small_scalar(value: dict) -> bool:
    return value["type"] in ("bool", "int", "float") or (value["type"] == "str" and len(value["value"]) <= 64)


@pytest.mark.timeout(600)
def test_a_simulated_fleet_personalizes_its_sampled_devices_and_only_scalars_cross_flower(fleet, monkeypatch):
    monkeypatch.setenv("PLORA_DB_URL", fleet.database)
    root, summary, echoed = fleet.root, fleet.summary, fleet.echoed
    assert flower_processes(root) == []  # no SuperLink, no Ray left behind
    assert not (root.parent / DECOY_RAN).exists()  # Flower started this environment's flwr-simulation
    # The ServerApp's process and Ray's workers went offline themselves: this launcher set no flags.
    assert {"flwr-simulation", "default_worker.py"} <= fleet.probe.offline_kinds()

    lines = read_rounds(root)
    trained = [line for line in lines if line["round"] > 0]
    assert sorted(line["round"] for line in trained) == [r for r in range(1, ROUNDS + 1) for _ in range(SAMPLED)]
    assert all(row["failed"] == 0 and row["recall"] is not None for row in summary), summary
    # Only the devices sampled were ever set up, each with a baseline taken before its first training.
    sampled = sorted({line["partition_id"] for line in trained})
    assert sorted(folder.name for folder in root.glob("device-*")) == [row["device"] for row in summary] \
        == [device_name(i) for i in sampled]
    for i in sampled:
        history = [line for line in lines if line["partition_id"] == i]
        assert history[0]["round"] == 0 and [line["round"] for line in history].count(0) == 1
        assert history[0]["evaluate"]["heldout_loss"] is not None and history[0]["evaluate"]["recall"] is not None
    # The public half is on disk once, in the fleet's store; a device folder holds its own state only.
    assert len([folder for folder in (root / PUBLIC_DIR / "bundles").iterdir() if folder.is_dir()]) == 1
    assert not any((root / device_name(i) / DeviceStore.BUNDLE).exists() for i in sampled)
    # Progress is one line for the fleet, never one per device, and it reaches the end.
    jobs = SAMPLED * ROUNDS
    assert any(line.startswith(f"fleet round {ROUNDS}/{ROUNDS} step {2 * jobs}/{2 * jobs}") for line in echoed), echoed
    assert not any(line.startswith("device-") for line in echoed), echoed
    # The orchestrator's lines come through the run's log stream, and nothing of Flower's chatter.
    assert any(f"round {ROUNDS}/{ROUNDS}: {SAMPLED} devices trained, 0 failed" in line for line in echoed), echoed
    assert not any(line.startswith(("INFO", "WARNING", "(ClientAppActor")) for line in echoed), echoed

    personalized = [job for job in open_registry().list_jobs(limit=100) if job.kind == "personalize"]
    assert len(personalized) == jobs
    assert all(job.status == "succeeded" and job.steps_done == 2 and job.metrics_after for job in personalized)

    adapters = [load_file(device_dir(root, i) / DeviceStore.ADAPTER) for i in sampled]
    for a, b in itertools.combinations(adapters, 2):
        assert a.keys() == b.keys()
        assert any(not torch.equal(a[name], b[name]) for name in a), "two devices hold the same M"

    messages = fleet.launched
    sent = [m for m in messages if m["type"] in ("train", "evaluate") and not m["reply"]]
    # A train message and an evaluate message per job: a device's baseline is measured within
    # its first train message, which costs no message of its own.
    assert len(sent) == 2 * jobs and len(messages) == 2 * len(sent)
    for message in messages:
        assert not message["error"]
        assert message["array_records"] == 0 and message["records"] == message["metric_and_config_records"]
        assert message["values"] and all(is_small_scalar(v) for v in message["values"]), message


@pytest.mark.timeout(600)
def test_a_backbone_upgrade_migrates_the_devices_set_up_in_a_flower_job_where_only_scalars_cross(fleet, monkeypatch):
    # Fresh public projections: each device set up distills its new M itself, the others have
    # nothing to move, and only scalars cross Flower again.
    monkeypatch.setenv("PLORA_DB_URL", fleet.database)
    root, server, echoed = fleet.root, fleet.server, []
    sampled = sorted({line["partition_id"] for line in read_rounds(root) if line["round"] > 0})
    reg, before = open_registry(), len(read_messages(fleet.messages))
    v1 = reg.get_device(DeviceStore.open(device_dir(root, sampled[0])).record.device_id).backbone_version_id
    v2 = register_version(reg, str(server.service.versions[reg.get_backbone(v1).name].source),
                          PrivateLoRAConfig(rank=4, device_layers=1, seed=1)).name
    # Two distillation steps keep little of the gain: accepted, this is about the Flower job.
    migrated = launch_migration(root, v2, "distill", steps=2, echo=echoed.append, min_retention=0)
    assert sorted(line["partition_id"] for line in migrated) == sampled
    assert all(line["error"] is None and line["metrics"]["migrated"] == 1 for line in migrated), migrated
    for i in sampled:
        device_id = DeviceStore.open(device_dir(root, i)).record.device_id
        assert DeviceStore.open(device_dir(root, i)).record.identity.version == v2
        assert reg.get_device(device_id).backbone_version_id == reg.get_backbone(v2).id
        assert [job.status for job in reg.migration_jobs(device_id, v2)] == ["succeeded"]
    # Fresh projections, the same weights: the same device half, still on disk once.
    assert len([folder for folder in (root / PUBLIC_DIR / "bundles").iterdir() if folder.is_dir()]) == 1
    migration_messages = read_messages(fleet.messages)[before:]
    assert len(migration_messages) == 2 * len(sampled)  # only the devices set up are asked
    assert all(not m["error"] and m["array_records"] == 0 for m in migration_messages)
    assert flower_processes(root) == []


@pytest.mark.timeout(300)
def test_a_run_whose_flwr_simulation_dies_at_start_fails_with_the_logs_instead_of_waiting_for_ever(
        tiny_checkpoint, tmp_path, monkeypatch):
    # Flower's commands, but a flwr-simulation that exits at once: Flower's SuperExec never
    # notices, and the run stays "starting" (before the fix, the launch waited for ever). They are
    # written afresh for this interpreter: a version manager's shim (pyenv's) would put its own
    # folder first on PATH, where the SuperExec would find the real flwr-simulation.
    commands = tmp_path / "bin"
    commands.mkdir()
    scripts = entry_points(group="console_scripts")
    for name in ("flwr", "flower-superlink", "flower-superexec", "flower-supernode", "flwr-serverapp", "flwr-clientapp"):
        module, function = scripts[name].value.split(":")
        (commands / name).write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n")
    (commands / "flwr-simulation").write_text("#!/bin/sh\nexit 1\n")
    for command in commands.iterdir():
        command.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(commands / "python"))  # where the launch looks for Flower's commands
    monkeypatch.setattr(superlink, "RUN_START_S", 15.0)
    monkeypatch.setattr(superlink, "STATUS_EVERY_S", 2.0)
    monkeypatch.setenv("PLORA_DB_URL", f"sqlite:///{tmp_path / 'registry.db'}")
    root, started = tmp_path / "fleet", time.monotonic()
    try:
        with pytest.raises(TransportError, match=r"still (pending|starting) after 15 s: .*flwr-simulation.*failed"):
            launch(2, 1, backbone=str(tiny_checkpoint), root=root, steps=1)
        assert time.monotonic() - started < 120
        assert flower_processes(root) == []  # the SuperLink and its SuperExec were stopped
    finally:
        flower_processes(root, kill=True)


def test_a_failed_device_job_is_reported_with_its_kind_and_no_message(tmp_path, monkeypatch):
    # Flower builds a message's metadata from the task running in the process; pose as one.
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    data = tmp_path / "notes.jsonl"
    data.write_text(json.dumps({"text": "My pet is called Quill."}) + "\n")
    run_config = FleetSettings(tmp_path / "fleet", "127.0.0.1:1", str(data), steps=1).to_run_config()
    # Partition 1 of 2 gets no record of a one-record file, before any device is enrolled.
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(), run_config=run_config)
    question = Message(RecordDict({"config": ConfigRecord({"round": 1, "steps": 1, "lr": 0.01})}), dst_node_id=7, message_type="train")
    client_app._settings.clear()
    reply = client_app.app(question, context)
    assert dict(reply.content.metric_records["metrics"]) == {"partition_id": 1, "failed": 1}
    assert dict(reply.content.config_records["error"]) == {"kind": "DataError"}
    assert len(reply.content.array_records) == 0


class AnsweringGrid:
    """A Grid whose nodes answer each message at once, by `answer(message)`; it keeps what it was sent."""

    def __init__(self, nodes: list[int], answer) -> None:
        self.nodes, self.answer, self.sent, self.replies = nodes, answer, [], []

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def push_messages(self, messages) -> list[str]:
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as Flower's SuperLink names a message
            self.sent.append(message)
            self.replies.append(self.answer(message))
        return [message.metadata.message_id for message in messages]

    def pull_messages(self, message_ids) -> list[Message]:
        ready = [reply for reply in self.replies if reply.metadata.reply_to_message_id in message_ids]
        self.replies = [reply for reply in self.replies if reply not in ready]
        return ready


def test_a_devices_first_train_message_of_a_run_asks_its_baseline_and_brings_the_fleets_starting_m(tmp_path, monkeypatch):
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    partition_of = {11: 0, 12: 1}  # node 12's data is broken: its first job fails before its baseline

    def answer(message: Message) -> Message:
        node, config = message.metadata.dst_node_id, message.content.config_records["config"]
        content = RecordDict({"metrics": MetricRecord({"partition_id": partition_of[node], "failed": int(node == 12)})})
        if node == 12:
            content["error"] = ConfigRecord({"kind": "DataError"})
        elif config.get("baseline"):
            content["baseline"] = MetricRecord({"heldout_loss": 2.5})
        return Message(content, reply_to=message)

    grid = AnsweringGrid(list(partition_of), answer)
    run_config = FleetSettings(tmp_path / "fleet", "127.0.0.1:1", devices=2, rounds=2, steps=1).to_run_config()
    starts = {"v1": b"the M of v1", "v2": b"the M of v2"}  # as platform.fleet.federation writes them
    for version, data in starts.items():
        start_path(tmp_path / "fleet", version).parent.mkdir(parents=True, exist_ok=True)
        start_path(tmp_path / "fleet", version).write_bytes(data)
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    # No evaluate message of its own: each device's first train message asks for the baseline, and only the first.
    asked = [(m.metadata.message_type, m.metadata.dst_node_id, m.content.config_records["config"].get("baseline"))
             for m in grid.sent]
    assert asked == [("train", 11, True), ("train", 12, True), ("evaluate", 11, None),
                     ("train", 11, False), ("train", 12, False), ("evaluate", 11, None)]
    # The fleet's starting M of every version: with a device's first train message of the run only.
    assert [dict(m.content.config_records.get("fleet_start", {})) for m in grid.sent if m.metadata.message_type == "train"] == [
        starts, starts, {}, {}]
    lines = read_rounds(tmp_path / "fleet")
    first, broken = (next(line for line in lines if line["round"] == 0 and line["node_id"] == node) for node in (11, 12))
    assert first["evaluate"] == {"partition_id": 0, "heldout_loss": 2.5} and not first["failed"]
    assert broken["failed"] and broken["errors"] == {"evaluate": "DataError"} and broken["partition_id"] == 1

    # --fraction-evaluate 0: no evaluation after training, and the baselines all the same.
    grid = AnsweringGrid(list(partition_of), answer)
    run_config = FleetSettings(tmp_path / "fleet", "127.0.0.1:1", devices=2, rounds=1, fraction_evaluate=0).to_run_config()
    server_app.main(grid, Context(run_id=2, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    assert [m.metadata.message_type for m in grid.sent] == ["train", "train"]
    assert [line["round"] for line in read_rounds(tmp_path / "fleet")] == [0, 0, 1, 1]


def test_a_device_on_a_host_of_its_own_keeps_its_folder_and_its_whole_data_file_there(tmp_path, monkeypatch):
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)
    host = tmp_path / "host-1"
    host.mkdir()
    (host / "notes.jsonl").write_text("".join(json.dumps({"text": f"Note {i}."}) + "\n" for i in range(3)))
    run_config = FleetSettings(tmp_path / "operator" / "fleet", "127.0.0.1:1", "/on/the/operator/notes.jsonl", steps=1).to_run_config()
    node_config = {"partition-id": 1, "num-partitions": 2, "device-root": str(host), "data": str(host / "notes.jsonl")}
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)
    question = Message(RecordDict({"config": ConfigRecord({"round": 1, "steps": 1, "lr": 0.01})}), dst_node_id=7, message_type="train")
    client_app._settings.clear()
    reply = client_app.app(question, context)
    # Nothing listens at the run's service: the job fails at enrolling, once the data is in place.
    assert dict(reply.content.config_records["error"]) == {"kind": "ConnectionLost"}
    train = (device_dir(host, 1) / task.TRAIN_FILE).read_text().splitlines()
    assert [json.loads(line)["text"] for line in train] == ["Note 0.", "Note 1.", "Note 2."]  # all of it: no share of 2
    assert not (tmp_path / "operator").exists()
    for bad in ({"partition-id": 2, "num-partitions": 2}, {**node_config, "device-root": "host-1"}, {"num-partitions": 2}):
        with pytest.raises(ConfigError):
            NodeConfig.parse(bad)


def test_settings_come_from_the_run_config_and_are_checked():
    config = {"fleet-root": "/tmp/fleet", "backbone": "127.0.0.1:50051", "rounds": 3, "lr": 1}
    settings = FleetSettings.from_run_config(config)
    assert (settings.rounds, settings.lr, settings.steps) == (3, 1.0, 10)
    assert FleetSettings.from_run_config(settings.to_run_config()) == settings
    for bad in ({"backbone": "127.0.0.1:50051"}, {**config, "rounds": "3"}, {**config, "backbone": "10.0.0.2:50051"}, {**config, "fraction": 0}, {**config, "drift-budget": -0.01},
                {**config, "devices": 2, "partitions": "4"}, {**config, "devices": 2, "partitions": "4,04"}, {**config, "devices": 2, "partitions": "4,-1"}):
        with pytest.raises(ConfigError):
            FleetSettings.from_run_config(bad)
    # A run over some of a fleet's devices: node k stands for the k-th of them.
    some = FleetSettings.from_run_config({**config, "devices": 2, "partitions": "17,3"})
    assert [some.device_of(k) for k in (0, 1)] == [17, 3] and settings.device_of(1) == 1


def test_progress_shows_each_devices_latest_phase_or_step_of_this_run_only(tmp_path):
    def report(partition_id: int, what: str, step: int | None = None, loss: float | None = None) -> None:
        folder = device_dir(tmp_path, partition_id)
        folder.mkdir(parents=True, exist_ok=True)
        report_progress(folder, what, step, 4 if step else None, loss)

    report(0, "round 1", 4, 9.0)  # left by an earlier run
    echoed = []
    with _device_progress(tmp_path, echo_progress(echoed.append)):
        report(2, "evaluating")
        report(1, "round 1", 1, 2.5)
        report(1, "round 1", 2, 2.25)
    assert sorted(echoed) == ["device-001 round 1 step 2/4 loss 2.250", "device-002 evaluating"]


def test_a_small_fleet_shows_each_device_besides_the_fleet(tmp_path):
    shown = []
    tally = FleetTally(rounds=1, per_round=2, steps=4, on_progress=lambda *line: shown.append(line), root=tmp_path, device_rows=True)
    tally("device-001", "evaluating", None, None, None)
    tally("device-002", "round 1", 3, 4, 2.5)
    assert shown[0] == ("device-001", "evaluating", None, None, None, None) and shown[1][0] == "fleet"
    assert shown[2] == ("device-002", "round 1", 3, 4, 2.5, None) and shown[3][:4] == ("fleet", "round 1/1", 3, 8)


def test_the_fleets_progress_is_one_line_of_counts_for_all_its_devices(monkeypatch, tmp_path):
    clock = iter(range(0, 1000, 30))  # 30 s between updates
    monkeypatch.setattr(launch_module.time, "monotonic", lambda: next(clock))
    shown = []
    tally = FleetTally(rounds=2, per_round=2, steps=4, on_progress=lambda *line: shown.append(line), root=tmp_path)
    tally("device-007", "round 1", 1, 4, 3.0)
    tally("device-042", "evaluating", None, None, None)
    tally("device-042", "waiting to train", None, None, None)
    tally("device-042", "round 1: preparing", None, None, None)
    tally("device-007", "round 1: trained", 4, 4, 2.0)
    tally("device-042", "round 1: failed", None, None, None)
    tally("device-007", "round 2", 2, 4, 1.0)
    keys, phases, steps, totals, losses, notes = zip(*shown)
    assert set(keys) == {"fleet"} and set(totals) == {16}  # 2 rounds of 2 jobs of 4 steps
    assert phases == ("round 1/2",) * 6 + ("round 2/2",)
    assert steps == (1, 1, 1, 1, 4, 8, 10)  # a job that ended counts its 4 steps, failed or not
    assert notes[:3] == ("1 training, 0 trained, 0 failed", "1 measuring their baseline, 1 training, 0 trained, 0 failed",
                         "1 waiting, 1 training, 0 trained, 0 failed")
    # Two jobs ended in 180 s (six updates after the start): 0.7 a minute, 3 minutes left.
    assert notes[5] == "0 training, 1 trained, 1 failed, 0.7 devices/min, about 3 min left"
    assert losses[-1] == 1.0  # the mean of the devices' latest training losses
    # A device sampled again may have moved on before its "trained" was read: the orchestrator's
    # record counts it, and a line it is still writing is left for the next look.
    line = {"round": 2, "partition_id": 7, "node_id": 1, "failed": False}
    (tmp_path / "rounds.jsonl").write_text(json.dumps(line) + "\n" + json.dumps(line)[:20])
    tally("device-042", "round 2", 1, 4, 2.0)
    assert shown[-1][:4] == ("fleet", "round 2/2", 13, 16) and shown[-1][5].startswith("1 training, 2 trained, 1 failed")
