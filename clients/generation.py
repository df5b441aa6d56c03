"""Generating and scoring text with a split model. The KV cache of the cloud layers lives
in the cloud session; that of the device layers on the device."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from plora.clients.device_model import DeviceModel
from plora.cloud_backbone.protocol import CacheMode
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
    if temperature < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    logits = model(torch.tensor([prompt_ids]), CacheMode.START)[0, -1]
    for _ in range(max_new_tokens):
        token = _pick(logits, temperature, top_p, generator)
        if token in stop_ids:
            return
        yield token
        logits = model(torch.tensor([[token]]), CacheMode.EXTEND)[0, -1]


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
