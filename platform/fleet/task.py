"""What one device of the fleet does, as plain functions that know nothing of Flower.

A device lives in its own folder under the fleet root, keyed by its partition id, so it
outlives Flower's per-run state: enrolling, private data, adapter and credentials stay on disk
between rounds and runs. Every function here opens the device, does one job and closes it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import get_type_hints

from plora.clients.data import DEVICE_JOB_MAX_LENGTH, load_examples, tokenize
from plora.clients.device_store import DeviceStore
from plora.clients.grpc_link import Endpoint
from plora.clients.migration import DistillSettings
from plora.clients.training import TrainSettings
from plora.clients.training import evaluate as heldout_loss
from plora.cloud_backbone.protocol.link import TrafficCounter
from plora.platform.jobs import run_personalization
from plora.platform.versions.migration import migrate_device
from plora.platform.fleet.personas import make_persona, persona_recall
from plora.platform.runtime import init_device, is_address, open_device
from plora.storage.errors import ConfigError
from plora.storage.files import write_atomically

PERSONAS = "personas"
TRAIN_FILE = DeviceStore.PRIVATE_TRAIN
HELDOUT_FILE = DeviceStore.PRIVATE_HELDOUT
MIGRATIONS_FILE = "migrations.jsonl"  # under the fleet root: one line per device of a migration run
ROUNDS_FILE = "rounds.jsonl"  # under the fleet root: one line per device per round
# In each device folder: the latest step of the device's running job, for the launcher to show.
PROGRESS_FILE = "progress.json"
# The simulation engine cannot hand a run config to its apps, so launch puts it here
# (as JSON) before Ray starts; workers inherit it. A real run config wins key by key.
RUN_CONFIG_ENV = "PLORA_FLEET_RUN_CONFIG"
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass(frozen=True)
class FleetSettings:
    """One fleet run. Run-config keys are the field names with hyphens ("fleet-root")."""

    fleet_root: Path
    """Folder holding one sub-folder per device, and rounds.jsonl."""
    backbone: str
    """HOST:PORT of the backbone service, on loopback: the fleet talks plain text."""
    data: str = PERSONAS
    """Either "personas" (a synthetic persona per device) or a JSONL file split among the devices."""
    devices: int = 1
    """Devices the orchestrator waits for before the first round."""
    rounds: int = 1
    steps: int = 10
    """Optimizer steps per device per round."""
    lr: float = 1e-2
    batch_size: int = 4
    fraction: float = 1.0
    """Share of the devices sampled for each round."""
    reply_timeout: float = 3600.0
    """Seconds the orchestrator waits for devices to join, and for each round's replies. On a
    small machine a round's devices train in turns, so a round takes several jobs' time: the
    demo's 4 devices on 2 cores take about 10 minutes."""
    migrate_to: str = ""
    """When set, the run migrates every device to this backbone version instead of training."""
    migrate_method: str = "distill"
    enroll_token: str = ""
    """The enrollment token devices enroll with; `plora fleet launch` issues one for the run."""

    def __post_init__(self) -> None:
        host = self.backbone.rsplit(":", 1)[0]
        if not is_address(self.backbone) or host not in _LOOPBACK:
            raise ConfigError(f"backbone must be HOST:PORT on loopback (the fleet talks plain text), got {self.backbone!r}")
        if min(self.devices, self.rounds, self.steps, self.batch_size) < 1:
            raise ConfigError(
                f"devices, rounds, steps and batch-size must be >= 1, got {self.devices}, {self.rounds}, {self.steps}, {self.batch_size}"
            )
        if not (0 < self.fraction <= 1 and self.lr > 0 and self.reply_timeout > 0):
            raise ConfigError(f"need 0 < fraction <= 1, lr > 0, reply-timeout > 0; got {self.fraction}, {self.lr}, {self.reply_timeout}")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> FleetSettings:
        given = {**_environment_config(), **run_config}
        hints = get_type_hints(cls)
        values = {}
        for field in fields(cls):
            key = field.name.replace("_", "-")
            if key in given:
                values[field.name] = _convert(key, given[key], hints[field.name])
            elif field.default is MISSING:
                raise ConfigError(f"the run config lacks {key!r}; it has {sorted(given)}")
        return cls(**values)

    def to_run_config(self) -> dict[str, str | int | float]:
        return {f.name.replace("_", "-"): _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(value: object) -> str | int | float:
    return str(value) if isinstance(value, Path) else value  # type: ignore[return-value]


def _environment_config() -> dict[str, object]:
    raw = os.environ.get(RUN_CONFIG_ENV)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"${RUN_CONFIG_ENV} is not JSON: {err}") from err
    if not isinstance(config, dict):
        raise ConfigError(f"${RUN_CONFIG_ENV} must be a JSON object, got {type(config).__name__}")
    return config


def _convert(key: str, value: object, kind: type) -> object:
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (str, Path) and isinstance(value, str):
        return kind(value)
    raise ConfigError(f"run config {key!r} must be {kind.__name__}, got {value!r}")


def device_dir(root: Path, partition_id: int) -> Path:
    return Path(root) / f"device-{partition_id:03d}"


def private_records(settings: FleetSettings, partition_id: int, num_partitions: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records of one device.

    A play (.txt of `SPEAKER:` blocks) gives each device one speaker, the natural partition;
    any other data file is split IID. A tenth is held out when the share is big enough.
    """
    if settings.data == PERSONAS:
        persona = make_persona(seed=partition_id)
        return persona.train_records(), persona.heldout_records()
    # Imported here: flwr-datasets takes seconds to import, and in deployment every message
    # starts a fresh ClientApp process, which needs it only for a data file's first split.
    from plora.platform.fleet.partition import holdout, partition, play_blocks

    path = Path(settings.data)
    if not path.is_file():
        raise ConfigError(f"data must be 'personas' or an existing data file, got {settings.data!r}")
    if path.suffix.lower() == ".txt":
        mine = partition(play_blocks(path), "natural", num_partitions, partition_by="speaker")[partition_id]
        mine = mine.select_columns(["text"])
    else:
        mine = partition(load_examples(path), "iid", num_partitions)[partition_id]
    if len(mine) < 10:
        return mine.to_list(), []
    train, held = holdout(mine, 0.1)
    return train.to_list(), held.to_list()


def prepare_device(settings: FleetSettings, partition_id: int, num_partitions: int = 1) -> Path:
    """Enroll the device and write its private data, unless done before. Returns its folder."""
    folder = device_dir(settings.fleet_root, partition_id)
    # Data first: a device without data is not worth enrolling with the service.
    if not (folder / TRAIN_FILE).exists():
        train, heldout = private_records(settings, partition_id, num_partitions)
        (folder / TRAIN_FILE).parent.mkdir(parents=True, exist_ok=True)
        if heldout:
            write_atomically(folder / HELDOUT_FILE, _jsonl(heldout))
        write_atomically(folder / TRAIN_FILE, _jsonl(train))  # last: its presence marks the data complete
    if not (folder / DeviceStore.RECORD).exists():
        endpoint = Endpoint(settings.backbone, insecure=True)
        init_device(folder, settings.backbone, endpoint=endpoint, label=f"fleet-device-{partition_id}",
                    enroll_token=settings.enroll_token)
    return folder


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def report_progress(folder: Path, what: str, step: int | None = None, steps: int | None = None, loss: float | None = None) -> None:
    """What the device is doing, for the launcher to show: a phase, or a training step."""
    progress = {"what": what, "step": step, "steps": steps, "loss": loss}
    write_atomically(folder / PROGRESS_FILE, json.dumps(progress).encode())


def personalize(settings: FleetSettings, partition_id: int, server_round: int) -> dict[str, int | float]:
    """One personalization job on the device's private training data; returns scalar metrics."""
    folder = device_dir(settings.fleet_root, partition_id)
    device = open_device(folder, settings.backbone)
    traffic = TrafficCounter()
    device.model.link.taps.append(traffic)
    # A new seed each round shuffles the batches differently, so rounds do not repeat each other.
    train = TrainSettings(lr=settings.lr, steps=settings.steps, batch_size=settings.batch_size, seed=server_round)

    def report(step: int, total: int, loss: float) -> None:
        report_progress(folder, f"round {server_round}", step, total, loss)

    # Before the first step: the first job also has the base model write its anchor text.
    report_progress(folder, f"round {server_round}: preparing")
    started = time.perf_counter()
    try:
        outcome = run_personalization(device, folder / TRAIN_FILE, train, max_length=DEVICE_JOB_MAX_LENGTH, val_fraction=0.0, on_step=report)
    finally:
        device.close()
    result = outcome.result
    return {
        "job_id": outcome.job_id,
        "loss_before": outcome.loss_before,
        "loss_after": outcome.loss_after,
        "steps": result.steps,
        "tokens": result.tokens,
        "tokens_per_second": result.tokens_per_second,
        "seconds": time.perf_counter() - started,
        "bytes_up": traffic.bytes["up"],
        "bytes_down": traffic.bytes["down"],
        "bytes_exchanged": traffic.total_bytes,
    }


def evaluate(settings: FleetSettings, partition_id: int) -> dict[str, int | float]:
    """Held-out loss, and for personas the share of private facts recalled from held-out questions."""
    folder = device_dir(settings.fleet_root, partition_id)
    if not (folder / PROGRESS_FILE).exists():
        # The baseline, before any training: say so. Later, the last training step stays shown.
        report_progress(folder, "evaluating")
    device = open_device(folder, settings.backbone)
    try:
        metrics: dict[str, int | float] = {"adapter_steps": device.steps}
        if (folder / HELDOUT_FILE).exists():
            examples = tokenize(load_examples(folder / HELDOUT_FILE), device.tokenizer, DEVICE_JOB_MAX_LENGTH)
            metrics["heldout_loss"] = heldout_loss(device.model, examples, device.tokenizer.pad_token_id)
        if settings.data == PERSONAS:
            metrics["recall"] = persona_recall(device.model, device.tokenizer, make_persona(seed=partition_id))
    finally:
        device.close()
    return metrics


def migrate(settings: FleetSettings, partition_id: int) -> dict[str, int | float]:
    """Move the device to `settings.migrate_to`, on the device; returns scalar metrics only."""
    folder = device_dir(settings.fleet_root, partition_id)

    def report(step: int, total: int, loss: float) -> None:
        report_progress(folder, "migration", step, total, loss)

    distill = DistillSettings(steps=settings.steps, lr=settings.lr, batch_size=settings.batch_size)
    moved = migrate_device(folder, settings.migrate_to, settings.migrate_method, address=settings.backbone,
                             settings=distill, on_step=report)
    metrics: dict[str, int | float] = {"migrated": int(moved.outcome == "migrated"), "job_id": moved.job_id or 0}
    metrics.update({f"before_{k}": v for k, v in moved.before.items()})
    metrics.update({f"after_{k}": v for k, v in moved.after.items()})
    return metrics
