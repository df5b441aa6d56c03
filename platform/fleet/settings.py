"""The settings of a fleet run and the names of the fleet's files: the one source of both.

A run's settings reach Flower's apps in one way only, as the Flower App's run config
(pyproject.toml's [tool.flwr.app.config], see superlink.flower_app), on either engine. The
defaults below are the fleet's: the launcher's and the committed Flower App's (deploy/fleet-app).
This module imports nothing heavy, so that the command line can take its defaults from here
without loading a model library.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import get_type_hints

from plora.storage.errors import ConfigError

ENGINES = ("simulation", "deployment")
PERSONAL, FEDAVG = "personal", "fedavg"
STRATEGIES = (PERSONAL, FEDAVG)
"""personal: every device trains its own M and nothing is aggregated (server_app, client_app);
fedavg: the devices that opted in learn a shared starting M together (federation)."""
PERSONAS = "personas"
"""The `data` that gives each device a synthetic persona (personas.py) instead of a data file."""
ROUNDS_FILE = "rounds.jsonl"  # under the fleet root: one line per device per round
MIGRATIONS_FILE = "migrations.jsonl"  # under the fleet root: one line per device of a migration run
FEDERATION_FILE = "federation.jsonl"  # under the fleet root: one line per round of a federated run
FEDERATION_DIR = "federation"
"""Under the fleet root: the fleet's starting M, one adapter file per backbone version (federation)."""
PUBLIC_DIR = "public"
"""Under the fleet root: the PublicStore its devices share (clients.public_store)."""
PROGRESS_FILE = "progress.json"
"""In each device folder: the latest phase or step of the device's running job, for the launcher."""
TRAINED, FAILED = "trained", "failed"
"""How a device's round ends, as the last phase it reports for it: "round 3: trained"."""
BASELINE, WAITING = "evaluating", "waiting to train"
"""The phases of a device measuring its baseline, and then waiting for its first training."""
ORCHESTRATOR_TAG = "orchestrator: "
"""Starts each of the ServerApp's log lines, so the launcher tells them from Flower's in the run's log."""
FLOWER_DIR = "flower"
"""Under the fleet root: FLWR_HOME (config.toml, installed apps), the Flower App, logs/."""


def completion_marker(fleet_root: Path, run_id: int) -> Path:
    """The file a ServerApp writes as its last act when its run completed: JSON with the number
    of lines it logged for the launcher. The launcher then takes those lines from the run's log
    stream and stops, without waiting for Flower's own wind-down of the run (seconds)."""
    return fleet_root / FLOWER_DIR / "logs" / f"run-{run_id}.completed"
_LOOPBACK = {"127.0.0.1", "localhost", "[::1]"}


@dataclass(frozen=True)
class FleetSettings:
    """One fleet run. Run-config keys are the field names with hyphens ("fleet-root")."""

    fleet_root: Path
    """Folder holding rounds.jsonl and one sub-folder per device; a device on a host of its own
    keeps its folder in its host's device-root instead (NodeConfig)."""
    backbone: str
    """HOST:PORT of the backbone service: on loopback, in plain text, unless backbone-ca is set."""
    data: str = PERSONAS
    """Either "personas" (a synthetic persona per device) or a JSONL file split among the devices;
    a device on a host of its own reads its host's own data file instead (NodeConfig)."""
    devices: int = 3
    """Devices the orchestrator waits for before the first round."""
    rounds: int = 2
    steps: int = 10
    """Optimizer steps per device per round."""
    lr: float = 1e-2
    batch_size: int = 4
    drift_budget: float = 0.02
    """The personalization jobs' drift budget (clients.anchor.AnchorSettings.drift_budget, whose
    default this is; the settings must not import it); 0: the anchor keeps its starting weight."""
    fraction: float = 1.0
    """Share of the devices sampled for each round."""
    fraction_evaluate: float = 1.0
    """Share of each round's trained devices evaluated after training; 0: none."""
    reply_timeout: float = 3600.0
    """Seconds the orchestrator waits for devices to join, and for each round's replies. On a
    small machine a round's devices train in turns, so a round takes several jobs' time: the
    demo's 4 devices on 2 cores take about 10 minutes."""
    migrate_to: str = ""
    """When set, the run migrates every device to this backbone version instead of training."""
    migrate_method: str = "distill"
    migrate_min_retention: float = -1.0
    """The share of each device's personalization gain its new M must keep (see
    platform.versions.migration); negative: the migration's own default."""
    enroll_token: str = ""
    """The enrollment token devices enroll with; `plora fleet launch` issues one for the run."""
    partitions: str = ""
    """When set, the run's nodes stand for these devices only, comma-separated partition ids: node
    k is device partitions[k]. A migration asks only the devices set up, which in a fleet sampled
    a few at a time are far fewer than it declares."""
    strategy: str = PERSONAL
    """"personal" (each device its own M) or "fedavg" (a shared starting M learnt by the devices
    that opted in; see federation.py)."""
    secure_aggregation: bool = True
    """fedavg: aggregate under SecAgg+, so the orchestrator learns only the sum of the devices' M."""
    dp_noise: float = 0.0
    """fedavg: the Gaussian noise multiplier of central differential privacy (0: off), with each
    device's update clipped to dp-clip on the device."""
    dp_clip: float = 1.0
    """fedavg: the L2 norm each device's update (its M less the starting M) is clipped to, under DP."""
    dp_delta: float = 1e-5
    """fedavg: the delta at which epsilon is reported."""
    opt_out: str = ""
    """fedavg, simulated users only: comma-separated partition ids of the devices whose users
    decline the federation; every other device of a federated fleet joins it."""
    backbone_ca: str = ""
    """A CA certificate (PEM file, the same path on every device host) that the devices trust for
    the backbone service: they then reach it over TLS, at any address. Empty: plain text."""

    def __post_init__(self) -> None:
        host, _, port = self.backbone.rpartition(":")
        if not (host and port.isdigit() and len(port) <= 5):
            raise ConfigError(f"backbone must be HOST:PORT, got {self.backbone!r}")
        if host not in _LOOPBACK and not self.backbone_ca:
            raise ConfigError(f"a backbone service off loopback ({self.backbone!r}) is reached over TLS only: "
                              "give the CA certificate the devices trust for it (backbone-ca)")
        if min(self.devices, self.rounds, self.steps, self.batch_size) < 1:
            raise ConfigError(
                f"devices, rounds, steps and batch-size must be >= 1, got {self.devices}, {self.rounds}, {self.steps}, {self.batch_size}"
            )
        if not (0 < self.fraction <= 1 and 0 <= self.fraction_evaluate <= 1 and self.lr > 0 and self.reply_timeout > 0
                and self.drift_budget >= 0):
            raise ConfigError(f"need 0 < fraction <= 1, 0 <= fraction-evaluate <= 1, lr > 0, reply-timeout > 0, "
                              f"drift-budget >= 0; got {self.fraction}, {self.fraction_evaluate}, {self.lr}, "
                              f"{self.reply_timeout}, {self.drift_budget}")
        ids = self.partitions.split(",") if self.partitions else []
        if not all(i.isdigit() for i in ids) or len({int(i) for i in ids}) != len(ids) or (ids and len(ids) != self.devices):
            raise ConfigError(f"partitions must be {self.devices} distinct partition ids, comma-separated; got {self.partitions!r}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not (self.dp_noise >= 0 and self.dp_clip > 0 and 0 < self.dp_delta < 1):
            raise ConfigError(f"need dp-noise >= 0, dp-clip > 0 and 0 < dp-delta < 1; got {self.dp_noise}, {self.dp_clip}, {self.dp_delta}")
        opting_out = self.opt_out.split(",") if self.opt_out else []
        if not all(i.isdigit() for i in opting_out):
            raise ConfigError(f"opt-out must be partition ids, comma-separated; got {self.opt_out!r}")

    def opts_out(self, partition_id: int) -> bool:
        """Whether the simulated user of this device declines the federation (opt-out)."""
        return str(partition_id) in (self.opt_out.split(",") if self.opt_out else [])

    def device_of(self, node_partition: int) -> int:
        """The partition id of the device that the run's node of partition `node_partition` stands for."""
        return int(self.partitions.split(",")[node_partition]) if self.partitions else node_partition

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> FleetSettings:
        hints = get_type_hints(cls)
        values = {}
        for field in fields(cls):
            key = field.name.replace("_", "-")
            if key in run_config:
                values[field.name] = _convert(key, run_config[key], hints[field.name])
            elif field.default is MISSING:
                raise ConfigError(f"the run config lacks {key!r}; it has {sorted(run_config)}")
        return cls(**values)

    def to_run_config(self) -> dict[str, str | int | float]:
        return {f.name.replace("_", "-"): _plain(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class NodeConfig:
    """What a SuperNode's --node-config says of the device it runs; Flower hands it to each of
    that SuperNode's ClientApps. The run config is the same on every host, but only the
    operator's host has the fleet root: a device on a host of its own gets its folder and its
    data from its host's node config, and nothing of the run's fleet root or data file."""

    partition_id: int
    """The device's partition id: its folder's name, its persona, its share of a split data file."""
    num_partitions: int
    device_root: Path | None = None
    """"device-root": this host's folder holding the device's folder and the PublicStore, instead
    of the run's fleet root."""
    data: str | None = None
    """"data": this host's own data file, all of it this device's, instead of a share of the run's data."""

    @classmethod
    def parse(cls, node_config: Mapping[str, object]) -> NodeConfig:
        partition_id, num_partitions = node_config.get("partition-id"), node_config.get("num-partitions")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (partition_id, num_partitions)) or not (
            0 <= partition_id < num_partitions  # type: ignore[operator]
        ):
            raise ConfigError("the node config needs partition-id and num-partitions, integers with "
                              f"0 <= partition-id < num-partitions; got {partition_id!r} and {num_partitions!r}")
        device_root, data = node_config.get("device-root"), node_config.get("data")
        if device_root is not None and not (isinstance(device_root, str) and Path(device_root).is_absolute()):
            raise ConfigError(f"the node config's device-root must be an absolute path, got {device_root!r}")
        if data is not None and not (isinstance(data, str) and data):
            raise ConfigError(f"the node config's data must be a data file's path, got {data!r}")
        return cls(partition_id, num_partitions, Path(device_root) if device_root else None, data)  # type: ignore[arg-type]

    def device_settings(self, run: FleetSettings) -> FleetSettings:
        """The run's settings as this node's device sees them: its host's folder and data."""
        return dataclasses.replace(run, fleet_root=self.device_root or run.fleet_root, data=self.data or run.data)


def _plain(value: object) -> str | int | float:
    return str(value) if isinstance(value, Path) else value  # type: ignore[return-value]


def _convert(key: str, value: object, kind: type) -> object:
    if kind is bool and isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind in (str, Path) and isinstance(value, str):
        return kind(value)
    raise ConfigError(f"run config {key!r} must be {kind.__name__}, got {value!r}")


def sampled_per_round(devices: int, fraction: float) -> int:
    """How many of `devices` a round samples at `fraction`: at least one."""
    return max(1, round(fraction * devices))


_DEVICE = "device-"


def device_name(partition_id: int) -> str:
    """The folder, under the fleet root, of the device with this partition id; also its name in tables."""
    return f"{_DEVICE}{partition_id:03d}"


def device_dir(root: Path, partition_id: int) -> Path:
    return Path(root) / device_name(partition_id)


def start_path(root: Path, version: str) -> Path:
    """The fleet's starting M for backbone `version`, under the fleet root (platform.fleet.federation)."""
    return Path(root) / FEDERATION_DIR / f"{version}.safetensors"


def partition_of(folder: Path) -> int | None:
    """The partition id of a folder named by device_name, else None."""
    match = re.fullmatch(rf"{re.escape(_DEVICE)}(\d{{3,}})", Path(folder).name)
    return int(match.group(1)) if match else None
