"""What only the SQLite state store does: its connection settings and the checkpoints off the commit path
(the shared rules are in test_state.py, run on both stores)."""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.core.records import InstanceRecord

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
        deadline = time.monotonic() + 10
        while path.stat().st_size < before + 40 * 100_000 and time.monotonic() < deadline:
            time.sleep(0.05)
        # the checkpointer thread copied the WAL into the database file
        assert path.stat().st_size >= before + 40 * 100_000
    finally:
        store.close()
    # a second connection reads everything back after the close
    check = sqlite3.connect(path)
    try:
        got = check.execute("SELECT COUNT(*), SUM(LENGTH(data)) FROM instance_bytes").fetchone()
    finally:
        check.close()
    assert got == (40, 4_000_000)
