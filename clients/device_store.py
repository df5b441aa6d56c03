"""A device's directory: who it is, which backbone it is bound to, and its adapter.

    DIR/device.json          identity, backbone binding, adapter configuration
    DIR/adapter.safetensors  the private M matrices (see adapter_file)
    DIR/bundle/              a networked backbone's device half, unless the device shares a
                             PublicStore with others (clients.public_store), as a fleet's do
    DIR/federation.json      whether the owner takes part in the fleet's federation, and how
    DIR/federation/          what the device last contributed to it and the size of every reply
                             it sent, for its owner to inspect
    DIR/private/             the user's own text, which never leaves the device: what a
                             fleet puts there (train.jsonl, heldout.jsonl), and under kept/
                             what personalization jobs trained on, so that a later backbone
                             upgrade can carry the personalization over (platform.versions)

Everything is written atomically, so a crash leaves the previous state in place.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from plora.clients.adapter_file import AdapterHeader, load_adapter, save_adapter
from plora.clients.cut_noise import CutNoise
from plora.clients.public_store import PublicStore, load_device_half, relative_to
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.privatelora import AdapterWeights
from plora.cloud_backbone.protocol.messages import BackboneIdentity
from plora.storage.errors import ConfigError
from plora.storage.files import write_atomically

FORMAT = "plora-device/1"


@dataclass(frozen=True)
class FederationChoice:
    """The owner's say in the fleet's federation (platform.fleet.federation). Nothing is shared
    unless `joined`; a device that joined sends its M only masked under secure aggregation,
    unless its owner also allows `in_the_clear`."""

    joined: bool = False
    in_the_clear: bool = False


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    backbone_spec: str  # how to reach the backbone: "embedded", a local path, or host:port
    identity: BackboneIdentity  # the backbone version this device was made for
    created_at: str
    endpoint: dict | None = None  # for a networked backbone: {"insecure": bool, "ca_file": str | None}
    bundle_sha256: str | None = None  # a networked backbone's device half, as enrolled; None before plora kept it
    public: str | None = None  # the PublicStore shared with other devices, from the device's folder; None: its own
    cut_noise: CutNoise | None = None  # noise on the state the device sends at the cut; None: none

    def to_json(self) -> dict:
        # The form of plora-device/1 since the first device, the identity's fields flat under
        # these names: every folder ever written opens, and older plora opens new ones.
        identity = self.identity
        return {
            "format": FORMAT,
            "device_id": self.device_id,
            "backbone_spec": self.backbone_spec,
            "backbone_name": identity.name,
            "backbone_hash": identity.content_hash,
            "num_layers": identity.num_layers,
            "hidden_size": identity.hidden_size,
            "created_at": self.created_at,
            "endpoint": self.endpoint,
            "adapter": identity.adapter.to_dict(),
            # Added since; left out when unset, so that older records write back as they were read.
            **{key: value for key, value in (("bundle_sha256", self.bundle_sha256), ("public", self.public),
                                             ("cut_noise", self.cut_noise and self.cut_noise.to_dict())) if value is not None},
        }

    @classmethod
    def from_json(cls, data: dict, where: Path) -> DeviceRecord:
        if data.get("format") != FORMAT:
            raise ConfigError(f"{where} has format {data.get('format')!r}, expected {FORMAT!r}")
        try:
            identity = BackboneIdentity(data["backbone_name"], data["backbone_hash"], data["num_layers"], data["hidden_size"],
                                        PrivateLoRAConfig.from_dict(data["adapter"]))
            noise = data.get("cut_noise")
            return cls(data["device_id"], data["backbone_spec"], identity, data["created_at"], data.get("endpoint"),
                       data.get("bundle_sha256"), data.get("public"), CutNoise.from_dict(noise) if noise is not None else None)
        except (KeyError, TypeError) as err:
            raise ConfigError(f"{where} is missing or has a malformed field: {err}") from err


class DeviceStore:
    RECORD = "device.json"
    ADAPTER = "adapter.safetensors"
    BUNDLE = "bundle"  # the device's half of a networked backbone, as a checkpoint folder
    CREDENTIALS = "credentials.json"
    PRIVATE_TRAIN = "private/train.jsonl"  # the user's own data, when the device keeps it here
    PRIVATE_HELDOUT = "private/heldout.jsonl"
    KEPT_TEXT = "private/kept"  # one JSONL per data set a job trained on, named by its content
    # While a migration to another backbone version runs, the next version's files are made
    # here; once switched to, the old version's files are kept under PREVIOUS/<version>.
    MIGRATION = "migration"
    PREVIOUS = "previous"
    FEDERATION = "federation.json"
    CONTRIBUTION = "federation/contribution.safetensors"
    SENT = "federation/sent.jsonl"  # one line per reply to the federation's orchestrator: its size

    def __init__(self, root: Path, record: DeviceRecord):
        self.root = root
        self.record = record

    @classmethod
    def create(
        cls, root: Path, backbone_spec: str, identity: BackboneIdentity, endpoint: dict | None = None, device_id: str | None = None,
        bundle_sha256: str | None = None, public: Path | None = None, cut_noise: CutNoise | None = None,
    ) -> DeviceStore:
        """A new device folder. `device_id` is the one a service issued; local devices get a fresh
        one. `public` is a PublicStore the device shares with others, None to keep its own files.
        `cut_noise` is the noise its passes put on the state they send at the cut."""
        root = Path(root)
        if (root / cls.RECORD).exists():
            raise ConfigError(f"{root} already holds a device; use another folder")
        identity.adapter.check_backbone(identity.num_layers)
        root.mkdir(parents=True, exist_ok=True)
        record = DeviceRecord(
            device_id=device_id or uuid.uuid4().hex,
            backbone_spec=backbone_spec,
            identity=identity,
            endpoint=endpoint,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            bundle_sha256=bundle_sha256,
            public=None if public is None else relative_to(root, public),
            cut_noise=cut_noise,
        )
        store = cls(root, record)
        write_atomically(root / cls.RECORD, json.dumps(record.to_json(), indent=2).encode())
        store.write_adapter(AdapterWeights(identity.adapter, identity.num_layers), steps=0)  # M = 0: the base model
        return store

    @classmethod
    def open(cls, root: Path, midway: bool = False) -> DeviceStore:
        """The device in `root`. Refused while a verified migration is only partly switched to
        (its files are then a mix of two versions), unless `midway`, for the migration itself."""
        root = Path(root)
        path = root / cls.RECORD
        if not path.is_file():
            raise ConfigError(f"{root} is not a device folder (no {cls.RECORD}); create one with `plora device init {root}`")
        if not midway and (root / cls.MIGRATION / cls.RECORD).is_file():
            raise ConfigError(f"{root} is midway through a migration to another backbone version; run `plora migrate` again to finish it")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        return cls(root, DeviceRecord.from_json(data, path))

    @property
    def adapter_path(self) -> Path:
        return self.root / self.ADAPTER

    def public_store(self, record: DeviceRecord | None = None) -> PublicStore | None:
        """The PublicStore the device shares with others, None when it keeps its own files."""
        public = (record or self.record).public
        return None if public is None else PublicStore(self.root / public)

    def bundle_folder(self, record: DeviceRecord | None = None) -> Path:
        """Where the device half of `record` (default: the device's current one) lies."""
        record = record or self.record
        shared = self.public_store(record)
        return self.root / self.BUNDLE if shared is None else shared.bundle(record.bundle_sha256)

    def public_folder(self) -> Path:
        """Where what the device's base model wrote once is kept: its own folder, or its
        version's in the PublicStore it shares."""
        shared = self.public_store()
        return self.root if shared is None else shared.version(self.record.identity.version)

    def load_bundle(self, record: DeviceRecord | None = None, folder: Path | None = None
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The device half of `record` (default: the device's current one): embeddings, device
        layers, norm, head, checked against its digest. `folder` is where it lies when not where
        the record says (a migration's next one, before the switch)."""
        record = record or self.record
        return load_device_half(folder or self.bundle_folder(record), record.bundle_sha256)

    def read_adapter(self, weights: AdapterWeights) -> int:
        """Load the stored M into `weights`; returns the steps it was trained for."""
        tensors, header = load_adapter(self.adapter_path, self.record.identity)
        weights.load_named_tensors(tensors)
        return header.steps

    def write_adapter(self, weights: AdapterWeights, steps: int) -> None:
        save_adapter(self.adapter_path, weights, AdapterHeader(self.record.identity, steps))

    def federation_choice(self) -> FederationChoice:
        """The owner's choice; a device never asked stays out."""
        path = self.root / self.FEDERATION
        if not path.is_file():
            return FederationChoice()
        try:
            data = json.loads(path.read_text())
            return FederationChoice(joined=data["joined"] is True, in_the_clear=data["in_the_clear"] is True)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"{path} is not a federation choice ({err}); choose again with `plora device federation`") from err

    def choose_federation(self, choice: FederationChoice) -> None:
        write_atomically(self.root / self.FEDERATION, json.dumps({"joined": choice.joined, "in_the_clear": choice.in_the_clear}).encode())

    def keep_contribution(self, weights: AdapterWeights, rounds: int) -> None:
        """What the device sent the federation last, before masking: its owner may look."""
        save_adapter(self.root / self.CONTRIBUTION, weights, AdapterHeader(self.record.identity, rounds))

    def note_sent(self, line: dict) -> None:
        """Append a line to the record of what the device sent the federation (sizes, never content)."""
        path = self.root / self.SENT
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as record:
            record.write(json.dumps(line) + "\n")

    def keep_text(self, records: list[dict[str, str]]) -> Path:
        """Keep a job's training records (validated rows of clients.data) on the device, once
        however often the same data is trained on, in a file of their own: a file holds one
        format, and users' data sets may differ in it."""
        text = "".join(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n" for record in records)
        path = self.root / self.KEPT_TEXT / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, text.encode())
        return path

    def private_text(self) -> list[Path]:
        """The files of the user's own text the device holds: the fleet's, then the kept ones."""
        fleet = self.root / self.PRIVATE_TRAIN
        kept = sorted((self.root / self.KEPT_TEXT).glob("*.jsonl"))
        return ([fleet] if fleet.is_file() else []) + kept
