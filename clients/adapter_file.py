"""The on-device adapter file: a user's private M matrices and what they were trained for.

A safetensors file holding only tensors named `layers.{i}.{module}.M` (see `m_name`) plus
string metadata that identifies the personalized model exactly: the backbone (name and
content hash), the adapter configuration, the layer count and the training progress. A
sha256 `checksum` over every tensor and every other metadata entry catches corruption that
the safetensors parser alone would accept (flipped bytes inside the tensor data).

In memory the identity is a `BackboneIdentity`. On disk the keys are still those of the
first plora-adapter/1 files, so every adapter ever written loads, and older plora reads new
ones. The file does not record the hidden size: the content hash, which it does record,
fixes it, so an adapter is always read against the identity it is expected to fit.

Writes are atomic (temp file, fsync, rename, fsync of the directory), so a crash leaves
either the previous file or the new one at the path, never a mixture. Reads never modify
the file: a damaged adapter is the user's only copy of their personalization.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from plora.cloud_backbone.adapter_config import PrivateLoRAConfig, m_name
from plora.cloud_backbone.privatelora import AdapterWeights
from plora.cloud_backbone.protocol.messages import BackboneIdentity
from plora.storage.errors import AdapterFileError, ConfigError
from plora.storage.files import write_atomically

log = logging.getLogger(__name__)

FORMAT = "plora-adapter/1"
ALLOWED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Config fields that do not change the personalized model: the split point only moves work.
_SPLIT_ONLY_FIELDS = frozenset({"device_layers", "device_last_layers"})


@dataclass(frozen=True)
class AdapterHeader:
    """What an adapter file says about itself, apart from the tensors and bookkeeping: the
    backbone version it personalizes and the optimizer steps it was trained for."""

    identity: BackboneIdentity
    steps: int = 0


def _refusal(path: Path, what: str) -> AdapterFileError:
    return AdapterFileError(
        f"cannot use adapter file {path}: {what}. The file was left untouched. Restore it from a backup "
        f"(such as {path}.bak) or re-run personalize to train a new adapter."
    )


def checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 hex over the canonical encoding of all tensors and metadata except `checksum`.

    Every field is length-prefixed so that no two different contents share an encoding.
    """
    digest = hashlib.sha256(FORMAT.encode())

    def put(part: bytes) -> None:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)

    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        put(b"tensor")
        put(name.encode())
        put(str(tensor.dtype).removeprefix("torch.").encode())
        put(json.dumps(list(tensor.shape)).encode())
        put(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    for key in sorted(k for k in metadata if k != "checksum"):
        put(b"meta")
        put(key.encode())
        put(metadata[key].encode())
    return digest.hexdigest()


def _tensor_problems(tensors: dict[str, torch.Tensor], config: PrivateLoRAConfig, num_layers: int) -> list[str]:
    """Why these tensors are not exactly the M matrices of (config, num_layers); empty if they are."""
    expected = {m_name(layer, target) for layer, target in config.adapted(num_layers)}
    problems = []
    extra = sorted(set(tensors) - expected)
    missing = sorted(expected - set(tensors))
    if extra:
        problems.append(f"unexpected tensors {extra[:3]} (only layers.{{i}}.{{module}}.M for the configured targets belong here)")
    if missing:
        problems.append(f"missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    for name in sorted(set(tensors) & expected):
        tensor = tensors[name]
        if tensor.dtype not in ALLOWED_DTYPES:
            problems.append(f"{name} has dtype {tensor.dtype}, expected one of float32/float16/bfloat16")
        if tuple(tensor.shape) != (config.rank, config.rank):
            problems.append(f"{name} has shape {tuple(tensor.shape)}, expected ({config.rank}, {config.rank})")
    return problems


def save_adapter(path: str | os.PathLike, weights: AdapterWeights | dict[str, torch.Tensor], header: AdapterHeader) -> None:
    """Write the adapter atomically: `path` holds the old file or the complete new one."""
    path = Path(path)
    identity = header.identity
    raw = dict(weights.named_tensors()) if isinstance(weights, AdapterWeights) else dict(weights)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in raw.items()}
    problems = _tensor_problems(tensors, identity.adapter, identity.num_layers)
    if problems:
        raise AdapterFileError(f"refusing to write adapter {path}: " + "; ".join(problems))
    metadata = {
        "format": FORMAT,
        "backbone_name": identity.name,
        "backbone_hash": identity.content_hash,
        "adapter_config": json.dumps(identity.adapter.to_dict(), sort_keys=True),
        "num_layers": str(identity.num_layers),
        "steps": str(header.steps),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    metadata["checksum"] = checksum(tensors, metadata)
    data = safetensors.torch.save(tensors, metadata=metadata)

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data)


def _parse_header(data: bytes) -> dict[str, str]:
    # safetensors.torch.load has already validated the framing, so this cannot go out of bounds.
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}


def _read_verified(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of an intact adapter file: whole, of our format, checksum right."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AdapterFileError(
            f"no adapter file at {path}. Check the path, restore it from a backup (such as {path}.bak) "
            "or run personalize to create one."
        ) from None
    except OSError as err:
        raise _refusal(path, f"it cannot be read ({err.strerror or err})") from err
    if not data:
        raise _refusal(path, "it is empty (0 bytes), probably cut off by an interrupted copy")
    try:
        tensors = safetensors.torch.load(data)
        metadata = _parse_header(data)
    except (SafetensorError, ValueError) as err:
        raise _refusal(path, f"it is not a valid safetensors file, it is truncated or corrupt ({err})") from err
    if metadata.get("format") != FORMAT:
        raise _refusal(path, f"unknown format {metadata.get('format')!r}, expected {FORMAT!r}")
    if metadata.get("checksum") != checksum(tensors, metadata):
        raise _refusal(path, "the checksum does not match the contents, so the file is corrupt")
    return tensors, metadata


def _display(value: object) -> str:
    return json.dumps(value) if isinstance(value, list) else str(value)


def load_adapter(path: str | os.PathLike, expect: BackboneIdentity) -> tuple[dict[str, torch.Tensor], AdapterHeader]:
    """Read and verify an adapter file; raises AdapterFileError on anything not intact, and on
    a file made for another backbone, layer count or adapter config than `expect`.

    `device_layers` and `device_last_layers` may differ: they move computation between device and cloud but give the
    same model for the same M. A different backbone name with the same content hash is the
    same backbone under another label, so it is only logged.
    """
    path = Path(path)
    tensors, metadata = _read_verified(path)
    try:
        config = PrivateLoRAConfig.from_dict(json.loads(metadata["adapter_config"]))
        identity = BackboneIdentity(metadata["backbone_name"], metadata["backbone_hash"], int(metadata["num_layers"]),
                                    expect.hidden_size, config)
        header = AdapterHeader(identity, int(metadata["steps"]))
    except KeyError as err:
        raise _refusal(path, f"the metadata lacks {err.args[0]!r}") from None
    except (ValueError, TypeError, ConfigError) as err:
        raise _refusal(path, f"the metadata is invalid ({err})") from err
    problems = _tensor_problems(tensors, identity.adapter, identity.num_layers)
    if problems:
        raise _refusal(path, "; ".join(problems))
    diffs = {k: v for k, v in identity.differences(expect).items() if k not in _SPLIT_ONLY_FIELDS}
    if diffs:
        listed = "; ".join(f"{name}: file={_display(a)} expected={_display(b)}" for name, (a, b) in diffs.items())
        raise AdapterFileError(
            f"adapter file {path} was made for another backbone or adapter configuration "
            f"(file backbone {identity.name!r}, expected {expect.name!r}): {listed}. "
            "The file was left untouched; use an adapter trained for this backbone version, "
            "or re-run personalize with the expected configuration."
        )
    if identity.name != expect.name:
        log.warning(
            "adapter %s names backbone %r, expected %r; the content hash matches, so it is used",
            path, identity.name, expect.name,
        )
    return tensors, header
