"""`plora bench wire`: what a cheaper wire costs a personalization, measured as a user gets it.

A fresh device has M = 0, so u·M is zero whatever dtype it crosses in: only a trained M shows
what the exchanges' rounding costs. So for each persona, devices enrolled on a served embedded
backbone each run `plora personalize`'s default job on the persona's notes (a file outside the
device folder), one device per wire. Per wire: held-out recall and held-out loss, measured over
that wire on paraphrases no job sees, and the largest change the wire makes to a token's
log-probability on the WAN bench's workload prompts with that job's M, against the same device
scored over float32.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable
from pathlib import Path

import torch

from plora.clients.data import DEVICE_JOB_MAX_LENGTH, load_examples, tokenize
from plora.clients.generation import encode_prompt, token_logprobs
from plora.clients.grpc_link import Endpoint
from plora.clients.training import evaluate
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.protocol.wire import EXACT_WIRE, WireDtypes
from plora.platform.bench.serve import bench_registry_url, enroll, service_process
from plora.platform.bench.workloads import WORKLOADS
from plora.platform.fleet.personas import make_persona, persona_recall
from plora.platform.jobs import run_personalization
from plora.platform.runtime import open_device
from plora.storage.db import open_database
from plora.storage.registry import Registry


def describe(wire: WireDtypes) -> str:
    return f"exchanges {str(wire.exchanges).removeprefix('torch.')}, cut {str(wire.cut).removeprefix('torch.')}"


def run_wire_bench(personas: int, wires: list[WireDtypes], echo: Callable[[str], None]) -> list[dict]:
    """One row per (persona, wire); float32 first, as every other wire's reference."""
    wires = [EXACT_WIRE] + [w for w in wires if w != EXACT_WIRE]
    context = multiprocessing.get_context("spawn")
    rows = []
    with service_process(context, "embedded", PrivateLoRAConfig()) as (home, port, _):
        enroll(home, Endpoint(f"127.0.0.1:{port}", insecure=True), personas * len(wires))
        reg = Registry(open_database(bench_registry_url(home)))
        for seed in range(personas):
            persona = make_persona(seed)
            notes, heldout = home / f"persona-{seed}.jsonl", home / f"persona-{seed}-heldout.jsonl"
            notes.write_text("".join(json.dumps(row) + "\n" for row in persona.train_records()))
            heldout.write_text("".join(json.dumps(row) + "\n" for row in persona.heldout_records()))
            reference = None
            for i, wire in enumerate(wires):
                folder = home / f"device{seed * len(wires) + i}"
                row = {"persona": seed, "wire": describe(wire), **_personalized(folder, wire, notes, heldout, persona, reg)}
                if reference is None:
                    reference = row
                else:
                    row.update(_logprob_changes(folder, wire), recall_vs_float32=row["recall"] - reference["recall"],
                               heldout_loss_vs_float32=row["heldout_loss"] / reference["heldout_loss"] - 1)
                rows.append(row)
                echo(f"persona {seed}, {row['wire']}: recall {row['recall']:.0%}, held-out loss {row['heldout_loss']:.4f}, "
                     f"{row['steps']} steps at lr {row['lr']}"
                     + (f"; token log-probabilities within {row['max_logprob_change']:.4f} nats of float32's"
                        if "max_logprob_change" in row else ""))
    return rows


def _personalized(folder: Path, wire: WireDtypes, notes: Path, heldout: Path, persona, reg: Registry) -> dict:
    device = open_device(folder, wire_dtypes=wire)
    try:
        outcome = run_personalization(device, notes, None, reg=reg, keep_text=False)
        examples = tokenize(load_examples(heldout), device.tokenizer, DEVICE_JOB_MAX_LENGTH)
        bytes_sent = sum(device.model.link.wire_bytes.values())
        return {"recall": persona_recall(device.model, device.tokenizer, persona),
                "heldout_loss": evaluate(device.model, examples, device.tokenizer.pad_token_id),
                "steps": outcome.result.steps, "lr": outcome.lr, "job_wire_bytes": bytes_sent}
    finally:
        device.close()


def _logprob_changes(folder: Path, wire: WireDtypes) -> dict:
    """How far `wire` moves each token's log-probability on the workload prompts, with this
    device's M, against float32."""
    logprobs = {}
    for name, dtypes in (("wire", wire), ("exact", EXACT_WIRE)):
        device = open_device(folder, wire_dtypes=dtypes)
        try:
            prompts = [encode_prompt(device.tokenizer, p) for ps in WORKLOADS.values() for p in ps()]
            with torch.no_grad():
                logprobs[name] = [torch.tensor(token_logprobs(device.model, ids)) for ids in prompts]
        finally:
            device.close()
    changes = torch.cat([(a - b).abs() for a, b in zip(logprobs["wire"], logprobs["exact"])])
    return {"max_logprob_change": changes.max().item(), "mean_logprob_change": changes.mean().item(),
            "scored_tokens": changes.numel()}
