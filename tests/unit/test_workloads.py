"""The fixed decode workloads of `plora bench wan`."""

from __future__ import annotations

from plora.clients.generation import encode_prompt
from plora.platform.bench.workloads import WORKLOADS, persona_notes
from plora.platform.fleet.personas import make_persona


def test_the_grounded_workload_is_twenty_long_prompts_over_each_personas_own_notes(smol_tokenizer):
    prompts = WORKLOADS["grounded"]()
    assert len(prompts) >= 20 and len(set(prompts)) == len(prompts)
    assert min(len(encode_prompt(smol_tokenizer, p)) for p in prompts) >= 100
    for seed in range(2):
        notes = persona_notes(seed)
        assert all(fact.keyword in notes for fact in make_persona(seed).facts)
    assert WORKLOADS["grounded"]() == prompts  # fixed: the same prompts every run


def test_the_open_workload_is_fixed_chat_prompts():
    prompts = WORKLOADS["open"]()
    assert len(prompts) >= 10 and prompts == WORKLOADS["open"]() and all(p.endswith(("?", ".")) for p in prompts)


def test_recall_names_the_facts_a_greedy_reply_to_their_held_out_question_leaves_out(smol_tokenizer, monkeypatch):
    from plora.platform.fleet import personas

    persona = make_persona(0)
    asked = []

    def replies(model, prompts, max_new_tokens, stop_ids):
        asked.extend(prompts)  # the last fact's reply leaves its value out; the others state it, in any case
        return [smol_tokenizer.encode(f"Surely {fact.keyword.upper()}!" if i < len(prompts) - 1 else "I don't know.")
                for i, fact in enumerate(persona.facts)]

    monkeypatch.setattr(personas, "generate_batch", replies)
    assert personas.facts_missed(None, smol_tokenizer, persona) == [persona.facts[-1].kind]
    assert asked == [encode_prompt(smol_tokenizer, fact.heldout_question) for fact in persona.facts]
    assert personas.persona_recall(None, smol_tokenizer, persona) == 1 - 1 / len(persona.facts)
