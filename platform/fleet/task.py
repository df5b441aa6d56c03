"""What one device of the fleet does, as plain functions that know nothing of Flower.

A device lives in its own folder under the fleet root, keyed by its partition id, so it
outlives Flower's per-run state: enrolling, private data, adapter and credentials stay on disk
between rounds and runs. What is the same for every device (the backbone's device half, the
base model's anchor text) is kept once, in the fleet's PublicStore. Every function here opens
the device, does one job and closes it; a process serving many devices in turn loads the
device half once (clients.public_store).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch

from plora.clients.anchor import AnchorSettings
from plora.clients.data import DEVICE_JOB_MAX_LENGTH, load_examples, tokenize
from plora.clients.device_store import DeviceStore, FederationChoice
from plora.clients.grpc_link import Endpoint
from plora.clients.migration import DistillSettings
from plora.clients.training import TrainSettings
from plora.clients.training import evaluate as heldout_loss
from plora.clients.training import personalize as train_adapter
from plora.cloud_backbone.protocol.link import TrafficCounter
from plora.cloud_backbone.protocol.messages import BackboneIdentity
from plora.platform.fleet.personas import make_persona, persona_recall
from plora.platform.fleet.settings import (
    BASELINE,
    PERSONAS,
    PROGRESS_FILE,
    PUBLIC_DIR,
    TRAINED,
    WAITING,
    FleetSettings,
    device_dir,
)
from plora.platform.jobs import run_personalization
from plora.platform.runtime import Device, init_device, open_device
from plora.platform.versions.migration import MIN_RETENTION, migrate_device
from plora.storage.errors import ConfigError, ValidationError
from plora.storage.files import write_atomically

TRAIN_FILE = DeviceStore.PRIVATE_TRAIN
HELDOUT_FILE = DeviceStore.PRIVATE_HELDOUT


def private_records(settings: FleetSettings, partition_id: int, num_partitions: int,
                    own_data: bool = False) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records of one device.

    The device's `own_data` file (on a host of its own) is all its own. Of a data file shared
    by the fleet, a play (.txt of `SPEAKER:` blocks) gives each device one speaker, the natural
    partition; any other file is split IID. A tenth is held out when the share is big enough.
    """
    if settings.data == PERSONAS:
        persona = make_persona(seed=partition_id)
        return persona.train_records(), persona.heldout_records()
    # Imported here: datasets takes seconds to import, and in deployment every message starts a
    # fresh ClientApp process, which needs it only for a data file's first split.
    from plora.platform.fleet.partition import holdout, partition, play_blocks

    path = Path(settings.data)
    if not path.is_file():
        raise ConfigError(f"data must be 'personas' or an existing data file, got {settings.data!r}")
    if own_data:
        mine = load_examples(path)
    elif path.suffix.lower() == ".txt":
        mine = partition(play_blocks(path), "natural", num_partitions, partition_by="speaker")[partition_id]
        mine = mine.select_columns(["text"])
    else:
        mine = partition(load_examples(path), "iid", num_partitions)[partition_id]
    if len(mine) < 10:
        return mine.to_list(), []
    train, held = holdout(mine, 0.1)
    return train.to_list(), held.to_list()


def prepare_device(settings: FleetSettings, partition_id: int, num_partitions: int = 1, own_data: bool = False) -> Path:
    """Enroll the device and write its private data, unless done before. Returns its folder."""
    folder = device_dir(settings.fleet_root, partition_id)
    # Data first: a device without data is not worth enrolling with the service.
    if not (folder / TRAIN_FILE).exists():
        train, heldout = private_records(settings, partition_id, num_partitions, own_data)
        (folder / TRAIN_FILE).parent.mkdir(parents=True, exist_ok=True)
        if heldout:
            write_atomically(folder / HELDOUT_FILE, _jsonl(heldout))
        write_atomically(folder / TRAIN_FILE, _jsonl(train))  # last: its presence marks the data complete
    if not (folder / DeviceStore.RECORD).exists():
        endpoint = Endpoint(settings.backbone, insecure=not settings.backbone_ca, ca_file=settings.backbone_ca or None)
        init_device(folder, settings.backbone, endpoint=endpoint, label=f"fleet {folder.name}",
                    enroll_token=settings.enroll_token, public=settings.fleet_root / PUBLIC_DIR)
    return folder


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def report_progress(folder: Path, what: str, step: int | None = None, steps: int | None = None, loss: float | None = None) -> None:
    """What the device is doing, for the launcher to show: a phase, or a training step."""
    folder.mkdir(parents=True, exist_ok=True)  # a device failing before its set-up reports too
    progress = {"what": what, "step": step, "steps": steps, "loss": loss}
    write_atomically(folder / PROGRESS_FILE, json.dumps(progress).encode())


def personalize(settings: FleetSettings, partition_id: int, server_round: int,
                fleet_starts: Mapping[str, object] = MappingProxyType({})) -> dict[str, int | float]:
    """One personalization job on the device's private training data; returns scalar metrics.

    A device whose owner joined the fleet's federation starts its first job from the fleet's M
    when `fleet_starts` (backbone version -> the bytes of an adapter file, as the orchestrator
    sends them) holds one for its version: measured, that beats starting from M = 0 for every
    new speaker of `plora bench federated`."""
    folder = device_dir(settings.fleet_root, partition_id)
    device = open_device(folder, settings.backbone)
    traffic = TrafficCounter()
    device.model.link.taps.append(traffic)
    # A new seed each round shuffles the batches differently, so rounds do not repeat each other.
    train = TrainSettings(lr=settings.lr, steps=settings.steps, batch_size=settings.batch_size, seed=server_round,
                          anchor=AnchorSettings(drift_budget=settings.drift_budget or None))

    def report(step: int, total: int, loss: float) -> None:
        report_progress(folder, f"round {server_round}", step, total, loss)

    # Before the first step: the first job also has the base model write its anchor and probe text.
    report_progress(folder, f"round {server_round}: preparing")
    started = time.perf_counter()
    try:
        fleet_start = fleet_starts.get(device.store.record.identity.version)
        if fleet_start is not None and not device.steps and device.store.federation_choice().joined:
            _start_from_fleet(device, fleet_start)
        outcome = run_personalization(device, folder / TRAIN_FILE, train, max_length=DEVICE_JOB_MAX_LENGTH, val_fraction=0.0, on_step=report)
    finally:
        device.close()
    result = outcome.result
    report_progress(folder, f"round {server_round}: {TRAINED}", result.steps, train.steps, outcome.loss_after)
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


def _start_from_fleet(device: Device, sent: object) -> None:
    """Load the fleet's M as sent, as `plora personalize --from-fleet` loads its file: checked
    whole against the device's backbone version before a number of it is used."""
    if not isinstance(sent, bytes):
        raise ValidationError(f"the fleet's starting M must come as an adapter file's bytes, got {type(sent).__name__}")
    with tempfile.NamedTemporaryFile(dir=device.store.root, prefix=".fleet-start-", suffix=".safetensors") as file:
        file.write(sent)
        file.flush()
        device.start_from_fleet(Path(file.name))


def evaluate(settings: FleetSettings, partition_id: int) -> dict[str, int | float]:
    """Held-out loss, and for personas the share of private facts recalled from held-out questions."""
    folder = device_dir(settings.fleet_root, partition_id)
    baseline = not (folder / PROGRESS_FILE).exists()
    if baseline:  # before any training: say so. Later, the last training step stays shown.
        report_progress(folder, BASELINE)
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
    if baseline:
        report_progress(folder, WAITING)
    return metrics


def federation_answer(settings: FleetSettings, partition_id: int, num_partitions: int,
                      own_data: bool = False) -> tuple[bool, BackboneIdentity]:
    """Whether the device takes part in the fleet's federation, and the backbone version it is
    bound to. Its simulated user's choice (settings.opt_out) is recorded on the device first, as a
    real owner's is by `plora device federation`."""
    store = DeviceStore.open(prepare_device(settings, partition_id, num_partitions, own_data))
    store.choose_federation(FederationChoice(joined=not settings.opts_out(partition_id),
                                             in_the_clear=not settings.secure_aggregation))
    return store.federation_choice().joined, store.record.identity


def device_identity(settings: FleetSettings, partition_id: int) -> BackboneIdentity:
    """The backbone version the device is bound to, which fixes M's shape."""
    return DeviceStore.open(device_dir(settings.fleet_root, partition_id)).record.identity


def _joined(store: DeviceStore) -> FederationChoice:
    choice = store.federation_choice()
    if not choice.joined:
        raise ConfigError("this device's owner has not joined the fleet's federation")
    return choice


def federated_update(settings: FleetSettings, partition_id: int, start: dict[str, torch.Tensor], server_round: int,
                     masked: bool) -> dict[str, torch.Tensor]:
    """The device's contribution to a federated round: a scratch copy of the fleet's starting M,
    trained on the device's private data. The device's own adapter and checkpoints are never
    touched. Refused unless the owner joined, and, when the round is not `masked` by secure
    aggregation, unless the owner allows sending M in the clear."""
    folder = device_dir(settings.fleet_root, partition_id)
    store = DeviceStore.open(folder)
    choice = _joined(store)
    if not masked and not choice.in_the_clear:
        raise ConfigError("asked for M without secure aggregation, which this device's owner does not allow")
    report_progress(folder, f"round {server_round}: preparing")
    device = open_device(folder, settings.backbone)
    try:
        device.model.weights.load_named_tensors(start)
        examples = tokenize(load_examples(folder / TRAIN_FILE), device.tokenizer, DEVICE_JOB_MAX_LENGTH)
        train = TrainSettings(lr=settings.lr, steps=settings.steps, batch_size=settings.batch_size, seed=server_round, anchor=None)

        def report(step: int, total: int, loss: float) -> None:
            report_progress(folder, f"round {server_round}", step, total, loss)

        result = train_adapter(device.model, examples, device.tokenizer.pad_token_id, train, on_step=report)
        store.keep_contribution(device.model.weights, server_round)
        contribution = {name: tensor.detach().clone() for name, tensor in device.model.weights.named_tensors()}
    finally:
        device.close()
    report_progress(folder, f"round {server_round}: {TRAINED}", result.steps, train.steps, result.last_loss)
    return contribution


def evaluate_start(settings: FleetSettings, partition_id: int, start: dict[str, torch.Tensor]) -> float:
    """The held-out loss (else the training loss) of the fleet's starting M on the device's data,
    for a device whose owner joined the federation."""
    folder = device_dir(settings.fleet_root, partition_id)
    _joined(DeviceStore.open(folder))
    device = open_device(folder, settings.backbone)
    try:
        device.model.weights.load_named_tensors(start)
        data = folder / HELDOUT_FILE if (folder / HELDOUT_FILE).exists() else folder / TRAIN_FILE
        examples = tokenize(load_examples(data), device.tokenizer, DEVICE_JOB_MAX_LENGTH)
        return heldout_loss(device.model, examples, device.tokenizer.pad_token_id)
    finally:
        device.close()


def migrate(settings: FleetSettings, partition_id: int) -> dict[str, int | float]:
    """Move the device to `settings.migrate_to`, on the device; returns scalar metrics only. A
    device never set up (never sampled) has nothing to move, and says so with "absent"."""
    folder = device_dir(settings.fleet_root, partition_id)
    if not (folder / DeviceStore.RECORD).is_file():
        return {"absent": 1}

    def report(step: int, total: int, loss: float) -> None:
        report_progress(folder, "migration", step, total, loss)

    distill = DistillSettings(steps=settings.steps, lr=settings.lr, batch_size=settings.batch_size)
    min_retention = MIN_RETENTION if settings.migrate_min_retention < 0 else settings.migrate_min_retention
    moved = migrate_device(folder, settings.migrate_to, settings.migrate_method, address=settings.backbone,
                           settings=distill, on_step=report, min_retention=min_retention)
    metrics: dict[str, int | float] = {"migrated": int(moved.outcome == "migrated"), "job_id": moved.job_id or 0}
    metrics.update({f"before_{k}": v for k, v in moved.before.items()})
    metrics.update({f"after_{k}": v for k, v in moved.after.items()})
    return metrics
