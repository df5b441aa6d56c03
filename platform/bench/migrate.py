"""`plora bench migrate`: how much personalization survives a backbone upgrade, per method.

On the embedded backbone, a device personalizes on a synthetic persona against v1. Then, for
each kind of upgrade (a derived decoder fine-tuned on public data; the same weights with
fresh public projections), it measures private-fact recall and held-out loss for v1 + M,
v2 with no M, v2 + copied M, v2 + distilled M and v2 + M retrained from scratch on the same
data. Devices are real device folders with a local backbone, migrated by `migrate_device`,
the code `plora migrate` runs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from plora.clients.data import DEVICE_JOB_MAX_LENGTH, load_examples, tokenize
from plora.clients.device_store import DeviceStore
from plora.clients.migration import DistillSettings
from plora.clients.training import evaluate
from plora.cloud_backbone.privatelora import PrivateLoRAConfig
from plora.cloud_backbone.versions import register
from plora.platform.versions.derive import derive
from plora.platform.jobs import run_personalization
from plora.platform.versions.migration import migrate_device
from plora.platform.fleet.personas import PERSONA_JOB, make_persona, persona_recall
from plora.platform.runtime import init_device, open_device
from plora.storage.db import open_database
from plora.storage.registry import Registry

KINDS = ("derived", "fresh-seed")


@dataclass
class MigrateBench:
    rows: list[dict]

    def to_json(self) -> dict:
        return {"rows": self.rows}


def _measure(root: Path, persona) -> dict:
    device = open_device(root)
    try:
        heldout = tokenize(load_examples(root / DeviceStore.PRIVATE_HELDOUT), device.tokenizer, DEVICE_JOB_MAX_LENGTH)
        return {"recall": persona_recall(device.model, device.tokenizer, persona),
                "heldout_loss": evaluate(device.model, heldout, device.tokenizer.pad_token_id)}
    finally:
        device.close()


def _new_device(root: Path, spec: str, config: PrivateLoRAConfig, persona) -> Path:
    init_device(root, spec, config)
    for name, records in ((DeviceStore.PRIVATE_TRAIN, persona.train_records()), (DeviceStore.PRIVATE_HELDOUT, persona.heldout_records())):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _personalize(root: Path, reg: Registry) -> None:
    device = open_device(root)
    try:
        run_personalization(device, root / DeviceStore.PRIVATE_TRAIN, PERSONA_JOB, DEVICE_JOB_MAX_LENGTH, val_fraction=0.0, reg=reg)
    finally:
        device.close()


def run_migrate_bench(data: Path, persona_seed: int, echo: Callable[[str], None], derive_steps: int = 30,
                      distill: DistillSettings = DistillSettings()) -> MigrateBench:
    work = Path(tempfile.mkdtemp(prefix="plora-bench-migrate-"))
    try:
        reg = Registry(open_database(f"sqlite:///{work / 'registry.db'}"))
        config, persona = PrivateLoRAConfig(), make_persona(persona_seed)
        v1 = register(reg, "embedded", config)
        base = _new_device(work / "v1-device", "embedded", config, persona)
        v1_none = _measure(base, persona)
        echo(f"v1 without M: recall {v1_none['recall']:.0%}, held-out loss {v1_none['heldout_loss']:.3f}; personalizing")
        _personalize(base, reg)
        v1_m = _measure(base, persona)
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
            measured = {"v2, no M": _measure(_new_device(work / f"{kind}-none", v2.source, v2_config, persona), persona)}
            for method in ("copy", "distill"):
                folder = work / f"{kind}-{method}"
                shutil.copytree(base, folder)
                migrate_device(folder, v2.name, method, reg, settings=distill)
                measured[f"v2 + {method} M"] = _measure(folder, persona)
            retrained = _new_device(work / f"{kind}-retrained", v2.source, v2_config, persona)
            _personalize(retrained, reg)
            measured["v2 + retrained M"] = _measure(retrained, persona)
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
