"""A throwaway PostgreSQL server for the registry tests, started by the test run itself.

The binaries are the pip package pgserver's (in the `test` extra), so no system PostgreSQL
is needed. The server listens on 127.0.0.1 on a free port, trusts every local connection,
keeps its data in a temporary folder, and is stopped and deleted at the end. PostgreSQL
refuses to run as root; under root (as in CI) it runs as the user `nobody`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

SUPERUSER = "plora"
DATABASE = "postgres"
UNPRIVILEGED_USER = "nobody"
COMMAND_TIMEOUT_S = 60
# Durability is pointless for data deleted at the end, and fsync is the slow part of both
# initdb and every commit on a loaded machine.
SERVER_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class PostgresServerError(RuntimeError):
    """The throwaway server could not be set up, started or stopped."""


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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(command: list, folder: Path, run_as: dict, log: Path | None = None) -> None:
    try:
        subprocess.run(command, cwd=folder, check=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, **run_as)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        outcome = f"ran past {COMMAND_TIMEOUT_S} s" if isinstance(error, subprocess.TimeoutExpired) else f"exited with status {error.returncode}"
        server_log = log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else "(none)"
        raise PostgresServerError(
            f"{' '.join(map(str, command))} {outcome}\nits output: {error.stdout or ''}{error.stderr or ''}\nserver log: {server_log}"
        ) from None


def _stop(binaries: Path, data: Path, folder: Path, run_as: dict) -> None:
    if (data / "postmaster.pid").exists():
        # Immediate: the data is deleted next, so a clean shutdown's checkpoint is wasted time.
        _run([binaries / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"], folder, run_as)


@contextlib.contextmanager
def throwaway_server() -> Iterator[str]:
    """Start a PostgreSQL server, yield its SQLAlchemy URL, then stop it and delete its files."""
    installation = _pgserver_installation()
    run_as = _run_as()
    folder = Path(tempfile.mkdtemp(prefix="plora-postgres-"))
    data, log = folder / "data", folder / "data" / "server.log"
    binaries = installation / "bin"
    try:
        if run_as:
            # The unprivileged user may not be able to reach the installed package (under
            # /root, say), so it gets a copy in a folder of its own, laid out as in
            # site-packages: the binaries find the wheel's bundled libraries by relative path.
            copy = folder / "pgserver" / "pginstall"
            for part in ("bin", "lib", "share"):
                shutil.copytree(installation / part, copy / part, symlinks=True)
            bundled_libraries = installation.parents[1] / "pgserver.libs"
            if bundled_libraries.is_dir():
                shutil.copytree(bundled_libraries, folder / bundled_libraries.name, symlinks=True)
            binaries = copy / "bin"
            os.chown(folder, run_as["user"], run_as["group"])
        _run([binaries / "initdb", "-D", data, "-U", SUPERUSER, "--auth=trust", "--no-sync", "--encoding=UTF8",
              "--locale=C", "--no-instructions"], folder, run_as)
        port = _free_port()
        settings = {**SERVER_SETTINGS, "listen_addresses": "'127.0.0.1'", "port": str(port),
                    "unix_socket_directories": f"'{data}'"}
        with open(data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        try:
            _run([binaries / "pg_ctl", "-D", data, "-l", log, "-w", "-t", str(COMMAND_TIMEOUT_S), "start"], folder, run_as, log)
            yield f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}"
        finally:
            _stop(binaries, data, folder, run_as)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
