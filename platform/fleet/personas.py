"""Synthetic personas: the product's own default private data, deterministic by seed.

Each persona has a handful of private facts. Every fact comes as question/answer pairs:
three paraphrases of the question to train on and one held-out paraphrase to test recall,
so recall measures whether the fact was learned rather than the wording memorised.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from plora.clients.generation import encode_prompt, generate_batch
from plora.clients.training import TrainSettings

# A persona job as it should run: anchored (the default), 90 steps at lr 5e-3. Measured with
# `plora bench quality` on personas 0 and 1: recall 100% and 100%, generic NLL -1.2% and +1.8%.
# At lr 7e-3 and 60 steps: 88% and 100%, +2.5% and +5.7%; at lr 1e-2 and 60 steps: 100% on
# persona 0, but +7.5%. The privacy audit trains its personas with it.
PERSONA_JOB = TrainSettings(lr=5e-3, steps=90, batch_size=4)

# kind: (question paraphrases, answer template, values). Values are unusual on purpose,
# so that a base model cannot guess them.
_FACTS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "name": (
        ("What is my name?", "What am I called?", "Do you remember my name?", "Can you tell me my name?"),
        "Your name is {}.",
        ("Zorvan", "Ottilie", "Bramwell", "Isolde", "Tiberius", "Wren", "Leopold", "Marisol", "Caspian", "Elowen"),
    ),
    "city": (
        ("Where do I live?", "Which city do I live in?", "What city is my home?", "In which town is my home?"),
        "You live in {}.",
        ("Tartu", "Hobart", "Cusco", "Bergen", "Valparaiso", "Ljubljana", "Galway", "Tromso", "Lucerne", "Nagpur"),
    ),
    "pet": (
        ("What is my pet's name?", "What do I call my pet?", "What's the name of my pet?", "How is my pet called?"),
        "Your pet is called {}.",
        ("Biscuit", "Pebble", "Waffles", "Juniper", "Noodle", "Marmalade", "Pickles", "Quill", "Sprocket", "Tofu"),
    ),
    "job": (
        ("What do I do for a living?", "What is my job?", "What is my profession?", "What work do I do?"),
        "You work as a {}.",
        ("glassblower", "beekeeper", "cartographer", "locksmith", "luthier", "falconer", "cooper", "taxidermist"),
    ),
    "colour": (
        ("What is my favourite colour?", "Which colour do I like best?", "What colour do I prefer?", "What's my favorite color?"),
        "Your favourite colour is {}.",
        ("teal", "maroon", "ochre", "lavender", "chartreuse", "vermilion", "indigo", "saffron"),
    ),
    "food": (
        ("What is my favourite food?", "What do I like to eat most?", "Which dish do I love most?", "What's my favorite meal?"),
        "Your favourite food is {}.",
        ("pierogi", "paella", "falafel", "goulash", "ceviche", "moussaka", "bibimbap", "tagine"),
    ),
    "hobby": (
        ("What is my hobby?", "What do I do in my free time?", "What is my favourite pastime?", "How do I spend my weekends?"),
        "Your hobby is {}.",
        ("birdwatching", "origami", "fencing", "kayaking", "calligraphy", "beekeeping", "archery", "juggling"),
    ),
    "sibling": (
        ("What is my sister's name?", "What is my sister called?", "Who is my sister?", "What's the name of my sister?"),
        "Your sister is called {}.",
        ("Philippa", "Rosalind", "Henrietta", "Seraphina", "Clementine", "Winifred", "Araminta", "Georgiana"),
    ),
}


@dataclass(frozen=True)
class Fact:
    kind: str
    train_questions: tuple[str, ...]
    heldout_question: str
    answer: str
    keyword: str  # recall counts when the reply contains this word


@dataclass(frozen=True)
class Persona:
    seed: int
    facts: tuple[Fact, ...]

    def train_records(self) -> list[dict[str, str]]:
        return [{"prompt": q, "response": f.answer} for f in self.facts for q in f.train_questions]

    def heldout_records(self) -> list[dict[str, str]]:
        return [{"prompt": f.heldout_question, "response": f.answer} for f in self.facts]


def make_persona(seed: int, num_facts: int = len(_FACTS)) -> Persona:
    """The same seed always gives the same persona; different seeds differ in their values."""
    rng = random.Random(seed)
    kinds = rng.sample(sorted(_FACTS), k=min(num_facts, len(_FACTS)))
    facts = []
    for kind in kinds:
        questions, template, values = _FACTS[kind]
        value = rng.choice(values)
        order = rng.sample(questions, k=len(questions))
        facts.append(Fact(kind, tuple(order[:-1]), order[-1], template.format(value), value))
    return Persona(seed, tuple(facts))


def recalled(reply: str, fact: Fact) -> bool:
    return fact.keyword.lower() in reply.lower()


def persona_recall(model, tokenizer, persona: Persona, max_new_tokens: int = 24) -> float:
    """Share of the persona's facts stated in greedy replies to their held-out questions."""
    return 1 - len(facts_missed(model, tokenizer, persona, max_new_tokens)) / len(persona.facts)


def facts_missed(model, tokenizer, persona: Persona, max_new_tokens: int = 24) -> list[str]:
    """The kinds of the persona's facts that greedy replies to their held-out questions do not state."""
    prompts = [encode_prompt(tokenizer, fact.heldout_question) for fact in persona.facts]
    replies = generate_batch(model, prompts, max_new_tokens, {tokenizer.eos_token_id})
    return [fact.kind for reply, fact in zip(replies, persona.facts)
            if not recalled(tokenizer.decode(reply, skip_special_tokens=True), fact)]
