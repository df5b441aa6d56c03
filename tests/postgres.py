"""A throwaway PostgreSQL server for the registry tests, started by the test run itself.

The binaries are the pip package pgserver's (in the `test` extra), so no system PostgreSQL
is needed. The server listens on 127.0.0.1 on a free port, trusts every local connection and
keeps its data in a temporary folder. It is stopped and its folder deleted at the end; if the
test process dies first, the kernel stops it (the folder then stays behind in /tmp).
PostgreSQL refuses to run as root; under root (as in CI) it runs as the user `nobody`.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

SUPERUSER = "plora"
DATABASE = "postgres"
UNPRIVILEGED_USER = "nobody"
TIMEOUT_S = 60
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Durability is pointless for data deleted at the end, and fsync is the slow part of both
# initdb and every commit on a loaded machine.
SERVER_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class PostgresServerError(RuntimeError):
    """The throwaway server could not be set up or started."""


def _pgserver_installation() -> Path:
    # Located without importing pgserver: its import touches a per-user runtime folder and
    # warns when XDG_RUNTIME_DIR is unset; only its binaries are needed.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresServerError(
            "the registry tests need a PostgreSQL server and the pgserver package that provides one is not "
            "installed; run `pip install -e '.[test]'`, or set PLORA_TEST_POSTGRES_URL to a throwaway database"
        )
    return Path(spec.submodule_search_locations[0]) / "pginstall"


def _run_as() -> dict:
    """subprocess.run's arguments that drop root to an unprivileged user; none otherwise."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise PostgresServerError(
            f"PostgreSQL refuses to run as root and there is no {UNPRIVILEGED_USER!r} user to run it as; "
            f"create one (useradd {UNPRIVILEGED_USER}) or set PLORA_TEST_POSTGRES_URL"
        ) from None
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def binaries_in(folder: Path) -> Path:
    """The folder of PostgreSQL's programs (initdb, postgres), for a server run as this process's
    user or, under root, as UNPRIVILEGED_USER.

    The unprivileged user may not be able to reach the installed package (under /root, say), so
    it gets a copy in `folder`, laid out as in site-packages: the binaries find the wheel's
    bundled libraries by relative path. `folder` must be one that user can pass through."""
    installation = _pgserver_installation()
    if not _run_as():
        return installation / "bin"
    copy = folder / "pgserver" / "pginstall"
    for part in ("bin", "lib", "share"):
        shutil.copytree(installation / part, copy / part, symlinks=True)
    bundled_libraries = installation.parents[1] / "pgserver.libs"
    if bundled_libraries.is_dir():
        shutil.copytree(bundled_libraries, folder / bundled_libraries.name, symlinks=True)
    return copy / "bin"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_this_process() -> Callable[[], None] | None:
    """A preexec_fn that has the kernel stop the server when the test process dies.

    The fixture's teardown does not run when the run is killed, e.g. by pytest-timeout's
    thread method, which ends the process on a hang; the server must not outlive it.
    """
    if sys.platform != "linux":
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    # Runs in the child after it dropped root: a change of user clears the setting.
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGQUIT)


def _initdb(binaries: Path, data: Path, folder: Path, run_as: dict) -> None:
    command = [binaries / "initdb", "-D", data, "-U", SUPERUSER, "--auth=trust", "--no-sync", "--encoding=UTF8",
               "--locale=C", "--no-instructions"]
    try:
        subprocess.run(command, cwd=folder, check=True, capture_output=True, text=True, timeout=TIMEOUT_S, **run_as)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        raise PostgresServerError(f"initdb failed ({error}): {error.stdout or ''}{error.stderr or ''}") from None


def _wait_until_ready(server: subprocess.Popen, data: Path, log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise PostgresServerError(f"the server exited with status {server.returncode}; its log:\n{log.read_text()}")
        with contextlib.suppress(FileNotFoundError):
            # The postmaster writes its state, space-padded, on the eighth line of its lock file.
            if [line.strip() for line in (data / "postmaster.pid").read_text().splitlines()[7:8]] == ["ready"]:
                return
        time.sleep(0.05)
    raise PostgresServerError(f"the server was not ready after {TIMEOUT_S} s; its log:\n{log.read_text()}")


@contextlib.contextmanager
def throwaway_server() -> Iterator[str]:
    """Start a PostgreSQL server, yield its SQLAlchemy URL, then stop it and delete its files."""
    run_as = _run_as()
    folder = Path(tempfile.mkdtemp(prefix="plora-postgres-"))
    data, log = folder / "data", folder / "server.log"
    try:
        binaries = binaries_in(folder)
        if run_as:
            os.chown(folder, run_as["user"], run_as["group"])
        _initdb(binaries, data, folder, run_as)
        port = _free_port()
        settings = {**SERVER_SETTINGS, "listen_addresses": "127.0.0.1", "port": str(port), "unix_socket_directories": str(data)}
        command = [binaries / "postgres", "-D", data, *(f"--{name}={value}" for name, value in settings.items())]
        with open(log, "w") as log_file:
            server = subprocess.Popen(command, cwd=folder, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                      preexec_fn=_die_with_this_process(), **run_as)
        try:
            _wait_until_ready(server, data, log)
            yield f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}"
        finally:
            # Immediate shutdown: the data is deleted next, so a clean checkpoint is wasted time.
            server.send_signal(signal.SIGQUIT)
            try:
                server.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
