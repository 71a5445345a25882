"""The writer process (ingest.adapters.state.writer): a real child on a real SQLite store.

What the child commits is read back through this process's own connection, and compared with what the
store's own ``add_instances`` answers for the same rows in a second store. The child's life is checked
through ``/proc``: it ends with its socket, with the thread that started it, and a killed child fails
only the batch it held.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.adapters.state.writer import WriterProcess
from ingest.core.records import InstanceRecord, RecordRow
from ingest.errors import StoreError, StoreUnavailableError
from ingest.ports import Added, Verdict
from tests import wait_until

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
STUDY = "1.2.826.0.1.3680043.2.1125.9"


def row(sop: str, study: str = STUDY) -> RecordRow:
    record = InstanceRecord(study_uid=study, series_uid=f"{study}.1", sop_uid=sop, sop_class_uid=CT)
    return RecordRow.of(record)


def commit(
    writer: WriterProcess, rows: list[tuple[RecordRow, str, str | None, str]], *, now: datetime,
    due_at: datetime, inline: list[bytes | None] | None = None,
) -> list[Added]:
    """One batch through the child, as the edge's loop does it: send, then read the outcome."""
    writer.send(rows, now=now, due_at=due_at, inline=inline)
    return writer.receive()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped, counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def store(tmp_path: Path, sqlite_writer: WriterProcess) -> Iterator[SQLiteStateStore]:
    """This process's own connection to the store the writer process (``sqlite_writer``) commits to."""
    st = SQLiteStateStore(tmp_path / "state.sqlite3", node="test")
    yield st
    st.close()


def test_the_child_commits_what_the_store_itself_would(
    store: SQLiteStateStore, sqlite_writer: WriterProcess, tmp_path: Path
) -> None:
    batch = [(row(f"1.2.3.{k}"), "dimse:A", None, f"d{k}") for k in range(3)]
    inline = [b"bytes-0", None, b"bytes-2"]
    got = commit(sqlite_writer, batch, now=T0, due_at=T0 + timedelta(seconds=5), inline=inline)

    other = SQLiteStateStore(tmp_path / "other" / "state.sqlite3", node="test")
    try:
        expected = other.add_instances(batch, now=T0, due_at=T0 + timedelta(seconds=5), inline=inline)
    finally:
        other.close()
    assert got == expected
    assert [a.outcome for a in got] == [Verdict.ADDED] * 3
    # committed: this process's own connection reads the rows and the bytes
    assert [r.sop_uid for r in store.instances(STUDY)] == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
    assert store.instance_bytes("1.2.3.0") == b"bytes-0" and store.instance_bytes("1.2.3.1") is None
    (study,) = store.studies()
    assert study.study_uid == STUDY

    again = commit(
        sqlite_writer, [batch[0], (row("1.2.3.1"), "dimse:A", None, "other digest")], now=T0, due_at=T0
    )
    assert [a.outcome for a in again] == [Verdict.DUPLICATE, Verdict.CONFLICT]


def test_a_failed_transaction_is_the_stores_error_and_the_child_goes_on(
    store: SQLiteStateStore, sqlite_writer: WriterProcess
) -> None:
    with pytest.raises(StoreError, match="inline has 2 entries for 1 items"):
        commit(
            sqlite_writer, [(row("1.2.4.1"), "dimse:A", None, "d")], now=T0, due_at=T0, inline=[b"a", b"b"]
        )
    assert sqlite_writer.running
    assert store.instances(STUDY) == []  # nothing of the failed batch
    (added,) = commit(sqlite_writer, [(row("1.2.4.1"), "dimse:A", None, "d")], now=T0, due_at=T0)
    assert added.outcome is Verdict.ADDED


def test_a_killed_child_fails_the_batch_it_held_and_is_not_used_again(sqlite_writer: WriterProcess) -> None:
    assert sqlite_writer.pid is not None
    os.kill(sqlite_writer.pid, signal.SIGKILL)
    with pytest.raises(StoreUnavailableError, match="writer process"):
        commit(sqlite_writer, [(row("1.2.5.1"), "dimse:A", None, "d")], now=T0, due_at=T0)
    assert not sqlite_writer.running
    with pytest.raises(StoreUnavailableError, match="not running"):
        sqlite_writer.fileno()


def test_the_settings_are_not_on_the_command_line_and_close_ends_the_child(
    sqlite_writer: WriterProcess, tmp_path: Path
) -> None:
    assert sqlite_writer.pid is not None
    cmdline = Path(f"/proc/{sqlite_writer.pid}/cmdline").read_bytes().split(b"\0")
    assert b"ingest.adapters.state.writer" in cmdline
    assert not any(str(tmp_path).encode() in part for part in cmdline)
    pid = sqlite_writer.pid
    sqlite_writer.close()
    assert not alive(pid)
    sqlite_writer.close()  # idempotent


def test_a_store_the_child_cannot_open_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "state.sqlite3").write_bytes(b"not a database" * 100)
    w = WriterProcess(url=None, data_dir=tmp_path, node="test")
    with pytest.raises(StoreError, match="state database"):
        w.start()
    assert not w.running
    assert "writer process did not start" in caplog.text and "commits stay in this process" in caplog.text
    assert w.pid is not None and not alive(w.pid)


def test_a_child_whose_parent_was_killed_ends_at_once_and_commits_nothing(tmp_path: Path) -> None:
    """The parent is killed while its batch waits for the store's lock (another writer holds it). The
    kernel ends the child at once: it neither waits for the lock nor commits after a new ``ingest serve``
    could have started (its start-up sweep would remove a spool file that the late row names)."""
    SQLiteStateStore(tmp_path / "state.sqlite3", node="test").close()
    parent_code = textwrap.dedent(f"""
        import sys, time
        from datetime import UTC, datetime
        from pathlib import Path
        from ingest.adapters.state.writer import WriterProcess
        from ingest.core.records import InstanceRecord, RecordRow
        w = WriterProcess(url=None, data_dir=Path({str(tmp_path)!r}), node="test")
        w.start()
        print(w.pid, flush=True)
        sys.stdin.readline()
        record = InstanceRecord(study_uid="1.2.9", series_uid="1.2.9.1", sop_uid="1.2.9.1.1",
                                sop_class_uid="{CT}")
        now = datetime(2024, 3, 1, tzinfo=UTC)
        w.send([(RecordRow.of(record), "dimse:A", None, "d")], now=now, due_at=now, inline=None)
        print("sent", flush=True)
        time.sleep(120)
    """)
    lock = sqlite3.connect(tmp_path / "state.sqlite3", isolation_level=None)
    try:
        with subprocess.Popen([sys.executable, "-c", parent_code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) as parent:
            try:
                assert parent.stdin is not None and parent.stdout is not None
                child = int(parent.stdout.readline())
                lock.execute("BEGIN IMMEDIATE")  # the child's transaction waits (busy timeout: 10 s)
                parent.stdin.write("go\n")
                parent.stdin.flush()
                assert parent.stdout.readline().strip() == "sent"
                assert alive(child)
            finally:
                parent.kill()
                parent.wait(10)
        wait_until(lambda: not alive(child), 5, "the writer process ended with its parent")
    finally:
        lock.execute("ROLLBACK") if lock.in_transaction else None
        lock.close()
    st = SQLiteStateStore(tmp_path / "state.sqlite3", node="test")
    try:
        assert st.instances("1.2.9") == []
    finally:
        st.close()
