"""The device owner's commands: `plora device ...`, `personalize`, `generate`, `score` and `jobs`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from plora.platform.cli.common import adapter_config, adapter_options, db_option, fail_cleanly, wire_options
from plora.platform.cli.output import JSON_HELP, Board, Column, show


@click.group()
def device() -> None:
    """Create and forget personal devices."""


@device.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--backbone",
    default="embedded",
    show_default=True,
    help="'embedded' (SmolLM2-135M-Instruct, cloud half in this process), a local checkpoint folder or .gguf file, "
    "or HOST:PORT of a backbone service (replicas: IP:PORT,IP:PORT,... or one name resolving to all; each session "
    "sticks to one, and a session whose replica dies carries on at another).",
)
@click.option("--insecure", is_flag=True, help="Talk to the service in plain text (loopback only).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), help="CA certificate to trust for the service.")
@click.option("--label", default="", help="A label for this device in the service's registry.")
@click.option("--enroll-token", envvar="PLORA_ENROLL_TOKEN", default="",
              help="The enrollment token the service's operator gave you (or set $PLORA_ENROLL_TOKEN).")
@click.option("--cut-noise", metavar="KIND:LEVEL",
              help="Noise on every state the device sends the cloud at the cut, against inversion of its inputs: "
                   "gaussian:σ (σ times each position's own scale) or dchi:ε (d_χ-privacy; smaller is more noise). It costs "
                   "quality and hides inputs only, never outputs or M: `plora audit --cut-noise` measures both. None by default.")
@adapter_options
@click.pass_context
@fail_cleanly
def device_init(ctx, directory: Path, backbone: str, insecure: bool, tls_ca: str | None, label: str, enroll_token: str,
                cut_noise: str | None, **adapter) -> None:
    """Create a device in DIRECTORY bound to a backbone, with M = 0 (exactly the base model).

    With HOST:PORT the device enrolls with the service using an enrollment token from its
    operator, receives its credential and downloads the device bundle (tokenizer,
    embeddings, device layers, norm, LM head), verifying its hash. The service fixes the
    adapter configuration.
    """
    from plora.clients.cut_noise import CutNoise
    from plora.clients.grpc_link import Endpoint
    from plora.platform.jobs import register
    from plora.platform.runtime import init_device, is_address
    from plora.storage.registry import open_registry

    chosen = any(ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE for name in adapter)
    config = adapter_config(**adapter) if chosen or not is_address(backbone) else None
    ca_file = str(Path(tls_ca).resolve()) if tls_ca else None  # later commands may run from elsewhere
    endpoint = Endpoint(backbone, insecure, ca_file) if is_address(backbone) else None
    if enroll_token and endpoint is None:
        raise click.UsageError("--enroll-token is for enrolling with a backbone service (--backbone HOST:PORT)")
    store = init_device(directory, backbone, config, endpoint, label, enroll_token, cut_noise=cut_noise and CutNoise.parse(cut_noise))
    if endpoint is None:
        register(store.record, open_registry())
    record = store.record
    click.echo(f"device {record.device_id} created in {directory}")
    identity = record.identity
    click.echo(f"backbone {identity.name} ({identity.content_hash[:12]}), {identity.num_layers} layers; {identity.adapter}")
    if record.cut_noise:
        click.echo(f"noise at the cut: {record.cut_noise}")


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
    from plora.platform.runtime import forget_device, is_address
    from plora.storage.registry import open_registry

    record = DeviceStore.open(directory, midway=True).record
    where = f"the service at {address or record.backbone_spec}" if is_address(record.backbone_spec) else "the local registry"
    if not yes:
        click.confirm(f"Forget device {record.device_id}: remove it from {where} and delete {directory} with its adapter "
                      "and everything else in it?", abort=True)
    removed = forget_device(directory, open_registry(), address)
    records = ", ".join(f"{count} {kind}" for kind, count in sorted(removed.items())) or "no records"
    click.echo(f"device {record.device_id} forgotten: {records} deleted from {where}; {directory} deleted")


@device.command("federation")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--join/--leave", default=None, help="Take part in the fleet's federation, or stop taking part.")
@click.option("--in-the-clear/--masked-only", default=False, show_default=True,
              help="With --join: also take part in rounds without secure aggregation, whose orchestrator sees this "
                   "device's M.")
@fail_cleanly
def device_federation(directory: Path, join: bool | None, in_the_clear: bool) -> None:
    """Show or change whether this device takes part in its fleet's federation.

    A device that joined trains a scratch copy of the fleet's starting M on its own data in each
    round it is sampled for, and sends the result, masked under secure aggregation so that the
    orchestrator learns only the mean over the round's devices. Its own M, its data and its
    checkpoints never take part. The backbone service still sees the device's split traffic, as
    in any job. A device that has not joined sends nothing but its refusal and its backbone version.
    """
    from plora.clients.device_store import DeviceStore, FederationChoice

    if in_the_clear and not join:
        raise click.UsageError("--in-the-clear goes with --join")
    store = DeviceStore.open(directory)
    if join is not None:
        store.choose_federation(FederationChoice(joined=join, in_the_clear=join and in_the_clear))
    choice = store.federation_choice()
    said = "joined" if choice.joined else "not joined"
    click.echo(f"{directory}: {said}" + (", also without secure aggregation" if choice.in_the_clear else ""))


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL with 'text' or 'prompt'+'response' per line, a CSV with those columns, or a .txt file.")
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps to run.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True),
              help="Passes over the data (default 2), but at least --min-steps optimizer steps.")
# 90 is clients.training.MIN_STEPS, which the CLI must not import (it imports torch) to show --help.
@click.option("--min-steps", default=90, show_default=True, type=click.IntRange(min=0),
              help="The least optimizer steps a job given in epochs runs when it holds out a validation split (10 "
                   "examples or more), which still stops it once it stops improving: two epochs of a few dozen notes are "
                   "too few steps to teach their facts. 0: exactly the epochs.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True),
              help="Pin AdamW's learning rate for M. By default the job chooses it on the device: it tries 2e-3 and "
                   "6e-3 from the current M for a quarter of the steps each, runs the one best on the validation "
                   "split of those whose trial kept within --drift-budget (of all of them if none did) for all the "
                   "steps, and keeps the current M if none beats it (at most about twice the work "
                   "of a pinned job). With fewer than 10 examples there is no validation split: it trains at 5e-3 "
                   "only if that beats the current M in two-fold cross-validation, and otherwise keeps the current M.")
@click.option("--patience", type=click.IntRange(min=1),
              help="Stop after this many validation checks in a row that kept nothing, keeping the latest M within "
                   "5% of the best validation gain "
                   "[default: 2 when the rate is chosen, off when pinned].")
@click.option("--eval-every", type=click.IntRange(min=1), help="Steps between validation checks [default: one epoch].")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
# 0.02 is clients.anchor.AnchorSettings.drift_budget, which the CLI must not import (it imports torch).
@click.option("--drift-budget", default=0.02, show_default=True, type=click.FloatRange(min=0),
              help="How much worse than the base model the job may make generic text, as a share of its loss, measured "
                   "every 10 steps on text the base model wrote that no job trains on. Over it, the anchor's weight "
                   "rises from 3 towards 10, pulling the model back towards the base model at some cost to what it "
                   "learns from the data; the job's choice of rate keeps within it too (--lr). 0: no budget, the anchor "
                   "keeps weight 3.")
# 256 is clients.data.PERSONALIZE_MAX_LENGTH, which the CLI must not import (it imports
# datasets) before main() takes plora offline.
@click.option("--max-length", default=256, show_default=True, type=click.IntRange(min=2), help="Tokens per example.")
@click.option("--val-fraction", default=0.1, show_default=True, type=click.FloatRange(0, 0.5),
              help="Share of examples held out to pick the best M, at least 2 of them (used when there are at least 10 examples; 0: none).")
@click.option("--seed", default=0, show_default=True)
@click.option("--checkpoint-every", default=10, show_default=True, type=click.IntRange(min=1),
              help="Steps between checkpoints, from which a killed or failed job resumes when run again.")
@click.option("--keep-text/--no-keep-text", default=True, show_default=True,
              help="Keep a copy of the data in the device folder (DIR/private/kept), so that a backbone upgrade "
                   "(plora migrate) can carry this personalization over; without it an upgrade loses most of it.")
@click.option("--from-fleet", type=click.Path(exists=True, dir_okay=False, path_type=Path), metavar="FILE",
              help="Start from the fleet's shared starting M (ROOT/federation/VERSION.safetensors of a fleet run with "
                   "--strategy fedavg) instead of M = 0: for a device's first personalization, most useful with little data.")
@wire_options
@fail_cleanly
def personalize(directory, data_path, steps, epochs, min_steps, lr, patience, eval_every, batch_size, drift_budget, max_length,
                val_fraction, seed, checkpoint_every, keep_text, from_fleet, wire) -> None:
    """Train this device's M on local data. Nothing of the data leaves the device."""
    from plora.clients.anchor import AnchorSettings
    from plora.clients.search import LrSearch
    from plora.clients.training import TrainSettings
    from plora.cloud_backbone.protocol.wire import WireDtypes
    from plora.platform.jobs import run_personalization
    from plora.platform.runtime import open_device

    if steps is not None and epochs is not None:
        raise click.UsageError("give --steps or --epochs, not both")
    settings = TrainSettings(lr=lr or TrainSettings.lr, batch_size=batch_size, steps=steps, epochs=epochs, min_steps=min_steps,
                             seed=seed, eval_every=eval_every, patience=patience, anchor=AnchorSettings(drift_budget=drift_budget or None))
    dev = open_device(directory, wire_dtypes=WireDtypes.named(*wire))
    name = directory.resolve().name
    try:
        if from_fleet:
            click.echo(f"starting from the fleet's M, learnt in {dev.start_from_fleet(from_fleet)} federated rounds")
        with Board(f"personalizing {directory} on {data_path}") as board:
            board.update(name, "preparing")  # a first job also has the base model write its anchor text
            outcome = run_personalization(dev, data_path, settings, max_length, val_fraction, board.steps(name, "training"),
                                          checkpoint_every=checkpoint_every, search=None if lr else LrSearch(),
                                          on_search_step=board.steps(name, "trial runs"), keep_text=keep_text)
            board.done(name, "saved")
    finally:
        dev.close()
    _summary(outcome, settings.anchor.weight)
    click.echo(f"adapter saved to {dev.store.adapter_path}")


def _summary(outcome, anchor_weight: float) -> None:
    """What a personalization job chose, ran and kept; `anchor_weight` the anchor's at its start."""
    from plora.clients.search import CrossValidation

    result, chose = outcome.result, outcome.search
    if isinstance(chose, CrossValidation):
        click.echo(f"cross-validated on {len(chose.start_losses)} folds, each trained on the others for "
                   f"{chose.steps // len(chose.start_losses)} steps at {chose.lr:g}: held-out loss "
                   f"{chose.start_loss:.3f} at the starting M, {chose.trained_loss:.3f} after training")
    elif chose:
        tried = ", ".join(f"{t.lr:g} ({t.val_loss:.3f})" for t in chose.trials)
        click.echo(f"learning rates tried, validation loss after {chose.steps // len(chose.trials)} "
                   f"steps (starting M {chose.start_loss:.3f}): {tried}")
    rate = f"{outcome.lr:g}" if outcome.lr is not None else "none (training did not beat the starting M)"
    click.echo(f"learning rate: {rate}; selection: {outcome.selection}")
    if result.steps:
        stopped = f", stopped early (kept step {result.best_step})" if result.stopped_early else ""
        click.echo(f"job {outcome.job_id}: {result.steps} steps{stopped}, {result.tokens_per_second:.0f} tokens/s; "
                   f"training loss {result.first_loss:.3f} -> {result.last_loss:.3f}")
    else:
        click.echo(f"job {outcome.job_id}: no training run")
    which = "validation" if result.val_before is not None else "training-set"
    click.echo(f"{which} loss {outcome.loss_before:.3f} -> {outcome.loss_after:.3f}")
    click.echo(f"generic text: loss {outcome.generic_drift:+.1%} against the base model, on text it wrote that no job "
               "trains on")
    if result.anchor_weight and result.anchor_weight > anchor_weight:
        click.echo(f"over its drift budget, the job raised the anchor's weight from {anchor_weight:g} to {result.anchor_weight:.3g}")
    if outcome.improved is False:
        where = "on validation" if result.val_before is not None else "in cross-validation"
        click.echo(f"no gain {where}: the starting M is kept")


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("prompt")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", type=int, help="Seed for sampling.")
@click.option("--raw", is_flag=True, help="Do not wrap the prompt in the backbone's chat template.")
@click.option(
    "--draft-tokens", default=8, show_default=True, type=click.IntRange(min=0),
    help="Guess up to this many tokens ahead by copying from the prompt and the reply so far; the cloud checks "
    "them in the pass of one token, so each right guess saves a pass of round trips. The reply is the same "
    "(greedy) or equally distributed (sampling). 0 decodes one token per pass.",
)
@wire_options
@fail_cleanly
def generate(directory, prompt, max_new_tokens, temperature, top_p, seed, raw, draft_tokens, wire) -> None:
    """Generate a reply with the personalized model, streaming it as it comes."""
    from plora.clients.generation import PromptLookup, encode_prompt, stream_tokens
    from plora.cloud_backbone.protocol.wire import WireDtypes
    from plora.platform.runtime import open_device

    dev = open_device(directory, wire_dtypes=WireDtypes.named(*wire))
    try:
        ids = encode_prompt(dev.tokenizer, prompt, chat=not raw)
        drafter = PromptLookup(draft_tokens) if draft_tokens else None
        new: list[int] = []
        shown = ""
        stop = {dev.tokenizer.eos_token_id}
        for token in stream_tokens(dev.model, ids, max_new_tokens, stop, temperature, top_p, seed, drafter):
            new.append(token)
            text = dev.tokenizer.decode(new, skip_special_tokens=True)
            click.echo(text[len(shown):], nl=False)
            shown = text
        click.echo()
    finally:
        dev.close()


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--text", required=True, help="The text to score.")
@click.option("--json", "as_json", is_flag=True, help="Print {\"tokens\": [...], \"logprobs\": [...]} as JSON on stdout.")
@fail_cleanly
def score(directory, text, as_json) -> None:
    """Log-probability of each token of TEXT given the ones before it, under the personalized model."""
    from plora.clients.generation import token_logprobs
    from plora.platform.runtime import open_device

    dev = open_device(directory)
    try:
        tokens = dev.tokenizer(text)["input_ids"]
        logprobs = token_logprobs(dev.model, tokens)
    finally:
        dev.close()
    if as_json:
        click.echo(json.dumps({"tokens": tokens, "logprobs": logprobs}))
    else:
        click.echo(f"{len(tokens)} tokens, mean log-prob {sum(logprobs) / len(logprobs):.4f}")


@click.group()
def jobs() -> None:
    """Personalization and migration jobs recorded in the registry."""


def _metrics(values: dict | None) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in (values or {}).items() if isinstance(v, float))


def _job_outcome(job: dict) -> str:
    if job["status"] == "succeeded":
        return f"{_metrics(job['metrics_before'])} -> {_metrics(job['metrics_after'])}"
    return job["reason"] or ""


JOB_COLUMNS = (
    Column("job", "id"), Column("device", lambda job: job["device_id"][:12]), Column("kind", "kind"),
    Column("status", "status"), Column("steps", "steps_done"), Column("tokens", "tokens_processed"),
    Column("before -> after, or why it ended", _job_outcome),
)


@jobs.command("list")
@click.option("--device", "device_id", help="Only this device's jobs.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1))
@db_option
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@fail_cleanly
def jobs_list(device_id, limit, db, as_json) -> None:
    """The newest jobs first: device, status, steps, tokens and metrics before and after."""
    from plora.storage.registry import open_registry

    fields = ("id", "uuid", "device_id", "kind", "status", "steps_done", "tokens_processed", "metrics_before", "metrics_after",
              "reason", "started_at", "ended_at")
    rows = [{f: getattr(job, f) for f in fields} for job in open_registry(db).list_jobs(device_id, limit)]
    show(rows, JOB_COLUMNS, as_json)
