"""Choosing a personalization job's learning rate on the device, from its validation split, and
whether to train at all on data too small to hold one out.

Users' data differ tenfold in size, so no one learning rate fits every job. `search_lr` tries a
few candidate rates, each from the job's starting M for a short run of its own, on
`clients.training.train` like every other job, and picks the one whose M scored best on the
validation split among those that kept generic text within the job's drift budget (all of them,
if none did); if none beat the starting M, there is nothing worth training and the job keeps
it. The chosen rate then runs the job's whole budget again from the starting M (see
`personalization_settings`), rather than continuing from its trial's M: the job is then exactly
a plain job pinned to that rate, with the same schedule, batches and checkpoints, so a job
killed mid-way resumes as any other does, and a trial's M need not outlive the search.

Cost, for a job of budget B optimizer steps with K candidates tried for ⌊f·B⌋ steps each (f the
trial fraction): at most B + K·⌊f·B⌋ optimizer steps and K more validation passes than a plain
job of the same settings (the starting M is scored once, for every trial and the job alike),
and under a drift budget K passes over the probe (about 1.4 s each on the embedded backbone).
The defaults (K = 2, f = 1/4) give at most 1.5·B steps and 2 passes more, at most twice a plain
job's steps plus validation passes; `LrSearch` refuses K·f > 1, and a budget under 1/f steps is
not searched at all.

Most users start with a handful of examples, too few to hold a validation split out (fewer than
10). Training on them always moves M, and from a good start (the fleet's M₀) it moved it the
wrong way: on `plora bench federated`'s 8 new speakers with 5 blocks each, the job at a fixed rate
lost to M₀ alone on held-out text for every one of them. `cross_validate` asks the data instead:
with F folds, each fold is scored after training on the others, against the starting M on it,
and the job trains (on all its examples, at its rate) only if the mean over the folds improved.
Each fold trains for the job's own B steps, not B/F: AdamW moves each entry of M by about the rate
at every step whatever the batch, so how far the job would move M away from its start is set by
its steps, and a fold that trained for fewer would judge a shorter move than the job makes (on the
bench, folds of B/2 steps let 3 of the 8 speakers' jobs leave M₀, and each of them lost to it).
That costs F·B steps and two passes over the data more than the plain job: 3x its steps with the
default 2 folds, on jobs of at most 9 examples (B ≤ 6 steps at the default batch and epochs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from plora.clients.anchor import Anchor
from plora.clients.data import TokenizedExample
from plora.clients.device_model import DeviceModel
from plora.clients.training import DriftProbe, OnStep, TrainResult, TrainSettings, evaluate, personalize
from plora.storage.errors import ConfigError, DivergedError, NonFiniteError


@dataclass(frozen=True)
class LrSearch:
    candidates: tuple[float, ...] = (2e-3, 6e-3)
    """Rates to try, 3x apart around the 5e-3 personalization long used. On the embedded
    SmolLM2 (a persona's 22 training facts, 2 held out; 12-step trials from M = 0, unanchored)
    the held-out loss went from 3.95 to 2.39 at 7e-4, 1.72 at 2e-3, 1.18 at 6e-3, 1.39 at 2e-2
    and 5.04 at 6e-2 (diverged). 2e-2 was a candidate too, until `plora bench quality` showed
    the search choosing it on small validation splits at a cost the split does not see: on two
    of five Shakespeare speakers, generic-text NLL +22%, and one speaker's held-out loss worse
    than before the job. With these two, the same speakers kept 98% and gained, respectively
    (held-out gain 0.868 against 0.883, and 0.219 against -0.038 nats), with generic NLL +4.6%
    and +1.2%; the other three chose 6e-3 either way. The tiny random test model wants rates
    ten times larger (0.1 to 0.3), so tests give their own."""
    trial_fraction: float = 0.25
    """Each trial's optimizer steps, as a share of the job's budget."""
    patience: int = 2
    """Early stopping of the chosen rate's run, when the job's settings set none (TrainSettings.patience)."""
    folds: int = 2
    """Folds of the cross-validation that decides, for a job with no validation split, whether
    training at the job's rate beats its starting M (`cross_validate`). Each fold trains for the
    job's whole budget, so the job costs folds + 1 times a plain one."""

    def __post_init__(self) -> None:
        if not self.candidates or not all(lr > 0 for lr in self.candidates):
            raise ConfigError(f"candidates must be one or more rates > 0, got {self.candidates}")
        if not 0 < self.trial_fraction * len(self.candidates) <= 1:
            raise ConfigError(f"trials must take at most the job's budget (len(candidates) x trial_fraction <= 1), got "
                              f"{len(self.candidates)} x {self.trial_fraction}; try fewer candidates or a smaller fraction")
        if self.patience < 1:
            raise ConfigError(f"patience must be >= 1, got {self.patience}")
        if self.folds < 2:
            raise ConfigError(f"cross-validation needs folds >= 2, got {self.folds}")

    def trial_steps(self, budget: int) -> int:
        """Optimizer steps of each trial for a job of `budget` steps; 0: too few to search."""
        return int(budget * self.trial_fraction)


@dataclass(frozen=True)
class Trial:
    lr: float
    val_loss: float
    """The validation loss of the trial's M, at its end (NaN if it diverged)."""
    improved: bool
    """Whether the trial's M beat the starting M on validation."""
    drift: float | None = None
    """How much worse than the base model the trial's M predicts generic text (DriftProbe.drift,
    at its end); None when the job has no drift budget, or the trial diverged."""


@dataclass(frozen=True)
class SearchResult:
    trials: tuple[Trial, ...]
    start_loss: float  # the starting M's validation loss
    steps: int  # optimizer steps the trials ran, all together
    drift_budget: float | None = None  # the job's (AnchorSettings.drift_budget), if its trials measured drift

    @property
    def chosen(self) -> float | None:
        """The rate whose trial scored best on validation among those that beat the starting M
        and kept generic text within the drift budget, or among all that beat it if none kept
        within; None when no trial beat the starting M.

        A validation split of a few examples is one draw, and a rate that trains too fast for
        the data can win on it while it overfits: on a Shakespeare speaker's 2 validation
        blocks, 6e-3's 22-step trial scored 4.360 against 2e-3's 4.404, with a held-out gain of
        0.056 nats against 0.151 and generic text (the probe) +4.8% against +1.2%. The drift
        the job is bound to keep within anyway tells the two apart where validation cannot."""
        improved = [trial for trial in self.trials if trial.improved]
        within = [trial for trial in improved
                  if self.drift_budget is None or (trial.drift is not None and trial.drift <= self.drift_budget)]
        return min(within or improved, key=lambda trial: trial.val_loss).lr if improved else None

    def as_metrics(self) -> dict[str, float | int | str]:
        """The trials as flat metrics, for the job's registry record: each rate's validation loss
        under its own key (a string where the loss is not finite), the chosen rate if any, and
        the trials' steps."""
        metrics: dict[str, float | int | str] = {
            trial_key(t.lr): t.val_loss if math.isfinite(t.val_loss) else "diverged" for t in self.trials
        }
        metrics.update({drift_key(t.lr): t.drift for t in self.trials if t.drift is not None})
        metrics["search_steps"] = self.steps
        if self.chosen is not None:
            metrics["lr"] = self.chosen
        return metrics


DIVERGED = (DivergedError, NonFiniteError)
"""How a trial or a fold that diverged ends, besides a NaN score: the device's own numbers, or
the service's, stopped being finite. An honest service sends NaN or infinity only when the
trial's M made its activations overflow; a hostile one could steer a trial's score as it likes
with finite numbers anyway, so counting its NaN as divergence gives it nothing."""


def trial_key(lr: float) -> str:
    """The metric under which a trial's validation loss is recorded."""
    return f"val_loss_at_lr_{lr:g}"


def drift_key(lr: float) -> str:
    """The metric under which a trial's drift on generic text is recorded."""
    return f"drift_at_lr_{lr:g}"


def personalization_settings(settings: TrainSettings, search: LrSearch, lr: float) -> TrainSettings:
    """The job's settings once `lr` is chosen: the whole budget at that rate, stopping early
    after `search.patience` checks without improvement unless the settings say otherwise."""
    return replace(settings, lr=lr, patience=settings.patience or search.patience)


def search_lr(
    model: DeviceModel,
    train: list[TokenizedExample],
    val: Sequence[TokenizedExample],
    pad_id: int,
    settings: TrainSettings,
    search: LrSearch,
    *,
    val_before: float | None = None,
    anchor: Anchor | None = None,
    probe: DriftProbe | None = None,
    on_step: OnStep | None = None,
) -> SearchResult:
    """Try each of `search.candidates` for `search.trial_steps` of the job's budget, each from
    the model's M as it is now, and score each on `val`. The model's M is left as it was.

    A trial is a short job of its own (`personalize` with the settings' batches, anchor, drift
    probe and schedule shape over the trial's steps), validated once, at its end; with an anchor
    under a drift budget and a probe, its drift is measured there too (SearchResult.chosen).
    `val_before` is the starting M's validation loss if the caller has it. `on_step(step, total,
    loss)` counts the steps of all trials together.
    """
    if not val:
        raise ConfigError("a learning-rate search needs a validation split; pin the rate instead")
    start_loss = evaluate(model, list(val), pad_id) if val_before is None else val_before
    budget = settings.anchor.drift_budget if anchor is not None and probe is not None and settings.anchor else None

    def run_trial(trial: TrainSettings, trial_step: OnStep) -> TrainResult:
        return personalize(model, train, pad_id, trial, list(val), on_step=trial_step, anchor=anchor, val_before=start_loss,
                           probe=probe)

    return search_rates(list(model.weights.parameters()), run_trial, settings.total_steps(len(train)), settings, search,
                        start_loss, on_step, drift=None if budget is None else (lambda: probe.drift(model)),
                        drift_budget=budget)


def search_rates(
    params: list[torch.nn.Parameter],
    run_trial: Callable[[TrainSettings, OnStep], TrainResult],
    budget: int,
    settings: TrainSettings,
    search: LrSearch,
    start_loss: float,
    on_step: OnStep | None = None,
    *,
    drift: Callable[[], float] | None = None,
    drift_budget: float | None = None,
) -> SearchResult:
    """The search of `search_lr` for any trainable `params`: `run_trial(settings, on_step)` trains
    them with those settings, validating at the end, and reports its TrainResult; `budget` is the
    job's optimizer steps and `start_loss` the starting parameters' validation loss. `drift()`,
    if given, measures the trained parameters' drift on generic text after each trial, which the
    choice keeps within `drift_budget`. The parameters are left as they were. Benchmarks search
    PEFT LoRA's rates with it the same way (without a drift budget: LoRA has no anchor)."""
    steps = search.trial_steps(budget)
    if steps < 1:
        raise ConfigError(f"a budget of {budget} steps is too small to search; pin the rate")
    start = [p.detach().clone() for p in params]
    trials = []
    for index, lr in enumerate(search.candidates):
        done = index * steps

        def trial_step(step: int, total: int, loss: float, done: int = done) -> None:
            if on_step:
                on_step(done + step, steps * len(search.candidates), loss)

        trial = replace(settings, lr=lr, steps=steps, epochs=None, eval_every=steps, patience=None)
        try:
            result = run_trial(trial, trial_step)
            trials.append(Trial(lr, result.val_last, result.best_step > 0, drift() if drift else None))
        except DIVERGED:
            trials.append(Trial(lr, math.nan, False))
        _restore(params, start)
    return SearchResult(tuple(trials), start_loss, steps * len(search.candidates), drift_budget if drift else None)


@dataclass(frozen=True)
class CrossValidation:
    """How training at `lr` did on each fold of a job's examples it did not train on."""

    lr: float
    start_losses: tuple[float, ...]
    """Per fold, the starting M's loss on it."""
    trained_losses: tuple[float, ...]
    """Per fold, the loss on it after training on the other folds (NaN if that diverged)."""
    steps: int  # optimizer steps the folds ran, all together

    @property
    def start_loss(self) -> float:
        return sum(self.start_losses) / len(self.start_losses)

    @property
    def trained_loss(self) -> float:
        return sum(self.trained_losses) / len(self.trained_losses)

    @property
    def chosen(self) -> float | None:
        """The rate, if training at it beat the starting M on the held-out folds; else None."""
        return self.lr if self.trained_loss < self.start_loss else None  # NaN (diverged) compares False

    def as_metrics(self) -> dict[str, float | int | str]:
        """Flat metrics for the job's registry record, as SearchResult.as_metrics."""
        trained = self.trained_loss
        metrics: dict[str, float | int | str] = {
            "cv_folds": len(self.start_losses), "cv_start_loss": self.start_loss,
            "cv_loss": trained if math.isfinite(trained) else "diverged", "search_steps": self.steps,
        }
        if self.chosen is not None:
            metrics["lr"] = self.chosen
        return metrics


def cross_validate(
    model: DeviceModel,
    examples: list[TokenizedExample],
    pad_id: int,
    settings: TrainSettings,
    search: LrSearch,
    *,
    anchor: Anchor | None = None,
    probe: DriftProbe | None = None,
    on_step: OnStep | None = None,
) -> CrossValidation:
    """Split `examples` (already shuffled) into `search.folds` folds; train from the model's M
    as it is now on all folds but one, for the job's budget, at `settings.lr` with its anchor, drift probe and
    schedule, and score the fold left out; restore M after each. `on_step(step, total, loss)`
    counts the steps of all folds together."""
    folds, steps = search.folds, settings.total_steps(len(examples))
    if len(examples) < folds:
        raise ConfigError(f"{len(examples)} examples are too few for {folds} folds; pin the rate")
    trial = replace(settings, steps=steps, epochs=None, eval_every=steps, patience=None)
    params = list(model.weights.parameters())
    start = [p.detach().clone() for p in params]
    start_losses, trained_losses = [], []
    for fold in range(folds):
        held = examples[fold::folds]
        fit = [example for index, example in enumerate(examples) if index % folds != fold]

        def fold_step(step: int, total: int, loss: float, done: int = fold * steps) -> None:
            if on_step:
                on_step(done + step, steps * folds, loss)

        start_losses.append(evaluate(model, held, pad_id))
        try:
            result = personalize(model, fit, pad_id, trial, held, on_step=fold_step, anchor=anchor, val_before=start_losses[-1],
                                 probe=probe)
            trained_losses.append(result.val_last)
        except DIVERGED:
            trained_losses.append(math.nan)
        _restore(params, start)
    return CrossValidation(settings.lr, tuple(start_losses), tuple(trained_losses), steps * folds)


@torch.no_grad()
def _restore(params: list[torch.nn.Parameter], kept: list[torch.Tensor]) -> None:
    """Put the starting values back after a trial or a fold."""
    for p, value in zip(params, kept):
        p.copy_(value)
