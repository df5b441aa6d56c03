"""The split protocol: every message between a device and the cloud, and the link interface.

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
never appear in any message. Every message of a link passes through `SplitLink._record`,
the one place where the traffic can be observed (metrics, tests, privacy audits); so do the
messages of a step that a link retries on a new session, and of the replay before it.

Training and generation code see only `SplitLink`. `InProcessLink` runs the cloud in the
same process; a network link implements the same interface.
"""

from __future__ import annotations

import enum
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from plora.cloud_backbone.privatelora import PrivateLoRAConfig
from plora.storage.errors import VersionMismatchError


class Phase(enum.Enum):
    FORWARD = "forward"
    BACKWARD = "backward"


class CacheMode(enum.Enum):
    NONE = "none"  # stateless: scoring and training
    START = "start"  # drop any cached keys/values and start a new sequence (prefill)
    EXTEND = "extend"  # append to the session's cached sequence (decode)


@dataclass(frozen=True)
class BackboneIdentity:
    """What both halves must agree on before any tensor moves."""

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

    def require_match(self, other: BackboneIdentity) -> None:
        """Raise unless `other` (what a device expects) is this backbone, adapter config and split point."""
        mine, theirs = self._math(), other._math()
        if mine != theirs:
            diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
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


@dataclass(frozen=True)
class AdapterRequest:
    layer: int
    group: str
    phase: Phase
    tensor: torch.Tensor  # FORWARD: u (B, T, a·r); BACKWARD: dL/d(u·M) (B, T, members·r)


@dataclass(frozen=True)
class AdapterReply:
    layer: int
    group: str
    phase: Phase
    tensor: torch.Tensor  # FORWARD: u·M (B, T, members·r); BACKWARD: dL/du (B, T, a·r)


@dataclass(frozen=True)
class ForwardResult:
    hidden: torch.Tensor  # (B, T, d) leaving the last cloud layer, before the final norm


@dataclass(frozen=True)
class BackwardRequest:
    grad_hidden: torch.Tensor  # (B, T, d) dL/d ForwardResult.hidden
    want_input_grad: bool = False  # only a device with trainable layers of its own needs it


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
# (direction "up" = device to cloud, or "down"; message)
Tap = Callable[[str, Message], None]


class TrafficCounter:
    """A tap that counts messages and tensor bytes per direction ("up", "down")."""

    def __init__(self) -> None:
        self.messages = {"up": 0, "down": 0}
        self.bytes = {"up": 0, "down": 0}

    def __call__(self, direction: str, message: Message) -> None:
        self.messages[direction] += 1
        self.bytes[direction] += sum(
            v.numel() * v.element_size() for v in vars(message).values() if isinstance(v, torch.Tensor)
        )

    @property
    def total_bytes(self) -> int:
        return self.bytes["up"] + self.bytes["down"]


class DeviceHandler(Protocol):
    """The device's answer to the cloud's adapter requests.

    A link may ask it again for a request it already answered: a network link that lost its
    session replays the step on a new one. So an answer depends on the request alone, and
    whatever a handler keeps (u for the backward, dL/dM) is stored per (layer, group),
    never accumulated."""

    def __call__(self, request: AdapterRequest) -> AdapterReply: ...


class CloudEndpoint(Protocol):
    """A cloud session, as an in-process link drives it. `ask` reaches the device."""

    identity: BackboneIdentity

    def forward(self, request: ForwardRequest, ask: DeviceHandler) -> ForwardResult: ...

    def backward(self, request: BackwardRequest, ask: DeviceHandler) -> BackwardResult: ...

    def close(self) -> None: ...


class SplitLink(ABC):
    """One device session with a cloud backbone. Not thread-safe: one step at a time."""

    def __init__(self) -> None:
        self.taps: list[Tap] = []

    def _record(self, direction: str, message: Message) -> None:
        for tap in self.taps:
            tap(direction, message)

    def _recorded(self, handler: DeviceHandler) -> DeviceHandler:
        def relay(request: AdapterRequest) -> AdapterReply:
            self._record("down", request)
            reply = handler(request)
            self._record("up", reply)
            return reply

        return relay

    @property
    @abstractmethod
    def identity(self) -> BackboneIdentity:
        """The backbone this link's session runs on."""

    @abstractmethod
    def forward(self, request: ForwardRequest, handler: DeviceHandler) -> ForwardResult: ...

    @abstractmethod
    def backward(self, request: BackwardRequest, handler: DeviceHandler) -> BackwardResult: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> SplitLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessLink(SplitLink):
    """The cloud session runs in this process. Tensors cross detached, as over a wire."""

    def __init__(self, endpoint: CloudEndpoint):
        super().__init__()
        self._endpoint = endpoint

    @property
    def identity(self) -> BackboneIdentity:
        return self._endpoint.identity

    def forward(self, request: ForwardRequest, handler: DeviceHandler) -> ForwardResult:
        self._record("up", request)
        result = self._endpoint.forward(_detached(request), self._recorded(_detaching(handler)))
        result = ForwardResult(result.hidden.detach())
        self._record("down", result)
        return result

    def backward(self, request: BackwardRequest, handler: DeviceHandler) -> BackwardResult:
        self._record("up", request)
        result = self._endpoint.backward(_detached(request), self._recorded(_detaching(handler)))
        grad = None if result.grad_input is None else result.grad_input.detach()
        result = BackwardResult(grad)
        self._record("down", result)
        return result

    def close(self) -> None:
        self._endpoint.close()


def _detached(request):
    """A copy of the request whose tensors share no autograd history with the sender."""
    fields = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in vars(request).items()}
    return type(request)(**fields)


def _detaching(handler: DeviceHandler) -> DeviceHandler:
    def call(request: AdapterRequest) -> AdapterReply:
        reply = handler(_detached(request))
        return _detached(reply)

    return call
