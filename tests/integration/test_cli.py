"""The `plora` command line end to end, on a tiny random checkpoint folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from plora.clients.adapter_file import load_adapter
from plora.clients.device_store import DeviceStore
from plora.clients.generation import encode_prompt, token_logprobs
from plora.platform.cli.main import main
from plora.storage.registry import open_registry
from plora.platform.runtime import open_device
from tests.conftest import REPO, tiny_llama

FACTS = [{"prompt": f"What is fact {i}?", "response": f"Fact {i} is {w}."} for i, w in enumerate(["teal", "Pebble", "Tartu"])]


def plora(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    return result


@pytest.fixture
def device_dir(tmp_path, tiny_checkpoint):
    path = tmp_path / "dev"
    plora("device", "init", path, "--backbone", tiny_checkpoint, "--rank", "4", "--device-layers", "1")
    return path


@pytest.fixture
def facts_file(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FACTS))
    return path


def test_stdlib_platform_is_not_shadowed_from_the_repo_root():
    code = "import platform, torch; print(platform.system())"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr


def test_console_script_is_installed_and_explains_itself():
    done = subprocess.run(["plora", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command in ("device", "personalize", "generate", "score", "backbone", "bench", "demo"):
        assert command in done.stdout


def test_the_cli_starts_without_importing_torch():
    # Every command (`plora --help`, `plora jobs list`, what deploy scripts run) paid torch's
    # seconds of import before its first line; a command that computes imports it when it runs.
    code = "import sys; import plora.platform.cli.main; print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_cli_states_the_defaults_of_the_code_it_must_not_import():
    from plora.clients.data import PERSONALIZE_MAX_LENGTH
    from plora.clients.training import MIN_STEPS, NEAR_BEST
    from plora.platform.bench.migrate import UPGRADES
    from plora.platform.cli.bench import bench_migrate
    from plora.platform.cli.device import personalize

    defaults = {param.name: param.default for param in personalize.params}
    assert (defaults["min_steps"], defaults["max_length"]) == (MIN_STEPS, PERSONALIZE_MAX_LENGTH)
    patience = next(param for param in personalize.params if param.name == "patience")
    assert f"within {NEAR_BEST:.0%} of the best validation gain" in patience.help
    upgrades = next(param for param in bench_migrate.params if param.name == "upgrades")
    assert tuple(upgrades.type.choices) == UPGRADES


def test_init_creates_a_base_model_device_registered_in_the_database(device_dir):
    record = json.loads((device_dir / "device.json").read_text())
    tensors, header = load_adapter(device_dir / "adapter.safetensors", DeviceStore.open(device_dir).record.identity)
    assert record["adapter"]["device_layers"] == 1 and header.steps == 0
    assert all(torch.count_nonzero(t) == 0 for t in tensors.values())  # M = 0
    assert open_registry().get_device(record["device_id"]).backbone_version_id is not None


def test_personalize_lowers_the_loss_and_records_the_job(device_dir, facts_file):
    # A budget no training keeps within: the job raises the anchor's weight, and says so.
    result = plora("personalize", device_dir, "--data", facts_file, "--steps", 30, "--lr", "1e-1", "--drift-budget", "1e-6")
    assert "adapter saved" in result.output and "learning rate: 0.1; selection: pinned by --lr" in result.output
    device_id = json.loads((device_dir / "device.json").read_text())["device_id"]
    (job,) = open_registry().list_jobs(device_id)
    assert job.status == "succeeded" and job.steps_done == 30 and job.tokens_processed > 0
    # A tiny random model starts near ln(vocab); the real backbone is tested in test_embedded.
    assert job.metrics_after["train_loss"] < job.metrics_before["train_loss"] - 0.1
    assert f"generic text: loss {job.metrics_after['generic_drift']:+.1%} against the base model" in result.output
    assert job.params["drift_budget"] == 1e-6 and job.metrics_after["anchor_weight"] == 10.0
    assert "over its drift budget, the job raised the anchor's weight from 3 to 10" in result.output
    tensors, header = load_adapter(device_dir / "adapter.safetensors", DeviceStore.open(device_dir).record.identity)
    assert header.steps == 30 and any(torch.count_nonzero(t) for t in tensors.values())


def test_personalize_with_a_drift_budget_of_0_keeps_the_anchor_s_weight(device_dir, facts_file):
    plora("personalize", device_dir, "--data", facts_file, "--steps", 3, "--lr", "1e-1", "--drift-budget", "0")
    (job,) = open_registry().list_jobs(json.loads((device_dir / "device.json").read_text())["device_id"])
    assert "drift_budget" not in job.params and job.params["anchor_weight"] == job.metrics_after["anchor_weight"] == 3.0


def test_score_json_matches_the_personalized_model(device_dir, facts_file):
    trained = plora("personalize", device_dir, "--data", facts_file, "--steps", 5)
    assert "selection: cross-validated: no validation split" in trained.output  # 3 facts: no validation split
    out = json.loads(plora("score", device_dir, "--text", "Fact 1 is Pebble.", "--json").stdout)
    assert len(out["logprobs"]) == len(out["tokens"]) - 1
    device = open_device(device_dir)
    assert out["logprobs"] == pytest.approx(token_logprobs(device.model, out["tokens"]), abs=1e-5)
    assert all(lp <= 0 for lp in out["logprobs"])


def _greedy(device, prompt: str, max_new_tokens: int) -> str:
    """Each next token the argmax of a full forward pass, without the KV cache `plora generate` uses."""
    ids, new = encode_prompt(device.tokenizer, prompt), []
    with torch.no_grad():
        while len(new) < max_new_tokens and (token := int(device.model(torch.tensor([ids + new]))[0, -1].argmax())) != device.tokenizer.eos_token_id:
            new.append(token)
    return device.tokenizer.decode(new, skip_special_tokens=True)


def test_generate_prints_the_personalized_models_greedy_continuation(device_dir):
    device = open_device(device_dir)
    base = _greedy(device, "What is fact 1?", 8)
    torch.manual_seed(0)
    with torch.no_grad():
        for m in device.model.weights.ms.values():
            m.normal_(std=1.0)  # a personalization of its own: M != 0
    device.save(steps=1)
    personalized = _greedy(device, "What is fact 1?", 8)
    device.close()
    assert personalized and personalized != base  # so only the stored M gives this answer
    assert plora("generate", device_dir, "What is fact 1?", "--max-new-tokens", 8).stdout == personalized + "\n"


def test_export_public_writes_named_a_and_b(tmp_path, tiny_checkpoint):
    out = tmp_path / "public.safetensors"
    plora("backbone", "export-public", "--backbone", tiny_checkpoint, "--out", out, "--rank", "4", "--shared-a")
    with safe_open(out, "pt") as f:
        names = set(f.keys())
        assert torch.equal(f.get_tensor("layers.0.self_attn.q_proj.A"), f.get_tensor("layers.0.self_attn.k_proj.A"))
    assert names == {f"layers.{i}.self_attn.{p}_proj.{m}" for i in range(4) for p in "qkv" for m in "AB"}


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b[:200] + bytes(64) + b[264:], id="flipped-bytes"),
        pytest.param(lambda b: b"", id="empty"),
    ],
)
def test_a_corrupt_adapter_is_refused_and_survives(device_dir, corrupt):
    path = device_dir / "adapter.safetensors"
    bad = corrupt(path.read_bytes())
    path.write_bytes(bad)
    result = plora("generate", device_dir, "Hi", ok=False)
    assert "AdapterFileError" in result.output and "Traceback" not in result.output
    assert path.read_bytes() == bad


def test_an_adapter_for_another_backbone_is_refused_and_survives(tmp_path, device_dir, smol_tokenizer):
    # Another backbone with the same adapter options: other weights, one layer fewer, another name.
    backbone = tmp_path / "other-backbone"
    tiny_llama(seed=1, num_hidden_layers=3, vocab_size=len(smol_tokenizer), pad_token_id=smol_tokenizer.pad_token_id).save_pretrained(backbone)
    smol_tokenizer.save_pretrained(backbone)
    other = tmp_path / "other"
    plora("device", "init", other, "--backbone", backbone, "--rank", "4", "--device-layers", "1")
    foreign = (other / "adapter.safetensors").read_bytes()
    (device_dir / "adapter.safetensors").write_bytes(foreign)
    result = plora("score", device_dir, "--text", "a b c", ok=False)
    assert "content_hash: file=" in result.output and "num_layers: file=3 expected=4" in result.output
    assert "rank:" not in result.output  # the backbone alone differs
    assert (device_dir / "adapter.safetensors").read_bytes() == foreign


@pytest.mark.parametrize(
    "content, message",
    [
        pytest.param("", "empty", id="empty-file"),
        pytest.param('{"text": "ok"}\n{"text": broken\n', "line 2", id="malformed-line"),
        pytest.param('{"prompt": "q only"}\n', "response", id="missing-field"),
    ],
)
def test_bad_data_fails_clearly_and_keeps_the_previous_adapter(tmp_path, device_dir, facts_file, content, message):
    plora("personalize", device_dir, "--data", facts_file, "--steps", 3)
    before = (device_dir / "adapter.safetensors").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    result = plora("personalize", device_dir, "--data", bad, ok=False)
    assert "DataError" in result.output and message in result.output
    assert (device_dir / "adapter.safetensors").read_bytes() == before
    device_id = json.loads((device_dir / "device.json").read_text())["device_id"]
    latest = open_registry().list_jobs(device_id)[0]
    assert latest.status == "failed" and "DataError" in latest.reason


def test_bad_configuration_is_a_clear_usage_error(tmp_path, tiny_checkpoint):
    result = plora("device", "init", tmp_path / "d", "--backbone", tiny_checkpoint, "--targets", "q,qq", ok=False)
    assert "unknown or empty targets" in result.output
    result = plora("device", "init", tmp_path / "d", "--backbone", tiny_checkpoint, "--device-layers", "4", ok=False)
    assert "leaves no decoder layer for the cloud" in result.output
    result = plora("device", "init", tmp_path / "d", "--backbone", tmp_path / "nowhere", ok=False)
    assert "no such path" in result.output
