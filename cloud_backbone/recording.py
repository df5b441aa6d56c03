"""What the service sees, written down for a privacy audit (`plora backbone serve --record`).

A capture holds exactly the tensors of the protocol's messages, as the service received and
sent them: the hidden state entering the cloud, u and u·M of every adapted group, the hidden
state it returns and, in training, every gradient. That is all a curious cloud has, so the
attacks of `plora audit` read captures and public weights, and nothing else.

Captures are as sensitive as the text they came from (the state at the cut inverts to it), so
recording is opt-in, its folder is owner-only, every recorded session is logged, and
forgetting a device deletes its captures.

Layout: {root}/{device id}/{session id}/{step:06d}.safetensors, one file per step, with the
step's kind and cache mode in the file's metadata.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from plora.cloud_backbone.protocol.messages import (
    AdapterReply,
    AdapterRequest,
    BackwardRequest,
    BackwardResult,
    ForwardRequest,
    ForwardResult,
    Message,
    Phase,
    StepError,
)
from plora.storage.errors import ConfigError

log = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
# Tensor names of the adapter traffic, per (phase, direction): what the cloud sends, what it gets back.
_ADAPTER_NAMES = {
    (Phase.FORWARD, "down"): "u",
    (Phase.FORWARD, "up"): "um",
    (Phase.BACKWARD, "down"): "grad_um",
    (Phase.BACKWARD, "up"): "grad_u",
}


def adapter_key(name: str, layer: int, group: str) -> str:
    """The capture's name for one adapter tensor, e.g. u.3.attn_in."""
    return f"{name}.{layer}.{group}"


class Recording:
    """The folder of every capture. Sessions record into it from the service's event loop."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)  # also where the folder existed with a wider mode
        self._lock = threading.Lock()

    def session(self, device_id: str, session_id: str, version: str) -> SessionCapture:
        for what, value in (("device id", device_id), ("session id", session_id)):
            if not _SAFE_ID.fullmatch(value):
                raise ConfigError(f"cannot record a session under the {what} {value!r}")
        log.warning("recording session %s of device %s in %s: the captures invert to the device's text; "
                    "delete them once audited", session_id, device_id, self.root)
        folder = self.root / device_id / session_id
        with self._lock:
            for part in (folder.parent, folder):
                part.mkdir(mode=0o700, exist_ok=True)
        (folder / "session.json").write_text(json.dumps({"device_id": device_id, "version": version}))
        return SessionCapture(folder)

    def forget(self, device_id: str) -> int:
        """Delete every capture of the device; returns the steps deleted."""
        folder = self.root / device_id
        if not _SAFE_ID.fullmatch(device_id) or not folder.is_dir():
            return 0
        with self._lock:
            steps = sum(1 for _ in folder.glob("*/*.safetensors"))
            shutil.rmtree(folder)
        return steps


class SessionCapture:
    """A link tap, (direction, message), that gathers each step's tensors and writes them when
    the step ends. The servicer calls it with the messages it parsed and sent; an in-process
    link takes it in its taps."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._step = 0
        self._tensors: dict[str, torch.Tensor] = {}
        self._pieces: dict[str, dict[int, torch.Tensor]] = {}  # adapter key -> first token -> tensor
        self._meta: dict[str, str] = {}

    def __call__(self, direction: str, message: Message) -> None:
        if isinstance(message, ForwardRequest):
            self._begin("forward", hidden_in=message.hidden, attention_mask=message.attention_mask)
            self._meta.update(cache=message.cache.value, train=str(message.train),
                              keep_cached="" if message.keep_cached is None else str(message.keep_cached))
        elif isinstance(message, BackwardRequest):
            self._begin("backward", grad_hidden_out=message.grad_hidden)
        elif isinstance(message, (AdapterRequest, AdapterReply)) and self._meta:
            # A large exchange crosses in pieces, and a pipelined prefill or training step
            # exchanges a layer's tensors by chunks or row groups, in whatever order they come:
            # each is placed at its first token. One from a token already seen is the step run
            # again (taken out of its batch).
            pieces = self._pieces.setdefault(adapter_key(_ADAPTER_NAMES[message.phase, direction], message.layer, message.group), {})
            if message.start in pieces:
                pieces.clear()
            pieces[message.start] = message.tensor
        elif isinstance(message, ForwardResult):
            self._end(hidden_out=message.hidden)
        elif isinstance(message, BackwardResult):
            self._end(grad_hidden_in=message.grad_input)
        elif isinstance(message, StepError):
            self._end(error=message.kind)

    def _begin(self, kind: str, **tensors: torch.Tensor | None) -> None:
        self._tensors = {k: v for k, v in tensors.items() if v is not None}
        self._pieces = {}
        self._meta = {"kind": kind}

    def _end(self, error: str = "", **tensors: torch.Tensor | None) -> None:
        if not self._meta:
            return  # an error before any step began: nothing was seen
        self._tensors.update({k: v for k, v in tensors.items() if v is not None})
        self._tensors.update({key: torch.cat([pieces[start] for start in sorted(pieces)], dim=1) for key, pieces in self._pieces.items()})
        self._meta["error"] = error
        self._step += 1
        data = save({k: v.detach().contiguous().cpu() for k, v in self._tensors.items()}, metadata=self._meta)
        # No fsync: a capture lost to a power cut costs an audit one step, and a decode step
        # per token must not wait for the disk. The rename still never leaves half a file.
        path = self.folder / f"{self._step:06d}.safetensors"
        tmp = path.with_name(f".{path.name}")
        self._tensors, self._pieces, self._meta = {}, {}, {}
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except FileNotFoundError:
            return  # the device was forgotten while its last step ran: its captures stay deleted
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)


@dataclass
class CapturedStep:
    """One recorded step: its kind ("forward" or "backward"), metadata and tensors."""

    session: str
    index: int
    meta: dict[str, str]
    tensors: dict[str, torch.Tensor]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    def adapter(self, name: str) -> Iterator[tuple[int, str, torch.Tensor]]:
        """(layer, group, tensor) of every adapter tensor named `name` ("u", "um", ...)."""
        for key, tensor in self.tensors.items():
            prefix, _, rest = key.partition(".")
            if prefix == name:
                layer, group = rest.split(".", 1)
                yield int(layer), group, tensor


def read_session(folder: Path) -> list[CapturedStep]:
    """A recorded session's steps, in the order they ran."""
    steps = []
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            steps.append(CapturedStep(folder.name, int(path.stem), dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}))
    return steps


def recorded_sessions(root: Path, device_id: str) -> list[Path]:
    """A device's recorded session folders, oldest first."""
    folders = [p for p in (Path(root) / device_id).glob("*") if (p / "session.json").is_file()]
    return sorted(folders, key=lambda p: (p / "session.json").stat().st_mtime_ns)
