"""Per-user personalization jobs: one user's data, one device, recorded in the registry.

The adapter on disk changes only when a job succeeds, so a job that fails (bad data,
a crash) leaves the previous personalization in place and is marked failed with its reason.
Unless the settings turn it off, a job first has the base model write its anchor text
(clients.anchor), which keeps the personalized model close to the base on generic text.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from plora.clients.anchor import write_anchor
from plora.clients.checkpoint import TrainingCheckpoint
from plora.clients.data import TokenizedExample, load_examples, tokenize
from plora.clients.device_store import DeviceRecord
from plora.clients.training import TrainResult, TrainSettings, evaluate, fingerprint, personalize
from plora.cloud_backbone.versions import ensure_version
from plora.platform.runtime import Device
from plora.storage.db import open_database
from plora.storage.errors import PloraError, RegistryError
from plora.storage.registry import Registry

CHECKPOINT = "checkpoint.safetensors"  # in the device folder while a job is in progress


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
        anchor = write_anchor(device.model, device.tokenizer, settings.anchor, settings.seed) if settings.anchor else None
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
