"""`plora audit`: what a curious cloud learns, measured on the flows users run.

For each configuration it serves the backbone with the audit recorder on, and for each
synthetic persona enrolls a device over gRPC that answers the persona's questions as a new
user, runs the personalization job on the persona's notes (as `plora personalize` does) and
answers again. The attacks then read the captures and public weights only; the device's own
view (its token ids and greedy next tokens, `DeviceWitness`) serves to score them, and
nothing else.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import fmean

import torch

from plora.clients.anchor import OPENINGS, REQUESTS, AnchorSettings, write_anchor
from plora.clients.cut_noise import CutNoise
from plora.clients.data import TokenizedExample
from plora.clients.device_model import DeviceModel
from plora.clients.generation import PromptLookup, encode_prompt, stream_tokens
from plora.clients.grpc_link import Endpoint
from plora.clients.training import TrainSettings, evaluate
from plora.cloud_backbone import loading
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.privatelora import truncate_cache
from plora.cloud_backbone.recording import CapturedStep, read_session, recorded_sessions
from plora.cloud_backbone.server import start_service
from plora.platform.audit.attacks import (
    InputInverter,
    LearnedInverter,
    PublicModel,
    cloud_personalized,
    recover_labels,
    recover_ms,
    recover_outputs,
)
from plora.platform.audit.settings import MINIMUM_INVERTER_BUDGET, AuditSettings
from plora.platform.fleet.personas import PERSONA_JOB, Persona, make_persona, persona_recall, recalled
from plora.platform.jobs import run_personalization
from plora.platform.runtime import Device, init_device, open_device, split_embedded
from plora.storage.errors import ConfigError, PloraError
from plora.storage.registry import Registry, open_registry


EXACT_M = 1e-4  # an M recovered to this relative error is the device's M, for every purpose


class AuditError(PloraError):
    """The captures do not line up with what the device did: the audit cannot be scored."""


class DeviceWitness:
    """The device's own view of every pass, for scoring: the token ids it embedded, its greedy
    next token at each position and, in training, the positions its loss was taken at. It
    never leaves the audit's scoring."""

    def __init__(self, model: DeviceModel):
        self.passes: list[dict[str, torch.Tensor]] = []
        self._hooks = [model.embed.register_forward_hook(self._embedded), model.norm.register_forward_hook(self._normed),
                       model.lm_head.register_forward_hook(self._headed)]

    def _embedded(self, module, args, output) -> None:
        self.passes.append({"ids": args[0].detach().clone()})

    def _normed(self, module, args, output) -> None:
        if output.requires_grad:
            seen = self.passes[-1]
            # A position's final state has a gradient exactly where the loss predicts the next token from it.
            output.register_hook(lambda grad: seen.__setitem__("loss_at", grad.abs().amax(-1) > 0))

    def _headed(self, module, args, output) -> None:
        self.passes[-1]["next"] = output.detach().argmax(-1)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def share(units: list[tuple[int, int]]) -> dict:
    """(hits, total) per unit (a text) -> the share of hits over all units, with a 95% interval
    that treats the units, not the tokens, as the samples (the ratio estimator's variance)."""
    units = [(h, n) for h, n in units if n]
    if not units:
        return {"share": None, "low": None, "high": None, "units": 0}
    hits, total = sum(h for h, _ in units), sum(n for _, n in units)
    p = hits / total
    k = len(units)
    spread = math.sqrt(k / (k - 1) * sum((h - p * n) ** 2 for h, n in units)) / total if k > 1 else 0.0
    return {"share": p, "low": max(0.0, p - 1.96 * spread), "high": min(1.0, p + 1.96 * spread), "units": k}


def _real_length(ids: torch.Tensor, pad_id: int) -> int:
    """A right-padded row's length: up to its last token that is not padding."""
    real = (ids != pad_id).nonzero()
    return int(real[-1]) + 1 if len(real) else 0


@dataclass
class Phase:
    """The forward passes of one part of a device's run, each with its captured step."""

    steps: list[CapturedStep]
    passes: list[dict[str, torch.Tensor]]


def invert_inputs(inverter: InputInverter, phase: Phase) -> list[tuple[int, int]]:
    """(tokens recovered, tokens sent) per generated sequence, from its START through its
    EXTENDs (cutting the attacker's cache where the device rolled back a draft, as the cloud's
    own cache is cut)."""
    units, cache = [], None
    for step, seen in zip(phase.steps, phase.passes):
        states, ids = step.tensors["hidden_in"], seen["ids"]
        if step.meta["cache"] == "start":
            cache = inverter.new_sequence()
            units.append((0, 0))
        elif step.meta["keep_cached"] and cache is not None:
            truncate_cache(cache, int(step.meta["keep_cached"]))
        hits, n = units[-1]
        units[-1] = (hits + int((inverter.invert(states[0], cache) == ids[0]).sum()), n + ids.shape[1])
    return units


def _per_sequence(phase: Phase, score: Callable[[CapturedStep, dict[str, torch.Tensor]], tuple[int, int]]) -> list[tuple[int, int]]:
    """`score`'s (hits, total) of each pass, summed per generated sequence (a START and its EXTENDs)."""
    units = []
    for step, seen in zip(phase.steps, phase.passes):
        if step.meta["cache"] == "start":
            units.append((0, 0))
        hits, total = score(step, seen)
        units[-1] = (units[-1][0] + hits, units[-1][1] + total)
    return units


def learned_inversion(learned: LearnedInverter, phase: Phase) -> list[tuple[int, int]]:
    """(tokens the learned inverter reads right, tokens) per generated sequence."""
    def score(step, seen):
        predicted = learned.predict(step.tensors["hidden_in"].flatten(0, 1))[:, 0]
        return int((predicted == seen["ids"].flatten()).sum()), predicted.numel()

    return _per_sequence(phase, score)


def recover_generated(public: PublicModel, phase: Phase) -> list[tuple[int, int]]:
    """(next tokens recovered, next tokens the device computed) per generated sequence, from the
    returned states (through the device's last layers at M = 0, whose cache follows the device's own)."""
    cache = None

    def score(step, seen):
        nonlocal cache
        if step.meta["cache"] == "start":
            cache = public.new_sequence(public.back)
        elif step.meta["keep_cached"] and cache is not None:
            truncate_cache(cache, int(step.meta["keep_cached"]))
        recovered, computed = recover_outputs(public, step.tensors["hidden_out"], cache), seen["next"]
        # The device's head reads only the positions it takes a next token from: a prompt's last.
        if computed.shape[1] > recovered.shape[1]:
            raise AuditError(f"the device computed {computed.shape[1]} next tokens from {recovered.shape[1]} returned states")
        return int((recovered[:, recovered.shape[1] - computed.shape[1]:] == computed).sum()), computed.numel()

    return _per_sequence(phase, score)


TRAINING_ATTACKS = ("inputs_training", "inputs_training_gradients", "inputs_training_both", "labels")


def invert_training(inverter: InputInverter, public: PublicModel, training: Phase, backward: dict[int, CapturedStep],
                    pad_id: int) -> dict[str, list[tuple[int, int]]]:
    """(hits, total) per training row of each TRAINING_ATTACKS: its input tokens from the state
    at the cut, from the gradient the device sent back (the label at t is the input token at
    t + 1), and from both (the gradient's token where it names one); and the labels the
    device's loss took."""
    units: dict[str, list[tuple[int, int]]] = {attack: [] for attack in TRAINING_ATTACKS}
    for step, seen in zip(training.steps, training.passes):
        grads = backward.get(step.index)
        named = (recover_labels(public, step.tensors["hidden_out"], grads.tensors["grad_hidden_out"]) if grads is not None
                 else torch.full(seen["ids"].shape, -1))
        loss_at = seen.get("loss_at", torch.zeros(seen["ids"].shape, dtype=torch.bool))
        for states, ids, labels, taken in zip(step.tensors["hidden_in"], seen["ids"], named, loss_at):
            n = _real_length(ids, pad_id)
            at_cut = inverter.invert(states[:n])
            from_gradients = torch.cat([torch.tensor([-1]), labels[: n - 1]])
            both = torch.where(from_gradients >= 0, from_gradients, at_cut)
            for attack, guess in zip(TRAINING_ATTACKS, (at_cut, from_gradients, both)):
                units[attack].append((int((guess == ids[:n]).sum()), n))
            taken = taken[: n - 1]
            units["labels"].append((int((labels[: n - 1][taken] == ids[1:n][taken]).sum()), int(taken.sum())))
    return units


def m_errors(recovered: dict[tuple[int, str], list[torch.Tensor]], model: DeviceModel) -> list[float]:
    """‖M̂ − M‖ / ‖M‖ of every M the cloud's layers use."""
    return [float((m_hat - m.detach()).norm() / m.detach().norm())
            for (layer, group), ms in recovered.items() for m_hat, m in zip(ms, model.weights.group_ms(layer, group))]


def _answer(device: Device, persona: Persona, questions: int, reply_tokens: int) -> tuple[float, float]:
    """Recall of the persona's held-out facts in greedy replies, as `plora generate` writes
    them (prompt lookup drafting), and decode tokens/s."""
    stop, hits, tokens, started = {device.tokenizer.eos_token_id}, 0, 0, time.perf_counter()
    for fact in persona.facts[:questions]:
        with torch.no_grad():
            reply = list(stream_tokens(device.model, encode_prompt(device.tokenizer, fact.heldout_question), reply_tokens,
                                       stop, drafter=PromptLookup()))
        hits += recalled(device.tokenizer.decode(reply, skip_special_tokens=True), fact)
        tokens += len(reply)
    return hits / min(questions, len(persona.facts)), tokens / (time.perf_counter() - started)


def _phases(steps: list[CapturedStep], witness: DeviceWitness, bounds: list[int]) -> tuple[list[Phase], dict[int, CapturedStep]]:
    """Split the forward steps at the witness's pass counts `bounds`, and index each backward
    step by the forward step it follows."""
    forward = [s for s in steps if s.kind == "forward" and not s.meta["error"]]
    if len(forward) != len(witness.passes):
        raise AuditError(f"the service recorded {len(forward)} forward steps, the device made {len(witness.passes)} passes")
    backward, last = {}, None
    for step in steps:
        if step.kind == "forward":
            last = step.index
        elif last is not None:
            backward[last] = step
    edges = [0, *bounds, len(forward)]
    return [Phase(forward[a:b], witness.passes[a:b]) for a, b in zip(edges, edges[1:])], backward


def public_sequences(settings: AuditSettings, backbone: loading.Backbone) -> list[list[int]]:
    """At least `settings.inverter.tokens` tokens of public text, in sequences of up to 128.
    Without a folder, `backbone` writes them (and is taken over for it)."""
    wanted, tokenizer = settings.inverter.tokens, backbone.tokenizer
    if settings.public_data is not None:
        ids: list[int] = []
        for path in sorted(Path(settings.public_data).rglob("*")):
            if len(ids) >= wanted:
                break
            if path.suffix == ".txt":
                ids += tokenizer(path.read_text(errors="replace"))["input_ids"][: wanted - len(ids)]
            elif path.suffix == ".jsonl":
                for line in path.read_text(errors="replace").splitlines():
                    record = json.loads(line) if line.strip() else {}
                    ids += tokenizer("\n".join(v for v in record.values() if isinstance(v, str)))["input_ids"]
                    if len(ids) >= wanted:
                        break
        if len(ids) < wanted:
            raise ConfigError(f"{settings.public_data} holds {len(ids)} tokens of .txt and .jsonl text; the inverter needs {wanted}")
        return [ids[i : i + 128] for i in range(0, len(ids), 128)]
    # No public data: the public base model writes some, as the anchor's text is written.
    model = split_embedded(backbone, PrivateLoRAConfig())
    texts = len(REQUESTS) + len(OPENINGS)
    anchor = AnchorSettings(texts=texts, new_tokens=max(16, min(96, wanted // texts)))
    sequences, seed = [], anchor.text_seed
    while sum(map(len, sequences)) < wanted:
        sequences += [example.input_ids for example in write_anchor(model, tokenizer, anchor, seed)]
        seed += 1
    return sequences


GENERIC_SEQUENCES = 16  # of the public text, scored by each device after its job: what it costs general ability


def _split_name(config: PrivateLoRAConfig, noise: CutNoise | None) -> str:
    return f"device layers {config.device_layers} first, {config.device_last_layers} last" + (f", noise {noise}" if noise else "")


def generic_text(public_text: list[list[int]]) -> list[TokenizedExample]:
    """The public sequences each device is scored on, every token labelled."""
    return [TokenizedExample(seq, list(seq)) for seq in public_text[:GENERIC_SEQUENCES]]


def _persona_notes(persona: Persona, folder: Path) -> Path:
    """The persona's notes as a file, as a user brings their data to `plora personalize`."""
    path = folder / "notes.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in persona.train_records()))
    return path


@dataclass
class UserRun:
    """One synthetic user's run: the cloud's captures, split where the device's run changed
    phase, and the device's own figures."""

    new_user: Phase  # answers at M = 0
    training: Phase  # the personalization job's passes
    personalized: Phase  # answers after the job
    backward: dict[int, CapturedStep]
    model: DeviceModel
    persona: Persona
    pad_id: int
    recall_before: float
    recall_after: float
    tokens_per_s: float
    heldout_loss: float
    generic_nll: float


def _run_user(settings: AuditSettings, config: PrivateLoRAConfig, noise: CutNoise | None, endpoint: Endpoint, record: Path,
              reg: Registry, folder: Path, seed: int, generic: list[TokenizedExample], echo: Callable[[str], None]) -> UserRun:
    """A new device (with `noise` at its cut) answers its persona's questions, runs the
    personalization job on the persona's notes, and answers again, as its user would with
    `plora generate` and `plora personalize`; then it scores the generic text."""
    folder.mkdir()
    init_device(folder / "device", endpoint.address, endpoint=endpoint, enroll_token=reg.issue_enrollment_token()[1],
                public=folder.parent / "public", cut_noise=noise)
    device = open_device(folder / "device")
    witness = DeviceWitness(device.model)
    persona = make_persona(settings.seed + seed)
    label = f"{_split_name(config, noise)}, persona {seed}"
    try:
        echo(f"{label}: answering as a new user")
        recall_before, _ = _answer(device, persona, settings.questions, settings.reply_tokens)
        before = len(witness.passes)
        job = TrainSettings(lr=PERSONA_JOB.lr, steps=settings.train_steps or PERSONA_JOB.steps, batch_size=PERSONA_JOB.batch_size,
                            seed=settings.seed, anchor=None)
        echo(f"{label}: personalizing ({job.steps} steps)")
        outcome = run_personalization(device, _persona_notes(persona, folder), job, reg=reg, keep_text=False)
        trained = len(witness.passes)
        recall_after, tokens_per_s = _answer(device, persona, settings.questions, settings.reply_tokens)
        answered = len(witness.passes)
        with torch.no_grad():
            generic_nll = evaluate(device.model, generic, device.tokenizer.pad_token_id)
    finally:
        witness.close()
        device.close()
    steps = [s for session in recorded_sessions(record, device.store.record.device_id) for s in read_session(session)]
    echo(f"{label}: attacking {len(steps)} captured steps")
    (new_user, training, personalized, _), backward = _phases(steps, witness, [before, trained, answered])
    return UserRun(new_user, training, personalized, backward, device.model, persona, device.tokenizer.pad_token_id,
                   recall_before, recall_after, tokens_per_s, outcome.loss_after, generic_nll)


def _attack(run: UserRun, settings: AuditSettings, config: PrivateLoRAConfig, public: PublicModel,
            inverter: InputInverter) -> dict:
    """Every attack on one user's captures: (hits, total) per text for the token attacks, and
    the least-squares M's errors and facts."""
    trained_on = [(s, seen) for s, seen in zip(run.training.steps, run.training.passes) if s.meta["train"] == "True"]
    sample = Phase(*map(list, zip(*trained_on[: settings.training_passes])))
    ms = recover_ms(run.personalized.steps, config)
    errors = m_errors(ms, run.model)
    seen = sum(s.tensors["hidden_in"].shape[:2].numel() for s in run.personalized.steps)
    worst = {"all": max(errors)}
    for tokens in (config.rank, 2 * config.rank, 4 * config.rank):
        if tokens <= seen:
            worst[str(tokens)] = max(m_errors(recover_ms(run.personalized.steps, config, tokens), run.model))
    return {
        "inputs_new_user": invert_inputs(inverter, run.new_user),
        "inputs_personalized": invert_inputs(inverter, run.personalized),
        **invert_training(inverter, public, sample, run.backward, run.pad_id),
        "outputs_new_user": recover_generated(public, run.new_user),
        "outputs": recover_generated(public, run.personalized),
        "m_exact": sum(e <= EXACT_M for e in errors) / len(errors),
        "m_tokens_seen": seen,
        "m_worst_error_by_tokens": worst,
        "facts_cloud": _cloud_recall(settings, config, ms, run.persona),
    }


def audit_configuration(settings: AuditSettings, config: PrivateLoRAConfig, noise: CutNoise | None, work: Path, reg: Registry,
                        public_text: list[list[int]], echo: Callable[[str], None]) -> dict:
    """One configuration's row: each attack's recovery, and what the configuration costs. The
    attacker knows the noise the devices use (a defence is public), and trains its learned
    inverter on public states with that noise."""
    name = f"{config.device_layers}-{config.device_last_layers}-{str(noise).replace(':', '-') if noise else 'exact'}"
    record = work / f"captures-{name}"
    server = start_service([settings.backbone], config, reg, record=record)
    public = PublicModel(loading.load(settings.backbone).model, config)
    echo(f"{_split_name(config, noise)}: training the learned inverter on {sum(map(len, public_text))} public tokens")
    learned = LearnedInverter(public)
    trained = learned.fit(public_text, settings.inverter, settings.seed, noise)
    inverter = InputInverter(public, settings.candidates, settings.widened, learned)
    runs, attacked = [], []
    try:
        endpoint = Endpoint(f"127.0.0.1:{server.port}", insecure=True)
        for seed in range(settings.personas):
            folder = work / f"device-{name}-{seed}"
            runs.append(_run_user(settings, config, noise, endpoint, record, reg, folder, seed, generic_text(public_text), echo))
            attacked.append(_attack(runs[-1], settings, config, public, inverter))
            attacked[-1]["inputs_learned"] = learned_inversion(learned, runs[-1].personalized)
    finally:
        server.stop(grace_s=1)
    row = {"device_layers": config.device_layers, "device_last_layers": config.device_last_layers,
           "cut_noise": str(noise) if noise else None}
    for attack in ("inputs_new_user", "inputs_personalized", "inputs_learned", *TRAINING_ATTACKS, "outputs_new_user", "outputs"):
        row[attack] = share([unit for figures in attacked for unit in figures[attack]])
    row["inverter"] = {**trained, "meets_minimum": settings.inverter.meets(MINIMUM_INVERTER_BUDGET)}
    row["m_exact"] = fmean([a["m_exact"] for a in attacked])
    row["m_tokens_seen"] = min(a["m_tokens_seen"] for a in attacked)
    row["m_worst_error_by_tokens"] = {n: max(a["m_worst_error_by_tokens"].get(n, math.nan) for a in attacked)
                                      for n in attacked[0]["m_worst_error_by_tokens"]}
    row["facts_cloud"] = fmean([a["facts_cloud"] for a in attacked])
    row["facts_device"] = fmean([r.recall_after for r in runs])
    row["facts_base_model"] = fmean([r.recall_before for r in runs])
    row["decode_tokens_per_s"] = fmean([r.tokens_per_s for r in runs])
    row["heldout_loss"] = fmean([r.heldout_loss for r in runs])
    row["generic_nll"] = fmean([r.generic_nll for r in runs])
    return row


def _cloud_recall(settings: AuditSettings, config: PrivateLoRAConfig, ms: dict, persona: Persona) -> float:
    """Fact extraction: the persona's held-out questions, asked of the public model with the M the cloud recovered."""
    backbone = loading.load(settings.backbone)
    return persona_recall(cloud_personalized(backbone, config, ms), backbone.tokenizer,
                          replace(persona, facts=persona.facts[: settings.questions]), settings.reply_tokens)


def run_audit(settings: AuditSettings, echo: Callable[[str], None], base: PrivateLoRAConfig = PrivateLoRAConfig()) -> dict:
    """The audit's document: a row per configuration, and what produced it."""
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="plora-audit-") as tmp:
        work = Path(tmp)
        reg = open_registry(f"sqlite:///{work / 'registry.db'}")
        echo("gathering public text for the learned inverter")
        public_text = public_sequences(settings, loading.load(settings.backbone))
        backbone = loading.load(settings.backbone)
        with torch.no_grad():  # the base model, without noise: what each row's generic NLL is compared with
            generic_base = evaluate(split_embedded(backbone, base), generic_text(public_text), backbone.tokenizer.pad_token_id)
        for first, last in settings.splits:
            config = replace(base, device_layers=first, device_last_layers=last)
            for noise in settings.cut_noise:
                rows.append(audit_configuration(settings, config, noise and CutNoise.parse(noise), work, reg, public_text, echo))
                rows[-1]["generic_nll_change"] = rows[-1]["generic_nll"] / generic_base - 1
    shown = {**settings.__dict__, "splits": [list(split) for split in settings.splits], "inverter": settings.inverter.__dict__,
             "public_data": str(settings.public_data) if settings.public_data else None}
    return {"settings": shown, "adapter": base.to_dict(), "generic_nll_base_model": generic_base,
            "rows": rows, "seconds": time.perf_counter() - started}
