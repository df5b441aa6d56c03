"""Generating and scoring text with a split model. The KV cache of the cloud layers lives
in the cloud session; that of the device layers on the device."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from plora.clients.device_model import DeviceModel
from plora.cloud_backbone.protocol.messages import CacheMode
from plora.storage.errors import ConfigError


# Sorting a whole vocabulary costs some 30 times the top few hundred of it, where a trained
# model's nucleus nearly always ends.
NUCLEUS_CANDIDATES = 256


def _in_nucleus(ordered: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which of `ordered` (probabilities, descending) are in the nucleus: the smallest prefix
    whose mass reaches top_p (at least one token), and every token as probable as its last.
    So a token is in it when the tokens more probable than it hold less than top_p."""
    last = ordered[ordered.cumsum(-1) - ordered < top_p][-1]
    return ordered >= last


def _nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution a token is sampled from, over the vocabulary (vocab,); one-hot on the
    argmax at temperature 0."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.shape[-1]).to(logits.dtype)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1:
        return probs
    ordered, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.numel()))
    keep = _in_nucleus(ordered, top_p)
    if keep[-1] and len(order) < probs.numel():  # the nucleus may go on past them
        ordered, order = probs.sort(descending=True)
        keep = _in_nucleus(ordered, top_p)
    return torch.zeros_like(logits).scatter_(0, order, ordered * keep / (ordered * keep).sum())


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from (vocab,) logits, from `_nucleus`'s distribution: greedy at temperature 0,
    else nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        ordered, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.numel()))
        keep = _in_nucleus(ordered, top_p)
        if not keep[-1] or len(order) == probs.numel():
            return int(order[torch.multinomial(ordered * keep, 1, generator=generator)])
    # The whole vocabulary, or a nucleus past the candidates (a flat distribution): draw from
    # every token by its inverse CDF, and again until the token is in the nucleus. That draws
    # from the nucleus exactly, in at most 1 / top_p draws on average, without the sort of the
    # vocabulary that `_nucleus` needs, which costs some 60 times more (3.5 ms for 49k tokens).
    cdf = probs.cumsum(-1)
    while True:
        token = int(torch.searchsorted(cdf, torch.rand(1, generator=generator) * cdf[-1]).clamp(max=probs.numel() - 1))
        if top_p >= 1 or torch.where(probs > probs[token], probs, 0).sum() < top_p:
            return token


def _check_sampling(temperature: float, top_p: float) -> None:
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")


@dataclass(frozen=True)
class Draft:
    """Tokens a drafter guesses will come next, and the distribution each was drawn from
    ((len(tokens), vocab)); None when the drafter chose them outright (a point mass)."""

    tokens: list[int]
    probs: torch.Tensor | None = None


NO_DRAFT = Draft([])


class Drafter(Protocol):
    """Guesses the tokens that follow `context` (prompt and reply so far), at most `limit`
    of them. A guess costs no round trip: the cloud checks all of them in the pass that
    decodes the next token, so every accepted one saves a pass."""

    def draft(self, context: list[int], limit: int) -> Draft: ...


@dataclass(frozen=True)
class PromptLookup:
    """Drafts by copying: finds the context's last n tokens (n from max_ngram down to 1)
    earlier in the context, and proposes what followed their latest earlier occurrence.
    Free to run and right whenever a reply quotes its prompt or repeats itself (rewriting,
    summarising, editing, code)."""

    max_tokens: int = 8
    max_ngram: int = 3

    def draft(self, context: list[int], limit: int) -> Draft:
        limit = min(limit, self.max_tokens)
        if limit <= 0:
            return NO_DRAFT
        for n in range(min(self.max_ngram, len(context) - 1), 0, -1):
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):
                if context[start + n - 1] == tail[-1] and context[start : start + n] == tail:
                    return Draft(context[start + n : start + n + limit])
        return NO_DRAFT


class ModelDrafter:
    """Drafts with a small causal LM of the same tokenizer, run whole on the device, sampling
    as the reply does (greedy at temperature 0). It re-reads the context for every drafted
    token; a drafter worth its cost would keep a KV cache."""

    def __init__(self, model, max_tokens: int = 4, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        _check_sampling(temperature, top_p)
        self.model, self.max_tokens, self.temperature, self.top_p = model, max_tokens, temperature, top_p
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    @torch.no_grad()
    def draft(self, context: list[int], limit: int) -> Draft:
        tokens, probs = [], []
        for _ in range(min(limit, self.max_tokens)):
            logits = self.model(torch.tensor([context + tokens])).logits[0, -1]
            probs.append(_nucleus(logits, self.temperature, self.top_p))
            tokens.append(_pick(logits, self.temperature, self.top_p, self.generator))
        return Draft(tokens, torch.stack(probs)) if tokens else NO_DRAFT


def verify(
    logits: torch.Tensor, draft: Draft, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[list[int], int]:
    """(the drafted tokens accepted, the token after them) from the logits of one pass over
    [last token, *draft] ((len(draft) + 1, vocab)).

    Greedy: a drafted token is accepted while it is the argmax, so the reply is the one plain
    decoding gives. Sampling: the speculative-sampling rule (Leviathan et al. 2023, Chen et
    al. 2023): token d drawn from q is accepted with probability min(1, p(d) / q(d)), and the
    first rejected one is replaced by a draw from max(0, p - q), normalised; every token of
    the reply then has the distribution plain sampling gives it."""
    for i, token in enumerate(draft.tokens):
        if temperature == 0:
            best = int(logits[i].argmax())
            if best == token:
                continue
            return draft.tokens[:i], best
        p = _nucleus(logits[i], temperature, top_p)
        q = draft.probs[i] if draft.probs is not None else torch.nn.functional.one_hot(torch.tensor(token), p.shape[-1]).to(p.dtype)
        if torch.rand((), generator=generator) * q[token] < p[token]:  # u < p/q, without dividing by a zero q
            continue
        residual = (p - q).clamp(min=0)
        # q >= p everywhere only if q = p, when rejection has probability 0: p is then right.
        residual = residual if residual.sum() > 0 else p
        return draft.tokens[:i], int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return draft.tokens, _pick(logits[len(draft.tokens)], temperature, top_p, generator)


@torch.no_grad()
def stream_tokens(
    model: DeviceModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_ids: set[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    drafter: Drafter | None = None,
) -> Iterator[int]:
    """Yield new token ids one by one, until a stop id (not yielded) or the budget runs out.

    With a drafter, each pass through the split feeds the last token and the drafter's guess
    of the ones after it; the cloud checks all of them for the round trips of one token, and
    every guess `verify` accepts is a pass saved. The cloud's cache then drops the rejected
    guesses on the next pass (`keep_cached`), at no round trip of its own. Greedy output is
    the same as without a drafter; sampled output has the same distribution, not the same
    tokens for a seed."""
    if not prompt_ids:
        raise ConfigError("the prompt is empty")
    _check_sampling(temperature, top_p)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    logits = model(torch.tensor([prompt_ids]), CacheMode.START, logits_to_keep=1)[0, -1]
    token = _pick(logits, temperature, top_p, generator)
    context, accepted = list(prompt_ids), []
    valid = held = len(prompt_ids)  # positions the cloud holds that belong to the reply, and all it holds
    while True:
        for new in (*accepted, token):
            if new in stop_ids or len(context) - len(prompt_ids) == max_new_tokens:
                return
            yield new
            context.append(new)
        left = max_new_tokens - (len(context) - len(prompt_ids))
        if not left:
            return
        draft = drafter.draft(context, left - 1) if drafter is not None else NO_DRAFT
        fed = [token, *draft.tokens]
        logits = model(torch.tensor([fed]), CacheMode.EXTEND, keep_cached=valid if held > valid else None)[0]
        held = valid + len(fed)
        accepted, token = verify(logits, draft, temperature, top_p, generator)
        valid += 1 + len(accepted)


@torch.no_grad()
def generate_batch(
    model: DeviceModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_ids: set[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    seeds: list[int] | None = None,
) -> list[list[int]]:
    """New token ids for several prompts at once, each until a stop id (not kept) or the budget.

    One pass through the split per token for the whole batch instead of one per prompt per
    token, which is what makes a generation pass over many prompts affordable when every
    pass costs a network round trip per layer. Prompts are left-padded and masked, so every
    row's next token is the last column. Positions then start later in padded rows, which
    RoPE does not notice (it depends on relative positions only), so a row's text is the one
    it gets alone up to float rounding. Row i samples with its own generator, seeded seeds[i].
    """
    if not prompts or not all(prompts):
        raise ConfigError("every prompt must be non-empty, and there must be at least one")
    _check_sampling(temperature, top_p)
    if seeds is not None and len(seeds) != len(prompts):
        raise ConfigError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    generators = [torch.Generator().manual_seed(s) for s in seeds] if seeds is not None else [None] * len(prompts)
    width = max(len(p) for p in prompts)
    # Pad with a real token id: masked positions are never attended to, but must embed.
    ids = torch.tensor([[p[0]] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    logits = model(ids, CacheMode.START, mask, logits_to_keep=1)[:, -1]
    written: list[list[int]] = [[] for _ in prompts]
    running = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        picks = [_pick(logits[i], temperature, top_p, generators[i]) for i in range(len(prompts))]
        for i in list(running):
            if picks[i] in stop_ids:
                running.remove(i)
            else:
                written[i].append(picks[i])
        if not running:
            break
        # Finished rows ride along (the cache is one batch); what they produce is dropped.
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
        logits = model(torch.tensor(picks)[:, None], CacheMode.EXTEND, mask)[:, -1]
    return written


@torch.no_grad()
def token_logprobs(model: DeviceModel, token_ids: list[int]) -> list[float]:
    """log p(tokens[i] | tokens[:i]) for i >= 1."""
    if len(token_ids) < 2:
        raise ConfigError("scoring needs at least two tokens")
    ids = torch.tensor([token_ids])
    logprobs = torch.log_softmax(model(ids)[0, :-1], dim=-1)
    return logprobs.gather(-1, ids[0, 1:, None])[:, 0].tolist()


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of a prompt; wrapped as a user turn when the backbone has a chat template."""
    if chat and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]
