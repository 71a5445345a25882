"""What only the SQLite state store does: its connection settings and the checkpoints off the commit path
(the shared rules are in test_state.py, run on both stores)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from ingest.adapters.state.sqlite import MIGRATIONS, SQLiteStateStore, check_database, database_file
from ingest.core.records import InstanceRecord
from tests import wait_until

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def test_commits_are_full_sync_wal_and_checkpoints_run_off_the_commit_path(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    store = SQLiteStateStore(path, node="test")
    try:
        assert store._conn is not None
        conn = store._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: a commit is fsync'd
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0  # commits never checkpoint
        before = path.stat().st_size
        data = b"\0" * 100_000
        for k in range(40):  # 4 MB of in-row bytes, about 1,000 pages of WAL
            record = InstanceRecord(study_uid="1.2.3", series_uid="1.2.3.1", sop_uid=f"1.2.3.1.{k}",
                                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
            store.add_instance(record, source="test", spool_name=None, digest=f"c1:{k}", now=T0, due_at=T0,
                               data=data)
        # the checkpointer thread copies the WAL into the database file
        wait_until(lambda: path.stat().st_size >= before + 40 * 100_000, 10, "a checkpoint")
    finally:
        store.close()
    # a second connection reads everything back after the close
    check = sqlite3.connect(path)
    try:
        got = check.execute("SELECT COUNT(*), SUM(LENGTH(data)) FROM instance_bytes").fetchone()
    finally:
        check.close()
    assert got == (40, 4_000_000)


# -- checks without opening the store (ingest serve at start, ingest check-store) ------------------------


def _filled(path: Path, n: int = 200) -> None:
    store = SQLiteStateStore(path, node="test")
    try:
        for k in range(n):
            record = InstanceRecord(study_uid="1.2.3", series_uid="1.2.3.1", sop_uid=f"1.2.3.1.{k}",
                                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
            store.add_instance(record, source="test", spool_name=f"{k:032x}", digest=f"c1:{k}", now=T0,
                               due_at=T0)
    finally:
        store.close()


def test_database_file_tells_missing_empty_and_present(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    assert database_file(path) == "missing"
    path.write_bytes(b"")
    assert database_file(path) == "empty"
    path.unlink()
    _filled(path, 1)
    assert database_file(path) == "present"


def test_a_sound_database_passes_both_checks_and_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    _filled(path)
    before = path.read_bytes()
    assert check_database(path, full=False) == []
    assert check_database(path, full=True) == []
    assert path.read_bytes() == before


def test_garbage_over_index_pages_fails_the_checks(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    _filled(path, 2000)
    with sqlite3.connect(path) as db:  # the pages of the spool-name index, only reached through it
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        root = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'instances_spool'").fetchone()[0]
    with path.open("r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * 8192)
    problems = check_database(path, full=True)
    assert problems, "integrity_check found nothing"
    assert check_database(path, full=False)


def test_a_newer_schema_and_missing_tables_are_problems(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    _filled(path, 1)
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    assert check_database(path, full=True) == [
        f"schema version {len(MIGRATIONS) + 1} is newer than this program's ({len(MIGRATIONS)})"
    ]
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        db.execute("DROP TABLE replay_files")
    assert check_database(path, full=False) == [
        f"schema version {len(MIGRATIONS)} but tables missing: replay_files"
    ]


def test_a_file_that_is_not_a_database_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    path.write_bytes(b"this is not an SQLite database, just text " * 200)
    (problem,) = check_database(path, full=False)
    assert "not a database" in problem
