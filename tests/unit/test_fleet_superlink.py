"""A fleet's run on Flower's runtime, without starting Flower: which failed runs are run once
more, what of a run's log stream reaches the launcher, and the credentials a fleet is issued."""

from __future__ import annotations

import logging
import queue
import threading
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from cryptography import x509

from plora.platform.cli.main import main
from plora.platform.fleet import superlink
from plora.platform.fleet.server_app import orchestrating
from plora.platform.fleet.settings import ORCHESTRATOR_TAG, FleetSettings, completion_marker
from plora.storage.errors import ConfigError, TransportError

RAY_ERROR = "ERROR :   An exception occured!! The current node timed out during startup. This could happen because ...\n"


def follow(lines: list[str], run_log) -> tuple[list[str], bool]:
    echoed = []
    follower = superlink._Follower(SimpleNamespace(stdout=iter(lines)), run_log, echoed.append)
    follower.reader.join()
    return echoed, follower.ray_late.is_set()


def test_the_run_log_is_kept_whole_and_only_the_orchestrators_lines_are_passed_on(tmp_path):
    lines = [
        "\x1b[92mINFO \x1b[0m:      Starting Flower Simulation\n",
        f"{ORCHESTRATOR_TAG}round 1/2: 3 devices trained, 0 failed; mean training loss after 2.5\n",
        "(ClientAppActor pid=7) WARNING :   Manually terminating ClientAppActor\n",
    ]
    echoed, ray_late = follow(lines, tmp_path / "run.log")
    assert echoed == ["round 1/2: 3 devices trained, 0 failed; mean training loss after 2.5"]
    assert (tmp_path / "run.log").read_text() == "".join(lines)
    assert not ray_late
    assert follow([lines[0], RAY_ERROR], tmp_path / "run.log") == ([], True)


def test_a_run_whose_server_app_completed_ends_once_its_lines_came_through(tmp_path, monkeypatch):
    delivered: queue.Queue = queue.Queue()

    class Stream:  # the run's log stream, which Flower's wind-down keeps open for seconds more
        stdout = iter(delivered.get, None)

        def poll(self) -> None:
            return None

    commands = []
    monkeypatch.setattr(superlink, "_flwr", lambda env, *args: commands.append(args[0]) or {"run-id": 7})
    processes = SimpleNamespace(env={"FLWR_HOME": str(tmp_path)}, logs=tmp_path, start=lambda *args, **kwargs: Stream(),
                                check_running=lambda: None)
    logger = logging.getLogger("a-test-orchestrator")
    with orchestrating(logger, tmp_path / "fleet", 7):  # as the ServerApp ends: its lines, then the marker
        logger.info("round 1/1: 2 devices trained, 0 failed")
        logger.info("the last line")
    lines = [f"{ORCHESTRATOR_TAG}round 1/1: 2 devices trained, 0 failed\n", "INFO : Flower's own line\n",
             f"{ORCHESTRATOR_TAG}the last line\n"]
    threading.Timer(0.3, lambda: [delivered.put(line) for line in lines]).start()  # the stream comes later
    echoed = []
    run = superlink._one_run(processes, "link", [], echoed.append, tmp_path / "fleet")
    assert run["status"] == "finished:completed"
    assert echoed[1:] == ["round 1/1: 2 devices trained, 0 failed", "the last line"]
    assert commands == ["run"]  # and no `flwr ls` after it
    delivered.put(None)


def test_a_failed_server_app_leaves_no_completion_marker(tmp_path):
    logger = logging.getLogger("a-failing-test-orchestrator")
    with pytest.raises(RuntimeError), orchestrating(logger, tmp_path, 3):
        logger.info("round 1/2")
        raise RuntimeError("the strategy failed")
    assert not completion_marker(tmp_path, 3).exists()


@pytest.fixture
def outcomes(monkeypatch) -> list[tuple[str, bool]]:
    """Flower's processes and commands left out, and each run ending as the next (status, Ray was late) says."""
    planned: list[tuple[str, bool]] = []

    class NoProcesses:
        def __init__(self, env, logs) -> None:
            self.env = env

        def __enter__(self):
            return self

        def __exit__(self, *exc_info) -> None: ...

        def start(self, name, program, *args, pipe=False) -> None: ...

    def one_run(processes, link, federation, echo, fleet_root) -> dict:
        status, ray_late = planned.pop(0)
        return {"run-id": "7", "status": status, "status-details": "N/A", "ray_late": ray_late}

    monkeypatch.setattr(superlink, "_Processes", NoProcesses)
    monkeypatch.setattr(superlink, "_wait_until_up", lambda address, ca, processes: None)
    monkeypatch.setattr(superlink, "_flwr", lambda env, *args: {})  # registering SuperNodes
    monkeypatch.setattr(superlink, "_one_run", one_run)
    return planned


@pytest.mark.parametrize("engine", superlink.ENGINES)
def test_a_simulation_is_run_once_more_only_when_rays_node_was_late(tmp_path, outcomes, engine):
    settings = FleetSettings(tmp_path / "fleet", "127.0.0.1:1", devices=2)
    late, completed, failed = ("finished:failed", True), ("finished:completed", False), ("finished:failed", False)

    outcomes[:] = [late, completed]
    if engine == "simulation":
        superlink.run_app(settings, engine, echo=lambda line: None)
        assert outcomes == []
    else:  # no Ray in deployment: a failed run is failed
        with pytest.raises(TransportError, match="finished:failed"):
            superlink.run_app(settings, engine, echo=lambda line: None)
        assert outcomes == [completed]

    outcomes[:] = [late, late, completed]
    with pytest.raises(TransportError, match="finished:failed"):
        superlink.run_app(settings, engine, echo=lambda line: None)
    assert len(outcomes) == (1 if engine == "simulation" else 2)

    outcomes[:] = [failed, completed]
    with pytest.raises(TransportError, match=r"Flower run 7 ended finished:failed \(N/A\)"):
        superlink.run_app(settings, engine, echo=lambda line: None)
    assert outcomes == [completed]


def test_fleet_credentials_name_the_hosts_stay_owner_only_and_are_never_overwritten(tmp_path):
    folder = tmp_path / "tls"
    made = CliRunner().invoke(main, ["fleet", "credentials", str(folder), "--supernodes", "2",
                                     "--host", "10.0.0.5", "--host", "link.example.org"])
    assert made.exit_code == 0, made.output
    assert sorted(path.name for path in folder.iterdir()) == [
        "ca.pem", "server.key", "server.pem", "supernode-000.key", "supernode-000.pub", "supernode-001.key", "supernode-001.pub"]
    assert folder.stat().st_mode & 0o777 == 0o700 and {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o600}
    ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((folder / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert names.get_values_for_type(x509.DNSName) == ["link.example.org"]
    assert (folder / "supernode-000.pub").read_text().startswith("ecdsa-sha2-nistp384 ")  # OpenSSH's, as Flower reads it

    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    again = CliRunner().invoke(main, ["fleet", "credentials", str(folder)])
    assert again.exit_code == 1 and "already holds" in again.output
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


@pytest.mark.parametrize("engine, concurrency, ray_address, refused", [
    ("simulation", None, "auto", None),
    ("simulation", None, "10.0.0.5:6379", None),
    ("simulation", None, "ray://head.example.org:10001", None),
    ("simulation", None, '10.0.0.5:6379" init-args-num-cpus="64', "must be auto, HOST:PORT"),
    ("simulation", 4, "10.0.0.5:6379", "leave out concurrency"),
    ("deployment", None, "10.0.0.5:6379", "apply to the simulation engine"),
])
def test_a_ray_address_is_checked_before_anything_starts(engine, concurrency, ray_address, refused):
    if refused is None:
        superlink.check_engine(engine, concurrency, ray_address)
    else:
        with pytest.raises(ConfigError, match=refused):
            superlink.check_engine(engine, concurrency, ray_address)
