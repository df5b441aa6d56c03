"""Partitioning data across a fleet."""

from __future__ import annotations

import datasets
import pytest

from plora.platform.fleet.partition import holdout, partition, play_blocks
from plora.storage.errors import ConfigError, DataError

ROWS = datasets.Dataset.from_list(
    [{"user": u, "text": f"{u} line {i}"} for i, u in enumerate(["ann"] * 6 + ["bob"] * 4 + ["cy"] * 2)]
)


@pytest.mark.parametrize("scheme, by", [("natural", "user"), ("iid", None)])
def test_partitions_are_disjoint_and_nonempty(scheme, by):
    parts = partition(ROWS, scheme, 3, partition_by=by, seed=1)
    texts = [t for p in parts for t in p["text"]]
    assert len(parts) == 3 and all(len(p) for p in parts)
    assert len(texts) == len(set(texts))


def test_natural_partitions_are_one_user_each_largest_first():
    parts = partition(ROWS, "natural", 2, partition_by="user")
    assert [set(p["user"]) for p in parts] == [{"ann"}, {"bob"}]


@pytest.mark.parametrize(
    "args, message",
    [
        (("spread", 2), "unknown partition scheme"),
        (("natural", 2), "needs a column"),
        (("natural", 4, "user"), "only 3 distinct"),
    ],
)
def test_bad_partition_requests_are_refused(args, message):
    with pytest.raises(ConfigError, match=message):
        partition(ROWS, *args)


def test_too_little_data_for_the_fleet_is_a_data_error():
    with pytest.raises(DataError, match="cannot make 13 partitions"):
        partition(ROWS, "iid", 13)


def test_play_blocks_give_one_speaker_per_block(tmp_path):
    play = tmp_path / "play.txt"
    play.write_text(
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
        "All:\nSpeak, speak.\n\n"
        "ACT I\n\n"  # a line without a speaker is no block
        "GLOUCESTER:\nNow is the winter of our discontent\nMade glorious summer by this sun of York;\n\n"
        "LADY ANNE:\nFoul devil, for God's sake, hence!\n\n\n"
        "First Citizen:\nWe are accounted poor citizens.\n"
    )
    blocks = play_blocks(play)
    assert blocks["speaker"] == ["First Citizen", "All", "GLOUCESTER", "LADY ANNE", "First Citizen"]
    assert blocks["text"][2] == "Now is the winter of our discontent\nMade glorious summer by this sun of York;"
    assert all(text and not text.endswith(":") for text in blocks["text"])


def test_holdout_keeps_at_least_one_example_out(tmp_path):
    train, held = holdout(ROWS.select(range(3)), 0.1)
    assert len(held) == 1 and len(train) == 2
    with pytest.raises(DataError):
        holdout(ROWS.select(range(1)), 0.5)
    (tmp_path / "prose.txt").write_text("no speaker blocks here")
    with pytest.raises(DataError, match="SPEAKER"):
        play_blocks(tmp_path / "prose.txt")
