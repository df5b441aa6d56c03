"""Distillation: pulling a student's next-token distributions towards a teacher's.

Teacher targets are computed once, without gradients, from any logits source (a function
from (B, T) token ids to (B, T, vocab) logits: a DeviceModel, another backbone's model, ...)
on a list of TokenizedExample, and stored compactly: at every labelled position, the
teacher's top-k token ids and log-probabilities and the log of the mass left over. With
SmolLM2's 49152-token vocabulary that is about 8·k bytes a position instead of 196 KB.

The loss is KL(teacher || student) over k+1 outcomes: the teacher's k likeliest tokens and
"any other token". It is the exact KL of the two distributions with their tails merged, so
it is never negative, is zero when the student matches the teacher, and bounds the full KL
from below, tightly when the tail carries little of the teacher's mass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from plora.clients.data import IGNORE_INDEX, TokenizedExample, collate
from plora.storage.errors import ConfigError, DataError

LogitsSource = Callable[[torch.Tensor], torch.Tensor]
"""(B, T) token ids -> (B, T, vocab) logits."""


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's next-token distribution at one example's labelled positions."""

    positions: torch.Tensor  # (n,) long: logit index t, whose next token t+1 is labelled
    top_ids: torch.Tensor  # (n, k) int32
    top_logprobs: torch.Tensor  # (n, k) float32
    rest_logprob: torch.Tensor  # (n,) float32: log of the teacher's mass outside top_ids


def labelled_positions(example: TokenizedExample) -> torch.Tensor:
    """Logit positions that predict a labelled token, as the causal LM loss counts them."""
    labels = torch.tensor(example.labels)
    return (labels[1:] != IGNORE_INDEX).nonzero()[:, 0]


def _merged_tail(logprobs: torch.Tensor, top_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V) log-probabilities -> ((n, k) at top_ids, (n,) log of the mass everywhere else)."""
    top = logprobs.gather(-1, top_ids)
    rest = logprobs.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    return top, rest


@torch.no_grad()
def teacher_targets(
    logits_of: LogitsSource, examples: Sequence[TokenizedExample], pad_id: int, top_k: int = 32, batch_size: int = 8
) -> list[TeacherTargets]:
    """The teacher's top-k distributions on every example, in order."""
    if top_k < 1 or batch_size < 1:
        raise ConfigError(f"top_k and batch_size must be >= 1, got top_k={top_k} batch_size={batch_size}")
    targets = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        ids, _ = collate(chunk, pad_id)
        logits = logits_of(ids)
        vocab = logits.shape[-1]
        if top_k >= vocab:
            # The merged tail must be a real outcome with some mass, or its log is -inf.
            raise ConfigError(f"top_k={top_k} must be below the vocabulary size {vocab}")
        for row, example in enumerate(chunk):
            positions = labelled_positions(example)
            logprobs = logits[row, positions].float().log_softmax(-1)  # (n, V)
            top_logprobs, top_ids = logprobs.topk(top_k, dim=-1)
            _, rest = _merged_tail(logprobs, top_ids)
            targets.append(TeacherTargets(positions, top_ids.to(torch.int32), top_logprobs, rest))
    return targets


def distillation_loss(student_logits: torch.Tensor, targets: Sequence[TeacherTargets]) -> torch.Tensor:
    """Mean KL(teacher || student) per labelled position; row i of the (B, T, vocab) logits
    is the example that targets[i] was computed on (padded on the right, as collate does)."""
    if student_logits.shape[0] != len(targets):
        raise ConfigError(f"{student_logits.shape[0]} rows of logits for {len(targets)} teacher targets")
    return distillation_loss_at(student_logits[target_positions(targets)], targets)


def target_positions(targets: Sequence[TeacherTargets], first_row: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) indexing every labelled position of `targets` in a (B, T, ...) batch
    whose row first_row + i is the example targets[i] was computed on."""
    positions = torch.cat([t.positions for t in targets])
    if not len(positions):
        raise DataError("the teacher targets hold no labelled positions")
    rows = torch.cat([torch.full_like(t.positions, first_row + i) for i, t in enumerate(targets)])
    return rows, positions


def distillation_loss_at(student_logits: torch.Tensor, targets: Sequence[TeacherTargets]) -> torch.Tensor:
    """`distillation_loss` from the student's (N, vocab) logits at `target_positions(targets)`
    alone, so a caller may apply its LM head there only."""
    top_ids = torch.cat([t.top_ids for t in targets]).long()
    teacher = torch.cat([torch.cat([t.top_logprobs, t.rest_logprob[:, None]], -1) for t in targets])  # (N, k+1)
    student_top, student_rest = _merged_tail(student_logits.float().log_softmax(-1), top_ids)
    student = torch.cat([student_top, student_rest[:, None]], -1)  # (N, k+1)
    return F.kl_div(student, teacher, reduction="sum", log_target=True) / len(top_ids)


@torch.no_grad()
def mean_kl(
    logits_of: LogitsSource,
    examples: Sequence[TokenizedExample],
    targets: Sequence[TeacherTargets],
    pad_id: int,
    batch_size: int = 8,
) -> float:
    """KL(teacher || student) per labelled position over all examples: how far the student is."""
    if len(examples) != len(targets):
        raise ConfigError(f"{len(examples)} examples for {len(targets)} teacher targets")
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = targets[start : start + batch_size]
        ids, _ = collate(examples[start : start + batch_size], pad_id)
        n = sum(len(t.positions) for t in chunk)
        total, count = total + distillation_loss(logits_of(ids), chunk).item() * n, count + n
    return total / max(count, 1)
