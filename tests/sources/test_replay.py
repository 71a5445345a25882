"""Tests for ingest.sources.replay: ``--shard K/N`` parsing and the split of files between shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.sources.replay import Shard, ShardError, parse_shard, replay_items


def test_parse_shard_reads_k_of_n() -> None:
    assert parse_shard("2/4") == Shard(2, 4)
    assert parse_shard("1/1") == Shard(1, 1)


@pytest.mark.parametrize("spec", ["0/4", "5/4", "1/0", "4", "x/4", "1/4/2", ""])
def test_parse_shard_refuses_what_is_not_k_of_n(spec: str) -> None:
    with pytest.raises(ShardError, match="--shard"):
        parse_shard(spec)


def test_every_file_is_in_exactly_one_shard(tmp_path: Path) -> None:
    names = [f"s{i}/series{i % 3}/{i:04d}.dcm" for i in range(200)]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    shards = [
        {item.label for item in replay_items([tmp_path], Shard(k, 3))} for k in (1, 2, 3)
    ]
    assert all(len(s) > 30 for s in shards), [len(s) for s in shards]  # 200 files: none nearly empty
    assert sum(len(s) for s in shards) == len(names)
    assert set().union(*shards) == {str(tmp_path / n) for n in names}


def test_the_shard_of_a_file_does_not_depend_on_where_the_folder_is(tmp_path: Path) -> None:
    for root in (tmp_path / "a", tmp_path / "mnt" / "b"):
        for i in range(50):
            (root / "x" / f"{i}.dcm").parent.mkdir(parents=True, exist_ok=True)
            (root / "x" / f"{i}.dcm").write_bytes(b"")
    got = [
        {Path(item.label).relative_to(root).as_posix() for item in replay_items([root], Shard(1, 2))}
        for root in (tmp_path / "a", tmp_path / "mnt" / "b")
    ]
    assert got[0] == got[1] and 0 < len(got[0]) < 50
