"""End to end on the real embedded SmolLM2-135M-Instruct."""

from __future__ import annotations


import datasets
import pytest
import torch

from plora.clients.data import tokenize
from plora.clients.generation import encode_prompt, stream_tokens
from plora.clients.training import TrainSettings, evaluate, personalize
from plora.cloud_backbone import loading
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.clients.grpc_link import Endpoint
from plora.cloud_backbone.server import start_service
from plora.storage.registry import open_registry
from plora.platform.fleet.personas import make_persona
from plora.platform.runtime import init_device, open_device, split_embedded

# One xdist worker runs the whole module, so its module fixtures are made once (see the Makefile).
pytestmark = [pytest.mark.embedded, pytest.mark.xdist_group("test_embedded")]


@pytest.fixture(scope="module")
def base_model(embedded_dir):
    return loading.load("embedded").model


def test_split_greedy_generation_reproduces_the_base_model(base_model):
    backbone = loading.load("embedded")
    split = split_embedded(backbone, PrivateLoRAConfig(device_layers=2))
    prompt = encode_prompt(backbone.tokenizer, "What is the capital of France?")
    eos = backbone.tokenizer.eos_token_id
    ours = list(stream_tokens(split, prompt, 24, {eos}))
    theirs = base_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :].tolist()
    assert ours == [t for t in theirs if t != eos][: len(ours)] and len(ours) >= 5
    assert "Paris" in backbone.tokenizer.decode(ours)


def test_personalizing_on_private_facts_halves_their_loss_in_twenty_steps():
    backbone = loading.load("embedded")
    split = split_embedded(backbone, PrivateLoRAConfig())
    tok = backbone.tokenizer
    persona = make_persona(seed=3, num_facts=4)
    train = tokenize(datasets.Dataset.from_list(persona.train_records()), tok, 64)
    before = evaluate(split, train, tok.pad_token_id)
    personalize(split, train, tok.pad_token_id, TrainSettings(lr=1e-2, steps=20, batch_size=4))
    after = evaluate(split, train, tok.pad_token_id)
    assert after < 0.5 * before, (before, after)


def test_greedy_generation_over_the_network_with_zero_m_equals_the_base_model(tmp_path, base_model):
    server = start_service(["embedded"], PrivateLoRAConfig(), open_registry())
    try:
        endpoint = Endpoint(f"127.0.0.1:{server.port}", insecure=True)
        init_device(tmp_path / "dev", endpoint.address, endpoint=endpoint, enroll_token=open_registry().issue_enrollment_token()[1])
        device = open_device(tmp_path / "dev")
        prompt = encode_prompt(device.tokenizer, "Name three primary colours.")
        ours = list(stream_tokens(device.model, prompt, 20, set()))
        device.close()
    finally:
        server.stop(grace_s=1)
    theirs = base_model.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert ours == theirs[0, len(prompt) :].tolist()
