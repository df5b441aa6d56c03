"""The public half of a device: what is the same for every device on a backbone version.

A backbone version's device half (its bundle: tokenizer, embeddings, LM head, device layers)
and the anchor text its base model writes (see platform.jobs) hold nothing of any user. A
device on its own machine keeps them in its own folder. Devices that share a machine, as a
simulated fleet's do, share one PublicStore instead, so that a thousand devices cost one
bundle on disk and one anchor text, not a thousand:

    STORE/bundles/<sha256>/     a device half, named by its digest (protocol.bundle.bundle_digest)
    STORE/versions/<version>/   what a version's base model wrote once for all its devices

Either way a bundle is checked against the digest its device was enrolled with before a
process uses it, so a changed or corrupted half is refused, not run. A process keeps the last
halves it loaded (DEVICE_HALVES_KEPT), so that serving many devices in turn loads each once.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from plora.clients.grpc_link import Credentials, Endpoint, download_bundle
from plora.cloud_backbone.protocol.bundle import bundle_digest
from plora.cloud_backbone.protocol.messages import HostedBackbone
from plora.storage.errors import ConfigError, ValidationError
from plora.storage.files import exclusive

# Two: a migration runs a device's old and new versions side by side.
DEVICE_HALVES_KEPT = 2
_loaded: OrderedDict[str, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = OrderedDict()
_checked: set[tuple] = set()  # (folder, digest, its files' names, sizes and times) found whole in this process
# transformers' from_pretrained is not thread-safe: two devices of one process loading their
# half at once both got meta tensors and an untied, random LM head (the demo's answering step).
_loading = threading.Lock()


class PublicStore:
    """Public files shared by the devices of one machine; see the module's docstring."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def bundle(self, sha256: str) -> Path:
        return self.root / "bundles" / sha256

    def version(self, name: str) -> Path:
        """The folder of what is kept once for every device on version `name`."""
        folder = self.root / "versions" / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def fetch_bundle(self, endpoint: Endpoint, credentials: Credentials, hosted: HostedBackbone) -> Path:
        """The version's device half, downloaded unless a whole, unchanged copy is here already.
        Devices enrolling side by side download it once: the others wait for the first."""
        folder = self.bundle(hosted.bundle_sha256)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(folder.parent / f".{hosted.bundle_sha256}.lock"):
            if folder.is_dir():
                if _has_digest(folder, hosted.bundle_sha256):
                    return folder
                shutil.rmtree(folder)  # changed since: fetch it afresh
            download_bundle(endpoint, credentials, hosted, folder)
            for path in folder.iterdir():
                path.chmod(0o444)  # shared: no device's process is to write here
        return folder


def load_device_half(folder: Path, sha256: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The device half in `folder`, checked against `sha256` (None: a device made before plora
    recorded it, which is not checked). The model is shared by whoever loads the same half in
    this process and must not be changed: a DeviceModel copies what it adapts."""
    with _loading:
        return _load_device_half(folder, sha256)


def _load_device_half(folder: Path, sha256: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if sha256 is not None and sha256 in _loaded:
        _loaded.move_to_end(sha256)
        return _loaded[sha256]
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} is missing; re-create the device with `plora device init`")
    if sha256 is not None and not _has_digest(folder, sha256):
        raise ValidationError(f"the device half in {folder} does not have the digest {sha256} it was enrolled with: "
                              "it was changed or corrupted, and is not used. Delete the folder: a device that "
                              "shares it downloads it again when next opened")
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    half = model.eval().requires_grad_(False), tokenizer
    if sha256 is not None:
        _loaded[sha256] = half
        while len(_loaded) > DEVICE_HALVES_KEPT:
            _loaded.popitem(last=False)
    return half


def _has_digest(folder: Path, sha256: str) -> bool:
    """Whether `folder` holds the bundle of digest `sha256`. Hashing a bundle reads all of it, so
    a folder found whole is not hashed again in this process until one of its files changes."""
    state = (str(folder), sha256, tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())))
    if state in _checked:
        return True
    if bundle_digest(folder)[0] != sha256:
        return False
    _checked.add(state)
    return True


def relative_to(folder: Path, target: Path) -> str:
    """`target` as a path from `folder`, so that moving both together keeps the link."""
    return os.path.relpath(Path(target).resolve(), Path(folder).resolve())
