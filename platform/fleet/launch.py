"""Launching a fleet: a backbone service unless one is given, then the Flower apps over it.

The simulation engine runs the ServerApp in this process and each device's ClientApp in a
pool of Ray worker processes; the deployment engine runs the same apps in Flower's own
processes, a SuperLink and one SuperNode per device (see deployment.py). All traffic stays on
loopback: the devices reach the backbone service over gRPC on 127.0.0.1, and Flower's messages
never leave the machine. Either way each device reports its training steps in a progress file
of its folder, which the launcher shows while the rounds run.

How the settings reach the apps: `flwr.simulation.run_simulation` takes no run config (both
apps see an empty `context.run_config`), so launch writes it as JSON to
$PLORA_FLEET_RUN_CONFIG before Ray starts, Ray's workers inherit it, and
`FleetSettings.from_run_config` reads it under whatever run config Flower does pass.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from plora.cloud_backbone.privatelora import PrivateLoRAConfig
from plora.cloud_backbone.server import start_service
from plora.platform.versions import migration
from plora.platform.fleet import task
from plora.platform.fleet.deployment import run_deployment
from plora.storage.registry import open_registry
from plora.platform.runtime import is_address
from plora.storage.errors import ConfigError, TransportError
from plora.storage.models import utcnow

# flwr reads these when first imported and Ray when it starts; nothing of this module has
# imported flwr yet, and both are imported only in _simulate, after this. Flower's processes
# in deployment inherit them.
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
os.environ.update(OFFLINE_ENV)

ENGINES = ("simulation", "deployment")
# What a device is doing, as its progress file says: (device, phase, step, total, loss); the
# last three are None while it is in a phase without training steps.
DeviceProgress = Callable[[str, str, int | None, int | None, float | None], None]
# How long a run's enrollment token lasts if the launcher dies before revoking it.
ENROLLMENT_VALID = timedelta(days=1)
PROGRESS_EVERY_S = 3.0
RAY_STARTS = 2  # Ray gives its node a fixed 30 s to come up, which a busy small machine can miss
log = logging.getLogger(__name__)


def launch(
    devices: int,
    rounds: int,
    data: str = task.PERSONAS,
    backbone: str | None = None,
    root: Path = Path("fleet"),
    engine: str = "simulation",
    steps: int = 10,
    lr: float = 1e-2,
    fraction: float = 1.0,
    echo: Callable[[str], None] = lambda line: None,
    config: PrivateLoRAConfig | None = None,
    concurrency: int | None = None,
    on_device: DeviceProgress | None = None,
) -> list[dict]:
    """Run `rounds` personalization rounds on `devices` devices; returns one summary per device.

    `backbone` is HOST:PORT of a running service, or a local backbone spec ("embedded", a
    checkpoint folder) to serve on a free loopback port for the length of the run (None means
    "embedded"), with adapter `config`. `concurrency` caps the devices that train at once in
    simulation; in deployment every SuperNode trains as soon as it is asked.

    Devices not yet enrolled enroll with a token issued for the run in this process's
    registry, which a service given as HOST:PORT must share; it is revoked when the run ends.
    Each device's progress goes to `on_device`, or else to `echo` as a line.
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "deployment" and concurrency is not None:
        raise ConfigError("concurrency applies to the simulation engine; in deployment every SuperNode trains at once")
    if data != task.PERSONAS:
        if not Path(data).is_file():
            raise ConfigError(f"--data must be 'personas' or an existing JSONL file, got {data!r}")
        data = str(Path(data).resolve())  # Ray's workers need not share this working directory
    root = Path(root).resolve()
    reg, service = open_registry(), None
    if backbone is None or not is_address(backbone):
        service = start_service([backbone or "embedded"], config or PrivateLoRAConfig(), reg)
        backbone = f"127.0.0.1:{service.port}"
        echo(f"backbone service started on {backbone}")
    enrollment, token = reg.issue_enrollment_token(devices, utcnow() + ENROLLMENT_VALID, label="plora fleet launch")
    try:
        settings = task.FleetSettings(root, backbone, data, devices, rounds, steps, lr, fraction=fraction, enroll_token=token)
        _run(settings, engine, concurrency, echo, on_device or echo_progress(echo))
    finally:
        reg.revoke_enrollment_token(enrollment.id)
        if service is not None:
            service.stop(grace_s=1)
    return summarize(read_rounds(root))


def launch_migration(
    root: Path,
    target: str,
    method: str = "distill",
    engine: str = "simulation",
    backbone: str | None = None,
    steps: int = 40,
    lr: float = 1e-2,
    echo: Callable[[str], None] = lambda line: None,
    on_device: DeviceProgress | None = None,
) -> list[dict]:
    """Migrate every device of the fleet at `root` to version `target`, each on its own device,
    orchestrated by Flower; returns one line per device (as in migrations.jsonl).

    `backbone` is HOST:PORT of a service hosting the devices' versions and the target; by
    default one is started on loopback for the run."""
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {ENGINES}, got {engine!r}")
    root = Path(root).resolve()
    folders = migration.device_folders(root)
    if folders != [task.device_dir(root, i) for i in range(len(folders))]:
        raise ConfigError(f"{root} is not a fleet's root (device-000, device-001, ...); migrate its devices one by one instead")
    reg = open_registry()
    with migration.service_for(folders, target, reg, backbone) as address:
        if address is None:
            raise ConfigError(f"the devices under {root} use a local backbone; migrate them one by one instead")
        echo(f"migrating {len(folders)} devices to {reg.get_backbone(target).name} by {method} through {address}")
        settings = task.FleetSettings(root, address, devices=len(folders), steps=steps, lr=lr,
                                      migrate_to=reg.get_backbone(target).name, migrate_method=method)
        _run(settings, engine, None, echo, on_device or echo_progress(echo))
    path = root / task.MIGRATIONS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _run(settings: task.FleetSettings, engine: str, concurrency: int | None, echo: Callable[[str], None],
         on_device: DeviceProgress) -> None:
    with _progress_to(echo), _device_progress(settings.fleet_root, on_device):
        if engine == "simulation":
            _simulate(settings, concurrency or min(settings.devices, max(2, os.cpu_count() or 2)))
        else:
            run_deployment(settings, echo)


def _simulate(settings: task.FleetSettings, concurrency: int) -> None:
    import ray
    from flwr.simulation import run_simulation
    from plora.platform.fleet import client_app, server_app

    if ray.is_initialized():
        raise ConfigError("Ray is already running in this process; the fleet needs to start it, so its workers get the run config")
    # One CPU per device and `concurrency` logical CPUs (see _start_ray): that many devices train at once.
    backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    previous = os.environ.get(task.RUN_CONFIG_ENV)
    os.environ[task.RUN_CONFIG_ENV] = json.dumps(settings.to_run_config())
    server_app.stop_requested.clear()
    try:
        _start_ray(concurrency)  # Flower's Ray backend uses a running Ray, and shuts it down at the end
        run_simulation(server_app=server_app.app, client_app=client_app.app, num_supernodes=settings.devices,
                       backend_config=backend_config)
    finally:
        ray.shutdown()  # for a run that failed before Flower took Ray over; a no-op otherwise
        server_app.stop_requested.set()  # its thread outlives a crashed runtime otherwise
        if previous is None:
            os.environ.pop(task.RUN_CONFIG_ENV, None)
        else:
            os.environ[task.RUN_CONFIG_ENV] = previous


def _start_ray(num_cpus: int) -> None:
    """Start Ray for a simulation as Flower's Ray backend would, and once more if its node
    misses Ray's start-up wait."""
    import ray

    # Flower passes its own sys.path to Ray's workers, so that they import the apps as it does.
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    for attempt in range(1, RAY_STARTS + 1):
        try:
            ray.init(num_cpus=num_cpus, num_gpus=0, include_dashboard=False, logging_level="WARNING",
                     runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
            return
        except Exception as err:  # a plain Exception is what Ray raises when its node is late
            ray.shutdown()  # the part of Ray that did start
            if attempt == RAY_STARTS or "timed out during startup" not in str(err):
                raise TransportError(f"Ray did not start: {err}") from err
            log.warning("Ray's node did not come up within Ray's start-up wait; starting Ray once more")


@contextmanager
def _progress_to(echo: Callable[[str], None]) -> Iterator[None]:
    """Pass the orchestrator's per-round log lines to `echo` while the fleet runs.

    Neither those lines nor flwr's (which has its own console handler) go on to the root
    logger meanwhile: through a handler the CLI installed there, each would show twice."""

    class Echo(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            echo(record.getMessage())

    ours, flwr = logging.getLogger("plora.platform.fleet.server_app"), logging.getLogger("flwr")
    handler, saved = Echo(logging.INFO), (ours.level, ours.propagate, flwr.propagate)
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = flwr.propagate = False
    try:
        yield
    finally:
        ours.removeHandler(handler)
        ours.setLevel(saved[0])
        ours.propagate, flwr.propagate = saved[1:]


def echo_progress(echo: Callable[[str], None]) -> DeviceProgress:
    """Device progress as plain lines, for callers that show no live board."""

    def show(device: str, phase: str, step: int | None, total: int | None, loss: float | None) -> None:
        echo(f"{device} {phase}" if step is None else f"{device} {phase} step {step}/{total} loss {loss:.3f}")

    return show


@contextmanager
def _device_progress(root: Path, on_device: DeviceProgress) -> Iterator[None]:
    """Pass each device's latest phase or training step to `on_device` every PROGRESS_EVERY_S
    while the fleet runs, and once more at the end, so that every device's last step is shown."""
    shown = _progress_files(root)  # progress file -> modification time shown; these are a previous run's

    def show_news() -> None:
        for path, modified in _progress_files(root).items():
            if shown.get(path) != modified:
                shown[path] = modified
                progress = json.loads(path.read_text())
                on_device(path.parent.name, progress["what"], progress["step"], progress["steps"], progress["loss"])

    def watch() -> None:
        while not stop.wait(PROGRESS_EVERY_S):
            show_news()

    stop = threading.Event()
    watcher = threading.Thread(target=watch, name="fleet-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        show_news()


def _progress_files(root: Path) -> dict[Path, int]:
    # Devices replace their file atomically, never remove it: a file found is whole and stays.
    return {path: path.stat().st_mtime_ns for path in sorted(root.glob(f"device-*/{task.PROGRESS_FILE}"))}


def read_rounds(root: Path) -> list[dict]:
    path = Path(root) / task.ROUNDS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _label(line: dict) -> str:
    pid = line["partition_id"]
    return f"device-{pid:03d}" if pid is not None else f"node-{line['node_id']}"


def summarize(lines: list[dict]) -> list[dict]:
    """One row per device: baseline and last evaluation, training losses, traffic and failures."""
    by_device: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        by_device[_label(line)].append(line)
    rows = []
    for device, history in sorted(by_device.items()):
        baseline = next((line["evaluate"] for line in history if line["round"] == 0), {})
        rounds = [line for line in history if line["round"] > 0]
        ok = [line for line in rounds if not line["failed"]]
        first, last = (ok[0], ok[-1]) if ok else ({"train": {}}, {"train": {}, "evaluate": {}})
        rows.append({
            "device": device,
            "rounds": len(ok),
            "failed": len(rounds) - len(ok),
            "errors": sorted({kind for line in history for kind in line["errors"].values()}),
            "loss_before": first["train"].get("loss_before"),
            "loss_after": last["train"].get("loss_after"),
            "heldout_loss_before": baseline.get("heldout_loss"),
            "heldout_loss": last["evaluate"].get("heldout_loss"),
            "recall_before": baseline.get("recall"),
            "recall": last["evaluate"].get("recall"),
            "tokens_per_second": last["train"].get("tokens_per_second"),
            "bytes_exchanged": sum(line["train"].get("bytes_exchanged", 0) for line in history),
        })
    return rows


def table(rows: list[dict]) -> str:
    def num(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    header = (f"{'device':<12} {'rounds':>6} {'failed':>6} {'recall before':>13} {'recall after':>12} "
              f"{'held-out loss before':>20} {'after':>6} {'train tok/s':>11} {'MB exchanged':>12}")
    body = [
        f"{r['device']:<12} {r['rounds']:>6} {r['failed']:>6} {num(r['recall_before'], '.0%'):>13} {num(r['recall'], '.0%'):>12} "
        f"{num(r['heldout_loss_before'], '.3f'):>20} {num(r['heldout_loss'], '.3f'):>6} "
        f"{num(r['tokens_per_second'], '.0f'):>11} {r['bytes_exchanged'] / 1e6:>12.1f}"
        for r in rows
    ]
    return "\n".join([header, "-" * len(header), *body])
