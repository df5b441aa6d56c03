"""The cloud's part of the decoder, as the device sees it: an nn.Module over a SplitLink.

Its autograd function makes the remote stack differentiable with respect to the device's
M matrices: forward answers the cloud's u with u·M and keeps u; backward sends dL/d(output),
answers each dL/d(u·M) with dL/du, and computes dL/dM = u^T·dL/d(u·M) locally. So
`loss.backward()` just works, and neither M nor its gradient ever leaves the device.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from plora.cloud_backbone.privatelora import AdapterWeights, group_products
from plora.cloud_backbone.protocol.link import SplitLink
from plora.cloud_backbone.protocol.messages import (
    AdapterReply,
    AdapterRequest,
    BackwardRequest,
    CacheMode,
    ForwardRequest,
    Phase,
    all_finite,
)
from plora.storage.errors import DivergedError, NonFiniteError, ValidationError, quoted


class RemoteDecoder(nn.Module):
    """hidden (B, T, d) entering the cloud -> hidden (B, T, d) leaving it."""

    def __init__(self, link: SplitLink, weights: AdapterWeights):
        super().__init__()
        self.link = link
        self.weights = weights  # shared with the DeviceModel that owns it

    def forward(
        self,
        hidden: torch.Tensor,
        cache: CacheMode = CacheMode.NONE,
        attention_mask: torch.Tensor | None = None,
        keep_cached: int | None = None,
    ) -> torch.Tensor:
        ms = list(self.weights.ms.values())
        _check_own(hidden, "the hidden state from the device's first layers")
        request = ForwardRequest(hidden.detach(), cache=cache, attention_mask=attention_mask, keep_cached=keep_cached)
        needs_graph = torch.is_grad_enabled() and (hidden.requires_grad or any(m.requires_grad for m in ms))
        if needs_graph:
            return _RemoteStep.apply(hidden, self, request, *ms)
        return _check_result(self.link.forward(request, self._answer_forward(kept=None)).hidden, hidden, "hidden state")

    def _answer_forward(self, kept: dict | None):
        def answer(request: AdapterRequest) -> AdapterReply:
            _check_request(request, Phase.FORWARD, self.weights)
            if kept is not None:
                kept[request.layer, request.group, request.start] = request.tensor
            with torch.no_grad():
                v = self.weights.products(request.layer, request.group, request.tensor)
            _check_own(v, f"u·M of layer {request.layer} {request.group}")
            return request.answer(v)

        return answer


def _check_request(request: AdapterRequest, phase: Phase, weights: AdapterWeights) -> None:
    """The cloud is checked like any other party: a request for a layer or group the device
    does not have, or a tensor that is not a finite float32 (B, T, width), is refused before
    it touches M or its gradient, so a broken or hostile service cannot corrupt the adapter.
    Nor does the device answer for a layer it runs itself: u·M of its own layers would hand
    the cloud those M by least squares."""
    config = weights.config
    if (
        request.phase is not phase
        or request.group not in config.groups
        or request.layer not in config.cloud_layers(weights.num_layers)
        or not config.adapts(request.layer)
    ):
        raise ValidationError(
            f"unexpected adapter request: layer {request.layer} {quoted(request.group)} {request.phase.value} "
            f"during {phase.value}"
        )
    width = config.width(request.group, a_side=phase is Phase.FORWARD)  # u, or dL/d(u·M)
    tensor = request.tensor
    if tensor.dtype != torch.float32 or tensor.dim() != 3 or tensor.shape[-1] != width:
        raise ValidationError(
            f"adapter request for layer {request.layer} {request.group}: {tensor.dtype} of shape {tuple(tensor.shape)}, "
            f"expected float32 of shape (batch, tokens, {width})"
        )
    if not all_finite(tensor):
        raise NonFiniteError(f"adapter request for layer {request.layer} {request.group} contains NaN or infinity")


def _check_result(hidden: torch.Tensor, sent: torch.Tensor, what: str) -> torch.Tensor:
    if hidden is None or hidden.dtype != torch.float32 or hidden.shape != sent.shape:
        raise ValidationError(
            f"{what} from the service: {_describe(hidden)}, expected a finite float32 tensor of shape {tuple(sent.shape)}"
        )
    if not all_finite(hidden):
        raise NonFiniteError(f"{what} from the service contains NaN or infinity")
    return hidden


def _check_own(tensor: torch.Tensor, what: str) -> None:
    """The device checks what it is about to send: NaN or infinity of its own making means its
    M diverged, which is the device's business, not the service's (whose checks would refuse
    the frame, and count the refusal against the device)."""
    if not all_finite(tensor):
        raise DivergedError(f"{what} holds NaN or infinity: training diverged; try a lower learning rate")


def _describe(tensor: torch.Tensor | None) -> str:
    return "nothing" if tensor is None else f"{tensor.dtype} of shape {tuple(tensor.shape)}"


class _RemoteStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, remote: RemoteDecoder, request: ForwardRequest, *ms):
        kept: dict[tuple[int, str, int], torch.Tensor] = {}  # (layer, group, first token) -> u
        result = remote.link.forward(dataclasses.replace(request, train=True), remote._answer_forward(kept))
        _check_result(result.hidden, hidden, "hidden state")
        ctx.remote, ctx.kept, ctx.want_input_grad = remote, kept, hidden.requires_grad
        return result.hidden

    @staticmethod
    def backward(ctx, grad_out):
        weights: AdapterWeights = ctx.remote.weights
        # Kept per group and piece, not summed as they come: a link that retries the backward on
        # a new session asks for some groups again, and each must count once.
        group_grads: dict[tuple[int, str, int], list[torch.Tensor]] = {}  # (layer, group, first token) -> dL/dM per member

        def answer(request: AdapterRequest) -> AdapterReply:
            _check_request(request, Phase.BACKWARD, weights)
            u = ctx.kept.get((request.layer, request.group, request.start))
            if u is None:
                raise ValidationError(
                    f"backward for layer {request.layer} {request.group} from token {request.start}, which forward never saw"
                )
            if request.tensor.shape[:-1] != u.shape[:-1]:
                raise ValidationError(
                    f"backward for layer {request.layer} {request.group} has shape {tuple(request.tensor.shape)}; "
                    f"its forward had {tuple(u.shape[:-1])} tokens"
                )
            ms = weights.group_ms(request.layer, request.group)
            with torch.enable_grad():
                u_leaf = u.detach().requires_grad_(True)
                m_leaves = [m.detach().requires_grad_(True) for m in ms]
                v = group_products(u_leaf, m_leaves, weights.config.shared_a)
                grad_u, *grad_ms = torch.autograd.grad(v, [u_leaf, *m_leaves], request.tensor)
            _check_own(grad_u, f"dL/du of layer {request.layer} {request.group}")
            group_grads[request.layer, request.group, request.start] = grad_ms
            return request.answer(grad_u)

        _check_own(grad_out, "the gradient from the device's last layers")
        result = ctx.remote.link.backward(BackwardRequest(grad_out.contiguous(), ctx.want_input_grad), answer)
        if ctx.want_input_grad:
            _check_result(result.grad_input, grad_out, "gradient of the hidden state")
        grads: dict[int, torch.Tensor] = {}  # id(M) -> dL/dM
        for (layer, group, _), grad_ms in group_grads.items():
            for m, g in zip(weights.group_ms(layer, group), grad_ms):
                grads[id(m)] = grads[id(m)] + g if id(m) in grads else g
        ms = list(weights.ms.values())
        return (result.grad_input, None, None, *[grads.get(id(m)) for m in ms])
