"""The device side of the fleet: a Flower ClientApp that personalizes and evaluates one device.

A reply carries a MetricRecord of scalars and nothing else, never an ArrayRecord: M, its
gradients and the private data stay on the device. A job that fails with plora's own error
(bad data, the service refusing the device) is reported, not raised: the reply says
"failed" = 1 and names the error's kind, but not its message, which may quote private data.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from plora.storage.offline import go_offline

go_offline()  # Flower's processes start here: offline before the imports below load Hugging Face's libraries

from plora.platform.fleet import task
from plora.platform.fleet.settings import FAILED, FleetSettings, NodeConfig, device_dir
from plora.storage.errors import PloraError

log = logging.getLogger(__name__)

app = ClientApp()

# Parsed once per run and node in each worker process; handlers run many times per run.
_settings: dict[tuple[int, int], FleetSettings] = {}


def settings_of(context: Context) -> FleetSettings:
    """The run's settings as this node's device sees them (NodeConfig.device_settings)."""
    key = (context.run_id, context.node_id)
    if key not in _settings:
        run = FleetSettings.from_run_config(context.run_config)
        _settings[key] = NodeConfig.parse(context.node_config).device_settings(run)
    return _settings[key]


def _run_job(
    msg: Message, context: Context, job: Callable[[FleetSettings, int], dict[str, int | float]], enroll: bool = True,
    records: dict[str, dict[str, int | float]] | None = None,
) -> Message:
    """`job`'s metrics as the reply's MetricRecord "metrics", with any `records` the job filled in
    as MetricRecords of their own, even when it failed after filling them."""
    partition_id = context.node_config.get("partition-id", -1)
    metrics: dict[str, int | float] = {"partition_id": partition_id}
    content, settings = RecordDict(), None
    try:
        settings, node = settings_of(context), NodeConfig.parse(context.node_config)
        partition_id = metrics["partition_id"] = settings.device_of(node.partition_id)
        if enroll:
            task.prepare_device(settings, partition_id, node.num_partitions, own_data=node.data is not None)
        metrics.update(job(settings, partition_id), failed=0)
    except (PloraError, OSError) as err:
        log.error("device %d: %s failed: %s: %s", partition_id, msg.metadata.message_type, type(err).__name__, err)
        config = msg.content.config_records.get("config", ConfigRecord())
        if settings is not None and "round" in config:  # the launcher counts the round's jobs ended
            task.report_progress(device_dir(settings.fleet_root, partition_id), f"round {config['round']}: {FAILED}")
        metrics["failed"] = 1
        content["error"] = ConfigRecord({"kind": type(err).__name__})
    content["metrics"] = MetricRecord(metrics)
    for name, record in (records or {}).items():
        if record:
            content[name] = MetricRecord(record)
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Personalize this device's M for one round, with the round's steps and learning rate; first
    measure its baseline (as evaluate does) when the config asks for it. The device's first job
    may start from the fleet's M the message brings (ConfigRecord "fleet_start")."""
    config = msg.content["config"]
    starts = dict(msg.content.config_records.get("fleet_start", {}))
    baseline: dict[str, int | float] = {}

    def job(settings: FleetSettings, partition_id: int) -> dict[str, int | float]:
        if config.get("baseline"):
            baseline.update(task.evaluate(settings, partition_id))
        this_round = dataclasses.replace(settings, steps=int(config["steps"]), lr=float(config["lr"]))
        return task.personalize(this_round, partition_id, int(config["round"]), starts)

    return _run_job(msg, context, job, records={"baseline": baseline})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Measure this device's personalization on its held-out data."""
    return _run_job(msg, context, task.evaluate)


@app.query("migrate")
def migrate(msg: Message, context: Context) -> Message:
    """Move this device to the run's target backbone version: its new M is made here."""
    return _run_job(msg, context, task.migrate, enroll=False)
