"""Checkpoints of a personalization job in progress, so an interrupted job resumes.

One safetensors file holds M, the best M seen on validation, and AdamW's moments; its
metadata holds the progress counters, the scheduler's state and a fingerprint of the job
(data and settings), so a checkpoint is only ever resumed by the same job. Writes are atomic.
Nothing here is unpickled: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from plora.storage.errors import AdapterFileError
from plora.storage.files import write_atomically


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    first_loss: float = float("nan")
    last_loss: float = float("nan")
    val_before: float | None = None
    best_score: float | None = None
    best_step: int = 0
    seconds: float = 0.0  # training time so far, across resumptions


class TrainingCheckpoint:
    def __init__(self, path: Path, fingerprint: str, job_id: int | None = None):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.job_id = job_id

    def save(self, progress: Progress, params: list[torch.Tensor], best: list[torch.Tensor] | None, optimizer, scheduler) -> None:
        tensors = {f"m.{i}": p.detach().contiguous() for i, p in enumerate(params)}
        for i, b in enumerate(best or []):
            tensors[f"best.{i}"] = b.contiguous()
        for i, state in optimizer.state_dict()["state"].items():
            for key, value in state.items():
                tensors[f"opt.{i}.{key}"] = value.detach().reshape(-1).contiguous() if value.dim() == 0 else value.contiguous()
        metadata = {
            "fingerprint": self.fingerprint,
            "job_id": json.dumps(self.job_id),
            "progress": json.dumps(asdict(progress)),
            "scheduler": json.dumps({k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}),
        }
        write_atomically(self.path, save_tensors(tensors, metadata=metadata))

    def stored_job(self) -> int | None:
        """The job id a matching checkpoint belongs to, or None when there is nothing to resume."""
        header = self._read()
        return None if header is None else json.loads(header[1]["job_id"])

    def _read(self) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        if not self.path.is_file():
            return None
        try:
            with safe_open(self.path, "pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError) as err:
            raise AdapterFileError(f"checkpoint {self.path} is corrupt ({err}); delete it to start the job afresh") from err
        if metadata.get("fingerprint") != self.fingerprint:
            return None  # another job's checkpoint: different data or settings
        return tensors, metadata

    def restore(self, params: list[torch.Tensor], optimizer, scheduler) -> tuple[Progress, list[torch.Tensor] | None] | None:
        """Load a matching checkpoint into the training objects; None when there is none."""
        found = self._read()
        if found is None:
            return None
        tensors, metadata = found
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors[f"m.{i}"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            if name.startswith("opt."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = value.reshape(()) if key == "step" else value
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
        scheduler.load_state_dict({**scheduler.state_dict(), **json.loads(metadata["scheduler"])})
        # The optimizer's rate is set by scheduler.step(); restore the one in force when saved.
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
        best = [tensors[f"best.{i}"] for i in range(len(params))] if "best.0" in tensors else None
        return Progress(**json.loads(metadata["progress"])), best

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
