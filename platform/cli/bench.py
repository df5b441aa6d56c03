"""`plora bench ...`: each bench prints a table of its figures (or, with --json, its full results
as JSON on stdout) and with --out also writes those results to a file."""

from __future__ import annotations

import json
from pathlib import Path

import click

from plora.platform.bench.adapters import CANDIDATES as ADAPTER_CANDIDATES
from plora.platform.cli.common import adapter_config, adapter_options, fail_cleanly, stop_on_sigterm, wire_options
from plora.platform.cli.output import JSON_HELP, Board, Column, print_json, say, show


@click.group()
def bench() -> None:
    """Benchmarks: a table of figures on stdout (--json: the full results as JSON), --out PATH to keep them."""


def results_options(command):
    """--json and --out, the same on every bench."""
    command = click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
                           help="Also write the full results to this JSON file.")(command)
    return click.option("--json", "as_json", is_flag=True, help=f"{JSON_HELP} The full results, as --out writes them.")(command)


def _keep(document: dict, out_path: Path | None) -> None:
    if out_path:
        out_path.write_text(json.dumps(document, indent=2))
        say(f"wrote {out_path}")


def _detail(row: dict) -> str:
    return ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row["detail"].items())


SPLIT_COLUMNS = (
    Column("figure", lambda row: f"{row['figure']} ({row['unit']})"), Column("monolithic", "monolithic", ".1f"),
    Column("split", "split", ".1f"), Column("ratio", "ratio", ".3f"), Column("target", lambda row: f">= {row['target']}"),
)
SERVE_COLUMNS = (Column("figure", "figure"), Column("value", "value", ".3f"), Column("target", "target"), Column("detail", _detail))
MIGRATE_COLUMNS = (
    Column("upgrade", "upgrade"), Column("model", "model"), Column("recall", "recall", ".0%"),
    Column("held-out loss", "heldout_loss", ".3f"), Column("gain kept (loss)", "loss_gain_kept", ".0%"),
    Column("gain kept (recall)", "recall_gain_kept", ".0%"),
    Column("as the migration measured it", lambda row: row.get("gain_kept_measured"), ".0%"),
)
PERSONA_COLUMNS = (
    Column("persona", "persona"), Column("anchor seed", "anchor_seed"),
    Column("recall before", lambda row: row["before"]["recall"], ".0%"),
    Column("after", lambda row: row["after"]["recall"], ".0%"),
    Column("generic NLL before", lambda row: row["before"]["generic_nll"], ".3f"),
    Column("after", lambda row: row["after"]["generic_nll"], ".3f"), Column("change", "generic_nll_change", "+.1%"),
    Column("on the device's probe", "device_drift", "+.1%"), Column("anchor weight at the end", "anchor_weight", ".3g"),
    Column("without the anchor: recall", lambda row: row.get("without_anchor", {}).get("after", {}).get("recall"), ".0%"),
    Column("change", lambda row: row.get("without_anchor", {}).get("generic_nll_change"), "+.1%"),
)
WAN_COLUMNS = (
    Column("link", "link"), Column("decode tok/s", "decode_tok_s", ".2f"), Column("÷ monolithic", "decode_vs_monolithic", ".3f"),
    Column("÷ one-pass bound", "decode_vs_bound", ".2f"), Column("first token (s)", "first_token_s", ".2f"),
    Column("training step (s)", "train_step_s", ".2f"), Column("÷ loopback", "train_vs_loopback", ".2f"),
    Column("KB per step", lambda row: row["train_step_bytes"] / 1e3, ".0f"),
    Column("KB per token", lambda row: row["decode_token_bytes"] / 1e3, ".1f"),
)
DRAFTING_COLUMNS = (
    Column("link", "link"), Column("workload", "workload"), Column("prompts", "prompts"),
    Column("tokens per pass", "tokens_per_pass", ".2f"), Column("decode tok/s", "decode_tok_s", ".2f"),
    Column("÷ one-pass bound", "decode_vs_bound", ".2f"), Column("÷ no drafting", "vs_plain", ".2f"),
    Column("same replies", lambda row: f"{row['same_replies']}/{row['prompts']}" if "same_replies" in row else None),
)
FLEET_WAN_COLUMNS = (
    Column("link", "link"), Column("one alone (tok/s)", "alone_tok_s", ".2f"), Column("all at once (tok/s)", "fleet_tok_s", ".1f"),
    Column("÷ clients × one alone", "vs_alone", ".2f"), Column("this machine's ceiling", "ceiling", ".2f"),
    Column("CPU s per token, every process", "cpu_s_per_token", ".3f"),
)
WIRE_COLUMNS = (
    Column("persona", "persona"), Column("wire", "wire"), Column("recall", "recall", ".0%"),
    Column("held-out loss", "heldout_loss", ".4f"), Column("÷ float32's", lambda row: row.get("heldout_loss_vs_float32"), "+.2%"),
    Column("max Δ log-prob (nats)", "max_logprob_change", ".4f"), Column("mean", "mean_logprob_change", ".5f"),
    Column("steps", "steps"), Column("rate", "lr", "g"), Column("job's MB on the wire", lambda row: row["job_wire_bytes"] / 1e6, ".0f"),
)
FLEET_COLUMNS = (Column("figure", "figure"), Column("value", "value", ".3f"), Column("target", "target"), Column("detail", "detail"))
SPEAKER_COLUMNS = (
    Column("speaker", "speaker"), Column("anchor seed", "anchor_seed"), Column("blocks", "train_blocks"),
    Column("plora gain (nats)", lambda row: row["privatelora"]["gain"], ".3f"),
    Column("LoRA gain", lambda row: row["lora"]["gain"], ".3f"), Column("gain ratio", "gain_ratio", ".0%"),
    Column("generic NLL, plora", lambda row: row["privatelora"]["generic_change"], "+.1%"),
    Column("on its probe", lambda row: row["privatelora"]["device_drift"], "+.1%"),
    Column("anchor weight at the end", lambda row: row["privatelora"]["anchor_weight"], ".3g"),
    Column("LoRA", lambda row: row["lora"]["generic_change"], "+.1%"),
    Column("rate, plora", lambda row: row["privatelora"]["lr"], "g"), Column("LoRA", lambda row: row["lora"]["lr"], "g"),
    Column("parameters, of LoRA's", "param_ratio", ".1%"),
)
SPREAD_COLUMNS = (
    Column("anchor seed", "anchor_seed"), Column("personas", "personas"), Column("recall: mean", "recall_mean", ".0%"),
    Column("lowest", "recall_lowest", ".0%"), Column("generic NLL, worst", "persona_generic_worst", "+.1%"),
    Column("speakers", "speakers"), Column("gain ÷ LoRA's: mean", "gain_ratio_mean", ".0%"),
    Column("lowest", "gain_ratio_lowest", ".0%"), Column("generic NLL within 2%", "speakers_within_limit"),
)


@bench.command("split")
@results_options
@click.option("--backbone", "spec", default="embedded", show_default=True)
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1), help="Timed repeats per figure; the median counts.")
@fail_cleanly
@stop_on_sigterm
def bench_split(as_json, out_path, spec, repeats) -> None:
    """Monolithic vs in-process split: forward tokens/s, a training step, greedy decode tokens/s."""
    from plora.platform.bench.split import run_split_bench

    results = run_split_bench(spec, repeats, echo=say)
    _keep(results.to_json(), out_path)
    show(results.rows(), SPLIT_COLUMNS, as_json, document=results.to_json())


@bench.command("serve")
@results_options
@click.option("--backbone", "spec", default="embedded", show_default=True)
@click.option("--devices", default=16, show_default=True, type=click.IntRange(min=1), help="Size of the concurrent fleet.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Timed repeats per figure; the median counts.")
@fail_cleanly
@stop_on_sigterm
def bench_serve(as_json, out_path, spec, devices, repeats) -> None:
    """The service over gRPC loopback: single and fleet decode, wire bytes, and training, as ratios."""
    from plora.platform.bench.serve import run_serve_bench

    results = run_serve_bench(spec, devices, repeats, echo=say)
    _keep(results.to_json(), out_path)
    show(results.rows(), SERVE_COLUMNS, as_json, document=results.to_json())


@bench.command("migrate")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder holding gsm8k/train.jsonl, the public data the derived version is fine-tuned on (e.g. ../shared/data).")
@click.option("--persona", default=0, show_default=True, help="Seed of the synthetic persona the device personalizes on.")
@click.option("--derive-steps", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--distill-steps", default=40, show_default=True, type=click.IntRange(min=1))
@click.option("--upgrade", "upgrades", multiple=True, type=click.Choice(["derived", "fresh-seed", "fleet"]),
              help="Measure this upgrade (repeatable) [default: all]: one device moved to a derived decoder "
                   "(derived) or to fresh projections (fresh-seed), or a fleet moved to fresh projections by its "
                   "operator (fleet).")
@click.option("--fleet-devices", default=4, show_default=True, type=click.IntRange(min=1),
              help="Persona devices of that fleet, personalized by `plora fleet launch` and moved by `plora migrate --root`.")
@click.option("--fleet-rounds", default=3, show_default=True, type=click.IntRange(min=1),
              help="Personalization rounds of that fleet, each of the fleet's default steps.")
@results_options
@fail_cleanly
@stop_on_sigterm
def bench_migrate(data_dir, persona, derive_steps, distill_steps, upgrades, fleet_devices, fleet_rounds, as_json, out_path) -> None:
    """Personalization kept across backbone upgrades: v1 + M against v2 with no, copied, distilled and retrained M;
    then a fleet's devices after an operator's fleet-wide `plora migrate`."""
    from plora.clients.migration import DistillSettings
    from plora.platform.bench.migrate import UPGRADES, run_migrate_bench

    results = run_migrate_bench(data_dir, persona, say, derive_steps, DistillSettings(steps=distill_steps),
                                upgrades or UPGRADES, fleet_devices, fleet_rounds)
    _keep(results.to_json(), out_path)
    show(results.rows, MIGRATE_COLUMNS, as_json, document=results.to_json())


@bench.command("quality")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder holding gsm8k/dev.jsonl and tinyshakespeare/input.txt (e.g. ../shared/data).")
@click.option("--personas", default=4, show_default=True, type=click.IntRange(min=0))
@click.option("--unanchored/--no-unanchored", default=True, show_default=True,
              help="Also run each persona's job without the anchor, on another new device, for comparison; "
                   "it doubles the personas' time.")
@click.option("--speakers", default=8, show_default=True, type=click.IntRange(min=0),
              help="Shakespeare speakers, spread over the sizes of those with 15 blocks or more, each compared with "
                   "PEFT LoRA.")
@click.option("--max-blocks", type=click.IntRange(min=15), help="The largest speaker to pick, in blocks [default: any].")
@click.option("--speaker", "names", multiple=True, metavar="NAME",
              help="Measure this speaker (repeatable; as the play names them, e.g. DERBY) instead of a spread.")
@click.option("--anchor-seed", "anchor_seeds", multiple=True, default=(0,), show_default=True, type=click.IntRange(min=0),
              help="Run every plora job once per sample of anchor and probe text its device's base model writes "
                   "(repeatable; 0 is the one every device writes): how much the figures hang on the sample. LoRA, "
                   "which has no anchor, runs once per speaker.")
# 0.02 is clients.anchor.AnchorSettings.drift_budget, which the CLI must not import (it imports torch).
@click.option("--drift-budget", default=0.02, show_default=True, type=click.FloatRange(min=0),
              help="The jobs' drift budget, as `plora personalize --drift-budget` (0: the anchor keeps weight 3).")
@results_options
@fail_cleanly
@stop_on_sigterm
def bench_quality(data_dir, personas, unanchored, speakers, max_blocks, names, anchor_seeds, drift_budget, as_json,
                  out_path) -> None:
    """Persona recall and generic-text loss after plora's default job (`plora personalize` as a
    user runs it), with and without its anchor; per speaker, the held-out gain of the default
    job against PEFT LoRA (r=16, q/k/v) under the same validation split, rate search, early
    stopping and budget; then, per anchor text seed and over all, the means and the worst.

    On the embedded backbone and 2 cores, about 5 minutes per persona job and 5 to 15 per speaker's
    jobs and LoRA's."""
    from plora.platform.bench import quality

    seeds, budget = list(dict.fromkeys(anchor_seeds)), drift_budget or None
    persona_rows = quality.personas(data_dir, personas, say, compare=unanchored, anchor_seeds=seeds, drift_budget=budget)
    speaker_rows = quality.speakers(data_dir, speakers, say, max_blocks=max_blocks, names=list(names), anchor_seeds=seeds,
                                    drift_budget=budget)
    results = {"settings": {"anchor_seeds": seeds, "drift_budget": budget}, "personas": persona_rows,
               "speakers": speaker_rows, "spread": quality.spread(persona_rows, speaker_rows)}
    _keep(results, out_path)
    if as_json:
        print_json(results)
        return
    if persona_rows:
        show(persona_rows, PERSONA_COLUMNS, False, title="Persona facts: held-out recall and generic-text NLL")
    if speaker_rows:
        show(speaker_rows, SPEAKER_COLUMNS, False,
             title="Shakespeare speakers: held-out NLL gain, plora's default job against PEFT LoRA")
    if results["spread"]:
        show(results["spread"], SPREAD_COLUMNS, False, title="Per sample of anchor text, and over all: means and the worst")


ADAPTER_COLUMNS = (
    Column("configuration", "config"), Column("round trips per pass", "round_trips"),
    Column("their time at 20 ms RTT (s)", lambda row: row["round_trips"] * 0.020, ".2f"),
    Column("parameters", lambda row: f"{row['params']:,}"), Column("persona recall", "recall", ".0%"),
    Column("generic NLL", "persona_generic_change", "+.1%"), Column("speakers' gain (nats)", "speaker_gain", ".3f"),
    Column("of the first's", "gain_vs_first", ".0%"), Column("generic NLL", "speaker_generic_change", "+.1%"),
    Column("minutes", lambda row: row["seconds"] / 60, ".1f"),
)


@bench.command("adapters")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder holding gsm8k/dev.jsonl and tinyshakespeare/input.txt (e.g. ../shared/data).")
@click.option("--config", "configs", multiple=True, type=click.Choice(list(ADAPTER_CANDIDATES)),
              default=tuple(ADAPTER_CANDIDATES), show_default=True,
              help="A configuration to measure (repeatable), in the table's order: every layer adapted (the default), "
                   "every other, the last half, every third, the last third, every layer at rank 16, or every layer with A and B "
                   "from each weight's principal singular vectors (--projections principal).")
@click.option("--personas", default=1, show_default=True, type=click.IntRange(min=0), help="Personas per configuration.")
@click.option("--speakers", default=2, show_default=True, type=click.IntRange(min=0),
              help="Shakespeare speakers per configuration, spread over the sizes of those with 15 to --max-blocks blocks.")
@click.option("--max-blocks", default=60, show_default=True, type=click.IntRange(min=15),
              help="The largest speaker to pick, in blocks: larger ones make each job longer.")
@click.option("--backbone", default="embedded", show_default=True, help="The backbone to personalize on.")
@results_options
@fail_cleanly
@stop_on_sigterm
def bench_adapters(data_dir, configs, personas, speakers, max_blocks, backbone, as_json, out_path) -> None:
    """Quality per round trip and per parameter: for each adapter configuration, fresh devices
    bound to it run `plora personalize`'s default job on personas and on Shakespeare speakers;
    persona recall, held-out gain and generic-text loss, against the round trips a
    pass costs and the parameters M holds. Each adapted cloud layer costs a round trip per pass,
    so over a slow link fewer layers decode faster; this says what they cost in quality.

    With the defaults, on the embedded backbone and 2 cores: about 10 minutes per configuration."""
    from plora.platform.bench.adapters import adapters

    rows = adapters(data_dir, list(configs), personas, speakers, say, backbone, max_blocks)
    _keep({"configurations": rows}, out_path)
    show(rows, ADAPTER_COLUMNS, as_json, document={"configurations": rows},
         title="Adapter configurations: quality per round trip and per parameter")


@bench.command("federated")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder holding tinyshakespeare/input.txt (the speakers are the users).")
@click.option("--federation", default=16, show_default=True, type=click.IntRange(min=3),
              help="Speakers in the federation: the play's largest, one device each.")
@click.option("--new-speakers", default=8, show_default=True, type=click.IntRange(min=1),
              help="Speakers never in the federation who personalize on a few blocks.")
@click.option("--size", "sizes", multiple=True, default=(5, 10, 20), show_default=True, type=click.IntRange(min=1),
              help="Blocks a new speaker personalizes on (repeatable); the targets are set at 10. New speakers are "
                   "drawn among those with enough blocks for the largest size and a fifth more held out: 75 for 60.")
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(min=1),
              help="Draws of the 10 blocks each new speaker personalizes on (other sizes: one draw).")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(min=1), help="Federated rounds.")
@click.option("--steps", default=8, show_default=True, type=click.IntRange(min=1), help="Training steps per device per round.")
@click.option("--dp-noise", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="A second federation under DP with this noise multiplier (0: none); new speakers start from it on 10 blocks, first draw.")
@click.option("--backbone", default="embedded", show_default=True, help="The backbone to serve and personalize on.")
@results_options
@fail_cleanly
@stop_on_sigterm
def bench_federated(data_dir, federation, new_speakers, sizes, seeds, rounds, steps, dp_noise, backbone, as_json,
                    out_path) -> None:
    """What the fleet's starting M gives new users with little data: a federation of Shakespeare
    speakers learns M₀ under SecAgg+ (`plora fleet launch --strategy fedavg`), then new speakers
    personalize on 5, 10 or 20 blocks (`plora personalize`, from zero and --from-fleet); held-out
    NLL gains, the bytes each device sent per round, epsilon under DP and the run time.

    With the defaults (2 rounds of 8 steps, chosen for the time), on the embedded backbone and
    2 cores: 75 minutes, a federation taking 11 of them."""
    from plora.platform.bench.federated import run_federated_bench

    with Board("a federation, then new users with little data") as board:
        results = run_federated_bench(data_dir, federation, new_speakers, sorted(set(sizes)), seeds, rounds, steps,
                                      dp_noise, backbone, echo=board.say, on_progress=board.update)
    _keep(results.to_json(), out_path)
    show(results.figures, FLEET_COLUMNS, as_json, document=results.to_json())


@bench.command("fleet")
@click.option("--small", default=100, show_default=True, type=click.IntRange(min=1), help="Devices of the smaller fleet.")
@click.option("--large", default=1000, show_default=True, type=click.IntRange(min=2), help="Devices of the larger fleet.")
@click.option("--sampled", default=10, show_default=True, type=click.IntRange(min=1), help="Devices each fleet samples for its round.")
@click.option("--steps", default=5, show_default=True, type=click.IntRange(min=1), help="Training steps per sampled device.")
@click.option("--backbone", help="A local backbone to serve for the runs (default: the embedded one).")
@results_options
@fail_cleanly
@stop_on_sigterm
def bench_fleet(small, large, sampled, steps, backbone, as_json, out_path) -> None:
    """What a simulated fleet costs as it grows: `plora fleet launch` from nothing for a small and
    a large fleet sampling the same devices for one round; disk, wall time and peak memory.

    Takes about twice as long as one such fleet launch: on 2 cores, some 10 minutes each on the
    embedded backbone with the defaults."""
    from plora.platform.bench.fleet import run_fleet_bench

    if not sampled <= small < large:
        raise click.UsageError(f"need --sampled <= --small < --large, got {sampled}, {small}, {large}")
    with Board("fleets of growing size") as board:
        results = run_fleet_bench(small, large, sampled, steps, backbone, echo=board.say, on_progress=board.update)
    _keep(results.to_json(), out_path)
    show(results.figures, FLEET_COLUMNS, as_json, document=results.to_json())


@bench.command("wan")
@click.option("--backbone", "spec", default="embedded", show_default=True)
@click.option("--rtt", "rtts", default="5,20,50", show_default=True,
              help="Round-trip times to emulate, in ms, comma-separated; loopback (0) is always measured too.")
@click.option("--mbit", default=100.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Each emulated link's bandwidth, each way, in Mbit/s.")
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1), help="Timed repeats per figure; the median counts.")
@click.option("--draft-tokens", default=8, show_default=True, type=click.IntRange(min=1),
              help="Tokens guessed ahead per pass when decoding the workloads.")
@click.option("--reply-tokens", default=48, show_default=True, type=click.IntRange(min=2),
              help="Tokens per workload reply, at most.")
@click.option("--delayed-prompts", default=6, show_default=True, type=click.IntRange(min=1),
              help="Prompts of each workload decoded over each delayed link (loopback decodes them all).")
@click.option("--fleet", default=16, show_default=True, type=click.IntRange(min=0),
              help="Replay clients decoding at once over each delayed link, each on a link of its own, against one "
                   "alone: the cloud's throughput. 0: none.")
@wire_options
@adapter_options
@results_options
@fail_cleanly
@stop_on_sigterm
def bench_wan(spec, rtts, mbit, repeats, draft_tokens, reply_tokens, delayed_prompts, fleet, wire, as_json, out_path,
              **adapter) -> None:
    """The split over emulated network links: decode tokens/s, time to first token, training steps,
    and decoding with drafts on a grounded and an open workload.

    The service and the device run in processes of their own, a relay on loopback between them
    delaying and pacing the bytes (these machines have no netem); every figure over a delayed
    link is emulated. The monolithic model's figures come from the same run. The
    adapter options measure another configuration than the default, such as decoder layers on
    the device (--device-layers, --device-last-layers), which the cloud then asks no round trip for.
    Over each delayed link, --fleet replay clients (devices, each in a process of its own, that only
    answer u·M: no device layers, no LM head) decode at once against one alone, with this machine's
    ceiling on that ratio."""
    from plora.cloud_backbone.protocol.wire import WireDtypes
    from plora.platform.bench.wan import Drafting, run_wan_bench

    try:
        rtt_ms = [float(value) for value in rtts.split(",") if value.strip()]
    except ValueError:
        raise click.BadParameter(f"{rtts!r} is not a comma-separated list of milliseconds", param_hint="--rtt") from None
    if any(value < 0 for value in rtt_ms):
        raise click.BadParameter("round-trip times must be >= 0 ms", param_hint="--rtt")
    config = adapter_config(**adapter)
    results = run_wan_bench(spec, rtt_ms, mbit, repeats, Drafting(draft_tokens, reply_tokens, delayed_prompts), echo=say,
                            wire_dtypes=WireDtypes.named(*wire), config=config, fleet=fleet)
    _keep(results.to_json(), out_path)
    mono = results.monolithic
    show(results.links, WAN_COLUMNS, as_json, document=results.to_json(),
         title=f"{spec}, r = {config.rank} on {','.join(config.targets)}, {config.device_layers} first and "
               f"{config.device_last_layers} last layers on the device, one device, {results.wire}; "
               f"monolithic on this machine: {mono['decode_tok_s']:.2f} "
               f"decoded tokens/s, first token {mono['first_token_s']:.2f} s, training step {mono['train_step_s']:.2f} s")
    if not as_json:
        show(results.drafting, DRAFTING_COLUMNS, False,
             title=f"greedy decoding with up to {draft_tokens} tokens guessed per pass by prompt lookup, {reply_tokens}-token replies")
        if results.fleets:
            show(results.fleets, FLEET_WAN_COLUMNS, False,
                 title=f"the cloud's throughput: {fleet} replay clients decoding at once, each over its own emulated link")


@bench.command("wire")
@click.option("--personas", default=2, show_default=True, type=click.IntRange(min=1),
              help="Synthetic personas, each personalized once per wire, on a device of its own.")
@click.option("--wire", "wires", multiple=True, default=["float16,float32"], show_default=True, metavar="EXCHANGES,CUT",
              help="A wire to measure against float32 (repeatable): the dtypes of the exchanges (u, u·M and their "
                   "gradients) and of the cut, among float32, bfloat16 and float16.")
@results_options
@fail_cleanly
@stop_on_sigterm
def bench_wire(personas, wires, as_json, out_path) -> None:
    """What a cheaper wire costs a personalization, on the embedded backbone served in a process
    of its own: per persona, `plora personalize`'s default job once per wire, float32 included,
    each on a new device; held-out recall and loss over that wire, and how far the wire moves a
    token's log-probability, with the job's M, on the WAN bench's workload prompts. About 6
    minutes a job on 2 cores."""
    from plora.cloud_backbone.protocol.wire import WIRE_DTYPES, WireDtypes
    from plora.platform.bench.wire import run_wire_bench

    chosen = []
    for value in wires:
        names = [name.strip() for name in value.split(",")]
        if len(names) != 2 or any(name not in WIRE_DTYPES for name in names):
            raise click.BadParameter(f"{value!r} is not EXCHANGES,CUT with each one of {', '.join(WIRE_DTYPES)}",
                                     param_hint="--wire")
        chosen.append(WireDtypes.named(*names))
    with Board("personalizing over each wire") as board:
        rows = run_wire_bench(personas, chosen, board.say)
    _keep({"rows": rows}, out_path)
    show(rows, WIRE_COLUMNS, as_json, document={"rows": rows})
