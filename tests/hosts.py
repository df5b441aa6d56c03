"""Hosts on one machine, for the tests that give the operator and each device a host of its own.

As root (as in CI), each host is a network namespace that the test creates. The operator's holds
a bridge at 198.18.0.1 (the benchmarking range, 198.18.0.0/15), and every other host joins it by
a veth pair, at 198.18.0.(10 + i): traffic never leaves the namespaces the test created.
Network namespaces do not isolate files, so each host's processes also run in a private mount
namespace, in which every host's folder is hidden but their own, and theirs is at one path
(`Hosts.home`) on every host. Everything is removed at the end: processes, namespaces, folders.

Without root, or with PLORA_TEST_HOSTS=loopback, hosts are processes on loopback with folders
of their own (their files then isolated only as root), so the same tests run there too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HOSTS_ENV = "PLORA_TEST_HOSTS"
LOOPBACK = "loopback"
"""$PLORA_TEST_HOSTS: hosts on loopback, even as root."""
NETWORK = "198.18.0"
_HIDE_OTHER_HOSTS = 'mount --bind "$1" "$2" && mount -t tmpfs -o mode=711 hosts "$3" && shift 3 && exec "$@"'


@dataclass
class Host:
    name: str
    address: str
    """Where the other hosts reach this one."""
    folder: Path
    """The host's files, as the test sees them."""
    home: Path
    """The same files, as the host's own processes see them."""
    prefix: list[str] = field(default_factory=list)
    """Runs a command on this host."""
    namespace: str | None = None
    started: list[subprocess.Popen] = field(default_factory=list)

    @property
    def network_prefix(self) -> list[str]:
        """Runs a command on this host's network, with every host's files in sight."""
        return ["ip", "netns", "exec", self.namespace] if self.namespace else []

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment with the host's own home: plora's files (PLORA_HOME, its
        local registry) are the host's, as on a machine of its own."""
        inherited = {name: value for name, value in os.environ.items() if name != "PLORA_DB_URL"}
        return {**inherited, "HOME": str(self.home), "PLORA_HOME": str(self.home / ".plora"), **extra}

    def popen(self, args: list[str], log: Path, **env: str) -> subprocess.Popen:
        with log.open("w") as sink:
            process = subprocess.Popen([*self.prefix, *args], stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=self.env(**env))
        self.started.append(process)
        return process

    def run(self, args: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, *args], capture_output=True, text=True, env=self.env(**env), timeout=timeout)

    def run_beside(self, process: subprocess.Popen, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        """Runs a command where `process`, one this host started, runs: in its network and mount
        namespaces, which the processes it starts in turn share, so it sees the files they see."""
        beside = ["nsenter", f"--target={process.pid}", "--mount", "--net"] if self.prefix else []
        return subprocess.run([*beside, *args], capture_output=True, text=True, env=self.env(), timeout=timeout)


@dataclass
class Hosts:
    operator: Host
    devices: list[Host]
    namespaces: bool
    """Each host a network namespace of its own (else: all on loopback)."""
    isolated: bool
    """Each host's processes see only their own host's folder."""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def emulated_hosts(devices: int) -> Iterator[Hosts]:
    """An operator's host and `devices` device hosts, each with an empty folder of its own."""
    root = os.geteuid() == 0
    namespaces = root and os.environ.get(HOSTS_ENV) != LOOPBACK
    # Not under pytest's tmp_path, which is owner-only: PostgreSQL's own user passes through here.
    base = Path(tempfile.mkdtemp(prefix="plora-hosts-"))
    base.chmod(0o711)
    (base / "hosts").mkdir(mode=0o711)
    (base / "home").mkdir(mode=0o711)
    tag = uuid.uuid4().hex[:6]
    made: list[str] = []
    hosts: list[Host] = []
    try:
        for i, name in enumerate(["operator", *(f"device-{k}" for k in range(devices))]):
            folder = base / "hosts" / name
            folder.mkdir(mode=0o711)
            host = Host(name, "127.0.0.1", folder, folder)
            if namespaces:
                host.namespace = f"plora-{tag}-{i}"
                _ip("netns", "add", host.namespace)
                made.append(host.namespace)
                _ip("-n", host.namespace, "link", "set", "lo", "up")
                host.address = f"{NETWORK}.{1 if i == 0 else 10 + i}"
                host.prefix = host.network_prefix
                if i == 0:
                    _ip("-n", host.namespace, "link", "add", "hub", "type", "bridge")
                    _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "hub")
                    _ip("-n", host.namespace, "link", "set", "hub", "up")
                else:
                    hub = hosts[0].namespace
                    _ip("link", "add", f"to-{i}", "netns", hub, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
                    _ip("-n", hub, "link", "set", f"to-{i}", "master", "hub", "up")
                    _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
                    _ip("-n", host.namespace, "link", "set", "eth0", "up")
            if root:
                host.home = base / "home"
                host.prefix += ["unshare", "--mount", "--propagation", "private", "sh", "-c", _HIDE_OTHER_HOSTS, "sh",
                                str(folder), str(host.home), str(base / "hosts")]
            hosts.append(host)
        yield Hosts(hosts[0], hosts[1:], namespaces, isolated=root)
    finally:
        _stop_processes_of(hosts)
        for namespace in made:
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, timeout=30)
        shutil.rmtree(base, ignore_errors=True)


def _stop_processes_of(hosts: list[Host]) -> None:
    """Kill what still runs on the hosts: what they started, their descendants, and anything in
    their namespaces; all at once, then wait for all of them, which took seconds a host."""
    doomed = []
    for host in hosts:
        for process in host.started:
            with contextlib.suppress(psutil.NoSuchProcess):
                parent = psutil.Process(process.pid)
                doomed += [parent, *parent.children(recursive=True)]
        if host.namespace:
            found = subprocess.run(["ip", "netns", "pids", host.namespace], capture_output=True, text=True, timeout=30)
            for pid in found.stdout.split():
                with contextlib.suppress(psutil.NoSuchProcess):
                    doomed.append(psutil.Process(int(pid)))
    for process in doomed:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(doomed, timeout=30)
    for host in hosts:
        for process in host.started:
            process.wait(30)
