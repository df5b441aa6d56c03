"""Choosing the learning rate on validation and cross-validating small jobs (clients.search), and early
stopping in the one loop."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from plora.clients.checkpoint import TrainingCheckpoint
from plora.clients.anchor import anchor_of
from plora.clients.search import LrSearch, cross_validate, drift_key, search_lr, trial_key
from plora.clients.training import DriftProbe, TrainSettings, causal_lm_batch_loss, personalize, train
from plora.storage.errors import ConfigError, DivergedError, NonFiniteError
from tests.unit.test_distillation import ANCHORED, GENERIC, HELD_OUT, NARROW, PAD, peaked_split, sequences, tiny_split

TASK = sequences(8, seed=10)
SEEN = TASK[:4]  # validation on text the job trains on: any rate that learns does better on it
SETTINGS = TrainSettings(steps=8, batch_size=2, anchor=None)
DIVERGES = 100.0  # AdamW moves each entry of M by about lr per step: M blows up at once
LEARNS = 0.05  # a good rate for the tiny random model (1e-3 to 1 all lower its loss within 4 steps)


def _ms(model) -> list[torch.Tensor]:
    return [m.detach().clone() for m in model.weights.parameters()]


@pytest.mark.parametrize("candidates", [(DIVERGES, LEARNS), (LEARNS, DIVERGES)])
def test_the_search_picks_the_rate_that_learns_over_one_that_diverges_and_leaves_m_as_it_was(candidates):
    model = tiny_split()
    result = search_lr(model, TASK, SEEN, PAD, SETTINGS, LrSearch(candidates, trial_fraction=0.25))
    by_rate = {trial.lr: trial for trial in result.trials}
    assert result.chosen == LEARNS
    assert by_rate[LEARNS].improved and by_rate[LEARNS].val_loss < result.start_loss
    assert not by_rate[DIVERGES].improved and not by_rate[DIVERGES].val_loss < result.start_loss
    assert result.steps == 2 * 2  # two trials of a quarter of the 8 steps
    assert all(torch.count_nonzero(m) == 0 for m in _ms(model))  # the starting M (zeros), exactly


def test_the_search_chooses_among_the_rates_that_kept_generic_text_within_the_drift_budget_if_any_did():
    gentle, fast = 0.01, 0.05  # on the narrow task both learn, the fast one more, and it drifts more

    def search(budget: float | None):
        # Checks of the drift every 100 steps never come in 8-step trials: the budget steers no weight here.
        anchor_settings = replace(ANCHORED.anchor, weight=1.0, drift_budget=budget, drift_check_every=100)
        model = peaked_split()
        return search_lr(model, NARROW, NARROW[:2], PAD, replace(ANCHORED, steps=16, anchor=anchor_settings),
                         LrSearch((gentle, fast), trial_fraction=0.5), anchor=anchor_of(model, GENERIC, PAD, 16),
                         probe=DriftProbe.of(model, HELD_OUT, PAD))

    fixed_weight = search(None)
    assert fixed_weight.chosen == fast and all(trial.drift is None for trial in fixed_weight.trials)
    assert drift_key(fast) not in fixed_weight.as_metrics()
    ample = search(1.0)
    by_rate = {trial.lr: trial for trial in ample.trials}
    assert ample.chosen == fast and by_rate[fast].val_loss < by_rate[gentle].val_loss
    assert 0 < by_rate[gentle].drift < by_rate[fast].drift
    between = search((by_rate[gentle].drift + by_rate[fast].drift) / 2)
    assert between.chosen == gentle
    assert between.as_metrics()[drift_key(fast)] == pytest.approx(by_rate[fast].drift)
    assert search(by_rate[gentle].drift / 2).chosen == fast  # none kept within: validation alone chooses


# Rates at which M's numbers stop being finite at the second step, whatever the machine, in two
# ways: the device's own (an infinite rate makes M NaN), or the cloud's (M of about 1e30 is
# finite, but the cloud's activations overflow once its u·M is added to them).
OVERFLOWS = [pytest.param(math.inf, DivergedError, id="the device's numbers"),
             pytest.param(1e30, NonFiniteError, id="the cloud's numbers")]


@pytest.mark.parametrize("rate, error", OVERFLOWS)
def test_a_trial_whose_numbers_stop_being_finite_is_recorded_as_diverged_and_the_search_goes_on(rate, error):
    with pytest.raises(error, match="NaN or infinity"):
        personalize(tiny_split(), TASK, PAD, replace(SETTINGS, lr=rate, steps=4))  # a job at this rate fails
    model = tiny_split()
    result = search_lr(model, TASK, SEEN, PAD, replace(SETTINGS, steps=16), LrSearch((rate, LEARNS), trial_fraction=0.25))
    assert result.chosen == LEARNS and result.as_metrics()[trial_key(rate)] == "diverged"
    assert all(torch.count_nonzero(m) == 0 for m in _ms(model))


@pytest.mark.parametrize("rate, error", OVERFLOWS)
def test_a_fold_whose_numbers_stop_being_finite_counts_as_diverged(rate, error):
    model = tiny_split()
    result = cross_validate(model, TASK, PAD, replace(SETTINGS, lr=rate, steps=4), LrSearch(folds=2))
    assert result.chosen is None and result.as_metrics()["cv_loss"] == "diverged"
    assert all(torch.count_nonzero(m) == 0 for m in _ms(model))


def test_a_search_whose_trials_would_take_more_than_the_budget_is_refused():
    with pytest.raises(ConfigError, match="at most the job's budget"):
        LrSearch((1e-3, 3e-3, 1e-2), trial_fraction=0.5)


def test_early_stopping_ends_the_run_after_patience_checks_without_improvement_and_keeps_the_best_m(tmp_path):
    model = tiny_split()
    params = list(model.weights.parameters())
    scores = iter([5.0, 4.0, 2.0, 3.0, 2.5, 1.0, 0.5])  # before training, then after steps 1, 2, ...
    seen = {}

    def record(step, total, loss):
        seen[step] = _ms(model)

    settings = TrainSettings(lr=0.05, steps=10, batch_size=2, eval_every=1, patience=2, anchor=None)
    checkpoint = TrainingCheckpoint(tmp_path / "checkpoint.safetensors", "job")
    progress = train(model, params, causal_lm_batch_loss(model, PAD), TASK, settings, validate=lambda: next(scores),
                     checkpoint=checkpoint, on_step=record)
    # Steps 3 and 4 did not beat step 2: two checks without improvement, so step 5 never ran.
    assert (progress.step, progress.best_step, progress.best_score, progress.stopped_early) == (4, 2, 2.0, True)
    assert sorted(seen) == [1, 2, 3, 4]
    assert all(torch.equal(a, b) for a, b in zip(_ms(model), seen[2]))
    assert not all(torch.equal(a, b) for a, b in zip(seen[2], seen[4]))  # training had moved on
    # A run killed after stopping early and run again does not train any further.
    again = tiny_split()
    resumed = train(again, list(again.weights.parameters()), causal_lm_batch_loss(again, PAD), TASK, settings,
                    validate=lambda: next(scores), checkpoint=checkpoint, on_step=record)
    assert resumed.step == 4 and all(torch.equal(a, b) for a, b in zip(_ms(again), seen[2]))


REPEATED = sequences(1, seed=3) * 6  # one sequence six times: learning it on some folds helps on the others
ALTERNATING = sequences(2, seed=3) * 3  # two sequences in turn: in 2 folds, each fold learns the other one


def test_cross_validation_trains_each_fold_on_the_others_for_the_whole_budget_and_leaves_m_as_it_was():
    model = tiny_split()
    steps = []
    result = cross_validate(model, REPEATED, PAD, replace(SETTINGS, lr=LEARNS), LrSearch(folds=3),
                            on_step=lambda step, total, loss: steps.append((step, total)))
    assert steps == [(step, 24) for step in range(1, 25)]  # 3 folds of the job's 8 steps, counted together
    assert len(result.start_losses) == len(result.trained_losses) == 3 and result.steps == 24
    assert result.trained_loss < result.start_loss and result.chosen == LEARNS
    assert all(torch.count_nonzero(m) == 0 for m in _ms(model))  # the starting M (zeros), exactly


def test_cross_validation_chooses_nothing_when_training_makes_the_held_out_fold_worse():
    model = tiny_split()
    # Longer, at a higher rate: each fold's loss rises by 0.03 to 0.07, a margin that holds across machines.
    result = cross_validate(model, ALTERNATING, PAD, replace(SETTINGS, lr=0.2, steps=16), LrSearch(folds=2))
    assert all(trained > start + 0.01 for trained, start in zip(result.trained_losses, result.start_losses))
    assert result.chosen is None and "lr" not in result.as_metrics()
    assert all(torch.count_nonzero(m) == 0 for m in _ms(model))


def test_cross_validation_refuses_fewer_examples_than_folds():
    with pytest.raises(ConfigError, match="too few for 2 folds"):
        cross_validate(tiny_split(), REPEATED[:1], PAD, SETTINGS, LrSearch())
    with pytest.raises(ConfigError, match="folds >= 2"):
        LrSearch(folds=1)
