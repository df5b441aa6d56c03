"""`plora backbone ...`: the cloud provider's commands for backbone versions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from plora.cloud_backbone.adapter_config import LINK_PRESETS
from plora.platform.cli.common import adapter_config, adapter_options, db_option, fail_cleanly
from plora.platform.cli.enroll import devices, enroll
from plora.platform.cli.output import JSON_HELP, Board, Column, print_json, show
from plora.storage.models import BackboneStatus

log = logging.getLogger("plora")


@click.group()
def backbone() -> None:
    """Backbone versions: serve, register and manage them, derive new ones, export their public projections.
    Enrollment tokens and the devices enrolled."""


backbone.add_command(enroll)
backbone.add_command(devices)


@backbone.command("serve")
@click.option("--backbone", "specs", multiple=True,
              help="A backbone to host with the adapter options below (repeatable): 'embedded', a checkpoint folder or a .gguf file.")
@click.option("--version", "versions", multiple=True, help="A registered version to host, with its own adapter config (repeatable).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=50051, show_default=True, type=click.IntRange(0, 65535), help="gRPC port (0 picks a free one).")
@click.option("--http-host", default="127.0.0.1", show_default=True,
              help="Address for the unauthenticated health and metrics endpoints; keep it private.")
@click.option("--http-port", default=9464, show_default=True, type=click.IntRange(0, 65535),
              help="Port for /healthz, /readyz and Prometheus /metrics.")
@db_option
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Server certificate (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Server private key (PEM).")
@click.option("--insecure", is_flag=True, help="Serve plain text. Meant for loopback and tests only.")
@click.option("--max-sessions", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--max-sessions-per-device", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--max-tokens", default=4096, show_default=True, type=click.IntRange(min=1), help="Tokens a session may cache.")
@click.option("--max-message-mb", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--reply-timeout", default=30.0, show_default=True, help="Seconds to wait for a device's adapter reply.")
@click.option("--idle-timeout", default=600.0, show_default=True, help="Seconds before an idle session is closed.")
@click.option("--first-frame-timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds a new session stream may take to send its first frame before it is closed.")
@click.option("--write-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds a device may leave a message unread before its session is closed.")
@click.option("--max-step-tokens", default=8192, show_default=True, type=click.IntRange(min=1),
              help="Batch × tokens of one step a device may send.")
@click.option("--session-memory-mb", default=4096, show_default=True, type=click.IntRange(min=1),
              help="Memory one session may hold on the service: KV cache, training graph and the step in flight.")
@click.option("--memory-budget-mb", type=click.IntRange(min=1),
              help="Memory every session together may hold. [default: half of this machine's memory]")
@click.option("--compute-slots", default=0, show_default=True, type=click.IntRange(min=0),
              help="Steps that compute at once, each with torch's threads; a step waiting for its device holds none. "
                   "0: any number, which on 2 cores beat a bound (see cloud_backbone/slots.py).")
# 1 is cloud_backbone.slots.STEP_TORCH_THREADS, which the CLI must not import (it imports torch)
# before a command runs.
@click.option("--torch-threads", default=1, show_default=True, type=click.IntRange(min=0),
              help="Intra-op threads of each step that computes while other steps do; a step computing alone takes "
                   "one per core. torch's default (0: one per core) gives every computing thread a team as wide as the "
                   "machine, and concurrent steps then fight over the cores.")
# 256 is cloud_backbone.batching.MAX_BATCHED_TOKENS, for the same reason.
@click.option("--max-batched-tokens", default=256, show_default=True, type=click.IntRange(min=0),
              help="Steps of at most this many tokens (all their rows: decode steps, prefills, scoring and training "
                   "steps) run batched with other devices' concurrent steps, up to this many tokens a pass; longer "
                   "ones run alone. 0: no batching.")
@click.option("--failed-steps-per-minute", default=10, show_default=True, type=click.IntRange(min=0),
              help="Steps a device may make fail by its own fault (malformed input, steps out of protocol) before its next "
                   "steps are refused unrun until the allowance refills over a minute. 0: no limit.")
@click.option("--open-enrollment", is_flag=True,
              help="Enroll devices that bring no enrollment token: anyone who reaches the port. Rate limited; for closed networks.")
@click.option("--open-enrollment-rate", default=10, show_default=True, type=click.IntRange(min=1),
              help="Devices per minute that --open-enrollment takes; more are refused (RESOURCE_EXHAUSTED).")
@click.option("--record", type=click.Path(file_okay=False, path_type=Path),
              help="For privacy audits only: capture every session's traffic (hidden states, u, u·M, gradients) in this "
                   "owner-only folder, for `plora audit`. The captures invert to the devices' text.")
@click.option("--yes-record-activations", "record_confirmed", is_flag=True,
              help="Confirm --record: you have the devices' consent and will delete the captures after the audit.")
@adapter_options
@fail_cleanly
def serve(specs, versions, host, port, http_host, http_port, db, tls_cert, tls_key, insecure, max_sessions, max_sessions_per_device,
          max_tokens, max_message_mb, reply_timeout, idle_timeout, first_frame_timeout, write_timeout, max_step_tokens,
          session_memory_mb, memory_budget_mb, compute_slots, torch_threads, max_batched_tokens, failed_steps_per_minute, open_enrollment, open_enrollment_rate, record, record_confirmed, **adapter) -> None:
    """Serve the frozen cloud half of one or more backbone versions to devices over gRPC.

    With neither --backbone nor --version it hosts every registered version that is not
    retired (old and new side by side while devices migrate), or the embedded backbone when
    none is registered. New devices are bound to the active version activated last. They
    enroll with a token from `plora backbone enroll create`, unless --open-enrollment.
    """
    import signal
    import threading

    from plora.cloud_backbone.device_access import Enrollment
    from plora.cloud_backbone.server import TLSFiles, start_service
    from plora.cloud_backbone.service import Limits
    from plora.cloud_backbone.slots import set_step_threads
    from plora.storage.registry import open_registry

    set_step_threads(torch_threads)
    if insecure == bool(tls_cert or tls_key):
        raise click.UsageError("give --tls-cert and --tls-key, or --insecure (plain text, for loopback only)")
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if record and not record_confirmed:
        raise click.UsageError("--record captures activations that invert to the devices' text; "
                               "confirm with --yes-record-activations, for an audit the devices agreed to")
    if record_confirmed and not record:
        raise click.UsageError("--yes-record-activations confirms --record DIR, which is missing")
    if insecure and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving plain text on %s: tokens and activations cross the network unencrypted", host)
    memory = {"total_memory_bytes": memory_budget_mb << 20} if memory_budget_mb else {}
    limits = Limits(max_message_bytes=max_message_mb << 20, max_tokens_per_session=max_tokens, max_sessions=max_sessions,
                    max_sessions_per_device=max_sessions_per_device, reply_timeout_s=reply_timeout, idle_timeout_s=idle_timeout,
                    first_frame_timeout_s=first_frame_timeout, write_timeout_s=write_timeout, max_step_tokens=max_step_tokens,
                    session_memory_bytes=session_memory_mb << 20, compute_slots=compute_slots,
                    max_batched_tokens=max_batched_tokens, failed_steps_per_minute=failed_steps_per_minute, **memory)
    tls = TLSFiles(tls_cert, tls_key) if tls_cert else None
    reg = open_registry(db)
    if not specs and not versions:
        versions = [v.name for v in reg.list_backbones() if v.status != BackboneStatus.RETIRED]
        specs = () if versions else ("embedded",)
    enrollment = Enrollment(open=open_enrollment, per_minute=open_enrollment_rate)
    server = start_service(list(specs), adapter_config(**adapter), reg, limits, host, port, tls, http_port, http_host, versions,
                           enrollment, record)
    for version in server.service.versions.values():
        click.echo(f"hosting {version.identity.version} ({version.identity.name}, {version.identity.num_layers} layers)")
    click.echo(f"listening on {host}:{server.port} ({'TLS' if tls else 'plain text'}); health and metrics on :{server.http_port}")
    click.echo(f"enrollment: open to anyone who reaches the port, {open_enrollment_rate} device(s) per minute" if open_enrollment
               else "enrollment: with a token from `plora backbone enroll create`")
    if record:
        click.echo(f"RECORDING every session's activations in {record}: delete them once audited", err=True)
    stopping = threading.Event()

    def shut_down(*_) -> None:
        # A signal handler runs between two bytecodes of the main thread, even of itself: a second
        # SIGTERM (a supervisor's, after its process group's) re-entered server.stop() and hung.
        if stopping.is_set():
            return
        stopping.set()
        click.echo("shutting down: finishing sessions in flight", err=True)
        server.stop()

    signal.signal(signal.SIGTERM, shut_down)
    try:
        server.wait()
    except KeyboardInterrupt:
        shut_down()


@backbone.command("export-public")
@click.option("--backbone", "spec", default="embedded", show_default=True, help="Backbone spec, as for `device init`.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="safetensors file to write.")
@adapter_options
@fail_cleanly
def export_public(spec, out, **adapter) -> None:
    """Write the public A and B the cloud applies, as layers.{i}.{module}.A / .B, for audit."""
    from safetensors.torch import save_file

    from plora.cloud_backbone import loading
    from plora.cloud_backbone.compute import CloudHalf, public_tensors

    config = adapter_config(**{**adapter, "device_layers": 0, "device_last_layers": 0})  # every layer's projections
    loaded = loading.load(spec)
    tensors = public_tensors(CloudHalf(loaded, config))
    metadata = {"backbone_name": loaded.source.name, "backbone_hash": loaded.source.content_hash,
                "adapter_config": json.dumps(config.to_dict())}
    save_file(tensors, str(out), metadata=metadata)
    click.echo(f"wrote {len(tensors)} tensors to {out}")


def _version_row(version, devices: int) -> dict:
    return {
        "name": version.name, "status": version.status, "source": version.source, "content_hash": version.content_hash,
        "architecture": version.architecture, "seed": version.seed, "adapter_config": version.adapter_config,
        "parent": version.parent_id, "devices": devices, "created_at": version.created_at.isoformat(timespec="seconds"),
        "activated_at": version.activated_at.isoformat(timespec="seconds") if version.activated_at else None,
    }


@backbone.command("register")
@click.option("--backbone", "spec", default="embedded", show_default=True,
              help="'embedded', a Hugging Face checkpoint folder or a .gguf file.")
@click.option("--preset", type=click.Choice(list(LINK_PRESETS)),
              help="Adapt the layers chosen for a link: lan, every layer (the default); wan, the last half, half "
                   "the round trips per pass (the README's table of `plora bench adapters` says what it costs). "
                   "Not with --adapt-layers.")
@db_option
@adapter_options
@click.pass_context
@fail_cleanly
def register_version(ctx, spec, preset, db, **adapter) -> None:
    """Record a backbone, with an adapter configuration, as a version (idempotent).

    The name is derived from the weights' hash and the adapter math, so the same weights with
    another --seed are another version: fresh public projections, which M cannot simply follow.
    """
    from plora.cloud_backbone.versions import register
    from plora.storage.registry import open_registry

    if preset and ctx.get_parameter_source("adapt_layers") is click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--preset chooses the layers adapted; give it or --adapt-layers, not both")
    version = register(open_registry(db), spec, adapter_config(**adapter), preset=preset)
    click.echo(f"{version.name}  ({version.status}; {version.architecture['num_layers']} layers, hash {version.content_hash[:12]})")


VERSION_COLUMNS = (
    Column("version", lambda row: row["name"] + (" *" if row["default"] else "")), Column("status", "status"),
    Column("layers", lambda row: row["architecture"]["num_layers"]), Column("rank", lambda row: row["adapter_config"]["rank"]),
    Column("seed", "seed"), Column("devices", "devices"), Column("created", "created_at"),
)


@backbone.command("list")
@db_option
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@fail_cleanly
def list_versions(db, as_json) -> None:
    """Every registered version with its status and how many devices are bound to it."""
    from plora.storage.registry import open_registry

    reg = open_registry(db)
    default = reg.default_backbone()
    rows = [{**_version_row(v, len(reg.devices_on(v.name))), "default": default is not None and v.name == default.name}
            for v in reg.list_backbones()]
    show(rows, VERSION_COLUMNS, as_json)
    if default and not as_json:
        click.echo("* new devices are bound to this one")


@backbone.command("show")
@click.argument("version")
@db_option
@fail_cleanly
def show_version(version, db) -> None:
    """One version in full, as JSON: source, hash, architecture, adapter config, devices bound."""
    from plora.storage.registry import open_registry

    reg = open_registry(db)
    record = reg.get_backbone(version)
    row = _version_row(record, len(reg.devices_on(record.name)))
    row["parent"] = reg.get_backbone(record.parent_id).name if record.parent_id else None
    print_json(row)


def _set_status(version: str, status: str, db: str | None, force: bool = False) -> None:
    from plora.storage.registry import open_registry

    reg = open_registry(db)
    stranded = reg.devices_on(version) if force else []
    record = reg.set_backbone_status(version, status, force=force)
    click.echo(f"{record.name} is now {record.status}")
    if stranded:
        click.echo(f"stranded {len(stranded)} device(s) that no service will serve now: "
                   + ", ".join(d.id for d in stranded), err=True)


@backbone.command("activate")
@click.argument("version")
@db_option
@fail_cleanly
def activate(version, db) -> None:
    """Make VERSION active: served, and the one new devices are bound to."""
    _set_status(version, BackboneStatus.ACTIVE, db)


@backbone.command("deprecate")
@click.argument("version")
@db_option
@fail_cleanly
def deprecate(version, db) -> None:
    """Keep serving VERSION's devices, but bind no new ones to it."""
    _set_status(version, BackboneStatus.DEPRECATED, db)


@backbone.command("retire")
@click.argument("version")
@click.option("--force", is_flag=True, help="Retire although devices are still bound, stranding them (they are listed).")
@db_option
@fail_cleanly
def retire(version, force, db) -> None:
    """Stop serving VERSION. Refused while devices are bound to it: migrate them first."""
    _set_status(version, BackboneStatus.RETIRED, db, force)


@backbone.command("derive")
@click.option("--from", "parent", required=True, help="The registered version to start from.")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Public training data: JSONL (text, or prompt/response), plain text or CSV.")
@click.option("--out", "name", required=True, help="Name of the new backbone (its folder under $PLORA_HOME/backbones).")
@click.option("--steps", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=2e-5, show_default=True, help="AdamW learning rate for the decoder layers.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--max-length", default=256, show_default=True, type=click.IntRange(min=2))
@click.option("--seed", type=int, help="Fresh public projections for the new version (default: the parent's seed).")
@db_option
@fail_cleanly
def derive_version(parent, data_path, name, steps, lr, batch_size, max_length, seed, db) -> None:
    """Fine-tune a version's decoder on public data and register the result as a new version.

    Devices stay on the old version until `plora migrate` moves them.
    """
    from plora.platform.versions.derive import derive
    from plora.storage.registry import open_registry

    with Board(f"deriving {name} from {parent} on {data_path}") as board:
        board.update(name, "loading")
        version = derive(open_registry(db), parent, data_path, name, steps, lr, batch_size, max_length, seed,
                         board.steps(name, "fine-tuning the decoder"))
        board.done(name, "registered")
    click.echo(f"registered {version.name} (parent {parent}); migrate devices with `plora migrate --to {version.name}`")
