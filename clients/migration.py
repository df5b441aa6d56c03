"""Carrying a device's personalization to a new backbone version, on the device.

`distill` trains the new version's M so that new backbone + new M gives the next-token
distributions old backbone + old M gave, on the device's own text (KL to the old model's
distributions, computed once with clients.distillation). Only the usual split traffic goes
to the cloud; the old model's distributions and both Ms stay on the device.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from plora.clients.checkpoint import Progress, TrainingCheckpoint
from plora.clients.data import TokenizedExample, batches, collate
from plora.clients.device_model import DeviceModel
from plora.clients.distillation import TeacherTargets, distillation_loss
from plora.cloud_backbone.privatelora import AdapterWeights
from plora.storage.errors import ConfigError

METHODS = ("copy", "distill")


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 40
    lr: float = 1e-2
    batch_size: int = 4
    top_k: int = 32
    """The old model's likeliest tokens kept per position; the rest is merged into one."""
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.top_k) < 1 or not self.lr > 0:
            raise ConfigError(f"steps, batch_size and top_k must be >= 1 and lr > 0; got {self}")


def can_copy(old: AdapterWeights, new: AdapterWeights) -> bool:
    """Whether M can be carried over as it is: the same matrices with the same shapes."""
    theirs = {name: t.shape for name, t in old.named_tensors()}
    return theirs == {name: t.shape for name, t in new.named_tensors()}


def copy_weights(old: AdapterWeights, new: AdapterWeights) -> None:
    if not can_copy(old, new):
        raise ConfigError("copy needs the same adapted layers, targets and rank on both versions; use distill")
    new.load_named_tensors({name: t.detach().clone() for name, t in old.named_tensors()})


def distill(
    student: DeviceModel,
    examples: list[TokenizedExample],
    targets: list[TeacherTargets],
    pad_id: int,
    settings: DistillSettings,
    checkpoint: TrainingCheckpoint | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    checkpoint_every: int = 10,
) -> Progress:
    """Train the student's M towards the teacher's distributions; resumes a matching checkpoint."""
    if not examples or len(examples) != len(targets):
        raise ConfigError(f"distill needs examples with one teacher target each, got {len(examples)} and {len(targets)}")
    params = list(student.weights.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    # Cosine decay to 10% after a short warm-up, as for personalization.
    warmup = max(1, settings.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (step + 1) / warmup if step < warmup
        else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, settings.steps - warmup))),
    )
    restored = checkpoint.restore(params, optimizer, scheduler) if checkpoint else None
    progress = restored[0] if restored else Progress()
    pairs = list(zip(examples, targets))
    per_epoch = math.ceil(len(pairs) / settings.batch_size)
    schedule = batches(pairs, settings.batch_size, settings.seed, epochs=math.ceil(settings.steps / per_epoch))
    started, seconds_before = time.perf_counter(), progress.seconds
    student.train()
    for batch in itertools.islice(schedule, progress.step, settings.steps):
        ids, _ = collate([example for example, _ in batch], pad_id)
        loss = distillation_loss(student(ids), [target for _, target in batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.step += 1
        progress.tokens += sum(len(example.input_ids) for example, _ in batch)
        progress.last_loss = loss.item()
        if progress.step == 1:
            progress.first_loss = progress.last_loss
        progress.seconds = seconds_before + time.perf_counter() - started
        if on_step:
            on_step(progress.step, settings.steps, progress.last_loss)
        if checkpoint and progress.step % checkpoint_every == 0 and progress.step < settings.steps:
            checkpoint.save(progress, params, None, optimizer, scheduler)
    student.eval()
    return progress
