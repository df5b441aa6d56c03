"""For the fleet's tests: the Flower processes a fleet left running, a ServerApp that records
every message the orchestrator sends and receives, and a Ray cluster to join.

The fleet's ServerApp runs in a process of Flower's own on either engine, out of a test's
reach; to watch its messages a test runs `spy_app` instead (through superlink.COMPONENTS, with
the repository on PYTHONPATH), which runs the orchestrator's own `main` and writes one JSON line
per message to the file named by $PLORA_TEST_FLOWER_MESSAGES. A federated fleet's orchestrator
is watched the same way by `federation_spy` (through superlink.FEDERATION_COMPONENTS), which
keeps every reply whole, numbers and all. `ray_cluster` starts a Ray cluster for a fleet to join.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from flwr.app import Context, Message
from flwr.common import bytes_to_ndarray
from flwr.serverapp import Grid, ServerApp

from plora.platform.fleet import federation, server_app, superlink

MESSAGES_ENV = "PLORA_TEST_FLOWER_MESSAGES"
SPY_APP = f"{__name__}:spy_app"
RECEIVED_ENV = "PLORA_TEST_FLOWER_RECEIVED"
FEDERATION_SPY_APP = f"{__name__}:federation_spy"

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


federation_spy = ServerApp()


@federation_spy.main()
def spy_on_federation(grid: Grid, context: Context) -> None:
    """The federation's orchestrator, with every reply it receives kept whole in the folder named
    by $PLORA_TEST_FLOWER_RECEIVED: its numbers in an .npz each, and one line per reply in
    received.jsonl naming the sender, the kind of message answered and its SecAgg+ stage."""
    folder = Path(os.environ[RECEIVED_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    push, pull = grid.push_messages, grid.pull_messages
    asked: dict[str, tuple[str, str | None]] = {}  # message id -> (type, SecAgg+ stage)

    def spy_push(messages):
        messages = list(messages)
        ids = list(push(messages))
        for message_id, message in zip(ids, messages):
            stage = message.content.config_records.get("secaggplus_configs", {}).get("stage")
            asked[message_id] = (message.metadata.message_type, stage)
        return ids

    def spy_pull(message_ids):
        replies = list(pull(message_ids))
        with (folder / "received.jsonl").open("a") as record:
            for reply in replies:
                kind, stage = asked.get(reply.metadata.reply_to_message_id, (None, None))
                name = f"{len(list(folder.glob('*.npz'))):05d}.npz"
                np.savez(folder / name, *numbers_in(reply))
                record.write(json.dumps({"file": name, "node": reply.metadata.src_node_id, "type": kind, "stage": stage,
                                         "error": reply.has_error()}) + "\n")
        return replies

    grid.push_messages, grid.pull_messages = spy_push, spy_pull
    federation.main(grid, context)


def numbers_in(message: Message) -> list[np.ndarray]:
    """Every number a message carries, as arrays: its ArrayRecords', and its ConfigRecords' and
    MetricRecords' values, bytes read both as serialized arrays and as raw bytes."""
    if message.has_error():
        return []
    content, found = message.content, []
    for record in content.array_records.values():
        found += [array.numpy() for array in record.values()]
    for record in [*content.config_records.values(), *content.metric_records.values()]:
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, bytes):
                    found.append(np.frombuffer(item, dtype=np.uint8))
                    try:
                        found.append(bytes_to_ndarray(item))
                    except (ValueError, OSError, EOFError):
                        pass
                elif isinstance(item, (int, float)) and not isinstance(item, bool):
                    found.append(np.array([item]))
    return found


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


@dataclass(frozen=True)
class RayCluster:
    address: str
    session: Path  # the cluster's session folder, with a log of every driver that joined it

    def drivers(self) -> list[Path]:
        return sorted((self.session / "logs").glob("python-core-driver-*.log"))


@contextlib.contextmanager
def ray_cluster(cpus: int, log: Path) -> Iterator[RayCluster]:
    """A Ray cluster of its own, as an operator starts one (`ray start --head --block`), with
    the environment of the moment; stops every process of it after."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    (port,) = superlink._free_ports(1)
    address = f"127.0.0.1:{port}"
    ray = superlink._executable("ray")  # where the launcher finds Flower's commands: this environment's first
    with log.open("wb") as output:
        head = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                                 f"--num-cpus={cpus}", "--num-gpus=0", "--include-dashboard=false",
                                 "--disable-usage-stats", f"--temp-dir={temp}"],
                                stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([ray, "status", f"--address={address}"], capture_output=True, timeout=60).returncode != 0:
            assert head.poll() is None and time.monotonic() < deadline, f"the Ray cluster did not start:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        yield RayCluster(address, Path(temp) / "session_latest")
        assert head.poll() is None, "the Ray cluster stopped during the test"
    finally:
        superlink._stop(superlink._with_descendants(head.pid))  # as the launcher stops Flower's processes
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)
