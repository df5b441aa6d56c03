"""The platform registry's tables: backbone versions, devices, jobs and enrollment tokens.

The registry records only identities (ids, hashes), configurations and scalar metrics.
No column can hold an adapter matrix, a tensor or user text: there are no binary
columns, and the free-form JSON columns are filled only through the validators in
``plora.storage.validate``. The schema itself is owned by the Alembic migrations in
``migrations/versions``; a unit test keeps the two identical.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, CheckConstraint, DateTime, ForeignKey, Integer, MetaData, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so later migrations can drop or alter constraints by
# name on both SQLite (batch mode) and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class BackboneStatus(enum.StrEnum):
    ACTIVE = "active"
    DEPRECATED = "deprecated"
    RETIRED = "retired"


class JobKind(enum.StrEnum):
    # Databases made by revision 0001 also accept "evaluate" in jobs.kind, a kind no plora
    # ever wrote; narrowing their CHECK would copy the jobs table on SQLite for nothing.
    PERSONALIZE = "personalize"
    MIGRATE = "migrate"


class JobStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    SQLite keeps no offset and hands back naive values; this type refuses naive input
    and marks what it reads as UTC, so callers always compare aware datetimes.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: registry timestamps must be timezone-aware")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _one_of(column: str, values: type[enum.StrEnum]) -> str:
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class BackboneVersion(Base):
    """One frozen backbone plus the adapter configuration devices train against."""

    __tablename__ = "backbone_versions"
    __table_args__ = (CheckConstraint(_one_of("status", BackboneStatus), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    # How the cloud loads it: "embedded" or a filesystem path.
    source: Mapped[str] = mapped_column(String(1024))
    architecture: Mapped[dict[str, Any]]
    content_hash: Mapped[str] = mapped_column(String(64), index=True)
    # Seed of the public projections; with the weights it fixes what adapters mean.
    seed: Mapped[int] = mapped_column(Integer)
    adapter_config: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default=BackboneStatus.ACTIVE.value)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    activated_at: Mapped[datetime | None]
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("backbone_versions.id"))

    def __repr__(self) -> str:
        return f"BackboneVersion(id={self.id}, name={self.name!r}, status={self.status!r})"


class Device(Base):
    """A device, always bound to exactly one backbone version."""

    __tablename__ = "devices"

    # A uuid4 hex chosen by the device, so it can name itself before it first connects.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    backbone_version_id: Mapped[int] = mapped_column(ForeignKey("backbone_versions.id"), index=True)
    label: Mapped[str | None] = mapped_column(String(128))
    # A hash of the device's credential; the credential itself is never stored.
    token_hash: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime | None]
    # Set by the operator: the service then refuses the device and ends its sessions.
    revoked_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"Device(id={self.id!r}, backbone_version_id={self.backbone_version_id})"


class EnrollmentToken(Base):
    """The operator's permission for `uses` devices to enroll with a service, until it expires."""

    __tablename__ = "enrollment_tokens"
    __table_args__ = (CheckConstraint("uses_left >= 0 AND uses_left <= uses", name="uses_left"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # A hash of the token; the token itself is shown once, when it is issued.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str | None] = mapped_column(String(128))
    uses: Mapped[int] = mapped_column(Integer)
    uses_left: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    def __repr__(self) -> str:
        return f"EnrollmentToken(id={self.id}, uses_left={self.uses_left}/{self.uses})"


class Job(Base):
    """One personalization, migration or evaluation run on a device."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_one_of("kind", JobKind), name="kind"),
        CheckConstraint(_one_of("status", JobStatus), name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Made where the job runs, on the device: the job's name in any registry it is reported to.
    uuid: Mapped[str] = mapped_column(String(32), unique=True, default=lambda: uuid.uuid4().hex)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    # The version the job ran against, kept even if the device is rebound later.
    backbone_version_id: Mapped[int] = mapped_column(ForeignKey("backbone_versions.id"), index=True)
    # For a migration: the version the device is being moved to.
    target_backbone_version_id: Mapped[int | None] = mapped_column(ForeignKey("backbone_versions.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.PENDING.value)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    # An error message only; see Registry.fail_job.
    reason: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any]]
    # Absent metrics are SQL NULL, not the JSON value null, so IS NULL finds them.
    metrics_before: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    metrics_after: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    tokens_processed: Mapped[int] = mapped_column(Integer, default=0)
    steps_done: Mapped[int] = mapped_column(Integer, default=0)
    # On the device's own registry: the status it last reported to its service (None: never).
    reported_status: Mapped[str | None] = mapped_column(String(16))

    def __repr__(self) -> str:
        return f"Job(id={self.id}, kind={self.kind!r}, status={self.status!r})"
