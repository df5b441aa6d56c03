"""For the fleet's tests: the Flower processes a fleet left running, and a ServerApp that records
every message the orchestrator sends and receives.

The fleet's ServerApp runs in a process of Flower's own on either engine, out of a test's
reach; to watch its messages a test runs `spy_app` instead (through superlink.COMPONENTS, with
the repository on PYTHONPATH), which runs the orchestrator's own `main` and writes one JSON line
per message to the file named by $PLORA_TEST_FLOWER_MESSAGES.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from plora.platform.fleet import server_app, superlink

MESSAGES_ENV = "PLORA_TEST_FLOWER_MESSAGES"
SPY_APP = f"{__name__}:spy_app"

spy_app = ServerApp()


@spy_app.main()
def spy(grid: Grid, context: Context) -> None:
    push, pull = grid.push_messages, grid.pull_messages
    with Path(os.environ[MESSAGES_ENV]).open("a") as record:

        def seen(message: Message) -> None:
            record.write(json.dumps(describe(message)) + "\n")
            record.flush()

        def spy_push(messages):
            messages = list(messages)
            for message in messages:
                seen(message)
            return push(messages)

        def spy_pull(message_ids):
            replies = list(pull(message_ids))
            for reply in replies:
                seen(reply)
            return replies

        grid.push_messages, grid.pull_messages = spy_push, spy_pull
        server_app.main(grid, context)


def describe(message: Message) -> dict:
    """What crossed Flower in a message: its type, whether it is a reply, and its records' kinds
    and values' types (with the values themselves when they are plain scalars or strings)."""
    described = {"type": message.metadata.message_type, "reply": bool(message.metadata.reply_to_message_id),
                 "error": message.has_error()}
    if message.has_error():
        return described
    content = message.content
    records = [*content.metric_records.values(), *content.config_records.values()]
    plain = (bool, int, float, str)
    return {**described, "records": len(content), "array_records": len(content.array_records),
            "metric_and_config_records": len(records),
            "values": [{"type": type(v).__name__, "value": v if isinstance(v, plain) else None}
                       for record in records for v in record.values()]}


def flower_processes(fleet_root: Path, kill: bool = False) -> list[str]:
    """Command lines of the processes still running with this fleet's FLWR_HOME (Flower's, Ray's);
    with `kill`, they are killed too, so that a failed test leaves none behind."""
    found = []
    for process in superlink._running_with_home(str(fleet_root / superlink.FLOWER_DIR)):
        try:
            found.append(" ".join(process.cmdline()))
            if kill:
                process.kill()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found
