"""The link interface of the split: `SplitLink`, and `InProcessLink`, which runs the cloud
half in this process. Training and generation code see only `SplitLink`; the network link
(clients.grpc_link) implements the same interface over gRPC.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

import torch

from plora.cloud_backbone.protocol.messages import (
    AdapterReply,
    AdapterRequest,
    BackboneIdentity,
    BackwardRequest,
    BackwardResult,
    ForwardRequest,
    ForwardResult,
    Message,
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
    whatever a handler keeps (u for the backward, dL/dM) is stored per (layer, group) and
    piece (`AdapterRequest.start`), never accumulated."""

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
