"""Per-user personalization jobs: one user's data, one device, recorded in the registry.

The adapter on disk changes only when a job succeeds, so a job that fails (bad data,
a crash) leaves the previous personalization in place and is marked failed with its reason.
Unless the settings turn it off, jobs keep the model close to the base on generic text, the
anchor (clients.anchor), which the device's base model writes on its first job, and whose
base-model targets the first job computes and every later one reads back.

No ending of a job blocks the device. Every run is a job of its own: one that finds a
checkpoint of the same data and settings (left by a job that failed, was interrupted or was
killed) resumes it and records where from, in its params; any other starts afresh. A run
first takes the device's lock, and then closes as interrupted whatever job of the device the
registry still shows open: with the lock held, no process runs it any more.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from plora.clients.anchor import Anchor, AnchorSettings, kept_anchor, probe_key, text_key, write_anchor, write_probe
from plora.clients.checkpoint import Resumable, TrainingCheckpoint
from plora.clients.data import PERSONALIZE_MAX_LENGTH, TokenizedExample, load_examples, tokenize
from plora.clients.device_store import DeviceRecord, DeviceStore
from plora.clients.grpc_link import Credentials, Endpoint, send_job_reports
from plora.clients.search import CrossValidation, LrSearch, SearchResult, cross_validate, personalization_settings, search_lr
from plora.clients.training import DriftProbe, TrainResult, TrainSettings, evaluate, fingerprint, personalize
from plora.cloud_backbone.versions import ensure_version
from plora.platform.runtime import Device, is_address
from plora.storage.crashpoints import crash_point
from plora.storage.errors import ConfigError, PloraError, RegistryError
from plora.storage.files import discard_partial_writes, exclusive, write_atomically
from plora.storage.models import JobStatus
from plora.storage.registry import Registry, open_registry

log = logging.getLogger(__name__)

# What a device is doing: (device, phase, step, total, loss); the last three are None while it
# is in a phase without training steps. A Board's `update` is one.
DeviceProgress = Callable[[str, str, int | None, int | None, float | None], None]

CHECKPOINT = "checkpoint.safetensors"  # in the device folder while a job is in progress
ANCHOR = "anchor.json"  # in the device's public folder: the anchor text its base model wrote
ANCHOR_TARGETS = "anchor-targets.safetensors"  # next to it: the base model's targets on that text
PROBE = "probe.json"  # next to them: the base model's text on generic prompts no job trains on
ANCHOR_LOCK = ".anchor.lock"  # next to them in a shared store: held while they or the probe are read or made
LOCK = ".job.lock"  # in the device folder: held by the process running a job on the device
ABANDONED = "its process ended without closing it (killed?); closed by the device's next run"

# How a job's learning rate was selected, as its record says (params["selection"]).
SEARCHED = "searched"
CROSS_VALIDATED = "cross-validated: no validation split"
PINNED = "pinned by --lr"
FIXED_FEW = "fixed: too few examples to cross-validate"
FIXED_FEW_STEPS = "fixed: too few steps to search"
HOLDOUT_MIN_EXAMPLES = 10
"""Fewer examples hold no validation split out: the job cross-validates instead."""
VAL_MIN_EXAMPLES = 2
"""A validation split holds at least this many examples. One example is one draw, and the job
follows it wherever it leads: a Shakespeare speaker's 12 blocks held 1 out at 10%, whose loss was
lowest at step 12 of the chosen rate's run, where the held-out gain had fallen to 0.090 nats from
0.172 at step 6. Holding 3 out (training on 9), validation was lowest at step 3, where the held-out
gain was 0.134, its highest of the run, and in `plora bench quality` the speaker's job went from
59% of PEFT LoRA's held-out gain (generic text +8.1%) to 71% (+1.7%), LoRA on the same split
alike. But 3 is more than a persona's 24 notes give (2), and the third note held out left one more
fact with 2 of its 3 notes to train on: two of four personas then recalled 7 of their 8 facts
where they had recalled all 8. Holding 2 of the speaker's blocks out, its job kept 90% of LoRA's
gain (generic text +2.1%), and the personas' splits are as they were."""


def register(record: DeviceRecord, reg: Registry) -> None:
    """Make sure the registry knows this device and the backbone version it is bound to.

    A device enrolled with a service is already known to a registry the service shares."""
    try:
        reg.get_device(record.device_id)
    except RegistryError:
        version = ensure_version(reg, record.identity, record.backbone_spec)
        reg.register_device(record.device_id, version.name)


def split_holdout(examples: list[TokenizedExample], fraction: float, seed: int,
                  at_least: int = VAL_MIN_EXAMPLES) -> tuple[list, list]:
    """(train, validation): `fraction` of the examples, at least `at_least`, for validation; none
    when `fraction` is 0 or there are fewer than HOLDOUT_MIN_EXAMPLES."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_val = max(at_least, int(len(shuffled) * fraction)) if fraction and len(shuffled) >= HOLDOUT_MIN_EXAMPLES else 0
    return shuffled[n_val:], shuffled[:n_val]


def device_anchor(device: Device, settings: AnchorSettings) -> Anchor:
    """The device's anchor: its text and the base model's targets on it, made on first use and
    then kept, since making them costs a generation and a forward pass over the text, and only
    the backbone and the settings change them. Devices sharing a PublicStore share it: it is
    the base model's, and one of them makes it while the others wait."""
    version = device.store.record.identity.version
    folder = device.store.public_folder()
    with _public_folder_lock(device):
        text = _kept_text(folder / ANCHOR, f"{version}/{text_key(settings, settings.text_seed)}",
                          lambda: write_anchor(device.model, device.tokenizer, settings, settings.text_seed))
        return kept_anchor(folder / ANCHOR_TARGETS, device.model, text, device.tokenizer.pad_token_id, settings.top_k, version)


def device_probe(device: Device, seed: int) -> list[TokenizedExample]:
    """The device's probe text (clients.anchor.write_probe) of `seed`, written on first use and
    kept beside its anchor, as the anchor is."""
    folder = device.store.public_folder()
    with _public_folder_lock(device):
        return _kept_text(folder / PROBE, f"{device.store.record.identity.version}/{probe_key(seed)}",
                          lambda: write_probe(device.model, device.tokenizer, seed))


def _public_folder_lock(device: Device) -> AbstractContextManager:
    """Held while the anchor or the probe in the device's public folder is read or made: a store's
    lock where devices share it; none in a device's own folder, under its job lock already (device_job)."""
    return exclusive(device.store.public_folder() / ANCHOR_LOCK) if device.store.public_store() else nullcontext()


def _kept_text(path: Path, key: str, write: Callable[[], list[TokenizedExample]]) -> list[TokenizedExample]:
    """The text kept in `path` under `key`, else `write()`'s, kept there."""
    try:
        kept = json.loads(path.read_text())
        if kept["key"] == key:
            return [TokenizedExample(ids, labels) for ids, labels in kept["examples"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or unreadable: write it afresh
    examples = write()
    stored = {"key": key, "examples": [[e.input_ids, e.labels] for e in examples]}
    write_atomically(path, json.dumps(stored).encode())
    return examples


@dataclass
class JobOutcome:
    job_id: int
    result: TrainResult
    loss_before: float  # on validation if there is one, else on the training set
    loss_after: float
    generic_drift: float  # the NLL change of the kept M on generic text no job trains on (clients.training.DriftProbe)
    selection: str = PINNED  # how the learning rate was selected: SEARCHED, CROSS_VALIDATED, PINNED or a FIXED_*
    lr: float | None = None  # the rate M was trained at; None when the search found none worth training
    search: SearchResult | CrossValidation | None = None  # how it chose, when it chose in this run (not when resumed)

    @property
    def improved(self) -> bool | None:
        """Whether M beat the starting M on validation, or training did in cross-validation
        (else the job kept the starting M exactly); None when the job could check neither."""
        if self.selection == CROSS_VALIDATED:
            return self.lr is not None
        return None if self.result.val_before is None else bool(self.result.best_step)


@contextmanager
def device_job(store: DeviceStore, reg: Registry, address: str | None = None) -> Iterator[None]:
    """Run a job on the device alone, after clearing up what a killed job left behind; then
    report its jobs to its service (at `address` if it moved).

    The lock is an flock, which the kernel drops with its holder, SIGKILL included: once it
    is held, no other process runs a job on this device, so an open job in the registry, or a
    half-written temp file in the folder, was left by a process that is gone."""
    fd = os.open(store.root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 16, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(
                f"{store.root} is busy: process {holder} is running a job on it; wait for it to end, or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        discard_partial_writes(store.root, (CHECKPOINT, ANCHOR, ANCHOR_TARGETS, PROBE, DeviceStore.ADAPTER, DeviceStore.RECORD))
        for job_id in reg.interrupt_abandoned_jobs(store.record.device_id, ABANDONED):
            log.warning("job %d of device %s was left open by a process that is gone; closed as interrupted",
                        job_id, store.record.device_id)
        try:
            yield
        except Exception:
            report_jobs(store, reg, address)
            raise
        report_jobs(store, reg, address)  # not after Ctrl-C or a kill: the next job's end reports it
    finally:
        os.close(fd)


def report_jobs(store: DeviceStore, reg: Registry, address: str | None = None) -> None:
    """Tell a networked device's service what became of its jobs since it last heard, each
    job's metadata once per status, so that the operator sees the jobs of devices on hosts of
    their own. Best effort: what a service out of reach missed, it hears after the next job."""
    record = store.record
    if not is_address(record.backbone_spec):
        return
    try:
        if jobs := reg.jobs_to_report(record.device_id):
            endpoint = Endpoint(address or record.backbone_spec, **(record.endpoint or {}))
            send_job_reports(endpoint, Credentials.load(store.root / DeviceStore.CREDENTIALS), [reg.job_report(job) for job in jobs])
            reg.mark_reported({job.uuid: job.status for job in jobs})
    except Exception as err:  # noqa: BLE001 - a report is never worth failing, or hiding, the job's own outcome
        log.warning("the service did not hear of this device's latest jobs (%s: %s); it hears of them after the next job",
                    type(err).__name__, err)


def run_personalization(
    device: Device,
    data_path: Path,
    settings: TrainSettings | None = None,
    max_length: int = PERSONALIZE_MAX_LENGTH,
    val_fraction: float = 0.1,
    on_step: Callable[[int, int, float], None] | None = None,
    reg: Registry | None = None,
    checkpoint_every: int = 10,
    search: LrSearch | None = None,
    on_search_step: Callable[[int, int, float], None] | None = None,
    keep_text: bool = True,
) -> JobOutcome:
    """Train the device's M on a local file, save it, and record the job.

    With `search`, the job picks its learning rate on the device from its validation split
    (clients.search: a few candidate rates tried briefly, the best run for the whole budget,
    stopping early when validation stops improving; at most about twice a plain job's work);
    if no candidate beats the starting M, the job keeps the starting M. Without a validation
    split (fewer than HOLDOUT_MIN_EXAMPLES), it cross-validates training at `settings.lr`
    against keeping the starting M (clients.search.cross_validate) and does the better. With a
    single example, or a budget too small to search, it trains at `settings.lr`. Without
    `search`, `settings.lr` is pinned. With no settings at all, the job runs the default
    settings and chooses. The job's record says which selection it
    used, what was tried and what was kept. `on_search_step` reports the trials' steps.

    Progress is checkpointed on the device; running the same job again after an interruption
    or a failure resumes it, under a new job whose params name the job and step resumed. A
    searched job resumes at the rate it chose (its trials are redone only when it was killed
    during them).

    With `keep_text`, the device keeps the data it trained on (DeviceStore.keep_text): a
    backbone upgrade distills the personalization on it, and without it only generic text
    is left to distill on, which carries none of what the user taught the model.
    """
    if settings is None:
        settings, search = TrainSettings(), search or LrSearch()
    reg = reg or open_registry()
    register(device.store.record, reg)
    with device_job(device.store, reg, device.address):
        return _personalization_job(device, data_path, settings, max_length, val_fraction, on_step, reg, checkpoint_every,
                                    search, on_search_step, keep_text)


def _resumable(checkpoint: TrainingCheckpoint, device_id: str, reg: Registry) -> Resumable | None:
    """The checkpoint's job, unless that job succeeded: then its result is the adapter already,
    and the checkpoint only outlived it because the process was killed before removing it."""
    found = checkpoint.resumable()
    if found is None:
        return None
    try:
        job = reg.get_job(found.job["id"])
        done = job.device_id == device_id and job.status == JobStatus.SUCCEEDED
    except RegistryError:
        done = False  # a registry that never knew the job: the device's progress still counts
    if done:
        checkpoint.clear()
        return None
    return found


def _selection(search: LrSearch | None, train: list, val: list, settings: TrainSettings) -> str:
    if search is None:
        return PINNED
    if not val:
        return CROSS_VALIDATED if len(train) >= search.folds else FIXED_FEW
    return SEARCHED if search.trial_steps(settings.total_steps(len(train))) >= 1 else FIXED_FEW_STEPS


def _personalization_job(
    device: Device,
    data_path: Path,
    settings: TrainSettings,
    max_length: int,
    val_fraction: float,
    on_step: Callable[[int, int, float], None] | None,
    reg: Registry,
    checkpoint_every: int,
    search: LrSearch | None,
    on_search_step: Callable[[int, int, float], None] | None,
    keep_text: bool,
) -> JobOutcome:
    record = device.store.record
    params = {"lr": settings.lr, "batch_size": settings.batch_size, "max_length": max_length}
    params.update({k: v for k, v in (("steps", settings.steps), ("epochs", settings.epochs)) if v is not None})
    params["anchor_weight"] = settings.anchor.weight if settings.anchor else 0.0
    if settings.anchor and settings.anchor.drift_budget is not None:
        params["drift_budget"] = settings.anchor.drift_budget
    if settings.anchor and settings.anchor.text_seed != AnchorSettings.text_seed:
        params["anchor_text_seed"] = settings.anchor.text_seed
    params["keeps_text"] = keep_text
    if device.fleet_start_rounds:
        params["fleet_start_rounds"] = device.fleet_start_rounds
    try:
        records = load_examples(data_path)
        examples = tokenize(records, device.tokenizer, max_length)
    except PloraError as err:
        reg.fail_job(reg.start_job(record.device_id, "personalize", params), f"{type(err).__name__}: {err}")
        raise
    train, val = split_holdout(examples, val_fraction, settings.seed)
    if not val:
        # Nothing would stop a longer run where it stops helping, and cross-validation runs the
        # job's budget once per fold: small data stays at its epochs (plora bench federated).
        settings = replace(settings, min_steps=0)
    if settings.steps is None:
        params["min_steps"] = settings.min_steps
    selection = _selection(search, train, val, settings)
    searching = selection in (SEARCHED, CROSS_VALIDATED)  # the job chooses what it trains on the device
    params["selection"] = selection
    if selection == SEARCHED:  # the rate is the job's to choose: its record says which it tried
        del params["lr"]
        params.update(lr_candidates=list(search.candidates), patience=settings.patience or search.patience)
    elif selection == CROSS_VALIDATED:
        params["cv_folds"] = search.folds
    elif settings.patience:
        params["patience"] = settings.patience
    # A job that chooses is identified by how it chooses, not by what it will choose.
    job_settings = (settings, search) if searching else settings
    checkpoint = TrainingCheckpoint(device.store.root / CHECKPOINT, fingerprint(train, job_settings, record.identity.version))
    resumed = _resumable(checkpoint, record.device_id, reg)
    # A job killed before VAL_MIN_EXAMPLES held out its fraction alone, and resumes on that split.
    old_train, old_val = split_holdout(examples, val_fraction, settings.seed, at_least=0)
    if not resumed and val and old_val and len(old_val) != len(val) and checkpoint.path.exists():
        old_checkpoint = TrainingCheckpoint(checkpoint.path, fingerprint(old_train, job_settings, record.identity.version))
        if old_resumed := _resumable(old_checkpoint, record.device_id, reg):
            train, val, checkpoint, resumed = old_train, old_val, old_checkpoint, old_resumed
    if resumed:
        params.update(resumed_from_job=resumed.job["id"], resumed_from_step=resumed.step)
    job_id = reg.start_job(record.device_id, "personalize", params)
    if resumed:
        log.info("job %d resumes job %d from its step %d", job_id, resumed.job["id"], resumed.step)
    crash_point("personalize:job-started")
    try:
        pad = device.tokenizer.pad_token_id
        measured_on = val or train
        # What the job started from is measured once: on resuming, the adapter may already
        # hold the job's result (killed after saving it), so the first run's figures stand.
        job = resumed.job if resumed else {"adapter_steps": device.steps, "loss_before": evaluate(device.model, measured_on, pad)}
        checkpoint.job = {**job, "id": job_id}
        before = job["loss_before"]
        anchor = device_anchor(device, settings.anchor) if settings.anchor else None
        probe = DriftProbe.of(device.model, device_probe(device, (settings.anchor or AnchorSettings()).text_seed), pad)
        found, lr, chosen_by = None, settings.lr, {}
        if searching:
            chosen_by = job.get("search", {})
            if not chosen_by:  # not chosen yet (a job resumed after choosing skips its trials)
                if selection == SEARCHED:
                    found = search_lr(device.model, train, val, pad, settings, search, val_before=before, anchor=anchor,
                                      probe=probe, on_step=on_search_step)
                else:
                    found = cross_validate(device.model, train, pad, settings, search, anchor=anchor, probe=probe,
                                           on_step=on_search_step)
                chosen_by = found.as_metrics()
                # Kept with every checkpoint of the run that follows, so a re-run resumes it at this rate.
                checkpoint.job = {**checkpoint.job, "search": chosen_by}
            lr = chosen_by.get("lr")
        if lr is None:  # no candidate beat the starting M: there is nothing worth training
            log.info("job %d: training beat the starting M neither on validation nor in cross-validation; keeping it",
                     job_id)
            result = TrainResult(0, 0, 0.0, float("nan"), float("nan"), before, before, 0)
        else:
            run = personalization_settings(settings, search, lr) if selection == SEARCHED else settings
            result = personalize(device.model, train, pad, run, val or None, on_step=on_step, checkpoint=checkpoint,
                                 checkpoint_every=checkpoint_every, anchor=anchor, probe=probe,
                                 val_before=before if selection == SEARCHED else None)
        crash_point("personalize:trained")
        after = result.val_after if val else evaluate(device.model, train, pad)
        drift = probe.drift(device.model)
        device.save(job["adapter_steps"] + result.steps)
        crash_point("personalize:adapter-saved")
        if keep_text and Path(data_path).resolve() not in [p.resolve() for p in device.store.private_text()]:
            device.store.keep_text(records.to_list())
    except (PloraError, OSError) as err:
        reg.fail_job(job_id, f"{type(err).__name__}: {err}")
        raise
    except BaseException as err:  # a crash or Ctrl-C: the job did not finish; a re-run resumes it
        reg.interrupt_job(job_id, type(err).__name__)
        raise
    metric = "val_loss" if val else "train_loss"
    metrics_after = {metric: after, "tokens_per_second": result.tokens_per_second, "best_step": result.best_step or result.steps,
                     "generic_drift": drift}
    if result.anchor_kl is not None:
        metrics_after.update(anchor_kl=result.anchor_kl, anchor_weight=result.anchor_weight)
    metrics_after.update(chosen_by, selection=selection, stopped_early=result.stopped_early)
    if lr is not None:
        metrics_after["lr"] = lr
    outcome = JobOutcome(job_id, result, before, after, drift, selection, lr, found)
    if val:  # False: no step beat the starting M, which the job kept
        metrics_after.update(improved=outcome.improved, best_step=result.best_step)
    elif outcome.improved is not None:  # False: cross-validation found training worse than the starting M
        metrics_after["improved"] = outcome.improved
    reg.finish_job(
        job_id,
        metrics_before={metric: before},
        metrics_after=metrics_after,
        tokens_processed=result.tokens,
        steps_done=result.steps,
    )
    crash_point("personalize:job-finished")
    # Removed only now: until the job is recorded as succeeded, a re-run resumes from it.
    checkpoint.clear()
    return outcome
