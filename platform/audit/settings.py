"""What `plora audit` runs, and the least a learned attack must train on. No heavy imports:
the command line reads its defaults here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class InverterBudget:
    """What the learned inverter trains on: at least this much, so that a weak attack cannot
    make a defence look good."""

    tokens: int = 20_000
    """Distinct public tokens whose states it learns from."""
    steps: int = 400
    batch: int = 128
    lr: float = 3e-3

    def meets(self, minimum: InverterBudget) -> bool:
        return self.tokens >= minimum.tokens and self.steps >= minimum.steps


MINIMUM_INVERTER_BUDGET = InverterBudget()


@dataclass(frozen=True)
class AuditSettings:
    backbone: str = "embedded"
    splits: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (2, 0), (4, 0), (2, 2))
    """The configurations audited: (first, last) decoder layers run on the device."""
    cut_noise: tuple[str | None, ...] = (None,)
    """The noise each split is audited with (clients.cut_noise, as KIND:LEVEL); None: none."""
    personas: int = 2
    train_steps: int | None = None
    """Steps of each personalization job; None: the persona job's (platform.fleet.personas.PERSONA_JOB)."""
    questions: int = 8
    """Held-out persona questions each device answers, before and after its job."""
    reply_tokens: int = 24
    """Tokens of each answer."""
    candidates: int = 64
    """Tokens vocabulary matching runs through the device-side layers per position at first."""
    widened: int = 128
    """Its second try, when none of the first matched exactly (a device-side M the cloud does not know)."""
    public_data: Path | None = None
    """A folder of public text (.txt, .jsonl) the learned inverter trains on; None: text the
    public base model writes itself."""
    inverter: InverterBudget = MINIMUM_INVERTER_BUDGET
    training_passes: int = 4
    """Training steps of each job whose inputs and labels are attacked: every one would cost
    the vocabulary matching hours; the first ones carry the same kind of text as the rest."""
    seed: int = 0
