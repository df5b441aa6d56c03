"""The CLI's one output style: tables or JSON on stdout, a progress board on stderr that is live
on a terminal and a few plain lines anywhere else."""

from __future__ import annotations

import json
from datetime import datetime

import click
import pytest

from plora.platform.cli import output
from plora.platform.cli.main import main
from plora.platform.cli.output import Board, Column


@pytest.fixture
def frozen_clock(monkeypatch):
    """time.monotonic as the board sees it; tests move it on by hand."""
    now = [1000.0]
    monkeypatch.setattr(output.time, "monotonic", lambda: now[0])
    return now


def plain_lines(capsys) -> list[str]:
    captured = capsys.readouterr()
    assert captured.out == ""  # progress never goes to stdout
    return captured.err.splitlines()


def test_off_a_terminal_a_long_job_prints_a_line_per_tenth_not_per_step(capsys, frozen_clock):
    with Board("personalizing") as board:
        assert not board.is_live  # pytest's capture is no terminal
        board.update("dev", "preparing")
        progress = board.steps("dev", "training")
        for step in range(1, 201):
            progress(step, 200, 3.0 - step / 100)
        board.done("dev", "saved")
    lines = plain_lines(capsys)
    assert lines[:3] == ["personalizing", "dev: preparing", "dev: training, step 1/200, loss 2.9900"]
    assert [line.split(", ")[1] for line in lines[3:-1]] == [f"step {20 * k}/200" for k in range(1, 11)]
    assert lines[-1] == "dev: saved, step 200/200, loss 1.0000"


def test_off_a_terminal_a_slow_task_still_shows_news_every_interval(capsys, frozen_clock):
    with Board() as board:
        progress = board.steps("dev", "training")
        progress(1, 1000, 2.0)
        progress(2, 1000, 2.0)  # no new tenth, no time passed: nothing
        frozen_clock[0] += output.PLAIN_EVERY_S
        progress(3, 1000, 1.5)
    assert plain_lines(capsys) == ["dev: training, step 1/1000, loss 2.0000", "dev: training, step 3/1000, loss 1.5000"]


def test_on_a_terminal_the_board_is_live_with_a_row_per_task(capsys, monkeypatch):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    with Board("a fleet", loss_name="loss", keys=["device-000", "device-001"]) as board:
        assert board.is_live
        board.update("device-000", "round 1", 7, 10, 1.25)
        board.update("device-001", "round 1: preparing")
        board.say("round 1: 2 devices sampled")
    err = capsys.readouterr().err
    assert "round 1: 2 devices sampled" in err
    final = err[err.rindex("a fleet"):]  # the board as it was left on the screen
    (first,) = [line for line in final.splitlines() if "device-000" in line]
    assert "round 1" in first and "7/10" in first and "1.2500" in first
    assert any("device-001" in line and "preparing" in line for line in final.splitlines())
    assert "device-000: round 1" not in err  # no plain lines on a terminal


def test_a_table_piped_keeps_each_row_on_one_line_and_json_is_the_same_rows(capsys):
    when = datetime(2026, 1, 2, 3, 4, 5)
    rows = [{"name": "x" * 150, "loss": 0.123456, "at": when, "missing": None}]
    columns = (Column("name", "name"), Column("loss", "loss", ".3f"), Column("at", "at"), Column("missing", "missing"))
    output.show(rows, columns, as_json=False)
    header, rule, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["name", "loss", "at", "missing"] and set(rule) == {"─"}
    assert row.split()[0] == "x" * 150 and "0.123" in row and row.rstrip().endswith("-")
    output.show(rows, columns, as_json=True)
    assert json.loads(capsys.readouterr().out) == [{"name": "x" * 150, "loss": 0.123456, "at": when.isoformat(), "missing": None}]


def _commands(group: click.Group, path: str = "plora"):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, f"{path} {name}")
        else:
            yield f"{path} {name}", command


def test_json_has_one_meaning_everywhere_a_flag_that_prints_json_on_stdout():
    with_json = {}
    for name, command in _commands(main):
        for param in command.params:
            if "--json" in getattr(param, "opts", ()):
                with_json[name] = param
    assert {"plora jobs list", "plora backbone list", "plora bench split", "plora fleet launch", "plora migrate"} <= set(with_json)
    for name, param in with_json.items():
        assert param.is_flag, f"{name}: --json takes a value"
        assert "JSON" in param.help and "stdout" in param.help, f"{name}: --json help says {param.help!r}"


def test_the_fleets_device_progress_feeds_the_board(tmp_path, capsys, frozen_clock):
    from plora.platform.fleet.launch import _device_progress
    from plora.platform.fleet.task import report_progress

    folder = tmp_path / "device-000"
    folder.mkdir()
    with Board(loss_name="loss") as board, _device_progress(tmp_path, board.update):
        report_progress(folder, "round 1", 4, 10, 2.5)
    assert plain_lines(capsys) == ["device-000: round 1, step 4/10, loss 2.5000"]


def test_a_tasks_note_rides_along_without_adding_lines(capsys, frozen_clock):
    with Board() as board:
        for done in range(1, 5):
            board.update("fleet", "round 1/1", done, 40, None, note=f"{done} trained")
    # The note changes with every update; a line comes only with a new tenth of the steps.
    assert plain_lines(capsys) == ["fleet: round 1/1, step 1/40; 1 trained", "fleet: round 1/1, step 4/40; 4 trained"]
