"""The `plora` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from plora.platform.cli.backbone import backbone, migrate
from plora.platform.cli.common import adapter_config, adapter_options, db_option, fail_cleanly, stop_on_sigterm

log = logging.getLogger("plora")


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """plora: a private, personalized LLM on a shared cloud backbone (PrivateLoRA).

    The cloud runs the frozen decoder; your device keeps the tokenizer, embeddings, LM head
    and the small private matrices M that make the model yours. Text, M and M's gradients
    never leave the device.
    """
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


main.add_command(backbone)
main.add_command(migrate)


@main.group()
def device() -> None:
    """Create and inspect personal devices."""


@device.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--backbone",
    default="embedded",
    show_default=True,
    help="'embedded' (SmolLM2-135M-Instruct, cloud half in this process), a local checkpoint folder or .gguf file, "
    "or HOST:PORT of a backbone service.",
)
@click.option("--insecure", is_flag=True, help="Talk to the service in plain text (loopback only).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), help="CA certificate to trust for the service.")
@click.option("--label", default="", help="A label for this device in the service's registry.")
@click.option("--enroll-token", envvar="PLORA_ENROLL_TOKEN", default="",
              help="The enrollment token the service's operator gave you (or set $PLORA_ENROLL_TOKEN).")
@adapter_options
@click.pass_context
@fail_cleanly
def device_init(ctx, directory: Path, backbone: str, insecure: bool, tls_ca: str | None, label: str, enroll_token: str,
                **adapter) -> None:
    """Create a device in DIRECTORY bound to a backbone, with M = 0 (exactly the base model).

    With HOST:PORT the device enrolls with the service using an enrollment token from its
    operator, receives its credential and downloads the device bundle (tokenizer,
    embeddings, device layers, norm, LM head), verifying its hash. The service fixes the
    adapter configuration.
    """
    from plora.clients.grpc_link import Endpoint
    from plora.platform.jobs import register
    from plora.storage.registry import open_registry
    from plora.platform.runtime import init_device, is_address

    chosen = any(ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE for name in adapter)
    config = adapter_config(**adapter) if chosen or not is_address(backbone) else None
    ca_file = str(Path(tls_ca).resolve()) if tls_ca else None  # later commands may run from elsewhere
    endpoint = Endpoint(backbone, insecure, ca_file) if is_address(backbone) else None
    if enroll_token and endpoint is None:
        raise click.UsageError("--enroll-token is for enrolling with a backbone service (--backbone HOST:PORT)")
    store = init_device(directory, backbone, config, endpoint, label, enroll_token)
    if endpoint is None:
        register(store.record, open_registry())
    record = store.record
    click.echo(f"device {record.device_id} created in {directory}")
    click.echo(f"backbone {record.backbone_name} ({record.backbone_hash[:12]}), {record.num_layers} layers; {record.adapter}")


@device.command("forget")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (for scripts).")
@click.option("--backbone", "address", help="HOST:PORT of the device's service, if it has moved.")
@fail_cleanly
def device_forget(directory: Path, yes: bool, address: str | None) -> None:
    """Remove this device from its service and delete DIRECTORY.

    The service deletes everything it keeps about the device: its registry rows, its jobs and
    its credential. Then the folder goes, with the adapter and any private data in it. If the
    service cannot be reached, nothing is deleted.
    """
    from plora.clients.device_store import DeviceStore
    from plora.storage.registry import open_registry
    from plora.platform.runtime import forget_device, is_address

    record = DeviceStore.open(directory, midway=True).record
    where = f"the service at {address or record.backbone_spec}" if is_address(record.backbone_spec) else "the local registry"
    if not yes:
        click.confirm(f"Forget device {record.device_id}: remove it from {where} and delete {directory} with its adapter "
                      "and everything else in it?", abort=True)
    removed = forget_device(directory, open_registry(), address)
    records = ", ".join(f"{count} {kind}" for kind, count in sorted(removed.items())) or "no records"
    click.echo(f"device {record.device_id} forgotten: {records} deleted from {where}; {directory} deleted")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL with 'text' or 'prompt'+'response' per line, a CSV with those columns, or a .txt file.")
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps to run.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), help="Passes over the data (default 2).")
@click.option("--lr", default=5e-3, show_default=True, help="AdamW learning rate for M.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--max-length", default=256, show_default=True, type=click.IntRange(min=2), help="Tokens per example.")
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 0.5),
              help="Share of examples held out to pick the best M (used when there are at least 10 examples).")
@click.option("--seed", default=0, show_default=True)
@click.option("--checkpoint-every", default=10, show_default=True, type=click.IntRange(min=1),
              help="Steps between checkpoints, from which a killed or failed job resumes when run again.")
@fail_cleanly
def personalize(directory, data_path, steps, epochs, lr, batch_size, max_length, val_fraction, seed, checkpoint_every) -> None:
    """Train this device's M on local data. Nothing of the data leaves the device."""
    from tqdm import tqdm

    from plora.clients.training import TrainSettings
    from plora.platform.jobs import run_personalization
    from plora.platform.runtime import open_device

    if steps is not None and epochs is not None:
        raise click.UsageError("give --steps or --epochs, not both")
    settings = TrainSettings(lr=lr, batch_size=batch_size, steps=steps, epochs=epochs, seed=seed)
    dev = open_device(directory)
    with tqdm(desc="personalizing", unit="step", file=sys.stderr) as bar:
        def progress(step, total, loss):
            bar.total = total
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

        outcome = run_personalization(dev, data_path, settings, max_length, val_fraction, progress, checkpoint_every=checkpoint_every)
    result = outcome.result
    click.echo(f"job {outcome.job_id}: {result.steps} steps, {result.tokens_per_second:.0f} tokens/s; "
               f"training loss {result.first_loss:.3f} -> {result.last_loss:.3f}")
    which = "validation" if result.val_before is not None else "training-set"
    click.echo(f"{which} loss {outcome.loss_before:.3f} -> {outcome.loss_after:.3f}")
    click.echo(f"adapter saved to {dev.store.adapter_path}")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("prompt")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", type=int, help="Seed for sampling.")
@click.option("--raw", is_flag=True, help="Do not wrap the prompt in the backbone's chat template.")
@fail_cleanly
def generate(directory, prompt, max_new_tokens, temperature, top_p, seed, raw) -> None:
    """Generate a reply with the personalized model, streaming it as it comes."""
    from plora.clients.generation import encode_prompt, stream_tokens
    from plora.platform.runtime import open_device

    dev = open_device(directory)
    ids = encode_prompt(dev.tokenizer, prompt, chat=not raw)
    new: list[int] = []
    shown = ""
    for token in stream_tokens(dev.model, ids, max_new_tokens, {dev.tokenizer.eos_token_id}, temperature, top_p, seed):
        new.append(token)
        text = dev.tokenizer.decode(new, skip_special_tokens=True)
        click.echo(text[len(shown):], nl=False)
        shown = text
    click.echo()


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--text", required=True, help="The text to score.")
@click.option("--json", "as_json", is_flag=True, help="Print {\"tokens\": [...], \"logprobs\": [...]} as JSON.")
@fail_cleanly
def score(directory, text, as_json) -> None:
    """Log-probability of each token of TEXT given the ones before it, under the personalized model."""
    from plora.clients.generation import token_logprobs
    from plora.platform.runtime import open_device

    dev = open_device(directory)
    tokens = dev.tokenizer(text)["input_ids"]
    logprobs = token_logprobs(dev.model, tokens)
    if as_json:
        click.echo(json.dumps({"tokens": tokens, "logprobs": logprobs}))
    else:
        click.echo(f"{len(tokens)} tokens, mean log-prob {sum(logprobs) / len(logprobs):.4f}")


@main.group()
def jobs() -> None:
    """Personalization and migration jobs recorded in the registry."""


@jobs.command("list")
@click.option("--device", "device_id", help="Only this device's jobs.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1))
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
@fail_cleanly
def jobs_list(device_id, limit, db, as_json) -> None:
    """The newest jobs first: device, status, steps, tokens and metrics before and after."""
    from plora.storage.registry import open_registry

    found = open_registry(db).list_jobs(device_id, limit)
    if as_json:
        for job in found:
            fields = ("id", "device_id", "kind", "status", "steps_done", "tokens_processed", "metrics_before", "metrics_after", "reason")
            record = {f: getattr(job, f) for f in fields}
            record["started_at"] = job.started_at.isoformat() if job.started_at else None
            record["ended_at"] = job.ended_at.isoformat() if job.ended_at else None
            click.echo(json.dumps(record))
        return
    click.echo(f"{'job':>5} {'device':<12} {'kind':<11} {'status':<11} {'steps':>6} {'tokens':>8}  before -> after")
    for job in found:
        before = ", ".join(f"{k}={v:.3g}" for k, v in (job.metrics_before or {}).items() if isinstance(v, float))
        after = ", ".join(f"{k}={v:.3g}" for k, v in (job.metrics_after or {}).items() if isinstance(v, float))
        note = f"{before} -> {after}" if job.status == "succeeded" else (job.reason or "")
        click.echo(f"{job.id:>5} {job.device_id[:12]:<12} {job.kind:<11} {job.status:<11} {job.steps_done:>6} {job.tokens_processed:>8}  {note}")


@main.group()
def bench() -> None:
    """Benchmarks: print a table and write JSON."""


@bench.command("split")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the results here too.")
@click.option("--backbone", "spec", default="embedded", show_default=True)
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1), help="Timed repeats per figure; the median counts.")
@fail_cleanly
def bench_split(json_path, spec, repeats) -> None:
    """Monolithic vs in-process split: forward tokens/s, a training step, greedy decode tokens/s."""
    from plora.platform.bench.split import run_split_bench

    results = run_split_bench(spec, repeats, echo=lambda line: click.echo(line, err=True))
    click.echo(results.table())
    if json_path:
        json_path.write_text(json.dumps(results.to_json(), indent=2))
        click.echo(f"wrote {json_path}")


@bench.command("serve")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the results here too.")
@click.option("--backbone", "spec", default="embedded", show_default=True)
@click.option("--devices", default=16, show_default=True, type=click.IntRange(min=1), help="Size of the concurrent fleet.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Timed repeats per figure; the median counts.")
@fail_cleanly
def bench_serve(json_path, spec, devices, repeats) -> None:
    """The service over gRPC loopback: single and fleet decode, wire bytes, and training, as ratios."""
    from plora.platform.bench.serve import run_serve_bench

    results = run_serve_bench(spec, devices, repeats, echo=lambda line: click.echo(line, err=True))
    click.echo(results.table())
    if json_path:
        json_path.write_text(json.dumps(results.to_json(), indent=2))
        click.echo(f"wrote {json_path}")


@bench.command("migrate")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder holding gsm8k/train.jsonl, the public data the derived version is fine-tuned on (e.g. ../shared/data).")
@click.option("--persona", default=0, show_default=True, help="Seed of the synthetic persona the device personalizes on.")
@click.option("--derive-steps", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--distill-steps", default=40, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the results here too.")
@fail_cleanly
def bench_migrate(data_dir, persona, derive_steps, distill_steps, json_path) -> None:
    """Personalization kept across backbone upgrades: v1 + M against v2 with no, copied, distilled and retrained M."""
    from plora.clients.migration import DistillSettings
    from plora.platform.bench.migrate import run_migrate_bench

    results = run_migrate_bench(data_dir, persona, lambda line: click.echo(line, err=True), derive_steps,
                                DistillSettings(steps=distill_steps))
    click.echo(results.table())
    if json_path:
        json_path.write_text(json.dumps(results.to_json(), indent=2))
        click.echo(f"wrote {json_path}")


@bench.command("quality")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder holding gsm8k/dev.jsonl and tinyshakespeare/input.txt (e.g. ../shared/data).")
@click.option("--personas", default=2, show_default=True, type=click.IntRange(min=0))
@click.option("--speakers", default=2, show_default=True, type=click.IntRange(min=0))
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the results here too.")
@fail_cleanly
def bench_quality(data_dir, personas, speakers, json_path) -> None:
    """Persona recall and generic-text loss; per-speaker gain of PrivateLoRA against PEFT LoRA."""
    from plora.platform.bench import quality

    echo = lambda line: click.echo(line, err=True)  # noqa: E731
    results = {"personas": quality.personas(data_dir, personas, echo), "speakers": quality.speakers(data_dir, speakers, echo)}
    for row in results["personas"]:
        click.echo(f"persona {row['persona']}: recall {row['before']['recall']:.0%} -> {row['after']['recall']:.0%}; "
                   f"generic NLL change {row['generic_nll_change']:+.1%}")
    for row in results["speakers"]:
        click.echo(f"speaker {row['speaker']}: PrivateLoRA gain {row['privatelora']['gain']:.3f} nats, "
                   f"LoRA {row['lora']['gain']:.3f}; ratio {row['gain_ratio']:.0%} at {row['param_ratio']:.1%} of the parameters")
    if json_path:
        json_path.write_text(json.dumps(results, indent=2))
        click.echo(f"wrote {json_path}")


@main.command()
@click.option("--out", default="plora-demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the fleet's devices, the report (report.md, report.html, before_after.png) and results.json.")
@click.option("--devices", default=None, type=click.IntRange(min=1), help="Devices in the fleet (default: the demo's pinned 2).")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="Training steps per device (default: the demo's pinned 60).")
@fail_cleanly
@stop_on_sigterm
def demo(out, devices, steps) -> None:
    """The main job: a small fleet personalizes on the embedded backbone, before and after.

    Starts a backbone service on loopback, gives each device a synthetic persona of private
    facts, trains every device's M through the service, and reports held-out recall and loss,
    with each device's answers before and after. `make demo`, install included, fits in 10
    minutes on 2 CPU cores with the demo's pinned settings (see the README).
    """
    from plora.platform.fleet.demo import DEVICES, run_demo

    run_demo(out, click.echo, steps=steps, devices=devices or DEVICES)


@main.group()
def fleet() -> None:
    """A fleet of devices personalized in rounds, orchestrated by Flower."""


@fleet.command("launch")
@click.option("--devices", default=3, show_default=True, type=click.IntRange(min=1), help="Devices in the fleet.")
@click.option("--data", default="personas", show_default=True,
              help="'personas' (a synthetic persona per device) or a JSONL file dealt out among the devices.")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--backbone", help="HOST:PORT of a backbone service on loopback, or a local backbone to serve for the run "
              "(default: the embedded one).")
@click.option("--engine", default="simulation", show_default=True, type=click.Choice(["simulation", "deployment"]),
              help="simulation: every device in this machine's Ray workers; deployment: a Flower SuperLink and one "
              "SuperNode per device on loopback, their logs under ROOT/flower/logs.")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1), help="Training steps per device per round.")
@click.option("--lr", default=1e-2, show_default=True, help="AdamW learning rate for M.")
@click.option("--fraction", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Share of the devices sampled each round.")
@click.option("--root", default="plora-fleet", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the devices (one sub-folder each) and rounds.jsonl.")
@fail_cleanly
@stop_on_sigterm
def fleet_launch(devices, data, rounds, backbone, engine, steps, lr, fraction, root) -> None:
    """Personalize a fleet of devices in rounds, each against the same backbone service.

    Every device keeps its private data and its M in its own folder; only scalar metrics
    travel to the orchestrator. Rerunning with the same ROOT continues from the devices' adapters.
    """
    from plora.platform.fleet.launch import launch, table

    rows = launch(devices, rounds, data, backbone, root, engine, steps, lr, fraction, echo=lambda line: click.echo(line, err=True))
    click.echo(table(rows))
    click.echo(f"per-round record: {root / 'rounds.jsonl'}")
    failed = sum(row["failed"] for row in rows)
    if failed:
        raise click.ClickException(f"{failed} device jobs failed ({', '.join(sorted({e for r in rows for e in r['errors']}))})")


@fleet.command("status")
@db_option
@fail_cleanly
def fleet_status(db) -> None:
    """Every registered device by backbone version, with its latest job."""
    from plora.storage.registry import open_registry

    reg = open_registry(db)
    click.echo(f"{'version':<34} {'status':<10} {'device':<12} {'jobs':>4}  latest job")
    for version in reg.list_backbones():
        for device in reg.devices_on(version.name):
            history = reg.list_jobs(device.id, limit=1000)
            latest = f"{history[0].kind} {history[0].status}, {history[0].steps_done} steps" if history else "-"
            click.echo(f"{version.name:<34} {version.status:<10} {device.id[:12]:<12} {len(history):>4}  {latest}")

