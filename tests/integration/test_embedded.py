"""End to end on the real embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import time

import datasets
import pytest
import torch

from plora.clients.data import tokenize
from plora.clients.generation import encode_prompt, stream_tokens
from plora.clients.training import TrainSettings, evaluate, personalize
from plora.cloud_backbone import loading
from plora.cloud_backbone.privatelora import PrivateLoRAConfig
from plora.platform.personas import make_persona
from plora.platform.runtime import split_embedded

pytestmark = pytest.mark.embedded


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


def test_personalizing_on_private_facts_lowers_their_loss_within_a_minute():
    backbone = loading.load("embedded")
    split = split_embedded(backbone, PrivateLoRAConfig())
    tok = backbone.tokenizer
    persona = make_persona(seed=3, num_facts=4)
    train = tokenize(datasets.Dataset.from_list(persona.train_records()), tok, 64)
    before = evaluate(split, train, tok.pad_token_id)
    started = time.perf_counter()
    personalize(split, train, tok.pad_token_id, TrainSettings(lr=1e-2, steps=20, batch_size=4))
    assert time.perf_counter() - started < 60
    after = evaluate(split, train, tok.pad_token_id)
    assert after < 0.5 * before, (before, after)
