"""`plora backbone enroll ...` and `plora backbone devices ...`: the operator's say over who
uses the service. Enrollment tokens let devices enroll; a revoked device is refused, and its
live sessions end within a second, also when the service runs in another process."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import click

from plora.platform.cli.common import db_option, fail_cleanly
from plora.platform.cli.output import JSON_HELP, Column, show
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


TOKEN_COLUMNS = (
    Column("id", "id"), Column("uses left", lambda row: f"{row['uses_left']}/{row['uses']}"),
    Column("created", lambda row: _when(row["created_at"])), Column("expires", lambda row: _when(row["expires_at"], "never")),
    Column("state", "state"), Column("label", "label"),
)


@enroll.command("list")
@db_option
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@fail_cleanly
def enroll_list(db, as_json) -> None:
    """Every enrollment token: uses left, expiry, revocation. Never the tokens themselves."""
    from plora.storage.registry import open_registry

    now = utcnow()
    rows = []
    for token in open_registry(db).list_enrollment_tokens():
        expired = token.expires_at is not None and token.expires_at <= now
        state = "revoked" if token.revoked_at else "expired" if expired else "used up" if not token.uses_left else "valid"
        rows.append({"id": token.id, "uses_left": token.uses_left, "uses": token.uses, "created_at": token.created_at,
                     "expires_at": token.expires_at, "revoked_at": token.revoked_at, "state": state, "label": token.label})
    show(rows, TOKEN_COLUMNS, as_json)


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


DEVICE_COLUMNS = (
    Column("device", "id"), Column("label", "label"), Column("version", "version"),
    Column("created", lambda row: _when(row["created_at"])), Column("last seen", lambda row: _when(row["last_seen_at"])),
    Column("revoked", lambda row: _when(row["revoked_at"], "")),
)


@devices.command("list")
@db_option
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@fail_cleanly
def devices_list(db, as_json) -> None:
    """Every device: id, label, backbone version, when it enrolled, was last seen and was revoked."""
    from plora.storage.registry import open_registry

    reg = open_registry(db)
    versions = {v.id: v.name for v in reg.list_backbones()}
    rows = [{"id": d.id, "label": d.label, "version": versions[d.backbone_version_id], "created_at": d.created_at,
             "last_seen_at": d.last_seen_at, "revoked_at": d.revoked_at} for d in reg.list_devices()]
    show(rows, DEVICE_COLUMNS, as_json)


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
