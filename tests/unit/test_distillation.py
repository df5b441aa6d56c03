"""Distillation targets and loss, the base-model anchor, and what the anchor does to training."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from plora.clients.anchor import OPENINGS, PROBES, REQUESTS, Anchor, AnchorSettings, anchor_of, base_model, write_anchor, write_probe
from plora.clients.data import IGNORE_INDEX, TokenizedExample, collate
from plora.clients.distillation import distillation_loss, labelled_positions, mean_kl, teacher_targets
from plora.clients.training import DriftProbe, TrainSettings, personalize
from plora.cloud_backbone import loading
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.platform.runtime import split_embedded
from plora.storage.errors import ConfigError
from tests.conftest import TINY, tiny_backbone

VOCAB = TINY["vocab_size"]
PAD = 0


def tiny_split():
    return split_embedded(tiny_backbone(), PrivateLoRAConfig(rank=4))


def peaked_split():
    """Larger random weights give peaked next-token distributions, so drift from them shows."""
    return split_embedded(tiny_backbone(initializer_range=0.3), PrivateLoRAConfig(rank=8))


def random_ms(model, seed: int = 1, std: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.weights.parameters():
            m.copy_(torch.randn(m.shape, generator=generator) * std)


def sequences(count: int, seed: int, length: int = 12, prompt: int = 0) -> list[TokenizedExample]:
    """Random token sequences of varying length; the first `prompt` tokens are unlabelled."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        ids = torch.randint(1, VOCAB, (length - i % 3,), generator=generator).tolist()
        out.append(TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def fixed_logits(seed: int = 0):
    """A logits source that is a fixed random function of position and token."""
    table = torch.randn(64, VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        return table[torch.arange(ids.shape[1])[None, :], ids]  # (B, T, V)

    return logits_of


def test_targets_store_the_teachers_top_k_at_labelled_positions():
    examples = sequences(3, seed=0, prompt=4)
    logits_of, k = fixed_logits(), 5
    targets = teacher_targets(logits_of, examples, PAD, top_k=k, batch_size=2)
    assert len(targets) == len(examples)
    for example, target in zip(examples, targets):
        positions = torch.arange(3, len(example.input_ids) - 1)  # logit t predicts labelled token t+1 >= 4
        assert torch.equal(target.positions, positions) and torch.equal(labelled_positions(example), positions)
        full = logits_of(torch.tensor([example.input_ids]))[0, positions].log_softmax(-1)
        best = full.topk(k, dim=-1)
        assert target.top_ids.dtype == torch.int32 and target.top_ids.shape == (len(positions), k)
        assert torch.equal(target.top_ids.long(), best.indices)
        assert torch.allclose(target.top_logprobs, best.values, atol=1e-6)
        total = torch.cat([target.top_logprobs, target.rest_logprob[:, None]], -1).logsumexp(-1)
        assert torch.allclose(total, torch.zeros_like(total), atol=1e-5)  # top k and the tail: all the mass


def test_kl_is_zero_for_the_teacher_itself_and_positive_for_another_model():
    model, examples = tiny_split(), sequences(5, seed=1)
    targets = teacher_targets(model, examples, PAD, top_k=8)
    assert mean_kl(model, examples, targets, PAD) == pytest.approx(0.0, abs=1e-6)
    random_ms(model)
    assert mean_kl(model, examples, targets, PAD) > 1e-3


@pytest.mark.parametrize("k", [1, 8, VOCAB - 1])
def test_merged_tail_kl_is_a_lower_bound_of_the_full_kl_and_exact_when_only_one_token_is_merged(k):
    examples = sequences(4, seed=2)
    teacher, student = fixed_logits(0), fixed_logits(1)
    ids, _ = collate(examples, PAD)
    loss = distillation_loss(student(ids), teacher_targets(teacher, examples, PAD, top_k=k))
    rows = [(r, t) for r, e in enumerate(examples) for t in labelled_positions(e).tolist()]
    index = (torch.tensor([r for r, _ in rows]), torch.tensor([t for _, t in rows]))
    student_logprobs, teacher_logprobs = student(ids)[index].log_softmax(-1), teacher(ids)[index].log_softmax(-1)
    full = F.kl_div(student_logprobs, teacher_logprobs, log_target=True, reduction="batchmean")
    assert 0 < loss.item() <= full.item() + 1e-5
    if k == VOCAB - 1:
        assert loss.item() == pytest.approx(full.item(), rel=1e-4)


def test_the_loss_reaches_m_through_the_split():
    model, examples = tiny_split(), sequences(3, seed=3)
    random_ms(model, std=0.1)
    with base_model(model):
        targets = teacher_targets(model, examples, PAD)
    ids, _ = collate(examples, PAD)
    distillation_loss(model(ids), targets).backward()
    grads = [m.grad for m in model.weights.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_base_model_zeroes_m_and_puts_it_back():
    model, examples = tiny_split(), sequences(2, seed=4)
    ids, _ = collate(examples, PAD)
    base_logits = model(ids).detach()
    random_ms(model)
    held = [m.detach().clone() for m in model.weights.parameters()]
    with base_model(model):
        assert torch.equal(model(ids), base_logits)
    assert all(torch.equal(m, h) for m, h in zip(model.weights.parameters(), held))


def test_bad_inputs_are_config_errors():
    examples = sequences(2, seed=5)
    with pytest.raises(ConfigError, match="vocabulary"):
        teacher_targets(fixed_logits(), examples, PAD, top_k=VOCAB)
    targets = teacher_targets(fixed_logits(), examples, PAD, top_k=4)
    ids, _ = collate(examples, PAD)
    with pytest.raises(ConfigError, match="rows"):
        distillation_loss(fixed_logits()(ids), targets[:1])
    with pytest.raises(ConfigError, match="anchor"):
        AnchorSettings(weight=0)
    with pytest.raises(ConfigError, match="drift budget"):
        AnchorSettings(drift_budget=0)
    with pytest.raises(ConfigError, match="max_weight"):
        AnchorSettings(weight=3, max_weight=2)
    with pytest.raises(ConfigError, match="settings.anchor is None"):
        personalize(tiny_split(), examples, PAD, TrainSettings(steps=1, anchor=None), anchor=Anchor(examples, targets, PAD))


# Narrow data: one short sequence repeated, which a high learning rate overfits.
NARROW = [TokenizedExample([5, 17, 42, 8, 61, 23], [5, 17, 42, 8, 61, 23])] * 4
GENERIC, HELD_OUT = sequences(16, seed=6), sequences(8, seed=7)
ANCHORED = TrainSettings(lr=0.05, steps=30, batch_size=4, anchor=AnchorSettings(weight=10.0, rows=4, top_k=16))


def _distance_from_base(model) -> float:
    with base_model(model):
        targets = teacher_targets(model, HELD_OUT, PAD)
    return mean_kl(model, HELD_OUT, targets, PAD)


def test_the_anchor_keeps_a_trained_model_closer_to_the_base_on_unseen_text():
    free, anchored = peaked_split(), peaked_split()
    free_result = personalize(free, NARROW, PAD, ANCHORED)  # no anchor text: nothing holds it
    anchored_result = personalize(anchored, NARROW, PAD, ANCHORED, anchor=anchor_of(anchored, GENERIC, PAD, ANCHORED.anchor.top_k))
    assert free_result.anchor_kl is None and anchored_result.anchor_kl is not None
    assert _distance_from_base(anchored) < 0.5 * _distance_from_base(free)
    assert anchored_result.last_loss < 0.5 * anchored_result.first_loss  # and the task is still learned


def test_the_anchor_is_the_base_model_even_when_the_device_already_holds_a_trained_m():
    model = peaked_split()
    random_ms(model, std=0.3)  # an earlier round's M
    before = _distance_from_base(model)
    personalize(model, NARROW, PAD, ANCHORED, anchor=anchor_of(model, GENERIC, PAD, ANCHORED.anchor.top_k))
    # Anchored to the M it started from, it would end further from the base (1.15 against 1.03).
    assert _distance_from_base(model) < 0.9 * before


def test_anchor_text_is_the_base_models_own_and_the_same_for_the_same_seed(tiny_checkpoint):
    backbone = loading.load(str(tiny_checkpoint))
    model, tok = split_embedded(backbone, PrivateLoRAConfig(rank=4)), backbone.tokenizer
    random_ms(model)  # written with M zeroed all the same
    settings = AnchorSettings(texts=3, new_tokens=5)
    first, again, other = (write_anchor(model, tok, settings, seed) for seed in (0, 0, 1))
    assert [e.input_ids for e in first] == [e.input_ids for e in again] != [e.input_ids for e in other]
    for example in first:
        assert example.labels == example.input_ids  # every position anchors
        assert any(prompt in tok.decode(example.input_ids) for prompt in REQUESTS + OPENINGS)
    with base_model(model):
        base_first = write_anchor(model, tok, settings, 0)
    assert [e.input_ids for e in base_first] == [e.input_ids for e in first]


def test_generic_drift_is_zero_at_the_base_model_and_grows_as_m_moves_it():
    model = peaked_split()
    random_ms(model, std=1.0)  # the probe's reference is the base model, whatever M the model holds
    probe = DriftProbe.of(model, HELD_OUT, PAD)
    with base_model(model):
        assert probe.drift(model) == pytest.approx(0.0, abs=1e-6)
    model = peaked_split()
    personalize(model, NARROW, PAD, replace(ANCHORED, anchor=None))
    drift = probe.drift(model)
    assert drift > 0.01
    random_ms(model, std=1.0)  # and with the M held, not the base, whatever it is
    assert probe.drift(model) != pytest.approx(drift, rel=0.01)


def test_the_budget_scales_the_weight_by_drift_over_budget_within_its_bounds():
    settings = AnchorSettings(weight=3.0, drift_budget=0.02, max_weight=10.0)
    assert settings.steered_weight(3.0, 0.03) == pytest.approx(4.5)
    assert settings.steered_weight(3.0, 0.5) == 10.0  # at most 4x, and at most max_weight
    assert settings.steered_weight(2.5, 0.5) == 10.0
    assert settings.steered_weight(2.0, 0.5) == 8.0
    assert settings.steered_weight(8.0, 0.01) == 4.0  # within the budget it falls back
    assert settings.steered_weight(4.0, -0.01) == 3.0  # by half at most, and never below weight


def test_a_job_over_its_drift_budget_is_anchored_harder_and_drifts_less_and_one_within_trains_as_at_its_weight():
    light = replace(ANCHORED.anchor, weight=1.0, max_weight=50.0, drift_check_every=5)

    def job(budget: float | None):
        model = peaked_split()
        probe = DriftProbe.of(model, HELD_OUT, PAD)
        settings = replace(ANCHORED, anchor=replace(light, drift_budget=budget))
        result = personalize(model, NARROW, PAD, settings, anchor=anchor_of(model, GENERIC, PAD, light.top_k), probe=probe)
        return result, probe.drift(model), [m.detach().clone() for m in model.weights.parameters()]

    fixed, fixed_drift, fixed_ms = job(None)
    within, _, within_ms = job(10 * fixed_drift)
    over, over_drift, _ = job(fixed_drift / 4)
    assert fixed.anchor_weight == within.anchor_weight == 1.0
    assert all(torch.equal(a, b) for a, b in zip(fixed_ms, within_ms))
    assert over.anchor_weight > 4.0 and over_drift < 0.6 * fixed_drift
    assert over.last_loss < 0.5 * over.first_loss  # the task is still learned


def test_the_probe_is_the_base_models_text_on_prompts_no_anchor_holds(tiny_checkpoint):
    backbone = loading.load(str(tiny_checkpoint))
    model, tok = split_embedded(backbone, PrivateLoRAConfig(rank=4)), backbone.tokenizer
    assert not {prompt for prompt, _ in PROBES} & set(REQUESTS + OPENINGS)
    random_ms(model)
    probe = write_probe(model, tok, 0)
    assert len(probe) == len(PROBES) and all(e.labels == e.input_ids for e in probe)
    with base_model(model):
        assert [e.input_ids for e in write_probe(model, tok, 0)] == [e.input_ids for e in probe]
