"""Generating and scoring text with a split model. The KV cache of the cloud layers lives
in the cloud session; that of the device layers on the device."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from plora.clients.device_model import DeviceModel
from plora.cloud_backbone.protocol.messages import CacheMode
from plora.storage.errors import ConfigError


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from (vocab,) logits: greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    ordered, order = probs.sort(descending=True)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    keep = ordered.cumsum(-1) - ordered < top_p
    ordered = ordered * keep
    choice = torch.multinomial(ordered / ordered.sum(), 1, generator=generator)
    return int(order[choice])


def _check_sampling(temperature: float, top_p: float) -> None:
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")


@torch.no_grad()
def stream_tokens(
    model: DeviceModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_ids: set[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one by one, until a stop id (not yielded) or the budget runs out."""
    if not prompt_ids:
        raise ConfigError("the prompt is empty")
    _check_sampling(temperature, top_p)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    logits = model(torch.tensor([prompt_ids]), CacheMode.START)[0, -1]
    for _ in range(max_new_tokens):
        token = _pick(logits, temperature, top_p, generator)
        if token in stop_ids:
            return
        yield token
        logits = model(torch.tensor([[token]]), CacheMode.EXTEND)[0, -1]


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
    logits = model(ids, CacheMode.START, mask)[:, -1]
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
