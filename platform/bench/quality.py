"""`plora bench quality`: what personalization buys, on the embedded backbone.

- personas: held-out recall of private facts before and after plora's default job, run as a user
  runs it, and the loss on generic text (GSM8K answers) before and after, which must not get
  more than 5% worse; for comparison, also after the same job without the anchor;
- speakers: per-speaker held-out NLL gain of plora's default job, run as a user runs it, against
  PEFT LoRA on the monolithic model under the same protocol (see `speakers`).

Both read real data from a folder (the repository's tests use ../shared/data); the product
ships none. Every device's base model writes the same anchor and probe text, one sample of what
it could write, and the figures move with the sample, so each plora job may run once per sample
(`anchor_seeds`), and `spread` gives each sample's means and worst, and theirs over all.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import datasets
import torch

from plora.clients.anchor import AnchorSettings
from plora.clients.data import PERSONALIZE_MAX_LENGTH, load_examples, tokenize
from plora.clients.search import LrSearch, personalization_settings, search_rates
from plora.clients.training import TrainResult, TrainSettings, causal_lm_batch_loss, evaluate, result_of, train
from plora.cloud_backbone import loading
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.platform.fleet.partition import holdout, play_blocks
from plora.platform.fleet.personas import facts_missed, make_persona
from plora.platform.jobs import JobOutcome, run_personalization, split_holdout
from plora.platform.runtime import init_device, open_device
from plora.storage.db import open_database
from plora.storage.errors import DataError
from plora.storage.registry import Registry


DEFAULT_BUDGET = AnchorSettings.drift_budget


def job_settings(text_seed: int = AnchorSettings.text_seed, drift_budget: float | None = DEFAULT_BUDGET) -> TrainSettings:
    """`plora personalize`'s default job (TrainSettings()) but for the sample of anchor and probe
    text its device's base model writes, and its drift budget (None: the anchor's weight stays fixed)."""
    return TrainSettings(anchor=AnchorSettings(drift_budget=drift_budget, text_seed=text_seed))


def personas(data: Path, count: int, echo: Callable[[str], None], compare: bool = True,
             config: PrivateLoRAConfig | None = None, backbone: str = "embedded", anchor_seeds: Sequence[int] = (0,),
             drift_budget: float | None = DEFAULT_BUDGET) -> list[dict]:
    """Per persona and anchor text seed, on a fresh device: held-out recall of its private facts
    and generic-text (GSM8K answers) NLL, before and after `plora personalize`'s default job on its
    notes, run as a user runs it (the notes in a file outside the device folder, the rate searched
    on the device, the anchor on; `job_settings`); with `compare`, also after the same job without
    the anchor, on another fresh device, once per persona."""
    generic_rows = [{"text": json.loads(line)["answer"]} for line in (data / "gsm8k" / "dev.jsonl").read_text().splitlines()[:64]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="plora-bench-personas-") as scratch:
        reg = Registry(open_database(f"sqlite:///{scratch}/registry.sqlite"))
        for seed in range(count):
            persona = make_persona(seed)
            notes = Path(scratch) / f"persona-{seed}.jsonl"
            notes.write_text("".join(json.dumps(row) + "\n" for row in persona.train_records()))

            def measure(device, persona=persona) -> dict:
                generic = tokenize(datasets.Dataset.from_list(generic_rows), device.tokenizer, PERSONALIZE_MAX_LENGTH)
                missed = facts_missed(device.model, device.tokenizer, persona)
                return {"recall": 1 - len(missed) / len(persona.facts), "missed": missed,
                        "generic_nll": evaluate(device.model, generic, device.tokenizer.pad_token_id)}

            for text_seed in anchor_seeds:
                before, after, outcome = _job_on_a_new_device(Path(scratch) / f"device-{seed}-{text_seed}", notes, backbone,
                                                              config, reg, measure, job_settings(text_seed, drift_budget))
                row = {"persona": seed, "anchor_seed": text_seed, "before": before, **_after(after, before),
                       "device_drift": outcome.generic_drift, "anchor_weight": outcome.result.anchor_weight, "lr": outcome.lr,
                       "steps": outcome.result.steps, "kept_step": outcome.result.best_step,
                       "train_seconds": outcome.result.seconds, "chosen_by": _chosen_by(outcome)}
                missed = f" (missed: {', '.join(after['missed'])})" if after["missed"] else ""
                echo(f"persona {seed}, anchor text {text_seed}: recall {before['recall']:.0%} -> {after['recall']:.0%}{missed}, "
                     f"generic NLL {before['generic_nll']:.3f} -> {after['generic_nll']:.3f} "
                     f"({row['generic_nll_change']:+.1%}; on its probe, the device measured {outcome.generic_drift:+.1%}, "
                     f"anchor weight {outcome.result.anchor_weight or 0:.3g} at the end); "
                     f"{outcome.result.steps} steps at lr {outcome.lr}, the M of step {outcome.result.best_step} kept")
                rows.append(row)
            if compare:
                _, unanchored, _ = _job_on_a_new_device(Path(scratch) / f"device-{seed}-unanchored", notes, backbone, config,
                                                         reg, measure, replace(TrainSettings(), anchor=None))
                rows[-1]["without_anchor"] = _after(unanchored, before)
                echo(f"persona {seed} without the anchor: recall {unanchored['recall']:.0%}, "
                     f"generic NLL change {rows[-1]['without_anchor']['generic_nll_change']:+.1%}")
    return rows


def _job_on_a_new_device(folder: Path, notes: Path, backbone: str, config: PrivateLoRAConfig | None, reg: Registry,
                         measure: Callable, settings: TrainSettings) -> tuple[dict, dict, JobOutcome]:
    """`measure(device)` on a new device, before and after a personalization job on `notes` with
    `settings`, the rate searched as the default job searches it."""
    init_device(folder, backbone, config)
    device = open_device(folder)
    try:
        before = measure(device)
        outcome = run_personalization(device, notes, settings, reg=reg, keep_text=False, search=LrSearch())
        return before, measure(device), outcome
    finally:
        device.close()


def _after(after: dict, before: dict) -> dict:
    return {"after": after, "generic_nll_change": after["generic_nll"] / before["generic_nll"] - 1}


# PEFT LoRA's own rates, about 3x apart around its usual 1e-3, tried as plora's job tries its own.
LORA_SEARCH = LrSearch(candidates=(3e-4, 1e-3, 3e-3))
LORA = {"r": 16, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj"]}
MIN_BLOCKS = 15  # a speaker with fewer gives too small a validation and held-out split to compare on


def speakers(data: Path, count: int, echo: Callable[[str], None], backbone: str = "embedded",
             config: PrivateLoRAConfig | None = None, compare: bool = True, max_blocks: int | None = None,
             names: list[str] | None = None, anchor_seeds: Sequence[int] = (0,),
             drift_budget: float | None = DEFAULT_BUDGET) -> list[dict]:
    """Per speaker, `count` speakers spread over the sizes of the play's (from MIN_BLOCKS up):
    held-out NLL before and after plora's default job, run as the README tells a user to
    (`plora personalize DIR --data FILE` on a new device: the rate searched on the device, the
    anchor on), against PEFT LoRA (r=16 on q/k/v of the monolithic model) under the same
    protocol: the same file, the same validation split (10%, at least 2), a search over its own rates with the
    same trials, the same early stopping and budget, the same rule for the M kept. A fifth of each
    speaker's blocks is held out, outside the device, and never used for any choice. Generic
    text (GSM8K answers) says what each costs the model's general ability.

    One row per speaker and anchor text seed (`job_settings`); LoRA, which has no anchor, runs
    once per speaker. `config` binds the devices to another adapter configuration; without
    `compare`, LoRA is left out; `max_blocks` leaves the larger speakers out of the pick; `names`
    picks these speakers instead (`count` is then ignored)."""
    blocks = play_blocks(data / "tinyshakespeare" / "input.txt")
    generic_rows = [{"text": json.loads(line)["answer"]} for line in (data / "gsm8k" / "dev.jsonl").read_text().splitlines()[:64]]
    sizes = Counter(blocks["speaker"])
    picks = named_speakers(sizes, names) if names else pick_speakers(sizes, count, max_blocks=max_blocks)
    rows = []
    with tempfile.TemporaryDirectory(prefix="plora-bench-quality-") as scratch:
        reg = Registry(open_database(f"sqlite:///{scratch}/registry.sqlite"))
        for speaker in picks:
            mine = blocks.filter(lambda row, speaker=speaker: row["speaker"] == speaker).select_columns(["text"])
            train_rows, held_rows = holdout(mine, 0.2)
            notes = Path(scratch) / f"{speaker}.jsonl"  # the user's file, outside any device folder
            notes.write_text("".join(json.dumps(row) + "\n" for row in train_rows))
            mine_rows = []
            for text_seed in anchor_seeds:
                plora = _plora_default_job(Path(scratch) / f"device-{speaker}-{text_seed}", notes, held_rows, generic_rows,
                                           backbone, reg, config, job_settings(text_seed, drift_budget))
                mine_rows.append({"speaker": speaker, "anchor_seed": text_seed, "train_blocks": len(train_rows),
                                  "heldout_blocks": len(held_rows), "privatelora": plora})
                echo(f"{speaker} ({len(train_rows)} blocks), anchor text {text_seed}: plora gain {plora['gain']:.3f} nats "
                     f"(lr {plora['lr']}), generic NLL {plora['generic_change']:+.1%} (on its probe "
                     f"{plora['device_drift']:+.1%}, anchor weight {plora['anchor_weight'] or 0:.3g} at the end)")
            if compare:
                lora = _lora_same_protocol(notes, held_rows, generic_rows, backbone)
                echo(f"{speaker}: LoRA gain {lora['gain']:.3f} nats (lr {lora['lr']}), generic NLL {lora['generic_change']:+.1%}")
                for row in mine_rows:
                    plora = row["privatelora"]
                    row.update(lora=lora, gain_ratio=plora["gain"] / lora["gain"] if lora["gain"] > 0 else float("nan"),
                               param_ratio=plora["params"] / lora["params"])
            rows += mine_rows
    return rows


GENERIC_LIMIT = 0.02  # the target: generic text no more than 2% worse than the base model's


def spread(personas_rows: list[dict], speaker_rows: list[dict]) -> list[dict]:
    """Per anchor text seed, then over all of them: persona recall (mean, lowest) and the worst
    generic-text change; the speakers' gain ÷ LoRA's (mean, lowest) and how many kept generic
    text within GENERIC_LIMIT. One anchor sample is not a measurement of the default job."""
    seeds = list(dict.fromkeys(row["anchor_seed"] for row in personas_rows + speaker_rows))

    def figures(label, personas_of: list[dict], speakers_of: list[dict]) -> dict:
        recall = [row["after"]["recall"] for row in personas_of]
        ratios = [row["gain_ratio"] for row in speakers_of if "gain_ratio" in row]
        generic = [row["privatelora"]["generic_change"] for row in speakers_of]
        return {"anchor_seed": label, "personas": len(recall),
                "recall_mean": sum(recall) / len(recall) if recall else None, "recall_lowest": min(recall, default=None),
                "persona_generic_worst": max((row["generic_nll_change"] for row in personas_of), default=None),
                "speakers": len(speakers_of), "gain_ratio_mean": sum(ratios) / len(ratios) if ratios else None,
                "gain_ratio_lowest": min(ratios, default=None),
                "speakers_within_limit": sum(change <= GENERIC_LIMIT for change in generic) if generic else None}

    rows = [figures(seed, [r for r in personas_rows if r["anchor_seed"] == seed],
                    [r for r in speaker_rows if r["anchor_seed"] == seed]) for seed in seeds]
    if len(seeds) > 1:
        rows.append(figures("all", personas_rows, speaker_rows))
    return rows


def pick_speakers(sizes: dict[str, int], count: int, min_blocks: int = MIN_BLOCKS, max_blocks: int | None = None) -> list[str]:
    """`count` speakers spread evenly, by rank, over the sizes (blocks) of those with at least
    `min_blocks` (and at most `max_blocks`), smallest first: the smallest and the largest always
    among them."""
    eligible = [name for n, name in sorted((n, name) for name, n in sizes.items()
                                           if n >= min_blocks and (max_blocks is None or n <= max_blocks))]
    if len(eligible) < count:
        within = f"between {min_blocks} and {max_blocks}" if max_blocks is not None else f"at least {min_blocks}"
        raise DataError(f"the play has {len(eligible)} speakers with {within} blocks; {count} were asked for")
    if count == 1:
        return eligible[:1]
    return [eligible[round(i * (len(eligible) - 1) / (count - 1))] for i in range(count)]


def named_speakers(sizes: dict[str, int], names: list[str], min_blocks: int = MIN_BLOCKS) -> list[str]:
    """`names`, once each, if the play has each with at least `min_blocks` blocks."""
    unfit = [f"{name} ({sizes.get(name, 0)} blocks)" for name in names if sizes.get(name, 0) < min_blocks]
    if unfit:
        raise DataError(f"speakers need at least {min_blocks} blocks in the play: {', '.join(unfit)}")
    return list(dict.fromkeys(names))


def _plora_default_job(folder: Path, notes: Path, held_rows, generic_rows: list[dict], backbone: str, reg: Registry,
                       config: PrivateLoRAConfig | None, settings: TrainSettings) -> dict:
    def measure(device) -> dict:
        pad, tok = device.tokenizer.pad_token_id, device.tokenizer
        generic = tokenize(datasets.Dataset.from_list(generic_rows), tok, PERSONALIZE_MAX_LENGTH)
        return {"heldout": evaluate(device.model, tokenize(held_rows, tok, PERSONALIZE_MAX_LENGTH), pad),
                "generic": evaluate(device.model, generic, pad),
                "params": sum(m.numel() for m in device.model.weights.parameters())}

    before, after, outcome = _job_on_a_new_device(folder, notes, backbone, config, reg, measure, settings)
    figures = _figures(before, after, after["params"], outcome.lr, outcome.result, outcome.selection)
    # The job's own measure of generic_change, and the weight its drift budget left the anchor at.
    return {**figures, "device_drift": outcome.generic_drift, "anchor_weight": outcome.result.anchor_weight,
            "chosen_by": _chosen_by(outcome)}


def _chosen_by(outcome: JobOutcome) -> dict | None:
    """What the job's search or cross-validation scored on the device, as its record says."""
    return outcome.search.as_metrics() if outcome.search else None


def _lora_same_protocol(notes: Path, held_rows, generic_rows: list[dict], backbone: str) -> dict:
    from peft import LoraConfig, get_peft_model

    base = loading.load(backbone)
    tok, pad = base.tokenizer, base.tokenizer.pad_token_id
    settings = TrainSettings(anchor=None)  # the job's defaults; LoRA has no anchor to keep it near the base
    # PEFT draws LoRA's A at random: unseeded, the same speaker's gain differed by 16% between runs.
    torch.manual_seed(settings.seed)
    model = get_peft_model(base.model, LoraConfig(**LORA))

    def logits(ids):
        return model(input_ids=ids).logits

    heldout = tokenize(held_rows, tok, PERSONALIZE_MAX_LENGTH)
    generic = tokenize(datasets.Dataset.from_list(generic_rows), tok, PERSONALIZE_MAX_LENGTH)
    before = {"heldout": evaluate(logits, heldout, pad), "generic": evaluate(logits, generic, pad)}
    train_set, val = split_holdout(tokenize(load_examples(notes), tok, PERSONALIZE_MAX_LENGTH), 0.1, settings.seed)  # the job's split
    params = [p for p in model.parameters() if p.requires_grad]
    batch_loss, validate = causal_lm_batch_loss(logits, pad), (lambda: evaluate(logits, val, pad))
    start = validate()

    def run(run_settings: TrainSettings, on_step=None) -> TrainResult:
        return result_of(train(model, params, batch_loss, train_set, run_settings, validate=validate, val_before=start,
                               on_step=on_step), validated=True)

    found = search_rates(params, run, settings.total_steps(len(train_set)), settings, LORA_SEARCH, start)
    result = run(personalization_settings(settings, LORA_SEARCH, found.chosen)) if found.chosen else None
    after = {"heldout": evaluate(logits, heldout, pad), "generic": evaluate(logits, generic, pad)}
    return _figures(before, after, sum(p.numel() for p in params), found.chosen, result,
                    "searched" if result else "kept the start: no rate beat it")


def _figures(before: dict, after: dict, params: int, lr: float | None, result: TrainResult | None, selection: str) -> dict:
    return {"before": before["heldout"], "after": after["heldout"], "gain": before["heldout"] - after["heldout"],
            "generic_before": before["generic"], "generic_after": after["generic"],
            "generic_change": after["generic"] / before["generic"] - 1, "params": params, "lr": lr,
            "steps": result.steps if result else 0, "kept_step": result.best_step if result else 0,
            "seconds": result.seconds if result else 0.0, "selection": selection}

