"""`plora bench quality`: what personalization buys, on the embedded backbone.

- personas: held-out recall of private facts before and after, and the loss on generic text
  (GSM8K answers) before and after, which must not get more than 5% worse; with the default
  settings of a job (anchored to the base model, on anchor text the device writes itself) and,
  for comparison, without the anchor;
- speakers: per-speaker held-out NLL gain of PrivateLoRA against PEFT LoRA on the monolithic
  model, with the same data and the same number of steps.

Both read real data from a folder (the repository's tests use ../shared/data); the product
ships none.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import datasets
import torch

from plora.clients.anchor import anchor_of, write_anchor
from plora.clients.data import DEVICE_JOB_MAX_LENGTH, tokenize
from plora.clients.training import CONSTANT, TrainSettings, causal_lm_batch_loss, evaluate, personalize, train
from plora.cloud_backbone import loading
from plora.cloud_backbone.privatelora import TARGET_MODULES, PrivateLoRAConfig
from plora.platform.jobs import ANCHOR_SEED
from plora.platform.fleet.partition import holdout, partition, play_blocks
from plora.platform.fleet.personas import PERSONA_JOB, make_persona, persona_recall
from plora.platform.runtime import split_embedded


def personas(data: Path, count: int, echo: Callable[[str], None], compare: bool = True) -> list[dict]:
    """Recall and generic-text loss before and after, one fresh device per persona; with
    `compare`, also after the same job without the anchor, from M = 0 again."""
    generic_rows = [json.loads(line) for line in (data / "gsm8k" / "dev.jsonl").read_text().splitlines()[:64]]
    rows = []
    for seed in range(count):
        backbone = loading.load("embedded")
        tok = backbone.tokenizer
        model = split_embedded(backbone, PrivateLoRAConfig())
        persona = make_persona(seed)
        train = tokenize(datasets.Dataset.from_list(persona.train_records()), tok, DEVICE_JOB_MAX_LENGTH)
        generic = tokenize(datasets.Dataset.from_list([{"text": r["answer"]} for r in generic_rows]), tok, 256)
        before = _measure(model, tok, persona, generic)
        # As a job does it: the anchor is written on the device, by the base model.
        anchor = anchor_of(model, write_anchor(model, tok, PERSONA_JOB.anchor, ANCHOR_SEED), tok.pad_token_id,
                           PERSONA_JOB.anchor.top_k)
        result = personalize(model, train, tok.pad_token_id, PERSONA_JOB, anchor=anchor)
        row = {"persona": seed, "before": before, **_after(_measure(model, tok, persona, generic), before),
               "train_seconds": result.seconds}
        echo(f"persona {seed}: recall {before['recall']:.0%} -> {row['after']['recall']:.0%}, generic NLL "
             f"{before['generic_nll']:.3f} -> {row['after']['generic_nll']:.3f} ({row['generic_nll_change']:+.1%})")
        if compare:
            with torch.no_grad():
                for m in model.weights.parameters():
                    m.zero_()
            personalize(model, train, tok.pad_token_id, replace(PERSONA_JOB, anchor=None))
            row["without_anchor"] = _after(_measure(model, tok, persona, generic), before)
            echo(f"persona {seed} without the anchor: recall {row['without_anchor']['after']['recall']:.0%}, "
                 f"generic NLL change {row['without_anchor']['generic_nll_change']:+.1%}")
        rows.append(row)
    return rows


def _measure(model, tok, persona, generic) -> dict:
    return {"recall": persona_recall(model, tok, persona), "generic_nll": evaluate(model, generic, tok.pad_token_id)}


def _after(after: dict, before: dict) -> dict:
    return {"after": after, "generic_nll_change": after["generic_nll"] / before["generic_nll"] - 1}


def _lora_nll_gain(backbone, examples, heldout, pad: int, settings: TrainSettings) -> tuple[float, float, int]:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(backbone.model, LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"]))

    def logits(ids):
        return model(input_ids=ids).logits

    before = evaluate(logits, heldout, pad)
    params = [p for p in model.parameters() if p.requires_grad]
    # LoRA's usual rate, constant, with torch's default weight decay, as the README's figures were measured.
    train(model, params, causal_lm_batch_loss(logits, pad), examples, replace(settings, lr=1e-3, weight_decay=0.01),
          schedule=CONSTANT)
    return before, evaluate(logits, heldout, pad), sum(p.numel() for p in params)


# Within 5% of PEFT LoRA's (r=16, q/k/v) trainable parameters: 54k M entries against 1.29M.
SPEAKER_CONFIG = PrivateLoRAConfig(rank=16, targets=tuple(TARGET_MODULES))


def speakers(data: Path, count: int, echo: Callable[[str], None], steps: int | None = None) -> list[dict]:
    """Per-speaker held-out NLL gain: PrivateLoRA (r=16, all projections) against PEFT LoRA (r=16, q/k/v)."""
    blocks = play_blocks(data / "tinyshakespeare" / "input.txt")
    # Skip the very largest speakers: a user has a modest amount of data.
    chosen = partition(blocks, "natural", count + 4, partition_by="speaker")[4:]
    rows = []
    for part in chosen:
        speaker = part["speaker"][0]
        train_rows, held_rows = holdout(part, 0.2)
        base = loading.load("embedded")
        tok = base.tokenizer
        train = tokenize(train_rows.select_columns(["text"]), tok, 256)
        heldout = tokenize(held_rows.select_columns(["text"]), tok, 256)
        # About one epoch; no anchor on either side, so the two adapters compare as they are.
        settings = TrainSettings(lr=2e-2, batch_size=4, steps=steps or max(1, len(train) // 4), anchor=None)
        model = split_embedded(base, SPEAKER_CONFIG)
        p_before = evaluate(model, heldout, tok.pad_token_id)
        personalize(model, train, tok.pad_token_id, settings)
        p_after = evaluate(model, heldout, tok.pad_token_id)
        p_params = sum(p.numel() for p in model.weights.parameters())
        l_before, l_after, l_params = _lora_nll_gain(loading.load("embedded"), train, heldout, tok.pad_token_id, settings)
        row = {
            "speaker": speaker, "train_blocks": len(train), "steps": settings.steps,
            "privatelora": {"before": p_before, "after": p_after, "gain": p_before - p_after, "params": p_params},
            "lora": {"before": l_before, "after": l_after, "gain": l_before - l_after, "params": l_params},
        }
        row["gain_ratio"] = row["privatelora"]["gain"] / row["lora"]["gain"] if row["lora"]["gain"] > 0 else float("nan")
        row["param_ratio"] = p_params / l_params
        rows.append(row)
        echo(f"{speaker}: PrivateLoRA gain {row['privatelora']['gain']:.3f} vs LoRA {row['lora']['gain']:.3f} "
             f"({row['gain_ratio']:.0%}), parameters {row['param_ratio']:.0%} of LoRA's")
    return rows
