"""Kill anywhere, with a real SIGKILL: `plora personalize` and `plora migrate` are killed at
every crash point (storage.crashpoints) and at seeded random instants, then run again. After
each re-run the adapter loads and verifies, the job has finished, the device is on exactly one
version, no job of the device is left open, no half-written file is left behind, and M is the
one an uninterrupted run makes.

The commands run in processes of their own, forked from a server that imported plora once
(multiprocessing's forkserver), on the tiny checkpoint with a local backbone (the in-process
link), two cases at a time. `make soak` runs more random instants: PLORA_KILL_INSTANTS
(personalize) and PLORA_KILL_MIGRATE_INSTANTS (migrate); PLORA_KILL_SEED fixes the seed.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import random
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import forkserver
from pathlib import Path

import pytest
import torch

from plora.clients.adapter_file import load_adapter
from plora.clients.anchor import AnchorSettings
from plora.clients.checkpoint import TrainingCheckpoint
from plora.clients.data import TokenizedExample
from plora.clients.device_store import DeviceStore
from plora.clients.training import TrainSettings, fingerprint
from plora.platform.jobs import LOCK, device_anchor, device_job
from plora.storage.registry import open_registry
from plora.platform.runtime import open_device
from plora.storage import db
from plora.storage.crashpoints import ENV as CRASH_AT
from plora.storage.errors import ConfigError
from tests.integration.test_cli import plora

# Runs in one xdist worker with the other tests that start many processes (see the Makefile).
pytestmark = pytest.mark.xdist_group("processes")

STEPS = 3  # personalize: checkpoints at steps 2 and 3 (see _personalize)
DISTILL_STEPS = 11  # migrate: a checkpoint at step 10
# Where personalize is killed, and the step its re-run resumes from (None: it starts afresh).
PERSONALIZE_POINTS = {
    "personalize:job-started": None,
    "mid-write:checkpoint.safetensors": None,  # the first checkpoint, at step 2, never made it
    "checkpoint-saved": 2,
    "personalize:trained": STEPS,  # nothing is trained again
    "mid-write:adapter.safetensors": STEPS,
    "personalize:adapter-saved": STEPS,
    "personalize:job-finished": None,  # the job succeeded: running again is a job of its own
}
MIGRATE_POINTS = [
    "mid-write:plan.json",
    "migrate:plan-written",
    "migrate:job-started",
    "mid-write:checkpoint.safetensors",
    "checkpoint-saved",
    "mid-write:adapter.safetensors",
    "migrate:adapter-verified",
    "mid-write:device.json",
    "migrate:staged",
    "migrate:kept:adapter.safetensors",
    "migrate:switched:adapter.safetensors",
    "migrate:kept:device.json",
    "migrate:switched:device.json",
    "migrate:rebound",
    "migrate:job-finished",
]
PERSONALIZE_INSTANTS = int(os.environ.get("PLORA_KILL_INSTANTS", "5"))
MIGRATE_INSTANTS = int(os.environ.get("PLORA_KILL_MIGRATE_INSTANTS", "5"))
LANES = 2  # cases run side by side, one core each
FACTS = [{"text": f"My fact number {i} is {w}."} for i, w in enumerate(["teal", "Pebble", "Tartu", "Zorvan"])]

# --- running the CLI in a process of its own --------------------------------------------------

_forks = multiprocessing.get_context("forkserver")
_forks.set_forkserver_preload(["tests.integration.test_kill", "plora.platform.jobs", "plora.platform.versions.migration"])
# Set before the fork server starts: it then reads this backbone's files once, and every
# command it forks gets a copy instead of reading them again (a migration reads them three
# times). What is under test is what the commands write, not how they read a checkpoint folder.
WARM_UP = "PLORA_KILL_TEST_WARM_UP"
_POLLING = threading.Lock()
"""Starts and polls of the forked commands take turns. Process.start() polls every child started
before (multiprocessing's _cleanup), from whichever lane starts one. Two threads polling one
forkserver child race for the 4 bytes of its exit status; the loser reads EOF, which
multiprocessing reports as exit status 255, for a command that had exited 0."""


def _warm_up(backbone: Path) -> None:
    from plora.cloud_backbone import loading

    torch.set_num_threads(1)  # before any torch work: a forked child must not inherit a thread pool
    read = loading._load_files
    model, tokenizer = read(backbone)

    def read_once(path: Path):
        # Nothing changes a tokenizer once loaded, so the copies share one.
        return (copy.deepcopy(model), tokenizer) if Path(path).resolve() == backbone.resolve() else read(path)

    loading._load_files = read_once


def _cli_process(args: list[str], env: dict[str, str], log: str, fail_after_checkpoint: bool) -> None:
    """The body of a forked `plora ARGS`, its output appended to `log`."""
    os.environ.update(env)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(out, 1)
    os.dup2(out, 2)
    torch.set_num_threads(1)  # two cases run at once on two cores
    if fail_after_checkpoint:
        _link_fails_after_first_checkpoint()
    from plora.platform.cli.main import main

    main([str(a) for a in args], prog_name="plora")


def _link_fails_after_first_checkpoint() -> None:
    """The link to the backbone breaks for good right after the job's first checkpoint, as when
    the service goes away: the next training step gets the link's TransportError."""
    from plora.clients import checkpoint, training
    from plora.storage.errors import TransportError

    saved, losses = checkpoint.TrainingCheckpoint.save, (training.labelled_loss, training.anchored_loss)
    broken = []

    def save(self, *args, **kwargs):
        saved(self, *args, **kwargs)
        broken.append(True)

    def failing(loss):
        def after_the_checkpoint(*args, **kwargs):
            if broken:
                raise TransportError("the backbone service closed the stream (UNAVAILABLE)")
            return loss(*args, **kwargs)

        return after_the_checkpoint

    checkpoint.TrainingCheckpoint.save = save
    training.labelled_loss, training.anchored_loss = map(failing, losses)


if os.environ.get(WARM_UP):  # only where this module is first imported after it was set: the fork server
    _warm_up(Path(os.environ[WARM_UP]))


def _cpu_s(pid: int, last: float) -> float:
    """CPU seconds the process has used; `last` once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return last
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@dataclass
class Ran:
    status: int  # the exit status; -9 after a SIGKILL
    cpu_s: float  # CPU seconds used, as last seen
    killed_by_test: bool  # the test's SIGKILL ended it


@dataclass
class Case:
    name: str
    folder: Path

    @property
    def root(self) -> Path:
        return self.folder / "device"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.folder / 'registry.db'}"

    def run(self, args: list, crash_at: str = "", kill_at_cpu_s: float | None = None, fail_after_checkpoint: bool = False) -> Ran:
        """`plora ARGS` in a process of its own; SIGKILLed by the test once it has used
        `kill_at_cpu_s` seconds of CPU, if given and if it has not ended by then."""
        env = {"PLORA_DB_URL": self.db_url, CRASH_AT: crash_at}
        process = _forks.Process(target=_cli_process, args=(args, env, str(self.folder / "log.txt"), fail_after_checkpoint))
        with _POLLING:
            process.start()
        deadline, cpu_s, killed = time.monotonic() + 300, 0.0, False

        def exit_status() -> int | None:
            with _POLLING:
                return process.exitcode

        while exit_status() is None and time.monotonic() < deadline:
            cpu_s = _cpu_s(process.pid, cpu_s)
            if kill_at_cpu_s is not None and not killed and cpu_s >= kill_at_cpu_s:
                os.kill(process.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.01)
        status = exit_status()
        if status is None:
            os.kill(process.pid, signal.SIGKILL)
            pytest.fail(f"{self.name}: plora {args[0]} did not end within 300 s:\n{self.log()}")
        # A kill sent as the process was exiting finds it already done: it ended first.
        return Ran(status, cpu_s, killed and status == -signal.SIGKILL)

    def log(self) -> str:
        path = self.folder / "log.txt"
        return path.read_text(errors="replace")[-3000:] if path.is_file() else ""


def _in_lanes(work: list) -> list:
    """Run the callables two at a time; their results in order, or every failure at once."""
    with ThreadPoolExecutor(LANES) as pool:
        runs = [pool.submit(job) for job in work]
    failures = [str(run.exception()) for run in runs if run.exception() is not None]
    if failures:
        raise AssertionError(f"{len(failures)} of {len(work)} cases failed:\n\n" + "\n\n".join(failures))
    return [run.result() for run in runs]


# --- a device and a registry to copy for each case --------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_checkpoint):
    """A device on the tiny checkpoint with its anchor text written, registered in a registry
    that also holds v2 (the same weights with fresh projections), and the data to train on."""
    os.environ[WARM_UP] = str(tiny_checkpoint)
    forkserver.ensure_running()  # it imports and warms up while the template is made
    del os.environ[WARM_UP]
    folder = tmp_path_factory.mktemp("kill-template")
    root = folder / "device"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PLORA_DB_URL", f"sqlite:///{folder / 'registry.db'}")
        plora("backbone", "register", "--backbone", tiny_checkpoint, "--rank", "4")
        plora("backbone", "register", "--backbone", tiny_checkpoint, "--rank", "4", "--seed", "1")
        plora("device", "init", root, "--backbone", tiny_checkpoint, "--rank", "4")
        device = open_device(root)
        device_anchor(device, AnchorSettings())  # what every first job would write; written once here
        device.close()
        v1 = device.store.record.identity.version
        (v2,) = [b.name for b in open_registry().list_backbones() if b.name != v1]
        db.close_all()
    lines = "".join(json.dumps(fact) + "\n" for fact in FACTS)
    (folder / "data.jsonl").write_text(lines)
    (root / DeviceStore.PRIVATE_TRAIN).parent.mkdir()
    (root / DeviceStore.PRIVATE_TRAIN).write_text(lines)  # the device's own text, to distill on
    return folder, v1, v2


def _case(template, tmp_path: Path, name: str) -> Case:
    folder = tmp_path / name.replace(":", "-")
    shutil.copytree(template[0] / "device", folder / "device")
    for name_in_template in ("registry.db", "data.jsonl"):
        shutil.copy(template[0] / name_in_template, folder / name_in_template)
    return Case(name, folder)


def _command(kind: str, case: Case, v2: str) -> list:
    return _personalize(case) if kind == "personalize" else _migrate(case, v2)


def _personalize(case: Case) -> list:
    return ["personalize", case.root, "--data", case.folder / "data.jsonl", "--steps", STEPS, "--checkpoint-every", 2,
            "--batch-size", 2, "--max-length", 32, "--val-fraction", 0, "--lr", 0.05]


def _migrate(case: Case, v2: str) -> list:
    return ["migrate", "--to", v2, "--root", case.root, "--method", "distill", "--steps", DISTILL_STEPS]


# --- what must hold after every re-run --------------------------------------------------------


def _adapter(case: Case) -> tuple[dict[str, torch.Tensor], int]:
    store = DeviceStore.open(case.root)  # refused while a migration is half switched
    tensors, header = load_adapter(store.adapter_path, store.record.identity)  # checks the checksum and the binding
    return tensors, header.steps


def _check_recovered(case: Case, kind: str, version: str) -> list:
    """The device is whole after its re-run; returns its jobs of `kind`, oldest first."""
    store = DeviceStore.open(case.root)
    assert store.record.identity.version == version, case.name
    reg = open_registry(case.db_url)
    assert reg.get_backbone(reg.get_device(store.record.device_id).backbone_version_id).name == version, case.name
    jobs = sorted(reg.list_jobs(store.record.device_id), key=lambda j: j.id)
    assert not [j for j in jobs if j.status in ("running", "pending")], f"{case.name}: jobs left open: {jobs}"
    mine = [j for j in jobs if j.kind == kind]
    assert mine and mine[-1].status == "succeeded", f"{case.name}: {mine}"
    succeeded = {j.id for j in mine if j.status == "succeeded"}
    resumed = [j.params["resumed_from_job"] for j in mine if "resumed_from_job" in j.params]
    assert not succeeded & set(resumed), f"{case.name}: a job that had succeeded was resumed: {mine}"
    assert not (case.root / DeviceStore.MIGRATION).exists(), case.name
    stray = [p.name for p in case.root.iterdir() if p.name.startswith(".") and p.name != LOCK]
    assert not stray, f"{case.name}: half-written files left behind: {stray}"
    return mine


def _same_m(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], what: str) -> None:
    assert tensors.keys() == reference.keys()
    worst = max((tensors[k] - reference[k]).abs().max().item() for k in reference)
    assert worst < 1e-5, f"{what}: M differs from an uninterrupted run's by {worst:.2e}"


def _killed(case: Case, args: list, crash_at: str) -> None:
    status = case.run(args, crash_at=crash_at).status
    assert status == -signal.SIGKILL, f"{case.name}: expected a SIGKILL at {crash_at}, got exit status {status}:\n{case.log()}"


def _rerun(case: Case, args: list) -> Ran:
    ran = case.run(args)
    assert ran.status == 0, f"{case.name}: the re-run failed (exit status {ran.status}):\n{case.log()}"
    return ran


def _personalize_recovers(case: Case, v1: str, reference: dict[str, torch.Tensor]) -> list:
    _rerun(case, _personalize(case))
    jobs = _check_recovered(case, "personalize", v1)
    tensors, steps = _adapter(case)
    if sum(j.status == "succeeded" for j in jobs) == 1:  # the killed job had not finished
        _same_m(tensors, reference, case.name)
        assert steps == STEPS, f"{case.name}: the adapter says {steps} steps, not {STEPS}"
    return jobs


def _migrate_recovers(case: Case, v2: str, reference: dict[str, torch.Tensor]) -> list:
    _rerun(case, _migrate(case, v2))
    jobs = _check_recovered(case, "migrate", v2)
    assert len(jobs) == 1, f"{case.name}: one migration, one job; got {jobs}"
    _same_m(_adapter(case)[0], reference, case.name)
    return jobs


# --- the tests ----------------------------------------------------------------------------------


SEED = int(os.environ.get("PLORA_KILL_SEED", random.SystemRandom().randrange(2**32)))


@pytest.mark.parametrize("kind", ["personalize", "migrate"])
def test_killed_anywhere_a_rerun_finishes_the_job(kind, template, tmp_path):
    _, v1, v2 = template
    points, instants_wanted = (PERSONALIZE_POINTS, PERSONALIZE_INSTANTS) if kind == "personalize" else (MIGRATE_POINTS, MIGRATE_INSTANTS)
    started, cpu_before = time.perf_counter(), _forked_cpu_s()
    reference_case = _case(template, tmp_path, "reference")
    reference_cpu_s = _rerun(reference_case, _command(kind, reference_case, v2)).cpu_s
    reference = _adapter(reference_case)[0]

    def recovers(case: Case) -> list:
        if kind == "personalize":
            return _personalize_recovers(case, v1, reference)
        return _migrate_recovers(case, v2, reference)

    def killed_at_point(point: str):
        def case_run() -> str:
            case = _case(template, tmp_path, point)
            _killed(case, _command(kind, case, v2), point)
            rerun = recovers(case)[-1]
            if kind == "personalize":
                resumed_from = rerun.params.get("resumed_from_step")
                assert resumed_from == points[point], f"{case.name}: the re-run resumed from step {resumed_from}"
            return f"killed at {point}: recovered"

        return case_run

    def killed_at_instant(n: int, cpu_s: float):
        def case_run() -> str:
            case = _case(template, tmp_path, f"instant-{n}")
            began = time.perf_counter()
            ran = case.run(_command(kind, case, v2), kill_at_cpu_s=cpu_s)
            wall_s = time.perf_counter() - began
            assert ran.status == (-signal.SIGKILL if ran.killed_by_test else 0), f"{case.name}: {ran}:\n{case.log()}"
            recovers(case)
            if not ran.killed_by_test:
                return f"to be killed at {cpu_s:.2f} CPU-s: it ended first, at {ran.cpu_s:.2f}"
            return f"killed at {cpu_s:.2f} CPU-s ({wall_s:.1f} s in): recovered"

        return case_run

    # An instant is the CPU time the command has used, so that it falls at the same point of
    # the run however loaded the machine is: a fraction of what an uninterrupted run used.
    draw = random.Random(f"{SEED}-{kind}")
    instants = [round(draw.random() * reference_cpu_s, 2) for _ in range(instants_wanted)]
    print(f"\nplora {kind}: kill seed {SEED} (PLORA_KILL_SEED={SEED} repeats it); an uninterrupted run uses "
          f"{reference_cpu_s:.2f} CPU-s; random kill instants (CPU-s): {instants}")
    work = [killed_at_instant(n, cpu_s) for n, cpu_s in enumerate(instants)] + [killed_at_point(p) for p in points]
    for line in _in_lanes(work):
        print(f"plora {kind} {line}")
    print(f"plora {kind}: {len(work)} kill cases in {time.perf_counter() - started:.0f} s, "
          f"{_forked_cpu_s() - cpu_before:.0f} CPU-s")


def _forked_cpu_s() -> float:
    """CPU seconds the forked commands have spent (the fork server's reaped children), a
    figure of what the cases cost that does not depend on how loaded the machine is."""
    pid = forkserver._forkserver._forkserver_pid  # noqa: SLF001  (a figure to print, no more)
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime + cstime


def test_a_job_that_failed_after_its_checkpoint_is_resumed_under_a_new_job(template, tmp_path):
    _, v1, _ = template
    straight, failing = _case(template, tmp_path, "straight"), _case(template, tmp_path, "failing")
    statuses = _in_lanes([
        lambda: straight.run(_personalize(straight)).status,
        lambda: failing.run(_personalize(failing), fail_after_checkpoint=True).status,
    ])
    assert statuses == [0, 1], f"{statuses}:\n{failing.log()}"
    (failed,) = open_registry(failing.db_url).list_jobs(DeviceStore.open(failing.root).record.device_id)
    assert failed.status == "failed" and "TransportError" in failed.reason

    _rerun(failing, _personalize(failing))
    first, resumed = _check_recovered(failing, "personalize", v1)
    assert first.id == failed.id and first.status == "failed"
    assert resumed.params["resumed_from_job"] == failed.id and resumed.params["resumed_from_step"] == 2
    assert resumed.steps_done == STEPS
    tensors, steps = _adapter(failing)
    _same_m(tensors, _adapter(straight)[0], "resumed after a failure")
    assert steps == STEPS


def test_a_device_runs_one_job_at_a_time_and_its_lock_dies_with_its_holder(template, tmp_path):
    case = _case(template, tmp_path, "busy")
    store = DeviceStore.open(case.root)
    reg = open_registry(case.db_url)
    with device_job(store, reg):
        running = reg.start_job(store.record.device_id, "personalize", {})
        with pytest.raises(ConfigError, match=f"busy: process {os.getpid()} is running a job"):
            with device_job(store, reg):
                pass
        assert reg.get_job(running).status == "running"  # a live holder's job is left alone
    with device_job(store, reg):  # released: the next run closes what the holder left open
        assert reg.get_job(running).status == "interrupted"


def test_an_unreadable_checkpoint_does_not_block_the_device_the_job_starts_afresh(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")  # a damaged disk's idea of a checkpoint
    assert TrainingCheckpoint(path, "fingerprint").resumable() is None


def test_a_checkpoint_made_for_another_backbone_version_is_not_resumed():
    train = [TokenizedExample([1, 2, 3], [1, 2, 3])]
    settings = TrainSettings(steps=STEPS)
    assert fingerprint(train, settings, "tiny-v1") != fingerprint(train, settings, "tiny-v2")
