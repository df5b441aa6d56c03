"""The registry's device lifecycle: enrollment tokens, revocation, and forgetting a device.

A part of Registry (see registry.py), kept in a file of its own. Enrollment tokens are the
operator's permission for devices to enroll; like device credentials they are stored only
as hashes (plora.storage.tokens). Forgetting a device deletes every row that refers to it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import datetime

from sqlalchemy import ColumnElement, Table, delete, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from plora.storage import validate
from plora.storage.errors import AuthenticationError, RegistryError
from plora.storage.models import Base, Device, EnrollmentToken, utcnow
from plora.storage.tokens import hash_token, new_token

log = logging.getLogger(__name__)

MAX_TOKEN_USES = 1_000_000
_ASK = "ask the operator for a new one (plora backbone enroll create)"


def _refusal(found: EnrollmentToken | None, now: datetime) -> str:
    """Why a token allows no enrollment. It quotes nothing of the token: only its holder sees this."""
    if found is None:
        return f"the enrollment token is not one this service issued; check it for typos, or {_ASK}"
    if found.revoked_at is not None:
        return f"enrollment token {found.id} was revoked on {found.revoked_at:%Y-%m-%d %H:%M} UTC; {_ASK}"
    if found.expires_at is not None and found.expires_at <= now:
        return f"enrollment token {found.id} expired on {found.expires_at:%Y-%m-%d %H:%M} UTC; {_ASK}"
    return f"enrollment token {found.id} is used up: all {found.uses} enrollments it allowed were made; {_ASK}"


class DeviceLifecycle:
    """Enrollment tokens, and devices from enrollment to revocation and erasure. Mixed into Registry."""

    _sessions: sessionmaker[Session]

    # -- enrollment tokens ----------------------------------------------------------

    def issue_enrollment_token(
        self, uses: int = 1, expires_at: datetime | None = None, label: str | None = None
    ) -> tuple[EnrollmentToken, str]:
        """A token that lets `uses` devices enroll until `expires_at` (None: until revoked).

        Returns the record and the token itself, which exists only here: the registry keeps its hash."""
        if not validate.is_int(uses) or not 1 <= uses <= MAX_TOKEN_USES:
            raise RegistryError(f"an enrollment token allows 1 to {MAX_TOKEN_USES} enrollments, got uses={uses!r}")
        now = utcnow()
        if expires_at is not None and (expires_at.tzinfo is None or expires_at <= now):
            raise RegistryError(f"expires_at must be a timezone-aware time in the future, got {expires_at!r}")
        token = new_token()
        record = EnrollmentToken(
            token_hash=hash_token(token),
            label=validate.text("label", label, optional=True),
            uses=uses,
            uses_left=uses,
            created_at=now,
            expires_at=expires_at,
        )
        with self._sessions.begin() as session:
            session.add(record)
        log.info("issued enrollment token %d for %d enrollment(s)", record.id, uses)
        return record, token

    def list_enrollment_tokens(self) -> list[EnrollmentToken]:
        with self._sessions() as session:
            return list(session.scalars(select(EnrollmentToken).order_by(EnrollmentToken.id)))

    def revoke_enrollment_token(self, token_id: int) -> EnrollmentToken:
        """Allow no more enrollments with the token. Devices it enrolled stay enrolled."""
        with self._sessions.begin() as session:
            found = session.get(EnrollmentToken, token_id) if validate.is_int(token_id) else None
            if found is None:
                raise RegistryError(f"no enrollment token {token_id!r}; `plora backbone enroll list` shows them")
            found.revoked_at = found.revoked_at or utcnow()
        log.info("enrollment token %d revoked", token_id)
        return found

    @staticmethod
    def _redeem(session: Session, token: str) -> None:
        """Use one enrollment of `token`, in the caller's transaction, or raise AuthenticationError saying why not."""
        digest, now = hash_token(token), utcnow()
        # One conditional UPDATE: two devices racing for a token's last use cannot both get it.
        taken = session.execute(
            update(EnrollmentToken)
            .where(
                EnrollmentToken.token_hash == digest,
                EnrollmentToken.uses_left > 0,
                EnrollmentToken.revoked_at.is_(None),
                or_(EnrollmentToken.expires_at.is_(None), EnrollmentToken.expires_at > now),
            )
            .values(uses_left=EnrollmentToken.uses_left - 1)
        )
        if taken.rowcount != 1:
            raise AuthenticationError(_refusal(session.scalar(select(EnrollmentToken).where(EnrollmentToken.token_hash == digest)), now))

    # -- devices --------------------------------------------------------------------

    @staticmethod
    def _device(session: Session, device_id: str) -> Device:
        found = session.get(Device, device_id)
        if found is None:
            total = session.scalar(select(func.count()).select_from(Device))
            raise RegistryError(f"no device {device_id!r} ({total} devices registered); register it first")
        return found

    def list_devices(self) -> list[Device]:
        with self._sessions() as session:
            return list(session.scalars(select(Device).order_by(Device.created_at, Device.id)))

    def revoke_device(self, device_id: str) -> Device:
        """Refuse the device from now on; a service ends its live sessions within a second."""
        with self._sessions.begin() as session:
            device = self._device(session, device_id)
            device.revoked_at = device.revoked_at or utcnow()
        log.info("device %s revoked", device_id)
        return device

    def touch_device(self, device_id: str) -> None:
        with self._sessions.begin() as session:
            session.execute(update(Device).where(Device.id == device_id).values(last_seen_at=utcnow()))

    def inactive_devices(self, device_ids: Collection[str]) -> dict[str, str]:
        """Those of `device_ids` a service must no longer serve, each with the reason: revoked, or forgotten."""
        if not device_ids:
            return {}
        with self._sessions() as session:
            found = dict(session.execute(select(Device.id, Device.revoked_at).where(Device.id.in_(list(device_ids)))).all())
        return {
            device_id: "the device was forgotten" if device_id not in found else "the operator revoked the device"
            for device_id in device_ids
            if device_id not in found or found[device_id] is not None
        }

    def forget_device(self, device_id: str) -> dict[str, int]:
        """Delete the device's row (with its credential's hash), its jobs, and every row of any
        table that refers to those, however many such tables later schemas add.

        Returns the rows deleted per table; a device the registry does not know deletes nothing."""
        validate.device_id(device_id)
        removed: dict[str, int] = {}
        with self._sessions.begin() as session:
            _delete_with_dependents(session, Device.__table__, Device.__table__.c.id == device_id, removed)
        log.info("device %s forgotten: %s", device_id, removed or "nothing was stored")
        return removed


def _delete_with_dependents(session: Session, table: Table, rows: ColumnElement[bool], removed: dict[str, int]) -> None:
    """Delete `rows` of `table`, first deleting whatever refers to them, following foreign keys."""
    for child in Base.metadata.sorted_tables:
        for key in child.foreign_keys:
            if key.column.table is table and child is not table:
                _delete_with_dependents(session, child, key.parent.in_(select(key.column).where(rows)), removed)
    deleted = session.execute(delete(table).where(rows)).rowcount
    if deleted:
        removed[table.name] = removed.get(table.name, 0) + deleted
