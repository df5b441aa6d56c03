"""`plora bench migrate`: how much personalization survives a backbone upgrade, per method.

On the embedded backbone, a device personalizes on a synthetic persona against v1, as the
README tells a user to: `plora personalize DIR --data notes.jsonl` with the job's defaults,
the notes in a file outside the device folder. Then, for each kind of upgrade (a derived
decoder fine-tuned on public data; the same weights with fresh public projections), it
measures private-fact recall and loss on held-out paraphrases (kept outside the device, where
no migration sees them) for v1 + M, v2 with no M, v2 + copied M, v2 + distilled M and v2 + M
retrained from scratch on the same notes. Devices are real device folders with a local
backbone, migrated by `migrate_device`, the code `plora migrate` runs; the bench accepts any
retention (min_retention=0) so that it can measure the migrations a device would refuse, and
reports the share of the gain each migration measured itself.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from plora.clients.data import DEVICE_JOB_MAX_LENGTH, load_examples, tokenize
from plora.clients.migration import DistillSettings
from plora.clients.training import evaluate
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.versions import register
from plora.platform.versions.derive import derive
from plora.platform.jobs import run_personalization
from plora.platform.versions.migration import migrate_device
from plora.platform.fleet.personas import make_persona, persona_recall
from plora.platform.runtime import init_device, open_device
from plora.storage.db import open_database
from plora.storage.registry import Registry

KINDS = ("derived", "fresh-seed")


@dataclass
class MigrateBench:
    rows: list[dict]

    def to_json(self) -> dict:
        return {"rows": self.rows}


def _measure(root: Path, persona, heldout: Path) -> dict:
    device = open_device(root)
    try:
        examples = tokenize(load_examples(heldout), device.tokenizer, DEVICE_JOB_MAX_LENGTH)
        return {"recall": persona_recall(device.model, device.tokenizer, persona),
                "heldout_loss": evaluate(device.model, examples, device.tokenizer.pad_token_id)}
    finally:
        device.close()


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _personalize(root: Path, reg: Registry, notes: Path) -> None:
    device = open_device(root)
    try:
        run_personalization(device, notes, None, reg=reg)  # the job's defaults: it chooses its learning rate
    finally:
        device.close()


def run_migrate_bench(data: Path, persona_seed: int, echo: Callable[[str], None], derive_steps: int = 30,
                      distill: DistillSettings = DistillSettings()) -> MigrateBench:
    work = Path(tempfile.mkdtemp(prefix="plora-bench-migrate-"))
    try:
        reg = Registry(open_database(f"sqlite:///{work / 'registry.db'}"))
        config, persona = PrivateLoRAConfig(), make_persona(persona_seed)
        notes, heldout = _write(work / "notes.jsonl", persona.train_records()), _write(work / "heldout.jsonl", persona.heldout_records())
        v1 = register(reg, "embedded", config)
        base = init_device(work / "v1-device", "embedded", config).root
        v1_none = _measure(base, persona, heldout)
        echo(f"v1 without M: recall {v1_none['recall']:.0%}, held-out loss {v1_none['heldout_loss']:.3f}; personalizing")
        _personalize(base, reg, notes)
        v1_m = _measure(base, persona, heldout)
        echo(f"v1 + M: recall {v1_m['recall']:.0%}, held-out loss {v1_m['heldout_loss']:.3f}")
        rows = [{"upgrade": "-", "model": "v1, no M", **v1_none}, {"upgrade": "-", "model": "v1 + M", **v1_m}]
        for kind in KINDS:
            if kind == "derived":
                echo(f"deriving v2: {derive_steps} steps on GSM8K train")
                v2 = derive(reg, v1.name, data / "gsm8k" / "train.jsonl", f"bench-derived-{persona_seed}", steps=derive_steps,
                            on_step=lambda s, t, loss: s % 10 == 0 and echo(f"  derive step {s}/{t}, loss {loss:.3f}"),
                            folder=work / "backbones")
            else:
                v2 = register(reg, "embedded", PrivateLoRAConfig(seed=config.seed + 1))
            v2_config = PrivateLoRAConfig.from_dict(v2.adapter_config)
            measured = {"v2, no M": _measure(init_device(work / f"{kind}-none", v2.source, v2_config).root, persona, heldout)}
            for method in ("copy", "distill"):
                folder = work / f"{kind}-{method}"
                shutil.copytree(base, folder)
                report = migrate_device(folder, v2.name, method, reg, settings=distill, min_retention=0.0)
                measured[f"v2 + {method} M"] = {**_measure(folder, persona, heldout),
                                                "gain_kept_measured": report.after.get("gain_kept")}
            retrained = init_device(work / f"{kind}-retrained", v2.source, v2_config).root
            _personalize(retrained, reg, notes)
            measured["v2 + retrained M"] = _measure(retrained, persona, heldout)
            none = measured["v2, no M"]
            loss_gain = v1_none["heldout_loss"] - v1_m["heldout_loss"]
            recall_gain = v1_m["recall"] - v1_none["recall"]
            for model, values in measured.items():
                row = {"upgrade": kind, "model": model, **values}
                row["loss_gain_kept"] = (none["heldout_loss"] - values["heldout_loss"]) / loss_gain if loss_gain > 0 else None
                row["recall_gain_kept"] = (values["recall"] - none["recall"]) / recall_gain if recall_gain > 0 else None
                rows.append(row)
                echo(f"{kind}: {model}: recall {values['recall']:.0%}, held-out loss {values['heldout_loss']:.3f}")
        return MigrateBench(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
