"""The state store contract (ingest.ports.StateStore), run on every implementation via ``store_factory``."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from ingest.adapters.state import open_state_store
from ingest.adapters.state.sqlite import MIGRATIONS, SQLiteStateStore
from ingest.core.records import InstanceRecord
from ingest.errors import ConfigError, StoreError, StoreUnavailableError
from ingest.ports import StateStore, StudyState, Verdict
from tests.conftest import StoreFactory

T0 = datetime(2024, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage


def rec(study: str, series: str, sop: str, **extra: object) -> InstanceRecord:
    return InstanceRecord(study_uid=study, series_uid=series, sop_uid=sop, sop_class_uid=CT, **extra)  # type: ignore[arg-type]


def add(
    store: StateStore, record: InstanceRecord, digest: str = "d1", now: datetime = T0, stable_s: float = 10
) -> Verdict:
    return store.add_instance(
        record,
        source="test",
        spool_name=None,
        digest=digest,
        now=now,
        due_at=now + timedelta(seconds=stable_s),
    ).outcome


def s(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# -- durability and identity ---------------------------------------------------------------------------


def test_instances_survive_reopen(store_factory: StoreFactory) -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)  # type: ignore[arg-type]
    first = rec(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, modality="CT", series_number=1)
    store = store_factory()
    added = store.add_instance(first, source="replay", spool_name="ab" * 16, digest="x", now=T0, due_at=s(10))
    assert (added.outcome, added.study_uid) == (Verdict.ADDED, ds.StudyInstanceUID)
    store.close()

    again = store_factory()
    assert again.instances(ds.StudyInstanceUID) == [first]
    row = again.study(ds.StudyInstanceUID)
    assert row is not None
    assert (row.state, row.dirty, row.instances) == (StudyState.PENDING, True, 1)
    assert row.last_seen == T0 and row.due_at == s(10)
    assert row.last_seen is not None and row.last_seen.utcoffset() == timedelta(0)


def test_times_are_converted_to_utc(store: StateStore) -> None:
    plus2 = timezone(timedelta(hours=2))
    local = datetime(2024, 3, 1, 14, 0, 0, 123456, tzinfo=plus2)  # == T0
    add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1"), now=local)
    row = store.study("1.2.3")
    assert row is not None and row.last_seen == T0 and row.last_seen.tzinfo is not None
    assert row.last_seen.utcoffset() == timedelta(0)


def test_naive_datetimes_are_refused(store: StateStore) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1"), now=datetime(2024, 1, 1))


def test_identical_duplicate_is_a_no_op(store: StateStore) -> None:
    assert add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1")) is Verdict.ADDED
    (claim,) = store.claim_due(s(10), 5, "n1", 60)
    store.mark_pushed(claim, backend_id="b1", version_id="1", digest="dg", now=s(11))

    assert add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1"), now=s(20)) is Verdict.DUPLICATE
    row = store.study("1.2.3")
    assert row is not None
    assert (row.state, row.dirty, row.instances, row.last_seen) == (StudyState.PUSHED, False, 1, T0)
    assert store.claim_due(s(100), 5, "n1", 60) == []


def test_same_sop_other_content_is_a_conflict_and_keeps_the_first(store: StateStore) -> None:
    first = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", series_description="first")
    assert add(store, first, digest="d1") is Verdict.ADDED
    second = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", series_description="second")
    added = store.add_instance(second, source="t", spool_name=None, digest="d2", now=s(1), due_at=s(11))
    assert (added.outcome, added.detail) == (Verdict.CONFLICT, "other_content")
    assert store.instances("1.2.3") == [first]
    row = store.study("1.2.3")
    assert row is not None and row.due_at == s(10)  # not touched


def test_same_sop_in_another_study_is_a_conflict(store: StateStore) -> None:
    assert add(store, rec("1.2.3", "1.2.3.1", "9.9.9")) is Verdict.ADDED
    added = store.add_instance(
        rec("1.2.4", "1.2.4.1", "9.9.9"), source="t", spool_name=None, digest="d1", now=s(1), due_at=s(11)
    )
    assert (added.outcome, added.detail) == (Verdict.CONFLICT, "other_study")
    assert store.study("1.2.4") is None
    assert store.instances("1.2.4") == []


LEGACY = "ab" * 32  # a byte digest as stores before the content digest hold it (64 hex digits, no prefix)


def test_legacy_digest_and_equal_record_is_a_duplicate(store: StateStore) -> None:
    first = rec(
        "1.2.3", "1.2.3.1", "1.2.3.1.1", series_description="s", transfer_syntax_uid="1.2.840.10008.1.2"
    )
    assert add(store, first, digest=LEGACY) is Verdict.ADDED
    # the same instance re-sent in another transfer syntax, now with a content digest
    again = first.model_copy(update={"transfer_syntax_uid": "1.2.840.10008.1.2.1"})
    assert add(store, again, digest="c1:" + "cd" * 32, now=s(1)) is Verdict.DUPLICATE
    assert store.instances("1.2.3") == [first]


def test_legacy_digest_and_other_record_is_a_conflict(store: StateStore) -> None:
    first = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", series_description="first")
    assert add(store, first, digest=LEGACY) is Verdict.ADDED
    second = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", series_description="second")
    added = store.add_instance(
        second, source="t", spool_name=None, digest="c1:" + "cd" * 32, now=s(1), due_at=s(11)
    )
    assert (added.outcome, added.detail) == (Verdict.CONFLICT, "other_content")
    assert store.instances("1.2.3") == [first]


def test_same_scheme_other_digest_stays_a_conflict_with_an_equal_record(store: StateStore) -> None:
    first = rec("1.2.3", "1.2.3.1", "1.2.3.1.1")
    assert add(store, first, digest="c1:" + "ab" * 32) is Verdict.ADDED
    # equal header record, other content (pixel data): only another scheme makes the record decide
    assert add(store, first, digest="c1:" + "cd" * 32, now=s(1)) is Verdict.CONFLICT
    assert add(store, first, digest=LEGACY, now=s(2)) is Verdict.DUPLICATE


def test_batch_is_one_transaction_and_sees_its_own_rows(store: StateStore) -> None:
    a, b = rec("1.2.3", "1.2.3.1", "1.2.3.1.1"), rec("1.2.3", "1.2.3.1", "1.2.3.1.2")
    results = store.add_instances(
        [(a, "t", None, "da"), (a, "t", None, "da"), (b, "t", None, "db"), (a, "t", None, "dX")],
        now=T0,
        due_at=s(10),
    )
    assert [r.outcome for r in results] == [
        Verdict.ADDED,
        Verdict.DUPLICATE,
        Verdict.ADDED,
        Verdict.CONFLICT,
    ]
    row = store.study("1.2.3")
    assert row is not None and row.instances == 2
    (claim,) = store.claim_due(s(10), 5, "n1", 60)
    assert claim.generation == 2


def test_large_batch_counts_every_instance_once(store: StateStore) -> None:
    items = [
        (rec(f"1.2.{k}", f"1.2.{k}.1", f"1.2.{k}.1.{i}"), "t", None, f"d{k}.{i}")
        for k in (3, 4, 5)
        for i in range(1, 201)
    ]
    results = store.add_instances(items, now=T0, due_at=s(10))
    assert [r.outcome for r in results] == [Verdict.ADDED] * 600
    again = store.add_instances(items[::-1], now=s(1), due_at=s(11))
    assert {r.outcome for r in again} == {Verdict.DUPLICATE}
    for k in (3, 4, 5):
        row = store.study(f"1.2.{k}")
        assert row is not None and row.instances == 200
    claims = {c.study_uid: c.generation for c in store.claim_due(s(10), 5, "n1", 60)}
    assert claims == {"1.2.3": 200, "1.2.4": 200, "1.2.5": 200}


# -- due logic -------------------------------------------------------------------------------------------


def test_study_is_due_only_after_its_due_time(store: StateStore) -> None:
    add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1"), now=T0, stable_s=10)
    assert store.claim_due(s(9.999), 5, "n1", 60) == []
    add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.2"), now=s(8), stable_s=10)  # new instance: due again later
    assert store.claim_due(s(12), 5, "n1", 60) == []
    (claim,) = store.claim_due(s(18), 5, "n1", 60)
    assert (claim.study_uid, claim.generation, claim.attempts, claim.owner) == ("1.2.3", 2, 0, "n1")


def test_mark_due_only_brings_forward_and_only_dirty(store: StateStore) -> None:
    add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1"), stable_s=10)
    add(store, rec("1.2.4", "1.2.4.1", "1.2.4.1.1"), stable_s=10)
    store.mark_due(["1.2.3"], s(1))
    store.mark_due(["1.2.4"], s(50))  # later: ignored
    store.mark_due(["7.7.7"], s(1))  # unknown: ignored
    assert [c.study_uid for c in store.claim_due(s(1), 5, "n1", 60)] == ["1.2.3"]
    row = store.study("1.2.4")
    assert row is not None and row.due_at == s(10)


def test_claims_come_in_due_order_and_respect_limit(store: StateStore) -> None:
    for i, due in enumerate([30, 10, 20]):
        add(store, rec(f"1.2.{i}", f"1.2.{i}.1", f"1.2.{i}.1.1"), stable_s=due)
    assert [c.study_uid for c in store.claim_due(s(100), 2, "n1", 60)] == ["1.2.1", "1.2.2"]
    assert [c.study_uid for c in store.claim_due(s(100), 2, "n1", 60)] == ["1.2.0"]
    assert store.claim_due(s(100), 0, "n1", 60) == []


def test_a_due_time_beyond_the_stale_bound_counts_as_due(store: StateStore) -> None:
    add(store, rec("1.2.8", "1.2.8.1", "1.2.8.1.1"), stable_s=10)  # due at s(10)
    # the clock is set back an hour: due in an hour and 10 s, further than the bound allows
    back = s(0) - timedelta(hours=1)
    assert store.claim_due(back, 5, "n1", 60) == []
    assert store.claim_due(back, 5, "n1", 60, stale_after=back + timedelta(hours=2)) == []  # within
    (claim,) = store.claim_due(back, 5, "n1", 60, stale_after=back + timedelta(seconds=60))
    assert claim.study_uid == "1.2.8"
    # and the lease it took (until s(10) - 1 h + 60 s) is not stale for the owner's clock
    assert store.claim_due(back, 5, "n2", 60, stale_after=back + timedelta(seconds=60)) == []


# -- claims and leases -----------------------------------------------------------------------------------


def test_lease_excludes_others_until_it_expires(store: StateStore) -> None:
    add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    (mine,) = store.claim_due(s(10), 5, "n1", 30)
    assert store.claim_due(s(20), 5, "n2", 30) == []
    assert store.claim_due(s(20), 5, "n1", 30) == []  # not twice to the same owner either
    row = store.study("1.2.3")
    assert row is not None and (row.lease_owner, row.lease_expires) == ("n1", s(40))

    assert store.renew(mine, s(35), 30)  # now until s(65)
    assert store.claim_due(s(60), 5, "n2", 30) == []
    (theirs,) = store.claim_due(s(65), 5, "n2", 30)
    assert theirs.owner == "n2"
    assert not store.renew(mine, s(66), 30)

    # the stale owner's failure is ignored; the new owner's result counts
    store.schedule_retry(mine, error="late", next_attempt_at=s(1000))
    store.dead_letter(mine, reason="rejected", error="late", now=s(66))
    row = store.study("1.2.3")
    assert row is not None and (row.state, row.attempts, row.lease_owner) == (StudyState.PENDING, 0, "n2")


def test_release_gives_the_claim_back(store: StateStore) -> None:
    add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    (claim,) = store.claim_due(s(10), 5, "n1", 600)
    store.release(claim)
    (again,) = store.claim_due(s(11), 5, "n2", 600)
    assert again.owner == "n2"
    row = store.study("1.2.3")
    assert row is not None and row.dirty and row.attempts == 0


def test_concurrent_claimers_never_share_a_study(store_factory: StoreFactory) -> None:
    first = store_factory()
    uids = [f"1.2.{i}" for i in range(40)]
    first.add_instances([(rec(u, u + ".1", u + ".1.1"), "t", None, "d") for u in uids], now=T0, due_at=T0)
    stores = [first, store_factory()]  # two connections, like two nodes
    got: list[list[str]] = [[] for _ in range(4)]
    start = threading.Barrier(4)

    def claimer(i: int) -> None:
        start.wait()
        while claims := stores[i % 2].claim_due(s(1), 3, f"owner{i}", 60):
            got[i].extend(c.study_uid for c in claims)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    claimed = [u for part in got for u in part]
    assert sorted(claimed) == sorted(uids)  # every study exactly once


# -- outcomes --------------------------------------------------------------------------------------------


def test_push_clears_dirty_only_if_generation_unchanged(store: StateStore) -> None:
    add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    (claim,) = store.claim_due(s(10), 5, "n1", 60)
    add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.2"), now=s(11))  # arrives while pushing
    store.mark_pushed(claim, backend_id="b1", version_id="1", digest="g1", now=s(12))

    row = store.study("1.2.3")
    assert row is not None
    assert (row.state, row.dirty, row.backend_id, row.version_id, row.pushed_at) == (
        StudyState.PENDING,
        True,
        "b1",
        "1",
        s(12),
    )
    assert row.lease_owner is None
    (second,) = store.claim_due(s(21), 5, "n1", 60)
    assert (second.generation, second.backend_id, second.version_id, second.digest) == (2, "b1", "1", "g1")
    store.mark_pushed(second, backend_id="b1", version_id="2", digest="g2", now=s(22))
    row = store.study("1.2.3")
    assert row is not None and (row.state, row.dirty, row.version_id) == (StudyState.PUSHED, False, "2")
    assert store.claim_due(s(1000), 5, "n1", 60) == []
    assert [r.study_uid for r in store.studies(StudyState.PUSHED)] == ["1.2.3"]


def test_retry_is_scheduled_and_counted(store: StateStore) -> None:
    add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    (claim,) = store.claim_due(s(10), 5, "n1", 60)
    store.schedule_retry(claim, error="HTTP 503 from backend", next_attempt_at=s(40))
    row = store.study("1.2.3")
    assert row is not None
    assert (row.state, row.attempts, row.last_error, row.next_attempt_at, row.lease_owner) == (
        StudyState.PENDING,
        1,
        "HTTP 503 from backend",
        s(40),
        None,
    )
    assert store.claim_due(s(39), 5, "n1", 60) == []
    (again,) = store.claim_due(s(40), 5, "n1", 60)
    assert again.attempts == 1
    store.schedule_retry(again, error="timeout", next_attempt_at=s(80))
    (third,) = store.claim_due(s(80), 5, "n1", 60)
    assert third.attempts == 2
    store.mark_pushed(third, backend_id="b", version_id=None, digest="g", now=s(81))
    row = store.study("1.2.3")
    assert row is not None and (row.attempts, row.last_error, row.next_attempt_at) == (0, None, None)


def test_requeue_makes_pushed_studies_due_again_and_leaves_the_others(store: StateStore) -> None:
    uids = [f"1.2.{k}" for k in range(1, 1201)]  # more than one IN (...) chunk
    for uid in [*uids, "9.9.1", "9.9.2"]:
        add(store, rec(uid, f"{uid}.1", f"{uid}.1.1"))
    claims = store.claim_due(s(10), 2000, "n1", 60)
    assert len(claims) == 1202
    for claim in claims:
        if claim.study_uid == "9.9.2":
            store.dead_letter(claim, reason="rejected", error="GraphQL: bad", now=s(11))
        elif claim.study_uid != "9.9.1":  # 9.9.1 stays claimed, pending
            store.mark_pushed(claim, backend_id=f"b{claim.study_uid}", version_id="1", digest="g", now=s(11))

    # each pushed study once, whatever the repeats; the pending and the dead one are left as they are
    assert store.requeue([*uids, uids[0], "9.9.1", "9.9.2", "5.5.5"], s(20)) == 1200
    first, last = store.study(uids[0]), store.study(uids[-1])
    assert first is not None and last is not None
    for row in (first, last):
        assert (row.state, row.dirty, row.due_at) == (StudyState.PENDING, True, s(20))
    dead = store.study("9.9.2")
    assert dead is not None and dead.state == StudyState.DEAD
    assert store.requeue(uids, s(30)) == 0  # pending now: nothing to requeue
    # due again, one generation on (a push under way sees the change); 9.9.1 is still leased
    again = {c.study_uid: c for c in store.claim_due(s(30), 2000, "n2", 60)}
    assert sorted(again) == sorted(uids)
    assert {c.generation for c in again.values()} == {2}


def test_dead_letter_and_retry_dead(store_factory: StoreFactory) -> None:
    store = store_factory()
    add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    add(store, rec("1.2.4", "1.2.4.1", "1.2.4.1.1"))
    claims = {c.study_uid: c for c in store.claim_due(s(10), 5, "n1", 60)}
    store.dead_letter(claims["1.2.3"], reason="multiple_matches", error="2 ImagingStudy match", now=s(11))
    store.dead_letter(claims["1.2.4"], reason="rejected", error="GraphQL: bad", now=s(11))
    store.close()

    store = store_factory()  # dead letters are durable
    dead = store.studies(StudyState.DEAD)
    assert [(r.study_uid, r.last_error) for r in dead] == [
        ("1.2.3", "2 ImagingStudy match"),
        ("1.2.4", "GraphQL: bad"),
    ]
    assert store.claim_due(s(1000), 5, "n1", 60) == []
    assert store.studies(StudyState.PENDING) == []
    assert len(store.studies()) == 2

    assert store.retry_dead("1.2.3", s(2000)) == 1
    assert store.retry_dead("1.2.3", s(2000)) == 0  # no longer dead
    assert store.retry_dead("5.5.5", s(2000)) == 0
    (claim,) = store.claim_due(s(2000), 5, "n1", 60)
    assert (claim.study_uid, claim.attempts) == ("1.2.3", 0)
    assert store.retry_dead(None, s(3000)) == 1
    row = store.study("1.2.4")
    assert row is not None and (row.state, row.dirty, row.due_at) == (StudyState.PENDING, True, s(3000))


def test_new_instance_revives_a_dead_study(store: StateStore) -> None:
    add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    (claim,) = store.claim_due(s(10), 5, "n1", 60)
    store.schedule_retry(claim, error="503", next_attempt_at=s(20))
    (claim,) = store.claim_due(s(20), 5, "n1", 60)
    store.dead_letter(claim, reason="rejected", error="bad", now=s(21))
    add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.2"), now=s(30))
    row = store.study("1.2.3")
    assert row is not None and (row.state, row.attempts, row.instances) == (StudyState.PENDING, 0, 2)
    (claim,) = store.claim_due(s(40), 5, "n1", 60)
    assert claim.generation == 2


def test_dead_reason_is_part_of_the_study_row(store: StateStore) -> None:
    """The reason code a dead letter was parked with, through the port, until the study leaves ``dead``."""
    add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    add(store, rec("1.2.4", "1.2.4.1", "1.2.4.1.1"))
    claims = {c.study_uid: c for c in store.claim_due(s(10), 5, "n1", 60)}
    store.dead_letter(claims["1.2.3"], reason="multiple_matches", error="2 ImagingStudy match", now=s(11))
    store.schedule_retry(claims["1.2.4"], error="HTTP 503", next_attempt_at=s(40))
    row = store.study("1.2.3")
    assert row is not None and (row.state, row.dead_reason) == (StudyState.DEAD, "multiple_matches")
    assert [(r.study_uid, r.dead_reason) for r in store.studies()] == [
        ("1.2.3", "multiple_matches"),
        ("1.2.4", None),
    ]
    assert [r.dead_reason for r in store.studies(StudyState.DEAD)] == ["multiple_matches"]
    assert store.retry_dead("1.2.3", s(100)) == 1
    row = store.study("1.2.3")
    assert row is not None and (row.state, row.dead_reason) == (StudyState.PENDING, None)
    (claim,) = store.claim_due(s(100), 1, "n1", 60)
    store.dead_letter(claim, reason="rejected", error="GraphQL: bad", now=s(101))
    add(store, rec(claim.study_uid, f"{claim.study_uid}.1", f"{claim.study_uid}.1.2"), now=s(110))
    row = store.study(claim.study_uid)
    assert row is not None and (row.state, row.dead_reason) == (StudyState.PENDING, None)


def test_study_unknown_is_none(store: StateStore) -> None:
    assert store.study("1.2.3") is None
    assert store.instances("1.2.3") == []
    assert store.studies() == []


# -- SQLite specifics ------------------------------------------------------------------------------------


def _pragma(db: Path, name: str) -> object:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


def test_sqlite_runs_wal_and_full(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite3"
    with SQLiteStateStore(db) as store:
        assert store._conn is not None
        assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store.schema_version == len(MIGRATIONS)
    assert _pragma(db, "journal_mode") == "wal"  # persistent in the file


def test_sqlite_switches_a_database_in_another_journal_mode(tmp_path: Path) -> None:
    """A database left in rollback-journal mode by another tool is switched to WAL at open."""
    db = tmp_path / "s.sqlite3"
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0] == "delete"
    conn.execute("CREATE TABLE unrelated (x)")
    conn.commit()
    conn.close()
    SQLiteStateStore(db).close()
    assert _pragma(db, "journal_mode") == "wal"


def test_sqlite_refuses_when_wal_cannot_be_set(tmp_path: Path) -> None:
    """Another connection holding a rollback-journal lock prevents the switch: refused, not ignored."""
    db = tmp_path / "s.sqlite3"
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("PRAGMA journal_mode = DELETE")
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match=r"s\.sqlite3"):
            SQLiteStateStore(db, busy_timeout_s=0.05)
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_sqlite_upgrades_a_version_1_database_keeping_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "v1.sqlite3"
    conn = sqlite3.connect(db)
    for statement in MIGRATIONS[0]:  # the schema as version 1 shipped it
        conn.execute(statement)
    conn.execute(
        "INSERT INTO instances (sop_uid, study_uid, series_uid, digest, source, spool_name, node, "
        "record_json, added_at) VALUES ('1.2.3.1.1', '1.2.3', '1.2.3.1', 'd', 't', 'abc', 'n', '{}', 'x')"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with SQLiteStateStore(db) as store:
        assert store.schema_version == len(MIGRATIONS)
        assert store.referenced_spool_names(["abc", "zzz"]) == {"abc"}
    indexes = {r[1] for r in sqlite3.connect(db).execute("PRAGMA index_list(instances)")}
    assert "instances_spool" in indexes


def test_sqlite_migrates_an_empty_file(tmp_path: Path) -> None:
    db = tmp_path / "empty.sqlite3"
    db.write_bytes(b"")
    with SQLiteStateStore(db) as store:
        assert store.schema_version == len(MIGRATIONS)
        add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    conn = sqlite3.connect(db)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    columns = {r[1] for r in conn.execute("PRAGMA table_info(studies)")}
    conn.close()
    assert {"instances", "studies"} <= tables
    assert {"generation", "dirty", "due_at", "lease_owner", "lease_expires", "dead_reason"} <= columns


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite3"
    SQLiteStateStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        SQLiteStateStore(db)


def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite3"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        SQLiteStateStore(db)


def test_sqlite_locked_too_long_is_unavailable(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite3"
    store = SQLiteStateStore(db, busy_timeout_s=0.05)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailableError, match="add_instances"):
            add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1")) is Verdict.ADDED  # recovers
    store.close()


def test_sqlite_disk_full_is_unavailable_and_commits_nothing(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite3"
    store = SQLiteStateStore(db)
    assert store._conn is not None
    pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
    store._conn.execute(f"PRAGMA max_page_count = {pages}")  # the database file cannot grow: SQLITE_FULL
    big = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", study_description="x" * 20000)
    with pytest.raises(StoreUnavailableError, match="full"):
        add(store, big)
    assert store.study("1.2.3") is None and store.instances("1.2.3") == []
    store.close()


def test_closed_store_refuses(tmp_path: Path) -> None:
    store = SQLiteStateStore(tmp_path / "s.sqlite3")
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.studies()


def test_open_state_store(tmp_path: Path) -> None:
    store = open_state_store(None, tmp_path / "data")
    try:
        assert add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1")) is Verdict.ADDED
    finally:
        store.close()
    assert (tmp_path / "data" / "state.sqlite3").is_file()
    with pytest.raises(ConfigError, match="mysql"):
        open_state_store("mysql://x", tmp_path)


def test_what_ingest_wrote_is_kept_with_the_push_for_the_next_merge(store: StateStore) -> None:
    add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1"))
    assert store.written("1.2.3") == (None, None)  # never written
    (claim,) = store.claim_due(s(10), 5, "n1", 60)
    ours = '{"resourceType": "ImagingStudy", "description": "Ünïcode"}'
    subject = '{"identifier": {"system": "urn:oid:1.2.3", "value": "PID-1"}}'
    store.mark_pushed(claim, backend_id="b1", version_id="v1", digest="g", now=s(11), written=(ours, subject))
    assert store.written("1.2.3") == (ours, subject)
    add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.2"), now=s(20))
    (claim,) = store.claim_due(s(40), 5, "n1", 60)
    store.mark_pushed(claim, backend_id="b1", version_id="v2", digest="h", now=s(41))  # nothing given: kept
    assert store.written("1.2.3") == (ours, subject)
    assert store.written("9.9.9") == (None, None)


def test_next_due_at_is_the_earliest_due_time_after_now_of_a_study_waiting_for_a_push(
    store: StateStore,
) -> None:
    assert store.next_due_at(T0) is None  # nothing stored
    add(store, rec("1.2.1", "1.2.1.1", "1.2.1.1.1"), stable_s=5)
    add(store, rec("1.2.2", "1.2.2.1", "1.2.2.1.1"), stable_s=1)
    add(store, rec("1.2.3", "1.2.3.1", "1.2.3.1.1"), stable_s=0.5)
    claims = store.claim_due(s(0.5), 10, "n1", 60)  # the one due first is pushed: not waited for any more
    assert [c.study_uid for c in claims] == ["1.2.3"]
    store.mark_pushed(claims[0], backend_id="b1", version_id="1", digest="g", now=s(0.6))
    assert store.next_due_at(T0) == s(1)
    assert store.next_due_at(s(1)) == s(5)  # strictly later
    assert store.next_due_at(s(5)) is None
