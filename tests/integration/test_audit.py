"""`plora audit` end to end on the embedded SmolLM2-135M, on a small sample: the full run's
settings are in the README, with its table."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from plora.platform.cli.main import main

pytestmark = pytest.mark.embedded


def test_the_audit_recovers_a_new_users_text_through_public_device_layers_and_reports_it(tmp_path):
    report, public = tmp_path / "report", tmp_path / "public"
    public.mkdir()
    (public / "text.txt").write_text("The weather was mild and the market opened early on the square. " * 60)
    result = CliRunner().invoke(main, ["audit", "--public-data", str(public), "--splits", "1:1", "--personas", "1", "--train-steps", "1",
                                       "--questions", "1", "--reply-tokens", "4", "--candidates", "8", "--widened", "16",
                                       "--training-passes", "1", "--inverter-tokens", "600", "--inverter-steps", "20",
                                       "--json", "--report", str(report)])
    assert result.exit_code == 0, result.output
    (one_layer_each_end,) = json.loads(result.stdout)["rows"]

    # Public layers on the device at M = 0 still give a new user's text back, by vocabulary
    # matching; the outputs come back through the public last layer at M = 0 too.
    assert one_layer_each_end["inputs_new_user"]["share"] >= 0.9
    assert one_layer_each_end["outputs"]["share"] >= 0.5
    # The job's one step is at M = 0: its labels, and so its responses' tokens (a fifth of the
    # rows; the prompts take no loss), come back from the gradients through the public last layer.
    assert one_layer_each_end["labels"]["share"] >= 0.9
    assert one_layer_each_end["inputs_training_gradients"]["share"] >= 0.1
    assert {p.name for p in report.iterdir()} == {"audit.md", "audit.png", "audit.json"}
    assert "below the minimum budget" in (report / "audit.md").read_text()
