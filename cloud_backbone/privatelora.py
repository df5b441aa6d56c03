"""What PrivateLoRA is: the math both halves of the split import, with its settings (adapter_config.py).

A target projection y = W·x (x: [..., d], y: [..., k]) becomes

    y + s · ((x·A)·M)·B        A: [d, r] public, M: [r, r] private, B: [r, k] public

A and B are frozen and public: random, derived from the backbone version's seed, or derived from
the adapted projection's own weight (`PrivateLoRAConfig.projections`), so anyone can
regenerate and audit them and they never travel with a user's data. M starts at zero, so a
new user's model is exactly the base model.

Projections that read the same tensor form an *input group*: q, k and v read the attention
input; gate and up read the MLP input. A group is the unit of one round trip: the cloud
sends u for the whole group (one r-vector per module, or a single one when the group
shares A) and gets back u·M for every module in it, concatenated in target order.

Where u·M comes from is an `Exchange`: locally it is a matmul with the device's M (device-side
layers, monolithic reference); on the cloud it is a round trip to the device. An exchange sends
u when it is called and hands back a function that waits for u·M, so that the group's base
projections compute while the device answers.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from plora.cloud_backbone.adapter_config import TARGET_MODULES, PrivateLoRAConfig, m_name
from plora.storage.errors import ConfigError

if TYPE_CHECKING:  # transformers is imported only where a model is loaded, after plora went offline
    from transformers import DynamicCache


def _generator(seed: int, layer: int, key: str) -> torch.Generator:
    # A stable 64-bit seed per (version seed, layer, projection); Python's hash() is salted.
    digest = hashlib.sha256(f"plora/{seed}/{layer}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A [rows, cols] matrix whose shorter side is orthonormal, made in float64 on the CPU so
    that every machine derives the same projections from the same seed."""
    tall = max(rows, cols), min(rows, cols)
    q, r = torch.linalg.qr(torch.randn(*tall, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # fix QR's sign ambiguity: a unique, Haar-distributed basis
    return (q if rows >= cols else q.T).to(torch.float32)


@dataclass
class GroupProjections:
    """The public projections of one input group in one layer."""

    a: torch.Tensor  # (d, a_count·r): the group's A matrices side by side
    b: list[torch.Tensor] = field(default_factory=list)  # per member: (r, k_member)


def public_projections(config: PrivateLoRAConfig, layer: int, group: str, weights: list[torch.Tensor]) -> GroupProjections:
    """A and B for one group of one layer, whose members' weights (out, in) are `weights`: from
    the seed alone, or from each weight's singular vectors (`_principal`).

    Why orthonormal: A with orthonormal columns makes u = x·A an isometric view of x (each
    component is O(|x|/sqrt(d)) whatever the width), and B with orthonormal rows passes u·M
    to the output with unit gain. M's gradient u^T·(dL/dy·B^T) is then well conditioned and
    width-independent, so one Adam learning rate works across backbones, and s = 1 keeps
    the residual on the scale of the base projection's output. Gaussian A/B of the same
    variance work too but condition M's problem worse.
    """
    members = config.groups[group]
    if config.projections == "principal":
        pairs = [_principal(weight, config.rank, f"layer {layer} {TARGET_MODULES[m]}")
                 for m, weight in zip(members, weights, strict=True)]
        return GroupProjections(a=torch.cat([a for a, _ in pairs], 1), b=[b for _, b in pairs])
    in_features = weights[0].shape[1]
    keys = [group] if config.shared_a else [TARGET_MODULES[m] for m in members]
    a = torch.cat([_orthonormal(in_features, config.rank, _generator(config.seed, layer, f"A/{k}")) for k in keys], 1)
    b = [
        _orthonormal(config.rank, weight.shape[0], _generator(config.seed, layer, f"B/{TARGET_MODULES[m]}"))
        for m, weight in zip(members, weights, strict=True)
    ]
    return GroupProjections(a=a, b=b)


def _principal(weight: torch.Tensor, rank: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A (in, r): the top r right singular vectors of `weight` (out, in); B (r, out): its top r left
    ones. In float64 on the CPU, and each pair of vectors signed so that A's largest entry in
    that column is positive: SVD fixes a pair only up to a joint sign, which a LAPACK build may
    choose otherwise, and every machine must derive the same A and B as the one M was trained with."""
    if rank > min(weight.shape):
        raise ConfigError(f"rank {rank} is more than {name} has singular vectors ({min(weight.shape)}); use a lower rank")
    u, _, vh = torch.linalg.svd(weight.detach().to("cpu", torch.float64), full_matrices=False)
    a, b = vh[:rank].T, u[:, :rank].T
    sign = torch.sign(a.gather(0, a.abs().argmax(0, keepdim=True)))
    return (a * sign).to(torch.float32).contiguous(), (b * sign.T).to(torch.float32).contiguous()


def group_products(u: torch.Tensor, ms: list[torch.Tensor], shared_a: bool) -> torch.Tensor:
    """v = u·M for every member of a group: u (..., a_count·r) -> v (..., members·r)."""
    r = ms[0].shape[0]
    if shared_a:
        return u @ torch.cat(ms, dim=1)
    return torch.cat([u[..., i * r : (i + 1) * r] @ m for i, m in enumerate(ms)], dim=-1)


# (layer, group, u) -> a function that returns u·M. Locally a matmul; on the cloud a round trip
# to the device, begun when the exchange is called and awaited when the function is.
Exchange = Callable[[int, str, torch.Tensor], Callable[[], torch.Tensor]]


class AdapterWeights(nn.Module):
    """The private half of PrivateLoRA: one M per adapted projection per layer. Device only."""

    def __init__(self, config: PrivateLoRAConfig, num_layers: int):
        super().__init__()
        self.config = config
        self.num_layers = num_layers
        self.ms = nn.ParameterDict(
            {
                self._key(layer, target): nn.Parameter(torch.zeros(config.rank, config.rank))
                for layer, target in config.adapted(num_layers)
            }
        )

    @staticmethod
    def _key(layer: int, target: str) -> str:
        return f"{layer}_{target}"  # ParameterDict keys may not contain dots

    def group_ms(self, layer: int, group: str) -> list[torch.Tensor]:
        return [self.ms[self._key(layer, t)] for t in self.config.groups[group]]

    def products(self, layer: int, group: str, u: torch.Tensor) -> torch.Tensor:
        return group_products(u, self.group_ms(layer, group), self.config.shared_a)

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(file name, M) in a stable order, as adapter files store them."""
        for layer, target in self.config.adapted(self.num_layers):
            yield m_name(layer, target), self.ms[self._key(layer, target)]

    def load_named_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = dict(self.named_tensors())
        if set(tensors) != set(expected):
            missing = sorted(set(expected) - set(tensors))[:3]
            extra = sorted(set(tensors) - set(expected))[:3]
            raise ConfigError(f"adapter tensors do not match the configuration: missing {missing}, unexpected {extra}")
        with torch.no_grad():
            for name, param in expected.items():
                if tensors[name].shape != param.shape:
                    raise ConfigError(f"{name} has shape {tuple(tensors[name].shape)}, expected {tuple(param.shape)}")
                param.copy_(tensors[name])


class AdaptedGroup(nn.Module):
    """Computes the outputs of one input group once, for all its members.

    The first member called with a new input sends u for the whole group through the
    exchange, computes every member's base projection while the reply is on its way, and
    adds the residuals; the others pick up their output for the same input tensor. That
    pending state is per thread, so several sessions can run the same layers at once.
    """

    def __init__(self, config: PrivateLoRAConfig, layer: int, name: str, projections: GroupProjections, bases: list[nn.Linear],
                 exchange_slot: ExchangeSlot):
        super().__init__()
        self.layer, self.name, self.scale, self.rank = layer, name, config.scale, config.rank
        self.register_buffer("a", projections.a, persistent=False)
        for i, b in enumerate(projections.b):
            self.register_buffer(f"b{i}", b, persistent=False)
        # A plain attribute, not submodules: each base stays registered once, in its wrapper.
        self.__dict__["bases"] = tuple(bases)
        self._slot = exchange_slot
        self._pending = threading.local()  # .input and .outputs of the call in flight

    def output(self, member: int, x: torch.Tensor) -> torch.Tensor:
        pending = self._pending
        if getattr(pending, "input", None) is not x or pending.outputs[member] is None:
            answer = self._slot.exchange(self.layer, self.name, x @ self.a)  # u: (B, T, a_count·r)
            bases = [base(x) for base in self.bases]
            v, r = answer(), self.rank  # (B, T, members·r)
            pending.outputs = [
                base + self.scale * (v[..., i * r : (i + 1) * r] @ getattr(self, f"b{i}")) for i, base in enumerate(bases)
            ]
            pending.input = x
        out, pending.outputs[member] = pending.outputs[member], None
        if all(output is None for output in pending.outputs):
            pending.input = None  # drop the reference so activations are not kept alive
        return out


class PrivateLoRALinear(nn.Module):
    """Wraps a frozen projection, PEFT style: base_layer(x) + its group's residual."""

    def __init__(self, base_layer: nn.Linear, group: AdaptedGroup, member: int):
        super().__init__()
        self.base_layer = base_layer
        # A plain attribute, not a submodule: the group is shared by its members and
        # registered once on the layer (see `attach`).
        self.__dict__["group"] = group
        self.member = member

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(self.member, x)


class ExchangeSlot:
    """Where the adapted groups of a stack find the exchange for the current call (per thread)."""

    def __init__(self) -> None:
        self._current = threading.local()

    def exchange(self, layer: int, group: str, u: torch.Tensor) -> Callable[[], torch.Tensor]:
        exchange = getattr(self._current, "exchange", None)
        if exchange is None:
            raise RuntimeError("an adapted layer ran outside `using(exchange)`")
        return exchange(layer, group, u)

    @contextmanager
    def using(self, exchange: Exchange) -> Iterator[None]:
        previous = getattr(self._current, "exchange", None)
        self._current.exchange = exchange
        try:
            yield
        finally:
            self._current.exchange = previous


def _submodule(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise ConfigError(f"decoder layer {type(root).__name__} has no module {path!r} to adapt") from err


def attach(layers: nn.ModuleList, first_layer: int, config: PrivateLoRAConfig) -> ExchangeSlot:
    """Wrap the target projections of `layers` in place; layer j is global layer first_layer+j.

    Returns the slot through which every adapted group of these layers gets its u·M.
    """
    slot = ExchangeSlot()
    for j, layer in enumerate(layers):
        index = first_layer + j
        for group_name, members in config.groups.items() if config.adapts(index) else ():
            paths = [TARGET_MODULES[m] for m in members]
            bases = [_submodule(layer, p) for p in paths]
            for path, base in zip(paths, bases):
                if not isinstance(base, nn.Linear):
                    raise ConfigError(f"layer {index} {path} is {type(base).__name__}, expected a Linear")
            in_features = {b.in_features for b in bases}
            if len(in_features) != 1:
                raise ConfigError(f"layer {index} group {group_name} members read different widths {in_features}")
            proj = public_projections(config, index, group_name, [b.weight for b in bases])
            group = AdaptedGroup(config, index, group_name, proj, bases, slot).to(bases[0].weight.device)
            layer.add_module(f"privatelora_{group_name}", group)
            for member, (path, base) in enumerate(zip(paths, bases)):
                parent_path, _, child = path.rpartition(".")
                setattr(layer.get_submodule(parent_path), child, PrivateLoRALinear(base, group, member))
    return slot


def local_exchange(weights: AdapterWeights) -> Exchange:
    """u·M computed in place with the device's own M (differentiable)."""

    def exchange(layer: int, group: str, u: torch.Tensor) -> Callable[[], torch.Tensor]:
        v = weights.products(layer, group, u)
        return lambda: v

    return exchange


def decoder_slice(model: nn.Module, start: int, stop: int) -> nn.Module:
    """Decoder layers [start, stop) of a Hugging Face causal LM as a stack of their own.

    The stack is the model family's own decoder class (so masks, rotary embeddings and the
    KV cache behave exactly as in transformers), holding the original layer modules, with
    no embedding and an identity final norm: hidden states in, hidden states out. The layers'
    cache indices are renumbered from 0, so a slice must not be run inside `model` again.
    """
    decoder = model.get_decoder()
    layers = decoder.layers[start:stop]
    config = copy.deepcopy(decoder.config)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[start:stop]
    with torch.device("meta"):
        stack = type(decoder)(config)
    stack.embed_tokens = None
    stack.norm = nn.Identity()
    stack.rotary_emb = decoder.rotary_emb
    stack.layers = nn.ModuleList(layers)
    for j, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = j
    return stack


def truncate_cache(cache: DynamicCache | None, length: int) -> None:
    """Keep the first `length` positions of every layer of a decoder stack's KV cache. Layers
    may hold different lengths (a step that failed at layer k extended only the layers below
    k); each is cut to `length`, so the stack is consistent again."""
    for layer in cache.layers if cache is not None else ():
        if getattr(layer, "is_initialized", False):
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]
