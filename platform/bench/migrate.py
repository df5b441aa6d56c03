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

Then the operator's flow for a fleet (`fleet_upgrade`): `plora fleet launch` personalizes a fleet
of persona devices, each keeping its notes and held-out paraphrases in its own folder as a fleet
device does; the operator registers v2 (fresh projections) and runs `plora migrate --root`
(`launch_migration`, a Flower job) with its default retention rule, under which a device that
would keep too little stays on v1. Each device is measured, through a service hosting both
versions, before and after, against the base model on the same text.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from plora.clients.data import DEVICE_JOB_MAX_LENGTH, load_examples, tokenize
from plora.clients.device_store import DeviceStore
from plora.clients.migration import DistillSettings
from plora.clients.training import evaluate
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.versions import register
from plora.platform.bench.fleet import registry_of_its_own
from plora.platform.fleet.launch import launch, launch_migration
from plora.platform.fleet.personas import make_persona, persona_recall
from plora.platform.fleet.settings import partition_of
from plora.platform.jobs import run_personalization
from plora.platform.runtime import init_device, open_device
from plora.platform.versions.derive import derive
from plora.platform.versions.migration import device_folders, migrate_device, service_for
from plora.storage.db import open_database
from plora.storage.registry import Registry, open_registry

UPGRADES = ("derived", "fresh-seed", "fleet")
"""What the bench can measure: one device moved to a derived decoder, or to fresh projections of
the same weights; and a fleet moved to fresh projections by its operator."""


@dataclass
class MigrateBench:
    rows: list[dict]

    def to_json(self) -> dict:
        return {"rows": self.rows}


def _measure(root: Path, persona, heldout: Path, address: str | None = None) -> dict:
    device = open_device(root, address)
    try:
        examples = tokenize(load_examples(heldout), device.tokenizer, DEVICE_JOB_MAX_LENGTH)
        return {"recall": persona_recall(device.model, device.tokenizer, persona),
                "heldout_loss": evaluate(device.model, examples, device.tokenizer.pad_token_id)}
    finally:
        device.close()


def _gain_kept(base: dict, personalized: dict, base_now: dict, now: dict) -> dict:
    """The share of the gain `personalized` made over `base` that `now` keeps over `base_now`,
    its own base model, in held-out loss and in recall (None where there was no gain)."""
    loss_gain, recall_gain = base["heldout_loss"] - personalized["heldout_loss"], personalized["recall"] - base["recall"]
    return {"loss_gain_kept": (base_now["heldout_loss"] - now["heldout_loss"]) / loss_gain if loss_gain > 0 else None,
            "recall_gain_kept": (now["recall"] - base_now["recall"]) / recall_gain if recall_gain > 0 else None}


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
                      distill: DistillSettings = DistillSettings(), upgrades: tuple[str, ...] = UPGRADES,
                      fleet_devices: int = 4, fleet_rounds: int = 3) -> MigrateBench:
    work = Path(tempfile.mkdtemp(prefix="plora-bench-migrate-"))
    try:
        single = [kind for kind in upgrades if kind != "fleet"]
        rows = single_device_upgrades(work, data, persona_seed, single, derive_steps, distill, echo) if single else []
        if "fleet" in upgrades:
            rows += fleet_upgrade(work / "fleet-upgrade", fleet_devices, fleet_rounds, distill, echo)
        return MigrateBench(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def single_device_upgrades(work: Path, data: Path, persona_seed: int, kinds: list[str], derive_steps: int,
                           distill: DistillSettings, echo: Callable[[str], None]) -> list[dict]:
    """One persona's device personalized on v1, then, per kind of upgrade, v2 with no, copied,
    distilled and retrained M; rows of each against v2's base model."""
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
    for kind in kinds:
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
            measured[f"v2 + {method} M"] = {**_measure(folder, persona, heldout), "gain_kept_measured": report.after.get("gain_kept")}
        retrained = init_device(work / f"{kind}-retrained", v2.source, v2_config).root
        _personalize(retrained, reg, notes)
        measured["v2 + retrained M"] = _measure(retrained, persona, heldout)
        for model, values in measured.items():
            rows.append({"upgrade": kind, "model": model, **values, **_gain_kept(v1_none, v1_m, measured["v2, no M"], values)})
            echo(f"{kind}: {model}: recall {values['recall']:.0%}, held-out loss {values['heldout_loss']:.3f}")
    return rows


def fleet_upgrade(work: Path, devices: int, rounds: int, distill: DistillSettings, echo: Callable[[str], None],
                  backbone: str = "embedded") -> list[dict]:
    """A fleet of `devices` personas personalized for `rounds` rounds by `plora fleet launch`, then
    moved to fresh projections by `plora migrate --root` as an operator runs it: rows per device
    of v1 + M and of what it has after the migration, against its base model."""
    work.mkdir(parents=True)
    with registry_of_its_own(work):
        root, reg = work / "fleet", open_registry()
        echo(f"a fleet of {devices} personas, {rounds} rounds")
        launch(devices, rounds, backbone=backbone, root=root, echo=echo)
        folders = device_folders(root)
        v1 = DeviceStore.open(folders[0]).record.identity.version
        v1_config = PrivateLoRAConfig.from_dict(reg.get_backbone(v1).adapter_config)
        v2 = register(reg, backbone, replace(v1_config, seed=v1_config.seed + 1))
        base = init_device(work / "base", backbone, v1_config).root  # M = 0: the base model, which v1 and v2 share

        def measure_all() -> dict[int, dict]:
            with service_for(folders, v2.name, reg, None) as address:
                return {partition_of(folder): _measure(folder, make_persona(partition_of(folder)),
                                                       folder / DeviceStore.PRIVATE_HELDOUT, address) for folder in folders}

        before = measure_all()
        echo(f"migrating the fleet to {v2.name} as an operator does")
        lines = {line["partition_id"]: line for line in launch_migration(root, v2.name, "distill", steps=distill.steps,
                                                                         lr=distill.lr, echo=echo)}
        after = measure_all()
        rows = []
        for folder in folders:
            device = partition_of(folder)
            none = _measure(base, make_persona(device), folder / DeviceStore.PRIVATE_HELDOUT)
            line, version = lines[device], DeviceStore.open(folder).record.identity.version
            outcome = "migrated" if version == v2.name else f"stayed on v1 ({line['error'] or '?'})"
            rows.append({"upgrade": "fleet", "model": f"{folder.name}, v1 + M", **before[device]})
            rows.append({"upgrade": "fleet", "model": f"{folder.name}, {outcome}", **after[device],
                         **_gain_kept(none, before[device], none, after[device]),
                         "gain_kept_measured": line["metrics"].get("after_gain_kept")})
            echo(f"fleet: {folder.name} {outcome}: recall {before[device]['recall']:.0%} -> {after[device]['recall']:.0%}, "
                 f"held-out loss {before[device]['heldout_loss']:.3f} -> {after[device]['heldout_loss']:.3f} (base {none['heldout_loss']:.3f})")
        return rows
