"""The one output style of every `plora` command, drawn with `rich`.

Results go to stdout: a table, or with `--json` the same rows as one JSON document, so that
`plora ... --json | jq` and `> file` get the results alone. Everything else goes to stderr:
progress, notes and log lines. Progress is a board with one row per task (a device, a
version, a job): its phase, a bar, step/total and loss. On a terminal the board is live;
anywhere else (CI, a log file, pytest's capture) it prints plain lines instead, when a task
changes phase, passes another tenth of its steps, or has news after PLAIN_EVERY_S, so that a
long job leaves a log of a few lines per task rather than one per step.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

# Seconds between two plain lines of a task whose steps pass slower than a tenth at a time.
PLAIN_EVERY_S = 30.0
# The live board's refreshes per second: smooth enough to watch, cheap next to a training step.
LIVE_REFRESH_PER_S = 4
# Wide enough for any table's rows to stay whole when stdout is a file or a pipe.
UNWRAPPED_WIDTH = 10_000

JSON_HELP = "Print the results as JSON on stdout instead of the table."


@dataclass(frozen=True)
class Column:
    """One column of a table: its header, the row's field (or a function of the row, which may
    then be any object) and how a value is written (a format spec such as '.3f' or '.0%'; a missing value shows as '-')."""

    header: str
    value: str | Callable[[Any], Any]
    fmt: str = ""

    def cell(self, row: dict) -> str:
        value = self.value(row) if callable(self.value) else row.get(self.value)
        if value is None:
            return "-"
        return format(value, self.fmt) if self.fmt else str(value)

    def is_numeric(self, rows: Sequence[dict]) -> bool:
        values = [self.value(r) if callable(self.value) else r.get(self.value) for r in rows]
        present = [v for v in values if v is not None]
        return bool(present) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)


def table(rows: Sequence[dict], columns: Sequence[Column]) -> Table:
    """The rows as a rich table: numbers right-aligned, text left-aligned."""
    shown = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in columns:
        shown.add_column(column.header, justify="right" if column.is_numeric(rows) else "left")
    for row in rows:
        shown.add_row(*(column.cell(row) for column in columns))
    return shown


def markdown_table(rows: Sequence[Any], columns: Sequence[Column]) -> list[str]:
    """The rows as the lines of a Markdown table; cells are written as the columns format them."""
    return ["| " + " | ".join(column.header for column in columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(column.cell(row) for column in columns) + " |" for row in rows)]


def show(rows: Sequence[dict], columns: Sequence[Column], as_json: bool, *, title: str | None = None,
         document: Any = None) -> None:
    """Print the table of `rows` on stdout, under `title` if given, or with `as_json` their JSON
    form instead: `document` where the command has a fuller one (a bench's results), else the rows."""
    if as_json:
        print_json(rows if document is None else document)
        return
    stdout = Console(highlight=False)
    rendered = table(rows, columns)
    if not stdout.is_terminal:  # a file or a pipe has no width: never wrap a row
        natural = stdout.measure(rendered, options=stdout.options.update_width(UNWRAPPED_WIDTH)).maximum
        stdout = Console(highlight=False, width=max(stdout.width, natural))
    if title:
        stdout.print(title, style="bold", markup=False, soft_wrap=True)
    stdout.print(rendered)


def print_json(document: Any) -> None:
    """One JSON document on stdout; times as ISO 8601."""
    sys.stdout.write(json.dumps(document, indent=2, default=_json_value) + "\n")
    sys.stdout.flush()


def _json_value(value: Any) -> str:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable: {value!r}")


def say(line: str) -> None:
    """A note on stderr: above the live board while one is shown, a line of its own otherwise."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(line, markup=False)


class CurrentStderr(logging.StreamHandler):
    """A log handler writing to whatever sys.stderr is when a record comes: a live board
    redirects it to print above itself, and click's test runner swaps it for its own."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass  # always the current sys.stderr


@dataclass
class _Task:
    phase: str = ""
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    note: str | None = None  # what else there is to say, e.g. a fleet's counts and time left
    started: float | None = None  # at its first update
    # What the plain fallback printed last: when, which phase, which tenth of the steps.
    printed_at: float | None = None
    printed_phase: str | None = None
    printed_tenth: int = -1


class Board:
    """Live progress of one or more tasks on stderr, or plain lines where stderr is no terminal.

    Use it as a context manager; `update` may be called from any thread. `steps(key, phase)`
    makes the `progress(step, total, loss)` callback the training loops take."""

    def __init__(self, title: str = "", loss_name: str = "loss", keys: Iterable[str] = ()):
        self.title, self.loss_name = title, loss_name
        self._tasks: dict[str, _Task] = {key: _Task(phase="waiting") for key in keys}
        self._lock = threading.Lock()
        self._console = Console(stderr=True, highlight=False)
        self._live: Live | None = None

    @property
    def is_live(self) -> bool:
        return self._live is not None

    def __enter__(self) -> Board:
        # A live board only on a real terminal: rich also takes FORCE_COLOR, which some CI
        # sets for colour in its logs, to mean one; TTY_INTERACTIVE=1 still forces it.
        terminal = os.environ.get("TTY_INTERACTIVE") == "1" or self._console.file.isatty()
        if self._console.is_interactive and terminal:
            self._live = Live(get_renderable=self._render, console=self._console, refresh_per_second=LIVE_REFRESH_PER_S,
                              redirect_stdout=False, redirect_stderr=True)
            self._live.start()
        elif self.title:
            self.say(self.title)
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()  # leaves the board's last state on the screen
            self._live = None

    def say(self, line: str) -> None:
        """A note above the board (or a plain line)."""
        self._console.print(line, markup=False, soft_wrap=True)

    def update(self, key: str, phase: str | None = None, step: int | None = None, total: int | None = None,
               loss: float | None = None, note: str | None = None) -> None:
        """Task `key` is in `phase` (None: the same phase), at `step` of `total` with `loss`, and
        `note`. A phase without steps (None) shows no step count."""
        with self._lock:
            task = self._tasks.setdefault(key, _Task())
            if task.started is None:
                task.started = time.monotonic()
            if phase is not None:
                task.phase = phase
            task.step, task.total, task.loss, task.note = step, total, loss if step is not None else None, note
            line = self._plain_line(key, task) if self._live is None else None
        if line:
            self.say(line)

    def done(self, key: str, phase: str = "done") -> None:
        """Task `key` has ended in `phase`; its last step and loss stay shown."""
        with self._lock:
            task = self._tasks.get(key, _Task())
            step, total, loss, note = task.step, task.total, task.loss, task.note
        self.update(key, phase, step, total, loss, note)

    def steps(self, key: str, phase: str) -> Callable[[int, int, float], None]:
        """The `progress(step, total, loss)` callback of a training loop, shown as `key` in `phase`."""
        return lambda step, total, loss: self.update(key, phase, step, total, loss)

    def _plain_line(self, key: str, task: _Task) -> str | None:
        now = time.monotonic()
        tenth = task.step * 10 // task.total if task.step is not None and task.total else -1
        news = (task.phase != task.printed_phase or tenth > task.printed_tenth
                or (task.printed_at is not None and now - task.printed_at >= PLAIN_EVERY_S))
        if not news:
            return None
        task.printed_at, task.printed_phase, task.printed_tenth = now, task.phase, tenth
        line = f"{key}: {task.phase}"
        if task.step is not None:
            line += f", step {task.step}/{task.total if task.total else '?'}"
        if task.loss is not None:
            line += f", {self.loss_name} {task.loss:.4f}"
        if task.note:
            line += f"; {task.note}"
        return line

    def _render(self) -> Group:
        grid = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for header, justify in (("", "left"), ("phase", "left"), ("", "left"), ("step", "right"),
                                (self.loss_name, "right"), ("time", "right")):
            grid.add_column(header, justify=justify, no_wrap=True)
        now = time.monotonic()
        with self._lock:
            for key, task in self._tasks.items():
                known = task.step is not None and bool(task.total)
                bar = ProgressBar(total=task.total if known else None, completed=task.step or 0, width=24,
                                  pulse=not known and task.phase != "waiting", animation_time=now)
                grid.add_row(key, task.phase, bar, f"{task.step}/{task.total}" if known else "",
                             "" if task.loss is None else f"{task.loss:.4f}",
                             "" if task.started is None else _duration(now - task.started))
            notes = [Text(f"{key}: {task.note}") for key, task in self._tasks.items() if task.note]
        return Group(*([Text(self.title, style="bold")] if self.title else []), grid, *notes)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}:{seconds:02d}"
