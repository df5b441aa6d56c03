"""Backbone versions in the registry: a version is a backbone's weights plus the adapter math."""

from __future__ import annotations

from plora.cloud_backbone import loading
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig, for_link
from plora.cloud_backbone.protocol.messages import BackboneIdentity
from plora.storage.errors import ConfigError, RegistryError
from plora.storage.models import BackboneVersion
from plora.storage.registry import Registry


def architecture(backbone: loading.Backbone) -> dict:
    """The summary the registry keeps of a backbone's shape."""
    config = backbone.model.config
    return {
        "model_type": config.model_type,
        "num_layers": backbone.num_layers,
        "hidden_size": backbone.hidden_size,
        "vocab_size": config.vocab_size,
        "parameters": sum(p.numel() for p in backbone.model.parameters()),
    }


def ensure_version(
    reg: Registry, identity: BackboneIdentity, source: str, parent: str | None = None, summary: dict | None = None
) -> BackboneVersion:
    """The registry's record of this version, registering it on first sight (idempotent).

    The version's name is derived from everything that fixes its math, so the name alone
    finds it. `source` is how the cloud loads it again: "embedded" or a path."""
    try:
        return reg.get_backbone(identity.version)
    except RegistryError:
        summary = summary or {"num_layers": identity.num_layers, "hidden_size": identity.hidden_size}
        parent_id = reg.get_backbone(parent).id if parent else None
        adapter = identity.adapter.to_dict()
        return reg.register_backbone(
            identity.version, source, summary, identity.content_hash, identity.adapter.seed, adapter, parent_id
        )


def register(reg: Registry, spec: str, config: PrivateLoRAConfig, parent: str | None = None,
             preset: str | None = None) -> BackboneVersion:
    """Load the backbone at `spec` and record it, with `config`, as a version; with `preset` (a
    link's name, adapter_config.LINK_PRESETS), adapting the layers it chooses for this backbone."""
    backbone = loading.load(spec)
    if preset is not None:
        config = for_link(preset, config, backbone.num_layers)
    return ensure_version(reg, backbone.identity(config), backbone.source.spec, parent, architecture(backbone))


def load_version(record: BackboneVersion) -> tuple[loading.Backbone, PrivateLoRAConfig]:
    """A registered version's backbone and adapter config, checked against what was registered."""
    config = PrivateLoRAConfig.from_dict(record.adapter_config)
    backbone = loading.load(record.source)
    if backbone.identity(config).version != record.name:
        raise ConfigError(
            f"the weights at {record.source} are no longer those of version {record.name!r} "
            f"(hash {backbone.source.content_hash[:12]}, registered {record.content_hash[:12]})"
        )
    return backbone, config
