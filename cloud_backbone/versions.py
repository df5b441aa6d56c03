"""Backbone versions in the registry: a version is a backbone's weights plus the adapter math."""

from __future__ import annotations

from plora.cloud_backbone.protocol import BackboneIdentity
from plora.storage.models import BackboneVersion
from plora.storage.registry import Registry


def ensure_version(reg: Registry, identity: BackboneIdentity, source: str) -> BackboneVersion:
    """The registry's record of this version, registering it on first sight (idempotent)."""
    adapter = identity.adapter.to_dict()
    found = reg.find_backbone(identity.content_hash, identity.adapter.seed, adapter)
    if found is not None:
        return found
    architecture = {"num_layers": identity.num_layers, "hidden_size": identity.hidden_size}
    return reg.register_backbone(identity.version, source, architecture, identity.content_hash, identity.adapter.seed, adapter)
