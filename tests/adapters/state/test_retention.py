"""The retention part of the state store (ingest.ports.RetentionState), on SQLite and PostgreSQL.

Rules from docs/architecture.md "Retention and the disk budget": an instance's bytes may go once its
study is pushed with nothing newer, and not while a commitment hold (``hold_until``) runs; releasing
keeps the row (and so the duplicate check) and records when and why.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.core.records import InstanceRecord
from ingest.ports import ReleasedBytes, StateStore, StudyState, Verdict

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
STUDY, SERIES = "1.2.826.0.1.3680043.10.1", "1.2.826.0.1.3680043.10.1.1"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def rec(sop: str, study: str = STUDY) -> InstanceRecord:
    return InstanceRecord(study_uid=study, series_uid=study + ".1", sop_uid=sop, sop_class_uid=CT)


def add(
    store: StateStore, sop: str, *, spool: str | None = None, data: bytes | None = None, now: datetime = T0,
    study: str = STUDY,
) -> None:
    added = store.add_instance(
        rec(sop, study), source="test", spool_name=spool, digest="d-" + sop, now=now, due_at=now, data=data
    )
    assert added.outcome is Verdict.ADDED


def push(store: StateStore, now: datetime) -> None:
    """Claim every due study and record it pushed at ``now`` (what the relay does after a write)."""
    for claim in store.claim_due(now, 100, "test-node", 60):
        store.mark_pushed(claim, backend_id="b-" + claim.study_uid, version_id="1", digest="x", now=now)


def test_release_marks_rows_clears_names_and_deletes_in_row_bytes(store: StateStore) -> None:
    add(store, "1.2.3.1", spool="a" * 32)
    add(store, "1.2.3.2", data=b"DICM-bytes-1234")
    released = store.release_instance_bytes(["1.2.3.1", "1.2.3.2", "9.9.9"], reason="retention", now=at(5))
    assert sorted(released, key=lambda r: r.sop_uid) == [
        ReleasedBytes("1.2.3.1", "a" * 32, 0),
        ReleasedBytes("1.2.3.2", None, len(b"DICM-bytes-1234")),
    ]
    assert store.instance_bytes("1.2.3.2") is None
    assert store.instance_spool_name("1.2.3.1") is None
    assert store.inline_bytes_total() == 0
    # the rows stay: the study still has its two instances, a re-send is still a duplicate
    assert [r.sop_uid for r in store.instances(STUDY)] == ["1.2.3.1", "1.2.3.2"]
    again = store.add_instance(rec("1.2.3.1"), source="t", spool_name=None, digest="d-1.2.3.1", now=at(6),
                               due_at=at(6))
    assert again.outcome is Verdict.DUPLICATE
    # releasing again does nothing
    assert store.release_instance_bytes(["1.2.3.1", "1.2.3.2"], reason="retention", now=at(7)) == []


def test_release_records_when_and_why(tmp_path: Path) -> None:
    store = SQLiteStateStore(tmp_path / "state.sqlite3")
    add(store, "1.2.3.1", spool="b" * 32)
    store.release_instance_bytes(["1.2.3.1"], reason="iocm:113039", now=at(9))
    store.close()
    with sqlite3.connect(tmp_path / "state.sqlite3") as conn:
        row = conn.execute(
            "SELECT bytes_removed_at, bytes_removed_reason, spool_name FROM instances "
            "WHERE sop_uid = '1.2.3.1'"
        ).fetchone()
    assert row == ("2024-03-01T12:00:09.000000+00:00", "iocm:113039", None)


def test_releasable_only_after_the_study_is_pushed(store: StateStore) -> None:
    add(store, "1.2.3.1", spool="c" * 32)
    add(store, "1.2.3.2", data=b"x" * 10)
    add(store, "1.2.3.3")  # a row without bytes (replay): nothing to release
    assert store.releasable(pushed_before=at(100), now=at(100), limit=10) == []  # pending
    push(store, at(20))
    row = store.study(STUDY)
    assert row is not None and row.state is StudyState.PUSHED
    assert store.releasable(pushed_before=at(19), now=at(100), limit=10) == []  # pushed too recently
    assert store.releasable(pushed_before=at(20), now=at(100), limit=10) == ["1.2.3.1", "1.2.3.2"]
    assert store.releasable(pushed_before=at(20), now=at(100), limit=1) == ["1.2.3.1"]


def test_a_new_instance_keeps_the_whole_study_until_the_next_push(store: StateStore) -> None:
    add(store, "1.2.3.1", spool="d" * 32)
    push(store, at(20))
    add(store, "1.2.3.2", spool="e" * 32, now=at(30))  # the study is dirty again
    assert store.releasable(pushed_before=at(100), now=at(100), limit=10) == []
    push(store, at(40))
    assert store.releasable(pushed_before=at(100), now=at(100), limit=10) == ["1.2.3.1", "1.2.3.2"]


def test_a_commitment_hold_wins(store: StateStore) -> None:
    add(store, "1.2.3.1", spool="f" * 32)
    add(store, "1.2.3.2", spool="0" * 32)
    push(store, at(20))
    assert store.hold_bytes(["1.2.3.1", "7.7.7"], until=at(3600)) == 1
    assert store.hold_bytes(["1.2.3.1"], until=at(60)) == 1  # an earlier end does not shorten the hold
    assert store.releasable(pushed_before=at(100), now=at(100), limit=10) == ["1.2.3.2"]
    assert store.releasable(pushed_before=at(100), now=at(3599), limit=10) == ["1.2.3.2"]
    assert store.releasable(pushed_before=at(100), now=at(3600), limit=10) == ["1.2.3.1", "1.2.3.2"]


def test_released_instances_are_not_releasable_again(store: StateStore) -> None:
    add(store, "1.2.3.1", spool="1" * 32)
    push(store, at(20))
    store.release_instance_bytes(["1.2.3.1"], reason="retention", now=at(30))
    assert store.releasable(pushed_before=at(100), now=at(100), limit=10) == []


def test_node_filter_keeps_other_nodes_spool_files(tmp_path: Path) -> None:
    here = SQLiteStateStore(tmp_path / "s.sqlite3", node="node-a")
    add(here, "1.2.3.1", spool="2" * 32)
    there = SQLiteStateStore(tmp_path / "s.sqlite3", node="node-b")
    add(there, "1.2.3.2", spool="3" * 32)
    add(there, "1.2.3.3", data=b"in-row")  # in the shared store: any node may release it
    push(here, at(20))
    assert here.releasable(pushed_before=at(100), now=at(100), limit=10, node="node-a") == [
        "1.2.3.1", "1.2.3.3",
    ]
    assert here.releasable(pushed_before=at(100), now=at(100), limit=10) == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    here.close()
    there.close()


def test_migration_six_indexes_held_instances(tmp_path: Path) -> None:
    SQLiteStateStore(tmp_path / "state.sqlite3").close()
    with sqlite3.connect(tmp_path / "state.sqlite3") as conn:
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'instances_held'").fetchone()
    assert sql is not None and "bytes_removed_at IS NULL" in sql[0]


def test_a_hold_decided_after_the_listing_still_wins(store: StateStore) -> None:
    # retention listed the instance, then a commitment held it before the release committed
    add(store, "1.2.3.1", spool="4" * 32)
    push(store, at(20))
    assert store.releasable(pushed_before=at(100), now=at(100), limit=10) == ["1.2.3.1"]
    store.hold_bytes(["1.2.3.1"], until=at(500))
    kept = store.release_instance_bytes(["1.2.3.1"], reason="retention", now=at(100), unless_held_at=at(100))
    assert kept == []
    assert store.instance_spool_name("1.2.3.1") == "4" * 32
    # an explicit removal (IOCM rejection) does not ask about holds
    released = store.release_instance_bytes(["1.2.3.1"], reason="iocm:113037", now=at(101))
    assert [r.sop_uid for r in released] == ["1.2.3.1"]
