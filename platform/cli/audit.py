"""`plora audit`: the curious cloud as a program."""

from __future__ import annotations

from pathlib import Path

import click

from plora.platform.audit.settings import MINIMUM_INVERTER_BUDGET, AuditSettings, InverterBudget
from plora.platform.cli.common import fail_cleanly
from plora.platform.cli.output import JSON_HELP, say, show


def split_points(text: str) -> tuple[tuple[int, int], ...]:
    """'0,2:2' -> ((0, 0), (2, 2))."""
    splits = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition(":")
        try:
            splits.append((int(first), int(last or 0)))
        except ValueError:
            raise click.BadParameter(f"{part!r} is not FIRST or FIRST:LAST", param_hint="--splits") from None
        if min(splits[-1]) < 0:
            raise click.BadParameter(f"{part!r}: layer counts are >= 0", param_hint="--splits")
    if not splits:
        raise click.BadParameter("name at least one configuration", param_hint="--splits")
    return tuple(splits)


def noise_levels(text: str) -> tuple[str | None, ...]:
    """'none,gaussian:1' -> (None, 'gaussian:1'), each checked."""
    from plora.clients.cut_noise import CutNoise
    from plora.storage.errors import ConfigError

    levels = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            levels.append(None if part == "none" else str(CutNoise.parse(part)))
        except ConfigError as err:
            raise click.BadParameter(str(err), param_hint="--cut-noise") from None
    if not levels:
        raise click.BadParameter("name at least one level (none for no noise)", param_hint="--cut-noise")
    return tuple(levels)


@click.command()
@click.option("--backbone", default=AuditSettings.backbone, show_default=True, help="The backbone to audit: 'embedded', a checkpoint folder or a .gguf file.")
@click.option("--splits", default=",".join(f"{first}:{last}" for first, last in AuditSettings.splits), show_default=True,
              help="The configurations to audit, as FIRST:LAST decoder layers run on the device (FIRST alone means FIRST:0).")
@click.option("--cut-noise", default="none", show_default=True,
              help="The noise on the state at the cut each split is audited with, comma-separated: none, gaussian:σ or dchi:ε "
                   "(as `plora device init --cut-noise`), e.g. none,gaussian:1,gaussian:4.")
@click.option("--personas", default=AuditSettings.personas, show_default=True, type=click.IntRange(min=1), help="Synthetic users per configuration.")
@click.option("--train-steps", type=click.IntRange(min=1), help="Steps of each personalization job [default: the persona job's].")
@click.option("--questions", default=AuditSettings.questions, show_default=True, type=click.IntRange(min=1),
              help="Held-out persona questions each device answers before and after its job.")
@click.option("--reply-tokens", default=AuditSettings.reply_tokens, show_default=True, type=click.IntRange(min=1),
              help="Tokens of each answer.")
@click.option("--candidates", default=AuditSettings.candidates, show_default=True, type=click.IntRange(min=1),
              help="Tokens vocabulary matching tries per position through the device-side layers.")
@click.option("--widened", default=AuditSettings.widened, show_default=True, type=click.IntRange(min=1),
              help="Tokens it tries when none of the first matched exactly (a device-side M the cloud does not know).")
@click.option("--training-passes", default=AuditSettings.training_passes, show_default=True, type=click.IntRange(min=1),
              help="Training steps of each personalization job whose inputs and labels are attacked (the first ones).")
@click.option("--public-data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder of public text (.txt, .jsonl) the learned inverter trains on [default: text the base model writes].")
@click.option("--inverter-tokens", default=MINIMUM_INVERTER_BUDGET.tokens, show_default=True, type=click.IntRange(min=1),
              help="Public tokens the learned inverter trains on. Below the default the report flags its figures.")
@click.option("--inverter-steps", default=MINIMUM_INVERTER_BUDGET.steps, show_default=True, type=click.IntRange(min=1),
              help="Its training steps. Below the default the report flags its figures.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write audit.md, audit.png and audit.json into this folder.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@fail_cleanly
def audit(backbone, splits, cut_noise, personas, train_steps, questions, reply_tokens, candidates, widened, training_passes,
          public_data, inverter_tokens, inverter_steps, report_dir, as_json) -> None:
    """Measure what an honest-but-curious cloud learns from the split protocol.

    For each configuration it serves the backbone with the audit recorder on (as `plora backbone
    serve --record` does), runs synthetic users over loopback gRPC (answers as a new user, a
    personalization job, answers again), and attacks the captures with public weights only:
    input inversion (nearest rows, vocabulary matching, a learned inverter trained on public
    text), output recovery, training labels and so the training text from the gradients the
    device sends, M by least squares, and the persona facts the recovered M states.
    Everything runs in a temporary folder that is deleted afterwards; the captures never
    outlive the audit.
    """
    from plora.platform.audit.report import columns, write_report
    from plora.platform.audit.run import run_audit

    settings = AuditSettings(backbone=backbone, splits=split_points(splits), cut_noise=noise_levels(cut_noise), personas=personas,
                             questions=questions, reply_tokens=reply_tokens, candidates=candidates, widened=widened,
                             training_passes=training_passes, public_data=public_data,
                             inverter=InverterBudget(tokens=inverter_tokens, steps=inverter_steps), train_steps=train_steps)
    document = run_audit(settings, say)
    show(document["rows"], columns(), as_json, title="what a curious cloud recovers", document=document)
    if report_dir:
        say(f"wrote {write_report(document, report_dir)}")
