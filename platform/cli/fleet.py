"""`plora fleet ...` and `plora demo`: fleets of devices personalized in rounds on Flower."""

from __future__ import annotations

from pathlib import Path

import click

from plora.platform.cli.common import db_option, fail_cleanly, stop_on_sigterm
from plora.platform.cli.output import JSON_HELP, Board, Column, say, show
from plora.platform.fleet.settings import ENGINES, FEDAVG, FEDERATION_DIR, FEDERATION_FILE, PERSONAS, STRATEGIES, FleetSettings

FLEET_COLUMNS = (
    Column("device", "device"), Column("rounds", "rounds"), Column("failed", "failed"),
    Column("recall before", "recall_before", ".0%"), Column("after", "recall", ".0%"),
    Column("held-out loss before", "heldout_loss_before", ".3f"), Column("after", "heldout_loss", ".3f"),
    Column("train tok/s", "tokens_per_second", ".0f"), Column("MB exchanged", lambda row: row["bytes_exchanged"] / 1e6, ".1f"),
)

FEDERATION_COLUMNS = (
    Column("round", "round"), Column("sampled", "sampled"), Column("contributed", "contributed"),
    Column("dropped out", "dropped"), Column("M₀ updated", lambda row: "yes" if row["released"] else "no"),
    Column("M₀ held-out loss", "heldout_loss", ".3f"), Column("epsilon so far", "epsilon_total", ".2f"),
)


@click.group()
def fleet() -> None:
    """A fleet of devices personalized in rounds, orchestrated by Flower."""


@fleet.command("launch")
@click.option("--devices", default=FleetSettings.devices, show_default=True, type=click.IntRange(min=1), help="Devices in the fleet.")
@click.option("--data", default=PERSONAS, show_default=True,
              help="'personas' (a synthetic persona per device) or a JSONL file dealt out among the devices.")
@click.option("--rounds", default=FleetSettings.rounds, show_default=True, type=click.IntRange(min=1))
@click.option("--backbone", help="HOST:PORT of a backbone service (on loopback unless --backbone-ca is given), or a local "
              "backbone to serve for the run (default: the embedded one).")
@click.option("--backbone-ca", default="", type=click.Path(dir_okay=False),
              help="A CA certificate file the devices trust for the backbone service, which they then reach over TLS.")
@click.option("--engine", default=ENGINES[0], show_default=True, type=click.Choice(ENGINES),
              help="simulation: every device in this machine's Ray workers; deployment: a Flower SuperLink and one "
              "SuperNode per device on loopback, their logs under ROOT/flower/logs.")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="simulation: join this running Ray cluster (auto, HOST:PORT or ray://HOST:PORT) instead of starting "
              "one; its CPUs say how many devices train at once, and it keeps running after the fleet.")
@click.option("--steps", default=FleetSettings.steps, show_default=True, type=click.IntRange(min=1), help="Training steps per device per round.")
@click.option("--lr", default=FleetSettings.lr, show_default=True, help="AdamW learning rate for M.")
@click.option("--fraction", default=FleetSettings.fraction, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Share of the devices sampled each round. A device is set up (enrolled, given its data) when first "
              "sampled, so a large fleet costs what its sampled devices do.")
@click.option("--fraction-evaluate", default=FleetSettings.fraction_evaluate, show_default=True,
              type=click.FloatRange(0, 1),
              help="Share of each round's trained devices evaluated after training; 0 evaluates none. Each sampled "
              "device's baseline is measured before its first training all the same.")
@click.option("--drift-budget", default=FleetSettings.drift_budget, show_default=True, type=click.FloatRange(min=0),
              help="How much worse than the base model each device's job may make generic text, as `plora personalize "
              "--drift-budget`; 0 keeps the anchor's weight at 3.")
@click.option("--root", default="plora-fleet", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the devices (one sub-folder each) and rounds.jsonl.")
@click.option("--strategy", default=FleetSettings.strategy, show_default=True, type=click.Choice(STRATEGIES),
              help="personal: every device trains its own M, and only scalar metrics leave it. fedavg: the devices whose "
              "owners joined learn a shared starting M together (ROOT/federation/VERSION.safetensors), from which each "
              "user personalizes with `plora personalize --from-fleet`; each device trains a scratch copy, never its own M.")
@click.option("--secure-aggregation/--no-secure-aggregation", default=FleetSettings.secure_aggregation, show_default=True,
              help="fedavg: mask every device's M under SecAgg+, so the orchestrator learns only their mean. Without it "
              "the orchestrator sees each device's M.")
@click.option("--dp-noise", default=FleetSettings.dp_noise, show_default=True, type=click.FloatRange(min=0),
              help="fedavg: central differential privacy, the Gaussian noise multiplier added to the mean (0: off). "
              "Epsilon is reported per round; with a few dozen devices any useful epsilon is large.")
@click.option("--dp-clip", default=FleetSettings.dp_clip, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="fedavg with DP: the L2 norm each device clips its update to, on the device.")
@click.option("--dp-delta", default=FleetSettings.dp_delta, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="fedavg with DP: the delta epsilon is reported at.")
@click.option("--opt-out", default="", metavar="IDS",
              help="fedavg: the simulated devices (comma-separated partition ids) whose users decline the federation.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@fail_cleanly
@stop_on_sigterm
def fleet_launch(devices, data, rounds, backbone, backbone_ca, engine, ray_address, steps, lr, fraction, fraction_evaluate,
                 drift_budget, root, strategy, secure_aggregation, dp_noise, dp_clip, dp_delta, opt_out, as_json) -> None:
    """Personalize a fleet of devices in rounds, each against the same backbone service.

    Every device keeps its private data and its M in its own folder; only scalar metrics
    travel to the orchestrator. What is the same for every device (the backbone's device half,
    the base model's anchor text) is kept once, under ROOT/public. Progress is one line for the
    whole fleet, plus one per device in a fleet of at most 16; each device's figures go to
    ROOT/rounds.jsonl, and the table shows the devices sampled. Rerunning with the same ROOT continues from the devices' adapters.

    With --strategy fedavg each round's figures go to ROOT/federation.jsonl, and rerunning
    continues from the fleet's starting M.
    """
    from plora.cloud_backbone.slots import STEP_TORCH_THREADS, set_step_threads
    from plora.platform.fleet.launch import launch

    set_step_threads(STEP_TORCH_THREADS)  # a service it starts computes as `plora backbone serve`'s does
    federation = {}
    if strategy == FEDAVG:
        federation = {"strategy": strategy, "secure_aggregation": secure_aggregation, "dp_noise": dp_noise,
                      "dp_clip": dp_clip, "dp_delta": dp_delta, "opt_out": opt_out}
    elif opt_out or dp_noise or not secure_aggregation:
        raise click.UsageError("--opt-out, --dp-noise and --no-secure-aggregation are for --strategy fedavg")
    with Board(f"{devices} devices, {rounds} round(s) of {steps} steps, on the {engine} engine") as board:
        rows = launch(devices, rounds, data, backbone, root, engine, steps, lr, fraction, echo=board.say,
                      on_progress=board.update, fraction_evaluate=fraction_evaluate, drift_budget=drift_budget,
                      backbone_ca=backbone_ca, ray_address=ray_address, **federation)
    if strategy == FEDAVG:
        show(rows, FEDERATION_COLUMNS, as_json)
        say(f"per-round record: {root / FEDERATION_FILE}; the starting M: {root / FEDERATION_DIR}/")
        if not any(row["released"] for row in rows):
            raise click.ClickException("no round updated the starting M; see the run's log under " + str(root / "flower" / "logs"))
        return
    show(rows, FLEET_COLUMNS, as_json)
    say(f"per-round record: {root / 'rounds.jsonl'}")
    failed = sum(row["failed"] for row in rows)
    if failed:
        raise click.ClickException(f"{failed} device jobs failed ({', '.join(sorted({e for r in rows for e in r['errors']}))})")


def _latest_job(row: dict) -> str:
    job = row["latest_job"]
    return f"{job['kind']} {job['status']}, {job['steps_done']} steps" if job else "-"


STATUS_COLUMNS = (
    Column("version", "version"), Column("status", "status"), Column("device", lambda row: row["device"][:12]),
    Column("jobs", "jobs"), Column("latest job", _latest_job),
)


@fleet.command("status")
@db_option
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@fail_cleanly
def fleet_status(db, as_json) -> None:
    """Every registered device by backbone version, with its latest job."""
    from plora.storage.registry import open_registry

    reg = open_registry(db)
    rows = []
    for version in reg.list_backbones():
        for device in reg.devices_on(version.name):
            history = reg.list_jobs(device.id, limit=1000)
            latest = {f: getattr(history[0], f) for f in ("id", "kind", "status", "steps_done")} if history else None
            rows.append({"version": version.name, "status": version.status, "device": device.id, "jobs": len(history),
                         "latest_job": latest})
    show(rows, STATUS_COLUMNS, as_json)


@fleet.command("credentials")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--supernodes", default=1, show_default=True, type=click.IntRange(min=0),
              help="SuperNode key pairs to make: one per device host.")
@click.option("--host", "hosts", multiple=True, default=("127.0.0.1", "localhost"), show_default=True,
              help="A name or IP address the SuperLink is reached at (repeat for each); the certificate names them all.")
@fail_cleanly
def fleet_credentials(folder, supernodes, hosts) -> None:
    """Issue a fleet's TLS certificate and SuperNode keys into FOLDER, owner-only, for a SuperLink
    and SuperNodes started by hand (deploy/fleet-local.sh); `plora fleet launch` issues its own.

    \b
    ca.pem                 trusted by every SuperNode and `flwr` command (--root-certificates)
    server.pem, server.key the SuperLink's (--ssl-certfile, --ssl-keyfile; --ssl-ca-certfile ca.pem)
    supernode-NNN.key      SuperNode NNN's own key (--auth-supernode-private-key): copy it to that host only
    supernode-NNN.pub      register it where the SuperLink runs: flwr supernode register supernode-NNN.pub

    The CA's own key is never written, so no further certificate can be issued under it: a new
    host name means new credentials. Run the SuperLink with --enable-supernode-auth, so that it
    admits only registered SuperNodes."""
    from plora.platform.fleet.credentials import FleetCredentials, issue_credentials

    if FleetCredentials(folder).ca.exists():
        raise click.ClickException(f"{folder} already holds a fleet's credentials; choose another folder, or delete it first")
    issue_credentials(folder, supernodes, tuple(hosts))
    say(f"a CA, a certificate for {', '.join(hosts)} and {supernodes} SuperNode key pairs in {folder}")


@click.command()
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
    with each device's answers before and after. With the demo's pinned settings it takes about
    5 minutes on 2 CPU cores (the README has the time measured).
    """
    from plora.cloud_backbone.slots import STEP_TORCH_THREADS, set_step_threads
    from plora.platform.fleet.demo import DEVICES, run_demo

    set_step_threads(STEP_TORCH_THREADS)  # its service computes as `plora backbone serve`'s does
    devices = devices or DEVICES
    with Board(f"plora demo: {devices} devices personalize on the embedded backbone") as board:
        run_demo(out, board.say, steps=steps, devices=devices, on_progress=board.update)
