"""The cloud's compute: frozen decoder layers with PrivateLoRA's public projections.

Nothing here knows about any wire. A session runs forward and backward steps and reaches
the device only through the `ask` callable it is handed for each step, which makes the
same code serve the in-process link and the network service.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import DynamicCache

from plora.cloud_backbone.batching import DecodeBatcher, batchable
from plora.cloud_backbone.loading import Backbone
from plora.cloud_backbone.privatelora import TARGET_MODULES, AdaptedGroup, PrivateLoRAConfig, attach, decoder_slice
from plora.cloud_backbone.protocol import (
    AdapterReply,
    AdapterRequest,
    BackwardRequest,
    BackwardResult,
    CacheMode,
    DeviceHandler,
    ForwardRequest,
    ForwardResult,
    Phase,
)
from plora.storage.errors import SessionError, ValidationError


class CloudHalf(nn.Module):
    """Decoder layers [device_layers, N) of a backbone, adapted with A and B.

    Takes the layers out of `backbone.model`: after this the full model must not be run.
    """

    def __init__(self, backbone: Backbone, config: PrivateLoRAConfig):
        super().__init__()
        num_layers = backbone.num_layers
        config.check_backbone(num_layers)
        self.config = config
        self.identity = backbone.identity(config)
        self.stack = decoder_slice(backbone.model, config.device_layers, num_layers)
        self.slot = attach(self.stack.layers, config.device_layers, config)
        self.batcher: DecodeBatcher | None = None

    def enable_batching(self, max_batch: int = 64, gather_s: float = 0.01) -> None:
        """Run concurrent sessions' decode steps as one batch (see batching.py)."""
        self.batcher = DecodeBatcher(self, max_batch, gather_s)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    def open_session(self, max_tokens: int = 4096) -> CloudSession:
        return CloudSession(self, max_tokens)

    def width(self, group: str, phase: Phase, direction: str) -> int:
        """The last dimension of a group's tensor: u and dL/du are a·r wide, u·M and its grad members·r."""
        a_side = (phase is Phase.FORWARD) == (direction == "down")
        members = len(self.config.groups[group])
        return self.config.rank * (self.config.a_count(group) if a_side else members)


class _DeviceRoundTrip(torch.autograd.Function):
    """u -> u·M by asking the device; its backward asks the device for dL/du."""

    @staticmethod
    def forward(ctx, u, session: CloudSession, layer: int, group: str):
        ctx.session, ctx.layer, ctx.group = session, layer, group
        return session.ask(AdapterRequest(layer, group, Phase.FORWARD, u.detach()))

    @staticmethod
    def backward(ctx, grad_v):
        request = AdapterRequest(ctx.layer, ctx.group, Phase.BACKWARD, grad_v.contiguous())
        return ctx.session.ask(request), None, None, None


class CloudSession:
    """One device's session: its KV cache and, between a training forward and its
    backward, the cloud's autograd graph. It never holds M or any device parameter."""

    def __init__(self, half: CloudHalf, max_tokens: int):
        self.half = half
        self.identity = half.identity
        self.max_tokens = max_tokens
        self.cache: DynamicCache | None = None  # keys and values of the cloud layers
        self._graph: tuple[torch.Tensor, torch.Tensor] | None = None  # (input leaf, output)
        self._handler: DeviceHandler | None = None

    def ask(self, request: AdapterRequest) -> torch.Tensor:
        """One adapter round trip, with the reply checked before it touches the graph."""
        return self.ask_later(request)()

    def ask_later(self, request: AdapterRequest) -> Callable[[], torch.Tensor]:
        """Send `request` now and return the wait for its checked reply.

        A handler with `submit` (the network service's) sends without waiting, so a batch of
        sessions has all its requests in flight at once; any other is simply called."""
        submit = getattr(self._handler, "submit", None)
        if submit is None:
            reply = self._handler(request)
            return lambda: self._checked(request, reply)
        pending = submit(request)
        return lambda: self._checked(request, pending.result())

    def _checked(self, request: AdapterRequest, reply: object) -> torch.Tensor:
        if not isinstance(reply, AdapterReply):
            raise ValidationError(f"expected an AdapterReply, got {type(reply).__name__}")
        if (reply.layer, reply.group, reply.phase) != (request.layer, request.group, request.phase):
            raise ValidationError(
                f"reply for layer {reply.layer} {reply.group} {reply.phase.value}, "
                f"expected layer {request.layer} {request.group} {request.phase.value}"
            )
        expected = (*request.tensor.shape[:-1], self.half.width(request.group, request.phase, "up"))
        check_tensor(reply.tensor, expected, f"layer {request.layer} {request.group} reply")
        return reply.tensor

    def _exchange(self, layer: int, group: str, u: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return _DeviceRoundTrip.apply(u, self, layer, group)
        return self.ask(AdapterRequest(layer, group, Phase.FORWARD, u))

    def forward(self, request: ForwardRequest, ask: DeviceHandler) -> ForwardResult:
        hidden = request.hidden
        if hidden.dim() != 3:
            raise ValidationError(f"hidden state must be (batch, tokens, {self.identity.hidden_size}), got {tuple(hidden.shape)}")
        check_tensor(hidden, (*hidden.shape[:2], self.identity.hidden_size), "hidden state")
        cache = self._cache_for(request.cache, hidden.shape)
        self._graph = None  # a new step abandons an unfinished training step
        if request.train:
            hidden = hidden.detach().requires_grad_(True)
        self._handler = ask
        try:
            batcher = self.half.batcher
            # A prefill counts as decoding, so that sessions starting together batch from their first step.
            company = batcher is not None and cache is not None and not request.train and batcher.has_company(self)
            if company and batchable(cache, hidden, request.train, request.attention_mask):
                return ForwardResult(batcher.step(self, hidden))
            with torch.set_grad_enabled(request.train), self.half.slot.using(self._exchange):
                out = self.half.stack(
                    inputs_embeds=hidden,
                    attention_mask=request.attention_mask,
                    cache=cache,
                    use_cache=cache is not None,
                ).last_hidden_state
        finally:
            self._handler = None
        if request.train:
            self._graph = (hidden, out)
        return ForwardResult(out.detach())

    def _cache_for(self, mode: CacheMode, shape: torch.Size) -> DynamicCache | None:
        if mode is CacheMode.NONE:
            return None
        if mode is CacheMode.START:
            self.cache = DynamicCache(config=self.half.stack.config)
        elif self.cache is None:
            raise SessionError("EXTEND needs a cached sequence; start one with CacheMode.START")
        elif self.cache.get_seq_length() and self.cache.layers[0].keys.shape[0] != shape[0]:
            raise ValidationError(f"batch of {shape[0]} does not match the cached batch of {self.cache.layers[0].keys.shape[0]}")
        if self.cache.get_seq_length() + shape[1] > self.max_tokens:
            raise SessionError(
                f"session would hold {self.cache.get_seq_length() + shape[1]} tokens, over its limit of {self.max_tokens}; "
                "start a new sequence"
            )
        return self.cache

    def backward(self, request: BackwardRequest, ask: DeviceHandler) -> BackwardResult:
        if self._graph is None:
            raise SessionError("backward needs a preceding forward with train=True")
        hidden, out = self._graph
        self._graph = None
        check_tensor(request.grad_hidden, tuple(out.shape), "gradient of the hidden state")
        self._handler = ask
        try:
            torch.autograd.backward(out, request.grad_hidden)
        finally:
            self._handler = None
        return BackwardResult(hidden.grad if request.want_input_grad else None)

    def close(self) -> None:
        self.cache = None
        self._graph = None


def check_tensor(tensor: object, shape: tuple[int, ...], what: str) -> None:
    """Refuse anything but a finite float32 tensor of exactly `shape`."""
    if not isinstance(tensor, torch.Tensor):
        raise ValidationError(f"{what}: expected a tensor, got {type(tensor).__name__}")
    if tensor.dtype != torch.float32:
        raise ValidationError(f"{what}: dtype {tensor.dtype}, expected torch.float32")
    if tuple(tensor.shape) != tuple(shape):
        raise ValidationError(f"{what}: shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    if not torch.isfinite(tensor).all():
        raise ValidationError(f"{what}: contains NaN or infinity")


def public_tensors(half: CloudHalf) -> dict[str, torch.Tensor]:
    """The A and B the cloud applies, named layers.{i}.{module}.A / .B, for anyone to audit.

    With a shared A, every member of a group is written with the same A.
    """
    config, r = half.config, half.config.rank
    out = {}
    for group in half.stack.modules():
        if not isinstance(group, AdaptedGroup):
            continue
        for i, member in enumerate(config.groups[group.name]):
            prefix = f"layers.{group.layer}.{TARGET_MODULES[member]}"
            column = 0 if config.shared_a else i
            # Copies: safetensors refuses tensors that share memory.
            out[f"{prefix}.A"] = group.a[:, column * r : (column + 1) * r].clone()
            out[f"{prefix}.B"] = getattr(group, f"b{i}").clone()
    return out
