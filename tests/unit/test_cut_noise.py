"""Noise at the cut: what the cloud receives carries it, fresh on every pass, at the level asked;
a device keeps its noise across openings; and noise strong enough moves the states off the
embedding rows that would name the tokens (the audit measures how strong it must be)."""

from __future__ import annotations

import math

import pytest
import torch

from plora.clients.cut_noise import CutNoise
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.recording import Recording, read_session
from plora.platform.audit.attacks import nearest_rows
from plora.platform.runtime import init_device, open_device, split_embedded
from plora.storage.errors import ConfigError
from tests.conftest import tiny_backbone

VOCAB = 96  # conftest's tiny model


def states_at_the_cut(tmp_path, noise: CutNoise | None, ids: torch.Tensor, passes: int = 1, device_layers: int = 0):
    """What the cloud recorded entering its first layer, pass after pass, and the device's model.
    The noise is seeded: a test that checks a share of tokens must not pass or fail by the draw."""
    split = split_embedded(tiny_backbone(), PrivateLoRAConfig(rank=4, device_layers=device_layers), noise, noise_seed=0)
    split.link.taps.append(Recording(tmp_path).session("device", "session", "tiny"))
    with torch.no_grad():
        for _ in range(passes):
            split(ids)
    return [step.tensors["hidden_in"] for step in read_session(tmp_path / "device" / "session")], split


@pytest.mark.parametrize("text, problem", [
    ("gaussian", "is not KIND:LEVEL"), ("gaussian:x", "is not KIND:LEVEL"), ("laplace:1", "unknown cut noise 'laplace'"),
    ("gaussian:0", "must be a positive number"), ("dchi:-2", "must be a positive number"), ("gaussian:nan", "must be a positive number"),
])
def test_a_noise_is_named_kind_and_positive_level(text, problem):
    with pytest.raises(ConfigError, match=problem):
        CutNoise.parse(text)
    assert str(CutNoise.parse("dchi:200")) == "dchi:200" and CutNoise.parse("gaussian:0.5") == CutNoise("gaussian", 0.5)


@pytest.mark.parametrize("device_layers", [0, 1])
def test_the_cloud_receives_each_pass_with_fresh_gaussian_noise_at_the_level_asked(tmp_path, device_layers):
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    (exact,), _ = states_at_the_cut(tmp_path / "exact", None, ids, device_layers=device_layers)
    (first, second), _ = states_at_the_cut(tmp_path / "noisy", CutNoise("gaussian", 0.5), ids, passes=2, device_layers=device_layers)
    for noisy in (first, second):
        ratio = (noisy - exact).pow(2).mean(-1).sqrt() / exact.pow(2).mean(-1).sqrt()  # per position
        assert ratio.mean() == pytest.approx(0.5, rel=0.1)
    assert not torch.allclose(first, second)  # a pass sent again is a new draw, not the same one


def test_dchi_noise_has_length_d_over_epsilon_in_a_random_direction(tmp_path):
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    (exact,), _ = states_at_the_cut(tmp_path / "exact", None, ids)
    (noisy,), _ = states_at_the_cut(tmp_path / "noisy", CutNoise("dchi", 40.0), ids)
    noise = (noisy - exact).flatten(0, 1)
    d = noise.shape[-1]
    assert noise.norm(dim=-1).mean() == pytest.approx(d / 40.0, rel=0.05)  # Gamma(d, 1/ε) has mean d/ε
    directions = noise / noise.norm(dim=-1, keepdim=True)
    assert directions.mean(0).norm() < 3 / math.sqrt(len(directions))  # no preferred direction


def test_weak_noise_hides_nothing_from_the_nearest_row_and_strong_noise_hides_most(tmp_path):
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    table = tiny_backbone().model.get_input_embeddings().weight
    shares = {}
    for level in (0.05, 4.0):
        (states,), _ = states_at_the_cut(tmp_path / str(level), CutNoise("gaussian", level), ids)
        shares[level] = float((nearest_rows(table, states.flatten(0, 1))[:, 0] == ids.flatten()).float().mean())
    assert shares[0.05] == 1.0
    assert shares[4.0] < 0.2  # chance is 1/96


def test_training_through_noise_still_reaches_m(tmp_path):
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    _, split = states_at_the_cut(tmp_path, CutNoise("gaussian", 1.0), ids)
    split(ids).logsumexp(-1).mean().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in split.weights.parameters())


def test_a_device_keeps_its_noise_and_a_device_without_keeps_none(tmp_path, tiny_checkpoint):
    init_device(tmp_path / "noisy", str(tiny_checkpoint), PrivateLoRAConfig(rank=4), cut_noise=CutNoise("dchi", 200.0))
    init_device(tmp_path / "plain", str(tiny_checkpoint), PrivateLoRAConfig(rank=4))
    noisy, plain = open_device(tmp_path / "noisy"), open_device(tmp_path / "plain")
    try:
        assert noisy.model.cut_noise == CutNoise("dchi", 200.0) and noisy.store.record.cut_noise == CutNoise("dchi", 200.0)
        assert plain.model.cut_noise is None and "cut_noise" not in (tmp_path / "plain" / "device.json").read_text()
    finally:
        noisy.close()
        plain.close()
