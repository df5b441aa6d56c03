"""Noise the device adds to the state it sends the cloud at the cut: a defence against input
inversion, whose leakage and cost `plora audit` measures (`--cut-noise`).

With no decoder layer on the device, that state is a row of the public embedding table, so the
nearest row names the token. Noise moves the state off its row:

- `gaussian:σ`: each number gets N(0, (σ·rms)²), rms being the root mean square of that
  position's own state, so σ is a noise-to-signal ratio whatever the layer's scale;
- `dchi:ε`: d_χ-privacy (Feyisetan et al., WSDM 2020): a uniformly random direction of length
  Gamma(d, 1/ε), so that for any two states x, x' the densities of what the cloud sees differ
  by at most exp(ε·‖x − x'‖). Smaller ε is more noise; ε is in the units of the state, so it
  only means something against the distances between the backbone's embedding rows.

Every pass draws fresh noise from a generator seeded from the operating system, except replays
to a new session, which resend the requests as first sent. The cloud computes on the noisy
state, so the noise costs quality as well: the audit's table says how much.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from plora.storage.errors import ConfigError

KINDS = ("gaussian", "dchi")


@dataclass(frozen=True)
class CutNoise:
    kind: str
    level: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown cut noise {self.kind!r}; choose from {', '.join(KINDS)}")
        if not (isinstance(self.level, (int, float)) and math.isfinite(self.level) and self.level > 0):
            raise ConfigError(f"the {self.kind} noise's level must be a positive number, got {self.level!r}")

    @classmethod
    def parse(cls, text: str) -> CutNoise:
        """'gaussian:0.5' or 'dchi:200'."""
        kind, _, level = text.partition(":")
        try:
            number = float(level)
        except ValueError:
            raise ConfigError(f"{text!r} is not KIND:LEVEL, e.g. gaussian:0.5 or dchi:200") from None
        return cls(kind.strip(), number)

    def __str__(self) -> str:
        return f"{self.kind}:{self.level:g}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "level": self.level}

    @classmethod
    def from_dict(cls, data: dict) -> CutNoise:
        return cls(data["kind"], data["level"])

    def generator(self, seed: int | None = None) -> torch.Generator:
        """The draws' source: `seed` for tests, else the operating system's randomness, which the cloud cannot replay."""
        return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") if seed is None else seed)

    def apply(self, hidden: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """`hidden` (…, d) plus fresh noise; the noise is a constant to autograd."""
        with torch.no_grad():
            draw = torch.randn(hidden.shape, generator=generator, dtype=torch.float32)
            if self.kind == "gaussian":
                noise = draw * (self.level * hidden.detach().float().pow(2).mean(-1, keepdim=True).sqrt())
            else:
                # Gamma(d, 1/ε) for a whole d: the sum of d draws of Exp(ε), from the same generator.
                uniform = torch.rand(hidden.shape, generator=generator).clamp_min(torch.finfo(torch.float32).tiny)
                length = -uniform.log().sum(-1) / self.level
                noise = draw / draw.norm(dim=-1, keepdim=True) * length.unsqueeze(-1)
        return hidden + noise.to(hidden.dtype)
