"""``ingest replay`` over files it read before (docs/architecture.md "Replay"): a rerun over unchanged
files decides "nothing to do" from the state store (path, size, mtime, digest) without reading the
files or asking the backend anything; a changed file, a file written just before the run, or a study
the store still has to push are read and pushed as usual.

The real command line runs as a child process against an embedded backend on 127.0.0.1 (its ``/stats``
counters show what reached it). Inputs come from ``samples.generate`` (synthetic).
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.core.records import InstanceRecord
from samples.generate import GeneratedCorpus, generate
from tests.faultproxy import ingest_env, run_ingest, running_backend, stats, studies_with_identifier

GRAPHQL = "/fhir/R4/$graphql"
AN_HOUR_AGO_NS = (time.time_ns() - 3600 * 10**9)


def _corpus(tmp_path: Path, files: int = 6) -> GeneratedCorpus:
    corpus = generate(tmp_path / "corpus", studies=1, files=files, seed=202, tiny=True)
    for path in corpus.paths():  # written well before the run (a file written just now is re-read)
        os.utime(path, ns=(AN_HOUR_AGO_NS, AN_HOUR_AGO_NS))
    return corpus


async def test_unchanged_rerun_reads_nothing_and_asks_the_backend_nothing(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    n = len(corpus.paths())
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        env = ingest_env(base + GRAPHQL)
        args = ("replay", str(corpus.root), "--jobs", "1", "--json")
        first = await run_ingest(tmp_path / "data", *args, env=env, cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        assert first.json()["files_unchanged"] == 0
        assert first.json()["studies"]["created"] == 1
        before = await stats(base)

        again = await run_ingest(tmp_path / "data", *args, env=env, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        summary = again.json()
        assert summary["files"] == n
        assert summary["files_unchanged"] == n
        assert summary["instances"] == {
            "accepted": 0, "duplicate": n, "filtered": 0, "rejected": 0, "rejected_by_reason": {},
        }
        assert summary["studies"]["unchanged"] == 1
        assert summary["studies"]["created"] == summary["studies"]["updated"] == 0
        # not one HTTP request: no introspection, no lookup, no write
        assert (await stats(base))["requests"] == before["requests"]

        table = await run_ingest(tmp_path / "data", "replay", str(corpus.root), env=env, cwd=tmp_path)
        assert table.returncode == 0, table.stderr
        assert "files unchanged (not read again)" in table.stdout


async def test_a_touched_file_is_read_again_the_others_are_not(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    paths = corpus.paths()
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        env = ingest_env(base + GRAPHQL)
        args = ("replay", str(corpus.root), "--jobs", "2", "--json")
        first = await run_ingest(tmp_path / "data", *args, env=env, cwd=tmp_path)
        assert first.returncode == 0, first.stderr

        later = AN_HOUR_AGO_NS + 10**9
        os.utime(paths[0], ns=(later, later))  # same bytes, other mtime: read, found a duplicate
        again = await run_ingest(tmp_path / "data", *args, env=env, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        summary = again.json()
        assert summary["files_unchanged"] == len(paths) - 1
        assert summary["instances"]["duplicate"] == len(paths)
        assert summary["instances"]["accepted"] == 0

        # it was remembered with its new mtime: the next run reads nothing
        third = await run_ingest(tmp_path / "data", *args, env=env, cwd=tmp_path)
        assert third.json()["files_unchanged"] == len(paths)


async def test_a_file_modified_just_before_the_run_is_not_remembered(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    paths = corpus.paths()
    # a modification time not at least 2 s before the run's stat: a write in the same mtime tick could go
    # unseen. Set ahead of now, so that a slow start of the run (a loaded machine) cannot age it past 2 s.
    ahead = time.time() + 30
    os.utime(paths[0], (ahead, ahead))
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        env = ingest_env(base + GRAPHQL)
        args = ("replay", str(corpus.root), "--jobs", "1", "--json")
        assert (await run_ingest(tmp_path / "data", *args, env=env, cwd=tmp_path)).returncode == 0
        again = await run_ingest(tmp_path / "data", *args, env=env, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert again.json()["files_unchanged"] == len(paths) - 1


async def test_unchanged_files_of_a_study_with_news_still_push_it(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    (study,) = corpus.studies
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        env = ingest_env(base + GRAPHQL)
        args = ("replay", str(corpus.root), "--jobs", "1", "--json")
        assert (await run_ingest(tmp_path / "data", *args, env=env, cwd=tmp_path)).returncode == 0

        # an instance of the same study arrives by another way (the listener, say): the study is dirty
        store = SQLiteStateStore(tmp_path / "data" / "state.sqlite3")
        try:
            series = study.series[0].series_uid
            record = InstanceRecord(study_uid=study.study_uid, series_uid=series, sop_uid="2.25.4711",
                                    sop_class_uid="1.2.840.10008.5.1.4.1.1.7")
            now = datetime.now(UTC)
            store.add_instance(record, source="test", spool_name=None, digest="c1:x", now=now,
                               due_at=now + timedelta(seconds=60))
        finally:
            store.close()

        again = await run_ingest(tmp_path / "data", *args, env=env, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        summary = again.json()
        assert summary["files_unchanged"] == len(corpus.paths())
        assert summary["studies"]["updated"] == 1
        [resource] = await studies_with_identifier(base + GRAPHQL, study.study_uid)
        assert resource["numberOfInstances"] == study.instances + 1
