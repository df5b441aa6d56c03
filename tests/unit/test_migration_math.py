"""Carrying M to a new backbone version, in process on tiny models: copy and distill."""

from __future__ import annotations

import pytest
import torch

from plora.clients.distillation import mean_kl, teacher_targets
from plora.clients.migration import DistillSettings, can_copy, copy_weights, distill
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.platform.runtime import split_embedded
from plora.storage.errors import ConfigError
from tests.conftest import tiny_backbone
from tests.unit.test_distillation import PAD, random_ms, sequences


def peaked(seed: int, config: PrivateLoRAConfig):
    return split_embedded(tiny_backbone(seed, initializer_range=0.3), config)


def test_copy_needs_the_same_shapes_and_carries_m_exactly():
    old, same, wider = peaked(0, PrivateLoRAConfig(rank=8)), peaked(1, PrivateLoRAConfig(rank=8, seed=5)), peaked(1, PrivateLoRAConfig(rank=16))
    random_ms(old)
    assert can_copy(old.weights, same.weights) and not can_copy(old.weights, wider.weights)
    copy_weights(old.weights, same.weights)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(old.weights.named_tensors(), same.weights.named_tensors()))
    with pytest.raises(ConfigError, match="use distill"):
        copy_weights(old.weights, wider.weights)


def test_distill_moves_the_new_version_towards_the_old_model_with_its_m():
    config = PrivateLoRAConfig(rank=8)
    old, new = peaked(0, config), peaked(1, PrivateLoRAConfig(rank=8, seed=3))  # other weights, fresh projections
    random_ms(old, std=0.5)
    texts = sequences(16, seed=4, prompt=3)
    targets = teacher_targets(old, texts, PAD, top_k=8)
    start = mean_kl(new, texts, targets, PAD)
    progress = distill(new, texts, targets, PAD, DistillSettings(steps=30, lr=5e-2, top_k=8))
    assert progress.step == 30 and progress.tokens > 0
    assert mean_kl(new, texts, targets, PAD) < 0.7 * start
