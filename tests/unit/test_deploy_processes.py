"""deploy/processes.sh, which the deploy scripts source: whatever they started is gone when they end."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psutil

PROCESSES_SH = Path(__file__).resolve().parents[2] / "deploy" / "processes.sh"


def _end_a_script_that_started(command: str, tmp_path: Path, grace_s: int) -> tuple[subprocess.CompletedProcess, float]:
    script = f"""set -euo pipefail
source {PROCESSES_SH}
{command} &
pids+=($!)
until [[ -s {tmp_path}/started ]]; do sleep 0.05; done
exit 1
"""
    started = time.monotonic()
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "STOP_GRACE_S": str(grace_s)})
    return done, time.monotonic() - started


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_process_that_ignores_its_stop_signal_is_killed_with_its_children_after_the_grace(tmp_path):
    # The script waited for ever on a process that would not stop.
    stubborn = f"""bash -c 'trap "" TERM; sleep 600 & echo $$ $! >{tmp_path}/started; wait'"""
    done, took_s = _end_a_script_that_started(stubborn, tmp_path, grace_s=2)
    # bash's SECONDS counts whole seconds, so a grace of 2 may end after 1.
    assert done.returncode == 1 and 1 <= took_s < 20, (took_s, done.stderr)
    assert "did not stop within 2 s of its stop signal; killing it and its children" in done.stderr
    assert all(_gone(int(pid)) for pid in (tmp_path / "started").read_text().split())


def test_a_process_that_stops_on_its_signal_ends_the_script_at_once(tmp_path):
    done, took_s = _end_a_script_that_started(f"bash -c 'echo $$ >{tmp_path}/started; exec sleep 600'", tmp_path, grace_s=30)
    assert done.returncode == 1 and took_s < 10, (took_s, done.stderr)
    assert "did not stop" not in done.stderr
