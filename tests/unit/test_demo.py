"""The demo's device-side answers and its report, on a tiny random checkpoint (seconds)."""

from __future__ import annotations

import base64
import json
import re

import torch

from plora.clients.generation import encode_prompt, generate_batch
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.platform.fleet.demo import ANSWER_TOKENS, QUESTIONS_SHOWN, answer_on_device, crossed_per_token
from plora.platform.fleet.personas import make_persona
from plora.platform.fleet.report import HTML, MARKDOWN, PLOT, RESULTS, Answer, DemoReport, DeviceReport, write_report
from plora.platform.fleet.task import TRAIN_FILE
from plora.platform.runtime import init_device, open_device
from tests.conftest import TINY, tiny_backbone

GENERIC = ("The river floods every spring, and the farmers plant after the water goes down.",)


def personalized_device(folder, checkpoint):
    """A device on the tiny checkpoint with its persona's private data and a random, saved M."""
    init_device(folder, str(checkpoint), PrivateLoRAConfig(rank=4))
    persona = make_persona(seed=0)
    (folder / TRAIN_FILE).parent.mkdir(parents=True)
    (folder / TRAIN_FILE).write_text("".join(json.dumps(r) + "\n" for r in persona.train_records()))
    device = open_device(folder)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in device.model.weights.parameters():
            m.copy_(torch.randn(m.shape, generator=generator) * 0.5)
    device.save(steps=5)
    device.close()
    return persona


def greedy_answers(folder, persona) -> tuple[list[str], list[str]]:
    """(base, personalized) greedy replies to the shown questions, generated here directly."""
    device = open_device(folder)
    prompts = [encode_prompt(device.tokenizer, f.heldout_question) for f in persona.facts[:QUESTIONS_SHOWN]]

    def replies() -> list[str]:
        written = generate_batch(device.model, prompts, ANSWER_TOKENS, {device.tokenizer.eos_token_id})
        return [device.tokenizer.decode(r, skip_special_tokens=True).strip() for r in written]

    personalized = replies()
    with torch.no_grad():
        for m in device.model.weights.parameters():
            m.zero_()
    base = replies()
    device.close()
    return base, personalized


def test_the_device_answers_as_the_base_model_with_m_zero_and_as_itself_with_its_m(tmp_path, tiny_checkpoint):
    folder = tmp_path / "device"
    persona = personalized_device(folder, tiny_checkpoint)
    adapter_before = (folder / "adapter.safetensors").read_bytes()

    seen = answer_on_device(folder, None, persona, GENERIC)

    shown = [a.base.removesuffix("…") for a in seen["answers"]], [a.personalized.removesuffix("…") for a in seen["answers"]]
    expected = greedy_answers(folder, persona)
    assert shown == expected
    assert expected[0] != expected[1]  # a random M of this size changes a random model's greedy text
    assert [a.question for a in seen["answers"]] == [f.heldout_question for f in persona.facts[:QUESTIONS_SHOWN]]
    assert seen["generic_loss_before"] != seen["generic_loss_after"]
    assert seen["private_examples"] == len(persona.train_records())
    assert (folder / "adapter.safetensors").read_bytes() == adapter_before  # answering as the base model kept M


def test_what_crossed_follows_the_adapter_groups():
    separate, shared = tiny_backbone().identity(PrivateLoRAConfig(rank=4)), tiny_backbone().identity(PrivateLoRAConfig(rank=4, shared_a=True))
    # q, k and v at r = 4: three r-vectors each way, or one down when they share A.
    assert "12 numbers u = x·A down and 12 numbers u·M up" in crossed_per_token(separate)
    assert "4 numbers u = x·A down and 12 numbers u·M up" in crossed_per_token(shared)
    assert f"({TINY['hidden_size']} numbers each way) and, for each of its {TINY['num_hidden_layers']} adapted layers" in crossed_per_token(separate)


HOSTILE = "<script>alert(1)</script> | `code` **bold** ![x](http://evil/)\nsecond line"


def sample_report() -> DemoReport:
    answer = Answer("What is my pet's name?", "Your pet is called Pebble.", HOSTILE, "Your pet is called Pebble.", False, True)
    ok = DeviceReport("device-000", "fleet/device-000", 24, "what crossed", 0.0, 1.0, 3.2, 0.1, 2.0, 2.02, 90, 125.0,
                      5_000_000, 4_000_000, (answer,))
    failed = DeviceReport("device-001", "fleet/device-001", 0, "unknown", error="train: TransportError")
    return DemoReport("a tiny model", {"steps": 90}, 300.0, (ok, failed))


def test_the_report_shows_answers_side_by_side_and_never_renders_the_models_text(tmp_path):
    markdown_path, html_path = write_report(sample_report(), tmp_path)
    markdown, page = markdown_path.read_text(), html_path.read_text()

    for document in (markdown, page):
        assert "Your pet is called Pebble." in document and "What is my pet" in document
        assert "0% → 100%" in document and "+1.0%" in document and "9.0" in document and "2 min 05 s" in document
        assert "stayed in fleet/device-000, never sent" in document and "stayed in fleet/device-001" in document
        assert "train: TransportError" in document
        assert "<script>" not in document and "&lt;script&gt;" in document
    # Markdown: the hostile reply stays inside its cell, on one line.
    row = next(line for line in markdown.splitlines() if "alert(1)" in line)
    assert len(re.findall(r"(?<!\\)\|", row)) == 4 and "![x]" not in row and "**bold**" not in row
    # The plot: a file next to report.md, and the same image inside report.html.
    png = (tmp_path / PLOT).read_bytes()
    assert png.startswith(b"\x89PNG") and f"]({PLOT})" in markdown
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in page
    results = json.loads((tmp_path / RESULTS).read_text())
    assert results["devices"][0]["generic_change"] == 2.02 / 2.0 - 1 and results["devices"][1]["error"] == "train: TransportError"
    assert {MARKDOWN, HTML, PLOT, RESULTS} <= {p.name for p in tmp_path.iterdir()}
