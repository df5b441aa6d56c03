"""Wiring a device to its backbone: the one place that picks the link implementation.

With a local backbone spec ("embedded" or a path) the cloud half runs in this process
behind an InProcessLink, a valid single-machine mode. Everything above this module sees
only a DeviceModel and does not know which link it runs on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from plora.clients.device_model import DeviceModel
from plora.clients.device_store import DeviceStore
from plora.cloud_backbone import loading
from plora.cloud_backbone.compute import CloudHalf
from plora.cloud_backbone.privatelora import PrivateLoRAConfig
from plora.cloud_backbone.protocol import BackboneIdentity, InProcessLink


@dataclass
class Device:
    store: DeviceStore
    model: DeviceModel
    tokenizer: PreTrainedTokenizerBase
    steps: int  # optimizer steps the stored adapter was trained for

    def save(self, steps: int) -> None:
        self.store.write_adapter(self.model.weights, steps)
        self.steps = steps

    def close(self) -> None:
        self.model.link.close()


def init_device(root: Path, backbone_spec: str, config: PrivateLoRAConfig) -> DeviceStore:
    """Create a device folder bound to a backbone, with M = 0."""
    backbone = loading.load(backbone_spec)
    source = backbone.source
    identity = BackboneIdentity(source.name, source.content_hash, backbone.num_layers, backbone.hidden_size, config)
    return DeviceStore.create(root, backbone_spec, identity)


def split_embedded(backbone: loading.Backbone, config: PrivateLoRAConfig) -> DeviceModel:
    """Both halves of `backbone` in this process, joined by an in-process link."""
    link = InProcessLink(CloudHalf(backbone, config).open_session())
    return DeviceModel(backbone.model, config, link)


def open_device(root: Path) -> Device:
    store = DeviceStore.open(root)
    record = store.record
    backbone = loading.load(record.backbone_spec)
    model = split_embedded(backbone, record.adapter)
    model.link.identity.require_match(record.identity)
    steps = store.read_adapter(model.weights)
    return Device(store, model, backbone.tokenizer, steps)
