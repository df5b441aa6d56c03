"""The demo's report: what personalization changed on each device, as a person wants to see it.

One record (DemoReport) is written three ways into the demo's folder: report.md (its plot a
file next to it), report.html (self-contained: the plot inlined as a base64 PNG) and
results.json. Answers are the model's own text, so both documents escape them: a reply is
shown, never interpreted as markup.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from plora.platform.cli.output import Column, markdown_table

PLOT = "before_after.png"
MARKDOWN, HTML, RESULTS = "report.md", "report.html", "results.json"


@dataclass(frozen=True)
class Answer:
    """One held-out question, answered greedily by the base model (M = 0) and by the personalized one."""

    question: str
    expected: str
    base: str
    personalized: str
    base_recalled: bool
    personalized_recalled: bool


@dataclass(frozen=True)
class DeviceReport:
    device: str
    folder: str
    """Where the device's private data and M live, relative to the report."""
    private_examples: int
    """Training examples in the device's private file."""
    crossed: str
    """What crossed to the cloud per token, in words: the device's split and adapter decide it."""
    recall_before: float | None = None
    recall_after: float | None = None
    heldout_loss_before: float | None = None
    heldout_loss_after: float | None = None
    generic_loss_before: float | None = None
    generic_loss_after: float | None = None
    steps: int = 0
    train_seconds: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    answers: tuple[Answer, ...] = ()
    error: str | None = None
    """What went wrong on this device, if anything; its other figures are then partial."""

    @property
    def generic_change(self) -> float | None:
        if self.generic_loss_before is None or self.generic_loss_after is None:
            return None
        return self.generic_loss_after / self.generic_loss_before - 1


@dataclass(frozen=True)
class DemoReport:
    backbone: str
    settings: dict[str, int | float | str]
    """The settings the demo pinned, by name."""
    seconds: float
    devices: tuple[DeviceReport, ...]


def write_report(report: DemoReport, out: Path) -> tuple[Path, Path]:
    """Write the plot, report.md, report.html and results.json into `out`; returns the two reports."""
    png = _plot(report.devices)
    (out / PLOT).write_bytes(png)
    (out / MARKDOWN).write_text(markdown(report))
    (out / HTML).write_text(html_page(report, png))
    results = {**asdict(report), "devices": [{**asdict(d), "generic_change": d.generic_change} for d in report.devices]}
    (out / RESULTS).write_text(json.dumps(results, indent=2))
    return out / MARKDOWN, out / HTML


def summary_lines(report: DemoReport) -> list[str]:
    """One line per device, for the terminal once the report is written."""
    return [f"{d.device}: recall {_percent(d.recall_before)} → {_percent(d.recall_after)}, generic-text loss "
            f"{_percent(d.generic_change, signed=True)}, {_duration(d.train_seconds)} of training"
            + (f"; failed: {d.error}" if d.error else "") for d in report.devices]


def _percent(value: float | None, signed: bool = False) -> str:
    return "–" if value is None else format(value, "+.1%" if signed else ".0%")


def _loss(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _figures(device: DeviceReport) -> list[tuple[str, str, str]]:
    """(what, before, after) rows, the same in both documents."""
    generic_after = _loss(device.generic_loss_after)
    if device.generic_change is not None:
        generic_after += f" ({_percent(device.generic_change, signed=True)})"
    return [
        ("held-out recall of private facts", _percent(device.recall_before), _percent(device.recall_after)),
        ("held-out loss (nats/token)", _loss(device.heldout_loss_before), _loss(device.heldout_loss_after)),
        ("generic-text loss (nats/token)", _loss(device.generic_loss_before), generic_after),
    ]


def _work(device: DeviceReport) -> str:
    return (f"Trained {device.steps} steps in {_duration(device.train_seconds)}; exchanged "
            f"{_megabytes(device.bytes_up + device.bytes_down)} with the cloud while training "
            f"({_megabytes(device.bytes_up)} up, {_megabytes(device.bytes_down)} down).")


def _stayed(device: DeviceReport) -> str:
    return (f"Its private data ({device.private_examples} training examples and its held-out questions) and M stayed in "
            f"{device.folder}, never sent. Per token, what crossed to the cloud was {device.crossed}; "
            "the orchestrator received only scalar metrics.")


def _intro(report: DemoReport) -> str:
    pinned = ", ".join(f"{name} {value}" for name, value in report.settings.items())
    return (f"{len(report.devices)} devices personalized on {report.backbone} through a backbone service, orchestrated "
            f"by Flower; {_duration(report.seconds)} in all. The demo's pinned settings: {pinned}. Held-out questions are "
            "paraphrases no device trained on; answers are greedy, generated on the device through the split, first with "
            "M = 0 (exactly the base model), then with the device's M. Generic-text loss is measured on a few built-in "
            "texts no device trains on; a change near 0% means personalization cost no general ability.")


def _mark(recalled: bool) -> str:
    return "✓" if recalled else "✗"


_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_\[\]~|!#])")


def _md_cell(text: str) -> str:
    # A reply is shown as written, on one line: its markup, HTML and pipes are escaped, so it
    # can neither format itself, load an image nor break out of its table cell.
    one_line = html.escape(" ".join(text.split()), quote=False)
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", one_line) or "(nothing)"


DEVICE_COLUMNS = (
    Column("device", lambda d: d.device),
    Column("recall before → after", lambda d: f"{_percent(d.recall_before)} → {_percent(d.recall_after)}"),
    Column("held-out loss before → after", lambda d: f"{_loss(d.heldout_loss_before)} → {_loss(d.heldout_loss_after)}"),
    Column("generic-text loss change", lambda d: _percent(d.generic_change, signed=True)),
    Column("MB exchanged", lambda d: (d.bytes_up + d.bytes_down) / 1e6, ".1f"),
    Column("training time", lambda d: _duration(d.train_seconds)),
)
FIGURE_COLUMNS = (Column("", lambda f: f[0]), Column("before", lambda f: f[1]), Column("after", lambda f: f[2]))
ANSWER_COLUMNS = (
    Column("held-out question", lambda a: f"{_md_cell(a.question)}<br>expected: {_md_cell(a.expected)}"),
    Column("base model", lambda a: f"{_mark(a.base_recalled)} {_md_cell(a.base)}"),
    Column("personalized", lambda a: f"{_mark(a.personalized_recalled)} {_md_cell(a.personalized)}"),
)


def markdown(report: DemoReport) -> str:
    lines = ["# plora demo: what personalization changed", "", _intro(report), "", f"![recall and loss before and after]({PLOT})", ""]
    lines += markdown_table(report.devices, DEVICE_COLUMNS)
    for d in report.devices:
        lines += ["", f"## {d.device}", ""]
        if d.error:
            lines += [f"**Failed:** {_md_cell(d.error)}", ""]
        lines += [_stayed(d), "", *markdown_table(_figures(d), FIGURE_COLUMNS), "", _work(d)]
        if d.answers:
            lines += ["", *markdown_table(d.answers, ANSWER_COLUMNS)]
    return "\n".join(lines) + "\n"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;line-height:1.45}
table{border-collapse:collapse;margin:.6rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}.ok{color:#17803d}.miss{color:#b3261e}.note{color:#555}.failed{color:#b3261e;font-weight:bold}
img{max-width:100%}"""


def _row(cells: list[str], tag: str = "td") -> str:
    return "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>"


def _answer_cell(text: str, recalled: bool) -> str:
    mark = f'<span class="{"ok" if recalled else "miss"}">{_mark(recalled)}</span>'
    return f"{mark} {html.escape(text) or '(nothing)'}"


def html_page(report: DemoReport, png: bytes) -> str:
    e = html.escape
    image = base64.b64encode(png).decode()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>plora demo</title><style>{_STYLE}</style></head><body>",
             "<h1>plora demo: what personalization changed</h1>", f"<p>{e(_intro(report))}</p>",
             f"<img alt='recall and loss before and after' src='data:image/png;base64,{image}'>", "<table>",
             _row(["device", "recall before → after", "held-out loss before → after", "generic-text loss change",
                   "MB exchanged", "training time"], "th")]
    for d in report.devices:
        parts.append(_row([e(d.device), f"{_percent(d.recall_before)} → {_percent(d.recall_after)}",
                           f"{_loss(d.heldout_loss_before)} → {_loss(d.heldout_loss_after)}", _percent(d.generic_change, signed=True),
                           f"{(d.bytes_up + d.bytes_down) / 1e6:.1f}", _duration(d.train_seconds)]))
    parts.append("</table>")
    for d in report.devices:
        parts.append(f"<h2>{e(d.device)}</h2>")
        if d.error:
            parts.append(f"<p class='failed'>Failed: {e(d.error)}</p>")
        parts += [f"<p class='note'>{e(_stayed(d))}</p>", "<table>", _row(["", "before", "after"], "th")]
        parts += [_row([e(cell) for cell in figure]) for figure in _figures(d)]
        parts += ["</table>", f"<p>{e(_work(d))}</p>"]
        if d.answers:
            parts += ["<table>", _row(["held-out question", "base model", "personalized"], "th")]
            parts += [_row([f"{e(a.question)}<br><span class='note'>expected: {e(a.expected)}</span>",
                            _answer_cell(a.base, a.base_recalled), _answer_cell(a.personalized, a.personalized_recalled)])
                      for a in d.answers]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _plot(devices: tuple[DeviceReport, ...]) -> bytes:
    """Recall, held-out loss and generic-text loss change per device, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    names = [d.device for d in devices]
    x = list(range(len(devices)))
    fig, (recall, loss, generic) = plt.subplots(1, 3, figsize=(14, 4.4))
    for axis, before, after, title, scale, label in (
        (recall, [d.recall_before for d in devices], [d.recall_after for d in devices], "held-out recall (%)", 100, "{:.0f}"),
        (loss, [d.heldout_loss_before for d in devices], [d.heldout_loss_after for d in devices], "held-out loss (nats/token)",
         1, "{:.2f}"),
    ):
        for offset, values, name in ((-0.2, before, "base model"), (0.2, after, "personalized")):
            bars = axis.bar([i + offset for i in x], [scale * (v or 0) for v in values], 0.4, label=name,
                            color="tab:gray" if name == "base model" else "tab:green")
            axis.bar_label(bars, [label.format(scale * v) if v is not None else "–" for v in values], fontsize=8)
        axis.set_title(title)
        axis.margins(y=0.15)
    changes = [d.generic_change for d in devices]
    bars = generic.bar(x, [100 * (c or 0) for c in changes], 0.5, color="tab:blue")
    generic.bar_label(bars, [f"{100 * c:+.1f}%" if c is not None else "–" for c in changes], fontsize=8)
    generic.axhline(0, color="black", linewidth=0.8)
    generic.set_title("generic-text loss change (%)")
    generic.margins(y=0.15)
    for axis in (recall, loss, generic):
        axis.set_xticks(x, names, rotation=20)
    fig.legend(*recall.get_legend_handles_labels(), loc="upper center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
