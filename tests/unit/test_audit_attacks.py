"""Each attack of the privacy audit works where it should, so that a broken attack cannot hide a leak.

The captures come from the service's own recorder, tapped onto an in-process split of a tiny
random Llama; the attacker holds a fresh copy of the same public weights and nothing else.
"""

from __future__ import annotations

import pytest
import torch

from plora.clients.cut_noise import CutNoise
from plora.clients.data import TokenizedExample
from plora.clients.generation import Draft, stream_tokens
from plora.clients.training import TrainSettings, labelled_loss, personalize
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.recording import Recording, read_session
from plora.platform.audit.attacks import (
    InputInverter,
    InverterBudget,
    LearnedInverter,
    PublicModel,
    cloud_personalized,
    recover_labels,
    recover_m,
    recover_ms,
)
from plora.platform.audit.run import DeviceWitness, Phase, _phases, invert_training, recover_generated, share
from plora.platform.runtime import split_embedded
from tests.conftest import tiny_backbone, tiny_llama

VOCAB = 96  # conftest's tiny model
PEAKED = {"initializer_range": 0.4}  # larger weights: next tokens that depend on the context, not one repeated token


def recorded_split(tmp_path, config: PrivateLoRAConfig, **model):
    split = split_embedded(tiny_backbone(**model), config)
    split.link.taps.append(Recording(tmp_path).session("device", "session", "tiny"))
    return split, tmp_path / "device" / "session"


def personal_ms(split, seed: int = 1, scale: float = 0.3, layers: range | None = None) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for key, m in split.weights.ms.items():
            if layers is None or int(key.split("_")[0]) in layers:
                m.normal_(0, scale)


def invert_session(inverter: InputInverter, steps) -> torch.Tensor:
    """Every forward step's input tokens, as the attacker recovers them: a row at a time for
    stateless steps, and the cached sequence carried from START through each EXTEND."""
    out, cache = [], None
    for step in steps:
        if step.kind != "forward":
            continue
        if step.meta["cache"] == "none":
            out += [inverter.invert(row) for row in step.tensors["hidden_in"]]
            continue
        if step.meta["cache"] == "start":
            cache = inverter.new_sequence()
        out.append(inverter.invert(step.tensors["hidden_in"][0], cache))
    return torch.cat(out)


@pytest.mark.parametrize("device_layers", [0, 1, 2])
def test_input_tokens_come_back_from_the_state_at_the_cut_for_a_new_user(tmp_path, device_layers):
    split, folder = recorded_split(tmp_path, PrivateLoRAConfig(rank=4, device_layers=device_layers))
    personal_ms(split, layers=range(device_layers, 4))  # the cloud's layers carry M; the device's are at M = 0
    torch.manual_seed(0)
    rows = torch.randint(0, VOCAB, (2, 12))
    prompt = torch.randint(0, VOCAB, (9,)).tolist()
    with torch.no_grad():
        split(rows)
        reply = list(stream_tokens(split, prompt, 6, set()))
    sent = torch.cat([rows.flatten(), torch.tensor(prompt + reply[:-1])])

    recovered = invert_session(InputInverter(PublicModel(tiny_llama(), split.config)), read_session(folder))

    assert recovered.shape == sent.shape
    assert (recovered == sent).float().mean() >= 0.9


class WrongGuesses:
    """Drafts two tokens the tiny model never picks after its last one, so each pass is rolled back."""

    def draft(self, context: list[int], limit: int) -> Draft:
        return Draft([(context[-1] + 1) % VOCAB, (context[-1] + 2) % VOCAB][:limit])


@pytest.mark.parametrize("last", [0, 1, 2])
def test_outputs_come_back_from_the_last_hidden_state_for_a_new_user(tmp_path, last):
    """With last layers on the device at M = 0 (a new user), the public layers read them too."""
    split, folder = recorded_split(tmp_path, PrivateLoRAConfig(rank=4, device_last_layers=last), **PEAKED)
    personal_ms(split, layers=range(0, 4 - last))
    witness = DeviceWitness(split)
    with torch.no_grad():
        reply = list(stream_tokens(split, list(range(20, 30)), 8, set()))
        reply += list(stream_tokens(split, list(range(40, 50)), 8, set(), drafter=WrongGuesses()))
    witness.close()
    assert any(step.meta["keep_cached"] for step in read_session(folder))  # the device rolled drafts back

    units = recover_generated(PublicModel(tiny_llama(**PEAKED), split.config), Phase(read_session(folder), witness.passes))

    assert len(reply) == 16 and len(units) == 2
    assert share(units)["share"] == 1.0


def test_a_prefill_is_scored_on_the_one_next_token_the_device_computed(tmp_path):
    # The device's head reads a prompt's last position alone. The tokens recovered at the
    # others were compared with that one token too: here, where every position predicts the
    # token it reads (the tiny model's habit), the prompt's 10 positions counted 10 hits of 1.
    split, folder = recorded_split(tmp_path, PrivateLoRAConfig(rank=4))
    witness = DeviceWitness(split)
    with torch.no_grad():
        reply = list(stream_tokens(split, [29] * 10, 4, set()))
    witness.close()

    units = recover_generated(PublicModel(tiny_llama(), split.config), Phase(read_session(folder), witness.passes))

    assert reply == [29] * 4 and units == [(4, 4)]


@pytest.mark.parametrize("last", [0, 1, 2])
def test_training_labels_come_back_from_the_gradients_the_device_sends(tmp_path, last):
    """With last layers on the device at M = 0 (a new user's first step), through the public ones."""
    split, folder = recorded_split(tmp_path, PrivateLoRAConfig(rank=4, device_last_layers=last), **PEAKED)
    personal_ms(split, layers=range(0, 4 - last))
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 16))
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt carries no loss
    labels[2, 12:] = -100  # nor does padding
    loss, _ = labelled_loss(split, ids, labels)
    loss.backward()

    forward, backward = read_session(folder)
    assert forward.meta["train"] == "True" and backward.kind == "backward"
    recovered = recover_labels(PublicModel(tiny_llama(**PEAKED), split.config), forward.tensors["hidden_out"],
                               backward.tensors["grad_hidden_out"])

    truth = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], 1)  # position t predicts t + 1
    labelled = truth != -100
    assert torch.equal(recovered == -1, ~labelled)  # the attacker knows where labels are
    assert (recovered[labelled] == truth[labelled]).float().mean() >= 0.9


def test_noise_at_the_cut_leaves_the_training_text_in_the_gradients(tmp_path):
    """Noise on the state at the cut hides a training row's tokens from it, but each token a loss
    predicts comes back from the gradient the device sends, and both together give more."""
    split = split_embedded(tiny_backbone(**PEAKED), PrivateLoRAConfig(rank=4), CutNoise.parse("gaussian:8"), noise_seed=0)
    split.link.taps.append(Recording(tmp_path).session("device", "session", "tiny"))
    witness = DeviceWitness(split)
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 16))
    labels = ids.clone()
    labels[:, :8] = -100  # a prompt carries no loss: the losses predict tokens 8 to 15
    loss, _ = labelled_loss(split, ids, labels)
    loss.backward()
    witness.close()
    (training,), backward = _phases(read_session(tmp_path / "device" / "session"), witness, [])
    public = PublicModel(tiny_llama(**PEAKED), split.config)

    units = invert_training(InputInverter(public), public, training, backward, pad_id=-1)  # no row is padded

    shares = {attack: share(rows)["share"] for attack, rows in units.items()}
    assert shares["labels"] == 1.0
    assert shares["inputs_training_gradients"] == 0.5
    assert shares["inputs_training"] < 0.5
    # Where no loss looks, only the cut tells: both give the gradients' half and what the cut gives of the rest.
    prompt_hits = sum(int((InputInverter(public).invert(states[:8]) == row[:8]).sum())
                      for states, row in zip(training.steps[0].tensors["hidden_in"], ids))
    assert shares["inputs_training_both"] == pytest.approx(0.5 + prompt_hits / ids.numel())


@pytest.mark.parametrize("shared_a", [False, True])
def test_m_comes_back_by_least_squares_from_r_tokens(tmp_path, shared_a):
    config = PrivateLoRAConfig(rank=4, targets=("q", "k", "v", "gate", "up"), shared_a=shared_a)
    split, folder = recorded_split(tmp_path, config)
    personal_ms(split)
    torch.manual_seed(0)
    with torch.no_grad():
        split(torch.randint(0, VOCAB, (1, config.rank)))  # r tokens: exactly enough

    (step,) = read_session(folder)
    pairs = dict(((layer, group), u) for layer, group, u in step.adapter("u"))
    checked = 0
    for layer, group, um in step.adapter("um"):
        recovered = recover_m(pairs[layer, group], um, config, len(config.groups[group]))
        for m_hat, m in zip(recovered, split.weights.group_ms(layer, group)):
            assert (m_hat - m).norm() / m.norm() <= 1e-4
            checked += 1
    assert checked == 4 * 5


def test_the_facts_a_device_taught_its_m_come_out_of_the_m_the_cloud_recovers(tmp_path):
    """The tiny model memorises key-to-value facts in M; the device then asks for them, and the
    cloud, from that traffic alone, rebuilds M on the public model and asks the same."""
    config = PrivateLoRAConfig(rank=8, targets=("q", "k", "v", "o", "gate", "up", "down"))
    split = split_embedded(tiny_backbone(), config)
    generator = torch.Generator().manual_seed(3)
    keys = torch.randperm(VOCAB, generator=generator)[:20].view(10, 2)
    values = torch.randint(0, VOCAB, (10,), generator=generator)
    facts = [TokenizedExample([a, b, v], [-100, -100, v]) for (a, b), v in zip(keys.tolist(), values.tolist())]
    personalize(split, facts, 0, TrainSettings(steps=100, lr=0.1, batch_size=10, anchor=None))
    with torch.no_grad():
        base = split_embedded(tiny_backbone(), config)(keys)[:, -1].argmax(-1)
        split.link.taps.append(Recording(tmp_path).session("device", "session", "tiny"))
        taught = split(keys)[:, -1].argmax(-1)
    assert (taught == values).float().mean() >= 0.9 and (base == values).float().mean() <= 0.2

    ms = recover_ms(read_session(tmp_path / "device" / "session"), config)
    with torch.no_grad():
        extracted = cloud_personalized(tiny_backbone(), config, ms)(keys)[:, -1].argmax(-1)

    assert (extracted == values).float().mean() >= 0.9


@pytest.mark.parametrize("device_layers", [1, 2])
def test_a_learned_inverter_trained_on_public_text_reads_a_users_text_it_never_saw(tmp_path, device_layers):
    split, folder = recorded_split(tmp_path, PrivateLoRAConfig(rank=4, device_layers=device_layers))
    generator = torch.Generator().manual_seed(0)
    public_text = torch.randint(0, VOCAB, (64, 64), generator=generator).tolist()
    users_text = torch.randint(0, VOCAB, (4, 32), generator=generator)
    with torch.no_grad():
        split(users_text)
    inverter = LearnedInverter(PublicModel(tiny_llama(), split.config))

    trained = inverter.fit(public_text, InverterBudget(tokens=4096, steps=400))
    (step,) = read_session(folder)
    recovered = inverter.predict(step.tensors["hidden_in"].flatten(0, 1))[:, 0]

    assert trained["tokens"] == 64 * 64 and trained["steps"] == 400
    assert (recovered == users_text.flatten()).float().mean() >= 0.9
