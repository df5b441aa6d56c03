"""The operator and every device on a host of their own (tests/hosts.py).

deploy/operator-up.sh brings up the operator's side: PostgreSQL, two backbone replicas and the
SuperLink, all over TLS. Each of three device hosts gets what an operator hands out (the CA
certificate and its own SuperNode key), keeps its own data file, and runs a SuperNode whose
node config names its own folder. A personalization fleet runs on Flower's deployment engine;
the replica every device is on is killed while they train. The devices carry on at the other
replica, and their M are those of an uninterrupted run of the same devices' data. As root the
hosts are network namespaces; `make hosts` runs the same test with hosts on loopback, as on a
machine without root.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import sqlalchemy
import torch
from safetensors.torch import load_file

from plora.clients.device_store import DeviceStore
from plora.platform.fleet.settings import PROGRESS_FILE, device_dir
from plora.platform.fleet.superlink import FLOWER_OFFLINE_ENV, _executable
from tests.hosts import HOSTS_ENV, LOOPBACK, Host, emulated_hosts
from tests.postgres import UNPRIVILEGED_USER, binaries_in

REPO = Path(__file__).resolve().parents[2]
DEVICES = 3
STEPS = 8
UP_S = 240


# What each host's ClientApp runs for a round-1 train message, run for a new device of each
# host in turn, enrolled with a token of the operator's registry ($PLORA_DB_URL): backbone,
# steps, then each host's folder and partition id.
REFERENCE_JOBS = """
import sys
from pathlib import Path
from plora.platform.fleet import task
from plora.platform.fleet.settings import FleetSettings
from plora.storage.registry import open_registry
backbone, steps, *hosts = sys.argv[1:]
token = open_registry().issue_enrollment_token(uses=len(hosts) // 2, label="reference")[1]
for folder, partition in zip(hosts[::2], map(int, hosts[1::2])):
    settings = FleetSettings(Path(folder) / "plora", backbone, str(Path(folder) / "notes.jsonl"), steps=int(steps), batch_size=2,
                             backbone_ca=str(Path(folder) / "ca.pem"), enroll_token=token)
    task.prepare_device(settings, partition, own_data=True)
    task.personalize(settings, partition, 1)
"""


def _notes(i: int) -> str:
    return "".join(json.dumps({"text": f"Host {i}, note {k}: my locker code is {(i * 97 + k * 31) % 1000:03d}."}) + "\n"
                   for k in range(12))


def _wait_for_line(process, log: Path, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in log.read_text().splitlines() if line.startswith(text)]
        if lines:
            return lines[0]
        if process.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail(f"no {text!r} in {log}:\n{log.read_text()[-3000:]}")


def _run(host: Host, *args: str, **env: str) -> str:
    done = host.run(list(args), **env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _progress(folder: Path) -> dict | None:
    try:
        return json.loads((folder / PROGRESS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@dataclass
class OperatorSide:
    up: subprocess.Popen
    """deploy/operator-up.sh, still running."""
    backbone: str
    """The replicas' addresses, comma-separated."""
    superlink: str
    folder: Path
    """Its ROOT, as the test sees it."""
    env: dict[str, str]
    """For the operator's commands: its FLWR_HOME and registry."""


def operator_up(operator: Host, tiny_checkpoint: Path, supernodes: int, own_port) -> OperatorSide:
    """deploy/operator-up.sh on the operator's host, with two replicas of the tiny model, once it says it is up."""
    # Each replica takes BACKBONE_PORT + i and METRICS_PORT + i.
    namespaces = operator.namespace is not None
    ports = {name: (default if namespaces else own_port(replicas)) for name, default, replicas in
             (("PG_PORT", 5432, 1), ("BACKBONE_PORT", 50051, 2), ("SUPERLINK_PORT", 9093, 1), ("METRICS_PORT", 9464, 2))}
    pg_bin = binaries_in(operator.folder / "postgres-programs")  # copied there as root, for PostgreSQL's own user
    if pg_bin.is_relative_to(operator.folder):
        pg_bin = operator.home / pg_bin.relative_to(operator.folder)
    up = operator.popen(["bash", str(REPO / "deploy" / "operator-up.sh"), str(operator.home / "plora"), operator.address,
                         str(supernodes), "--backbone", str(tiny_checkpoint), "--rank", "4", "--device-layers", "1"],
                        operator.folder / "operator-up.log", **{k: str(v) for k, v in ports.items()}, REPLICAS="2",
                        PG_BIN=str(pg_bin), PG_USER=UNPRIVILEGED_USER)
    ready = _wait_for_line(up, operator.folder / "operator-up.log", "operator up:", UP_S)
    folder = operator.folder / "plora"
    env = {"FLWR_HOME": str(operator.home / "plora" / "flower"), "PLORA_DB_URL": (folder / "db-url").read_text().strip(),
           **FLOWER_OFFLINE_ENV}
    return OperatorSide(up, ready.split()[3], ready.split()[5], folder, env)


def _kill_replica(side: OperatorSide, replica: int) -> None:
    os.kill(int((side.folder / f"replica-{replica}.pid").read_text()), signal.SIGKILL)


def test_operator_up_says_at_once_which_process_ended_before_it_listened(tmp_path, own_port):
    # It waited two minutes for a port nothing would ever open, then said the replica "did not come up".
    env = {**os.environ, "PLORA_DB_URL": f"sqlite:///{tmp_path / 'registry.db'}", "REPLICAS": "1", "PLORA_HOME": str(tmp_path / "home"),
           "BACKBONE_PORT": str(own_port()), "SUPERLINK_PORT": str(own_port()), "METRICS_PORT": str(own_port())}
    started = time.monotonic()
    done = subprocess.run(["bash", str(REPO / "deploy" / "operator-up.sh"), str(tmp_path / "operator"), "127.0.0.1", "1",
                           "--no-such-option"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and time.monotonic() - started < 60
    assert f"backbone replica 0 ended before it listened on 127.0.0.1:{env['BACKBONE_PORT']}" in done.stderr, done.stderr
    assert "No such option '--no-such-option'" in (tmp_path / "operator" / "logs" / "replica-0.log").read_text()


@pytest.mark.timeout(300)
def test_operator_up_stops_its_registry_on_sigterm_while_a_client_is_connected(tiny_checkpoint, own_port):
    # SIGTERM asks PostgreSQL for its smart shutdown, which waits for every client to leave: an
    # operator's open session kept the script from ever ending.
    folder = Path(tempfile.mkdtemp(prefix="plora-operator-"))
    folder.chmod(0o711)  # PostgreSQL's own user passes through to its folder and programs
    env = {**{k: v for k, v in os.environ.items() if k != "PLORA_DB_URL"}, "REPLICAS": "1", "PG_USER": UNPRIVILEGED_USER,
           "PG_BIN": str(binaries_in(folder / "postgres-programs")), "PLORA_HOME": str(folder / "home"),
           **{name: str(own_port()) for name in ("PG_PORT", "BACKBONE_PORT", "SUPERLINK_PORT", "METRICS_PORT")}}
    log = folder / "operator-up.log"
    with log.open("w") as sink:
        up = subprocess.Popen(["bash", str(REPO / "deploy" / "operator-up.sh"), str(folder / "plora"), "127.0.0.1", "1",
                               "--backbone", str(tiny_checkpoint), "--rank", "4"], stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for_line(up, log, "operator up:", UP_S)
        engine = sqlalchemy.create_engine((folder / "plora" / "db-url").read_text().strip(), poolclass=sqlalchemy.pool.NullPool)
        session = engine.connect()
        session.execute(sqlalchemy.text("select 1"))
        up.send_signal(signal.SIGTERM)
        try:
            assert up.wait(60) == 130, log.read_text()[-3000:]
        finally:
            with contextlib.suppress(sqlalchemy.exc.OperationalError):  # the shutdown ended the session
                session.close()
        assert not (folder / "plora" / "postgres" / "postmaster.pid").exists(), "PostgreSQL did not shut down cleanly"
    finally:
        if up.poll() is None:
            doomed = [psutil.Process(up.pid), *psutil.Process(up.pid).children(recursive=True)]
            for process in doomed:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            psutil.wait_procs(doomed, timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.xdist_group("processes")
@pytest.mark.timeout(300)
def test_a_fleet_across_hosts_carries_on_when_a_replica_dies_and_the_operator_sees_every_job(tiny_checkpoint, own_port):
    with emulated_hosts(DEVICES) as hosts:
        operator, devices = hosts.operator, hosts.devices
        side = operator_up(operator, tiny_checkpoint, DEVICES, own_port)
        up, backbone, link, plora, operator_env = side.up, side.backbone, side.superlink, side.folder, side.env
        assert (plora / "db-url").stat().st_mode & 0o777 == 0o600 and (plora / "tls").stat().st_mode & 0o777 == 0o700

        def flwr(*args: str) -> dict:
            return json.loads(_run(operator, _executable("flwr"), *args, "--format", "json", **operator_env))

        # What the operator hands each device host: the CA certificate and that host's own key.
        supernodes = []
        for i, host in enumerate(devices):
            shutil.copy(plora / "tls" / "ca.pem", host.folder / "ca.pem")
            shutil.copy(plora / "tls" / f"supernode-{i:03d}.key", host.folder / "supernode.key")
            (host.folder / "notes.jsonl").write_text(_notes(i))
            node_config = (f'partition-id={i} num-partitions={DEVICES} device-root="{host.home / "plora"}" '
                           f'data="{host.home / "notes.jsonl"}"')
            node_port = 9094 if hosts.namespaces else own_port()
            supernodes.append(host.popen([_executable("flower-supernode"), "--superlink", link, "--root-certificates",
                                          str(host.home / "ca.pem"), "--auth-supernode-private-key", str(host.home / "supernode.key"),
                                          "--port", str(node_port), "--node-config", node_config],
                                         host.folder / "supernode.log", **FLOWER_OFFLINE_ENV, FLWR_HOME=str(host.home / "flower")))

        # One round of personalization; the first replica is killed once the devices train.
        config = (f'fleet-root="{operator.home / "plora" / "fleet"}" backbone="{backbone}" devices={DEVICES} rounds=1 '
                  f'steps={STEPS} batch-size=2 fraction-evaluate=0 backbone-ca="{devices[0].home / "ca.pem"}" '
                  f'enroll-token="{(plora / "enroll-token").read_text().strip()}"')
        run_id = flwr("run", str(REPO / "deploy" / "fleet-app"), "fleet", "--run-config", config)["run-id"]
        folders = [device_dir(host.folder / "plora", i) for i, host in enumerate(devices)]
        steps_at_kill: list[int] = []
        deadline = time.monotonic() + 300
        while not steps_at_kill:  # asking Flower takes a second: the files are quicker
            assert time.monotonic() < deadline, "the devices never trained"
            progress = [_progress(folder) or {} for folder in folders]
            if any(p.get("what") == "round 1" for p in progress):
                _kill_replica(side, 0)
                steps_at_kill = [p.get("step") or 0 for p in progress]
            time.sleep(0.01)
        # One process that ends with the run: a `flwr` command a second would load two cores.
        streamed = operator.popen([_executable("flwr"), "log", str(run_id), "fleet", "--stream"], operator.folder / "run.log", **operator_env)
        streamed.wait(max(1.0, deadline - time.monotonic()))
        status = flwr("ls", "fleet", "--run-id", str(run_id))["runs"][0]["status"]
        assert status == "finished:completed", (plora / "logs" / "superlink.log").read_text()[-3000:]
        assert max(steps_at_kill) < STEPS, steps_at_kill  # killed before any device had finished training
        # At least one job had a step in flight, and made it again at the other replica.
        assert any("trying again on a new session" in (host.folder / "supernode.log").read_text() for host in devices)
        assert up.poll() is None and "backbone replica 0 ended; 1 still serve" in (operator.folder / "operator-up.log").read_text()

        # The reference: the same job on each host's data, for a new device that knows only the
        # second replica, so that nothing interrupts it. One process for every host, a test's
        # instrument rather than a device: it sees every host's folder, and reaches the replica.
        hosts_and_partitions = [str(arg) for i, host in enumerate(devices) for arg in (host.folder, DEVICES + i)]
        reference = subprocess.run([*operator.network_prefix, sys.executable, "-c", REFERENCE_JOBS, backbone.split(",")[1],
                                    str(STEPS), *hosts_and_partitions], capture_output=True, text=True, timeout=180,
                                   env=operator.env(PLORA_DB_URL=operator_env["PLORA_DB_URL"]))
        assert reference.returncode == 0, reference.stderr[-3000:]

        for i, host in enumerate(devices):
            interrupted, uninterrupted = (load_file(DeviceStore.open(device_dir(host.folder / "plora", p)).adapter_path)
                                          for p in (i, DEVICES + i))
            assert interrupted.keys() == uninterrupted.keys()
            assert all(torch.allclose(interrupted[k], uninterrupted[k], rtol=0, atol=1e-5) for k in interrupted)
            assert any(interrupted[k].abs().max() > 0 for k in interrupted)  # trained at all
        # The operator's host: the runs' records, and no device folder, yet every device's job.
        fleet = plora / "fleet"
        rounds = [json.loads(line) for line in (fleet / "rounds.jsonl").read_text().splitlines()]
        assert sorted((line["round"], line["partition_id"], line["failed"]) for line in rounds) == [
            (r, i, False) for r in (0, 1) for i in range(DEVICES)]
        assert not list(fleet.glob("device-*"))
        listed = json.loads(_run(operator, "plora", "jobs", "list", "--json", "--limit", "100", **operator_env))
        jobs = [job for job in listed if job["kind"] == "personalize"]
        device_ids = {DeviceStore.open(device_dir(host.folder / "plora", p)).record.device_id
                      for i, host in enumerate(devices) for p in (i, DEVICES + i)}
        assert {job["device_id"] for job in jobs} == device_ids
        assert all(job["status"] == "succeeded" and job["steps_done"] == STEPS for job in jobs), jobs

        # Where a device host's SuperNode and the ClientApps it starts run, its own folder is
        # readable, and nothing of another device's or the operator's: neither its SuperNode keys
        # nor the registry's password.
        def readable(i: int, path: Path) -> bool:
            return devices[i].run_beside(supernodes[i], [sys.executable, "-c", f"open({str(path)!r}, 'rb').read()"]).returncode == 0

        assert readable(1, devices[1].home / "notes.jsonl")
        assert readable(1, device_dir(devices[1].home / "plora", 1) / DeviceStore.ADAPTER)
        if hosts.isolated:
            assert not readable(1, devices[2].folder / "notes.jsonl")
            assert not readable(1, device_dir(devices[2].folder / "plora", 2) / DeviceStore.ADAPTER)
            assert not readable(1, plora / "tls" / "supernode-002.key")
            assert not readable(1, plora / "db-url")



# Serves one line on the host's address, then says so on stdout.
ECHO = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
connection, _ = server.accept()
connection.sendall(b"hello from " + sys.argv[1].encode())
"""
CONNECT = "import socket, sys; print(socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10).recv(100).decode())"


@pytest.mark.parametrize("mode", ["as root can", LOOPBACK])
def test_emulated_hosts_reach_each_other_see_only_their_own_files_and_leave_nothing(mode, monkeypatch, own_port):
    if mode == LOOPBACK:  # the mode of a machine without root, forced here so that CI runs it too
        monkeypatch.setenv(HOSTS_ENV, LOOPBACK)
    with emulated_hosts(2) as hosts:
        operator, first, second = hosts.operator, *hosts.devices
        assert hosts.namespaces == (mode != LOOPBACK and os.geteuid() == 0)
        port = own_port()
        server = operator.popen([sys.executable, "-c", ECHO, operator.address, str(port)], operator.folder / "echo.log")
        _wait_for_line(server, operator.folder / "echo.log", "listening", 30)
        assert _run(first, sys.executable, "-c", CONNECT, operator.address, str(port)).strip() == f"hello from {operator.address}"
        (first.folder / "notes.jsonl").write_text("mine")
        (second.folder / "notes.jsonl").write_text("theirs")
        assert _run(first, sys.executable, "-c", "import os; print(open(os.environ['HOME'] + '/notes.jsonl').read())").strip() == "mine"
        if hosts.isolated:
            assert first.run([sys.executable, "-c", f"open({str(second.folder / 'notes.jsonl')!r})"]).returncode != 0
        namespaces = [host.namespace for host in (operator, first, second) if host.namespace]
        base = operator.folder.parents[1]
    assert server.poll() is not None
    assert not base.exists()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout if namespaces else ""
    assert not any(namespace in listed for namespace in namespaces)
