"""`plora bench federated`: what the fleet's starting M (M₀) gives users with little data.

It runs the flows the README gives, against one backbone service on loopback:
- the federation, `plora fleet launch --strategy fedavg --data PLAY` (launch(): Flower's
  simulation engine, SecAgg+), whose devices are the play's `federation` largest speakers, one
  each (the fleet's natural partition of a play);
- new users, speakers never in it: the others with at least NEW_MIN_BLOCKS blocks, and enough
  to personalize on the largest size besides those they hold out (`fewest_blocks`), spread over
  their sizes. Each holds a fifth of its blocks out (at least MIN_HELDOUT), never used for any
  choice. For each size and seed it writes that many of its other blocks, drawn by the seed, to a
  notes file outside any device folder, and runs `plora personalize DIR --data NOTES` (the
  default job) on a fresh device, from zero and with --from-fleet.
For each new speaker, size and seed: the held-out NLL of the base model, of M₀ alone, after
personalizing from zero and after personalizing from M₀. With dp_noise, a second federation
under DP gives an M₀ at its epsilon, and the first seed's TARGET_BLOCKS runs are made from it too.
"""

from __future__ import annotations

import itertools
import json
import random
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from plora.clients.data import PERSONALIZE_MAX_LENGTH, tokenize
from plora.clients.device_store import DeviceStore
from plora.clients.training import evaluate
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.server import start_service
from plora.platform.bench.fleet import registry_of_its_own
from plora.platform.bench.quality import pick_speakers
from plora.platform.fleet.launch import Progress, launch
from plora.platform.fleet.partition import holdout, holdout_size, play_blocks
from plora.platform.fleet.settings import FEDAVG, device_dir, start_path
from plora.platform.jobs import run_personalization
from plora.platform.runtime import init_device, open_device
from plora.storage.errors import DataError
from plora.storage.registry import open_registry

TARGET_BLOCKS = 10
"""The size the targets are set at, run with every seed; the others with the first seed only."""
NEW_MIN_BLOCKS = 30
MIN_HELDOUT = 10
EVALUATED = 0.25
"""Share of the federation's devices measuring M₀ after each round: a sign of progress, not a figure."""


def held_out_fraction(blocks: int) -> float:
    """The share of a new speaker's `blocks` it holds out of every choice."""
    return max(0.2, MIN_HELDOUT / blocks)


def fewest_blocks(size: int) -> int:
    """The fewest blocks a new speaker needs to personalize on `size` of them besides those it
    holds out, and at least NEW_MIN_BLOCKS."""
    return next(n for n in itertools.count(max(NEW_MIN_BLOCKS, size))
                if n - holdout_size(n, held_out_fraction(n)) >= size)


@dataclass
class FederatedBench:
    federations: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    figures: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"federations": self.federations, "rows": self.rows, "figures": self.figures, "seconds": self.seconds}


def run_federated_bench(data: Path, federation: int, new_speakers: int, sizes: list[int], seeds: int, rounds: int, steps: int,
                        dp_noise: float, backbone: str, echo: Callable[[str], None],
                        on_progress: Progress | None = None) -> FederatedBench:
    """`sizes`: the blocks a new speaker personalizes on, one run per size (with `seeds` draws
    at TARGET_BLOCKS)."""
    started = time.monotonic()
    play = data / "tinyshakespeare" / "input.txt"
    blocks = play_blocks(play)
    per_speaker = Counter(blocks["speaker"])
    members = {name for name, _ in per_speaker.most_common(federation)}  # the fleet's natural partition: the largest
    try:  # found now, not after the federations
        newcomers = pick_speakers({name: n for name, n in per_speaker.items() if name not in members}, new_speakers,
                                  fewest_blocks(max(sizes)))
    except DataError as err:
        raise DataError(f"{err}: a new speaker personalizes on up to {max(sizes)} blocks besides those it holds out, "
                        "so ask for fewer new speakers or smaller sizes") from None
    splits = {}  # each new speaker's (blocks to draw from, held-out blocks)
    for speaker in newcomers:
        mine = blocks.filter(lambda row, speaker=speaker: row["speaker"] == speaker).select_columns(["text"])
        splits[speaker] = holdout(mine, held_out_fraction(len(mine)))
    bench = FederatedBench()
    with tempfile.TemporaryDirectory(prefix="plora-bench-federated-") as scratch, registry_of_its_own(Path(scratch)):
        scratch = Path(scratch)
        service = start_service([backbone], PrivateLoRAConfig(), open_registry())
        try:  # only the federations use the service; its idle compute threads would slow the device's torch ops 2x
            starts = {}
            for name, noise in (("fleet", 0.0), ("fleet_dp", dp_noise)):
                if name == "fleet_dp" and not noise:
                    continue
                echo(f"federation {name}: the {federation} largest speakers, {rounds} rounds of {steps} steps"
                     + (f", DP noise {noise}" if noise else ""))
                summary, starts[name] = _federate(scratch / name, play, federation, rounds, steps, f"127.0.0.1:{service.port}",
                                                  noise, on_progress)
                bench.federations.append({"name": name, **summary})
        finally:
            service.stop(grace_s=1)
        for speaker, (pool, held) in splits.items():
            for size in sizes:
                for seed in range(seeds if size == TARGET_BLOCKS else 1):
                    notes = scratch / "notes" / f"{speaker}-{size}-{seed}.jsonl"  # the user's file, outside any device
                    notes.parent.mkdir(exist_ok=True)
                    chosen = random.Random(seed).sample(list(pool), size)
                    notes.write_text("".join(json.dumps(row) + "\n" for row in chosen))
                    used = {k: v for k, v in starts.items() if k == "fleet" or (size == TARGET_BLOCKS and seed == 0)}
                    row = {"speaker": speaker, "blocks": size, "seed": seed, "heldout_blocks": len(held),
                           **_personalize(scratch / "devices" / f"{speaker}-{size}-{seed}", backbone, notes, held, used)}
                    bench.rows.append(row)
                    echo(f"{speaker}, {size} blocks, seed {seed}: gain from zero {row['zero']['gain']:.3f}, M₀ alone "
                         f"{row['fleet']['start_gain']:.3f}, from M₀ {row['fleet']['gain']:.3f} nats")
    bench.seconds = time.monotonic() - started
    bench.figures = figures(bench)
    return bench


def _federate(root: Path, play: Path, devices: int, rounds: int, steps: int, address: str, dp_noise: float,
              on_progress: Progress | None) -> tuple[dict, Path]:
    started = time.monotonic()
    lines = launch(devices, rounds, str(play), address, root, steps=steps, on_progress=on_progress, strategy=FEDAVG,
                   dp_noise=dp_noise, fraction_evaluate=EVALUATED)
    seconds = time.monotonic() - started
    sent = [_train_bytes(device_dir(root, i)) for i in range(devices)]
    version = DeviceStore.open(device_dir(root, 0)).record.identity.version
    return {"rounds": lines, "seconds": seconds, "bytes_per_device_round": sum(sent) / len(sent) / rounds,
            "epsilon": lines[-1].get("epsilon_total"), "delta": lines[-1].get("delta")}, start_path(root, version)


def _train_bytes(folder: Path) -> int:
    """What a device sent the orchestrator in its rounds (all SecAgg+ stages), by its own record."""
    path = folder / DeviceStore.SENT
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return sum(line["bytes"] for line in lines if line["type"] == "train")


def _personalize(base: Path, backbone: str, notes: Path, held_rows: datasets.Dataset, starts: dict[str, Path]) -> dict:
    """`plora personalize` from zero and from each starting M, each on a fresh device; held-out NLLs."""
    results, base_nll = {}, None
    for name in ("zero", *starts):
        folder = base / name
        init_device(folder, backbone, public=base.parent.parent / "public")  # the base model's anchor text, written once
        device = open_device(folder)
        try:
            pad = device.tokenizer.pad_token_id
            heldout = tokenize(held_rows, device.tokenizer, PERSONALIZE_MAX_LENGTH)
            base_nll = base_nll if base_nll is not None else evaluate(device.model, heldout, pad)
            start_nll = base_nll
            if name != "zero":
                device.start_from_fleet(starts[name])
                start_nll = evaluate(device.model, heldout, pad)
            outcome = run_personalization(device, notes, keep_text=False)
            after = evaluate(device.model, heldout, pad)
        finally:
            device.close()
        results[name] = {"base": base_nll, "start": start_nll, "after": after, "gain": base_nll - after,
                         "start_gain": base_nll - start_nll, "lr": outcome.lr, "steps": outcome.result.steps,
                         "selection": outcome.selection, "chose_by": outcome.search.as_metrics() if outcome.search else None}
    return results


def _worse_than_start(rows: list[dict], start: str, size: int) -> dict:
    """How many of the jobs from `start` ended worse on held-out text than they began, and how
    many chose to keep their start exactly."""
    runs = [row[start] for row in rows]
    kept = sum(run["steps"] == 0 for run in runs)
    named, began = ("zero", "the base model") if start == "zero" else ("M₀", "M₀ alone")
    return {"figure": f"jobs from {named} worse than {began} on held-out text ({size} blocks)",
            "value": sum(run["after"] > run["start"] for run in runs), "target": "",
            "detail": f"of {len(runs)}; {kept} kept their start exactly"}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def figures(bench: FederatedBench) -> list[dict]:
    """The table: gains by size and start, the targets at TARGET_BLOCKS, the federation's costs."""
    found = []
    for size in sorted({row["blocks"] for row in bench.rows}):
        rows = [row for row in bench.rows if row["blocks"] == size]
        speakers, seeds = len({row["speaker"] for row in rows}), len({row["seed"] for row in rows})
        where = f"{size} blocks, {speakers} new speakers x {seeds} seed(s)"
        zero, fleet = _mean([row["zero"]["gain"] for row in rows]), _mean([row["fleet"]["gain"] for row in rows])
        found += [
            {"figure": f"held-out NLL gain from zero ({where})", "value": zero, "target": "", "detail": "nats, mean"},
            {"figure": f"held-out NLL gain of M₀ alone ({where})", "value": _mean([row["fleet"]["start_gain"] for row in rows]),
             "target": "", "detail": "nats, mean"},
            {"figure": f"held-out NLL gain from M₀ ({where})", "value": fleet, "target": "", "detail": "nats, mean"},
            {"figure": f"gain from M₀ / gain from zero ({size} blocks)", "value": fleet / zero if zero else float("nan"),
             "target": ">= 1.3" if size == TARGET_BLOCKS else "", "detail": "ratio of the means"},
            *[_worse_than_start(rows, start, size) for start in ("zero", "fleet")],
        ]
        if size == TARGET_BLOCKS:
            by_speaker = defaultdict(list)
            for row in rows:
                by_speaker[row["speaker"]].append(row["fleet"]["after"] / row["zero"]["after"] - 1)
            worst_speaker, worst = max(((s, _mean(v)) for s, v in by_speaker.items()), key=lambda pair: pair[1])
            found.append({"figure": f"worst held-out NLL from M₀ above from zero ({size} blocks)", "value": worst,
                          "target": "<= 0.02", "detail": f"{worst_speaker}, mean over seeds"})
            dp_rows = [row for row in rows if "fleet_dp" in row]
            if dp_rows:
                dp = next(f for f in bench.federations if f["name"] == "fleet_dp")
                found.append({"figure": f"held-out NLL gain from M₀ under DP ({size} blocks, {len(dp_rows)} new speakers x 1 seed)",
                              "value": _mean([row["fleet_dp"]["gain"] for row in dp_rows]), "target": "",
                              "detail": f"epsilon {dp['epsilon']:.1f} at delta {dp['delta']:g}"})
    for federation in bench.federations:
        found += [
            {"figure": f"bytes each device sent the orchestrator per round ({federation['name']})",
             "value": federation["bytes_per_device_round"], "target": "", "detail": "all SecAgg+ stages, by the devices' records"},
            {"figure": f"federation run time ({federation['name']}, min)", "value": federation["seconds"] / 60, "target": "",
             "detail": f"{len(federation['rounds'])} rounds"},
        ]
    found.append({"figure": "bench run time (min)", "value": bench.seconds / 60, "target": "about 60", "detail": "2 cores"})
    return found
