"""A federated fleet: the devices whose owners joined learn a shared starting M (M₀) together,
from which each user personalizes (`plora personalize --from-fleet`).

PrivateLoRA's A and B are public and shared, so ΔW = A·M·B is linear in M and the mean of the
devices' M is exactly the mean of their updates. A round:
1. the orchestrator asks every device whether its owner joined, and which backbone version it is
   bound to (a yes or no and a version, nothing of its data);
2. it samples the participants bound to M₀'s version (the version most of them are bound to)
   and sends them M₀;
3. each trains a scratch copy of M₀ on its private data (task.federated_update) and sends it
   back, masked under SecAgg+ so that the orchestrator learns only the sum; devices may drop out
   mid-round, as many as SecAgg+'s threshold allows;
4. FedAvg's mean is the next M₀, kept under ROOT/federation/ as an adapter file bound to its
   backbone version after every round; a sample of the participants measures it on their data.
With dp-noise > 0, each device clips its update on the device (Flower's fixedclipping_mod) and the
orchestrator adds Gaussian noise to the mean (DifferentialPrivacyClientSideFixedClipping); epsilon
is accounted by RDP (dp-accounting) and written, per round and in total, to federation.jsonl.

SecAgg+ hides each device's M from the orchestrator only. The backbone service sees each
device's split traffic, from which it can estimate M (see `plora audit`): the protection holds
when the aggregator and the backbone operator are separate parties.

Flower 1.42 has SecAgg+ only in its legacy API (strategies, a LegacyContext, the SecAgg+ workflow
and mod), so this app is written against that API, apart from the fleet's Message-API apps.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Status
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from plora.storage.offline import go_offline

go_offline()  # Flower's processes start here: offline before the imports below load Hugging Face's libraries

import numpy as np
import torch

from plora.clients.adapter_file import AdapterHeader, load_adapter, save_adapter
from plora.clients.device_store import DeviceStore
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.privatelora import AdapterWeights
from plora.cloud_backbone.protocol.messages import BackboneIdentity
from plora.platform.fleet import task
from plora.platform.fleet.client_app import settings_of
from plora.platform.fleet.server_app import config_content, exchange, orchestrating, wait_for_nodes
from plora.platform.fleet.settings import (
    FAILED,
    FEDERATION_FILE,
    FleetSettings,
    NodeConfig,
    device_dir,
    sampled_per_round,
    start_path,
)
from plora.storage.errors import ConfigError, PloraError, ValidationError

log = logging.getLogger(__name__)

CLIPPING_RANGE = 8.0
"""SecAgg+ quantizes each entry of M within [-8, 8] into QUANTIZATION_RANGE levels: the mean it
recovers is exact to 2 * 8 / 2**22 (about 4e-6) per entry. M entries of trained adapters are
well inside the range; larger ones are clipped to it."""
QUANTIZATION_RANGE = 2**22
RECONSTRUCTION_THRESHOLD = 0.5
"""SecAgg+ recovers the sum as long as, for every device, half of its neighbours (all the round's
devices share keys with each other) are still there: up to half may drop out mid-round."""
MIN_PARTICIPANTS = 2  # secure aggregation of one device's M would be that device's M


def identity_json(identity: BackboneIdentity) -> str:
    return json.dumps({"name": identity.name, "content_hash": identity.content_hash, "num_layers": identity.num_layers,
                       "hidden_size": identity.hidden_size, "adapter": identity.adapter.to_dict()}, sort_keys=True)


def identity_from_json(text: str) -> BackboneIdentity:
    """A device's identity as it said it; a device may say anything, so every field is checked."""
    try:
        data = json.loads(text)
        identity = BackboneIdentity(str(data["name"]), str(data["content_hash"]), int(data["num_layers"]),
                                    int(data["hidden_size"]), PrivateLoRAConfig.from_dict(dict(data["adapter"])))
        identity.adapter.check_backbone(identity.num_layers)
        return identity
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise ValidationError(f"not a backbone identity: {err}") from err


def tensor_names(identity: BackboneIdentity) -> list[str]:
    """M's tensors in the order they cross Flower (adapter-file order)."""
    return [name for name, _ in AdapterWeights(identity.adapter, identity.num_layers).named_tensors()]


def as_tensors(arrays: list[np.ndarray], identity: BackboneIdentity) -> dict[str, torch.Tensor]:
    """Arrays from Flower as M's tensors, after checking they are: as many as M has, r×r,
    floating point and finite."""
    names, rank = tensor_names(identity), identity.adapter.rank
    if len(arrays) != len(names):
        raise ValidationError(f"expected {len(names)} matrices of M, got {len(arrays)}")
    for array in arrays:
        if array.shape != (rank, rank) or array.dtype.kind != "f" or not np.isfinite(array).all():
            raise ValidationError(f"expected finite {rank}x{rank} floating-point matrices, got {array.dtype} {array.shape}")
    return {name: torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)) for name, array in zip(names, arrays)}


def as_parameters(tensors: dict[str, torch.Tensor]) -> Parameters:
    return ndarrays_to_parameters([tensor.detach().to(torch.float32).numpy() for tensor in tensors.values()])


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """The (epsilon, delta) guarantee, per device, of `rounds` releases of the mean with Gaussian
    noise of `noise_multiplier` times the clipping norm, by the RDP accountant of dp-accounting.
    Accounted without amplification by sampling, so an upper bound whatever share is sampled."""
    import dp_accounting  # imported here: the fleet without DP never needs it

    if rounds == 0:
        return 0.0
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), rounds))
    return float(accountant.get_epsilon(delta))


# --- the orchestrator ------------------------------------------------------------------------

server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    settings = FleetSettings.from_run_config(context.run_config)
    with orchestrating(log, settings.fleet_root, context.run_id):
        _federate(grid, context, settings)


def _federate(grid: Grid, context: Context, settings: FleetSettings) -> None:
    nodes = wait_for_nodes(grid, settings.devices, settings.reply_timeout)
    answers = exchange(grid, {node: config_content({}) for node in nodes}, "query.federation", settings.reply_timeout)
    joined = {node: answer for node, answer in answers.items() if not answer["error"] and answer["metrics"].get("joined")}
    identity, participants = _version_of_the_round(joined)
    if len(participants) < MIN_PARTICIPANTS:
        raise ConfigError(f"a federation needs at least {MIN_PARTICIPANTS} devices bound to one backbone version; "
                          f"{len(joined)} of {len(nodes)} joined, {len(participants)} of them on one version")
    path = start_path(settings.fleet_root, identity.version)
    start, rounds_before = _load_start(path, identity)
    log.info("federation of %d devices (%d of %d joined, %d on another version) from %s, %d rounds of %d steps, "
             "%s%s", len(participants), len(joined), len(nodes), len(joined) - len(participants),
             f"the starting M of {rounds_before} rounds" if rounds_before else "M = 0", settings.rounds, settings.steps,
             "under SecAgg+" if settings.secure_aggregation else "IN THE CLEAR (no secure aggregation)",
             f", DP noise {settings.dp_noise} x clip {settings.dp_clip}" if settings.dp_noise else "")
    record = settings.fleet_root / FEDERATION_FILE
    record.write_text("")  # this run's record; M₀ itself carries over between runs
    inner: Strategy = FedAvg(
        fraction_fit=settings.fraction, fraction_evaluate=settings.fraction_evaluate, min_fit_clients=MIN_PARTICIPANTS,
        min_evaluate_clients=1, min_available_clients=len(nodes), initial_parameters=as_parameters(start),
        on_fit_config_fn=lambda server_round: {"round": rounds_before + server_round},
    )
    if settings.dp_noise:
        sampled = sampled_per_round(len(participants), settings.fraction)
        inner = DifferentialPrivacyClientSideFixedClipping(inner, settings.dp_noise, settings.dp_clip, sampled)
    rounds = FederatedRounds(inner, set(participants), settings, identity, path, rounds_before, record)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=settings.rounds, round_timeout=settings.reply_timeout),
                           strategy=rounds)
    secure = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=RECONSTRUCTION_THRESHOLD, max_weight=1.0,
                                clipping_range=CLIPPING_RANGE, quantization_range=QUANTIZATION_RANGE,
                                timeout=settings.reply_timeout)
    DefaultWorkflow(fit_workflow=secure if settings.secure_aggregation else None)(grid, legacy)


def _version_of_the_round(joined: dict[int, dict]) -> tuple[BackboneIdentity | None, list[int]]:
    """The backbone version most joined devices are bound to, and the devices bound to it."""
    identities: dict[int, BackboneIdentity] = {}
    for node, answer in joined.items():
        try:
            identities[node] = identity_from_json(str(answer["reply"].get("identity", "")))
        except ValidationError as err:
            log.warning("device on node %d left out: %s", node, err)
    counts = Counter(identity.version for identity in identities.values())
    if not counts:
        return None, []
    version, _ = counts.most_common(1)[0]
    chosen = [node for node, identity in identities.items() if identity.version == version]
    return identities[chosen[0]], sorted(chosen)


def _load_start(path: Path, identity: BackboneIdentity) -> tuple[dict[str, torch.Tensor], int]:
    """M₀ and the rounds it was learnt in; M = 0 for a version without one yet."""
    if not path.is_file():
        return dict(AdapterWeights(identity.adapter, identity.num_layers).named_tensors()), 0
    tensors, header = load_adapter(path, identity)
    return {name: tensors[name] for name in tensor_names(identity)}, header.steps


class _Among(Criterion):
    def __init__(self, nodes: set[int]):
        self.nodes = nodes

    def select(self, client: ClientProxy) -> bool:
        return client.node_id in self.nodes


class _Participants(ClientManager):
    """The fleet's client manager as the inner strategy sees it: the participants only."""

    def __init__(self, every: ClientManager, nodes: set[int]):
        self.every, self.among = every, _Among(nodes)

    def num_available(self) -> int:
        return len(self.all())

    def register(self, client: ClientProxy) -> bool:
        return self.every.register(client)

    def unregister(self, client: ClientProxy) -> None:
        self.every.unregister(client)

    def all(self) -> dict[str, ClientProxy]:
        return {cid: client for cid, client in self.every.all().items() if self.among.select(client)}

    def wait_for(self, num_clients: int, timeout: int) -> bool:
        return self.every.wait_for(num_clients, timeout)

    def sample(self, num_clients: int, min_num_clients: int | None = None, criterion: Criterion | None = None) -> list[ClientProxy]:
        return self.every.sample(num_clients, min_num_clients, self.among)


class FederatedRounds(Strategy):
    """The strategy the workflow runs: `inner` (FedAvg, maybe under DP) over the participants,
    with M₀ kept after every round and a line per round in federation.jsonl."""

    def __init__(self, inner: Strategy, participants: set[int], settings: FleetSettings, identity: BackboneIdentity,
                 path: Path, rounds_before: int, record: Path):
        self.inner, self.participants, self.settings = inner, participants, settings
        self.identity, self.path, self.rounds_before, self.record = identity, path, rounds_before, record
        self.released = 0  # rounds whose mean was released, for the privacy accounting
        self.line: dict = {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list:
        chosen = self.inner.configure_fit(server_round, parameters, _Participants(client_manager, self.participants))
        self.line = {"round": self.rounds_before + server_round, "participants": len(self.participants),
                     "sampled": len(chosen), "contributed": 0, "dropped": 0, "released": False,
                     "secure_aggregation": self.settings.secure_aggregation}
        return chosen

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Parameters | None, dict]:
        # A device may send anything: what is not M (as many finite r×r matrices) is left out, as
        # a failure. Under SecAgg+ every result carries the sum already, so a bad sum is all left out.
        valid = [(proxy, result) for proxy, result in results if self._is_m(result.parameters)]
        failures = [*failures, *(ValidationError("not M") for _ in range(len(results) - len(valid)))]
        # Not len(failures): the SecAgg+ workflow lists a device that failed to send its M twice.
        self.line.update(contributed=len(valid), dropped=self.line["sampled"] - len(valid))
        return self.inner.aggregate_fit(server_round, valid, failures)

    def _is_m(self, parameters: Parameters) -> bool:
        try:
            as_tensors(parameters_to_ndarrays(parameters), self.identity)
            return True
        except (ValidationError, ValueError, TypeError):
            return False

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        """Called with the round's new M₀ (unchanged when the round released nothing): keep it."""
        if server_round == 0:
            return None
        start = as_tensors(parameters_to_ndarrays(parameters), self.identity)
        self.line["released"] = bool(self.line["contributed"]) and (not self.settings.dp_noise or not self.line["dropped"])
        if self.line["released"]:
            self.released += 1
            save_adapter(self.path, start, AdapterHeader(self.identity, self.rounds_before + server_round))
        if self.settings.dp_noise:
            self.line.update(epsilon_round=epsilon(self.settings.dp_noise, 1, self.settings.dp_delta),
                             epsilon_total=epsilon(self.settings.dp_noise, self.released, self.settings.dp_delta),
                             delta=self.settings.dp_delta)
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list:
        chosen = self.inner.configure_evaluate(server_round, parameters, _Participants(client_manager, self.participants))
        if not chosen:
            self._finish_round()
        return chosen

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[float | None, dict]:
        losses = [float(result.loss) for _, result in results
                  if isinstance(result.loss, (int, float)) and math.isfinite(result.loss)]
        self.line.update(evaluated=len(losses), heldout_loss=sum(losses) / len(losses) if losses else None)
        self._finish_round()
        return self.line["heldout_loss"], {}

    def _finish_round(self) -> None:
        with self.record.open("a") as out:
            out.write(json.dumps(self.line) + "\n")
        line = self.line
        loss = f"{line['heldout_loss']:.3f}" if line.get("heldout_loss") is not None else "n/a"
        privacy = f"; epsilon {line['epsilon_total']:.2f} at delta {line['delta']:g} so far" if "epsilon_total" in line else ""
        log.info("round %d: %d of %d sampled devices contributed, %d dropped out; %s; starting M's held-out loss %s%s",
                 line["round"], line["contributed"], line["sampled"], line["dropped"],
                 "M₀ updated" if line["released"] else "M₀ unchanged", loss, privacy)


# --- the device ------------------------------------------------------------------------------

client = ClientApp()


def content_bytes(message: Message) -> int:
    """The bytes of what a message carries: its arrays, byte strings and text, 8 per number."""
    if message.has_error():
        return len(message.error.reason or "")
    total = sum(len(array.data) for record in message.content.array_records.values() for array in record.values())
    for record in [*message.content.config_records.values(), *message.content.metric_records.values()]:
        for value in record.values():
            for item in value if isinstance(value, list) else [value]:
                total += len(item) if isinstance(item, bytes) else len(item.encode()) if isinstance(item, str) else 8
    return total


def _counted(msg: Message, context: Context, call_next: Callable) -> Message:
    """Every reply's size kept on the device (DIR/federation/sent.jsonl): its owner's record of
    what left it for the orchestrator, and the benchmark's."""
    reply = call_next(msg, context)
    settings = settings_of(context)
    folder = device_dir(settings.fleet_root, _partition(context, settings))
    if not (folder / DeviceStore.RECORD).is_file():  # a device that failed to set up has no record to keep
        return reply
    DeviceStore.open(folder).note_sent({"run": context.run_id, "round": msg.metadata.group_id, "type": msg.metadata.message_type,
                     "bytes": content_bytes(reply)})
    return reply


def _masked_when_asked(msg: Message, context: Context, call_next: Callable) -> Message:
    """SecAgg+ for a round that runs it; a plain round's message goes straight to the handler,
    which refuses it unless the device's owner allows sending M in the clear."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _clipped_when_asked(msg: Message, context: Context, call_next: Callable) -> Message:
    """The update clipped on the device when the round runs DP, before SecAgg+ masks it."""
    if msg.metadata.message_type == MessageType.TRAIN and KEY_CLIPPING_NORM in compat.recorddict_to_fitins(msg.content, True).config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _partition(context: Context, settings: FleetSettings) -> int:
    return settings.device_of(NodeConfig.parse(context.node_config).partition_id)


def _failed(msg: Message, err: Exception) -> Message:
    # The error's kind only: its message may quote private data.
    return Message(error=Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=type(err).__name__), reply_to=msg)


@client.query("federation", mods=[_counted])
def participation(msg: Message, context: Context) -> Message:
    """Whether this device's owner joined the federation, and the backbone version it is bound to."""
    settings = settings_of(context)
    partition_id = _partition(context, settings)
    content = RecordDict({"metrics": MetricRecord({"partition_id": partition_id})})
    try:
        node = NodeConfig.parse(context.node_config)
        joined, identity = task.federation_answer(settings, partition_id, node.num_partitions, own_data=node.data is not None)
        content["metrics"]["joined"] = int(joined)
        content["reply"] = ConfigRecord({"version": identity.version, "identity": identity_json(identity)})
    except (PloraError, OSError) as err:
        log.error("device %d: joining the federation failed: %s: %s", partition_id, type(err).__name__, err)
        content["error"] = ConfigRecord({"kind": type(err).__name__})
    return Message(content, reply_to=msg)


@client.train(mods=[_counted, _masked_when_asked, _clipped_when_asked])
def contribute(msg: Message, context: Context) -> Message:
    """Train a scratch copy of the round's M₀ on the device's data and send it; a failure drops
    the device out of the round, which goes on without it."""
    settings = settings_of(context)
    partition_id = _partition(context, settings)
    fit: FitIns = compat.recorddict_to_fitins(msg.content, keep_input=True)
    server_round = fit.config.get("round")
    try:
        if not isinstance(server_round, int) or isinstance(server_round, bool) or server_round < 1:
            raise ValidationError(f"a round number must be a positive integer, got {server_round!r}")
        identity = task.device_identity(settings, partition_id)
        start = as_tensors(parameters_to_ndarrays(fit.parameters), identity)
        masked = RECORD_KEY_CONFIGS in msg.content.config_records
        contribution = task.federated_update(settings, partition_id, start, server_round, masked)
    except (PloraError, OSError) as err:
        log.error("device %d: round %d failed: %s: %s", partition_id, server_round, type(err).__name__, err)
        task.report_progress(device_dir(settings.fleet_root, partition_id), f"round {server_round}: {FAILED}")
        return _failed(msg, err)
    # Every device weighs the same, whatever its data: the weight would tell its data's size.
    result = FitRes(Status(Code.OK, ""), as_parameters(contribution), num_examples=1, metrics={})
    return Message(compat.fitres_to_recorddict(result, keep_input=True), reply_to=msg)


@client.evaluate(mods=[_counted])
def measure(msg: Message, context: Context) -> Message:
    """The round's M₀ on this device's held-out data: one number, its loss."""
    settings = settings_of(context)
    partition_id = _partition(context, settings)
    ins: EvaluateIns = compat.recorddict_to_evaluateins(msg.content, keep_input=True)
    try:
        start = as_tensors(parameters_to_ndarrays(ins.parameters), task.device_identity(settings, partition_id))
        loss = task.evaluate_start(settings, partition_id, start)
    except (PloraError, OSError) as err:
        log.error("device %d: measuring the starting M failed: %s: %s", partition_id, type(err).__name__, err)
        return _failed(msg, err)
    return Message(compat.evaluateres_to_recorddict(EvaluateRes(Status(Code.OK, ""), loss, 1, {})), reply_to=msg)
