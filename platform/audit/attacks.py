"""The curious cloud's attacks: each reads only what the service records and public weights.

An honest-but-curious cloud knows every public weight (the backbone, A and B) and keeps every
tensor of the protocol (cloud_backbone.recording). From those alone:

- `InputInverter` recovers the device's input tokens from the state at the cut. With no
  decoder layer on the device that state is a row of the public embedding table, so the
  nearest row gives the token back. With k public layers on the device it matches the state,
  position by position, against candidate tokens run through those layers after the prefix
  recovered so far (vocabulary matching, SipIt arXiv 2510.15511); a cheap dictionary of each
  token's state proposes the candidates, so that only a few run through the layers.
- `LearnedInverter` learns the way back from states to tokens on public text alone, and is
  scored on users' text it never saw.
- `recover_outputs` reads the device's next tokens off the last hidden state the cloud
  returns, through the public final norm and head (and the public last layers, at M = 0,
  when the device runs its last layers itself).
- `recover_labels` reads the training targets off the gradient the device sends back: that
  gradient is J_norm^T·W^T·c(p − onehot(label)), and everything in it but the label is known.
  With last layers on the device it is that vector pulled back through them: the attack
  undoes them at M = 0, from the last position back, verifying candidate labels through the
  public last layers as vocabulary matching does. A training label is the next input
  token, so this is also the inputs' reconstruction from the gradients (BiSR's backward
  direction, arXiv 2409.00960): nothing else the device sends back depends on its text.
- `recover_m` solves u·M = (u·M) for M by least squares from the pairs the cloud relays, and
  `cloud_personalized` puts what it recovers on the public model, to ask it the user's facts.

The attacks work on the device's true weights where the cloud knows them (M = 0, a new
user); after personalization the device-side layers carry an M the cloud does not know, and
the same attacks run with M = 0 in its place.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from functools import cached_property
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache

from plora.clients.cut_noise import CutNoise
from plora.clients.device_model import DeviceModel
from plora.clients.training import CONSTANT, TrainSettings, train
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.loading import Backbone
from plora.cloud_backbone.privatelora import decoder_slice, truncate_cache
from plora.cloud_backbone.recording import CapturedStep
from plora.platform.audit.settings import InverterBudget
from plora.platform.runtime import split_embedded

CHUNK = 4096  # vocabulary rows per matmul: bounds memory at CHUNK × positions


class PublicModel:
    """What the cloud knows of the device's half: the backbone's public weights, M = 0.

    It takes `model` over (the device-side slice renumbers its layers), so pass a copy that
    serves nothing else."""

    def __init__(self, model: nn.Module, config: PrivateLoRAConfig):
        model.eval()
        decoder = model.get_decoder()
        self.config = config
        self.embedding = model.get_input_embeddings().weight.detach()
        self.head = model.get_output_embeddings().weight.detach()
        self.norm = decoder.norm
        num_layers = len(decoder.layers)
        self.front = decoder_slice(model, 0, config.device_layers) if config.device_layers else None
        last = config.device_last_layers
        self.back = decoder_slice(model, num_layers - last, num_layers) if last else None

    @property
    def vocab_size(self) -> int:
        return self.embedding.shape[0]

    @cached_property
    def head_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The label attack's float64 W, Q = w ⊙ W (w the final norm's weight) and |Q_v|²:
        computed once, as each costs a pass over the whole head."""
        head = self.head.double()
        q = head * self.norm.weight.detach().double()
        return head, q, (q * q).sum(-1)

    @torch.no_grad()
    def run_front(self, embeds: torch.Tensor, cache: DynamicCache | None) -> torch.Tensor:
        """(B, T, d) embeddings through the device's first layers, extending `cache`."""
        return self.front(inputs_embeds=embeds, cache=cache, use_cache=cache is not None).last_hidden_state

    def new_sequence(self, stack: nn.Module | None) -> DynamicCache | None:
        """A cache for one of the device's sequences through `stack` (front or back), if it has layers."""
        return DynamicCache(config=stack.config) if stack is not None else None


def nearest_rows(table: torch.Tensor, states: torch.Tensor, k: int = 1) -> torch.Tensor:
    """(N, k) indices of the table rows nearest (L2) to each of the (N, d) states, nearest first."""
    states = states.float()
    best_scores, best_ids = None, None
    for start in range(0, table.shape[0], CHUNK):
        rows = table[start : start + CHUNK].float()
        # -|e - h|² up to |h|², which is the same for every row
        scores = 2 * states @ rows.T - (rows * rows).sum(-1)
        scores, ids = scores.topk(min(k, rows.shape[0]), dim=-1)
        ids = ids + start
        if best_scores is not None:
            scores, order = torch.cat([best_scores, scores], -1).topk(k, dim=-1)
            ids = torch.cat([best_ids, ids], -1).gather(-1, order)
        best_scores, best_ids = scores, ids
    return best_ids


class LearnedInverter(nn.Module):
    """A learned map from the state at the cut back to the token at each position, trained only
    on public text run through the public device-side layers (M = 0). Its logits are
    norm(h)·W·Eᵀ with E the public embedding table: at the start W is the identity, the
    nearest-row attack; training bends it to the layers' effect."""

    def __init__(self, public: PublicModel):
        super().__init__()
        d = public.embedding.shape[1]
        self.public = public
        self.norm = nn.LayerNorm(d)
        self.map = nn.Linear(d, d)
        with torch.no_grad():
            self.map.weight.copy_(torch.eye(d))
            self.map.bias.zero_()

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.map(self.norm(states.float())) @ self.public.embedding.T

    def fit(self, sequences: list[list[int]], budget: InverterBudget, seed: int = 0, noise: CutNoise | None = None) -> dict:
        """Train on the states of `sequences` (public text) through the public device-side
        layers, with the devices' `noise` on them; returns what it trained on and its last loss."""
        ids = [torch.tensor(seq[:128]) for seq in sequences if seq]
        with torch.no_grad():
            states = torch.cat([self.public.run_front(self.public.embedding[seq][None], None)[0] if self.public.front is not None
                                else self.public.embedding[seq] for seq in ids])
            if noise is not None:
                states = noise.apply(states, noise.generator(seed))
        targets = torch.cat(ids)

        def batch_loss(positions: list[int]) -> tuple[torch.Tensor, int]:
            chosen = torch.tensor(positions)
            return F.cross_entropy(self(states[chosen]), targets[chosen]), len(positions)

        settings = TrainSettings(lr=budget.lr, batch_size=budget.batch, steps=budget.steps, seed=seed, anchor=None)
        progress = train(self, list(self.parameters()), batch_loss, range(len(targets)), settings, schedule=CONSTANT)
        return {"tokens": len(targets), "steps": progress.step, "last_loss": progress.last_loss}

    @torch.no_grad()
    def predict(self, states: torch.Tensor, k: int = 1) -> torch.Tensor:
        """(N, d) states -> (N, k) most likely tokens, most likely first."""
        return torch.cat([self(chunk).topk(k, dim=-1).indices for chunk in states.split(256)])


class InputInverter:
    """Tokens back from the state entering the cloud's first layer. Candidates come from a
    dictionary of each token's state, the nearest embedding rows and, if given, a learned
    inverter's top tokens."""

    def __init__(self, public: PublicModel, candidates: int = 64, widened: int = 1024, learned: LearnedInverter | None = None):
        self.public, self.candidates, self.widened, self.learned = public, candidates, widened, learned
        self._dictionary: torch.Tensor | None = None

    def dictionary(self) -> torch.Tensor:
        """Each token's state after the device-side layers, alone at position 0: close enough
        to its state in context to rank it among the candidates."""
        if self._dictionary is None:
            rows = [self.public.run_front(self.public.embedding[start : start + CHUNK, None], None)[:, 0]
                    for start in range(0, self.public.vocab_size, CHUNK)]
            self._dictionary = torch.cat(rows)
        return self._dictionary

    def new_sequence(self) -> DynamicCache | None:
        """The attacker's cache for one sequence of the device's (its first layers' keys and values)."""
        return self.public.new_sequence(self.public.front)

    @torch.no_grad()
    def invert(self, states: torch.Tensor, cache: DynamicCache | None = None) -> torch.Tensor:
        """(T, d) consecutive states of one sequence -> (T,) token ids. `cache` holds the
        recovered prefix (from new_sequence) and is extended with the recovered tokens."""
        if self.public.front is None:
            return nearest_rows(self.public.embedding, states)[:, 0]
        if cache is None:
            cache = self.new_sequence()
        # The rankings do not depend on the prefix: rank every position's candidates at once.
        rankings = [nearest_rows(self.dictionary(), states, self.widened), nearest_rows(self.public.embedding, states, self.widened)]
        if self.learned is not None:
            rankings.append(self.learned.predict(states, self.widened))
        ids = []
        for state, proposed in zip(states.float(), torch.stack(rankings, 1)):
            ids.append(self._match(state, proposed, cache))
            self.public.run_front(self.public.embedding[ids[-1]].view(1, 1, -1), cache)
        return torch.tensor(ids, dtype=torch.long)

    def _match(self, state: torch.Tensor, proposed: torch.Tensor, cache: DynamicCache) -> int:
        """(rankings, widened) proposed tokens: the first `candidates` of each ranking, then,
        unless one matched exactly, all of them."""
        best, distance = self._verify(proposed[:, : self.candidates].unique(), state, cache)
        if distance > 1e-3 * state.norm():
            best, distance = self._verify(proposed.unique(), state, cache)
        return best

    def _verify(self, tokens: torch.Tensor, state: torch.Tensor, cache: DynamicCache) -> tuple[int, float]:
        """Run each candidate after the prefix; the one whose state is nearest the observed one."""
        trial = copy.deepcopy(cache)
        if trial.get_seq_length():
            trial.batch_repeat_interleave(len(tokens))
        out = self.public.run_front(self.public.embedding[tokens][:, None], trial if trial.get_seq_length() else None)
        distances = (out[:, -1] - state).norm(dim=-1)
        i = int(distances.argmin())
        return int(tokens[i]), float(distances[i])


@torch.no_grad()
def recover_outputs(public: PublicModel, hidden_out: torch.Tensor, cache: DynamicCache | None = None) -> torch.Tensor:
    """(B, T, d) hidden states the cloud returned -> (B, T) the device's greedy next tokens:
    through the device's last layers at M = 0 if it has any (with `cache`, from
    public.new_sequence(public.back), carrying a sequence's earlier positions), then the
    public final norm and head."""
    hidden = hidden_out.float()
    if public.back is not None:
        hidden = public.back(inputs_embeds=hidden, cache=cache, use_cache=cache is not None).last_hidden_state
    return (public.norm(hidden) @ public.head.T).argmax(-1)


def recover_labels(public: PublicModel, hidden_out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(B, T, d) states the cloud returned in a training step and the gradients the device sent
    for them -> (B, T) the label each position's loss took (the row's next token); -1 where
    the gradient names none (no loss at that position)."""
    if public.back is None:
        return _labels_at_head(public, hidden_out.flatten(0, 1), grad.flatten(0, 1)).view(hidden_out.shape[:2])
    labels = torch.full(hidden_out.shape[:2], -1, dtype=torch.long)
    for row, (states, grads) in enumerate(zip(hidden_out, grad)):
        # Positions after the last one with a gradient reach no loss (the layers are causal):
        # padding, or a response's last token.
        live = (grads.abs().amax(-1) > 0).nonzero()
        if len(live):
            n = int(live[-1]) + 1
            labels[row, :n] = _labels_through_last_layers(public, states[:n], grads[:n])
    return labels


LABEL_FIT = 0.5  # a position names a label only if the label's gradient explains this share of what was sent
# The attack through the last layers verifies this many candidate labels per ranking, and,
# unless one explains nearly all of the gradient, this many more.
PROPOSALS, WIDENED_PROPOSALS = 64, 1024
NEARLY_ALL = 0.9
NO_GRADIENT_LEFT = 1e-4  # of the gradient's norm at a position: later positions' terms explain all of it


class _HeadReading(NamedTuple):
    """What the cloud computes of the device's loss at (N, d) states entering the final norm,
    for (N, d) gradients g of the loss at them. The loss is c·CE(W·norm(h), y) per labelled
    position, so g = c·Jᵀ·Wᵀ·(p − e_y), and all of it but y and c is public."""

    fit: torch.Tensor  # (N, V): |g|² less the least residual over c, per candidate y
    pulled_p: torch.Tensor  # (N, d): Jᵀ·Wᵀ·p
    probs: torch.Tensor  # (N, V): p


@torch.no_grad()
def _read_head(public: PublicModel, hidden: torch.Tensor, grad: torch.Tensor) -> _HeadReading:
    x, g = hidden.double(), grad.double()
    head, q, q_sq = public.head_terms  # Jᵀ·W_v = s·Q_v − (s³/d)(x·Q_v)·x
    s, k = _norm_scales(public, x)
    probs = torch.softmax((x * s * public.norm.weight.double()) @ head.T, dim=-1)  # (n, V)
    a = _through_norm(x, s, k, probs @ q)
    qx, qg, qa = x @ q.T, g @ q.T, a @ q.T  # (n, V)
    g_b = s * qg - k * qx * (g * x).sum(-1, keepdim=True)  # <g, Jᵀ·W_v>
    a_b = s * qa - k * qx * (a * x).sum(-1, keepdim=True)  # <a, Jᵀ·W_v>
    b_b = s**2 * q_sq - 2 * s * k * qx**2 + k**2 * qx**2 * (x * x).sum(-1, keepdim=True)  # |Jᵀ·W_v|²
    diff_sq = (a * a).sum(-1, keepdim=True) - 2 * a_b + b_b  # |a − Jᵀ·W_v|²
    return _HeadReading(((g * a).sum(-1, keepdim=True) - g_b) ** 2 / diff_sq.clamp_min(1e-300), a, probs)


def _norm_scales(public: PublicModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The final RMS norm's s = 1/rms(x) and s³/d at (n, d) states x, each (n, 1)."""
    eps = getattr(public.norm, "variance_epsilon", getattr(public.norm, "eps", 1e-6))
    s = (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    return s, s**3 / x.shape[-1]


def _through_norm(x: torch.Tensor, s: torch.Tensor, k: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """J_normᵀ applied to (n, d) vectors u already scaled by the norm's weight."""
    return s * u - k * x * (x * u).sum(-1, keepdim=True)


@torch.no_grad()
def _labels_at_head(public: PublicModel, hidden: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(N, d) states entering the final norm and the (N, d) gradients of the loss at them ->
    (N,) labels: the candidate with the least residual, -1 where none explains the gradient."""
    labels = torch.full((hidden.shape[0],), -1, dtype=torch.long)
    labelled = grad.abs().amax(-1) > 0
    for rows in labelled.nonzero()[:, 0].split(256):
        best = _read_head(public, hidden[rows], grad[rows]).fit.max(-1)
        explains = best.values >= LABEL_FIT * grad[rows].double().pow(2).sum(-1)
        labels[rows] = torch.where(explains, best.indices, -1)
    return labels


def _labels_through_last_layers(public: PublicModel, states: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """One sequence's (n, d) states the cloud returned and the gradients the device sent for
    them -> (n,) labels, through the device's last layers at M = 0.

    The gradient at position t is Σ_{u ≥ t} J_utᵀ·v_u, v_u the gradient at the layers' output
    (the layers are causal). From the last position back, the terms of later positions are
    known, which leaves J_ttᵀ·v_t: each candidate label's v_t runs back through the public
    layers, for the position alone after its cached prefix, and the one that explains the rest
    is the label. The candidates are the labels that would explain it without the layers, and
    the public model's likeliest next tokens (PROPOSALS of each, then WIDENED_PROPOSALS)."""
    n = len(states)
    x = states.float()[None].requires_grad_()
    with torch.enable_grad():
        out = public.back(inputs_embeds=x).last_hidden_state
    final = out.detach()[0].double()
    prefix = public.new_sequence(public.back)
    with torch.no_grad():  # a second pass, for a cache without a graph: each position copies it
        public.back(inputs_embeds=x.detach(), cache=prefix, use_cache=True)
    later = torch.zeros(n, states.shape[-1], dtype=torch.float64)  # Σ_{u > t} J_utᵀ·v_u, as the v_u are found
    labels = torch.full((n,), -1, dtype=torch.long)
    q = public.head_terms[1]
    for t in reversed(range(n)):
        rest = grads[t].double() - later[t]
        if rest.norm() <= NO_GRADIENT_LEFT * grads[t].double().norm():
            continue
        reading = _read_head(public, final[t : t + 1], rest[None])
        s, k = _norm_scales(public, final[t : t + 1])
        for proposals in (PROPOSALS, WIDENED_PROPOSALS):
            proposals = min(proposals, public.vocab_size)
            candidates = torch.cat([reading.fit[0].topk(proposals).indices, reading.probs[0].topk(proposals).indices]).unique()
            at_output = torch.cat([reading.pulled_p, _through_norm(final[t : t + 1], s, k, q[candidates])])  # Jᵀ·Wᵀ·p, Jᵀ·W_y
            pulled = _pull_back_alone(public, x.detach()[0, t], prefix, t, at_output)
            diff = pulled[0] - pulled[1:]  # J_ttᵀ·Jᵀ·Wᵀ·(p − e_y), per candidate y
            fit = (diff @ rest) ** 2 / (diff * diff).sum(-1).clamp_min(1e-300)
            best = int(fit.argmax())
            if fit[best] >= NEARLY_ALL * (rest @ rest):
                break
        if fit[best] < LABEL_FIT * (rest @ rest):
            continue
        labels[t] = candidates[best]
        v = (diff[best] @ rest) / (diff[best] @ diff[best]) * (at_output[0] - at_output[1 + best])
        cotangent = torch.zeros_like(out)
        cotangent[0, t] = v.float()
        (earlier,) = torch.autograd.grad(out, x, cotangent, retain_graph=True)
        later[:t] += earlier[0, :t].double()
    return labels


def _pull_back_alone(public: PublicModel, state: torch.Tensor, prefix: DynamicCache, t: int, vectors: torch.Tensor) -> torch.Tensor:
    """J_ttᵀ·vectors: (K, d) gradients at the last layers' output at position t, back to its
    input at t, with the earlier positions held (their keys and values in `prefix`)."""
    cache = copy.deepcopy(prefix)
    truncate_cache(cache, t)
    if t:
        cache.batch_repeat_interleave(len(vectors))
    alone = state.expand(len(vectors), 1, -1).clone().requires_grad_()
    with torch.enable_grad():
        out = public.back(inputs_embeds=alone, cache=cache if t else None, use_cache=t > 0).last_hidden_state
        (pulled,) = torch.autograd.grad(out, alone, vectors[:, None].float())
    return pulled[:, 0].double()


def recover_m(u: torch.Tensor, um: torch.Tensor, config: PrivateLoRAConfig, members: int) -> list[torch.Tensor]:
    """Each member's M of one group, by least squares from (N, a·r) u and (N, members·r) u·M."""
    r = config.rank
    u, um = u.reshape(-1, u.shape[-1]).double(), um.reshape(-1, um.shape[-1]).double()
    out = []
    for i in range(members):
        x = u if config.shared_a else u[:, i * r : (i + 1) * r]
        out.append(torch.linalg.lstsq(x, um[:, i * r : (i + 1) * r]).solution.float())
    return out


def recover_ms(steps: Iterable[CapturedStep], config: PrivateLoRAConfig, tokens: int | None = None) -> dict[tuple[int, str], list[torch.Tensor]]:
    """Every M the cloud's layers use, by (layer, group), from the first `tokens` (all when
    None) u and u·M pairs of `steps`, recorded while M stayed the same."""
    pairs: dict[tuple[int, str], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for step in steps:
        products = {(layer, group): um for layer, group, um in step.adapter("um")}
        for layer, group, u in step.adapter("u"):
            if (layer, group) in products:
                u_rows, um_rows = pairs.setdefault((layer, group), ([], []))
                u_rows.append(u.flatten(0, -2))
                um_rows.append(products[layer, group].flatten(0, -2))
    return {key: recover_m(torch.cat(u)[:tokens], torch.cat(um)[:tokens], config, len(config.groups[key[1]]))
            for key, (u, um) in pairs.items()}


def cloud_personalized(backbone: Backbone, config: PrivateLoRAConfig, ms: dict[tuple[int, str], list[torch.Tensor]]) -> DeviceModel:
    """Fact extraction's model: the public backbone with the M the cloud recovered, and M = 0
    where it saw none (the device's own layers). It takes `backbone` over."""
    model = split_embedded(backbone, config)
    with torch.no_grad():
        for (layer, group), recovered in ms.items():
            for m, m_hat in zip(model.weights.group_ms(layer, group), recovered):
                m.copy_(m_hat)
    return model

