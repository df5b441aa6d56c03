"""`plora demo`: a small fleet personalizes on the embedded backbone, and a report shows what changed.

It starts a backbone service on loopback and launches a fleet of devices with Flower, each
with a synthetic persona (private facts); every device trains its M on its own facts, and
recall is measured on held-out paraphrases of the questions, which no device trained on. The
orchestrator only ever receives scalars. Once the fleet is done, each device, opened from its
own folder through the same service, answers a few of its held-out questions twice, as the
base model (M = 0) and personalized, and scores a few generic texts both ways; the report
(report.md, report.html, results.json in the demo's folder) puts it all side by side.

The demo pins its own settings (DEVICES, STEPS, LR, DRIFT_BUDGET, CONFIG), measured to keep `make demo`
under 10 minutes on 2 cores, install included, whatever the product's defaults become.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from pathlib import Path

import datasets

from plora.clients.anchor import base_model
from plora.clients.data import DEVICE_JOB_MAX_LENGTH, tokenize
from plora.clients.generation import encode_prompt, generate_batch
from plora.clients.training import evaluate
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.protocol.messages import BackboneIdentity
from plora.cloud_backbone.server import start_service
from plora.platform.fleet.launch import Progress, launch, read_rounds
from plora.platform.fleet.personas import Persona, make_persona, recalled
from plora.platform.fleet.report import Answer, DemoReport, DeviceReport, summary_lines, write_report
from plora.platform.fleet.settings import device_dir
from plora.platform.fleet.task import TRAIN_FILE
from plora.platform.runtime import open_device
from plora.storage.errors import ConfigError, PloraError, TransportError
from plora.storage.registry import open_registry

MARKER = ".plora-demo"
# Pinned, not the product's defaults, which may change: `make demo` must stay under 10 minutes
# on 2 cores, install included. Two devices train at once there, one wave of the fleet, and a
# step of both costs about 5.5 s, compute-bound. The install takes 2 to 3 min of the 10. The
# product's default job (a rate search, at least 90 steps, validation) would take longer, so the
# demo pins a rate and fewer steps, and with them the anchor's weight: the drift budget raised it
# to 10 in the demo's short, fast jobs, which then recall too few facts. Measured on 2026-12-05 by
# the demo's own job in one process, recall and GSM8K answers' NLL change for personas 0 and 1:
# 40 steps at 1e-2 under the budget 50% and 62%, +2.6% and +5.6%; at weight 3 88% and 88%, +7.1%
# and +8.9%; 60 steps at 7e-3 under the budget 62% and 75%, -0.1% and +1.0%; at weight 3 100% and
# 100%, +2.0% and +3.6%.
DEVICES = 2
STEPS, LR = 60, 7e-3
DRIFT_BUDGET = 0.0  # the anchor stays at its weight, 3
CONFIG = PrivateLoRAConfig(rank=64, targets=("q", "k", "v"))
QUESTIONS_SHOWN = 3
ANSWER_TOKENS = 24  # what the fleet's recall gives each reply, so a ✓ is what recall counted
# Generic text no device trains on, to see whether personalization cost general ability: a few
# worked answers in the style of GSM8K (which the README's figures use; the product ships no
# data set) and plain explanatory prose.
GENERIC_TEXTS = (
    "Mia buys 4 packs of pens with 6 pens in each pack. She gives 5 pens to her brother. "
    "4 * 6 = 24 pens in all, and 24 - 5 = 19 pens are left. The answer is 19.",
    "A bus carries 38 people. At the first stop 11 get off and 7 get on. 38 - 11 = 27, and 27 + 7 = 34. "
    "There are 34 people on the bus.",
    "Leo earns $12 an hour and works 7 hours on Saturday and 5 hours on Sunday. He works 7 + 5 = 12 hours, "
    "so he earns 12 * 12 = $144 over the weekend.",
    "A garden is 9 metres long and 6 metres wide. Its area is 9 * 6 = 54 square metres, and its perimeter "
    "is 2 * (9 + 6) = 30 metres.",
    "Water boils at a lower temperature high in the mountains because the air pressure there is lower, "
    "so the molecules need less energy to escape as vapour.",
    "The heart pumps blood through two circuits: one carries it to the lungs to pick up oxygen, the other "
    "carries the oxygen-rich blood to the rest of the body.",
    "A library lends books for free. Members borrow a book for three weeks and can renew it online if "
    "nobody else has reserved it.",
    "Bread rises because yeast feeds on the sugars in the dough and releases carbon dioxide, which is "
    "trapped by the stretchy gluten and forms bubbles.",
)


def _prepare(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise ConfigError(f"{out} exists and is not a plora demo folder; choose another --out")
        shutil.rmtree(out)  # a previous demo's output: start fresh
    out.mkdir(parents=True)
    (out / MARKER).touch()


def crossed_per_token(identity: BackboneIdentity) -> str:
    """What a device of this backbone and adapter sends and receives per token of a forward pass, in words."""
    config = identity.adapter
    down = sum(config.width(group, a_side=True) for group in config.groups)
    up = sum(config.width(group, a_side=False) for group in config.groups)
    return (f"the hidden state entering and leaving the cloud's layers ({identity.hidden_size} numbers each way) and, for each "
            f"of its {config.adapted_cloud_layers(identity.num_layers)} adapted layers, {down} numbers u = x·A down and {up} numbers u·M up "
            f"(r = {config.rank} per adapted projection: {', '.join(config.targets)})")


def answer_on_device(folder: Path, address: str | None, persona: Persona,
                     generic_texts: tuple[str, ...] = GENERIC_TEXTS) -> dict:
    """On the device in `folder`: greedy answers to its first QUESTIONS_SHOWN held-out questions
    and the loss on `generic_texts`, as the base model (M = 0) and with its M.

    Returns {"answers", "generic_loss_before", "generic_loss_after", "private_examples",
    "crossed"}. It runs where the device's folder is, as the fleet's own jobs do; none of it
    goes to the orchestrator."""
    device = open_device(folder, address)
    try:
        tokenizer = device.tokenizer
        facts = persona.facts[:QUESTIONS_SHOWN]
        prompts = [encode_prompt(tokenizer, fact.heldout_question) for fact in facts]
        generic = tokenize(datasets.Dataset.from_list([{"text": text} for text in generic_texts]), tokenizer, DEVICE_JOB_MAX_LENGTH)

        def answer_and_score() -> tuple[list[str], float]:
            replies = generate_batch(device.model, prompts, ANSWER_TOKENS, {tokenizer.eos_token_id})
            texts = [tokenizer.decode(r, skip_special_tokens=True).strip() + ("…" if len(r) == ANSWER_TOKENS else "")
                     for r in replies]
            return texts, evaluate(device.model, generic, tokenizer.pad_token_id)

        with base_model(device.model):
            base_texts, generic_before = answer_and_score()
        texts, generic_after = answer_and_score()
        crossed = crossed_per_token(device.store.record.identity)
    finally:
        device.close()
    answers = tuple(Answer(fact.heldout_question, fact.answer, base, mine, recalled(base, fact), recalled(mine, fact))
                    for fact, base, mine in zip(facts, base_texts, texts))
    examples = sum(1 for line in (folder / TRAIN_FILE).read_text().splitlines() if line.strip())
    return {"answers": answers, "generic_loss_before": generic_before, "generic_loss_after": generic_after,
            "private_examples": examples, "crossed": crossed}


def _device_report(out: Path, partition: int, lines: list[dict], address: str, on_progress: Progress | None) -> DeviceReport:
    """The fleet's figures for one device (rounds.jsonl), with what the device answers itself."""
    folder = device_dir(out / "fleet", partition)
    mine = {line["round"]: line for line in lines if line["partition_id"] == partition}
    baseline, trained = mine.get(0, {"evaluate": {}, "errors": {}}), mine.get(1, {"train": {}, "evaluate": {}, "errors": {}})
    errors = {**{f"baseline {step}": kind for step, kind in baseline["errors"].items()}, **trained["errors"]}
    figures = {
        "recall_before": baseline["evaluate"].get("recall"),
        "heldout_loss_before": baseline["evaluate"].get("heldout_loss"),
        "recall_after": trained["evaluate"].get("recall"),
        "heldout_loss_after": trained["evaluate"].get("heldout_loss"),
        "steps": int(trained["train"].get("steps", 0)),
        "train_seconds": trained["train"].get("seconds"),
        "bytes_up": int(trained["train"].get("bytes_up", 0)),
        "bytes_down": int(trained["train"].get("bytes_down", 0)),
    }
    if 1 not in mine:
        errors.setdefault("train", "no-reply")
    if on_progress:
        on_progress(folder.name, "answering as the base model and personalized", None, None, None, None)
    try:
        figures.update(answer_on_device(folder, address, make_persona(seed=partition)))
    except (PloraError, OSError) as err:
        # Its own failure: the other devices' reports stand.
        errors["answers"] = type(err).__name__
        figures.update(private_examples=0, crossed="(unknown: the device could not be opened)")
    error = "; ".join(f"{step}: {kind}" for step, kind in errors.items()) or None
    return DeviceReport(device=folder.name, folder=str(folder.relative_to(out)), error=error, **figures)


def run_demo(out: Path, echo: Callable[[str], None], steps: int | None = None, devices: int = DEVICES,
             on_progress: Progress | None = None) -> DemoReport:
    """Run the demo into folder `out` and write its report there. Lines go to `echo`; the
    fleet's progress, and each device's answering, go to `on_progress` (launch's), or else to `echo`."""
    _prepare(out)
    steps = steps or STEPS
    started = time.monotonic()
    echo(f"A fleet of {devices} devices personalizes on the embedded SmolLM2-135M-Instruct backbone "
         "(backbone service on loopback, devices orchestrated by Flower).")
    # The demo runs the service itself, not launch: once the fleet is done, the devices answer
    # their questions through it.
    service = start_service(["embedded"], CONFIG, open_registry())
    address = f"127.0.0.1:{service.port}"
    try:
        echo(f"backbone service started on {address}")
        launch(devices, 1, backbone=address, root=out / "fleet", steps=steps, lr=LR, drift_budget=DRIFT_BUDGET, echo=echo,
               on_progress=on_progress)
        lines = read_rounds(out / "fleet")
        echo(f"each device answers {QUESTIONS_SHOWN} held-out questions as the base model and personalized")
        # As many devices at once as the fleet trains: the service batches their decode steps.
        with ThreadPoolExecutor(max_workers=min(devices, max(2, os.cpu_count() or 2))) as pool:
            reports = tuple(pool.map(lambda i: _device_report(out, i, lines, address, on_progress), range(devices)))
    finally:
        service.stop(grace_s=1)
    settings = {"devices": devices, "rounds": 1, "steps": steps, "learning rate": LR,
                "anchor": "weight 3, no drift budget" if not DRIFT_BUDGET else f"drift budget {DRIFT_BUDGET:.0%}",
                "adapter": f"r = {CONFIG.rank} on {', '.join(CONFIG.targets)}"}
    report = DemoReport("the embedded SmolLM2-135M-Instruct", settings, time.monotonic() - started, reports)
    markdown, page = write_report(report, out)
    for line in summary_lines(report):
        echo(line)
    echo(f"report: {markdown} and {page}")
    failed = [d.device for d in reports if d.error]
    if failed:
        raise TransportError(f"devices {failed} failed; the report, the log above and `plora jobs list` say why")
    return report
