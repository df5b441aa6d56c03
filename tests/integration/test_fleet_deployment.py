"""The fleet on Flower's deployment engine: a SuperLink and one SuperNode per device on
loopback, each message answered by a fresh ClientApp process, on a tiny random checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.platform.fleet import superlink
from plora.platform.fleet.launch import launch
from plora.platform.fleet.settings import FleetSettings
from plora.storage.errors import TransportError
from plora.storage.registry import open_registry
from tests.integration.fleet_helpers import flower_processes

# Runs in one xdist worker with the other tests that start many processes (see the Makefile).
pytestmark = pytest.mark.xdist_group("processes")

REPO = Path(__file__).resolve().parents[2]
DEVICES = 2


@pytest.fixture
def notes(tmp_path) -> Path:
    # A data file rather than personas: no recall to generate, so each evaluation is quick.
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"text": f"Note {i}: the locker code is {i * 37 % 1000:03d}."}) + "\n" for i in range(24)))
    return path


@pytest.mark.timeout(300)
def test_a_deployed_fleet_trains_every_device_and_leaves_no_flower_process(tiny_checkpoint, tmp_path, notes, offline_probe):
    root, lines = tmp_path / "fleet", []
    # No service address: launch serves the checkpoint itself, as in simulation.
    summary = launch(DEVICES, 1, data=str(notes), backbone=str(tiny_checkpoint), root=root, engine="deployment", steps=2,
                     echo=lines.append, config=PrivateLoRAConfig(rank=4, device_layers=1))

    assert [row["device"] for row in summary] == [f"device-{i:03d}" for i in range(DEVICES)]
    assert all(row["rounds"] == 1 and row["failed"] == 0 and row["heldout_loss"] is not None for row in summary), summary
    personalized = [job for job in open_registry().list_jobs(limit=100) if job.kind == "personalize"]
    assert len(personalized) == DEVICES
    assert all(job.status == "succeeded" and job.steps_done == 2 for job in personalized)
    # The ServerApp's own lines come through the run's log stream, the fleet's progress from the
    # devices' progress files, summed.
    assert any("round 1/1: 2 devices trained, 0 failed" in line for line in lines), lines
    assert any(line.startswith(f"fleet round 1/1 step {2 * DEVICES}/{2 * DEVICES} loss ") for line in lines), lines
    for i in range(DEVICES):
        assert "Receiving: train message" in (root / "flower" / "logs" / f"supernode-{i:03d}.log").read_text()
    assert not any(line.startswith("INFO") for line in lines)
    assert flower_processes(root) == []
    # The ClientApps' processes went offline themselves, before loading a model: nothing set
    # their flags. (The ServerApp's never imports Hugging Face's libraries.)
    assert "flwr-clientapp" in offline_probe.offline_kinds()


@pytest.mark.timeout(120)
def test_the_superlink_admits_only_registered_supernodes_and_only_over_tls(tmp_path):
    with superlink.superlink(tmp_path / "flower", 4, simulation=False) as link:
        link.register(0)
        registered, unregistered = link.start_supernode(0, 4), link.start_supernode(1, 4)
        # Without a key, a SuperNode asks to register itself: only a SuperLink with SuperNode
        # authentication refuses. Without TLS, it cannot even connect.
        keyless = link.processes.start("supernode-keyless", "flower-supernode", "--superlink", link.address,
                                       "--root-certificates", str(link.credentials.ca), "--port", str(link.node_ports[2]))
        plain = link.processes.start("supernode-plain", "flower-supernode", "--insecure", "--superlink", link.address,
                                     "--port", str(link.node_ports[3]), "--max-retries", "3")
        refused = (unregistered, keyless, plain)
        deadline = time.monotonic() + 90
        while any(node.poll() is None for node in refused) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert all(node.returncode not in (None, 0) for node in refused), [node.returncode for node in refused]
        assert "Failed to activate SuperNode" in (link.processes.logs / "supernode-001.log").read_text()
        assert registered.poll() is None
        nodes = superlink._flwr(link.processes.env, "supernode", "ls", superlink.CONNECTION, "--format", "json")["nodes"]
        assert [node["status"] for node in nodes] == ["online"]
    # Owner-only: the keys of every SuperNode and of the server are in there.
    assert (link.credentials.folder.stat().st_mode & 0o777) == 0o700
    assert {path.stat().st_mode & 0o777 for path in link.credentials.folder.iterdir()} == {0o600}


@pytest.mark.timeout(120)
def test_a_failed_run_raises_and_a_stopped_one_leaves_no_flower_process(tmp_path):
    root = tmp_path / "fleet"
    # The orchestrator cannot start its record: the ServerApp fails, yet `flwr log --stream` exits 0.
    (root / "rounds.jsonl").mkdir(parents=True)
    settings = FleetSettings(root, "127.0.0.1:1", devices=1)
    with pytest.raises(TransportError, match="finished:failed"):
        superlink.run_app(settings, "deployment", echo=lambda line: None)
    assert flower_processes(root) == []

    def interrupt(line: str) -> None:
        if line.startswith("Flower run "):  # submitted: SuperLink, SuperNode and ServerApp are up or starting
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        superlink.run_app(settings, "deployment", echo=interrupt)
    assert flower_processes(root) == []


@pytest.mark.timeout(180)
def test_sigterm_to_the_launcher_stops_every_flower_process(tiny_checkpoint, tmp_path, notes):
    root = tmp_path / "fleet"
    launcher = subprocess.Popen(
        ["plora", "fleet", "launch", "--engine", "deployment", "--devices", "1", "--steps", "1000",
         "--backbone", str(tiny_checkpoint), "--data", str(notes), "--root", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        for line in launcher.stderr:
            if line.startswith("Flower run "):  # submitted: SuperLink, SuperNode and ServerApp are up or starting
                break
        deadline = time.monotonic() + 60
        while not flower_processes(root) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert flower_processes(root), "the fleet's Flower processes never started"
        launcher.send_signal(signal.SIGTERM)
        launcher.communicate(timeout=60)
        assert launcher.returncode != 0
        assert flower_processes(root) == []
    finally:
        launcher.kill()
        flower_processes(root, kill=True)


# Starts a process of its own on SIGTERM, as the SuperExec may while it is being stopped.
SPAWNS_ON_SIGTERM = """
import os, signal, subprocess, sys, time
def spawn(*_):
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    os._exit(0)
signal.signal(signal.SIGTERM, spawn)
print("ready", flush=True)
time.sleep(60)
"""


def test_stopping_also_stops_a_process_started_while_stopping(tmp_path):
    home = str(tmp_path / "flower")
    (tmp_path / "logs").mkdir()
    with superlink._Processes({**os.environ, "FLWR_HOME": home}, tmp_path / "logs") as processes:
        processes.start("spawner", "python3", "-c", SPAWNS_ON_SIGTERM)
        deadline = time.monotonic() + 30
        while "ready" not in (tmp_path / "logs" / "spawner.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    try:
        assert flower_processes(tmp_path) == []
    finally:
        flower_processes(tmp_path, kill=True)


def test_the_committed_flower_app_is_the_one_launch_writes():
    committed = tomllib.loads((REPO / "deploy" / "fleet-app" / "pyproject.toml").read_text())
    written = superlink.flower_app(FleetSettings(Path("plora-fleet"), "127.0.0.1:50051"))
    assert committed == written
