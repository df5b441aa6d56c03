"""`plora backbone derive`: how a provider ships an improved backbone.

The operator fine-tunes the decoder of a registered version on public data, saves the result
as a checkpoint folder under $PLORA_HOME/backbones, and registers it as a new version whose
parent is the old one. Embeddings and LM head stay frozen, so the device's half of a derived
version changes only where device-side layers do.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from plora.clients.data import load_examples, tokenize
from plora.clients.training import CONSTANT, OnStep, TrainSettings, causal_lm_batch_loss, train
from plora.cloud_backbone.loading import save_checkpoint
from plora.cloud_backbone.versions import load_version, register
from plora.storage.errors import ConfigError
from plora.storage.models import BackboneVersion
from plora.storage.paths import plora_home
from plora.storage.registry import Registry

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def derive(
    reg: Registry,
    parent: str,
    data: Path,
    name: str,
    steps: int = 30,
    lr: float = 2e-5,
    batch_size: int = 4,
    max_length: int = 256,
    seed: int | None = None,
    on_step: OnStep | None = None,
    folder: Path | None = None,
) -> BackboneVersion:
    """Fine-tune `parent`'s decoder layers on `data` and register the result as version `name`.

    `seed` gives the new version fresh public projections; by default it keeps the parent's.
    The checkpoint goes to `folder` (default $PLORA_HOME/backbones/NAME), named NAME."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"--out must be a lower-case name of letters, digits, '.', '_' or '-', got {name!r}")
    folder = (folder or plora_home() / "backbones") / name
    if folder.exists():
        raise ConfigError(f"{folder} already exists; choose another name")
    record = reg.get_backbone(parent)
    backbone, config = load_version(record)
    examples = tokenize(load_examples(data), backbone.tokenizer, max_length)
    model, pad = backbone.model, backbone.tokenizer.pad_token_id
    trained = list(model.get_decoder().layers.parameters())
    for p in trained:
        p.requires_grad_(True)
    loss = causal_lm_batch_loss(lambda ids: model(input_ids=ids).logits, pad)
    # A constant rate, as derived versions have always been made (bench migrate measured those).
    settings = TrainSettings(lr=lr, batch_size=batch_size, steps=steps, anchor=None)
    train(model, trained, loss, examples, settings, schedule=CONSTANT, on_step=on_step)
    model.requires_grad_(False)
    save_checkpoint(model, backbone.tokenizer, folder)
    new_config = config if seed is None else replace(config, seed=seed)
    return register(reg, str(folder), new_config, parent=record.name)
