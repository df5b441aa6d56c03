"""`plora backbone enroll ...` and `plora backbone devices ...`: the operator's say over who
uses the service. Enrollment tokens let devices enroll; a revoked device is refused, and its
live sessions end within a second, also when the service runs in another process."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta

import click

from plora.platform.cli.common import db_option, fail_cleanly
from plora.storage.models import utcnow

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class Duration(click.ParamType):
    """A length of time such as 90s, 30m, 12h or 7d."""

    name = "duration"

    def convert(self, value, param, ctx) -> timedelta:
        if isinstance(value, timedelta):
            return value
        found = re.fullmatch(r"\s*(\d{1,6})\s*([smhd])\s*", str(value))
        if not found or int(found[1]) == 0:
            self.fail(f"{value!r} is not a duration such as 90s, 30m, 12h or 7d", param, ctx)
        return timedelta(**{_UNITS[found[2]]: int(found[1])})


def _when(moment: datetime | None, none: str = "-") -> str:
    return f"{moment:%Y-%m-%d %H:%M}" if moment else none


@click.group()
def enroll() -> None:
    """Enrollment tokens: the operator's permission for devices to enroll with the service."""


@enroll.command("create")
@click.option("--uses", default=1, show_default=True, type=click.IntRange(1, 1_000_000), help="Devices that may enroll with it.")
@click.option("--expires", default="7d", show_default=True, type=Duration(), help="How long it stays valid: 90s, 30m, 12h, 7d.")
@click.option("--label", help="A note for `enroll list`, e.g. who it is for.")
@db_option
@fail_cleanly
def enroll_create(uses, expires, label, db) -> None:
    """Issue an enrollment token, printed once on stdout: the registry keeps only its hash.

    A device enrolls with it by `plora device init DIR --backbone HOST:PORT --enroll-token TOKEN`.
    """
    from plora.storage.registry import open_registry

    record, token = open_registry(db).issue_enrollment_token(uses, utcnow() + expires, label)
    click.echo(f"enrollment token {record.id}: {uses} use(s), valid until {_when(record.expires_at)} UTC. "
               "It is shown only now:", err=True)
    click.echo(token)


@enroll.command("list")
@db_option
@fail_cleanly
def enroll_list(db) -> None:
    """Every enrollment token: uses left, expiry, revocation. Never the tokens themselves."""
    from plora.storage.registry import open_registry

    now = utcnow()
    click.echo(f"{'id':>4} {'uses left':>10} {'created':<16} {'expires':<16} {'state':<8} label")
    for token in open_registry(db).list_enrollment_tokens():
        expired = token.expires_at is not None and token.expires_at <= now
        state = "revoked" if token.revoked_at else "expired" if expired else "used up" if not token.uses_left else "valid"
        click.echo(f"{token.id:>4} {f'{token.uses_left}/{token.uses}':>10} {_when(token.created_at):<16} "
                   f"{_when(token.expires_at, 'never'):<16} {state:<8} {token.label or ''}")


@enroll.command("revoke")
@click.argument("token_id", type=int)
@db_option
@fail_cleanly
def enroll_revoke(token_id, db) -> None:
    """Allow no more enrollments with token TOKEN_ID. Devices it enrolled stay enrolled."""
    from plora.storage.registry import open_registry

    open_registry(db).revoke_enrollment_token(token_id)
    click.echo(f"enrollment token {token_id} revoked")


@click.group()
def devices() -> None:
    """The devices enrolled with the service: list them, revoke one."""


@devices.command("list")
@db_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per device.")
@fail_cleanly
def devices_list(db, as_json) -> None:
    """Every device: id, label, backbone version, when it enrolled, was last seen and was revoked."""
    from plora.storage.registry import open_registry

    reg = open_registry(db)
    versions = {v.id: v.name for v in reg.list_backbones()}
    found = reg.list_devices()
    if as_json:
        for d in found:
            stamps = {f: getattr(d, f).isoformat(timespec="seconds") if getattr(d, f) else None
                      for f in ("created_at", "last_seen_at", "revoked_at")}
            click.echo(json.dumps({"id": d.id, "label": d.label, "version": versions[d.backbone_version_id], **stamps}))
        return
    click.echo(f"{'device':<32} {'label':<20} {'version':<36} {'created':<16} {'last seen':<16} revoked")
    for d in found:
        click.echo(f"{d.id:<32} {(d.label or '')[:20]:<20} {versions[d.backbone_version_id]:<36} {_when(d.created_at):<16} "
                   f"{_when(d.last_seen_at):<16} {_when(d.revoked_at, '')}")


@devices.command("revoke")
@click.argument("device_id")
@db_option
@fail_cleanly
def devices_revoke(device_id, db) -> None:
    """Refuse device DEVICE_ID from now on. A service on this registry ends its live sessions
    within a second; the device's owner can still have it forgotten (`plora device forget`)."""
    from plora.storage.registry import open_registry

    open_registry(db).revoke_device(device_id)
    click.echo(f"device {device_id} revoked; its live sessions end within a second")
