"""The messages of the split protocol, as plora's own types.

One step of the split, as the device sees it:

    device ── ForwardRequest(hidden entering the first cloud layer) ──────────────▶ cloud
    device ◀── AdapterRequest(layer, group, FORWARD, u = x·A) ──── per adapted group ── cloud
    device ── AdapterReply(layer, group, FORWARD, u·M) ───────────────────────────▶ cloud
    device ◀── ForwardResult(hidden leaving the last cloud layer) ────────────────── cloud
  and, when training:
    device ── BackwardRequest(dL/d hidden_out) ───────────────────────────────────▶ cloud
    device ◀── AdapterRequest(layer, group, BACKWARD, dL/d(u·M)) ── reverse order ── cloud
    device ── AdapterReply(layer, group, BACKWARD, dL/du) ────────────────────────▶ cloud
    device ◀── BackwardResult(dL/d hidden_in, when asked for) ───────────────────── cloud

The device computes dL/dM = u^T·dL/d(u·M) itself from the u it kept; M and its gradient
never appear in any message. Over the network a large AdapterRequest crosses in pieces along
its tokens, each answered as it arrives (wire.pieces); in process it crosses whole. Every
message of a link passes through `SplitLink._record`, the one place where the traffic can be
observed (metrics, tests, privacy audits); so do the messages of a step that a link retries on
a new session, and of the replay before it.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from dataclasses import dataclass

import torch

from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.storage.errors import VersionMismatchError


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor a step carries holds no NaN or infinity, as both sides check before
    using or sending one. Any NaN or infinity makes the sum NaN or infinite: one op and a read
    where isfinite().all() takes two, and the check runs a few times per adapted layer of every
    decoded token (the device's checks cost 2% of in-process decode the other way). A sum that
    overflows float32, from entries near 1e38, counts as not finite; such numbers are as broken."""
    return math.isfinite(tensor.sum().item())


class Phase(enum.Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


class CacheMode(enum.Enum):
    NONE = "none"  # stateless: scoring and training
    START = "start"  # drop any cached keys/values and start a new sequence (prefill)
    EXTEND = "extend"  # append to the session's cached sequence (decode)


@dataclass(frozen=True)
class BackboneIdentity:
    """What both halves must agree on before any tensor moves; the one record of a backbone
    version's identity, which device records and adapter files embed."""

    name: str
    content_hash: str
    num_layers: int
    hidden_size: int
    adapter: PrivateLoRAConfig

    @property
    def version(self) -> str:
        """A stable version name: the backbone's name plus a digest of everything that fixes the math."""
        digest = hashlib.sha256(json.dumps(self._math(), sort_keys=True).encode()).hexdigest()
        return f"{self.name}-{digest[:8]}"

    def differences(self, other: BackboneIdentity) -> dict[str, tuple[object, object]]:
        """Each field fixing the math that differs, by name: (this identity's value, `other`'s)."""
        mine, theirs = self._math(), other._math()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}

    def require_match(self, other: BackboneIdentity) -> None:
        """Raise unless `other` (what a device expects) is this backbone, adapter config and split point."""
        diff = other.differences(self)
        if diff:
            raise VersionMismatchError(
                "backbone/adapter mismatch; (expected by the device, served) per field: "
                + ", ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
            )

    def _math(self) -> dict:
        # The name is a label; the weights' hash and the adapter config are what count.
        return {"content_hash": self.content_hash, "num_layers": self.num_layers, "hidden_size": self.hidden_size, **self.adapter.to_dict()}


@dataclass(frozen=True)
class OpenSession:
    expected: BackboneIdentity  # what the device was built for; refused unless served
    max_tokens: int = 0  # 0 = the service's limit


@dataclass(frozen=True)
class SessionOpened:
    session_id: str
    identity: BackboneIdentity
    max_tokens: int


@dataclass(frozen=True)
class HostedBackbone:
    """A version a service hosts, as it announces it (on Register and Describe): the device
    keeps a downloaded bundle only if its digest and size are these."""

    identity: BackboneIdentity
    bundle_sha256: str  # hex, over the bundle's files (protocol.bundle.bundle_digest)
    bundle_size: int  # bytes
    is_default: bool = False  # the version the service binds new devices to


@dataclass(frozen=True)
class StepError:
    """A failed step, as the device learns of it. `kind` names a plora exception class."""

    kind: str
    message: str
    fatal: bool = False  # the session is over


@dataclass(frozen=True)
class ForwardRequest:
    hidden: torch.Tensor  # (B, T, d) entering the first cloud layer
    cache: CacheMode = CacheMode.NONE
    train: bool = False  # keep the cloud's graph for one BackwardRequest
    attention_mask: torch.Tensor | None = None  # (B, past + T), 1 = real token; None = no padding
    # EXTEND only: keep the first keep_cached cached positions and extend those; the later
    # ones (a draft the device rejected) are dropped first. None keeps every position. It
    # rides on the next step, so rolling back a draft costs no round trip of its own.
    keep_cached: int | None = None
    # What u, u·M and their gradients cross the wire in for this step; None: hidden's dtype.
    exchange_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class AdapterRequest:
    layer: int
    group: str
    phase: Phase
    tensor: torch.Tensor  # FORWARD: u (B, T, a·r); BACKWARD: dL/d(u·M) (B, T, members·r)
    # The tensor's first token among those the step exchanges at this layer and group: a
    # pipelined prefill's chunks and a pipelined training step's row groups (packed) each start
    # where the one before ended, and a network link sends a large exchange in pieces along its
    # tokens (wire.pieces), which the device answers each as it comes.
    start: int = 0

    def answer(self, tensor: torch.Tensor) -> AdapterReply:
        """The reply to this request, or to this piece of one."""
        return AdapterReply(self.layer, self.group, self.phase, tensor, self.start)


@dataclass(frozen=True)
class AdapterReply:
    layer: int
    group: str
    phase: Phase
    tensor: torch.Tensor  # FORWARD: u·M (B, T, members·r); BACKWARD: dL/du (B, T, a·r)
    start: int = 0  # the piece it answers (AdapterRequest.start)


@dataclass(frozen=True)
class ForwardResult:
    hidden: torch.Tensor  # (B, T, d) leaving the last cloud layer, before the final norm


@dataclass(frozen=True)
class BackwardRequest:
    grad_hidden: torch.Tensor  # (B, T, d) dL/d ForwardResult.hidden
    want_input_grad: bool = False  # only a device with trainable layers of its own needs it
    exchange_dtype: torch.dtype | None = None  # as ForwardRequest's


@dataclass(frozen=True)
class BackwardResult:
    grad_input: torch.Tensor | None  # (B, T, d) dL/d ForwardRequest.hidden, if asked for


Message = (
    OpenSession
    | SessionOpened
    | StepError
    | ForwardRequest
    | AdapterRequest
    | AdapterReply
    | ForwardResult
    | BackwardRequest
    | BackwardResult
)
