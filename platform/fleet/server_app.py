"""The orchestrator of the fleet: a Flower ServerApp that runs personalization rounds.

Each round it asks the sampled devices to train, those sampled for the first time in the run
measuring their baseline first (round 0), then a sample of them to evaluate, and appends one
line per device to <fleet-root>/rounds.jsonl. Only sampled devices ever hear
from it, so a fleet costs what its sampled devices do, however many it declares. Nothing is
aggregated: every device keeps its own M, so the orchestrator only schedules work and collects
scalar metrics. Messages it sends carry a ConfigRecord of settings, and a device's first train
message of a run the fleet's starting M (federation.py), if there is one; replies carry a
MetricRecord, and on failure the error's kind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from plora.storage.offline import go_offline

go_offline()  # Flower's processes start here: offline before the imports below load Hugging Face's libraries

from plora.platform.fleet.settings import (
    FEDERATION_DIR,
    MIGRATIONS_FILE,
    ORCHESTRATOR_TAG,
    ROUNDS_FILE,
    FleetSettings,
    completion_marker,
    sampled_per_round,
)
from plora.storage.errors import TransportError
from plora.storage.files import write_atomically

log = logging.getLogger(__name__)

_POLL_S = 0.1

app = ServerApp()


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    """The connected nodes, once `wanted` of them have joined; SuperNodes join after the ServerApp starts."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            raise TransportError(f"only {len(nodes)} of {wanted} devices joined within {timeout:.0f} s")
        time.sleep(_POLL_S)
    return nodes


def _sample(nodes: list[int], fraction: float, server_round: int) -> list[int]:
    # Seeded by the round so a rerun samples the same devices.
    return sorted(random.Random(server_round).sample(nodes, sampled_per_round(len(nodes), fraction)))


def _outcome(reply: Message) -> dict:
    """A reply as {"metrics": {...}, "baseline": {...}, "reply": {...}, "error": kind or None}: its
    scalars, those measured before its job (a MetricRecord "baseline", if any), its other settings
    (a ConfigRecord "reply", if any) and its failure; a reply without content is an error."""
    if reply.has_error():
        return {"metrics": {}, "baseline": {}, "reply": {}, "error": f"flower-error-{reply.error.code}"}
    if not reply.has_content() or "metrics" not in reply.content.metric_records:
        return {"metrics": {}, "baseline": {}, "reply": {}, "error": "no-content"}
    metrics = dict(reply.content.metric_records["metrics"])
    baseline = dict(reply.content.metric_records.get("baseline", {}))
    error = reply.content.config_records.get("error")
    said = dict(reply.content.config_records.get("reply", {}))
    return {"metrics": metrics, "baseline": baseline, "reply": said, "error": str(error["kind"]) if error else None}


def config_content(config: dict, **records: ConfigRecord) -> RecordDict:
    """A message's content: its settings as the ConfigRecord "config", and any `records` besides."""
    return RecordDict({"config": ConfigRecord(config), **records})


def exchange(grid: Grid, contents: dict[int, RecordDict], message_type: str, timeout: float) -> dict[int, dict]:
    """Send one message to each node, with that node's content, and gather the outcomes, keyed by node id.

    Not Grid.send_and_receive: in deployment it looks for replies only every 3 s, and it
    returns none until all are in, where this logs each one as it comes."""
    if not contents:
        return {}
    nodes = list(contents)
    messages = [Message(contents[node], dst_node_id=node, message_type=message_type) for node in nodes]
    waiting = dict(zip(grid.push_messages(messages), nodes))
    outcomes = {}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(waiting)):
            node = waiting.pop(reply.metadata.reply_to_message_id)
            outcomes[node] = _outcome(reply)
            # Log what came back, never what it holds.
            if outcomes[node]["error"]:
                log.warning("%s on node %d failed: %s", message_type, node, outcomes[node]["error"])
            else:
                log.debug("%s on node %d: replied", message_type, node)
        if waiting:
            time.sleep(_POLL_S)
    for node in waiting.values():
        log.warning("%s on node %d: no reply within %.0f s", message_type, node, timeout)
        outcomes[node] = {"metrics": {}, "baseline": {}, "reply": {}, "error": "no-reply"}
    return outcomes


def _round_lines(server_round: int, trained: dict[int, dict], evaluated: dict[int, dict]) -> list[dict]:
    lines = []
    for node in sorted(trained):
        train, evaluation = trained[node], evaluated.get(node, {"metrics": {}, "error": None})  # failed training: not evaluated
        partition = train["metrics"].get("partition_id", evaluation["metrics"].get("partition_id"))
        errors = {k: v for k, v in (("train", train["error"]), ("evaluate", evaluation["error"])) if v}
        lines.append({
            "round": server_round,
            "node_id": node,
            "partition_id": partition,
            "failed": bool(errors),
            "errors": errors,
            "train": train["metrics"],
            "evaluate": evaluation["metrics"],
        })
    return lines


class _Tagged(logging.StreamHandler):
    """The orchestrator's lines, tagged for the launcher to pass on, and counted. An app runs in
    a process of Flower's own, whose output goes to the run's log stream; the tag tells them
    from Flower's."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(f"{ORCHESTRATOR_TAG}%(message)s"))
        self.lines = 0

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.lines += 1


@contextlib.contextmanager
def orchestrating(logger: logging.Logger, fleet_root: Path, run_id: int) -> Iterator[None]:
    """Tag `logger`'s lines for the launcher; once the block completes, write the run's
    completion marker (settings.completion_marker), which a failed run never has."""
    tagged = next((h for h in logger.handlers if isinstance(h, _Tagged)), None)
    if tagged is None:
        tagged = _Tagged()
        logger.addHandler(tagged)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    before = tagged.lines
    yield
    tagged.flush()
    marker = completion_marker(fleet_root, run_id)
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(marker, json.dumps({"lines": tagged.lines - before}).encode())


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = FleetSettings.from_run_config(context.run_config)
    with orchestrating(log, settings.fleet_root, context.run_id):
        if settings.migrate_to:
            _migrate(grid, settings)
        else:
            _rounds(grid, settings)


def _rounds(grid: Grid, settings: FleetSettings) -> None:
    record = settings.fleet_root / ROUNDS_FILE
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text("")  # this run's record starts empty; the devices' adapters carry over
    nodes = wait_for_nodes(grid, settings.devices, settings.reply_timeout)
    log.info("fleet of %d devices, %d rounds of %d steps, %d devices a round",
             len(nodes), settings.rounds, settings.steps, sampled_per_round(len(nodes), settings.fraction))
    # The fleet's starting M of each backbone version, as adapter files' bytes: a device on a
    # host of its own has no fleet root to read them from. A device that joined the federation
    # starts its first personalization from the one of its version.
    starts = {path.stem: path.read_bytes() for path in sorted((settings.fleet_root / FEDERATION_DIR).glob("*.safetensors"))}
    measured: set[int] = set()  # devices with a baseline in this run
    for server_round in range(1, settings.rounds + 1):
        sampled = _sample(nodes, settings.fraction, server_round)
        # A device's baseline is taken before its first training in this run, and only then: a
        # device never sampled is never set up (it enrolls when first asked to do something). It
        # is measured within that train message: in deployment, each message costs a device a
        # new process of its own, importing torch and transformers again.
        fresh = [node for node in sampled if node not in measured]
        config = {"round": server_round, "steps": settings.steps, "lr": settings.lr}
        contents = {node: config_content({**config, "baseline": True}, fleet_start=ConfigRecord(starts)) if node in fresh
                    else config_content({**config, "baseline": False}) for node in sampled}
        trained = exchange(grid, contents, "train", settings.reply_timeout)
        if fresh:
            untrained = {node: {"metrics": {}, "error": None} for node in fresh}
            # A job that failed before its baseline was measured failed the baseline too.
            baseline = {node: {"metrics": {"partition_id": trained[node]["metrics"].get("partition_id"), **trained[node]["baseline"]},
                               "error": None if trained[node]["baseline"] else trained[node]["error"]} for node in fresh}
            _append(record, _round_lines(0, untrained, baseline))
            measured.update(fresh)
        # Only devices whose training went through are worth evaluating, and of them a sample.
        done = [node for node in sampled if not trained[node]["error"]]
        chosen = _sample(done, settings.fraction_evaluate, server_round) if done and settings.fraction_evaluate else []
        evaluated = exchange(grid, {node: config_content({"round": server_round}) for node in chosen}, "evaluate", settings.reply_timeout)
        lines = _round_lines(server_round, trained, evaluated)
        _append(record, lines)
        failed = sum(line["failed"] for line in lines)
        losses = [line["train"]["loss_after"] for line in lines if "loss_after" in line["train"]]
        mean = f"{sum(losses) / len(losses):.3f}" if losses else "n/a"
        log.info("round %d/%d: %d devices trained, %d failed; mean training loss after %s",
                 server_round, settings.rounds, len(lines) - failed, failed, mean)


def _append(record: Path, lines: list[dict]) -> None:
    with record.open("a") as out:
        out.writelines(json.dumps(line) + "\n" for line in lines)


def _migrate(grid: Grid, settings: FleetSettings) -> None:
    """Ask every device to move to the target version; one line per device in migrations.jsonl."""
    record = settings.fleet_root / MIGRATIONS_FILE
    record.write_text("")
    nodes = wait_for_nodes(grid, settings.devices, settings.reply_timeout)
    log.info("migrating %d devices to %s by %s", len(nodes), settings.migrate_to, settings.migrate_method)
    outcomes = exchange(grid, {node: config_content({}) for node in nodes}, "query.migrate", settings.reply_timeout)
    nodes = [node for node in nodes if not outcomes[node]["metrics"].get("absent")]
    with record.open("a") as out:
        for node in nodes:
            outcome = outcomes[node]
            out.write(json.dumps({"node_id": node, "partition_id": outcome["metrics"].get("partition_id"),
                                  "error": outcome["error"], "metrics": outcome["metrics"]}) + "\n")
    failed = sum(bool(outcomes[node]["error"]) for node in nodes)
    log.info("migration to %s: %d devices done, %d failed", settings.migrate_to, len(nodes) - failed, failed)
