"""The cloud's part of the decoder, as the device sees it: an nn.Module over a SplitLink.

Its autograd function makes the remote stack differentiable with respect to the device's
M matrices: forward answers the cloud's u with u·M and keeps u; backward sends dL/d(output),
answers each dL/d(u·M) with dL/du, and computes dL/dM = u^T·dL/d(u·M) locally. So
`loss.backward()` just works, and neither M nor its gradient ever leaves the device.
"""

from __future__ import annotations

import torch
from torch import nn

from plora.cloud_backbone.privatelora import AdapterWeights, group_products
from plora.cloud_backbone.protocol import (
    AdapterReply,
    AdapterRequest,
    BackwardRequest,
    CacheMode,
    ForwardRequest,
    Phase,
    SplitLink,
)
from plora.storage.errors import ValidationError


class RemoteDecoder(nn.Module):
    """hidden (B, T, d) entering the cloud -> hidden (B, T, d) leaving it."""

    def __init__(self, link: SplitLink, weights: AdapterWeights):
        super().__init__()
        self.link = link
        self.weights = weights  # shared with the DeviceModel that owns it

    def forward(
        self, hidden: torch.Tensor, cache: CacheMode = CacheMode.NONE, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        ms = list(self.weights.ms.values())
        needs_graph = torch.is_grad_enabled() and (hidden.requires_grad or any(m.requires_grad for m in ms))
        if needs_graph:
            return _RemoteStep.apply(hidden, self, cache, attention_mask, *ms)
        request = ForwardRequest(hidden, cache=cache, attention_mask=attention_mask)
        return self.link.forward(request, self._answer_forward(kept=None)).hidden

    def _answer_forward(self, kept: dict | None):
        def answer(request: AdapterRequest) -> AdapterReply:
            _check_request(request, Phase.FORWARD, self.weights)
            if kept is not None:
                kept[request.layer, request.group] = request.tensor
            with torch.no_grad():
                v = self.weights.products(request.layer, request.group, request.tensor)
            return AdapterReply(request.layer, request.group, Phase.FORWARD, v)

        return answer


def _check_request(request: AdapterRequest, phase: Phase, weights: AdapterWeights) -> None:
    config = weights.config
    if request.phase is not phase or request.group not in config.groups or not 0 <= request.layer < weights.num_layers:
        raise ValidationError(
            f"unexpected adapter request: layer {request.layer} {request.group} {request.phase.value} "
            f"during {phase.value}"
        )


class _RemoteStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, remote: RemoteDecoder, cache, attention_mask, *ms):
        kept: dict[tuple[int, str], torch.Tensor] = {}
        request = ForwardRequest(hidden.detach(), cache=cache, train=True, attention_mask=attention_mask)
        result = remote.link.forward(request, remote._answer_forward(kept))
        ctx.remote, ctx.kept, ctx.want_input_grad = remote, kept, hidden.requires_grad
        return result.hidden

    @staticmethod
    def backward(ctx, grad_out):
        weights: AdapterWeights = ctx.remote.weights
        grads: dict[int, torch.Tensor] = {}  # id(M) -> dL/dM

        def answer(request: AdapterRequest) -> AdapterReply:
            _check_request(request, Phase.BACKWARD, weights)
            u = ctx.kept.get((request.layer, request.group))
            if u is None:
                raise ValidationError(f"backward for layer {request.layer} {request.group}, which forward never saw")
            ms = weights.group_ms(request.layer, request.group)
            with torch.enable_grad():
                u_leaf = u.detach().requires_grad_(True)
                m_leaves = [m.detach().requires_grad_(True) for m in ms]
                v = group_products(u_leaf, m_leaves, weights.config.shared_a)
                grad_u, *grad_ms = torch.autograd.grad(v, [u_leaf, *m_leaves], request.tensor)
            for m, g in zip(ms, grad_ms):
                grads[id(m)] = grads[id(m)] + g if id(m) in grads else g
            return AdapterReply(request.layer, request.group, Phase.BACKWARD, grad_u)

        result = ctx.remote.link.backward(BackwardRequest(grad_out.contiguous(), ctx.want_input_grad), answer)
        ms = list(weights.ms.values())
        return (result.grad_input, None, None, None, *[grads.get(id(m)) for m in ms])
