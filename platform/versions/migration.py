"""`plora migrate`: move devices to a new backbone version without losing their personalization.

Each device makes its new M itself (clients.migration: copy, or distill on its own text), then
verifies it and switches. Crash safety comes from the order of the steps, each of which a
re-run can recognise as done:

    DIR/migration/plan.json              which versions, which method; metrics once verified
    DIR/migration/bundle/                the new version's device half (networked devices that keep
                                         their own; others fetch it into their PublicStore)
    DIR/migration/checkpoint.safetensors distillation in progress
    DIR/migration/adapter.safetensors    the new M, written and read back
    DIR/migration/device.json            written last, once the new M is verified: from here
                                         on a re-run only finishes the switch
    DIR/previous/<old version>/          the old version's files, kept after the switch

The switch moves the bundle, the adapter and finally device.json into place (renames; the old
device.json is copied aside, never moved, so the folder always has one), then rebinds the device
in the registry, closes the job and removes DIR/migration. Killed anywhere, the device is on
exactly one version once `plora migrate` has run again, with one job (tests/integration/test_kill).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from plora.clients.adapter_file import AdapterHeader, load_adapter, save_adapter
from plora.clients.anchor import AnchorSettings, write_anchor
from plora.clients.checkpoint import TrainingCheckpoint
from plora.clients.data import DEVICE_JOB_MAX_LENGTH, TokenizedExample, load_examples, tokenize
from plora.clients.device_store import DeviceRecord, DeviceStore
from plora.clients.distillation import mean_kl, teacher_targets
from plora.clients.grpc_link import Credentials, Endpoint, describe
from plora.clients.migration import (
    METHODS,
    DistillSettings,
    can_copy,
    copy_weights,
    distill,
)
from plora.clients.training import evaluate, fingerprint
from plora.cloud_backbone.server import start_service
from plora.cloud_backbone.versions import ensure_version, load_version
from plora.platform.jobs import DeviceProgress, device_job, register
from plora.storage.registry import open_registry
from plora.platform.runtime import connect, fetch_bundle, is_address, open_device
from plora.storage.crashpoints import crash_point
from plora.storage.errors import ConfigError, PloraError, RegistryError
from plora.storage.files import discard_partial_writes, write_atomically
from plora.storage.models import BackboneStatus, BackboneVersion, JobStatus
from plora.storage.registry import Registry

log = logging.getLogger(__name__)

PLAN = "plan.json"
CHECKPOINT = "checkpoint.safetensors"
MIN_RETENTION = 0.9
"""The share of its personalization's gain on the user's own text a device must keep to switch
versions: (v1's base loss - v2 + new M's) / (v1's base loss - v1 + old M's), on held-out text
where the device has some, else on the text it distilled on. The gain is counted from the old
base model, what the user had before personalizing: a new version whose base model already
does better on the user's text leaves less for M to add, and the user loses nothing by that
(tests/integration/test_migration: v2's base 0.7 nats better, distilled M within 0.14 of the
old model, 97% kept by this count and 84% counted from v2's base)."""
NO_GAIN = 0.01
"""Nats per token: an old M that gains less than this on the user's text personalizes nothing
measurable, so there is no share of it to check."""

# Moved in this order; the record last, since it is what says which version the device is on.
_SWITCHED = (DeviceStore.BUNDLE, DeviceStore.ADAPTER, DeviceStore.RECORD)


class MigrationRefused(PloraError):
    """The new M kept too little of the old one's personalization; the device stays where it was."""

    def __init__(self, message: str, before: dict[str, float], after: dict[str, float]):
        super().__init__(message)
        self.before, self.after = before, after


@dataclass
class MigrationReport:
    device_id: str
    source: str
    target: str
    method: str
    outcome: str  # "migrated", "already there" or, for a dry run, "would migrate"
    before: dict[str, float] = field(default_factory=dict)  # old backbone + old M
    after: dict[str, float] = field(default_factory=dict)  # new backbone + new M
    job_id: int | None = None
    measured_on: str = ""  # the text the losses and the gain kept were measured on


def migrate_device(
    root: Path,
    target: str,
    method: str = "distill",
    reg: Registry | None = None,
    address: str | None = None,
    data: Path | None = None,
    settings: DistillSettings = DistillSettings(),
    dry_run: bool = False,
    on_step: Callable[[int, int, float], None] | None = None,
    min_retention: float = MIN_RETENTION,
) -> MigrationReport:
    """Move the device in `root` to version `target` (resuming a migration left half-done).

    `address` is where the service hosting both versions is now, for a networked device.
    Distillation runs on `data`, else on the user's text the device keeps, else on text its
    base model writes. A new M that keeps less than `min_retention` of the old one's gain on
    the user's text is refused (MigrationRefused), and the device stays on its version."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    reg = reg or open_registry()
    root = Path(root)
    version = reg.get_backbone(target)
    store = DeviceStore.open(root, midway=True)
    record = store.record
    register(record, reg)
    report = MigrationReport(record.device_id, record.identity.version, version.name, method, "migrated")
    staging = root / DeviceStore.MIGRATION
    switched = record.identity.version == version.name
    if dry_run:
        _check_target(root, _read_plan(staging), version, switched)
        report.outcome = "already there" if switched else "would migrate"
        return report
    with device_job(store, reg, address):
        discard_partial_writes(staging, (PLAN, CHECKPOINT, DeviceStore.ADAPTER, DeviceStore.RECORD))
        plan = _read_plan(staging)
        _check_target(root, plan, version, switched)
        if switched:  # the registry may lag behind
            return _finish(reg, root, report, plan)
        if not (staging / DeviceStore.RECORD).is_file():
            plan = plan or {"from": record.identity.version, "to": version.name, "method": method}
            staging.mkdir(exist_ok=True)
            write_atomically(staging / PLAN, json.dumps(plan).encode())
            crash_point("migrate:plan-written")
            job_id = _open_job(reg, record.device_id, version.name, plan["method"])
            crash_point("migrate:job-started")
            try:
                plan.update(_make_adapter(store, version, plan["method"], address, data, settings, on_step, min_retention))
            except PloraError as err:
                reg.fail_job(job_id, f"{type(err).__name__}: {err}")
                (staging / PLAN).unlink()  # a clean failure: a re-run may choose again (say, distill after copy)
                raise
            except BaseException as err:  # killed or crashed: the old adapter stands, a re-run resumes
                reg.interrupt_job(job_id, type(err).__name__)
                raise
            crash_point("migrate:adapter-verified")
            write_atomically(staging / PLAN, json.dumps(plan).encode())
            write_atomically(staging / DeviceStore.RECORD, json.dumps(plan.pop("record"), indent=2).encode())
            crash_point("migrate:staged")
        _switch(root, plan["from"])
        return _finish(reg, root, report, _read_plan(staging))


def _check_target(root: Path, plan: dict | None, version: BackboneVersion, switched: bool) -> None:
    """Refuse a target other than the one a half-done migration is heading to, or a retired
    one (unless the device is on it already: then only the registry is left to bring in line)."""
    if plan and plan["to"] != version.name:
        raise ConfigError(f"{root} is midway through a migration to {plan['to']}; finish that one first (plora migrate --to {plan['to']})")
    if not switched and version.status == BackboneStatus.RETIRED:
        raise ConfigError(f"backbone version {version.name} is retired; migrate to an active one")


def _read_plan(staging: Path) -> dict | None:
    path = staging / PLAN
    return json.loads(path.read_text()) if path.is_file() else None


def _open_job(reg: Registry, device_id: str, target: str, method: str) -> int:
    """The unfinished migrate job of an earlier, interrupted attempt, or a new one."""
    unfinished = [j for j in reg.migration_jobs(device_id, target) if j.status in (JobStatus.RUNNING, JobStatus.INTERRUPTED)]
    if unfinished:
        return reg.resume_job(unfinished[-1].id).id
    return reg.start_job(device_id, "migrate", {"method": method}, target=target)


def _target_record(store: DeviceStore, version: BackboneVersion, address: str | None) -> DeviceRecord:
    """The device's record as it will be on `version`; a networked device fetches its bundle."""
    old = store.record
    if is_address(old.backbone_spec):
        endpoint = Endpoint(address or old.backbone_spec, **(old.endpoint or {}))
        hosted = describe(endpoint, version.name)
        identity = hosted.identity
        staging, public = store.root / DeviceStore.MIGRATION, store.public_store()
        if public is not None or not (staging / DeviceStore.BUNDLE / "config.json").is_file():  # else: fetched before
            credentials = Credentials.load(store.root / DeviceStore.CREDENTIALS)
            fetch_bundle(staging, endpoint, credentials, hosted, None if public is None else public.root)
        spec, bundle_sha256 = old.backbone_spec, hosted.bundle_sha256
    else:
        backbone, config = load_version(version)
        identity, spec, bundle_sha256 = backbone.identity(config), version.source, None
    return replace(old, backbone_spec=spec, identity=identity, bundle_sha256=bundle_sha256)  # the rest is the device's own


def _device_text(store: DeviceStore, data: Path | None, tokenizer) -> tuple[list[TokenizedExample], list[TokenizedExample], str]:
    """(text to distill on, text to measure on, what the latter is): the given file, else the
    user's text the device keeps; nothing when it keeps none."""
    examples = [example for path in ([data] if data else store.private_text())
                for example in tokenize(load_examples(path), tokenizer, DEVICE_JOB_MAX_LENGTH)]
    heldout = store.root / DeviceStore.PRIVATE_HELDOUT
    if examples and data is None and heldout.is_file():
        return examples, tokenize(load_examples(heldout), tokenizer, DEVICE_JOB_MAX_LENGTH), "the user's held-out text"
    return examples, examples, "the user's text" if examples else ""


def _make_adapter(
    store: DeviceStore, version: BackboneVersion, method: str, address: str | None, data: Path | None,
    settings: DistillSettings, on_step: Callable[[int, int, float], None] | None, min_retention: float,
) -> dict:
    """Make, verify and stage the new M; returns the metrics and the new record for the plan."""
    staging = store.root / DeviceStore.MIGRATION
    new_record = _target_record(store, version, address)
    old = open_device(store.root, address)
    try:
        pad = old.tokenizer.pad_token_id
        examples, heldout, measured_on = _device_text(store, data, old.tokenizer)
        users_text = bool(examples)
        if not users_text:  # no text of its own: text the base model writes on generic prompts
            log.warning("%s keeps none of its user's text: the migration distills on generic text, which carries little "
                        "of the personalization, and cannot measure how much it keeps", store.root)
            examples = write_anchor(old.model, old.tokenizer, AnchorSettings(), seed=settings.seed)
            heldout, measured_on = examples, "generic text (the device keeps none of its user's)"
        targets = teacher_targets(old.model, examples, pad, settings.top_k)
        before = {"heldout_loss": evaluate(old.model, heldout, pad)}
        with old.model.base_model():
            before["base_heldout_loss"] = evaluate(old.model, heldout, pad)
        old_weights, steps = old.model.weights, old.steps
    finally:
        old.close()
    bundle = staging / DeviceStore.BUNDLE if is_address(new_record.backbone_spec) and new_record.public is None else None
    student, _ = connect(store, new_record, address, bundle)
    try:
        with student.base_model():
            after = {"base_heldout_loss": evaluate(student, heldout, pad)}
        if can_copy(old_weights, student.weights):
            copy_weights(old_weights, student.weights)  # the copy, and distillation's starting point
        elif method == "copy":
            copy_weights(old_weights, student.weights)  # raises, saying why
        after.update(kl_to_old_at_start=mean_kl(student, examples, targets, pad), heldout_loss_at_start=evaluate(student, heldout, pad))
        tokens = 0
        if method == "distill":
            checkpoint = TrainingCheckpoint(staging / CHECKPOINT, fingerprint(examples, settings, version.name))
            progress = distill(student, examples, targets, pad, settings, checkpoint, on_step)
            after["distill_steps"], tokens = progress.step, progress.tokens
        after["kl_to_old"] = mean_kl(student, examples, targets, pad)
        after["heldout_loss"] = evaluate(student, heldout, pad)
        gain = before["base_heldout_loss"] - before["heldout_loss"]
        if users_text and gain >= NO_GAIN:
            after["gain_kept"] = (before["base_heldout_loss"] - after["heldout_loss"]) / gain
            if min_retention > 0 and after["gain_kept"] < min_retention:  # 0: any outcome, worse than the base included
                raise MigrationRefused(
                    f"{store.root}: the new M keeps {after['gain_kept']:.0%} of the personalization's gain on {measured_on} "
                    f"(base model {before['base_heldout_loss']:.3f} nats/token, personalized {before['heldout_loss']:.3f} on "
                    f"{store.record.identity.version}, {after['heldout_loss']:.3f} on {version.name}), below the "
                    f"{min_retention:.0%} required; the device stays on {store.record.identity.version}. Distill with more "
                    "--steps, or accept the loss with --min-retention 0", before, after)
        save_adapter(staging / DeviceStore.ADAPTER, student.weights, AdapterHeader(new_record.identity, steps))
        stored, _ = load_adapter(staging / DeviceStore.ADAPTER, new_record.identity)  # verify: it reads back as made
        if any(not stored[name].equal(t) for name, t in student.weights.named_tensors()):
            raise ConfigError(f"{staging / DeviceStore.ADAPTER} does not read back as written")
    finally:
        student.link.close()
    (staging / CHECKPOINT).unlink(missing_ok=True)
    return {"before": before, "after": after, "tokens": tokens, "measured_on": measured_on, "record": new_record.to_json()}


def _switch(root: Path, old_version: str) -> None:
    """Put the staged files in place, keeping the old ones; every step safe to redo.

    The record is copied aside and then replaced in one rename, never moved away first: a
    folder killed between two renames would hold no record, and would not be a device any
    more (`plora migrate --root` would even take the staging folder for one)."""
    staging, kept = root / DeviceStore.MIGRATION, root / DeviceStore.PREVIOUS / old_version
    kept.mkdir(parents=True, exist_ok=True)
    for name in _SWITCHED:
        if not (staging / name).exists():
            continue  # switched already (or a local device, which has no bundle)
        if name == DeviceStore.RECORD:
            discard_partial_writes(kept, (name,))  # a copy cut short by a kill
            write_atomically(kept / name, (root / name).read_bytes())
        elif (root / name).exists():
            if (kept / name).is_dir():
                shutil.rmtree(kept / name)  # left by an older migration away from the same version
            os.replace(root / name, kept / name)
        crash_point(f"migrate:kept:{name}")
        os.replace(staging / name, root / name)
        crash_point(f"migrate:switched:{name}")


def _finish(reg: Registry, root: Path, report: MigrationReport, plan: dict | None) -> MigrationReport:
    """Bring the registry in line with the device's files, close the job, clear the staging."""
    device = reg.get_device(report.device_id)
    if device.backbone_version_id != reg.get_backbone(report.target).id:
        reg.bind_device(report.device_id, report.target)
    crash_point("migrate:rebound")
    open_jobs = [j for j in reg.migration_jobs(report.device_id, report.target) if j.status in (JobStatus.RUNNING, JobStatus.INTERRUPTED)]
    if plan is None and not open_jobs:
        report.outcome = "already there"
    if plan:
        report.source, report.method = plan["from"], plan["method"]
        report.before, report.after = plan.get("before", {}), plan.get("after", {})
        report.measured_on = plan.get("measured_on", "")
    for job in open_jobs:
        if job.status == JobStatus.INTERRUPTED:
            reg.resume_job(job.id)
        tokens = plan.get("tokens", 0) if plan else 0
        reg.finish_job(job.id, report.before or None, report.after or None, tokens, int(report.after.get("distill_steps", 0)))
        report.job_id = job.id
    crash_point("migrate:job-finished")
    shutil.rmtree(root / DeviceStore.MIGRATION, ignore_errors=True)
    return report


def migrate_devices(
    folders: list[Path],
    target: str,
    method: str,
    reg: Registry,
    address: str | None,
    data: Path | None,
    settings: DistillSettings,
    dry_run: bool,
    min_retention: float,
    on_device: DeviceProgress,
) -> tuple[list[dict], list[str]]:
    """Migrate the devices in `folders` one after another, in this process (`plora migrate
    --engine direct`), as `migrate_device` does each. A device whose new M is refused stays as
    it was, and the others go on. Returns a report per device, and each refusal's message."""
    reports, refused = [], []
    with nullcontext() if dry_run else service_for(folders, target, reg, address) as reach:
        for folder in folders:
            last: list = [None, None, None]  # the device's last step, total and loss, shown with its outcome

            def on_step(step: int, total: int, loss: float, key: str = folder.name, last: list = last) -> None:
                last[:] = step, total, loss
                on_device(key, "distilling", step, total, loss)

            on_device(folder.name, "checking" if dry_run else "preparing", None, None, None)
            try:
                report = asdict(migrate_device(folder, target, method, reg, reach, data, settings, dry_run, on_step, min_retention))
            except MigrationRefused as err:
                refused.append(str(err))
                report = {"device_id": DeviceStore.open(folder, midway=True).record.device_id, "method": method,
                          "outcome": "refused", "before": err.before, "after": err.after}
            on_device(folder.name, report["outcome"], *last)
            reports.append(report)
    return reports, refused


def device_folders(root: Path, wanted: Sequence[str] = ()) -> list[Path]:
    """`root` if it is a device folder, else the device folders in it; only `wanted` ids if given."""
    root = Path(root)
    if (root / DeviceStore.RECORD).is_file():
        found = [root]
    elif root.is_dir():
        found = sorted(p for p in root.iterdir() if (p / DeviceStore.RECORD).is_file())
    else:
        raise ConfigError(f"{root} is not a folder")
    if not found:
        raise ConfigError(f"{root} holds no device folders (folders with {DeviceStore.RECORD})")
    if not wanted:
        return found
    by_id = {DeviceStore.open(p, midway=True).record.device_id: p for p in found}
    missing = [d for d in wanted if d not in by_id]
    if missing:
        raise ConfigError(f"no device {', '.join(missing)} under {root}; it holds {', '.join(sorted(by_id))}")
    return [by_id[d] for d in wanted]


def resolve_target(reg: Registry, target: str, folders: list[Path], address: str | None) -> str | None:
    """Make sure `reg` knows version `target`; returns where networked devices reach a service
    hosting it. A device on a host of its own knows no version but its own, so a `target` this
    registry does not know is asked of the service at `address`, else of the one the devices are
    bound to, recorded as that service describes it, and that service is the answer. Otherwise
    the answer is `address`, which may be None: service_for then starts a service from `reg`."""
    try:
        reg.get_backbone(target)
        return address
    except RegistryError:
        records = [r for r in (DeviceStore.open(f, midway=True).record for f in folders) if is_address(r.backbone_spec)]
        if address is None and not records:
            raise  # local devices: no registry but this one could know the version
    bound = sorted({record.backbone_spec for record in records})
    if address is None and len(bound) != 1:
        raise ConfigError(f"this registry knows no backbone version {target!r}, and the devices are bound to "
                          f"{len(bound)} services; give --backbone HOST:PORT of a service hosting it")
    address = address or bound[0]
    endpoint = Endpoint(address, **((records[0].endpoint if records else None) or {}))
    ensure_version(reg, describe(endpoint, target).identity, address)
    return address


@contextmanager
def service_for(folders: list[Path], target: str, reg: Registry, address: str | None) -> Iterator[str | None]:
    """Where networked devices reach a service hosting their versions and `target`: `address`,
    or else one started on loopback for the migration. Local devices need none."""
    networked = [f for f in folders if is_address(DeviceStore.open(f, midway=True).record.backbone_spec)]
    if address or not networked:
        yield address
        return
    versions = {reg.get_backbone(reg.get_device(DeviceStore.open(f, midway=True).record.device_id).backbone_version_id).name
                for f in networked}
    server = start_service([], None, reg, registered=sorted(versions | {reg.get_backbone(target).name}))
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.stop(grace_s=1)
