"""A fleet run on Flower's own runtime: `flwr run` against a SuperLink of the launcher's own.

Both engines run the same Flower App, whose run config (pyproject.toml's [tool.flwr.app.config],
written under the fleet root) is the only way a run's settings reach the apps:
- simulation: `flower-superlink --simulation` starts one `flwr-simulation` process for the run,
  which runs the ServerApp and, in a pool of Ray workers, every device's ClientApp;
- deployment: a SuperLink and one SuperNode per device, as on a real fleet of phones and PCs:
  the SuperLink starts the ServerApp, and each SuperNode a fresh ClientApp process per message.

Not Flower's own local SuperLink (`address = ":local:"`, which `flwr run` starts by itself): it
always runs with --simulation, so it cannot serve SuperNodes; it listens on fixed ports (39091,
39093), so two fleets on one machine would share it; and `flwr run` leaves it running, detached,
after the run. Here the SuperLink gets free ports, and it and everything Flower started under it
(the SuperExec, the app processes, Ray's daemons and workers) are stopped before `run_app`
returns, even on failure or Ctrl-C. Flower keeps its state in a private FLWR_HOME under the fleet
root, never the user's; all the processes' logs and the run's whole log stream go there too.
Flower's traffic is TLS, with credentials issued for the run (credentials.py), and in deployment
the SuperLink admits only the SuperNodes whose keys the launcher registered with it.
deploy/fleet-local.sh runs the deployment engine the same way, by hand.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import psutil
import tomli_w

from plora.platform.fleet.credentials import FleetCredentials, issue_credentials
from plora.platform.fleet.settings import ENGINES, FEDAVG, FLOWER_DIR, ORCHESTRATOR_TAG, FleetSettings, completion_marker
from plora.storage.errors import ConfigError, TransportError
from plora.storage.offline import OFFLINE_ENV

log = logging.getLogger(__name__)

CONNECTION = "fleet"
"""The SuperLink connection's name in $FLWR_HOME/config.toml."""
COMPONENTS = {
    "serverapp": "plora.platform.fleet.server_app:app",
    "clientapp": "plora.platform.fleet.client_app:app",
}
FEDERATION_COMPONENTS = {
    "serverapp": "plora.platform.fleet.federation:server",
    "clientapp": "plora.platform.fleet.federation:client",
}
# Flower's processes get Flower's and Ray's offline flags whatever this process's environment
# says: no telemetry, no update check, no pip install of the App's dependencies (plora is
# installed already, and the fleet may have no network), no Ray usage report. Hugging Face's
# flags are left to the apps, which go offline themselves (the offline probe checks it).
FLOWER_OFFLINE_ENV = {flag: value for flag, value in OFFLINE_ENV.items() if flag.startswith(("FLWR_", "RAY_"))}
RAY_STARTS = 2  # Ray gives its node a fixed 30 s to come up, which a busy small machine can miss
RAY_LATE = "timed out during startup"
"""What Ray's error says, in the run's log, when its node missed that wait."""
_STARTUP_S = 60.0
_POLL_S = 0.5
RUN_START_S = 120.0
"""How long a run may wait to start running. Flower's SuperExec starts the run's process
(flwr-simulation, or the ServerApp's) and never notices if it dies: the run then stays
"pending" or "starting", and its log stream waits for it for ever."""
STATUS_EVERY_S = 10.0  # between asking the SuperLink whether the run runs yet (each ask is a `flwr ls`)
WAITING = ("pending", "starting")
_SWEEPS = 3  # rounds of stopping a run's processes, each for those started during the last
_STOP_S = 5.0
# After a completed run nothing of it is left to save (the SuperLink keeps its state in memory,
# and every reply was in before the ServerApp marked the run done): Flower's wind-down, Ray's
# shutdown and the SuperLink draining its connections, took 5 s of each launch, so the processes
# still there after this grace are killed.
_DONE_STOP_S = 0.5


def flower_app(settings: FleetSettings) -> dict:
    """The Flower App of a fleet run, as pyproject.toml's content: components and run config."""
    components = FEDERATION_COMPONENTS if settings.strategy == FEDAVG else COMPONENTS
    return {
        "project": {"name": "plora-fleet", "version": "1.0.0", "description": "A plora fleet: personalization rounds.",
                    "license": "Apache-2.0"},
        "tool": {"flwr": {"app": {"publisher": "plora", "components": components, "config": settings.to_run_config()}}},
    }


def run_app(settings: FleetSettings, engine: str, echo: Callable[[str], None], concurrency: int | None = None,
            ray_address: str | None = None) -> None:
    """Run the fleet's Flower App on `engine` until the run ends; raises TransportError unless it
    completed. The orchestrator's log lines go to `echo`.

    `concurrency` is how many devices train at once in simulation (by default one per CPU, up to
    the fleet's size); in deployment every SuperNode trains as soon as it is asked. With
    `ray_address` ("auto", HOST:PORT or ray://HOST:PORT) the simulation joins that Ray cluster,
    whose CPUs then say how many devices train at once, instead of starting one of its own; the
    cluster keeps running after the run."""
    check_engine(engine, concurrency, ray_address)
    flower = settings.fleet_root / FLOWER_DIR
    (flower / "app").mkdir(parents=True, exist_ok=True)
    (flower / "app" / "pyproject.toml").write_text(tomli_w.dumps(flower_app(settings)))
    simulation = engine == "simulation"
    with superlink(flower, 0 if simulation else settings.devices, simulation, ray_address) as link:
        for partition_id in range(link.nodes):
            link.register(partition_id)
            link.start_supernode(partition_id, settings.devices)
        federation = ["--federation-config", _simulation_config(settings.devices, concurrency, ray_address)] if simulation else []
        attempts = RAY_STARTS if simulation and not ray_address else 1
        for attempt in range(1, attempts + 1):
            run = _one_run(link.processes, link.address, federation, echo, settings.fleet_root)
            if run["status"] == "finished:completed":
                link.processes.run_completed = True
                return
            if not run["ray_late"] or attempt == attempts:
                raise TransportError(f"Flower run {run['run-id']} ended {run['status']} ({run['status-details']}); "
                                     f"its log and the SuperLink's are in {flower / 'logs'}")
            log.warning("Ray's node did not come up within Ray's start-up wait; running the fleet once more")


@contextlib.contextmanager
def superlink(flower: Path, nodes: int, simulation: bool, ray_address: str | None = None) -> Iterator[SuperLink]:
    """A SuperLink of the launcher's own, with its state, config and logs under `flower` (its
    FLWR_HOME), on a free loopback port, with TLS on all its APIs from credentials issued for
    the run. In deployment (`simulation` False) it admits only SuperNodes whose public keys were
    registered with it; free ports and key pairs are set aside for `nodes` of them. A simulation
    joins the Ray cluster at `ray_address`, if given. On exit it stops, with every process
    started under it (not a cluster it joined)."""
    (flower / "logs").mkdir(parents=True, exist_ok=True)
    link_port, *node_ports = _free_ports(1 + nodes)
    address = f"127.0.0.1:{link_port}"
    credentials = issue_credentials(flower / "tls", nodes)
    # An explicit address: `flwr` then uses this SuperLink and starts no local one of its own.
    (flower / "config.toml").write_text(tomli_w.dumps(
        {"superlink": {"default": CONNECTION, CONNECTION: {"address": address, "root-certificates": str(credentials.ca)}}}
    ))
    # Flower's processes start others by name (the SuperExec its flwr-simulation, a SuperNode
    # its ClientApp process): from this interpreter's environment first, as `_executable` does,
    # or a plora run from a virtual environment not on PATH would have them run another
    # installation's code.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, **FLOWER_OFFLINE_ENV, "FLWR_HOME": str(flower), "PYTHONUNBUFFERED": "1", "PATH": path}
    # Flower's simulation passes Ray only CPUs, GPUs and logging; ray.init finds a cluster to
    # join by RAY_ADDRESS, and must not find one the user's shell happened to name otherwise.
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    with _Processes(env, flower / "logs") as processes:
        processes.start("superlink", "flower-superlink", "--ssl-ca-certfile", str(credentials.ca),
                        "--ssl-certfile", str(credentials.server_cert), "--ssl-keyfile", str(credentials.server_key),
                        "--simulation" if simulation else "--enable-supernode-auth",
                        "--host", "127.0.0.1", "--port", str(link_port))
        _wait_until_up(address, credentials.ca, processes)
        yield SuperLink(address, credentials, processes, node_ports)


@dataclass(frozen=True)
class SuperLink:
    address: str
    credentials: FleetCredentials
    processes: _Processes
    node_ports: list[int]

    @property
    def nodes(self) -> int:
        return len(self.node_ports)

    def register(self, partition_id: int) -> None:
        """Admit the SuperNode of this partition: its public key, registered with the SuperLink."""
        _flwr(self.processes.env, "supernode", "register", str(self.credentials.node_public_key(partition_id)),
              CONNECTION, "--format", "json")

    def start_supernode(self, partition_id: int, devices: int) -> subprocess.Popen:
        """The SuperNode of one device, on its own port, trusting the fleet's CA and signing in with its key."""
        return self.processes.start(
            f"supernode-{partition_id:03d}", "flower-supernode", "--superlink", self.address,
            "--root-certificates", str(self.credentials.ca),
            "--auth-supernode-private-key", str(self.credentials.node_key(partition_id)),
            "--port", str(self.node_ports[partition_id]),
            "--node-config", f"partition-id={partition_id} num-partitions={devices}",
        )


def check_engine(engine: str, concurrency: int | None, ray_address: str | None = None) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "deployment" and (concurrency is not None or ray_address):
        raise ConfigError("concurrency and ray-address apply to the simulation engine; in deployment every SuperNode "
                          "trains at once, on its own host")
    if ray_address is not None and not _RAY_ADDRESS.fullmatch(ray_address):
        raise ConfigError(f"ray-address must be auto, HOST:PORT or ray://HOST:PORT, got {ray_address!r}")
    if ray_address and concurrency is not None:
        raise ConfigError("with ray-address the cluster's CPUs say how many devices train at once; leave out concurrency")


_RAY_ADDRESS = re.compile(r"auto|(ray://)?[A-Za-z0-9.\-]+:\d{1,5}|(ray://)?\[[0-9A-Fa-f:.]+\]:\d{1,5}")


def _simulation_config(devices: int, concurrency: int | None, ray_address: str | None) -> str:
    # One CPU per device: as many devices train at once as Ray has logical CPUs, which are
    # `concurrency` in a Ray of the launcher's own, and the cluster's in one it joins (a driver
    # joining a cluster may not declare any).
    resources = f"num-supernodes={devices} client-resources-num-cpus=1 client-resources-num-gpus=0.0 "
    if ray_address:
        return resources + 'init-args-logging-level="WARNING"'
    cpus = concurrency or min(devices, max(2, os.cpu_count() or 2))
    return resources + f'init-args-num-cpus={cpus} init-args-num-gpus=0 init-args-logging-level="WARNING"'


def _one_run(processes: _Processes, link: str, federation: list[str], echo: Callable[[str], None], fleet_root: Path) -> dict:
    """Submit the App, follow its log stream to the end, and return its entry in `flwr ls`,
    with "ray_late" saying whether the log told of Ray's node missing its start-up wait. A run
    whose ServerApp wrote its completion marker ends once its lines have come through."""
    env, app = processes.env, str(Path(processes.env["FLWR_HOME"]) / "app")
    run_id = _flwr(env, "run", app, CONNECTION, *federation, "--format", "json")["run-id"]
    run_log = processes.logs / f"run-{run_id}.log"
    echo(f"Flower run {run_id} on the SuperLink at {link}; logs in {processes.logs}")
    stream = processes.start(f"run-{run_id}", "flwr", "log", run_id, CONNECTION, "--stream", pipe=True)
    follower = _Follower(stream, run_log, echo)
    marker = completion_marker(fleet_root, run_id)
    submitted, status = time.monotonic(), WAITING[0]
    next_ask = submitted + STATUS_EVERY_S
    while stream.poll() is None and not marker.exists():  # the log stream ends with the run
        processes.check_running()
        if status in WAITING and time.monotonic() >= next_ask:
            status = _run_entry(env, run_id)["status"]
            if status in WAITING and time.monotonic() - submitted > RUN_START_S:
                raise TransportError(f"Flower run {run_id} was still {status} after {RUN_START_S:.0f} s: the process "
                                     f"Flower starts for it (flwr-simulation in simulation) failed or never started; "
                                     f"its log and the SuperLink's are in {processes.logs}")
            next_ask = time.monotonic() + STATUS_EVERY_S
        time.sleep(_POLL_S)
    if marker.exists() and follower.wait_for(json.loads(marker.read_text())["lines"], _STOP_S):
        return {"run-id": run_id, "status": "finished:completed", "ray_late": follower.ray_late.is_set()}
    follower.reader.join(timeout=_STOP_S)
    # `flwr log --stream` (like `flwr run --stream`) exits 0 whatever became of the run: ask.
    run = _run_entry(env, run_id)
    return {**run, "ray_late": follower.ray_late.is_set()}


def _run_entry(env: dict[str, str], run_id: str) -> dict:
    """The run's entry in `flwr ls`: its status, timestamps and traffic."""
    return _flwr(env, "ls", CONNECTION, "--run-id", run_id, "--format", "json")["runs"][0]


class _Follower:
    """Keeps the whole log stream in `run_log`, and passes on the orchestrator's own lines."""

    def __init__(self, stream: subprocess.Popen, run_log: Path, echo: Callable[[str], None]) -> None:
        self.ray_late = threading.Event()
        self._passed, self._more = 0, threading.Condition()
        self.reader = threading.Thread(target=self._follow, args=(stream, run_log, echo), daemon=True)
        self.reader.start()

    def _follow(self, stream: subprocess.Popen, run_log: Path, echo: Callable[[str], None]) -> None:
        with run_log.open("w") as kept:
            for line in stream.stdout:
                kept.write(line)
                kept.flush()
                if RAY_LATE in line:
                    self.ray_late.set()
                if line.startswith(ORCHESTRATOR_TAG):
                    echo(line.removeprefix(ORCHESTRATOR_TAG).rstrip())
                    with self._more:
                        self._passed += 1
                        self._more.notify_all()

    def wait_for(self, lines: int, timeout: float) -> bool:
        """Whether `lines` of the orchestrator's were passed on within `timeout` seconds."""
        with self._more:
            return self._more.wait_for(lambda: self._passed >= lines, timeout)


class _Processes:
    """Flower processes started for one run, each with its log file; on exit, each is stopped
    together with everything it started (Flower's SuperExec and app processes, Ray)."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.running: dict[str, subprocess.Popen] = {}
        self.services: set[str] = set()  # those that must run until the end; the others are log streams
        self.run_completed = False

    def __enter__(self) -> Self:
        return self

    def start(self, name: str, program: str, *args: str, pipe: bool = False) -> subprocess.Popen:
        """Start a process that runs until the end, its output in logs/NAME.log; or, with
        `pipe`, one whose output (text) the caller reads, which may end before."""
        output = subprocess.PIPE if pipe else (self.logs / f"{name}.log").open("wb")
        try:
            # A session of its own: Ctrl-C reaches only the launcher, which then stops them all.
            process = subprocess.Popen(
                [_executable(program), *args], env=self.env, stdin=subprocess.DEVNULL, start_new_session=True,
                stdout=output, stderr=subprocess.STDOUT, text=pipe,
            )
        finally:
            if not pipe:
                output.close()
        self.running[name] = process
        if not pipe:
            self.services.add(name)
        return process

    def check_running(self) -> None:
        for name in self.services:
            if (process := self.running[name]).poll() is not None:
                raise TransportError(f"Flower's {name} exited with code {process.returncode}; see {self.logs / name}.log")

    def __exit__(self, *exc_info: object) -> None:
        tree = [member for process in self.running.values() for member in _with_descendants(process.pid)]
        # Then again for any process started while the first were stopping (the SuperExec
        # starts app processes): its parent's exit hands it to init, out of the tree, but it
        # carries this run's FLWR_HOME.
        for _ in range(_SWEEPS):
            if not tree:
                break
            _stop(tree, _DONE_STOP_S if self.run_completed else _STOP_S, warn=not self.run_completed)
            tree = _running_with_home(self.env["FLWR_HOME"])
        for process in self.running.values():
            process.wait()  # psutil reaped them; this only settles Popen's own bookkeeping


def _stop(processes: list[psutil.Process], grace_s: float = _STOP_S, warn: bool = True) -> None:
    # All at once: waiting for each in turn adds up.
    for member in processes:
        _signal(member, psutil.Process.terminate)
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for member in alive:
        if warn:
            log.warning("Flower process %d (%s) ignored SIGTERM; killing it", member.pid, _name(member))
        _signal(member, psutil.Process.kill)
    _wait_dead(alive, _STOP_S)


def _wait_dead(processes: list[psutil.Process], timeout_s: float) -> None:
    """Until every one of `processes` is gone or a zombie, at most `timeout_s`. A killed process
    that is not this one's child stays a zombie until its own parent reaps it, and holds nothing
    then but its process id (psutil's own wait would wait for it the whole time)."""
    deadline = time.monotonic() + timeout_s
    while any(_running(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(_POLL_S / 10)


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _running_with_home(flwr_home: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get("FLWR_HOME") == flwr_home:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _with_descendants(pid: int) -> list[psutil.Process]:
    try:
        process = psutil.Process(pid)
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _name(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()[:2])[:120]
    except psutil.Error:
        return "gone"


def _signal(process: psutil.Process, send: Callable[[psutil.Process], None]) -> None:
    try:
        send(process)
    except psutil.NoSuchProcess:
        pass


def _executable(program: str) -> str:
    # Flower's commands from this interpreter's environment first, whatever PATH says.
    found = shutil.which(program, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        raise ConfigError(f"{program} not found next to {sys.executable} or on PATH; install flwr 1.42 (pip install 'flwr==1.42.*')")
    return found


def _flwr(env: dict[str, str], *args: str) -> dict:
    """A `flwr ... --format json` command's answer; a failed command raises TransportError with
    its messages. It may fail with exit code 0, saying so only in its JSON ("success": false)."""
    try:
        done = subprocess.run([_executable("flwr"), *args], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=_STARTUP_S, check=False)
    except subprocess.TimeoutExpired as err:
        raise TransportError(f"flwr {' '.join(args)} did not answer within {_STARTUP_S:.0f} s") from err
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        answer = {}
    if done.returncode != 0 or answer.get("success") is not True:
        said = answer.get("error-message") or (done.stdout + done.stderr).strip()[-2000:]
        raise TransportError(f"flwr {' '.join(args)} failed (exit code {done.returncode}): {said}")
    return answer


def _free_ports(count: int) -> list[int]:
    # All bound at once, so no two are the same; released just before Flower binds them.
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_until_up(address: str, ca: Path, processes: _Processes) -> None:
    deadline = time.monotonic() + _STARTUP_S
    trusting_the_fleet_ca = ssl.create_default_context(cafile=str(ca))
    while True:
        processes.check_running()
        try:
            with urllib.request.urlopen(f"https://{address}/health", timeout=1, context=trusting_the_fleet_ca):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TransportError(f"the SuperLink at {address} did not come up within {_STARTUP_S:.0f} s") from None
            time.sleep(_POLL_S)
