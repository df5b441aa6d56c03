"""Anchor text: generic text the base model writes itself, to keep personalization from
costing general ability.

Personal data is a few narrow examples. Trained on them alone, M moves the whole model: in
`plora bench quality` the loss on generic text rose by 180%. Training therefore also pulls
the model towards the base model (M = 0) on generic text, the anchor (see
clients.training). The product ships no data set, so the device writes the anchor itself:
the base model's own replies to a small built-in set of generic requests and its own
continuations of a few plain-text openings, sampled with a fixed seed. Text the base model
samples is where its distribution matters most, and the KL on it estimates how far the
personalized model's whole output distribution has moved. The text depends only on the
backbone, the settings and the seed, so a device can write it once and keep it (`text_key`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from plora.clients.data import TokenizedExample
from plora.clients.device_model import DeviceModel
from plora.clients.generation import encode_prompt, generate_batch
from plora.storage.errors import ConfigError

# Generic requests of many kinds; none asks about the user, whose answers are what
# personalization is meant to change.
REQUESTS = (
    "A baker makes 24 muffins and sells 3 boxes of 6. How many muffins are left?",
    "Tom has 5 apples and buys 3 times as many. How many apples does he have now?",
    "A train travels 120 km in 2 hours. What is its average speed?",
    "What is 15% of 80? Show your working.",
    "Explain why the sky is blue.",
    "How does a refrigerator keep food cold?",
    "What causes the seasons on Earth?",
    "Give three tips for writing a clear email.",
    "Write a short poem about the sea.",
    "Summarise the story of Cinderella in two sentences.",
    "What is the difference between weather and climate?",
    "How do I boil an egg?",
    "Write a Python function that returns the largest number in a list.",
    "What are the main causes of the French Revolution?",
    "Suggest a name for a new coffee shop and explain the choice.",
    "Why do cats purr?",
)
OPENINGS = (
    "The history of the printing press begins",
    "To solve the equation 3x + 7 = 22, we first",
    "Photosynthesis is the process by which",
    "Sarah had 12 pencils. She gave 4 to her friend and",
    "The city council met on Tuesday to discuss",
    "In mathematics, a prime number is",
    "The recipe calls for two cups of flour,",
    "When the first settlers arrived in the valley,",
)


@dataclass(frozen=True)
class AnchorSettings:
    """How personalization stays close to the base model on generic text."""

    weight: float = 3.0
    """Weight of KL(base || personalized) on the anchor, added to the task loss. On persona 0
    (60 steps, lr 1e-2, 12 to 16 anchor texts), recall / generic NLL change: weight 1 75% / +14%,
    3 88% / +9.5%; 10 and 30 held the task back (50%, 0%) and still let generic text drift."""
    rows: int = 2
    """Anchor sequences mixed into every training batch."""
    texts: int = 24
    """Anchor sequences written before training, at most len(REQUESTS) + len(OPENINGS). All 24
    kept generic text closer than 12 did: a narrow anchor is itself overfitted."""
    new_tokens: int = 32
    """Tokens the base model writes per anchor sequence."""
    top_k: int = 32
    """Base-model tokens kept per position; the rest of the vocabulary is merged into one."""

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ConfigError(f"anchor weight must be > 0, got {self.weight}; turn the anchor off with anchor=None")
        if not 1 <= self.texts <= len(REQUESTS) + len(OPENINGS):
            raise ConfigError(f"anchor texts must be between 1 and {len(REQUESTS) + len(OPENINGS)}, got {self.texts}")
        if min(self.rows, self.new_tokens, self.top_k) < 1:
            raise ConfigError(
                f"anchor rows, new_tokens and top_k must be >= 1, got {self.rows}, {self.new_tokens}, {self.top_k}"
            )


@contextmanager
def base_model(model: DeviceModel) -> Iterator[DeviceModel]:
    """The model with every M zeroed, i.e. the base model; the M it held is put back after."""
    params = list(model.weights.parameters())
    held = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.zero_()
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, kept in zip(params, held):
                p.copy_(kept)


def text_key(settings: AnchorSettings, seed: int) -> str:
    """Equal for arguments that give the same anchor text on the same backbone."""
    # "batch": the texts are sampled as one batch (generate_batch), which rounds differently.
    written_as = (REQUESTS, OPENINGS, settings.texts, settings.new_tokens, seed, "batch")
    return hashlib.sha256(repr(written_as).encode()).hexdigest()


def write_anchor(model: DeviceModel, tokenizer: Any, settings: AnchorSettings, seed: int) -> list[TokenizedExample]:
    """The base model's own text on `settings.texts` built-in prompts; the same seed, the same text.

    Every token is labelled, prompt included: the base model's prediction of the prompt is
    generic behaviour worth keeping too, and those positions go through the model anyway."""
    prompts = [(p, True) for p in REQUESTS] + [(p, False) for p in OPENINGS]
    rng = random.Random(seed)
    chosen = rng.sample(prompts, settings.texts)
    seeds = [rng.randrange(2**31) for _ in chosen]
    encoded = [encode_prompt(tokenizer, prompt, chat=chat) for prompt, chat in chosen]
    with base_model(model):
        written = generate_batch(model, encoded, settings.new_tokens, {tokenizer.eos_token_id}, temperature=1.0, seeds=seeds)
    return [TokenizedExample(ids + new, ids + new) for ids, new in zip(encoded, written)]
