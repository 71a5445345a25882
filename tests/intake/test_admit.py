"""The one acceptance path (ingest.intake.admit): rows, due time, duplicates, conflicts, metrics, wake.

Against the real SQLite store and real spool / quarantine folders under ``tmp_path``.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ingest.adapters.spool import Quarantine, Spool
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.core.records import InstanceRecord, RecordRow
from ingest.errors import StoreUnavailableError
from ingest.intake.admit import Admission, Candidate
from ingest.metrics import Metrics
from ingest.ports import Verdict

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
STUDY = "1.2.826.0.1.3680043.2.1125.7"


def rec(sop: str, study: str = STUDY, **extra: Any) -> InstanceRecord:
    return InstanceRecord(study_uid=study, series_uid=f"{study}.1", sop_uid=sop, sop_class_uid=CT, **extra)


class Parts:
    def __init__(self, tmp_path: Path) -> None:
        self.store = SQLiteStateStore(tmp_path / "state.sqlite3", node="test")
        self.spool = Spool(tmp_path / "spool")
        self.quarantine = Quarantine(tmp_path / "quarantine")
        self.metrics = Metrics()
        self.wakes = 0
        self.admission = Admission(
            self.store, spool=self.spool, quarantine=self.quarantine, metrics=self.metrics,
            stable_age_s=30, wake=self.wake, clock=lambda: T0, label="watch",
        )

    def wake(self) -> None:
        self.wakes += 1

    def spooled(self, data: bytes) -> Candidate:
        return self.candidate(rec("1.2.3.1"), "d1", data)

    def candidate(self, record: InstanceRecord, digest: str, data: bytes) -> Candidate:
        kept = self.spool.write(data)
        return Candidate(record, digest, "watch", spool_name=kept.name, body=data, origin="/drop/x.dcm")

    def counter(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or None)
        return value or 0.0


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    p = Parts(tmp_path)
    try:
        yield p
    finally:
        p.store.close()


def test_added_commits_the_row_due_after_stable_age_counts_and_lets_the_relay_sleep(parts: Parts) -> None:
    item = parts.candidate(rec("1.2.3.1"), "d1", b"first")
    (admitted,) = parts.admission.admit([item])
    assert (admitted.outcome, admitted.study_uid, admitted.now) == (Verdict.ADDED, STUDY, T0)
    row = parts.store.study(STUDY)
    assert row is not None and row.last_seen == T0 and row.due_at == T0 + timedelta(seconds=30)
    assert parts.spool.names() == [item.spool_name]  # the accepted bytes stay
    assert parts.counter("ingest_instances_accepted_total", source="watch") == 1
    assert parts.wakes == 0  # due in 30 s: the relay's poll finds it, no search after every instance


def test_one_wake_per_batch_due_at_once_and_none_without_a_new_row(parts: Parts) -> None:
    parts.admission.stable_age = timedelta(0)
    items = [parts.candidate(rec(f"1.2.3.{i}"), f"d{i}", b"x%d" % i) for i in range(3)]
    parts.admission.admit(items)
    assert parts.wakes == 1
    again = [parts.candidate(rec(f"1.2.3.{i}"), f"d{i}", b"x%d" % i) for i in range(3)]
    assert [a.outcome for a in parts.admission.admit(again)] == [Verdict.DUPLICATE] * 3
    assert parts.wakes == 1


def test_duplicate_removes_its_spool_copy_and_counts_it(parts: Parts) -> None:
    first = parts.candidate(rec("1.2.3.1"), "d1", b"same")
    parts.admission.admit_one(first)
    second = parts.candidate(rec("1.2.3.1"), "d1", b"same")
    admitted = parts.admission.admit_one(second)
    assert admitted.outcome is Verdict.DUPLICATE
    assert parts.spool.names() == [first.spool_name]
    assert parts.counter("ingest_instances_duplicate_total") == 1
    assert parts.quarantine.names() == []


def test_conflict_is_quarantined_with_its_rule_and_its_spool_copy_removed(parts: Parts) -> None:
    first = parts.candidate(rec("1.2.3.1", series_description="a"), "d1", b"first")
    parts.admission.admit_one(first)
    second = parts.candidate(rec("1.2.3.1", series_description="b"), "d2", b"second")
    admitted = parts.admission.admit_one(second)
    assert (admitted.outcome, admitted.rule) == (Verdict.CONFLICT, "other_content")
    assert admitted.quarantined is not None and parts.quarantine.holds(admitted.quarantined)
    side = parts.quarantine.reason(admitted.quarantined)
    assert (side["reason"], side["rule"], side["source"]) == ("conflict", "other_content", "/drop/x.dcm")
    assert side["detail"] == admitted.detail and "1.2.3.1" in admitted.detail
    assert parts.quarantine.path(admitted.quarantined).read_bytes() == b"second"
    assert parts.spool.names() == [first.spool_name]  # the first is kept, the second's copy removed
    assert parts.store.instances(STUDY) == [rec("1.2.3.1", series_description="a")]
    assert parts.counter("ingest_instances_rejected_total", reason="conflict") == 1


def test_conflict_in_another_study(parts: Parts) -> None:
    parts.admission.admit_one(parts.candidate(rec("9.9.9"), "d1", b"a"))
    admitted = parts.admission.admit_one(parts.candidate(rec("9.9.9", study="1.2.4"), "d1", b"a"))
    assert (admitted.outcome, admitted.rule) == (Verdict.CONFLICT, "other_study")


def test_without_a_body_or_quarantine_a_conflict_is_only_reported(tmp_path: Path) -> None:
    with SQLiteStateStore(tmp_path / "state.sqlite3", node="test") as store:
        admission = Admission(store, spool=None, quarantine=None, metrics=None, stable_age_s=5,
                              wake=lambda: None, clock=lambda: T0, label="replay")
        results = admission.admit([Candidate(rec("1.2.3.1"), "d1", "file:a"),
                                   Candidate(rec("1.2.3.1"), "d2", "file:b")])
        assert [(r.outcome, r.quarantined) for r in results] == [
            (Verdict.ADDED, None), (Verdict.CONFLICT, None)
        ]
        row = store.study(STUDY)
        assert row is not None and row.due_at == T0 + timedelta(seconds=5)


def test_store_failure_removes_every_spool_copy_and_raises(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailableError("disk I/O error")

    monkeypatch.setattr(parts.store, "add_instances", down)
    monkeypatch.setattr(parts.store, "add_instance", down)
    items = [parts.candidate(rec(f"1.2.3.{i}"), f"d{i}", b"x%d" % i) for i in range(2)]
    with pytest.raises(StoreUnavailableError):
        parts.admission.admit(items)
    with pytest.raises(StoreUnavailableError):
        parts.admission.admit_one(parts.candidate(rec("1.2.3.9"), "d9", b"y"))
    assert parts.spool.names() == []
    assert parts.wakes == 0
    assert parts.counter("ingest_instances_accepted_total", source="watch") == 0


def test_empty_batch_does_nothing(parts: Parts) -> None:
    assert parts.admission.admit([]) == []
    assert parts.wakes == 0


def test_reject_and_replace_are_granted_per_ae_title_only_when_every_entry_says_so() -> None:
    from ingest.config import CallingAE
    from ingest.intake.admit import granted

    entries = [
        CallingAE(ae="ONE", host="10.0.0.1", reject=True),
        CallingAE(ae="ONE", host="10.0.0.2"),  # the same title from another host, without reject
        CallingAE(ae="TWO", reject=True, replace=True),
        CallingAE(ae="THREE"),
    ]
    assert granted(entries, "reject") == {"TWO"}
    assert granted(entries, "replace") == {"TWO"}


def test_a_row_is_stored_as_it_is_and_read_whole_only_to_judge_a_repeat(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    real = InstanceRecord.from_json.__func__  # type: ignore[attr-defined]

    def counting(cls: type[InstanceRecord], text: str | bytes) -> InstanceRecord:
        reads.append("read")
        return real(cls, text)  # type: ignore[no-any-return]

    monkeypatch.setattr(InstanceRecord, "from_json", classmethod(counting))
    def shipped(record: InstanceRecord) -> RecordRow:  # as a parsing process hands it over: strings only
        row: RecordRow = pickle.loads(pickle.dumps(RecordRow.of(record)))
        return row

    record = rec("1.2.3.1", study_description="Chest")
    (added,) = parts.admission.admit([Candidate(shipped(record), "d1", "file:a.dcm")])
    assert added.outcome is Verdict.ADDED
    assert reads == []  # an ordinary new instance: its row's columns and JSON, no record built
    (again,) = parts.admission.admit([Candidate(shipped(record), "d1", "file:a.dcm")])
    assert again.outcome is Verdict.DUPLICATE and reads  # a repeat is judged on the whole record
    (other,) = parts.admission.admit([Candidate(shipped(rec("1.2.3.1")), "d2", "file:b.dcm")])
    assert (other.outcome, other.rule) == (Verdict.CONFLICT, "other_content")
    assert parts.store.instances(STUDY) == [record]  # stored as given, read back equal
