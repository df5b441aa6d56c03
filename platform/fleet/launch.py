"""Launching a fleet: a backbone service unless one is given, then the Flower apps over it.

Either engine runs the apps in Flower's own processes, through `flwr run` against a SuperLink
on loopback that the launcher starts and stops (see superlink.py): in simulation every device's
ClientApp runs in a pool of Ray worker processes, in deployment each device has a SuperNode.
The run's settings reach the apps as the Flower App's run config, and only so. All traffic stays
on loopback: the devices reach the backbone service over gRPC on 127.0.0.1, and Flower's messages
never leave the machine. Either way each device reports its training steps in a progress file
of its folder, which the launcher passes on while the rounds run.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from plora.clients.migration import DistillSettings
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.server import start_service
from plora.platform.fleet.settings import (
    BASELINE,
    FAILED,
    FEDAVG,
    FEDERATION_FILE,
    MIGRATIONS_FILE,
    PERSONAS,
    PROGRESS_FILE,
    ROUNDS_FILE,
    TRAINED,
    WAITING,
    FleetSettings,
    device_name,
    partition_of,
    sampled_per_round,
)
from plora.platform.fleet.superlink import check_engine, run_app
from plora.platform.jobs import DeviceProgress
from plora.platform.runtime import is_address
from plora.platform.versions import migration
from plora.storage.errors import ConfigError
from plora.storage.models import utcnow
from plora.storage.registry import open_registry

# Progress as a Board shows it: (key, phase, step, total, loss, note).
Progress = Callable[[str, str, int | None, int | None, float | None, str | None], None]

# How long a run's enrollment token lasts if the launcher dies before revoking it.
ENROLLMENT_VALID = timedelta(days=1)
PROGRESS_EVERY_S = 3.0
DEVICE_ROWS_UP_TO = 16  # a fleet this small shows a progress line per device, besides the fleet's


def launch(
    devices: int,
    rounds: int,
    data: str = PERSONAS,
    backbone: str | None = None,
    root: Path = Path("fleet"),
    engine: str = "simulation",
    steps: int = FleetSettings.steps,
    lr: float = FleetSettings.lr,
    fraction: float = FleetSettings.fraction,
    echo: Callable[[str], None] = lambda line: None,
    config: PrivateLoRAConfig | None = None,
    concurrency: int | None = None,
    on_progress: Progress | None = None,
    fraction_evaluate: float = FleetSettings.fraction_evaluate,
    drift_budget: float = FleetSettings.drift_budget,
    backbone_ca: str = "",
    ray_address: str | None = None,
    **federation: object,
) -> list[dict]:
    """Run `rounds` personalization rounds on `devices` devices; returns one summary per device.
    With `federation` settings of FleetSettings (strategy="fedavg", secure_aggregation, dp_noise,
    dp_clip, dp_delta, opt_out), the devices that joined learn a shared starting M instead
    (federation.py), and one line per round is returned, as in federation.jsonl.

    `backbone` is HOST:PORT of a running service, or a local backbone spec ("embedded", a
    checkpoint folder) to serve on a free loopback port for the length of the run (None means
    "embedded"), with adapter `config`. `concurrency` caps the devices that train at once in
    simulation; in deployment every SuperNode trains as soon as it is asked. `ray_address` joins
    a running Ray cluster for the simulation instead of starting one. With `backbone_ca`,
    a CA certificate file, the devices reach the service given as HOST:PORT over TLS, trusting it.

    Devices not yet enrolled enroll with a token issued for the run in this process's
    registry, which a service given as HOST:PORT must share; it is revoked when the run ends.
    The fleet's progress, one line for all its devices and one for each of a fleet of at most
    DEVICE_ROWS_UP_TO (FleetTally), goes to `on_progress`, or else to `echo`.
    """
    check_engine(engine, concurrency, ray_address)
    if data != PERSONAS:
        if not Path(data).is_file():
            raise ConfigError(f"--data must be 'personas' or an existing JSONL file, got {data!r}")
        data = str(Path(data).resolve())  # Flower's processes need not share this working directory
    root = Path(root).resolve()
    reg, service = open_registry(), None
    if backbone_ca:
        if backbone is None or not is_address(backbone):
            raise ConfigError("backbone-ca is for a service given as HOST:PORT; one the launch serves itself is on loopback")
        if not Path(backbone_ca).is_file():
            raise ConfigError(f"backbone-ca must be a CA certificate file, got {backbone_ca!r}")
        backbone_ca = str(Path(backbone_ca).resolve())  # Flower's processes need not share this working directory
    if backbone is None or not is_address(backbone):
        service = start_service([backbone or "embedded"], config or PrivateLoRAConfig(), reg)
        backbone = f"127.0.0.1:{service.port}"
        echo(f"backbone service started on {backbone}")
    enrollment, token = reg.issue_enrollment_token(devices, utcnow() + ENROLLMENT_VALID, label="plora fleet launch")
    try:
        settings = FleetSettings(root, backbone, data, devices, rounds, steps, lr, fraction=fraction,
                                 fraction_evaluate=fraction_evaluate, drift_budget=drift_budget, enroll_token=token,
                                 backbone_ca=backbone_ca, **federation)
        joining = devices - sum(settings.opts_out(i) for i in range(devices)) if settings.strategy == FEDAVG else devices
        tally = FleetTally(rounds, sampled_per_round(joining, fraction), steps, on_progress or echo_progress(echo), root,
                           device_rows=devices <= DEVICE_ROWS_UP_TO)
        with _device_progress(root, tally):
            run_app(settings, engine, echo, concurrency, ray_address)
    finally:
        reg.revoke_enrollment_token(enrollment.id)
        if service is not None:
            service.stop(grace_s=1)
    return read_lines(root / FEDERATION_FILE) if settings.strategy == FEDAVG else summarize(read_rounds(root))


def launch_migration(
    root: Path,
    target: str,
    method: str = "distill",
    engine: str = "simulation",
    backbone: str | None = None,
    steps: int = DistillSettings.steps,
    lr: float = DistillSettings.lr,
    echo: Callable[[str], None] = lambda line: None,
    on_device: DeviceProgress | None = None,
    min_retention: float | None = None,
) -> list[dict]:
    """Migrate every device of the fleet at `root` to version `target`, each on its own device,
    orchestrated by Flower; returns one line per device (as in migrations.jsonl). A device whose
    new M would keep less than `min_retention` of its gain (default: the migration's) stays.

    `backbone` is HOST:PORT of a service hosting the devices' versions and the target; by
    default one is started on loopback for the run."""
    check_engine(engine, None)
    root = Path(root).resolve()
    folders = migration.device_folders(root)
    # Devices are set up when first sampled, so a fleet's folders may have gaps: the run has a
    # node for each folder only.
    ids = [partition_of(folder) if folder.parent == root else None for folder in folders]
    if None in ids:
        raise ConfigError(f"{root} is not a fleet's root ({device_name(0)}, {device_name(1)}, ...); "
                          "migrate its devices one by one instead")
    reg = open_registry()
    with migration.service_for(folders, target, reg, backbone) as address:
        if address is None:
            raise ConfigError(f"the devices under {root} use a local backbone; migrate them one by one instead")
        echo(f"migrating {len(folders)} devices to {reg.get_backbone(target).name} by {method} through {address}")
        settings = FleetSettings(root, address, devices=len(ids), partitions=",".join(map(str, ids)), steps=steps, lr=lr,
                                 migrate_to=reg.get_backbone(target).name, migrate_method=method,
                                 migrate_min_retention=-1.0 if min_retention is None else min_retention)
        with _device_progress(root, on_device or echo_progress(echo)):
            run_app(settings, engine, echo)
    return read_lines(root / MIGRATIONS_FILE)


def echo_progress(echo: Callable[[str], None]) -> Progress:
    """Progress as plain lines, for callers that show no live board."""

    def show(key: str, phase: str, step: int | None, total: int | None, loss: float | None, note: str | None = None) -> None:
        line = f"{key} {phase}" if step is None else f"{key} {phase} step {step}/{total}"
        line += "" if loss is None else f" loss {loss:.3f}"
        echo(line + ("" if note is None else f" ({note})"))

    return show


class FleetTally:
    """The devices' progress summed into one line for the whole fleet: the round, training steps
    done out of those the run will ask for (a job that ended counts all its steps), the jobs
    measuring baselines, training, trained and failed, throughput and time left; so that a fleet
    of any size reads as one task, while each device's own detail goes to rounds.jsonl. With
    `device_rows` (a fleet small enough to watch device by device, like the demo's), each
    device also has a line of its own: its phase, step and loss. Fed with each device's phase
    changes (a DeviceProgress)."""

    KEY = "fleet"

    def __init__(self, rounds: int, per_round: int, steps: int, on_progress: Progress, root: Path | None = None,
                 device_rows: bool = False):
        self.rounds, self.jobs, self.steps, self.on_progress = rounds, rounds * per_round, steps, on_progress
        self.device_rows = device_rows
        self.record = None if root is None else Path(root) / ROUNDS_FILE
        self.phases: dict[str, str] = {}  # device -> its latest phase
        self.at_step: dict[str, int] = {}  # device -> its latest training step, while it trains
        self.losses: dict[str, float] = {}  # device -> its latest training loss
        self.ended: dict[tuple[str, int], bool] = {}  # (device, round) -> failed
        self._seen: tuple[int, int] | None = None  # the record's modification time and size when last read
        self.started = time.monotonic()

    def __call__(self, device: str, phase: str, step: int | None, total: int | None, loss: float | None) -> None:
        self.phases[device] = phase
        self.at_step[device] = step or 0
        if loss is not None:
            self.losses[device] = loss
        number, _, outcome = phase.removeprefix("round ").partition(": ")
        if number.isdigit() and int(number) > 0 and outcome in (TRAINED, FAILED):  # round 0: the baselines
            self.ended[device, int(number)] = outcome == FAILED
        # A device's file shows its latest phase only, and one sampled again may have moved on
        # before it was read: the rounds done are counted from the orchestrator's record.
        for line in self._recorded():
            if line["round"] > 0:
                self.ended[device_label(line), line["round"]] = line["failed"]
        if self.device_rows:
            self.on_progress(device, phase, step, total, loss, None)
        self._show()

    def _recorded(self) -> list[dict]:
        """The record's whole lines, when it has changed since the last look (the orchestrator
        writes it once a round, and may be appending a line right now)."""
        try:
            stat = self.record.stat() if self.record else None
        except FileNotFoundError:
            return []
        if stat is None or (stat.st_mtime_ns, stat.st_size) == self._seen:
            return []
        self._seen = (stat.st_mtime_ns, stat.st_size)
        text = self.record.read_text()
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n") and line.strip()]

    def _show(self) -> None:
        rounds = [int(n) for n, _, _ in (p.removeprefix("round ").partition(":") for p in self.phases.values()) if n.isdigit()]
        done, failed = len(self.ended), sum(self.ended.values())
        in_training = {device: int(phase.removeprefix("round ")) for device, phase in self.phases.items()
                       if phase.startswith("round ") and phase.removeprefix("round ").isdigit()}
        training = sum(1 for device, number in in_training.items() if (device, number) not in self.ended)
        steps = done * self.steps + sum(self.at_step[device] for device, number in in_training.items()
                                        if (device, number) not in self.ended)
        baselines, waiting = (sum(1 for phase in self.phases.values() if phase == kind) for kind in (BASELINE, WAITING))
        note = f"{baselines} measuring their baseline, " if baselines else ""
        note += f"{waiting} waiting, " if waiting else ""
        note += f"{training} training, {done - failed} trained, {failed} failed"
        elapsed = time.monotonic() - self.started
        if done:
            per_minute = done / elapsed * 60
            note += f", {per_minute:.1f} devices/min, about {_minutes(max(0, self.jobs - done) / per_minute)} left"
        loss = sum(self.losses.values()) / len(self.losses) if self.losses else None
        self.on_progress(self.KEY, f"round {max(rounds, default=1)}/{self.rounds}", steps, self.jobs * self.steps, loss, note)


def _minutes(minutes: float) -> str:
    return f"{minutes:.0f} min" if minutes >= 1 else f"{minutes * 60:.0f} s"


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
    return {path: path.stat().st_mtime_ns for path in sorted(root.glob(f"*/{PROGRESS_FILE}"))}


def read_lines(path: Path) -> list[dict]:
    """The lines of one of the fleet's JSONL records; none before the run wrote it."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def read_rounds(root: Path) -> list[dict]:
    return read_lines(Path(root) / ROUNDS_FILE)


def device_label(line: dict) -> str:
    """The device a line of rounds.jsonl or migrations.jsonl is about."""
    pid = line["partition_id"]
    return device_name(pid) if pid is not None else f"node-{line['node_id']}"


def summarize(lines: list[dict]) -> list[dict]:
    """One row per device: baseline and last evaluation, training losses, traffic and failures."""
    by_device: dict[str, list[dict]] = defaultdict(list)
    for line in lines:
        by_device[device_label(line)].append(line)
    rows = []
    for device, history in sorted(by_device.items()):
        baseline = next((line["evaluate"] for line in history if line["round"] == 0), {})
        rounds = [line for line in history if line["round"] > 0]
        ok = [line for line in rounds if not line["failed"]]
        first, last = (ok[0], ok[-1]) if ok else ({"train": {}}, {"train": {}})
        # Evaluation is sampled: the device's latest one after training, if any.
        evaluation = next((line["evaluate"] for line in reversed(ok) if line["evaluate"]), {})
        rows.append({
            "device": device,
            "rounds": len(ok),
            "failed": len(rounds) - len(ok),
            "errors": sorted({kind for line in history for kind in line["errors"].values()}),
            "loss_before": first["train"].get("loss_before"),
            "loss_after": last["train"].get("loss_after"),
            "heldout_loss_before": baseline.get("heldout_loss"),
            "heldout_loss": evaluation.get("heldout_loss"),
            "recall_before": baseline.get("recall"),
            "recall": evaluation.get("recall"),
            "tokens_per_second": last["train"].get("tokens_per_second"),
            "bytes_exchanged": sum(line["train"].get("bytes_exchanged", 0) for line in history),
        })
    return rows
