"""Training M on the device's own data, through whatever link the model runs on.

Personal data is small: a few epochs over it overfit (held-out loss rises above the base
model's), so when a validation split is given the best M seen on it is kept. Narrow data also
moves the whole model, so by default every batch carries a few rows of anchor text (generic
text the base model wrote, see clients.anchor) on which the loss adds KL(base || model).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from plora.clients.anchor import AnchorSettings, base_model
from plora.clients.checkpoint import Progress, TrainingCheckpoint
from plora.clients.data import IGNORE_INDEX, TokenizedExample, batches, collate
from plora.clients.device_model import DeviceModel
from plora.clients.distillation import TeacherTargets, distillation_loss, teacher_targets
from plora.storage.errors import ConfigError


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 5e-3
    """AdamW learning rate for M. With orthonormal A and B, 5e-3 to 2e-2 works across ranks."""
    batch_size: int = 4
    steps: int | None = None
    """Stop after this many optimizer steps (exclusive with epochs)."""
    epochs: float | None = None
    """Passes over the training data; the default when neither is given is 2."""
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    """Decay pulls M towards 0, i.e. towards the base model; off by default."""
    seed: int = 0
    eval_every: int | None = None
    """Steps between validation checks; default once per epoch."""
    anchor: AnchorSettings | None = AnchorSettings()
    """Keeping close to the base model on anchor text given to `personalize`; None: off."""

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give either steps or epochs, not both")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0):
            raise ConfigError(f"steps must be >= 1 and epochs > 0, got steps={self.steps} epochs={self.epochs}")
        if not self.lr > 0 or self.batch_size < 1:
            raise ConfigError(f"lr must be > 0 and batch_size >= 1, got lr={self.lr} batch_size={self.batch_size}")

    def total_steps(self, examples: int) -> int:
        per_epoch = math.ceil(examples / self.batch_size)
        if self.steps is not None:
            return self.steps
        return max(1, round(per_epoch * (self.epochs if self.epochs is not None else 2.0)))


@dataclass
class TrainResult:
    steps: int
    tokens: int  # tokens that went through the model, padding excluded
    seconds: float
    first_loss: float
    last_loss: float
    val_before: float | None
    val_after: float | None
    best_step: int | None  # the step whose M was kept, when validating
    anchor_kl: float | None = None  # KL(base || model) per anchor position at the last step

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token NLL over labelled positions, and how many there were."""
    shifted = labels[:, 1:]
    count = int((shifted != -100).sum())
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100)
    return loss, count


def labelled_loss(model: DeviceModel, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """causal_lm_loss(model(ids), labels), with the LM head applied only where a label is
    predicted: for a prompt/response pair that is the response, a fraction of the row, and
    with a vocabulary like SmolLM2's the head is a fifth of the model's work."""
    targets = labels[:, 1:]
    predicts = targets != IGNORE_INDEX
    logits = model.lm_head(model.hidden_states(ids)[:, :-1][predicts])
    return F.cross_entropy(logits, targets[predicts]), int(predicts.sum())


@torch.no_grad()
def evaluate(model: DeviceModel, examples: list[TokenizedExample], pad_id: int, batch_size: int = 8) -> float:
    """Mean NLL per labelled token."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        ids, labels = collate(examples[start : start + batch_size], pad_id)
        loss, n = causal_lm_loss(model(ids), labels)
        total, count = total + loss.item() * n, count + n
    return total / max(count, 1)


def _schedule(total: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, int(total * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # cosine down to 10%

    return factor


def fingerprint(train: list[TokenizedExample], settings, backbone: str) -> str:
    """Identifies a job by its data, settings and the backbone version it trains M for, so a
    checkpoint resumes only the same job (a migrated device's old checkpoint is not).

    Anchor text needs no part in it: the settings and the backbone determine it."""
    digest = hashlib.sha256(repr((settings, backbone)).encode())
    for example in train:
        digest.update(repr((example.input_ids, example.labels)).encode())
    return digest.hexdigest()


def _anchor_batches(
    model: DeviceModel, anchor: list[TokenizedExample], pad_id: int, settings: TrainSettings, total: int
) -> Iterator[list[tuple[TokenizedExample, TeacherTargets]]]:
    """Anchor rows with the base model's targets, for each of `total` steps."""
    if settings.anchor is None:
        raise ConfigError("anchor text was given but settings.anchor is None; pass anchor settings or no anchor")
    # The base model is M = 0, not the M this device may hold from an earlier job.
    with base_model(model):
        targets = teacher_targets(model, anchor, pad_id, settings.anchor.top_k)
    per_epoch = math.ceil(len(anchor) / settings.anchor.rows)
    return batches(list(zip(anchor, targets)), settings.anchor.rows, settings.seed, epochs=math.ceil(total / per_epoch))


def personalize(
    model: DeviceModel,
    train: list[TokenizedExample],
    pad_id: int,
    settings: TrainSettings = TrainSettings(),
    val: list[TokenizedExample] | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    checkpoint: TrainingCheckpoint | None = None,
    checkpoint_every: int = 10,
    anchor: list[TokenizedExample] | None = None,
) -> TrainResult:
    """Train the model's M on `train`. `on_step(step, total, loss)` reports progress.

    With `anchor` text (clients.anchor.write_anchor), `settings.anchor.rows` of it join every
    batch and the loss adds `settings.anchor.weight` times KL(base || model) on them; the
    reported loss is the task's alone. Without it nothing holds the model near the base.

    With a checkpoint, progress is saved every `checkpoint_every` steps and after the last
    one, and a matching checkpoint left by an interrupted run is resumed: the same batches, in
    the same order, from the step after the last one saved. The last save lets a job that
    was killed after training, before its result was kept, finish without training again.
    """
    if not train:
        raise ConfigError("no training examples")
    total = settings.total_steps(len(train))
    params = list(model.weights.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, settings.warmup_fraction))
    per_epoch = math.ceil(len(train) / settings.batch_size)
    eval_every = settings.eval_every or per_epoch

    restored = checkpoint.restore(params, optimizer, scheduler) if checkpoint else None
    if restored:
        progress, best = restored
    else:
        progress, best = Progress(), None
        if val:
            progress.val_before = progress.best_score = evaluate(model, val, pad_id)
            best = [p.detach().clone() for p in params]
    left = progress.step < total  # nothing is, when resuming a job killed after training
    anchor_schedule = _anchor_batches(model, anchor, pad_id, settings, total) if anchor and left else itertools.repeat([])
    started, seconds_before = time.perf_counter(), progress.seconds
    model.train()
    schedule = batches(train, settings.batch_size, settings.seed, epochs=math.ceil(total / per_epoch))
    anchor_weight, anchor_kl = (settings.anchor.weight if settings.anchor else 0.0), None
    for batch, anchor_batch in itertools.islice(zip(schedule, anchor_schedule), progress.step, total):
        anchor_rows = [example for example, _ in anchor_batch]
        optimizer.zero_grad(set_to_none=True)
        # The task's rows and the anchor's go through the model apart: anchor text is longer,
        # and one batch would pad every task row to its width. The gradients add up.
        loss, _ = labelled_loss(model, *collate(batch, pad_id))
        loss.backward()
        if anchor_batch:
            anchor_ids, _ = collate(anchor_rows, pad_id)
            kl = distillation_loss(model(anchor_ids), [targets for _, targets in anchor_batch])
            (anchor_weight * kl).backward()
            anchor_kl = kl.item()
        optimizer.step()
        scheduler.step()
        progress.step += 1
        progress.tokens += sum(len(e.input_ids) for e in batch + anchor_rows)
        progress.last_loss = loss.item()
        if progress.step == 1:
            progress.first_loss = progress.last_loss
        if on_step:
            on_step(progress.step, total, progress.last_loss)
        if val and (progress.step % eval_every == 0 or progress.step == total):
            score = evaluate(model, val, pad_id)
            if score < progress.best_score:
                progress.best_score, progress.best_step = score, progress.step
                best = [p.detach().clone() for p in params]
        progress.seconds = seconds_before + time.perf_counter() - started
        if checkpoint and (progress.step % checkpoint_every == 0 or progress.step == total):
            checkpoint.save(progress, params, best, optimizer, scheduler)
    model.eval()
    if best is not None:
        with torch.no_grad():
            for p, kept in zip(params, best):
                p.copy_(kept)
    return TrainResult(
        steps=progress.step,
        tokens=progress.tokens,
        seconds=progress.seconds,
        first_loss=progress.first_loss,
        last_loss=progress.last_loss,
        val_before=progress.val_before,
        val_after=progress.best_score if val else None,
        best_step=progress.best_step if val else None,
        anchor_kl=anchor_kl,
    )
