"""`plora bench adapters`: what each adapter configuration buys, per round trip and per parameter.

Each adapted cloud layer costs a device round trip per group per pass, so over a slow link the
layers adapted set the decode speed; this bench measures what adapting fewer of them costs in
personalization, with the measurements of `plora bench quality` on devices bound to each
configuration. Free of torch at import, so that the CLI lists the configurations cheaply.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from plora.cloud_backbone.adapter_config import PrivateLoRAConfig


def _adapt(layers: range) -> PrivateLoRAConfig:
    return PrivateLoRAConfig(adapt_layers=tuple(layers))


# Name -> the configuration for a backbone of n decoder layers: the default; its adapted layers
# thinned to a half or a third of the round trips, spread over the stack or contiguous at its
# top; a lower rank, which saves parameters but no round trip; and A and B drawn from the
# weights' principal singular vectors instead of at random, which costs neither.
CANDIDATES: dict[str, Callable[[int], PrivateLoRAConfig]] = {
    "all": lambda n: PrivateLoRAConfig(),
    "alternate": lambda n: _adapt(range(0, n, 2)),
    "last-half": lambda n: _adapt(range(n - n // 2, n)),
    "every-third": lambda n: _adapt(range(0, n, 3)),
    "last-third": lambda n: _adapt(range(n - n // 3, n)),
    "rank-16": lambda n: PrivateLoRAConfig(rank=16),
    "principal": lambda n: PrivateLoRAConfig(projections="principal"),
}


def adapters(data: Path, names: list[str], persona_count: int, speaker_count: int, echo: Callable[[str], None],
             backbone: str = "embedded", max_blocks: int | None = 60) -> list[dict]:
    """For each named configuration, the same measurements on fresh devices bound to it:
    persona recall and generic-text loss, and the held-out gain for `speaker_count` speakers of
    at most `max_blocks` blocks, after `plora personalize`'s default job; with its round trips
    per pass and its parameters. Gains are also given as a share of
    the first configuration's."""
    from plora.cloud_backbone import loading
    from plora.platform.bench.quality import personas, speakers

    num_layers = loading.load(backbone).num_layers
    rows = []
    for name in names:
        config, started = CANDIDATES[name](num_layers), time.monotonic()
        echo(f"{name}: {config.round_trips(num_layers)} round trips per pass, {config.trainable_parameters(num_layers):,} parameters")
        persona_rows = personas(data, persona_count, echo, compare=False, config=config, backbone=backbone)
        speaker_rows = speakers(data, speaker_count, echo, backbone, config=config, compare=False, max_blocks=max_blocks)
        rows.append({
            "config": name, "adapter_config": config.to_dict(), "round_trips": config.round_trips(num_layers),
            "params": config.trainable_parameters(num_layers),
            "recall": _mean([row["after"]["recall"] for row in persona_rows]),
            "persona_generic_change": _mean([row["generic_nll_change"] for row in persona_rows]),
            "speaker_gain": _mean([row["privatelora"]["gain"] for row in speaker_rows]),
            "speaker_generic_change": _mean([row["privatelora"]["generic_change"] for row in speaker_rows]),
            "seconds": time.monotonic() - started, "personas": persona_rows, "speakers": speaker_rows,
        })
    first = rows[0]["speaker_gain"] if rows else None
    for row in rows:
        row["gain_vs_first"] = row["speaker_gain"] / first if first and first > 0 and row["speaker_gain"] is not None else None
    return rows


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None
