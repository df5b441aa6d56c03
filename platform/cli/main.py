"""The `plora` command line: the top-level group, with one module per group of commands.

Every command prints its results on stdout (tables through cli.output, which --json turns into
JSON) and its progress, notes and log lines on stderr.
"""

from __future__ import annotations

import logging

import click

from plora.platform.cli.audit import audit
from plora.platform.cli.backbone import backbone
from plora.platform.cli.bench import bench
from plora.platform.cli.device import device, generate, jobs, personalize, score
from plora.platform.cli.fleet import demo, fleet
from plora.platform.cli.migrate import migrate
from plora.platform.cli.output import CurrentStderr
from plora.storage.offline import go_offline


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """plora: a private, personalized LLM on a shared cloud backbone (PrivateLoRA).

    The cloud runs the frozen decoder; your device keeps the tokenizer, embeddings, LM head
    and the small private matrices M that make the model yours. Text, M and M's gradients
    never leave the device.
    """
    go_offline()  # before any command imports Hugging Face's libraries; started processes inherit it
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", handlers=[CurrentStderr()])


for command in (device, personalize, generate, score, jobs, backbone, migrate, bench, demo, fleet, audit):
    main.add_command(command)
