"""Flower's deployment engine on loopback: a SuperLink, one SuperNode per device, one run.

The same ServerApp and ClientApp as in simulation run here in Flower's own processes, as they
would on a real fleet of phones and PCs: the SuperLink starts the ServerApp, and each SuperNode
starts a fresh ClientApp process for every message it receives. The run's settings travel as
the Flower App's run config, in a pyproject.toml written under the fleet root. Flower keeps its
state in a private FLWR_HOME there too, never the user's; the processes' logs go there as well.
Every process started here is stopped before `run_deployment` returns, even on failure or
Ctrl-C. deploy/fleet-local.sh does the same by hand.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Self

import psutil
import tomli_w

from plora.platform.fleet import task
from plora.storage.errors import ConfigError, TransportError

log = logging.getLogger(__name__)

FLOWER_DIR = "flower"
"""Under the fleet root: FLWR_HOME (config.toml, installed apps), the Flower App, logs/."""
CONNECTION = "fleet"
"""The SuperLink connection's name in $FLWR_HOME/config.toml."""
COMPONENTS = {
    "serverapp": "plora.platform.fleet.server_app:app",
    "clientapp": "plora.platform.fleet.client_app:app",
}
_STARTUP_S = 60.0
_POLL_S = 0.5
_SWEEPS = 3  # rounds of stopping a run's processes, each for those started during the last
_STOP_S = 5.0
# flwr's own chatter in a run's log stream: its log lines ("INFO :      ...", coloured), the
# connection `flwr log` uses and the app's installation. What is left is the ServerApp's.
_FLWR_LINE = re.compile(r"^((INFO|DEBUG)\s*:|Using SuperLink: |Successfully installed )")
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def flower_app(settings: task.FleetSettings) -> dict:
    """The Flower App of a fleet run, as pyproject.toml's content: components and run config."""
    return {
        "project": {"name": "plora-fleet", "version": "1.0.0", "description": "A plora fleet: personalization rounds.",
                    "license": "Apache-2.0"},
        "tool": {"flwr": {"app": {"publisher": "plora", "components": COMPONENTS, "config": settings.to_run_config()}}},
    }


def run_deployment(settings: task.FleetSettings, echo: Callable[[str], None]) -> None:
    """Run the fleet on a loopback SuperLink and `settings.devices` SuperNodes; returns once the
    run has completed, and raises TransportError if it did not."""
    flower = settings.fleet_root / FLOWER_DIR
    (flower / "app").mkdir(parents=True, exist_ok=True)
    (flower / "logs").mkdir(exist_ok=True)
    (flower / "app" / "pyproject.toml").write_text(tomli_w.dumps(flower_app(settings)))
    link_port, *node_ports = _free_ports(1 + settings.devices)
    link = f"127.0.0.1:{link_port}"
    # An explicit address: `flwr` then uses this SuperLink and starts no local one of its own.
    (flower / "config.toml").write_text(tomli_w.dumps(
        {"superlink": {"default": CONNECTION, CONNECTION: {"address": link, "insecure": True}}}
    ))
    # os.environ holds launch.OFFLINE_ENV: Flower's processes stay offline.
    env = {**os.environ, "FLWR_HOME": str(flower), "PYTHONUNBUFFERED": "1"}
    env.pop(task.RUN_CONFIG_ENV, None)  # the run config travels in the app, and only there
    with _Processes(env, flower / "logs") as processes:
        processes.start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port))
        _wait_until_up(link, processes)
        for partition_id, port in enumerate(node_ports):
            node_config = f"partition-id={partition_id} num-partitions={settings.devices}"
            processes.start(f"supernode-{partition_id:03d}", "flower-supernode", "--insecure", "--superlink", link,
                            "--port", str(port), "--node-config", node_config)
        run_id = json.loads(_flwr(env, "run", str(flower / "app"), CONNECTION, "--format", "json"))["run-id"]
        echo(f"Flower run {run_id} on the SuperLink at {link}, {settings.devices} SuperNodes; logs in {flower / 'logs'}")
        stream = processes.start("run-log", "flwr", "log", run_id, CONNECTION, "--stream", pipe=True)
        reader = threading.Thread(target=_echo_serverapp, args=(stream, echo), daemon=True)
        reader.start()
        while stream.poll() is None:  # the log stream ends with the run
            processes.check_running(but=stream)
            time.sleep(_POLL_S)
        reader.join(timeout=_STOP_S)
        run = json.loads(_flwr(env, "ls", CONNECTION, "--run-id", run_id, "--format", "json"))["runs"][0]
    if run["status"] != "finished:completed":
        raise TransportError(f"Flower run {run_id} ended {run['status']} ({run['status-details']}); "
                             f"the SuperLink's and SuperNodes' logs are in {flower / 'logs'}")


class _Processes:
    """Flower processes started for one run, each with its log file; on exit, each is stopped
    together with everything it started (Flower's SuperExec and app processes)."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.running: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> Self:
        return self

    def start(self, name: str, program: str, *args: str, pipe: bool = False) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("wb") as log_file:
            # A session of its own: Ctrl-C reaches only the launcher, which then stops them all.
            process = subprocess.Popen(
                [_executable(program), *args], env=self.env, stdin=subprocess.DEVNULL, start_new_session=True,
                stdout=subprocess.PIPE if pipe else log_file, stderr=subprocess.STDOUT, text=pipe,
            )
        self.running[name] = process
        return process

    def check_running(self, but: subprocess.Popen | None) -> None:
        for name, process in self.running.items():
            if process is not but and process.poll() is not None:
                raise TransportError(f"Flower's {name} exited with code {process.returncode}; see {self.logs / name}.log")

    def __exit__(self, *exc_info: object) -> None:
        tree = [member for process in self.running.values() for member in _with_descendants(process.pid)]
        # Then again for any process started while the first were stopping (the SuperExec
        # starts app processes): its parent's exit hands it to init, out of the tree, but it
        # carries this run's FLWR_HOME.
        for _ in range(_SWEEPS):
            if not tree:
                break
            _stop(tree)
            tree = _running_with_home(self.env["FLWR_HOME"])
        for process in self.running.values():
            process.wait()  # psutil reaped them; this only settles Popen's own bookkeeping


def _stop(processes: list[psutil.Process]) -> None:
    # All at once: waiting for each in turn adds up.
    for member in processes:
        _signal(member, psutil.Process.terminate)
    _, alive = psutil.wait_procs(processes, timeout=_STOP_S)
    for member in alive:
        log.warning("Flower process %d ignored SIGTERM; killing it", member.pid)
        _signal(member, psutil.Process.kill)
    psutil.wait_procs(alive, timeout=_STOP_S)


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


def _flwr(env: dict[str, str], *args: str) -> str:
    """A `flwr` command's standard output; a failed command raises TransportError with its messages."""
    try:
        done = subprocess.run([_executable("flwr"), *args], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=_STARTUP_S, check=False)
    except subprocess.TimeoutExpired as err:
        raise TransportError(f"flwr {' '.join(args)} did not answer within {_STARTUP_S:.0f} s") from err
    if done.returncode != 0:
        raise TransportError(f"flwr {' '.join(args)} failed ({done.returncode}): {(done.stdout + done.stderr).strip()[-2000:]}")
    return done.stdout


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


def _wait_until_up(address: str, processes: _Processes) -> None:
    deadline = time.monotonic() + _STARTUP_S
    while True:
        processes.check_running(but=None)
        try:
            with urllib.request.urlopen(f"http://{address}/health", timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TransportError(f"the SuperLink at {address} did not come up within {_STARTUP_S:.0f} s") from None
            time.sleep(_POLL_S)


def _echo_serverapp(stream: subprocess.Popen, echo: Callable[[str], None]) -> None:
    """Pass on the ServerApp's lines from the run's log stream, less flwr's own chatter."""
    for raw in stream.stdout:
        line = _COLOUR.sub("", raw).rstrip()
        if line and not _FLWR_LINE.match(line):
            echo(line)
