"""Per-user personalization jobs: one user's data, one device, recorded in the registry.

The adapter on disk changes only when a job succeeds, so a job that fails (bad data,
a crash) leaves the previous personalization in place and is marked failed with its reason.
Unless the settings turn it off, jobs keep the model close to the base on generic text, the
anchor (clients.anchor), which the device's base model writes on its first job.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from plora.clients.anchor import AnchorSettings, text_key, write_anchor
from plora.clients.checkpoint import TrainingCheckpoint
from plora.clients.data import TokenizedExample, load_examples, tokenize
from plora.clients.device_store import DeviceRecord
from plora.clients.training import TrainResult, TrainSettings, evaluate, fingerprint, personalize
from plora.cloud_backbone.versions import ensure_version
from plora.platform.runtime import Device
from plora.storage.db import open_database
from plora.storage.errors import PloraError, RegistryError
from plora.storage.files import write_atomically
from plora.storage.registry import Registry

CHECKPOINT = "checkpoint.safetensors"  # in the device folder while a job is in progress
ANCHOR = "anchor.json"  # in the device folder: the anchor text its base model wrote
ANCHOR_SEED = 0  # one anchor text per device, whatever the job's seed, so it is written once


def registry(url: str | None = None) -> Registry:
    return Registry(open_database(url))


def register(record: DeviceRecord, reg: Registry) -> None:
    """Make sure the registry knows this device and the backbone version it is bound to.

    A device enrolled with a service is already known to a registry the service shares."""
    try:
        reg.get_device(record.device_id)
    except RegistryError:
        version = ensure_version(reg, record.identity, record.backbone_spec)
        reg.register_device(record.device_id, version.name)


def split_holdout(examples: list[TokenizedExample], fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation). Validation is empty when there are fewer than 10 examples."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_val = int(len(shuffled) * fraction) if len(shuffled) >= 10 else 0
    return shuffled[n_val:], shuffled[:n_val]


def device_anchor(device: Device, settings: AnchorSettings) -> list[TokenizedExample]:
    """The device's anchor text: written by its base model on first use, then kept, since
    writing it costs a generation pass and only the backbone and the settings change it."""
    path = device.store.root / ANCHOR
    key = f"{device.store.record.identity.version}/{text_key(settings, ANCHOR_SEED)}"
    try:
        kept = json.loads(path.read_text())
        if kept["key"] == key:
            return [TokenizedExample(ids, labels) for ids, labels in kept["examples"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or unreadable: write it afresh
    examples = write_anchor(device.model, device.tokenizer, settings, ANCHOR_SEED)
    stored = {"key": key, "examples": [[e.input_ids, e.labels] for e in examples]}
    write_atomically(path, json.dumps(stored).encode())
    return examples


@dataclass
class JobOutcome:
    job_id: int
    result: TrainResult
    loss_before: float  # on validation if there is one, else on the training set
    loss_after: float


def run_personalization(
    device: Device,
    data_path: Path,
    settings: TrainSettings,
    max_length: int = 256,
    val_fraction: float = 0.1,
    on_step: Callable[[int, int, float], None] | None = None,
    reg: Registry | None = None,
) -> JobOutcome:
    """Train the device's M on a local file, save it, and record the job.

    Progress is checkpointed on the device; running the same job again after an interruption
    resumes it, under the same job id.
    """
    reg = reg or registry()
    record = device.store.record
    register(record, reg)
    params = {"lr": settings.lr, "batch_size": settings.batch_size, "max_length": max_length}
    params.update({k: v for k, v in (("steps", settings.steps), ("epochs", settings.epochs)) if v is not None})
    params["anchor_weight"] = settings.anchor.weight if settings.anchor else 0.0
    try:
        examples = tokenize(load_examples(data_path), device.tokenizer, max_length)
    except PloraError as err:
        reg.fail_job(reg.start_job(record.device_id, "personalize", params), f"{type(err).__name__}: {err}")
        raise
    train, val = split_holdout(examples, val_fraction, settings.seed)
    checkpoint = TrainingCheckpoint(device.store.root / CHECKPOINT, fingerprint(train, settings))
    checkpoint.job_id = checkpoint.stored_job()
    if checkpoint.job_id is not None:
        reg.resume_job(checkpoint.job_id)
    else:
        checkpoint.job_id = reg.start_job(record.device_id, "personalize", params)
    job_id = checkpoint.job_id
    try:
        pad = device.tokenizer.pad_token_id
        measured_on = val or train
        before = evaluate(device.model, measured_on, pad)
        anchor = device_anchor(device, settings.anchor) if settings.anchor else None
        result = personalize(device.model, train, pad, settings, val or None, on_step, checkpoint, anchor=anchor)
        after = result.val_after if val else evaluate(device.model, train, pad)
        device.save(device.steps + result.steps)
        checkpoint.clear()
    except (PloraError, OSError) as err:
        reg.fail_job(job_id, f"{type(err).__name__}: {err}")
        raise
    except BaseException as err:  # a crash or Ctrl-C: the job did not finish, the old adapter stands
        reg.interrupt_job(job_id, type(err).__name__)
        raise
    metric = "val_loss" if val else "train_loss"
    metrics_after = {metric: after, "tokens_per_second": result.tokens_per_second, "best_step": result.best_step or result.steps}
    if result.anchor_kl is not None:
        metrics_after["anchor_kl"] = result.anchor_kl
    reg.finish_job(
        job_id,
        metrics_before={metric: before},
        metrics_after=metrics_after,
        tokens_processed=result.tokens,
        steps_done=result.steps,
    )
    return JobOutcome(job_id, result, before, after)
