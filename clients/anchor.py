"""Anchor text: generic text the base model writes itself, to keep personalization from
costing general ability.

Personal data is a few narrow examples. Trained on them alone, M moves the whole model: in
`plora bench quality` the loss on generic text rose by 180%. Training therefore also pulls
the model towards the base model (M = 0) on generic text, the anchor (see
clients.training). The product ships no data set, so the device writes the anchor itself:
the base model's own replies to a small built-in set of generic requests and its own
continuations of a few plain-text openings, sampled with a fixed seed. Text the base model
samples is where its distribution matters most, and the KL on it estimates how far the
personalized model's whole output distribution has moved. The text depends only on the
backbone, the settings and the seed, so a device can write it once and keep it (`text_key`).

Training needs the base model's next-token distributions on that text (an `Anchor`): a
forward pass over all of it, most of a short job's time. They depend only on the text, the
backbone version and top_k, so a device keeps them too (`kept_anchor`), in a file it checks
before every use and computes afresh when it is missing, stale or damaged.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from plora.clients.data import TokenizedExample
from plora.clients.device_model import DeviceModel
from plora.clients.distillation import TeacherTargets, labelled_positions, teacher_targets
from plora.clients.generation import encode_prompt, generate_batch
from plora.storage.errors import ConfigError
from plora.storage.files import write_atomically

log = logging.getLogger(__name__)

TARGETS_FORMAT = "plora-anchor-targets/1"

# Generic requests of many kinds; none asks about the user, whose answers are what
# personalization is meant to change.
REQUESTS = (
    "A baker makes 24 muffins and sells 3 boxes of 6. How many muffins are left?",
    "Tom has 5 apples and buys 3 times as many. How many apples does he have now?",
    "A train travels 120 km in 2 hours. What is its average speed?",
    "What is 15% of 80? Show your working.",
    "Explain why the sky is blue.",
    "How does a refrigerator keep food cold?",
    "What causes the seasons on Earth?",
    "Give three tips for writing a clear email.",
    "Write a short poem about the sea.",
    "Summarise the story of Cinderella in two sentences.",
    "What is the difference between weather and climate?",
    "How do I boil an egg?",
    "Write a Python function that returns the largest number in a list.",
    "What are the main causes of the French Revolution?",
    "Suggest a name for a new coffee shop and explain the choice.",
    "Why do cats purr?",
)
OPENINGS = (
    "The history of the printing press begins",
    "To solve the equation 3x + 7 = 22, we first",
    "Photosynthesis is the process by which",
    "Sarah had 12 pencils. She gave 4 to her friend and",
    "The city council met on Tuesday to discuss",
    "In mathematics, a prime number is",
    "The recipe calls for two cups of flour,",
    "When the first settlers arrived in the valley,",
)
# Generic prompts no anchor holds, so no job trains on the base model's text on them: how far
# the personalized model's NLL on that text moved measures its drift on generic text
# (clients.training.DriftProbe), which the anchor's own text, trained on, would understate.
PROBES = (
    ("What is 7 times 8, and how can you check the answer?", True),
    ("Describe how the gears of a bicycle work.", True),
    ("Write a haiku about autumn leaves.", True),
    ("What should I pack for a weekend of hiking?", True),
    ("The river that runs through the old town", False),
    ("A rectangle is 9 cm long and 4 cm wide, so its area", False),
    ("The museum's new exhibition opens with", False),
    ("Water boils at a lower temperature on a mountain because", False),
)
PROBE_TOKENS = 48  # tokens the base model writes per probe


@dataclass(frozen=True)
class AnchorSettings:
    """How personalization stays close to the base model on generic text."""

    weight: float = 3.0
    """Weight of KL(base || personalized) on the anchor, added to the task loss, at the start of a
    job and whenever it keeps within `drift_budget`. Under the default job at a fixed weight
    (`plora bench quality`), weight 3 taught four personas all their facts with generic NLL
    within +1.8%, but let it rise by 2.1% to 5.6% on 6 of 7 Shakespeare speakers; weight 10 held
    6 of the 7 within 2% but cost three personas a fact each (mean recall 91%) and the speakers
    7 points of their gain against LoRA. No one weight suits every user (README), hence the budget."""
    drift_budget: float | None = 0.02
    """How much worse than the base model the job may make generic text, as measured on the
    job's probe (clients.training.DriftProbe). Every `drift_check_every` steps the job measures
    it, and scales the weight by measured drift / budget (at most 4x, at least 1/2 per check,
    between `weight` and `max_weight`): a job within its budget trains as at `weight`, one over
    it is pulled back harder until it is within. None: the weight stays fixed."""
    max_weight: float = 10.0
    """The most the budget may raise the weight to."""
    drift_check_every: int = 10
    """Optimizer steps between measurements of the drift, when there is a budget."""
    rows: int = 2
    """Anchor sequences mixed into every training batch."""
    texts: int = 24
    """Anchor sequences written before training, at most len(REQUESTS) + len(OPENINGS). All 24
    kept generic text closer than 12 did: a narrow anchor is itself overfitted."""
    new_tokens: int = 32
    """Tokens the base model writes per anchor sequence."""
    top_k: int = 32
    """Base-model tokens kept per position; the rest of the vocabulary is merged into one."""
    text_seed: int = 0
    """Which sample of anchor and probe text the base model writes (`write_anchor`, `write_probe`).
    Every device of a backbone writes the same by default, so that devices sharing a store share
    it; `plora bench quality --anchor-seed` measures how much a job's figures hang on the sample."""

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ConfigError(f"anchor weight must be > 0, got {self.weight}; turn the anchor off with anchor=None")
        if self.drift_budget is not None and not self.drift_budget > 0:
            raise ConfigError(f"the drift budget must be > 0 or None (a fixed weight), got {self.drift_budget}")
        if not self.max_weight >= self.weight or self.drift_check_every < 1:
            raise ConfigError(f"max_weight must be >= weight ({self.weight}) and drift_check_every >= 1, got "
                              f"{self.max_weight} and {self.drift_check_every}")
        if not 1 <= self.texts <= len(REQUESTS) + len(OPENINGS):
            raise ConfigError(f"anchor texts must be between 1 and {len(REQUESTS) + len(OPENINGS)}, got {self.texts}")
        if min(self.rows, self.new_tokens, self.top_k) < 1:
            raise ConfigError(
                f"anchor rows, new_tokens and top_k must be >= 1, got {self.rows}, {self.new_tokens}, {self.top_k}"
            )

    def steered_weight(self, weight: float, drift: float) -> float:
        """The weight for the steps after a check that measured `drift` (see `drift_budget`)."""
        factor = min(4.0, max(0.5, drift / self.drift_budget))
        return min(self.max_weight, max(self.weight, weight * factor))


@contextmanager
def base_model(model: DeviceModel) -> Iterator[DeviceModel]:
    """The model with every M zeroed, i.e. the base model; the M it held is put back after."""
    params = list(model.weights.parameters())
    held = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.zero_()
    try:
        yield model
    finally:
        with torch.no_grad():
            for p, kept in zip(params, held):
                p.copy_(kept)


def text_key(settings: AnchorSettings, seed: int) -> str:
    """Equal for arguments that give the same anchor text on the same backbone."""
    # "batch": the texts are sampled as one batch (generate_batch), which rounds differently.
    # The sampler is left out on purpose: text a device kept stays its own when a later plora
    # samples otherwise, so that a job resumed from its checkpoint trains on the anchor it began
    # with (tests/integration/test_on_disk_compatibility.py).
    written_as = (REQUESTS, OPENINGS, settings.texts, settings.new_tokens, seed, "batch")
    return hashlib.sha256(repr(written_as).encode()).hexdigest()


def write_anchor(model: DeviceModel, tokenizer: Any, settings: AnchorSettings, seed: int) -> list[TokenizedExample]:
    """The base model's own text on `settings.texts` built-in prompts; the same seed, the same text.

    Every token is labelled, prompt included: the base model's prediction of the prompt is
    generic behaviour worth keeping too, and those positions go through the model anyway."""
    prompts = [(p, True) for p in REQUESTS] + [(p, False) for p in OPENINGS]
    rng = random.Random(seed)
    return _base_text(model, tokenizer, rng.sample(prompts, settings.texts), settings.new_tokens, rng)


def probe_key(seed: int) -> str:
    """Equal for arguments that give the same probe text on the same backbone."""
    return hashlib.sha256(repr((PROBES, PROBE_TOKENS, seed, "batch")).encode()).hexdigest()


def write_probe(model: DeviceModel, tokenizer: Any, seed: int) -> list[TokenizedExample]:
    """The base model's own text on PROBES, labelled as `write_anchor` labels it."""
    return _base_text(model, tokenizer, list(PROBES), PROBE_TOKENS, random.Random(seed))


def _base_text(model: DeviceModel, tokenizer: Any, prompts: list[tuple[str, bool]], new_tokens: int,
               rng: random.Random) -> list[TokenizedExample]:
    """The base model's continuation of each (prompt, is a chat request), sampled with seeds from `rng`."""
    seeds = [rng.randrange(2**31) for _ in prompts]
    encoded = [encode_prompt(tokenizer, prompt, chat=chat) for prompt, chat in prompts]
    with base_model(model):
        written = generate_batch(model, encoded, new_tokens, {tokenizer.eos_token_id}, temperature=1.0, seeds=seeds)
    return [TokenizedExample(ids + new, ids + new) for ids, new in zip(encoded, written)]


@dataclass(frozen=True)
class Anchor:
    """Anchor text and the base model's next-token distributions on it, what training mixes in."""

    examples: list[TokenizedExample]
    targets: list[TeacherTargets]  # one per example: the base model's (M = 0), not the device's M
    pad_id: int


def anchor_of(model: DeviceModel, examples: list[TokenizedExample], pad_id: int, top_k: int) -> Anchor:
    """The base model's top-k distributions on `examples`, whatever M the model holds now."""
    with base_model(model):
        return Anchor(examples, teacher_targets(model, examples, pad_id, top_k), pad_id)


def kept_anchor(path: Path, model: DeviceModel, examples: list[TokenizedExample], pad_id: int, top_k: int,
                backbone: str) -> Anchor:
    """`anchor_of`, kept in `path` for the next job: read back when it was made for this very
    text, backbone version and top_k and reads back intact, else computed and written afresh."""
    key = _targets_key(examples, top_k, backbone)
    targets = _read_targets(path, key, examples, top_k)
    if targets is not None:
        return Anchor(examples, targets, pad_id)
    anchor = anchor_of(model, examples, pad_id, top_k)
    tensors = _targets_tensors(anchor.targets)
    metadata = {"format": TARGETS_FORMAT, "key": key, "checksum": _checksum(tensors, key)}
    write_atomically(path, save_tensors(tensors, metadata=metadata))
    return anchor


def _targets_key(examples: list[TokenizedExample], top_k: int, backbone: str) -> str:
    """Equal exactly when the base model's targets are: the same token ids, version and top_k.
    The text itself, not only `text_key`: anchor text written again elsewhere may differ."""
    digest = hashlib.sha256(repr((backbone, top_k)).encode())
    for example in examples:
        digest.update(repr((example.input_ids, example.labels)).encode())
    return digest.hexdigest()


_FIELDS = ("positions", "top_ids", "top_logprobs", "rest_logprob")


def _targets_tensors(targets: list[TeacherTargets]) -> dict[str, torch.Tensor]:
    return {f"{i}.{field}": getattr(t, field).contiguous() for i, t in enumerate(targets) for field in _FIELDS}


def _checksum(tensors: dict[str, torch.Tensor], key: str) -> str:
    """sha256 over the key and every tensor's name, dtype, shape and bytes, which the
    safetensors parser alone would accept damaged."""
    digest = hashlib.sha256(f"{TARGETS_FORMAT}\n{key}\n".encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name} {tensor.dtype} {list(tensor.shape)}\n".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_targets(path: Path, key: str, examples: list[TokenizedExample], top_k: int) -> list[TeacherTargets] | None:
    """The targets kept in `path` if they are the ones `key` names and read back intact; else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if metadata.get("format") != TARGETS_FORMAT or metadata.get("key") != key:
            log.info("%s holds the targets of other anchor text, backbone or top_k: computing them afresh", path)
            return None
        if metadata.get("checksum") != _checksum(tensors, key):
            raise ValueError("its checksum does not match its content")
        if len(tensors) != len(_FIELDS) * len(examples):
            raise ValueError(f"{len(tensors)} tensors for {len(examples)} anchor texts")
        targets = [TeacherTargets(**{field: tensors[f"{i}.{field}"] for field in _FIELDS}) for i in range(len(examples))]
        for example, target in zip(examples, targets):
            _check_targets(target, example, top_k)
        return targets
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as err:
        # Kept targets only save time: a damaged file is computed again, never trusted.
        log.warning("%s is unusable (%s); computing the anchor's targets afresh", path, err)
        return None


def _check_targets(target: TeacherTargets, example: TokenizedExample, top_k: int) -> None:
    """What teacher_targets makes for `example`: its labelled positions, top_k ids and log-probabilities each."""
    positions = labelled_positions(example)
    n = len(positions)
    shapes = {"top_ids": (torch.int32, (n, top_k)), "top_logprobs": (torch.float32, (n, top_k)),
              "rest_logprob": (torch.float32, (n,))}
    if target.positions.dtype != positions.dtype or not torch.equal(target.positions, positions):
        raise ValueError("positions that are not the anchor text's labelled positions")
    for field, (dtype, shape) in shapes.items():
        tensor = getattr(target, field)
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{field} of {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}")
