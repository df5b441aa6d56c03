"""The platform registry: which backbone versions exist, which device uses which, and jobs.
Enrollment tokens, revocation and forgetting devices are in device_lifecycle.py.

It never holds a user's adapter matrix, tensors or user text: only ids, hashes,
configurations and scalar metrics (see ``plora.storage.validate``). Every method runs
in its own transaction and returns detached objects whose attributes stay readable
after the session has closed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from plora.storage import validate
from plora.storage.db import open_database
from plora.storage.device_lifecycle import DeviceLifecycle
from plora.storage.errors import CapacityError, RegistryError
from plora.storage.models import BackboneStatus, BackboneVersion, Device, Job, JobKind, JobStatus, utcnow

log = logging.getLogger(__name__)

# Fields that must match for a repeated registration to count as the same version.
_IDENTITY = ("source", "architecture", "content_hash", "seed", "adapter_config", "parent_id")
_OPEN_JOB = (JobStatus.PENDING.value, JobStatus.RUNNING.value)
_SHOWN = 10  # names quoted in an error message, at most
MAX_REPORTED_JOBS = 10_000  # of one device, on a service's registry: its reports cannot fill the database


@dataclass(frozen=True)
class JobReport:
    """A job as its device reports it to its service: metadata only, never data or M. The
    versions go by name, which every registry gives them alike."""

    uuid: str
    kind: str
    status: str
    version: str
    target: str | None
    params: dict[str, Any]
    metrics_before: dict[str, Any] | None
    metrics_after: dict[str, Any] | None
    tokens_processed: int
    steps_done: int
    reason: str | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None


class Registry(DeviceLifecycle):
    """Records of backbone versions, devices, jobs and enrollment tokens, over a SQLAlchemy sessionmaker."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        # Returned objects are read after their session closes, so nothing may expire.
        self._sessions = sessionmaker(class_=sessions.class_, **{**sessions.kw, "expire_on_commit": False})

    # -- backbone versions ----------------------------------------------------------

    def register_backbone(
        self,
        name: str,
        source: str,
        architecture: dict[str, Any],
        content_hash: str,
        seed: int,
        adapter_config: dict[str, Any],
        parent_id: int | None = None,
    ) -> BackboneVersion:
        """Record a new version; registering an identical one again returns the existing."""
        if not validate.is_int(seed) or not (parent_id is None or validate.is_int(parent_id)):
            raise RegistryError(f"seed and parent_id must be ints, got {seed!r} and {parent_id!r}")
        now = utcnow()
        wanted = BackboneVersion(
            name=validate.text("backbone name", name),
            source=validate.text("source", source, limit=1024),
            architecture=validate.config("architecture", architecture),
            content_hash=validate.content_hash(content_hash),
            seed=seed,
            adapter_config=validate.config("adapter_config", adapter_config),
            status=BackboneStatus.ACTIVE.value,
            created_at=now,
            activated_at=now,
            parent_id=parent_id,
        )
        try:
            with self._sessions.begin() as session:
                existing = session.scalar(select(BackboneVersion).where(BackboneVersion.name == name))
                if existing is not None:
                    return self._same_or_conflict(existing, wanted)
                if parent_id is not None:
                    self._backbone(session, parent_id)
                session.add(wanted)
        except IntegrityError:
            # Another writer took the name between our check and our insert.
            with self._sessions() as session:
                existing = session.scalar(select(BackboneVersion).where(BackboneVersion.name == name))
            if existing is None:
                raise
            return self._same_or_conflict(existing, wanted)
        log.info("registered backbone version %r (id %d)", wanted.name, wanted.id)
        return wanted

    @staticmethod
    def _same_or_conflict(existing: BackboneVersion, wanted: BackboneVersion) -> BackboneVersion:
        differs = [f for f in _IDENTITY if getattr(existing, f) != getattr(wanted, f)]
        if differs:
            raise RegistryError(
                f"backbone version {wanted.name!r} already exists (id {existing.id}) and differs in "
                f"{', '.join(differs)}; register the new weights or configuration under a new name"
            )
        return existing

    def get_backbone(self, name_or_id: str | int) -> BackboneVersion:
        with self._sessions() as session:
            return self._backbone(session, name_or_id)

    def list_backbones(self) -> list[BackboneVersion]:
        with self._sessions() as session:
            return list(session.scalars(select(BackboneVersion).order_by(BackboneVersion.id)))

    def default_backbone(self) -> BackboneVersion | None:
        """The active version new devices are bound to: the one activated last."""
        with self._sessions() as session:
            query = select(BackboneVersion).where(BackboneVersion.status == BackboneStatus.ACTIVE.value)
            return session.scalar(query.order_by(BackboneVersion.activated_at.desc(), BackboneVersion.id.desc()).limit(1))

    def set_backbone_status(self, name: str, status: str, force: bool = False) -> BackboneVersion:
        """Activate, deprecate or retire a version. Retiring one that devices are still bound
        to strands them, so it is refused unless `force`; see `devices_on` for who they are."""
        status = validate.choice("backbone status", status, BackboneStatus)
        with self._sessions.begin() as session:
            backbone = self._backbone(session, name)
            if status == BackboneStatus.RETIRED and not force:
                bound = session.scalar(select(func.count()).select_from(Device).where(Device.backbone_version_id == backbone.id))
                if bound:
                    raise RegistryError(
                        f"{bound} device(s) are still bound to {backbone.name!r}; migrate them first "
                        f"(plora migrate --to VERSION), or force the retirement and strand them"
                    )
            if status == BackboneStatus.ACTIVE and backbone.status != status:
                backbone.activated_at = utcnow()
            backbone.status = status
        log.info("backbone version %r is now %s", backbone.name, status)
        return backbone

    @staticmethod
    def _backbone(session: Session, name_or_id: str | int) -> BackboneVersion:
        if validate.is_int(name_or_id):
            found = session.get(BackboneVersion, name_or_id)
        else:
            found = session.scalar(select(BackboneVersion).where(BackboneVersion.name == name_or_id))
            if found is None:
                # Version names end in a digest of their math, so "v2" may stand for "v2-1a2b3c4d".
                stem = name_or_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                query = select(BackboneVersion).where(BackboneVersion.name.like(f"{stem}-%", escape="\\"))
                matches = list(session.scalars(query.limit(_SHOWN)))
                if len(matches) > 1:
                    raise RegistryError(
                        f"{name_or_id!r} could be any of {', '.join(repr(m.name) for m in matches)}; give the full name"
                    )
                found = matches[0] if matches else None
        if found is None:
            names = list(session.scalars(select(BackboneVersion.name).order_by(BackboneVersion.id).limit(_SHOWN)))
            raise RegistryError(
                f"no backbone version {name_or_id!r}; registered: {', '.join(map(repr, names)) or 'none'}"
            )
        return found

    @classmethod
    def _bindable(cls, session: Session, name: str) -> BackboneVersion:
        backbone = cls._backbone(session, name)
        if backbone.status == BackboneStatus.RETIRED:
            raise RegistryError(f"backbone version {name!r} is retired; bind devices to an active version")
        return backbone

    # -- devices --------------------------------------------------------------------

    def register_device(
        self,
        device_id: str,
        backbone_name: str,
        label: str | None = None,
        token_hash: str | None = None,
        enrollment_token: str | None = None,
    ) -> Device:
        """Record a device on a version; an identical repeat returns the existing record.

        With `enrollment_token`, a new device is recorded only if the token allows one more
        enrollment, which it then uses up; otherwise this raises AuthenticationError."""
        validate.device_id(device_id)
        validate.text("label", label, optional=True)
        validate.text("token_hash", token_hash, optional=True)
        with self._sessions.begin() as session:
            backbone = self._bindable(session, backbone_name)
            existing = session.get(Device, device_id)
            if existing is not None:
                if (existing.backbone_version_id, existing.label, existing.token_hash) != (
                    backbone.id,
                    label,
                    token_hash,
                ):
                    raise RegistryError(
                        f"device {device_id} is already registered (on backbone version id "
                        f"{existing.backbone_version_id}) with other details; use bind_device to move it"
                    )
                return existing
            if enrollment_token is not None:
                self._redeem(session, enrollment_token)
            device = Device(id=device_id, backbone_version_id=backbone.id, label=label, token_hash=token_hash)
            session.add(device)
        log.info("registered device %s on %r", device_id, backbone_name)
        return device

    def get_device(self, device_id: str) -> Device:
        with self._sessions() as session:
            return self._device(session, device_id)

    def bind_device(self, device_id: str, backbone_name: str) -> Device:
        """Move a device to another version (its only one from now on)."""
        with self._sessions.begin() as session:
            device = self._device(session, device_id)
            device.backbone_version_id = self._bindable(session, backbone_name).id
        log.info("device %s bound to %r", device_id, backbone_name)
        return device

    def devices_on(self, backbone_name: str) -> list[Device]:
        with self._sessions() as session:
            backbone = self._backbone(session, backbone_name)
            query = select(Device).where(Device.backbone_version_id == backbone.id)
            return list(session.scalars(query.order_by(Device.created_at, Device.id)))

    # -- jobs -----------------------------------------------------------------------

    def start_job(self, device_id: str, kind: str, params: dict[str, Any], target: str | None = None) -> int:
        """Open a running job on the device's current backbone version; returns its id.

        A migration names the version it moves the device to as `target`."""
        kind = validate.choice("job kind", kind, JobKind)
        clean = validate.params(params)
        if (kind == JobKind.MIGRATE) != (target is not None):
            raise RegistryError("a migrate job needs a target version, and only a migrate job has one")
        with self._sessions.begin() as session:
            device = self._device(session, device_id)
            target_id = self._backbone(session, target).id if target is not None else None
            now = utcnow()
            device.last_seen_at = now
            job = Job(
                device_id=device.id,
                backbone_version_id=device.backbone_version_id,
                target_backbone_version_id=target_id,
                kind=kind,
                status=JobStatus.RUNNING.value,
                created_at=now,
                started_at=now,
                params=clean,
            )
            session.add(job)
            session.flush()
            job_id = job.id
        log.info("job %d (%s) started on device %s", job_id, kind, device_id)
        return job_id

    def resume_job(self, job_id: int) -> Job:
        """Reopen an interrupted job (or one left running by a crash) to carry on where it stopped."""
        with self._sessions.begin() as session:
            job = session.get(Job, job_id)
            if job is None or job.status not in (JobStatus.INTERRUPTED.value, JobStatus.RUNNING.value):
                found = "no such job" if job is None else f"status {job.status}"
                raise RegistryError(f"job {job_id} cannot be resumed ({found}); only interrupted or running jobs can")
            job.status, job.reason, job.ended_at = JobStatus.RUNNING.value, None, None
        log.info("job %d resumed", job_id)
        return job

    def finish_job(
        self,
        job_id: int,
        metrics_before: dict[str, Any] | None,
        metrics_after: dict[str, Any] | None,
        tokens_processed: int,
        steps_done: int,
    ) -> Job:
        """Mark a job succeeded with its scalar metrics (flat dicts of numbers, short strings, bools)."""
        before = validate.metrics("metrics_before", metrics_before)
        after = validate.metrics("metrics_after", metrics_after)
        tokens = validate.count("tokens_processed", tokens_processed)
        steps = validate.count("steps_done", steps_done)
        with self._sessions.begin() as session:
            job = self._open_job(session, job_id)
            job.metrics_before, job.metrics_after = before, after
            job.tokens_processed, job.steps_done = tokens, steps
            job.status, job.ended_at = JobStatus.SUCCEEDED.value, utcnow()
        log.info("job %d succeeded", job_id)
        return job

    def fail_job(self, job_id: int, reason: str) -> Job:
        """Mark a job failed. ``reason`` must be an error message, never user data."""
        return self._end(job_id, JobStatus.FAILED, reason)

    def interrupt_job(self, job_id: int, reason: str) -> Job:
        """Mark a job stopped from outside (shutdown, cancel); ``reason`` as in fail_job."""
        return self._end(job_id, JobStatus.INTERRUPTED, reason)

    def interrupt_abandoned_jobs(self, device_id: str, reason: str) -> list[int]:
        """Close as interrupted every job of the device still pending or running; their ids.

        Only for the device's own next run, once it knows that no job of its runs any more:
        what is still open then was left by a process killed before it could close it."""
        message = validate.reason(reason)
        with self._sessions.begin() as session:
            query = select(Job).where(Job.device_id == device_id, Job.status.in_(_OPEN_JOB)).order_by(Job.id)
            abandoned = list(session.scalars(query))
            for job in abandoned:
                job.status, job.reason, job.ended_at = JobStatus.INTERRUPTED.value, message, utcnow()
        for job in abandoned:
            log.info("job %d interrupted: %s", job.id, message)
        return [job.id for job in abandoned]

    def _end(self, job_id: int, status: JobStatus, reason: str) -> Job:
        message = validate.reason(reason)
        with self._sessions.begin() as session:
            job = self._open_job(session, job_id)
            job.status, job.reason, job.ended_at = status.value, message, utcnow()
        log.info("job %d %s: %s", job_id, status.value, message)
        return job

    def get_job(self, job_id: int) -> Job:
        with self._sessions() as session:
            return self._job(session, job_id)

    def migration_jobs(self, device_id: str, target: str) -> list[Job]:
        """The device's migrate jobs towards `target`, oldest first."""
        with self._sessions() as session:
            device, version = self._device(session, device_id), self._backbone(session, target)
            query = select(Job).where(Job.device_id == device.id, Job.kind == JobKind.MIGRATE.value,
                                      Job.target_backbone_version_id == version.id)
            return list(session.scalars(query.order_by(Job.id)))

    def list_jobs(self, device_id: str | None = None, limit: int = 50) -> list[Job]:
        """The newest jobs first, of one device or of all."""
        if not validate.is_int(limit) or limit < 1:
            raise RegistryError(f"limit must be a positive int, got {limit!r}")
        with self._sessions() as session:
            query = select(Job).order_by(Job.id.desc()).limit(limit)
            if device_id is not None:
                query = query.where(Job.device_id == self._device(session, device_id).id)
            return list(session.scalars(query))

    # -- jobs reported by devices on hosts of their own ---------------------------------

    def jobs_to_report(self, device_id: str) -> list[Job]:
        """The device's jobs whose present status it has not reported to its service, oldest first."""
        with self._sessions() as session:
            unreported = or_(Job.reported_status.is_(None), Job.reported_status != Job.status)
            return list(session.scalars(select(Job).where(Job.device_id == device_id, unreported).order_by(Job.id)))

    def mark_reported(self, statuses: dict[str, str]) -> None:
        """Note that the jobs named by UUID were reported with these statuses."""
        with self._sessions.begin() as session:
            for job in session.scalars(select(Job).where(Job.uuid.in_(list(statuses)))):
                job.reported_status = statuses[job.uuid]

    def job_report(self, job: Job) -> JobReport:
        """What a device tells its service of one of its jobs: the record, less its local ids."""
        with self._sessions() as session:
            target = job.target_backbone_version_id
            return JobReport(
                job.uuid, job.kind, job.status, session.get(BackboneVersion, job.backbone_version_id).name,
                None if target is None else session.get(BackboneVersion, target).name, job.params, job.metrics_before,
                job.metrics_after, job.tokens_processed, job.steps_done, job.reason, job.created_at, job.started_at, job.ended_at,
            )

    def record_job_report(self, device_id: str, report: JobReport, max_jobs: int = MAX_REPORTED_JOBS) -> None:
        """Store a job a device reports, or bring its record up to date: found by its UUID, and
        checked as every job record is (metadata only). A UUID of another device's job is
        refused, as is a new job of a device that has `max_jobs` already."""
        uuid = validate.job_uuid(report.uuid)
        fields = {
            "kind": validate.choice("job kind", report.kind, JobKind),
            "status": validate.choice("job status", report.status, JobStatus),
            "params": validate.params(report.params),
            "metrics_before": validate.metrics("metrics_before", report.metrics_before),
            "metrics_after": validate.metrics("metrics_after", report.metrics_after),
            "tokens_processed": validate.count("tokens_processed", report.tokens_processed),
            "steps_done": validate.count("steps_done", report.steps_done),
            "reason": None if report.reason is None else validate.reason(report.reason),
            "created_at": validate.moment("created_at", report.created_at),
            "started_at": validate.moment("started_at", report.started_at, optional=True),
            "ended_at": validate.moment("ended_at", report.ended_at, optional=True),
        }
        with self._sessions.begin() as session:
            device = self._device(session, device_id)
            fields["backbone_version_id"] = self._backbone(session, report.version).id
            fields["target_backbone_version_id"] = None if report.target is None else self._backbone(session, report.target).id
            job = session.scalar(select(Job).where(Job.uuid == uuid))
            if job is None:
                if session.scalar(select(func.count()).select_from(Job).where(Job.device_id == device.id)) >= max_jobs:
                    raise CapacityError(f"device {device_id} has {max_jobs} jobs on record, the most a device may report")
                session.add(Job(uuid=uuid, device_id=device.id, **fields))
            elif job.device_id != device.id:
                raise RegistryError(f"job {uuid} is another device's")
            else:
                for name, value in fields.items():
                    setattr(job, name, value)
            device.last_seen_at = utcnow()

    @staticmethod
    def _job(session: Session, job_id: int) -> Job:
        job = session.get(Job, job_id)
        if job is None:
            newest = session.scalar(select(func.max(Job.id)))
            raise RegistryError(f"no job {job_id!r} (newest job id: {newest})")
        return job

    @classmethod
    def _open_job(cls, session: Session, job_id: int) -> Job:
        job = cls._job(session, job_id)
        if job.status not in _OPEN_JOB:
            raise RegistryError(f"job {job_id} is already {job.status}; only pending or running jobs can change")
        return job


def open_registry(url: str | None = None) -> Registry:
    """The registry at `url` (default: $PLORA_DB_URL, else SQLite under $PLORA_HOME), migrated to head."""
    return Registry(open_database(url))
