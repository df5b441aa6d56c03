"""`plora bench fleet`: what a simulated fleet costs as it grows, with the same work sampled.

It runs the flow the README gives, `plora fleet launch` (launch(): a backbone service on
loopback, the Flower simulation engine, synthetic personas), from nothing (an empty fleet
root, a registry of its own) for a small and a large fleet that sample the same number of
devices for one round. The two runs differ only in the devices declared and never sampled, so
the differences between them are what those devices cost: wall time per device never sampled,
and the ratio of peak memory. Peak memory is the largest sum of proportional set sizes (PSS)
over this process and every process it started (the SuperLink, Flower's, Ray's), sampled every
MEMORY_EVERY_S. PSS divides a page that n processes share among them, so the device half every
Ray worker memory-maps counts once, as the machine holds it; the sum of resident sizes (RSS),
which counts it once per worker, is kept beside it. Disk is what the fleet root holds: each
device's own folder, and the public store the devices share.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from plora.platform.fleet.launch import Progress, launch
from plora.platform.fleet.settings import PUBLIC_DIR, sampled_per_round

MEMORY_EVERY_S = 0.5
MB = 1e6


@dataclass
class FleetBench:
    runs: list[dict] = field(default_factory=list)
    figures: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"runs": self.runs, "figures": self.figures}


def run_fleet_bench(small: int, large: int, sampled: int, steps: int, backbone: str | None, echo: Callable[[str], None],
                    on_progress: Progress | None = None) -> FleetBench:
    bench = FleetBench()
    for devices in (small, large):
        echo(f"a fleet of {devices} devices, {sampled} sampled for one round of {steps} steps")
        bench.runs.append(_run(devices, sampled, steps, backbone, echo, on_progress))
    small_run, large_run = bench.runs
    per_device = [run["device_folder_mb"] for run in bench.runs]
    bench.figures = [
        {"figure": "disk per simulated device, its own folder (MB)", "value": max(per_device), "target": "<= 5",
         "detail": "the largest mean over the two runs' devices set up"},
        {"figure": f"disk of the {large}-device fleet / devices declared (MB)", "value": large_run["disk_mb"] / large,
         "target": "<= 5", "detail": f"{large_run['disk_mb']:.0f} MB in all, the public store {large_run['public_mb']:.0f} MB"},
        {"figure": f"{large}-device fleet, 1 round, {sampled} sampled, {steps} steps each (min)",
         "value": large_run["seconds"] / 60, "target": "<= 15", "detail": f"{os.cpu_count()} cores"},
        {"figure": f"peak memory (PSS), {large} devices / {small} devices", "value": large_run["peak_mb"] / small_run["peak_mb"],
         "target": "<= 1.1", "detail": f"{large_run['peak_mb']:.0f} MB / {small_run['peak_mb']:.0f} MB; the RSS sums', which count "
                                       f"shared pages once per process: {large_run['peak_rss_mb'] / small_run['peak_rss_mb']:.2f}"},
        {"figure": "set-up per device never sampled (ms)",
         "value": max(0.0, large_run["seconds"] - small_run["seconds"]) / (large - small) * 1000, "target": "<= 50",
         "detail": f"the runs' wall-time difference, {large_run['seconds']:.0f} s - {small_run['seconds']:.0f} s, "
                   f"over the {large - small} devices only the large fleet declares"},
    ]
    return bench


def _run(devices: int, sampled: int, steps: int, backbone: str | None, echo: Callable[[str], None],
         on_progress: Progress | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="plora-bench-fleet-") as scratch, registry_of_its_own(Path(scratch)):
        root = Path(scratch) / "fleet"
        with _peak_memory() as peak:
            started = time.perf_counter()
            rows = launch(devices, 1, backbone=backbone, root=root, steps=steps, fraction=sampled / devices, echo=echo,
                          on_progress=on_progress)
            seconds = time.perf_counter() - started
        folders = sorted(root.glob("device-*"))
        device_mb = [_size(folder) / MB for folder in folders]
        return {"devices": devices, "sampled": sampled_per_round(devices, sampled / devices), "steps": steps,
                "seconds": seconds, "peak_mb": peak.pss / MB, "peak_rss_mb": peak.rss / MB,
                "peak_mb_by_process": {kind: pss / MB for kind, pss in sorted(peak.pss_by_kind.items(), key=lambda kv: -kv[1])},
                "disk_mb": _size(root) / MB,
                "public_mb": _size(root / PUBLIC_DIR) / MB, "devices_set_up": len(folders),
                "device_folder_mb": sum(device_mb) / len(device_mb) if device_mb else 0.0,
                "failed": sum(row["failed"] for row in rows), "rows": rows}


@contextmanager
def registry_of_its_own(scratch: Path) -> Iterator[None]:
    """A bench's devices, versions and jobs go to a registry in `scratch`, not the user's;
    Flower's processes, which record the jobs, inherit it."""
    kept = os.environ.get("PLORA_DB_URL")
    os.environ["PLORA_DB_URL"] = f"sqlite:///{scratch / 'registry.sqlite'}"
    try:
        yield
    finally:
        if kept is None:
            os.environ.pop("PLORA_DB_URL")
        else:
            os.environ["PLORA_DB_URL"] = kept


@dataclass
class MemoryPeak:
    """The peak of memory summed over a process tree: by PSS, with each kind of process's share
    and the RSS sum at that moment (bytes)."""
    pss: int = 0
    rss: int = 0
    pss_by_kind: dict[str, int] = field(default_factory=dict)


@contextmanager
def _peak_memory() -> Iterator[MemoryPeak]:
    """Within the block, the peak of memory summed over this process and its descendants."""
    me, peak, stop = psutil.Process(), MemoryPeak(), threading.Event()

    def sample() -> MemoryPeak:
        now = MemoryPeak()
        for process in [me, *me.children(recursive=True)]:
            try:
                kind = "this process" if process.pid == me.pid else _kind(process)
                memory = process.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            now.pss += memory.pss
            now.rss += memory.rss
            now.pss_by_kind[kind] = now.pss_by_kind.get(kind, 0) + memory.pss
        return now

    def watch() -> None:
        while not stop.wait(MEMORY_EVERY_S):
            now = sample()
            if now.pss > peak.pss:
                peak.pss, peak.rss, peak.pss_by_kind = now.pss, now.rss, now.pss_by_kind

    watcher = threading.Thread(target=watch, name="bench-memory", daemon=True)
    watcher.start()
    try:
        yield peak
    finally:
        stop.set()
        watcher.join()


def _kind(process: psutil.Process) -> str:
    """A process's kind, by its program and the plora or Flower part it runs."""
    words = [Path(word).name for word in process.cmdline()[:4]]
    named = [word for word in words if word.startswith(("flower-", "flwr", "default_worker", "raylet", "gcs_server"))]
    return named[0] if named else (words[1] if len(words) > 1 and words[0].startswith("python") else words[0] if words else "?")


def _size(folder: Path) -> int:
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file() and not path.is_symlink())
