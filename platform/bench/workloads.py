"""The two fixed decode workloads the benches measure drafting on (`plora bench wan`).

grounded: rewriting, summarising and editing a user's own notes, the work a personal model
does most and where the answer quotes the prompt, so that copying from it (prompt lookup)
guesses right. The notes are the synthetic personas' facts, written as a person would keep
them; each prompt is over 100 tokens of the embedded backbone (a test checks it).
open: chat prompts whose answers owe the prompt nothing, the case drafting cannot help.
"""

from __future__ import annotations

import time

from plora.clients.generation import PromptLookup, encode_prompt, stream_tokens
from plora.cloud_backbone.protocol.messages import ForwardRequest
from plora.platform.fleet.personas import make_persona

# kind: a first-person sentence, around the fact's value.
_NOTE_SENTENCES = {
    "name": "My name is {}, and I keep these notes so that I do not forget the small things.",
    "city": "I live in {}, where the winters are long and the coffee is good.",
    "pet": "My pet is called {}, and it sleeps on the windowsill most afternoons.",
    "job": "I work as a {}, which keeps me busy from early in the morning.",
    "colour": "My favourite colour is {}, so half of my clothes are that shade.",
    "food": "My favourite food is {}, and I cook it every Friday evening.",
    "hobby": "My hobby is {}, which I do on most weekends when the weather allows.",
    "sibling": "My sister is called {}, and she visits me once a month.",
}
_TASKS = (
    "Rewrite these notes of mine in the third person, keeping every detail:",
    "Copy these notes of mine exactly, but fix any spelling mistakes:",
    "Turn these notes of mine into a bulleted list, one sentence per bullet:",
    "Summarise these notes of mine, keeping the names and places:",
    "Edit these notes of mine so that every sentence starts with 'Today':",
)
PERSONAS = 4
OPEN = (
    "Write a short poem about the sea at night.",
    "What are three simple ways to sleep better?",
    "Explain how a rainbow forms, in a few sentences.",
    "Give me an idea for a birthday present for a friend who likes hiking.",
    "Why is the sky blue?",
    "Write a two-line joke about computers.",
    "What should I pack for a weekend trip to the mountains?",
    "Describe a good breakfast in three sentences.",
    "How do I make a cup of tea?",
    "Tell me a fun fact about octopuses.",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery.",
)


def persona_notes(seed: int) -> str:
    """A persona's facts as the notes its user would keep."""
    return " ".join(_NOTE_SENTENCES[fact.kind].format(fact.keyword) for fact in make_persona(seed).facts)


def grounded() -> list[str]:
    """Every task over the notes of each of PERSONAS personas: 20 prompts."""
    return [f"{task}\n\n{persona_notes(seed)}" for seed in range(PERSONAS) for task in _TASKS]


WORKLOADS = {"grounded": grounded, "open": lambda: list(OPEN)}


def decode_workload(device, name: str, count: int, new_tokens: int, draft_tokens: int) -> dict:
    """Greedy replies of an opened device to the first `count` prompts of a workload, drafting
    up to `draft_tokens` ahead by prompt lookup (0: one token per pass). Decode speed leaves
    out each prompt's own pass (its prefill) and the time to the first token: tokens after the
    first ÷ the time after it, and ÷ the passes after it."""
    model, tokenizer = device.model, device.tokenizer
    drafter = PromptLookup(draft_tokens) if draft_tokens else None
    passes = [0]

    def count_passes(direction, message) -> None:
        passes[0] += isinstance(message, ForwardRequest)

    model.link.taps.append(count_passes)
    replies, decoded, seconds, decode_passes = [], 0, 0.0, 0
    try:
        for prompt in WORKLOADS[name]()[:count]:
            passes[0], stamps, reply = 0, [], []
            for token in stream_tokens(model, encode_prompt(tokenizer, prompt), new_tokens, {tokenizer.eos_token_id}, drafter=drafter):
                stamps.append(time.perf_counter())
                reply.append(token)
            replies.append(reply)
            if len(reply) > 1:
                decoded += len(reply) - 1
                seconds += stamps[-1] - stamps[0]
                decode_passes += passes[0] - 1
    finally:
        model.link.taps.remove(count_passes)
    return {"replies": replies, "decode_tok_s": decoded / seconds, "tokens_per_pass": decoded / decode_passes}
