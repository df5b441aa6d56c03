"""Carrying a device's personalization to a new backbone version, on the device.

`distill` trains the new version's M so that new backbone + new M gives the next-token
distributions old backbone + old M gave, on the device's own text (KL to the old model's
distributions, computed once with clients.distillation). Only the usual split traffic goes
to the cloud; the old model's distributions and both Ms stay on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plora.clients.checkpoint import Progress, TrainingCheckpoint
from plora.clients.data import TokenizedExample, collate
from plora.clients.device_model import DeviceModel
from plora.clients.distillation import TeacherTargets, distillation_loss
from plora.clients.training import OnStep, TrainSettings, tokens_in, train
from plora.cloud_backbone.privatelora import AdapterWeights
from plora.storage.errors import ConfigError

METHODS = ("copy", "distill")


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 40
    lr: float = 1e-2
    batch_size: int = 4
    top_k: int = 32
    """The old model's likeliest tokens kept per position; the rest is merged into one."""
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.top_k) < 1 or not self.lr > 0:
            raise ConfigError(f"steps, batch_size and top_k must be >= 1 and lr > 0; got {self}")

    def training(self) -> TrainSettings:
        """The loop's settings: warm-up over a tenth of the steps and a cosine to 10% of lr,
        as for personalization; no anchor, since the old model's distributions hold it."""
        return TrainSettings(lr=self.lr, batch_size=self.batch_size, steps=self.steps, seed=self.seed, anchor=None)


def can_copy(old: AdapterWeights, new: AdapterWeights) -> bool:
    """Whether M can be carried over as it is: the same matrices with the same shapes."""
    theirs = {name: t.shape for name, t in old.named_tensors()}
    return theirs == {name: t.shape for name, t in new.named_tensors()}


def copy_weights(old: AdapterWeights, new: AdapterWeights) -> None:
    if not can_copy(old, new):
        raise ConfigError("copy needs the same adapted layers, targets and rank on both versions; use distill")
    new.load_named_tensors({name: t.detach().clone() for name, t in old.named_tensors()})


def distill(
    student: DeviceModel,
    examples: list[TokenizedExample],
    targets: list[TeacherTargets],
    pad_id: int,
    settings: DistillSettings,
    checkpoint: TrainingCheckpoint | None = None,
    on_step: OnStep | None = None,
    checkpoint_every: int = 10,
) -> Progress:
    """Train the student's M towards the teacher's distributions with clients.training's loop,
    which resumes a matching checkpoint."""
    if not examples or len(examples) != len(targets):
        raise ConfigError(f"distill needs examples with one teacher target each, got {len(examples)} and {len(targets)}")

    def batch_loss(batch: list[tuple[TokenizedExample, TeacherTargets]]) -> tuple[torch.Tensor, int]:
        rows = [example for example, _ in batch]
        return distillation_loss(student(collate(rows, pad_id)[0]), [target for _, target in batch]), tokens_in(rows)

    return train(student, list(student.weights.parameters()), batch_loss, list(zip(examples, targets)),
                 settings.training(), checkpoint=checkpoint, checkpoint_every=checkpoint_every, on_step=on_step)
