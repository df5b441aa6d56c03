"""The settings that fix PrivateLoRA's math, apart from M itself: which projections are adapted,
at which rank, from which seed, and which layers run where (privatelora.py is the math).

A module of its own, free of torch, so that what only reads or checks a configuration (the
CLI's options: `plora --help`, `plora jobs list`) starts without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

from plora.storage.errors import ConfigError

# Short target name -> the module's path inside a Llama-family decoder layer.
TARGET_MODULES: dict[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
# Input groups in the order a decoder layer runs them; members read the same tensor.
INPUT_GROUPS: dict[str, tuple[str, ...]] = {
    "attn_in": ("q", "k", "v"),
    "attn_out": ("o",),
    "mlp_in": ("gate", "up"),
    "mlp_out": ("down",),
}
DEFAULT_TARGETS = ("q", "k", "v")
# How A and B are drawn (privatelora.public_projections): at random from the seed, as the paper
# does, or from each adapted projection's own weight.
PROJECTIONS = ("random", "principal")


@dataclass(frozen=True)
class PrivateLoRAConfig:
    """Everything that fixes the personalized model's math, apart from M itself."""

    rank: int = 64
    """r: the width of u and of M. Traffic per adapted group and token is r numbers each way."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Short names of the adapted projections in every decoder layer (see TARGET_MODULES)."""
    shared_a: bool = False
    """Members of an input group share one A, so the cloud sends one r-vector per group."""
    scale: float = 1.0
    """s in y + s·(x·A·M)·B. The reference code uses 1."""
    seed: int = 0
    """Seed of the public projections A and B; part of the backbone version."""
    projections: str = "random"
    """How A and B are drawn: "random" from the seed; "principal" from each adapted projection's
    weight W, A its top r right and B its top r left singular vectors, so that M moves W within
    the directions W uses most (LoRA-XS, arXiv 2405.17604, trains such an r×r core). Either way
    they are public and the same on every machine for a version. Random stays the default: on
    the two users measured (README), principal drifted less on style and learnt facts far worse."""
    device_layers: int = 0
    """How many of the first decoder layers run on the device. It moves computation, not
    math: the same M gives the same model for every split point."""
    device_last_layers: int = 0
    """How many of the last decoder layers run on the device, after the cloud's. Like
    device_layers it moves computation, not math; with them the cloud never sees the state the
    device's head reads, so the public head no longer reads the device's output off it."""
    adapt_layers: tuple[int, ...] = ()
    """The decoder layers adapted (0-based); empty: every one. Each adapted cloud layer costs
    one round trip per group per pass, so adapting fewer layers buys speed over a slow link."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, str) or not isinstance(self.targets, (tuple, list)):
            raise TypeError(f"targets must be a tuple of names, got {self.targets!r}")
        unknown = [t for t in self.targets if t not in TARGET_MODULES]
        if unknown or not self.targets:
            raise ConfigError(
                f"unknown or empty targets {list(self.targets)!r}; choose from {sorted(TARGET_MODULES)}"
            )
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"targets repeat a name: {list(self.targets)!r}")
        # Canonical order (layer execution order) so that equal configs compare equal.
        order = [t for group in INPUT_GROUPS.values() for t in group]
        object.__setattr__(self, "targets", tuple(sorted(self.targets, key=order.index)))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be a positive integer, got {self.rank!r}")
        for name in ("device_layers", "device_last_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value!r}")
        if not (self.scale > 0 and self.scale == self.scale):
            raise ConfigError(f"scale must be a positive number, got {self.scale!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.projections not in PROJECTIONS:
            raise ConfigError(f"projections must be one of {', '.join(PROJECTIONS)}, got {self.projections!r}")
        if self.projections != "random" and self.shared_a:
            raise ConfigError(f"{self.projections} projections give each projection its own A; they cannot be shared (shared_a)")
        if isinstance(self.adapt_layers, (str, bytes)) or not isinstance(self.adapt_layers, (tuple, list)):
            raise TypeError(f"adapt_layers must be a tuple of layer numbers, got {self.adapt_layers!r}")
        if not all(isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0 for layer in self.adapt_layers):
            raise ConfigError(f"adapt_layers must be layer numbers >= 0, got {list(self.adapt_layers)!r}")
        if len(set(self.adapt_layers)) != len(self.adapt_layers):
            raise ConfigError(f"adapt_layers repeats a layer: {list(self.adapt_layers)!r}")
        object.__setattr__(self, "adapt_layers", tuple(sorted(self.adapt_layers)))

    @property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """The adapted input groups, each with its adapted members, in execution order."""
        out = {}
        for name, members in INPUT_GROUPS.items():
            chosen = tuple(m for m in members if m in self.targets)
            if chosen:
                out[name] = chosen
        return out

    def a_count(self, group: str) -> int:
        """How many r-vectors the cloud sends for one token of this group."""
        return 1 if self.shared_a else len(self.groups[group])

    def width(self, group: str, a_side: bool) -> int:
        """The last dimension of a group's tensors: a_count·r on A's side (u and dL/du),
        members·r on M's output side (u·M and its gradient)."""
        return self.rank * (self.a_count(group) if a_side else len(self.groups[group]))

    def adapts(self, layer: int) -> bool:
        return not self.adapt_layers or layer in self.adapt_layers

    def cloud_layers(self, num_layers: int) -> range:
        """The decoder layers the cloud runs: those between the device's first and last ones."""
        return range(self.device_layers, num_layers - self.device_last_layers)

    def adapted_cloud_layers(self, num_layers: int) -> int:
        return sum(self.adapts(layer) for layer in self.cloud_layers(num_layers))

    def round_trips(self, num_layers: int) -> int:
        """Device round trips per pass through the cloud's layers: one per adapted group of
        each adapted cloud layer."""
        return self.adapted_cloud_layers(num_layers) * len(self.groups)

    def adapted(self, num_layers: int) -> Iterator[tuple[int, str]]:
        """(layer, target) of every M, wherever its layer runs, in the order adapter files store them."""
        for layer in range(num_layers):
            if self.adapts(layer):
                for target in self.targets:
                    yield layer, target

    def trainable_parameters(self, num_layers: int) -> int:
        """The numbers in M: one r×r matrix per target of each adapted layer."""
        return sum(1 for _ in self.adapted(num_layers)) * self.rank ** 2

    def to_dict(self) -> dict:
        # Every layer adapted, no last layer on the device, or random projections, is written as
        # no entry, so the versions made before those fields existed keep their digest.
        data = {**asdict(self), "targets": list(self.targets), "adapt_layers": list(self.adapt_layers)}
        for name in ("adapt_layers", "device_last_layers"):
            if not data[name]:
                del data[name]
        if self.projections == "random":
            del data["projections"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PrivateLoRAConfig:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        for name in ("targets", "adapt_layers"):
            if name in known:
                known[name] = tuple(known[name])
        return cls(**known)

    def check_backbone(self, num_layers: int) -> None:
        if self.device_layers + self.device_last_layers >= num_layers:
            raise ConfigError(
                f"device_layers={self.device_layers} with device_last_layers={self.device_last_layers} leaves no decoder "
                f"layer for the cloud; the backbone has {num_layers} layers, so together use at most {num_layers - 1}"
            )
        if self.adapt_layers and self.adapt_layers[-1] >= num_layers:
            raise ConfigError(
                f"adapt_layers names layer {self.adapt_layers[-1]}, but the backbone has {num_layers} layers (0 to {num_layers - 1})"
            )


# The layers adapted, for a backbone of n decoder layers, by the link a configuration suits: each
# adapted cloud layer costs a device round trip per pass, so a slow link wants fewer of them. The
# README's table of `plora bench adapters` says what each costs in quality.
LINK_PRESETS: dict[str, Callable[[int], tuple[int, ...]]] = {
    "lan": lambda n: (),  # every layer: the default
    # The last half: half the round trips. Of the configurations measured it kept the most per
    # round trip saved (72% of the speakers' gain, 75% persona recall); a third of them kept 54-66%.
    "wan": lambda n: tuple(range(n - n // 2, n)),
}


def for_link(preset: str, config: PrivateLoRAConfig, num_layers: int) -> PrivateLoRAConfig:
    """`config` adapting the layers `preset` (of LINK_PRESETS) chooses for a backbone of `num_layers`."""
    if preset not in LINK_PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(LINK_PRESETS)}")
    return replace(config, adapt_layers=LINK_PRESETS[preset](num_layers))


def m_name(layer: int, target: str) -> str:
    """The tensor name of one M, as written in adapter files: layers.{i}.{module}.M."""
    return f"layers.{layer}.{TARGET_MODULES[target]}.M"
