"""Soak: many sessions of several enrolled devices decode and train against a real
`plora backbone serve` process; no step fails and the service's memory returns to zero.

CI runs 32 sessions (8 devices in 4 device processes) on the tiny model for 10 s, in which each
session decodes and trains at least once.
`make soak` runs the embedded model for 10 minutes: PLORA_SOAK_BACKBONE=embedded,
PLORA_SOAK_SECONDS=600. The figures (p50/p99 step latency, the service's RSS growth from
minute 1, or a third of a shorter run, to the end) are logged, and written as JSON to $PLORA_SOAK_REPORT if set.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from plora.clients.grpc_link import Endpoint
from plora.storage.registry import open_registry
from plora.platform.runtime import init_device
from tests.conftest import REPO
from tests.service_process import TINY_ADAPTER, ServeProcess

# Runs in one xdist worker with the other tests that start many processes (see the Makefile).
pytestmark = pytest.mark.xdist_group("processes")

log = logging.getLogger(__name__)

SECONDS = float(os.environ.get("PLORA_SOAK_SECONDS", "10"))
DEVICES, PROCESSES, SESSIONS_PER_DEVICE = 8, 4, 4
RSS_FROM_S = min(60.0, SECONDS / 3)
"""When the service's RSS is first read: after a warm-up, so that growth means a leak."""


def test_many_sessions_decode_and_train_without_a_single_error(tmp_path, request):
    backbone = os.environ.get("PLORA_SOAK_BACKBONE") or str(request.getfixturevalue("tiny_checkpoint"))
    tiny = os.environ.get("PLORA_SOAK_BACKBONE") is None
    service = ServeProcess(backbone, tmp_path / "serve.log", *(TINY_ADAPTER if tiny else ())).wait_until_listening()
    try:
        endpoint = Endpoint(service.address, insecure=True)
        _, token = open_registry().issue_enrollment_token(uses=DEVICES)
        folders = [tmp_path / f"device-{i}" for i in range(DEVICES)]
        for folder in folders:
            init_device(folder, endpoint.address, endpoint=endpoint, enroll_token=token)
        per_process = DEVICES // PROCESSES
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "tests.soak_device", str(SECONDS), *map(str, folders[p * per_process : (p + 1) * per_process]),
                 "--sessions", str(SESSIONS_PER_DEVICE)],
                cwd=REPO, stdout=subprocess.PIPE, text=True,
            )
            for p in range(PROCESSES)
        ]
        time.sleep(RSS_FROM_S)
        rss_early = psutil.Process(service.process.pid).memory_info().rss
        reports = [json.loads(w.communicate(timeout=SECONDS + 300)[0]) for w in workers]
        rss_late = psutil.Process(service.process.pid).memory_info().rss
        errors = [e for r in reports for e in r["errors"]]
        latencies = sorted(x for r in reports for x in r["latencies"])
        figures = {
            "sessions": sum(r["sessions"] for r in reports),
            "steps": len(latencies),
            "p50_step_s": statistics.median(latencies),
            "p99_step_s": latencies[int(0.99 * (len(latencies) - 1))],
            "rss_growth": rss_late / rss_early - 1,
            "rss_from_s": RSS_FROM_S,
            "errors": len(errors),
        }
        log.warning("soak figures: %s", figures)
        if os.environ.get("PLORA_SOAK_REPORT"):
            Path(os.environ["PLORA_SOAK_REPORT"]).write_text(json.dumps(figures, indent=2))
        assert figures["sessions"] == DEVICES * SESSIONS_PER_DEVICE and figures["steps"] > figures["sessions"]
        assert errors == []
        deadline = time.monotonic() + 5
        while not service.idle() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert service.idle(), service.metrics()
    finally:
        service.stop()
