"""`plora migrate`: devices to another backbone version, one by one here or as a Flower job."""

from __future__ import annotations

from pathlib import Path

import click

from plora.platform.cli.common import db_option, fail_cleanly, stop_on_sigterm
from plora.platform.cli.output import JSON_HELP, Board, Column, show

MIGRATION_COLUMNS = (
    Column("device", lambda row: row["device_id"][:12]), Column("method", "method"), Column("outcome", "outcome"),
    Column("held-out loss before", lambda row: row["before"].get("heldout_loss"), ".3f"),
    Column("after", lambda row: row["after"].get("heldout_loss"), ".3f"),
    Column("KL to old: start", lambda row: row["after"].get("kl_to_old_at_start"), ".3f"),
    Column("end", lambda row: row["after"].get("kl_to_old"), ".3f"),
    Column("gain kept", lambda row: row["after"].get("gain_kept"), ".0%"),
)


def _fleet_rows(lines: list[dict], method: str) -> list[dict]:
    """The per-device lines of a Flower migration run, as the rows of a direct one."""
    from plora.platform.fleet.launch import device_label

    rows = []
    for line in lines:
        metrics = line["metrics"]
        rows.append({
            "device_id": device_label(line), "method": method,
            "outcome": line["error"] or ("migrated" if metrics.get("migrated") else "already there"),
            "before": {k.removeprefix("before_"): v for k, v in metrics.items() if k.startswith("before_")},
            "after": {k.removeprefix("after_"): v for k, v in metrics.items() if k.startswith("after_")},
            "job_id": metrics.get("job_id") or None,
        })
    return rows


@click.command()
@click.option("--to", "target", required=True, help="The version to move the devices to.")
@click.option("--devices", "device_ids", multiple=True, default=["all"], show_default=True,
              help="'all', or the id of a device to migrate (repeatable).")
@click.option("--method", default="distill", show_default=True, type=click.Choice(["copy", "distill"]),
              help="copy: carry M over unchanged (same shapes only). distill: train the new M to make the new "
                   "backbone answer as the old one did with the old M, on the device's own text.")
@click.option("--engine", type=click.Choice(["direct", "simulation", "deployment"]),
              help="direct: one device after another in this process. simulation or deployment: the fleet's devices "
                   "at once as a Flower job (default for a fleet's root; direct for anything else).")
@click.option("--dry-run", is_flag=True, help="Say what would be migrated, and change nothing.")
@click.option("--root", default="plora-fleet", show_default=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A device folder, or a folder of device folders (a fleet's root).")
@click.option("--backbone", "address", help="HOST:PORT of a service hosting both versions, for networked devices "
              "(default: the service the devices are bound to when this host's registry does not know the target "
              "version, as on a device's own host; else one started on loopback from the registry for the migration).")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text to distill on, for a single device (default: the user's text the device keeps, else text it writes).")
@click.option("--min-retention", type=click.FloatRange(0, 1),
              help="Share of each device's personalization gain on its user's text the new M must keep, or the device "
                   "stays on its version (default 0.9; 0 accepts any loss).")
@click.option("--steps", default=40, show_default=True, type=click.IntRange(min=1), help="Distillation steps per device.")
@click.option("--lr", default=1e-2, show_default=True, help="AdamW learning rate for the new M.")
@db_option
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@fail_cleanly
@stop_on_sigterm
def migrate(target, device_ids, method, engine, dry_run, root, address, data_path, min_retention, steps, lr, db,
            as_json) -> None:
    """Move devices to another backbone version, keeping their personalization.

    Each device makes its new M on the device, verifies it, then switches, keeping the old
    adapter under previous/. Re-running finishes an interrupted migration; devices already
    on the target are left as they are.
    """
    from plora.clients.device_store import DeviceStore
    from plora.clients.migration import DistillSettings
    from plora.platform.fleet.settings import device_dir
    from plora.platform.versions import migration
    from plora.storage.registry import open_registry

    reg = open_registry(db)
    wanted = [] if list(device_ids) == ["all"] else list(device_ids)
    folders = migration.device_folders(root, wanted)
    if data_path and len(folders) > 1:
        raise click.UsageError("--data is for a single device; a fleet's devices distill on their own text")
    fleet = (device_dir(root, 0) / DeviceStore.RECORD).is_file()
    engine = engine or ("simulation" if fleet and not wanted and not dry_run else "direct")
    address = migration.resolve_target(reg, target, folders, address)
    name = reg.get_backbone(target).name
    title = f"{'checking' if dry_run else 'migrating'} {len(folders)} device(s) to {name} by {method}"
    if engine != "direct":
        if wanted or data_path or dry_run:
            raise click.UsageError("--devices ID, --data and --dry-run go with --engine direct; a Flower job migrates the whole fleet")
        from plora.platform.fleet.launch import launch_migration

        with Board(f"{title} on the {engine} engine", loss_name="KL") as board:
            lines = launch_migration(root, target, method, engine, address, steps, lr, echo=board.say, on_device=board.update,
                                     min_retention=min_retention)
        show(_fleet_rows(lines, method), MIGRATION_COLUMNS, as_json, title=title)
        failed = [line for line in lines if line["error"]]
        if failed:
            raise click.ClickException(f"{len(failed)} device(s) failed to migrate ({', '.join(sorted({line['error'] for line in failed}))}); "
                                       "run the same command again to retry them")
        return
    with Board(title, loss_name="KL", keys=[folder.name for folder in folders]) as board:
        reports, refused = migration.migrate_devices(
            folders, target, method, reg, address, data_path, DistillSettings(steps=steps, lr=lr), dry_run,
            migration.MIN_RETENTION if min_retention is None else min_retention, board.update)
    show(reports, MIGRATION_COLUMNS, as_json, title=title)
    if refused:
        raise click.ClickException(f"{len(refused)} device(s) refused to switch:\n" + "\n".join(refused))
