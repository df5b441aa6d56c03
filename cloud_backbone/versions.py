"""Backbone versions in the registry: a version is a backbone's weights plus the adapter math."""

from __future__ import annotations

from plora.cloud_backbone.protocol import BackboneIdentity
from plora.storage.errors import RegistryError
from plora.storage.models import BackboneVersion
from plora.storage.registry import Registry


def ensure_version(reg: Registry, identity: BackboneIdentity, source: str) -> BackboneVersion:
    """The registry's record of this version, registering it on first sight (idempotent).

    The version's name is derived from everything that fixes its math, so the name alone
    finds it."""
    try:
        return reg.get_backbone(identity.version)
    except RegistryError:
        architecture = {"num_layers": identity.num_layers, "hidden_size": identity.hidden_size}
        adapter = identity.adapter.to_dict()
        return reg.register_backbone(identity.version, source, architecture, identity.content_hash, identity.adapter.seed, adapter)
