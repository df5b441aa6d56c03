"""Wiring a device to its backbone: the one place that picks the link implementation.

With a local backbone spec ("embedded" or a path) the cloud half runs in this process
behind an InProcessLink, a valid single-machine mode. With HOST:PORT the device talks to a
backbone service over gRPC. Everything above this module sees only a DeviceModel and does
not know which link it runs on.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from plora.clients.adapter_file import load_adapter
from plora.clients.cut_noise import CutNoise
from plora.clients.device_model import DeviceModel
from plora.clients.device_store import DeviceRecord, DeviceStore
from plora.clients.grpc_link import Credentials, Endpoint, GrpcLink, describe, download_bundle, forget, register
from plora.clients.public_store import PublicStore
from plora.clients.recovery import RetryPolicy
from plora.cloud_backbone import loading
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.compute import CloudHalf
from plora.cloud_backbone.protocol.link import InProcessLink
from plora.cloud_backbone.protocol.messages import HostedBackbone
from plora.cloud_backbone.protocol.wire import WireDtypes
from plora.storage.errors import AuthenticationError, ConfigError, TransportError, VersionMismatchError
from plora.storage.files import write_atomically
from plora.storage.registry import Registry

_HOST_PORT = r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]):\d{1,5}"
_ADDRESS = re.compile(f"{_HOST_PORT}(?:,{_HOST_PORT})*")  # one service, or its replicas
# In a device folder being forgotten: the service has forgotten the device, only the folder is left.
FORGOTTEN = ".forgotten"


def is_address(spec: str) -> bool:
    return bool(_ADDRESS.fullmatch(spec)) and not Path(spec).exists()


@dataclass
class Device:
    store: DeviceStore
    model: DeviceModel
    tokenizer: PreTrainedTokenizerBase
    steps: int  # optimizer steps the stored adapter was trained for
    address: str | None = None  # where its service was reached, when not at the one it enrolled with
    fleet_start_rounds: int = 0  # the federated rounds of the fleet's M this device starts from (0: from M = 0)

    def save(self, steps: int) -> None:
        self.store.write_adapter(self.model.weights, steps)
        self.steps = steps

    def start_from_fleet(self, path: Path) -> int:
        """Start the device's first personalization from its fleet's starting M (an adapter file
        of platform.fleet.federation, bound to the device's backbone version) instead of M = 0;
        returns the federated rounds it was learnt in. Nothing is saved until the job saves."""
        if self.steps:
            raise ConfigError(f"{self.store.root} already holds a personalization of {self.steps} steps; starting from the "
                              "fleet's M is for a device's first personalization")
        tensors, header = load_adapter(path, self.store.record.identity)
        self.model.weights.load_named_tensors(tensors)
        self.fleet_start_rounds = header.steps
        return header.steps

    def close(self) -> None:
        self.model.link.close()


def init_device(
    root: Path,
    backbone_spec: str,
    config: PrivateLoRAConfig | None = None,
    endpoint: Endpoint | None = None,
    label: str = "",
    enroll_token: str = "",
    public: Path | None = None,
    cut_noise: CutNoise | None = None,
) -> DeviceStore:
    """Create a device folder bound to a backbone, with M = 0.

    A local backbone takes `config` (default PrivateLoRAConfig()); a service fixes the
    adapter configuration itself, and `config`, if given, must agree with it. A service
    enrolls the device with `enroll_token`, issued by its operator (`plora backbone enroll
    create`, or Registry.issue_enrollment_token); only one with open enrollment takes none.
    The device keeps its public files (its backbone's device half, its base model's anchor
    text) in its own folder, or with `public` in that PublicStore, shared with other devices.
    With `cut_noise`, every pass of the device puts that noise on the state it sends at the cut.
    """
    root = Path(root)
    if (root / DeviceStore.RECORD).exists():
        raise ConfigError(f"{root} already holds a device; use another folder")
    if not is_address(backbone_spec):
        identity = loading.load(backbone_spec).identity(config or PrivateLoRAConfig())
        return DeviceStore.create(root, backbone_spec, identity, public=public, cut_noise=cut_noise)
    endpoint = endpoint or Endpoint(backbone_spec)
    credentials, hosted = register(endpoint, enroll_token, label=label)
    identity = hosted.identity
    if config is not None and config != identity.adapter:
        raise ConfigError(f"the service at {backbone_spec} serves adapter config {identity.adapter}, not {config}; drop the adapter options")
    root.mkdir(parents=True, exist_ok=True)
    fetch_bundle(root, endpoint, credentials, hosted, public)
    credentials.save(root / DeviceStore.CREDENTIALS)
    transport = {"insecure": endpoint.insecure, "ca_file": endpoint.ca_file}
    return DeviceStore.create(root, backbone_spec, identity, endpoint=transport, device_id=credentials.device_id,
                              bundle_sha256=hosted.bundle_sha256, public=public, cut_noise=cut_noise)


def fetch_bundle(folder: Path, endpoint: Endpoint, credentials: Credentials, hosted: HostedBackbone, public: Path | None) -> None:
    """Download the device half of `hosted` for the device whose files are made in `folder`:
    there, or into the PublicStore `public` unless it holds the half already."""
    if public is not None:
        PublicStore(public).fetch_bundle(endpoint, credentials, hosted)
        return
    shutil.rmtree(folder / DeviceStore.BUNDLE, ignore_errors=True)  # left by an earlier, failed download
    download_bundle(endpoint, credentials, hosted, folder / DeviceStore.BUNDLE)


def forget_device(root: Path, reg: Registry, address: str | None = None) -> dict[str, int]:
    """Remove the device in folder `root` from its service (registry rows, jobs, credential and
    whatever else the service keeps about it) and from the local registry `reg`, then delete
    the folder. Returns the records deleted, by kind.

    If the service cannot be reached, nothing is deleted and this raises TransportError. A
    device bound to a local backbone has no service: only `reg` and the folder hold it."""
    root = Path(root)
    record = DeviceStore.open(root, midway=True).record
    removed: dict[str, int] = {}
    if is_address(record.backbone_spec) and not (root / FORGOTTEN).exists():
        endpoint = Endpoint(address or record.backbone_spec, **(record.endpoint or {}))
        try:
            removed = forget(endpoint, Credentials.load(root / DeviceStore.CREDENTIALS))
        except AuthenticationError as err:
            raise AuthenticationError(f"{err}. If an earlier forget reached the service, it has forgotten this device "
                                      f"already, and only the folder is left: delete {root} yourself") from err
        except TransportError as err:
            raise TransportError(f"{err}. Nothing was deleted; run `plora device forget {root}` again once the service at "
                                 f"{endpoint.address} is reachable, with --backbone HOST:PORT if it has moved") from err
        write_atomically(root / FORGOTTEN, b"")  # a re-run after a failed delete skips the service
    for kind, count in reg.forget_device(record.device_id).items():
        removed[kind] = removed.get(kind, 0) + count
    shutil.rmtree(root)
    return removed


def split_embedded(backbone: loading.Backbone, config: PrivateLoRAConfig, cut_noise: CutNoise | None = None,
                   noise_seed: int | None = None) -> DeviceModel:
    """Both halves of `backbone` in this process, joined by an in-process link; `noise_seed` as DeviceModel's."""
    link = InProcessLink(CloudHalf(backbone, config).open_session())
    return DeviceModel(backbone.model, config, link, cut_noise, noise_seed)


def connect(
    store: DeviceStore,
    record: DeviceRecord,
    address: str | None = None,
    bundle: Path | None = None,
    retry: RetryPolicy = RetryPolicy(),
    wire_dtypes: WireDtypes = WireDtypes(),
) -> tuple[DeviceModel, PreTrainedTokenizerBase]:
    """The device's model for `record`, with M = 0: over the network when the record names a
    service (at `address` if given: services move, the device's identity does not), else in
    this process. `bundle` is the device half's folder when it is not the store's current one.
    `retry` says how long a network step that lost its connection is tried again, and
    `wire_dtypes` what the activations cross the network in."""
    if is_address(record.backbone_spec):
        endpoint = Endpoint(address or record.backbone_spec, **(record.endpoint or {}))
        credentials = Credentials.load(store.root / DeviceStore.CREDENTIALS)
        shared = store.public_store(record)
        if bundle is None and shared is not None and not store.bundle_folder(record).is_dir():
            # Gone from the store the device shares (deleted, say, after a corruption was found): fetch it again.
            hosted = describe(endpoint, record.identity.version)
            if hosted.bundle_sha256 != record.bundle_sha256:
                raise VersionMismatchError(f"the service now announces device half {hosted.bundle_sha256} for "
                                           f"{record.identity.version}, not the {record.bundle_sha256} {store.root} enrolled with")
            shared.fetch_bundle(endpoint, credentials, hosted)
        model_k, tokenizer = store.load_bundle(record, bundle)
        link = GrpcLink(endpoint, credentials, record.identity, retry=retry, wire_dtypes=wire_dtypes)
        model = DeviceModel(model_k, record.identity.adapter, link, record.cut_noise)
    else:
        backbone = loading.load(record.backbone_spec)
        model, tokenizer = split_embedded(backbone, record.identity.adapter, record.cut_noise), backbone.tokenizer
    try:
        model.link.identity.require_match(record.identity)
    except BaseException:
        model.link.close()
        raise
    return model, tokenizer


def open_device(
    root: Path, address: str | None = None, retry: RetryPolicy = RetryPolicy(), wire_dtypes: WireDtypes = WireDtypes()
) -> Device:
    """The device in folder `root` with its stored M; `address` overrides where its service is."""
    store = DeviceStore.open(root)
    model, tokenizer = connect(store, store.record, address, retry=retry, wire_dtypes=wire_dtypes)
    try:
        steps = store.read_adapter(model.weights)
    except BaseException:
        model.link.close()
        raise
    return Device(store, model, tokenizer, steps, address)
