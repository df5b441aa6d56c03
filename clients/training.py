"""The one training loop, and personalization on it.

`train` runs the optimizer steps of everything plora trains: personalization (M on the
device's own data, here), distillation to a new backbone version (clients.migration),
deriving a backbone (platform.versions.derive) and the benchmarks' baselines. Each gives its
parameters, its data and the loss of one batch; the loop owns the rest: AdamW, a learning-rate
schedule from transformers, batches in a seeded order, anchor rows mixed into every batch,
the parameters that did best on validation (stopping early once it stops improving, if asked),
checkpoints that an interrupted job resumes exactly, and progress reported as
`on_step(step, total, loss)`.

Personal data is small: a few epochs over it overfit (held-out loss rises above the base
model's), so when a validation split is given the M that did best on it is kept. Narrow data also
moves the whole model, so by default every batch carries a few rows of anchor text (generic
text the base model wrote, see clients.anchor) on which the loss adds KL(base || model), with a
weight that grows when the model drifts off generic text beyond its budget (DriftProbe).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

from plora.clients.anchor import Anchor, AnchorSettings, base_model
from plora.clients.checkpoint import Progress, TrainingCheckpoint
from plora.clients.data import IGNORE_INDEX, TokenizedExample, batches, collate, padding_mask
from plora.clients.device_model import DeviceModel
from plora.clients.distillation import TeacherTargets, distillation_loss_at, target_positions
from plora.storage.errors import ConfigError

T = TypeVar("T")
BatchLoss = Callable[[list[T]], tuple[torch.Tensor, int]]
"""A batch of a job's data -> (its loss, to backpropagate; the tokens it put through the model)."""
AnchorRows = list[tuple[TokenizedExample, TeacherTargets]]
AnchoredBatchLoss = Callable[[list[T], AnchorRows], tuple[torch.Tensor, torch.Tensor, int]]
"""A batch and anchor rows -> (the batch's loss, KL(base || model) on the anchor rows, the tokens
both put through the model), from one pass: over a link every pass costs a round trip per layer."""
OnStep = Callable[[int, int, float], None]
"""on_step(step, total, loss): called after each optimizer step with the batch's loss."""


MIN_STEPS = 90
"""How far AdamW moves M is set by its steps, not by the data's size, so a budget of two epochs
left small data barely trained: a persona's 22 notes made 12 steps, which lowered the held-out
loss of its facts from 3.70 to 1.18 but let greedy replies state none of them (recall 0%). With
at least 90 steps, and validation keeping the latest M near its best (NEAR_BEST), four personas
recalled all their facts (`plora bench quality`); at 60 steps, three of them 88%, 100% and 88%.
Style, not facts, pays for it: the same bench's smallest speaker kept 61% of LoRA's held-out gain
where two epochs kept 106%, with generic text 8% worse; another rose from 58% to 82%."""

NEAR_BEST = 0.05
"""Validation keeps the latest parameters whose gain over the starting ones (on validation) is
within this share of the best gain seen, not the best alone. A user's validation split is a
handful of examples, too few to tell apart parameters this close, and what it cannot tell apart
training on settles: on a persona's 2 validation notes, the lowest loss came at step 48 of 90
(0.403, from 4.238 before), with 6 of its 8 facts recalled; by step 78 all 8 were, and the
held-out facts' loss had fallen from 0.095 to 0.087 and generic text's change from +3.0% to
+1.0%, while validation stayed within 0.04 nats (1% of the gain) of its lowest. It cuts both
ways: PEFT LoRA, unanchored, on a Shakespeare speaker's 2 validation blocks, kept step 24 over
step 12 (within 0.001 nats) and gained 0.248 nats on held-out text where step 12 had gained
0.345. plora's own jobs on two speakers kept the same M under either rule."""


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 5e-3
    """AdamW learning rate for M. With orthonormal A and B, 5e-3 to 2e-2 works across ranks."""
    batch_size: int = 4
    steps: int | None = None
    """Stop after this many optimizer steps (exclusive with epochs)."""
    epochs: float | None = None
    """Passes over the training data; the default when neither is given is 2."""
    min_steps: int = MIN_STEPS
    """A budget in epochs runs at least this many optimizer steps (see MIN_STEPS); 0: exactly its epochs."""
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    """Decay pulls M towards 0, i.e. towards the base model; off by default."""
    seed: int = 0
    eval_every: int | None = None
    """Steps between validation checks; default once per epoch."""
    patience: int | None = None
    """Stop after this many validation checks in a row that kept nothing (see NEAR_BEST); None: run every step."""
    anchor: AnchorSettings | None = AnchorSettings()
    """Keeping close to the base model on anchor text given to `personalize`; None: off."""

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give either steps or epochs, not both")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0) or self.min_steps < 0:
            raise ConfigError(f"steps must be >= 1, epochs > 0 and min_steps >= 0, got steps={self.steps} "
                              f"epochs={self.epochs} min_steps={self.min_steps}")
        if not self.lr > 0 or self.batch_size < 1:
            raise ConfigError(f"lr must be > 0 and batch_size >= 1, got lr={self.lr} batch_size={self.batch_size}")
        if (self.eval_every is not None and self.eval_every < 1) or (self.patience is not None and self.patience < 1):
            raise ConfigError(f"eval_every and patience must be >= 1 or None, got eval_every={self.eval_every} "
                              f"patience={self.patience}")

    def total_steps(self, examples: int) -> int:
        per_epoch = math.ceil(examples / self.batch_size)
        if self.steps is not None:
            return self.steps
        return max(1, self.min_steps, round(per_epoch * (self.epochs if self.epochs is not None else 2.0)))


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
    anchor_weight: float | None = None  # the anchor's weight at the last step (AnchorSettings.drift_budget)
    stopped_early: bool = False  # validation stopped improving for `patience` checks before the last step
    val_last: float | None = None  # the last validation check's loss, kept or not

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token NLL over labelled positions, and how many there were."""
    shifted = labels[:, 1:]
    count = int((shifted != -100).sum())
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100)
    return loss, count


def labelled_loss(model: DeviceModel, ids: torch.Tensor, labels: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """causal_lm_loss(model(ids), labels), with the LM head applied only where a label is
    predicted: for a prompt/response pair that is the response, a fraction of the row, and
    with a vocabulary like SmolLM2's the head is a fifth of the model's work. `attention_mask`:
    the batch's padding (data.padding_mask), which then crosses no exchange."""
    return _labelled(model, model.hidden_states(ids, attention_mask=attention_mask), labels)


def anchored_loss(model: DeviceModel, ids: torch.Tensor, labels: torch.Tensor, anchor: Sequence[TeacherTargets],
                  attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`labelled_loss` of the first len(labels) rows of `ids`, and the distillation loss towards
    `anchor` of the rows after them, one per target, from one pass through the model. Over a link
    a pass costs a round trip per adapted layer each way, which two passes would pay twice. The
    pass pads every row to the widest, batch or anchor; with `attention_mask` the cloud exchanges
    none of the padding, and a session stepping alone computes none of it either (the README's
    **One pass per training step**)."""
    hidden = model.hidden_states(ids, attention_mask=attention_mask)
    loss, _ = _labelled(model, hidden[: len(labels)], labels)
    return loss, distillation_loss_at(model.lm_head(hidden[target_positions(anchor, first_row=len(labels))]), anchor)


def _labelled(model: DeviceModel, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    targets = labels[:, 1:]
    predicts = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][predicts])
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


@dataclass(frozen=True)
class DriftProbe:
    """Text the base model wrote that no job trains on (clients.anchor.write_probe), and the base
    model's NLL on it: what `drift` compares a model's NLL with."""

    examples: list[TokenizedExample]
    pad_id: int
    base_nll: float

    @classmethod
    def of(cls, model: DeviceModel, examples: list[TokenizedExample], pad_id: int) -> DriftProbe:
        with base_model(model):
            return cls(examples, pad_id, evaluate(model, examples, pad_id))

    def drift(self, model: torch.nn.Module) -> float:
        """How much worse `model` predicts generic text than the base model does: the relative
        change in NLL on the probe. 0 at M = 0; +0.02 is 2% worse."""
        return evaluate(model, self.examples, self.pad_id) / self.base_nll - 1


def fingerprint(train: list[TokenizedExample], settings, backbone: str) -> str:
    """Identifies a job by its data, settings and the backbone version it trains M for, so a
    checkpoint resumes only the same job (a migrated device's old checkpoint is not).

    Anchor text needs no part in it: the settings and the backbone determine it."""
    # Settings added since stay out of it where they change nothing (patience while unset,
    # min_steps under a budget in steps), so a checkpoint an older plora left still resumes; so do
    # the drift budget's and the anchor text seed's defaults, under which such a checkpoint resumes.
    identity = re.sub(r"(steps=\d+, epochs=None), min_steps=\d+", r"\1", repr((settings, backbone)))
    defaults = AnchorSettings()
    identity = identity.replace(f", drift_budget={defaults.drift_budget!r}, max_weight={defaults.max_weight!r}, "
                                f"drift_check_every={defaults.drift_check_every!r}", "")
    identity = identity.replace(f", text_seed={defaults.text_seed!r})", ")")
    digest = hashlib.sha256(identity.replace(", patience=None", "").encode())
    for example in train:
        digest.update(repr((example.input_ids, example.labels)).encode())
    return digest.hexdigest()


def tokens_in(examples: Sequence[TokenizedExample]) -> int:
    """Tokens a batch puts through the model, padding excluded."""
    return sum(len(example.input_ids) for example in examples)


def causal_lm_batch_loss(logits_of: Callable[[torch.Tensor], torch.Tensor], pad_id: int) -> BatchLoss:
    """A BatchLoss: the causal LM loss of a batch of TokenizedExample, with `logits_of` mapping
    (B, T) ids to (B, T, vocab) logits (a model without plora's split, say)."""

    def batch_loss(batch: list[TokenizedExample]) -> tuple[torch.Tensor, int]:
        ids, labels = collate(batch, pad_id)
        return causal_lm_loss(logits_of(ids), labels)[0], tokens_in(batch)

    return batch_loss


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule of `transformers.get_scheduler`, warming up over the first
    `TrainSettings.warmup_fraction` of the steps (at least one)."""

    name: str = "cosine_warmup_with_min_lr"
    min_lr_rate: float | None = 0.1
    """Where the cosine_*_min_lr schedules end, as a share of lr; None for the others."""

    def make(self, optimizer: torch.optim.Optimizer, total: int, warmup_fraction: float) -> LambdaLR:
        options = None if self.min_lr_rate is None else {"min_lr_rate": self.min_lr_rate}
        warmup = max(1, int(total * warmup_fraction))
        return get_scheduler(self.name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                             scheduler_specific_kwargs=options)


COSINE_TO_10_PERCENT = Schedule()
"""Personalization's and distillation's: up to lr over the warm-up, then a cosine down to 10%
of lr at the last step. The warm-up's first step runs at lr/w, w its steps, not at 0 as
transformers' plain cosine_with_warmup would have it, so a 4-step job (w = 1) makes 4 real steps."""
CONSTANT = Schedule("constant", None)


def _anchor_batches(anchor: Anchor, settings: AnchorSettings, seed: int, total: int) -> Iterator[AnchorRows]:
    """Anchor rows with their targets, for each of `total` steps."""
    per_epoch = math.ceil(len(anchor.examples) / settings.rows)
    return batches(list(zip(anchor.examples, anchor.targets)), settings.rows, seed, epochs=math.ceil(total / per_epoch))


def train(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    batch_loss: BatchLoss | AnchoredBatchLoss,
    data: Sequence[T],
    settings: TrainSettings,
    *,
    schedule: Schedule = COSINE_TO_10_PERCENT,
    anchor: Anchor | None = None,
    probe: DriftProbe | None = None,
    validate: Callable[[], float] | None = None,
    val_before: float | None = None,
    checkpoint: TrainingCheckpoint | None = None,
    checkpoint_every: int = 10,
    on_step: OnStep | None = None,
) -> Progress:
    """Train `params` by AdamW on `batch_loss` over batches of `data`, `settings.total_steps`
    optimizer steps. `model` is in training mode while the loop runs, in eval mode after.

    With `anchor`, `settings.anchor.rows` of its rows join every batch: `batch_loss` is an
    AnchoredBatchLoss, called with the batch and those rows, and the loss adds
    `settings.anchor.weight` times its KL(base || model) on them; the loss reported is the
    batch's alone. With `probe` too and a drift budget in
    `settings.anchor`, the weight is steered by the model's drift on the probe, measured every
    `settings.anchor.drift_check_every` steps (AnchorSettings.steered_weight).

    With `validate` (lower is better), it runs before training, every `settings.eval_every`
    steps (default once per epoch) and after the last one, and the latest parameters whose gain
    over the starting ones is within NEAR_BEST of the best gain are kept (the starting ones,
    exactly, if no step beat them). `val_before` is the starting parameters' score when the
    caller has it already, saving that first pass. With `settings.patience`, training stops
    after that many checks in a row that kept nothing.

    With a checkpoint, progress is saved every `checkpoint_every` steps and after the last one,
    and a matching checkpoint left by an interrupted run is resumed: the same batches in the
    same order, from the step after the last one saved, to the same parameters. The last save
    lets a job killed after training, before its result was kept, finish without training again.
    """
    if not data:
        raise ConfigError("no training examples")
    if anchor is not None and settings.anchor is None:
        raise ConfigError("anchor text was given but settings.anchor is None; pass anchor settings or no anchor")
    if anchor is not None and not anchor.examples:
        raise ConfigError("the anchor holds no text; pass anchor text, or no anchor")
    total = settings.total_steps(len(data))
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = schedule.make(optimizer, total, settings.warmup_fraction)
    per_epoch = math.ceil(len(data) / settings.batch_size)
    eval_every = settings.eval_every or per_epoch

    restored = checkpoint.restore(params, optimizer, scheduler) if checkpoint else None
    if restored:
        progress, best = restored
    else:
        progress, best = Progress(), None
        if validate:
            progress.val_before = progress.best_score = validate() if val_before is None else val_before
            best = [p.detach().clone() for p in params]
    if validate and progress.lowest_score is None:  # also a checkpoint from before NEAR_BEST, which kept the lowest
        progress.lowest_score = progress.best_score
    if anchor is not None and progress.anchor_weight is None:  # also a checkpoint from before the drift budget
        progress.anchor_weight = settings.anchor.weight
    steering = anchor is not None and probe is not None and settings.anchor.drift_budget is not None
    step_batches = batches(data, settings.batch_size, settings.seed, epochs=math.ceil(total / per_epoch))
    anchor_batches = _anchor_batches(anchor, settings.anchor, settings.seed, total) if anchor else itertools.repeat([])
    started, seconds_before = time.perf_counter(), progress.seconds
    model.train()
    # A run that stopped early and was checkpointed there has nothing left to do.
    end = progress.step if progress.stopped_early else total
    for batch, anchor_batch in itertools.islice(zip(step_batches, anchor_batches), progress.step, end):
        optimizer.zero_grad(set_to_none=True)
        if anchor_batch:
            loss, kl, tokens = batch_loss(batch, anchor_batch)
            (loss + progress.anchor_weight * kl).backward()
            progress.anchor_kl = kl.item()
        else:
            loss, tokens = batch_loss(batch)
            loss.backward()
        optimizer.step()
        scheduler.step()
        progress.step += 1
        progress.tokens += tokens
        progress.last_loss = loss.item()
        if progress.step == 1:
            progress.first_loss = progress.last_loss
        if on_step:
            on_step(progress.step, total, progress.last_loss)
        if steering and progress.step % settings.anchor.drift_check_every == 0:
            progress.anchor_weight = settings.anchor.steered_weight(progress.anchor_weight, probe.drift(model))
        if validate and (progress.step % eval_every == 0 or progress.step == total):
            score = progress.last_score = validate()
            progress.lowest_score = min(progress.lowest_score, score)
            gain = progress.val_before - progress.lowest_score
            if gain > 0 and score <= progress.lowest_score + NEAR_BEST * gain:
                progress.best_score, progress.best_step = score, progress.step
                best = [p.detach().clone() for p in params]
            # Checks fall on multiples of eval_every, so those since the kept one can be counted
            # from the two step numbers; nothing more needs keeping across a resumption.
            stale = progress.step // eval_every - progress.best_step // eval_every
            progress.stopped_early = bool(settings.patience) and stale >= settings.patience and progress.step < total
        progress.seconds = seconds_before + time.perf_counter() - started
        if checkpoint and (progress.step % checkpoint_every == 0 or progress.step == total or progress.stopped_early):
            checkpoint.save(progress, params, best, optimizer, scheduler)
        if progress.stopped_early:
            break
    model.eval()
    if best is not None:
        with torch.no_grad():
            for p, kept in zip(params, best):
                p.copy_(kept)
    return progress


def personalize(
    model: DeviceModel,
    examples: list[TokenizedExample],
    pad_id: int,
    settings: TrainSettings = TrainSettings(),
    val: list[TokenizedExample] | None = None,
    on_step: OnStep | None = None,
    checkpoint: TrainingCheckpoint | None = None,
    checkpoint_every: int = 10,
    anchor: Anchor | None = None,
    val_before: float | None = None,
    probe: DriftProbe | None = None,
) -> TrainResult:
    """Train the model's M on `examples` with `train`: the causal LM loss on their
    labelled tokens, validated on `val`, anchored on `anchor` (clients.anchor: `kept_anchor`
    on a device) with the weight steered by the drift on `probe`. Without an anchor nothing
    holds the model near the base."""

    def batch_loss(batch: list[TokenizedExample]) -> tuple[torch.Tensor, int]:
        return labelled_loss(model, *collate(batch, pad_id), padding_mask(batch))[0], tokens_in(batch)

    def anchored_batch_loss(batch: list[TokenizedExample], rows: AnchorRows) -> tuple[torch.Tensor, torch.Tensor, int]:
        together = batch + [example for example, _ in rows]
        ids, labels = collate(together, pad_id)
        loss, kl = anchored_loss(model, ids, labels[: len(batch)], [targets for _, targets in rows], padding_mask(together))
        return loss, kl, tokens_in(together)

    progress = train(
        model, list(model.weights.parameters()), anchored_batch_loss if anchor else batch_loss, examples, settings,
        anchor=anchor, probe=probe, validate=(lambda: evaluate(model, val, pad_id)) if val else None, val_before=val_before,
        checkpoint=checkpoint, checkpoint_every=checkpoint_every, on_step=on_step,
    )
    return result_of(progress, validated=bool(val))


def result_of(progress: Progress, validated: bool) -> TrainResult:
    """What a run of `train` did, as a job reports it; the validation figures only if it validated."""
    return TrainResult(
        steps=progress.step,
        tokens=progress.tokens,
        seconds=progress.seconds,
        first_loss=progress.first_loss,
        last_loss=progress.last_loss,
        val_before=progress.val_before,
        val_after=progress.best_score if validated else None,
        best_step=progress.best_step if validated else None,
        anchor_kl=progress.anchor_kl,
        anchor_weight=progress.anchor_weight,
        stopped_early=progress.stopped_early,
        val_last=progress.last_score if validated else None,
    )
