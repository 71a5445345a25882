"""The Storage Commitment part of the state store (``ingest.adapters.state.commitments``), on SQLite and
PostgreSQL: requests stored and repeated, the decision made once with its retention hold, claims and
leases, retries and giving up.

Failure Reasons are PS3.3 C.14.1.1's: 0x0112 no such object instance, 0x0119 class / instance conflict,
0x0110 processing failure.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ingest.core.records import InstanceRecord
from ingest.errors import StoreError
from ingest.ports import CommitmentAdded, StateStore
from tests.conftest import StoreFactory

T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
STUDY, SERIES = "1.2.3.5.1", "1.2.3.5.2"
HOLD = T0 + timedelta(days=30)


def _add(
    store: StateStore, sop: str, *, spool_name: str | None = None, inline: bytes | None = None,
    source: str = "dimse:CT1",
) -> None:
    record = InstanceRecord(study_uid=STUDY, series_uid=SERIES, sop_uid=sop, sop_class_uid=CT)
    store.add_instances(
        [(record, source, spool_name, f"d-{sop}")],
        now=T0,
        due_at=T0,  # type: ignore[call-arg]
        inline=[inline],
    )


def _hold_of(store: StateStore, sop: str) -> datetime | None:
    with store._use("test") as cur:  # type: ignore[attr-defined]
        row = cur.execute(store._q("SELECT hold_until FROM instances WHERE sop_uid = ?"), (sop,)).fetchone()  # type: ignore[attr-defined]
    value = row[0]
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def test_decision_commits_held_bytes_and_fails_the_rest_with_their_reasons(store: StateStore) -> None:
    _add(store, "1.1", spool_name="a" * 32)  # a spool file
    _add(store, "1.2", inline=b"DICM-bytes")  # bytes in the row's transaction
    _add(store, "1.3")  # a row without bytes (e.g. replayed from a folder that is not ours)
    items = [(CT, "1.1"), (CT, "1.2"), (CT, "1.3"), (CT, "1.404"), (MR, "1.1")]
    assert store.add_commitment("9.1", "CT1", items, now=T0) is CommitmentAdded.NEW
    report = store.decide_commitment("9.1", now=T0, hold_until=HOLD)
    assert report.committed == ((CT, "1.1"), (CT, "1.2"))
    assert report.failed == ((CT, "1.3", 0x0110), (CT, "1.404", 0x0112), (MR, "1.1", 0x0119))
    assert report.event_type == 2
    assert _hold_of(store, "1.1") == HOLD and _hold_of(store, "1.2") == HOLD
    assert _hold_of(store, "1.3") is None
    # decided once: later calls return the same result and never shorten a hold
    _add(store, "1.404", spool_name="b" * 32)
    again = store.decide_commitment("9.1", now=T0, hold_until=T0 + timedelta(days=1))
    assert again == report
    assert _hold_of(store, "1.1") == HOLD


def test_a_longer_hold_is_kept(store: StateStore) -> None:
    _add(store, "2.1", spool_name="c" * 32)
    store.add_commitment("9.2", "CT1", [(CT, "2.1")], now=T0)
    store.decide_commitment("9.2", now=T0, hold_until=HOLD)
    store.add_commitment("9.3", "CT1", [(CT, "2.1")], now=T0)
    store.decide_commitment("9.3", now=T0, hold_until=T0 + timedelta(days=1))
    assert _hold_of(store, "2.1") == HOLD


def test_repeat_and_conflict(store: StateStore) -> None:
    items = [(CT, "3.1"), (CT, "3.2")]
    assert store.add_commitment("9.4", "CT1", items, now=T0) is CommitmentAdded.NEW
    [claim] = store.claim_commitments(T0, 10, "node-a", 60)
    store.commitment_reported(claim, now=T0)
    assert store.commitment_counts() == {"reported": 1}
    assert store.add_commitment("9.4", "CT1", items, now=T0) is CommitmentAdded.REPEATED
    assert store.commitment_counts() == {"pending": 1}
    assert store.add_commitment("9.4", "CT1", items[:1], now=T0) is CommitmentAdded.CONFLICT
    assert store.add_commitment("9.4", "MR1", items, now=T0) is CommitmentAdded.CONFLICT
    [row] = store.commitments()
    assert (row.calling_ae, row.instances, row.state) == ("CT1", 2, "pending")


def test_leases_retries_and_giving_up(store_factory: StoreFactory) -> None:
    a, b = store_factory(), store_factory()
    a.add_commitment("9.5", "CT1", [(CT, "4.1")], now=T0)
    [claim] = a.claim_commitments(T0, 10, "node-a", 60)
    assert b.claim_commitments(T0, 10, "node-b", 60) == []  # leased
    assert [c.transaction_uid for c in a.claim_commitments(T0, 10, "node-a", 60)] == ["9.5"]  # own lease
    a.commitment_retry(claim, error="cannot connect", next_attempt_at=T0 + timedelta(seconds=30))
    assert b.claim_commitments(T0 + timedelta(seconds=29), 10, "node-b", 60) == []  # not due yet
    [later] = b.claim_commitments(T0 + timedelta(seconds=30), 10, "node-b", 60)
    assert later.attempts == 1
    [row] = b.commitments("pending")
    assert row.last_error == "cannot connect" and row.next_attempt_at == T0 + timedelta(seconds=30)
    b.commitment_retry(later, error="still closed", next_attempt_at=None)
    assert b.commitment_counts() == {"abandoned": 1}
    assert b.claim_commitments(T0 + timedelta(days=9), 10, "node-b", 60) == []


def test_claims_leave_out_busy_requesters_and_take_stale_times_as_due(store_factory: StoreFactory) -> None:
    a, b = store_factory(), store_factory()
    a.add_commitment("9.7", "SLOW", [(CT, "6.1")], now=T0)
    a.add_commitment("9.8", "FAST", [(CT, "6.2")], now=T0 + timedelta(seconds=1))
    # a requester with a delivery under way is left out, so the next one's report is claimed
    [claim] = a.claim_commitments(T0 + timedelta(seconds=1), 1, "node-a", 60, exclude_aes={"SLOW"})
    assert claim.transaction_uid == "9.8"
    a.commitment_retry(claim, error="x", next_attempt_at=T0 + timedelta(seconds=300))
    # the clock is set back an hour: the next attempt (5 min after T0) looks 1 h 5 min away; beyond the
    # bound it counts as due, and node-a's lease on 9.7 (taken below) as expired
    [slow] = a.claim_commitments(T0, 10, "node-a", 60, exclude_aes={"FAST"})
    assert slow.transaction_uid == "9.7"
    back = T0 - timedelta(hours=1)
    assert b.claim_commitments(back, 10, "node-b", 60) == []  # without a bound: an hour to wait
    claimed = b.claim_commitments(back, 10, "node-b", 60, stale_after=back + timedelta(seconds=360))
    assert sorted(c.transaction_uid for c in claimed) == ["9.7", "9.8"]


def test_deciding_an_unknown_transaction_is_an_error(store: StateStore) -> None:
    with pytest.raises(StoreError, match="not in the state store"):
        store.decide_commitment("9.404", now=T0, hold_until=HOLD)


def test_requests_survive_reopen(store_factory: StoreFactory) -> None:
    first = store_factory()
    first.add_commitment("9.6", "CT1", [(CT, f"5.{n}") for n in range(1, 601)], now=T0)
    first.close()
    [claim] = store_factory().claim_commitments(T0, 10, "node-a", 60)
    assert claim.transaction_uid == "9.6" and claim.calling_ae == "CT1" and claim.received_at == T0


def test_rejected_instances_are_not_committed(store: StateStore) -> None:
    from ingest.core.lifecycle import Rejection

    _add(store, "6.1", spool_name="d" * 32)
    _add(store, "6.2", spool_name="e" * 32)
    # an IOCM rejection of one instance (113001 Rejected for Quality Reasons), as ``ingest reject`` records it
    store.reject(Rejection(study_uid=STUDY, series_uid=SERIES, sop_uid="6.1", code="113001"), now=T0)  # type: ignore[attr-defined]
    store.add_commitment("9.7", "CT1", [(CT, "6.1"), (CT, "6.2")], now=T0)
    report = store.decide_commitment("9.7", now=T0, hold_until=HOLD)
    assert report.committed == ((CT, "6.2"),)
    assert report.failed == ((CT, "6.1", 0x0110),)
    assert _hold_of(store, "6.1") is None


def test_only_the_requesters_own_instances_are_committed(store: StateStore) -> None:
    _add(store, "8.1", spool_name="f" * 32)  # sent by CT1
    _add(store, "8.2", spool_name="g" * 32, source="dimse:CT2")  # sent by another AE
    _add(store, "8.3", spool_name="h" * 32, source="watch")  # dropped in the folder
    items = [(CT, "8.1"), (CT, "8.2"), (CT, "8.3"), (CT, "8.404")]
    store.add_commitment("9.8", "CT1", items, now=T0)
    report = store.decide_commitment("9.8", now=T0, hold_until=HOLD)
    assert report.committed == ((CT, "8.1"),)
    # another AE's instance fails exactly like one never received, and is not held for the requester
    assert report.failed == ((CT, "8.2", 0x0112), (CT, "8.3", 0x0112), (CT, "8.404", 0x0112))
    assert _hold_of(store, "8.2") is None
