"""`plora bench wan`: the split over emulated network links, against the monolithic model.

The service runs in a process of its own and the device in another (as `plora bench serve`
runs them), and between them, for each link, a relay (relay.py) that delays and paces the
bytes: each round-trip time given, at a bandwidth cap each way; and plain loopback, without a
relay or a cap, always, as round-trip time 0. Per link it measures decode tokens/s, the time to the
first token of a FIRST_TOKEN_PROMPT-token prompt, and the seconds and bytes of a training step
of a personalization job (its batch and its anchor's rows); the monolithic model's figures come
from the same run, on this machine's cores, alone.

A decoded token makes one round trip per adapted group per cloud layer, so at round-trip time
t one pass can go no faster than the one-pass bound, 1 / (round trips per pass x t + compute
per pass); the compute per pass is measured on loopback in the same run (its round trips,
about half a millisecond each, included). The bench reports decode tokens/s over that bound.
Every figure over a link with a delay is emulated, and says so.

Then the same device decodes the workloads of workloads.py greedily, guessing ahead by
prompt lookup (`Drafting`): tokens per pass, decode tokens/s and that over the same one-pass
bound, which a pass of one token can never exceed; on loopback also without drafting, to
check that the replies are the same.

Last, over each delayed link, the cloud's own throughput: a fleet of replay clients decoding
at once, each on its own connection through the relay, against one of them alone. A replay
client is a device without its own compute: it sends the prompt's embeddings as the hidden
state at the cut, answers u·M, and runs no device layer and no LM head, so that its figures are
the cloud's and the link's. Aggregate tokens/s ÷ (clients × one alone) is 1 when the cloud adds
no queueing. Everything shares this machine's cores, so the run also reports the machine's
ceiling on that ratio: the cores ÷ the CPU seconds a fleet token cost every process here. Each
client runs in a process of its own, as a device would on its own machine, so that no client
waits for another's interpreter lock.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from plora.clients.grpc_link import Endpoint
from plora.cloud_backbone import loading
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.protocol.wire import WireDtypes
from plora.platform.bench.relay import Link, relay
from plora.platform.bench.serve import (
    FIRST_TOKEN_PROMPT,
    JOB_BATCH,
    JOB_ROWS_WITH_ANCHOR,
    NEW_TOKENS,
    PROMPT,
    DeviceProcess,
    decode_run,
    enroll,
    random_prompt,
    service_process,
    train_run,
    train_ids,
)
from plora.platform.bench.split import MonolithicModel, rate
from plora.platform.bench.wire import describe
from plora.platform.bench.workloads import WORKLOADS


@dataclass(frozen=True)
class Drafting:
    """How the bench measures decoding with drafts (workloads.py): up to `draft_tokens`
    guessed per pass, `new_tokens` per reply; on loopback every prompt of each workload,
    drafting and not (the replies must be the same), on a delayed link the first
    `delayed_prompts`, drafting only. The command's options hold the defaults."""

    draft_tokens: int
    new_tokens: int
    delayed_prompts: int


@dataclass
class WanBench:
    backbone: str
    config: dict
    links: list[dict] = field(default_factory=list)
    monolithic: dict = field(default_factory=dict)
    drafting: list[dict] = field(default_factory=list)
    fleets: list[dict] = field(default_factory=list)  # replay clients at once, per delayed link
    wire: str = describe(WireDtypes())

    def to_json(self) -> dict:
        return {"backbone": self.backbone, "config": self.config, "wire": self.wire, "monolithic": self.monolithic, "links": self.links,
                "drafting": self.drafting, "fleets": self.fleets}


def run_wan_bench(
    spec: str,
    rtts_ms: list[float],
    mbit_per_s: float,
    repeats: int,
    drafting: Drafting,
    echo: Callable[[str], None],
    wire_dtypes: WireDtypes = WireDtypes(),
    config: PrivateLoRAConfig = PrivateLoRAConfig(),
    fleet: int = 16,
) -> WanBench:
    """`wire_dtypes`: what the activations cross in (`plora bench wire` measures what that
    costs). `config`: the adapter the service hosts. `fleet`: replay clients at once (0: none)."""
    context = multiprocessing.get_context("spawn")
    results = WanBench(spec, config.to_dict(), wire=describe(wire_dtypes))
    with service_process(context, spec, config) as (home, port, _):
        echo(f"service up on port {port}; the monolithic model's figures first")
        enroll(home, Endpoint(f"127.0.0.1:{port}", insecure=True), max(1, fleet))
        folder = home / "device0"
        results.monolithic = _monolithic(spec, config, repeats)
        compute_per_pass = loopback_train = None
        for rtt_ms in sorted({0.0, *rtts_ms}):  # loopback first: the others' bound needs its compute per pass
            link = Link(rtt_ms / 1e3, mbit_per_s if rtt_ms else None)
            where = "loopback" if not rtt_ms else link.describe()
            echo(f"device over {where}")
            with relay(link, port) if rtt_ms else contextlib.nullcontext(f"127.0.0.1:{port}") as address:
                device = DeviceProcess(context, folder, address, wire_dtypes)
                try:
                    figures = _device_figures(device, repeats)
                    if compute_per_pass is None:
                        compute_per_pass, loopback_train = 1 / figures["decode_tok_s"], figures["train_tok_s"]
                    bound = 1 / (figures["round_trips_per_pass"] * link.rtt_s + compute_per_pass)
                    for row in _drafting_figures(device, drafting, loopback=not rtt_ms):
                        results.drafting.append({"link": where, "rtt_ms": rtt_ms, **row, "decode_vs_bound": row["decode_tok_s"] / bound})
                        echo(f"{where}, {row['workload']}: {row['tokens_per_pass']:.2f} tokens per pass, "
                             f"{row['decode_tok_s']:.2f} decoded tokens/s")
                finally:
                    device.close()
            round_trips = figures.pop("round_trips_per_pass")
            results.links.append({"rtt_ms": rtt_ms, "mbit_per_s": link.mbit_per_s, "emulated": bool(rtt_ms), "link": where,
                                  **figures, "round_trips_per_pass": round_trips, "one_pass_bound_tok_s": bound,
                                  "decode_vs_bound": figures["decode_tok_s"] / bound,
                                  "decode_vs_monolithic": figures["decode_tok_s"] / results.monolithic["decode_tok_s"],
                                  "train_vs_loopback": figures["train_tok_s"] / loopback_train})
            echo(f"{where}: {figures['decode_tok_s']:.2f} decoded tokens/s, first token {figures['first_token_s']:.2f} s, "
                 f"training step {figures['train_step_s']:.2f} s")
            if rtt_ms and fleet:
                echo(f"{where}: {fleet} replay clients decoding at once, against one alone")
                with relay(link, port) as address:
                    figures = _replay_fleet(context, [home / f"device{i}" for i in range(fleet)], address, repeats)
                results.fleets.append({"link": where, "rtt_ms": rtt_ms, "emulated": True, **figures})
                echo(f"{where}: {fleet} replay clients at {figures['fleet_tok_s']:.1f} tokens/s, "
                     f"{figures['vs_alone']:.2f} of {fleet} × one alone (this machine's ceiling {figures['ceiling']:.2f})")
    return results


REPLAY_TOKENS = 24  # decoded per client and run, after its prefill


def _replay_fleet(context, folders: list[Path], address: str, repeats: int) -> dict:
    """Aggregate decode tokens/s of the replay clients at once, one of them alone, their ratio
    and this machine's ceiling on it (the module's docstring)."""
    clients: list[DeviceProcess] = []
    try:
        for folder in folders:
            clients.append(DeviceProcess(context, folder, address))
        _at_once(clients)  # warm up: connections, sessions, caches
        alone = statistics.median(rate(lambda: clients[0].call("replay", REPLAY_TOKENS)) for _ in range(repeats))
        runs = []
        for _ in range(repeats):
            busy_before, started = _busy_cpu_s(), time.perf_counter()
            _at_once(clients)
            runs.append((len(clients) * REPLAY_TOKENS / (time.perf_counter() - started),
                         (_busy_cpu_s() - busy_before) / (len(clients) * REPLAY_TOKENS)))
        fleet_tok_s, cpu_per_token = statistics.median(tok_s for tok_s, _ in runs), statistics.median(cpu for _, cpu in runs)
    finally:
        for client in clients:
            client.close()
    cores = os.cpu_count() or 1
    return {"clients": len(folders), "alone_tok_s": alone, "fleet_tok_s": fleet_tok_s,
            "vs_alone": fleet_tok_s / (len(folders) * alone), "cpu_s_per_token": cpu_per_token, "cores": cores,
            "ceiling": min(1.0, cores / cpu_per_token / (len(folders) * alone))}


def _at_once(clients: list[DeviceProcess]) -> None:
    """Every client decodes, all at once; a client's failure is raised, not counted as tokens."""
    for client in clients:
        client.send("replay", REPLAY_TOKENS)
    for client in clients:
        client.answer()


def _busy_cpu_s() -> float:
    """CPU seconds this machine's cores have spent busy, every process together."""
    times = psutil.cpu_times()
    # Not guest time, which Linux counts in user time already, nor steal, which was not ours.
    return sum(getattr(times, kind, 0.0) for kind in ("user", "nice", "system", "irq", "softirq"))


def _monolithic(spec: str, config: PrivateLoRAConfig, repeats: int) -> dict:
    """The monolithic model's figures."""
    model = MonolithicModel(loading.load(spec), config)
    vocab = model.model.config.vocab_size
    decode, first = decode_run(model, PROMPT, NEW_TOKENS), decode_run(model, random_prompt(FIRST_TOKEN_PROMPT, vocab), 1)
    # The split's step is one pass over JOB_BATCH and the anchor's rows (job_step_run); here as
    # many rows, all of JOB_BATCH's width, of random tokens.
    step = train_run(model, list(model.weights.parameters()), train_ids(vocab, (JOB_ROWS_WITH_ANCHOR, JOB_BATCH[1])))
    for run in (decode, first, step):
        run()  # warm up
    figures = {"decode_tok_s": statistics.median(rate(decode) for _ in range(repeats)),
               "first_token_s": statistics.median(1 / rate(first) for _ in range(repeats)),
               "train_step_s": statistics.median(JOB_BATCH[0] * JOB_BATCH[1] / rate(step) for _ in range(repeats))}
    return figures


def _drafting_figures(device: DeviceProcess, drafting: Drafting, loopback: bool) -> list[dict]:
    rows = []
    for name, prompts in WORKLOADS.items():
        total = len(prompts())
        count = total if loopback else min(drafting.delayed_prompts, total)
        drafted = device.call("workload", name, count, drafting.new_tokens, drafting.draft_tokens)
        row = {"workload": name, "prompts": count, "tokens_per_pass": drafted["tokens_per_pass"],
               "decode_tok_s": drafted["decode_tok_s"]}
        if loopback:  # the same replies without drafting: they must be the same, and how much faster drafting is
            plain = device.call("workload", name, count, drafting.new_tokens, 0)
            row["same_replies"] = sum(a == b for a, b in zip(plain["replies"], drafted["replies"]))
            row["plain_decode_tok_s"] = plain["decode_tok_s"]
            row["vs_plain"] = drafted["decode_tok_s"] / plain["decode_tok_s"]
        rows.append(row)
    return rows


def _device_figures(device: DeviceProcess, repeats: int) -> dict:
    for what in ("decode", "first_token", "job_step"):
        device.call(what)  # warm up: connections, caches, allocator
    steps = [device.call("job_step") for _ in range(repeats)]
    bytes_per_decode_token, _ = device.call("wire")
    return {
        "decode_tok_s": statistics.median(rate(lambda: device.call("decode")) for _ in range(repeats)),
        "first_token_s": statistics.median(1 / rate(lambda: device.call("first_token")) for _ in range(repeats)),
        "train_step_s": statistics.median(seconds for seconds, _ in steps),
        "train_step_bytes": statistics.median(wire for _, wire in steps),
        "decode_token_bytes": bytes_per_decode_token,
        "round_trips_per_pass": device.call("round_trips"),
        "train_tok_s": JOB_BATCH[0] * JOB_BATCH[1] / statistics.median(seconds for seconds, _ in steps),
    }
