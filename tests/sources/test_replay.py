"""Tests for ingest.sources.replay: ``--shard K/N`` parsing and the split of files between shards."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.intake import admit as admit_module
from ingest.sources import replay as replay_module
from ingest.sources.replay import (
    ReplayCaps,
    ReplaySource,
    ReplayTotals,
    Shard,
    ShardError,
    parse_shard,
    replay_items,
)
from samples.generate import generate


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


def _source(store: SQLiteStateStore, root: Path, totals: ReplayTotals) -> ReplaySource:
    return ReplaySource(
        store, paths=[root], shard=None, jobs=1, caps=ReplayCaps(1 << 26, 100_000),
        wanted=lambda _record: True, studies=frozenset(), skip_unchanged=True, stable_age_s=0.0,
        on_conflict="quarantine", totals=totals,
    )


def test_the_source_admits_through_one_admission_and_a_rerun_reads_nothing(tmp_path: Path) -> None:
    corpus = generate(tmp_path / "corpus", studies=2, files=300, seed=5, tiny=True)  # > one batch (256)
    an_hour_ago = time.time_ns() - 3600 * 10**9
    for path in corpus.paths():
        os.utime(path, ns=(an_hour_ago, an_hour_ago))
    store = SQLiteStateStore(tmp_path / "state.sqlite3")
    try:
        admissions: list[object] = []
        real = admit_module.Admission

        class Counting(real):  # type: ignore[misc,valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                admissions.append(self)
                super().__init__(*args, **kwargs)

        first, rejected = ReplayTotals(), []
        source = _source(store, corpus.root, first)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(admit_module, "Admission", Counting)
            source.read(on_rejected=rejected.append, on_file=lambda: None)
        assert rejected == []
        assert len(admissions) == 1
        assert first.accepted == first.files == corpus.files
        assert source.touched == set(corpus.study_uids)

        again = ReplayTotals()
        rerun = _source(store, corpus.root, again)
        rerun.read(on_rejected=rejected.append, on_file=lambda: None)
        assert (again.files, again.unchanged_files, again.duplicate, again.accepted) == (
            corpus.files, corpus.files, corpus.files, 0
        )
        assert rerun.touched == set() and rerun.known == set(corpus.study_uids)
        assert rerun.studies_to_push() == set(corpus.study_uids)  # none pushed yet
    finally:
        store.close()


@pytest.fixture
def quiet_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SQLiteStateStore]:
    """A state store for a source whose studies count as quiet after 300 files without growing."""
    monkeypatch.setattr(replay_module, "QUIET_FILES", 300)
    store = SQLiteStateStore(tmp_path / "state.sqlite3")
    yield store
    store.close()


def test_studies_that_stop_growing_are_reported_quiet_once_while_reading(
    tmp_path: Path, quiet_store: SQLiteStateStore
) -> None:
    corpus = generate(tmp_path / "corpus", studies=4, files=1200, seed=6, tiny=True)
    per_study = {s.study_uid: sum(x.instances for x in s.series) for s in corpus.studies}
    reports: list[set[str]] = []
    held_when_reported: dict[str, int] = {}

    def on_quiet(uids: set[str]) -> None:
        reports.append(uids)
        for uid in uids:  # what the store holds of it when the caller would push it
            held_when_reported[uid] = len(quiet_store.instances(uid))

    totals = ReplayTotals()
    _source(quiet_store, corpus.root, totals).read(on_rejected=lambda r: None, on_file=lambda: None,
                                                   on_quiet=on_quiet)
    assert totals.accepted == corpus.files
    reported = [uid for batch in reports for uid in batch]
    assert len(reported) == len(set(reported))  # each once
    # every study but the one still growing at the end is reported, and only once it is complete
    assert set(reported) == set(corpus.study_uids) - {corpus.study_uids[-1]}
    assert held_when_reported == {uid: per_study[uid] for uid in reported}


def test_a_study_that_grows_again_is_reported_quiet_again(
    tmp_path: Path, quiet_store: SQLiteStateStore
) -> None:
    first = generate(tmp_path / "one", studies=1, files=200, seed=7, tiny=True)
    middle = generate(tmp_path / "two", studies=2, files=800, seed=8, tiny=True)
    (study,) = first.studies
    root = tmp_path / "input"
    # the study's first series, then two other studies (800 files), then its other series, then 800 again
    shutil.copytree(first.root / study.series[0].directory, root / "a" / "s1")
    shutil.copytree(middle.root, root / "m")
    for series in study.series[1:]:
        shutil.copytree(first.root / series.directory, root / "p" / series.directory)
    shutil.copytree(middle.root, root / "z")  # (duplicates: admitted, they do not make a study grow)
    reports: list[set[str]] = []
    _source(quiet_store, root, ReplayTotals()).read(on_rejected=lambda r: None, on_file=lambda: None,
                                                    on_quiet=reports.append)
    times = [i for i, batch in enumerate(reports) if study.study_uid in batch]
    assert len(times) == 2, reports  # quiet after its first series, and again after the rest
