"""The audit's table, Markdown report and plot: configurations as rows, attacks as columns."""

from __future__ import annotations

import io
import json
from pathlib import Path

from plora.platform.cli.output import Column, markdown_table

# (result key, column header): what each attack recovers, as a share of what the device sent.
ATTACKS = (
    ("inputs_new_user", "input tokens, new user"),
    ("inputs_personalized", "input tokens, personalized"),
    ("inputs_learned", "input tokens, learned inverter alone"),
    ("inputs_training", "input tokens, training, at the cut"),
    ("inputs_training_gradients", "input tokens, training, from gradients"),
    ("inputs_training_both", "input tokens, training, both"),
    ("labels", "training labels"),
    ("outputs_new_user", "output tokens, new user"),
    ("outputs", "output tokens, personalized"),
)


def _share(row: dict, key: str) -> float | None:
    return row[key]["share"]


def _interval(row: dict, key: str) -> str:
    figure = row[key]
    if figure["share"] is None:
        return "-"
    return f"{figure['share']:.1%} [{figure['low']:.0%}, {figure['high']:.0%}]"


def columns() -> list[Column]:
    return [
        Column("device layers: first, last", lambda r: f"{r['device_layers']}, {r['device_last_layers']}"),
        Column("noise at the cut", lambda r: r.get("cut_noise") or "none"),
        *[Column(header, lambda row, key=key: _interval(row, key)) for key, header in ATTACKS],
        Column("M exact", "m_exact", ".0%"),
        Column("M worst rel. error", lambda r: r["m_worst_error_by_tokens"]["all"], ".1e"),
        Column("u·M pairs", "m_tokens_seen"),
        Column("facts: cloud / device / base", lambda r: f"{r['facts_cloud']:.0%} / {r['facts_device']:.0%} / {r['facts_base_model']:.0%}"),
        Column("decode tok/s", "decode_tokens_per_s", ".1f"),
        Column("held-out loss", "heldout_loss", ".3f"),
        Column("generic NLL vs base", lambda r: r.get("generic_nll_change"), "+.1%"),
    ]


def markdown(document: dict) -> str:
    cols = columns()
    lines = [
        "# What a curious cloud learns",
        "",
        "Share of what the device sent that the attacks recover from the service's captures and the public weights "
        "alone, with a 95% interval over texts; the share of the cloud layers' M matrices that least squares "
        "recovers to a relative error of 1e-4 from the u, u·M pairs of the replies after the job, and the worst "
        "relative error (the JSON has it against the pairs seen); the persona facts the cloud's recovered M states, "
        "against the device's own model and the base model; and each configuration's decode speed (loopback gRPC), "
        "held-out loss after the job, and the device's NLL on public text after the job against the base model's "
        "without noise.",
        "",
        *markdown_table(document["rows"], cols),
        "",
        f"Settings: `{json.dumps(document['settings'])}`; adapter `{json.dumps(document['adapter'])}`; "
        f"{document['seconds']:.0f} s.",
        "",
        _inverter_note(document),
        "",
        "![recovery per configuration](audit.png)",
        "",
    ]
    return "\n".join(lines)


def _inverter_note(document: dict) -> str:
    trained = document["rows"][0]["inverter"]
    note = (f"The learned inverter trained on {trained['tokens']} public tokens for {trained['steps']} steps "
            f"(last loss {trained['last_loss']:.3g} in the first configuration).")
    if not trained["meets_minimum"]:
        note += " **That is below the minimum budget: its figures are a smoke test, not a measurement.**"
    return note


def plot(document: dict) -> bytes:
    """Each attack's recovery per configuration, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    rows = document["rows"]
    fig, axis = plt.subplots(figsize=(10, 4.4))
    width = 0.8 / len(ATTACKS)
    for i, (key, header) in enumerate(ATTACKS):
        xs = [j + (i - (len(ATTACKS) - 1) / 2) * width for j in range(len(rows))]
        axis.bar(xs, [100 * (_share(r, key) or 0) for r in rows], width, label=header)
    axis.set_xticks(range(len(rows)), [f"device: {r['device_layers']} first, {r['device_last_layers']} last"
                                       + (f"\n{r['cut_noise']}" if r.get("cut_noise") else "") for r in rows])
    axis.set_ylabel("recovered (%)")
    axis.set_ylim(0, 105)
    axis.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, 1.18), frameon=False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_report(document: dict, out: Path) -> Path:
    """audit.md, audit.png and audit.json in `out`; returns the Markdown report."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.png").write_bytes(plot(document))
    (out / "audit.json").write_text(json.dumps(document, indent=2))
    (out / "audit.md").write_text(markdown(document))
    return out / "audit.md"
