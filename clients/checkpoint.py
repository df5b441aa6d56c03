"""Checkpoints of a training job in progress (clients.training.train), so an interrupted job resumes.

One safetensors file holds the parameters (M), the best seen on validation, and AdamW's moments; its
metadata holds the progress counters, the scheduler's state, a fingerprint of the job (data
and settings), so a checkpoint is only ever resumed by the same job, and the caller's own
record of the job (its registry id, say) as a small JSON object. Writes are atomic.
Nothing here is unpickled: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from plora.storage.crashpoints import crash_point
from plora.storage.files import write_atomically

log = logging.getLogger(__name__)


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    val_before: float | None = None
    best_score: float | None = None  # the kept parameters' validation score (clients.training.NEAR_BEST)
    last_score: float | None = None  # the latest validation check's
    best_step: int = 0  # the step whose parameters are kept; 0: the starting ones
    lowest_score: float | None = None  # the lowest validation score yet; None in checkpoints older than it
    seconds: float = 0.0  # training time so far, across resumptions
    anchor_kl: float | None = None  # KL(base || model) per anchor position at the last step, if anchored
    anchor_weight: float | None = None  # the anchor's weight now, if anchored (AnchorSettings.drift_budget)
    stopped_early: bool = False  # validation stopped improving (TrainSettings.patience); nothing is left to run


@dataclass(frozen=True)
class Resumable:
    """What a matching checkpoint on disk would resume: the record of the job that saved it
    (as that job gave it) and the optimizer steps it had done."""

    job: dict
    step: int


class _Stored(NamedTuple):
    tensors: dict[str, torch.Tensor]
    job: dict
    progress: Progress
    scheduler: dict


class TrainingCheckpoint:
    def __init__(self, path: Path, fingerprint: str, job: dict | None = None):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.job = job or {}  # saved with each checkpoint, for whoever resumes it

    def save(self, progress: Progress, params: list[torch.Tensor], best: list[torch.Tensor] | None, optimizer, scheduler) -> None:
        tensors = {f"m.{i}": p.detach().contiguous() for i, p in enumerate(params)}
        for i, b in enumerate(best or []):
            tensors[f"best.{i}"] = b.contiguous()
        for i, state in optimizer.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"opt.{i}.{key}"] = value.detach().reshape(-1).contiguous() if value.dim() == 0 else value.contiguous()
        metadata = {
            "fingerprint": self.fingerprint,
            "job": json.dumps(self.job),
            "progress": json.dumps(asdict(progress)),
            "scheduler": json.dumps({k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}),
        }
        write_atomically(self.path, save_tensors(tensors, metadata=metadata))
        crash_point("checkpoint-saved")

    def resumable(self) -> Resumable | None:
        """The job a matching checkpoint belongs to and how far it got; None when there is nothing to resume."""
        found = self._read()
        return None if found is None else Resumable(found.job, found.progress.step)

    def _read(self) -> _Stored | None:
        if not self.path.is_file():
            return None
        try:
            with safe_open(self.path, "pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            if metadata.get("fingerprint") != self.fingerprint:
                log.info("checkpoint %s is another job's (other data or settings): starting afresh", self.path)
                return None
            return _Stored(tensors, json.loads(metadata["job"]), Progress(**json.loads(metadata["progress"])),
                           json.loads(metadata["scheduler"]))
        except (SafetensorError, OSError, KeyError, TypeError, ValueError) as err:
            # Writes are atomic, so only a damaged disk or a foreign file gets here. It cannot
            # be resumed, and refusing to run until someone deletes it would block the device.
            log.warning("checkpoint %s is unreadable (%s); starting the job afresh", self.path, err)
            return None

    def restore(self, params: list[torch.Tensor], optimizer, scheduler) -> tuple[Progress, list[torch.Tensor] | None] | None:
        """Load a matching checkpoint into the training objects; None when there is none."""
        found = self._read()
        if found is None:
            return None
        tensors = found.tensors
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors[f"m.{i}"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("opt."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value.reshape(()) if key == "step" else value
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
        scheduler.load_state_dict({**scheduler.state_dict(), **found.scheduler})
        # The optimizer's rate is set by scheduler.step(); restore the one in force when saved.
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
        best = [tensors[f"best.{i}"] for i in range(len(params))] if "best.0" in tensors else None
        return found.progress, best

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
