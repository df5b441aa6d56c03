"""`plora bench split`: the in-process split against the same model run monolithically.

Both sides compute the same function (same backbone, same A, B and M), so the ratio is the
cost of the split itself: the protocol's messages, the round-trip plumbing, and running the
decoder as two stacks. Measurements alternate between the two sides, and each figure is the
median of its repeats, so drift on a noisy machine hits both alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from plora.clients.generation import stream_tokens
from plora.cloud_backbone import loading
from plora.cloud_backbone.adapter_config import PrivateLoRAConfig
from plora.cloud_backbone.privatelora import AdapterWeights, attach, local_exchange, truncate_cache
from plora.cloud_backbone.protocol.messages import CacheMode
from plora.platform.runtime import split_embedded

TARGET = 0.95


class MonolithicModel(torch.nn.Module):
    """The whole backbone in one stack with PrivateLoRA applied locally: the baseline.

    It answers (ids, CacheMode) -> logits like a DeviceModel, so the same training and
    generation code drives both sides.
    """

    def __init__(self, backbone: loading.Backbone, config: PrivateLoRAConfig):
        super().__init__()
        self.model = backbone.model
        self.weights = AdapterWeights(config, backbone.num_layers)
        self._slot = attach(self.model.get_decoder().layers, 0, config)
        self._cache: DynamicCache | None = None

    def forward(self, input_ids: torch.Tensor, cache: CacheMode = CacheMode.NONE, keep_cached: int | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        if cache is CacheMode.START:
            self._cache = DynamicCache(config=self.model.config)
        if keep_cached is not None and cache is CacheMode.EXTEND:
            truncate_cache(self._cache, keep_cached)
        kv = None if cache is CacheMode.NONE else self._cache
        with self._slot.using(local_exchange(self.weights)):
            return self.model(input_ids=input_ids, cache=kv, use_cache=kv is not None, logits_to_keep=logits_to_keep).logits


@dataclass
class Figure:
    name: str
    unit: str
    monolithic: list[float] = field(default_factory=list)
    split: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return statistics.median(self.split) / statistics.median(self.monolithic)


@dataclass
class SplitBench:
    backbone: str
    config: dict
    figures: list[Figure]

    def rows(self) -> list[dict]:
        """One row per figure: the medians of both sides, their ratio and its target."""
        return [{"figure": f.name, "unit": f.unit, "monolithic": statistics.median(f.monolithic),
                 "split": statistics.median(f.split), "ratio": f.ratio, "target": TARGET} for f in self.figures]

    def to_json(self) -> dict:
        return {
            "backbone": self.backbone,
            "config": self.config,
            "threads": torch.get_num_threads(),
            "figures": {
                f.name: {"unit": f.unit, "monolithic": f.monolithic, "split": f.split, "ratio": f.ratio, "target": TARGET}
                for f in self.figures
            },
        }


def rate(work: Callable[[], int]) -> float:
    """Units per second of one call of `work`, which returns how many units it did."""
    started = time.perf_counter()
    units = work()
    return units / (time.perf_counter() - started)


def _forward(model, ids: torch.Tensor) -> Callable[[], int]:
    def run() -> int:
        with torch.no_grad():
            model(ids)
        return ids.numel()

    return run


def _train_step(model, ids: torch.Tensor) -> Callable[[], int]:
    optimizer = torch.optim.AdamW(model.weights.parameters(), lr=1e-4)

    def run() -> int:
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return ids.numel()

    return run


def _decode(model, prompt: list[int], new_tokens: int) -> Callable[[], int]:
    def run() -> int:
        produced = sum(1 for _ in stream_tokens(model, prompt, new_tokens, stop_ids=set()))
        return produced

    return run


def run_split_bench(spec: str, repeats: int, echo: Callable[[str], None], config: PrivateLoRAConfig | None = None) -> SplitBench:
    config = config or PrivateLoRAConfig()
    echo(f"loading {spec} twice (monolithic and split), {torch.get_num_threads()} threads")
    mono = MonolithicModel(loading.load(spec), config)
    split = split_embedded(loading.load(spec), config)
    torch.manual_seed(0)
    with torch.no_grad():  # the same non-zero M on both sides: the residual path really runs
        for m_mono, m_split in zip(mono.weights.parameters(), split.weights.parameters()):
            m_split.copy_(m_mono.normal_(0, 0.01))
    vocab = mono.model.config.vocab_size
    ids = torch.randint(0, vocab, (4, 128), generator=torch.Generator().manual_seed(0))
    cases = [
        ("forward", "tok/s", _forward, (ids,)),
        ("train step", "tok/s", _train_step, (ids[:, :64],)),
        ("greedy decode", "tok/s", _decode, (ids[0, :16].tolist(), 64)),
    ]
    figures = []
    for name, unit, make, args in cases:
        figure = Figure(name, unit)
        runs = {"monolithic": make(mono, *args), "split": make(split, *args)}
        for run in runs.values():
            run()  # warm-up
        for i in range(repeats):
            for side, run in runs.items():
                getattr(figure, side).append(rate(run))
            echo(f"{name}: repeat {i + 1}/{repeats}")
        figures.append(figure)
    return SplitBench(spec, config.to_dict(), figures)
