"""The adapter file: round trip, integrity, atomic writes and identity checks."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from plora.clients import adapter_file
from plora.clients.adapter_file import AdapterHeader, load_adapter, save_adapter
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig, m_name
from plora.cloud_backbone.privatelora import AdapterWeights
from plora.cloud_backbone.protocol.messages import BackboneIdentity
from plora.storage.errors import AdapterFileError

CONFIG = PrivateLoRAConfig(rank=4, targets=("q", "v"), seed=3, device_layers=1)
IDENTITY = BackboneIdentity("smol-test", "ab" * 32, num_layers=3, hidden_size=8, adapter=CONFIG)
HEADER = AdapterHeader(IDENTITY, steps=17)


def read_adapter(path: Path) -> tuple[dict[str, torch.Tensor], AdapterHeader]:
    return load_adapter(path, IDENTITY)


def make_weights(seed: int = 0) -> AdapterWeights:
    weights = AdapterWeights(CONFIG, IDENTITY.num_layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in weights.ms.values():
            param.copy_(torch.randn(param.shape, generator=gen))
    return weights


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, make_weights(), HEADER)
    return path


def test_round_trip_preserves_tensors_and_header(saved: Path) -> None:
    tensors, header = read_adapter(saved)
    expected = {name: t.detach() for name, t in make_weights().named_tensors()}
    assert header == HEADER
    assert tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor)



def test_a_configuration_adapting_some_layers_saves_and_loads_their_m_only(tmp_path: Path) -> None:
    subset = dataclasses.replace(IDENTITY, adapter=dataclasses.replace(CONFIG, adapt_layers=(0, 2)))
    weights = AdapterWeights(subset.adapter, subset.num_layers)
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, weights, AdapterHeader(subset))
    tensors, _ = load_adapter(path, subset)
    assert sorted(tensors) == sorted(m_name(layer, t) for layer in (0, 2) for t in ("q", "v"))
    with pytest.raises(AdapterFileError, match=r"unexpected tensors \['layers.1.self_attn.q_proj.M'"):
        save_adapter(path, {**tensors, m_name(1, "q"): torch.zeros(4, 4)}, AdapterHeader(subset))

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_preserves_half_precision_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    path = tmp_path / "a.safetensors"
    tensors = {name: t.detach().to(dtype) for name, t in make_weights().named_tensors()}
    save_adapter(path, tensors, HEADER)
    loaded, _ = read_adapter(path)
    assert all(loaded[n].dtype == dtype and torch.equal(loaded[n], t) for n, t in tensors.items())


def test_loaded_tensors_fit_adapter_weights(saved: Path) -> None:
    tensors, header = read_adapter(saved)
    weights = AdapterWeights(header.identity.adapter, header.identity.num_layers)
    weights.load_named_tensors(tensors)
    assert torch.equal(weights.ms["2_v"], make_weights().ms["2_v"].detach())


def test_file_holds_only_m_tensors_and_documented_metadata(saved: Path) -> None:
    names = set(safetensors.torch.load_file(saved))
    assert names == {m_name(layer, t) for layer in range(3) for t in ("q", "v")}
    with safetensors.safe_open(saved, "pt") as handle:
        metadata = handle.metadata()
    assert set(metadata) == {
        "format", "backbone_name", "backbone_hash", "adapter_config",
        "num_layers", "steps", "created_at", "checksum",
    }
    assert metadata["format"] == "plora-adapter/1"
    assert metadata["created_at"].endswith("+00:00")


def _fail_replace(*args: object) -> None:
    raise OSError("simulated crash before rename")


def _fail_serialize(*args: object, **kwargs: object) -> bytes:
    raise RuntimeError("simulated crash while serializing")


def _fail_fsync(fd: int) -> None:
    raise OSError("simulated crash while flushing")


@pytest.mark.parametrize(
    "target, attribute, failure",
    [
        (os, "replace", _fail_replace),
        (safetensors.torch, "save", _fail_serialize),
        (os, "fsync", _fail_fsync),
    ],
    ids=["replace", "serialize", "fsync"],
)
def test_failed_write_leaves_previous_file_intact(saved: Path, monkeypatch, target, attribute, failure) -> None:
    before = saved.read_bytes()
    monkeypatch.setattr(target, attribute, failure)
    with pytest.raises((OSError, RuntimeError), match="simulated"):
        save_adapter(saved, make_weights(seed=1), dataclasses.replace(HEADER, steps=99))
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert list(saved.parent.iterdir()) == [saved], "no temporary file is left behind"
    assert read_adapter(saved)[1].steps == 17


def _flip_middle(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 16]) + data[mid + 16 :]


def _flip_last_tensor_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


@pytest.mark.parametrize(
    "corrupt",
    [
        _flip_middle,
        _flip_last_tensor_byte,
        lambda data: data[: len(data) // 2],
        lambda data: b"",
        lambda data: b"this is not a safetensors file at all" * 10,
        lambda data: data[:8] + data[8:].replace(b"plora-adapter/1", b"plora-adapter/9"),
    ],
    ids=["flipped-middle", "flipped-one-bit", "truncated-half", "zero-length", "garbage", "unknown-format"],
)
def test_corrupt_file_is_refused_and_left_unchanged(saved: Path, corrupt) -> None:
    damaged = corrupt(saved.read_bytes())
    saved.write_bytes(damaged)
    with pytest.raises(AdapterFileError) as info:
        read_adapter(saved)
    message = str(info.value)
    assert str(saved) in message and ".bak" in message and "personalize" in message
    assert saved.read_bytes() == damaged


def test_missing_file_is_refused_with_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(AdapterFileError, match="no adapter file"):
        read_adapter(path)
    assert not path.exists()


def test_non_m_tensor_in_file_is_refused(tmp_path: Path) -> None:
    # A file with a valid checksum whose contents are not M matrices must still be refused.
    path = tmp_path / "a.safetensors"
    save_adapter(path, make_weights(), HEADER)
    tensors, _ = read_adapter(path)
    with safetensors.safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors["lm_head.weight"] = torch.zeros(4, 4)
    metadata["checksum"] = adapter_file.checksum(tensors, metadata)
    path.write_bytes(safetensors.torch.save(tensors, metadata=metadata))
    with pytest.raises(AdapterFileError, match="lm_head.weight"):
        read_adapter(path)


@pytest.mark.parametrize(
    "extra, problem",
    [
        ({"lm_head.weight": torch.zeros(4, 4)}, "lm_head.weight"),
        ({"layers.0.self_attn.k_proj.M": torch.zeros(4, 4)}, "k_proj"),
    ],
    ids=["non-M-name", "untargeted-module"],
)
def test_save_refuses_foreign_tensor_names(tmp_path: Path, extra, problem) -> None:
    path = tmp_path / "a.safetensors"
    tensors = {**dict(make_weights().named_tensors()), **extra}
    with pytest.raises(AdapterFileError, match=problem):
        save_adapter(path, tensors, HEADER)
    assert not path.exists()


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda t: t.to(torch.int32), "dtype"),
        (lambda t: torch.zeros(4, 5), "shape"),
        (lambda t: torch.zeros(16), "shape"),
    ],
    ids=["int-dtype", "not-square", "not-2d"],
)
def test_save_refuses_malformed_m(tmp_path: Path, change, problem) -> None:
    tensors = {name: t.detach() for name, t in make_weights().named_tensors()}
    name = m_name(0, "q")
    tensors[name] = change(tensors[name])
    with pytest.raises(AdapterFileError, match=problem):
        save_adapter(tmp_path / "a.safetensors", tensors, HEADER)


def _expecting(**changes: object) -> BackboneIdentity:
    """IDENTITY with some fields of its own or of its adapter config changed."""
    config = {k: changes.pop(k) for k in list(changes) if k in PrivateLoRAConfig.__dataclass_fields__}
    return dataclasses.replace(IDENTITY, **changes, adapter=dataclasses.replace(CONFIG, **config))


@pytest.mark.parametrize(
    "expect, field",
    [
        (_expecting(content_hash="cd" * 32), "content_hash"),
        (_expecting(rank=8), "rank"),
        (_expecting(targets=("q", "k", "v")), "targets"),
        (_expecting(seed=4), "seed"),
        (_expecting(shared_a=True), "shared_a"),
        (_expecting(scale=2.0), "scale"),
        (_expecting(num_layers=4), "num_layers"),
    ],
    ids=["content-hash", "rank", "targets", "seed", "shared-a", "scale", "num-layers"],
)
def test_identity_mismatch_is_refused_naming_the_field(saved: Path, expect: BackboneIdentity, field: str) -> None:
    before = saved.read_bytes()
    with pytest.raises(AdapterFileError) as info:
        load_adapter(saved, expect)
    message = str(info.value)
    assert f"{field}: file=" in message and "expected=" in message
    assert "untouched" in message
    assert saved.read_bytes() == before


def test_mismatch_message_lists_every_differing_field(saved: Path) -> None:
    expect = _expecting(content_hash="00", rank=8, seed=5)
    with pytest.raises(AdapterFileError) as info:
        load_adapter(saved, expect)
    assert all(f"{f}: file=" in str(info.value) for f in ("content_hash", "rank", "seed"))
    assert "rank: file=4 expected=8" in str(info.value)
    assert 'targets: file=["q", "v"]' in str(_refused(saved, _expecting(targets=("q", "k", "v"))))


def _refused(path: Path, expect: BackboneIdentity) -> AdapterFileError:
    with pytest.raises(AdapterFileError) as info:
        load_adapter(path, expect)
    return info.value


@pytest.mark.parametrize("device_layers", [0, 2])
def test_other_split_point_is_accepted(saved: Path, device_layers: int) -> None:
    tensors, header = load_adapter(saved, _expecting(device_layers=device_layers))
    assert header == HEADER and len(tensors) == 6


def test_other_backbone_name_with_same_hash_is_accepted(saved: Path) -> None:
    _, header = load_adapter(saved, dataclasses.replace(IDENTITY, name="renamed"))
    assert header.identity.name == "smol-test"
