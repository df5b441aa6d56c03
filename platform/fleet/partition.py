"""Splitting a data set across a simulated fleet, one private partition per device.

The partitioners are flwr-datasets': natural (one user per device, e.g. one speaker of a
play) and IID. The product ships no data set; these read the user's files; the benchmarks
take a data folder as an argument, and the tests write their own.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import datasets

from plora.storage.errors import ConfigError, DataError

SCHEMES = ("natural", "iid")
_SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]*[A-Za-z]):$")


def play_blocks(path: Path) -> datasets.Dataset:
    """A play as `SPEAKER:` blocks separated by blank lines -> rows of (speaker, text)."""
    rows = []
    for block in Path(path).read_text(encoding="utf-8").split("\n\n"):
        lines = block.strip().splitlines()
        if len(lines) >= 2 and (match := _SPEAKER.match(lines[0].strip())):
            rows.append({"speaker": match.group(1), "text": "\n".join(lines[1:]).strip()})
    if not rows:
        raise DataError(f"{path} has no 'SPEAKER:' blocks separated by blank lines")
    return datasets.Dataset.from_list(rows)


def partition(
    dataset: datasets.Dataset,
    scheme: str,
    num_partitions: int,
    partition_by: str | None = None,
    seed: int = 0,
) -> list[datasets.Dataset]:
    """`num_partitions` disjoint partitions of `dataset`.

    natural: the `num_partitions` largest groups of `partition_by` (e.g. speakers), one each.
    iid: shuffled equal shares.
    """
    # Imported here: flwr-datasets takes seconds to import (its plotting loads matplotlib), and a
    # device on a host of its own, holding only its own data, never partitions anything.
    from flwr_datasets.partitioner import IidPartitioner, NaturalIdPartitioner

    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition scheme {scheme!r}; choose from {SCHEMES}")
    if num_partitions < 1:
        raise ConfigError(f"need at least one partition, got {num_partitions}")
    if num_partitions > len(dataset):
        raise DataError(f"cannot make {num_partitions} partitions of {len(dataset)} examples; use more data or fewer devices")
    if scheme == "natural":
        if partition_by is None or partition_by not in dataset.column_names:
            raise ConfigError(f"natural partitioning needs a column to partition by; the data has {dataset.column_names}")
        groups = [g for g, _ in Counter(dataset[partition_by]).most_common(num_partitions)]
        if len(groups) < num_partitions:
            raise ConfigError(f"only {len(groups)} distinct {partition_by!r} values for {num_partitions} devices")
        chosen = set(groups)
        dataset = dataset.filter(lambda row: row[partition_by] in chosen)
        partitioner = NaturalIdPartitioner(partition_by=partition_by)
        partitioner.dataset = dataset
        by_group = {p[partition_by][0]: p for p in (partitioner.load_partition(i) for i in range(num_partitions))}
        return [by_group[g] for g in groups]  # largest group first, stable across runs
    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = dataset.shuffle(seed=seed)
    return [partitioner.load_partition(i) for i in range(num_partitions)]


def holdout(dataset: datasets.Dataset, fraction: float, seed: int = 0) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, held-out) of one device's partition."""
    if len(dataset) < 2:
        raise DataError(f"a partition of {len(dataset)} example(s) cannot be split into training and held-out data")
    split = dataset.train_test_split(test_size=holdout_size(len(dataset), fraction), seed=seed)
    return split["train"], split["test"]


def holdout_size(examples: int, fraction: float) -> int:
    """How many of a partition's `examples` `holdout` holds out."""
    return max(1, int(examples * fraction))
