"""Rejections and replaced instances in the state store (ingest.adapters.state.lifecycle), on SQLite and
PostgreSQL via ``store_factory``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ingest.core.lifecycle import KEY_OBJECT_SELECTION, Rejection
from ingest.core.records import Code, InstanceRecord, SopReference
from ingest.ports import Added, Replaced, StateStore, StudyState, Verdict
from tests.conftest import StoreFactory

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY = "1.2.826.0.1.3680043.2.1125.80"
OTHER = "1.2.826.0.1.3680043.2.1125.81"
S1, S2 = f"{STUDY}.1", f"{STUDY}.2"


def img(sop: str, series: str = S1, study: str = STUDY, **extra: object) -> InstanceRecord:
    return InstanceRecord(study_uid=study, series_uid=series, sop_uid=sop, sop_class_uid=CT, **extra)  # type: ignore[arg-type]


def note(sop: str, code: str, refs: list[tuple[str, str, str]]) -> InstanceRecord:
    return InstanceRecord(
        study_uid=STUDY, series_uid=f"{STUDY}.99", sop_uid=sop, sop_class_uid=KEY_OBJECT_SELECTION,
        concept_code=Code(designator="DCM", value=code, meaning="rejected"),
        evidence=tuple(SopReference(study_uid=st, series_uid=se, sop_uid=so) for st, se, so in refs),
    )


def add(store: StateStore, *records: InstanceRecord, now: datetime = T0, digest: str = "d") -> list[Added]:
    return store.add_instances(
        [(r, "test", None, f"{digest}-{r.sop_uid}") for r in records], now=now,
        due_at=now + timedelta(seconds=5),
    )


def kept(store: StateStore, study: str = STUDY) -> list[str]:
    return [r.sop_uid for r in store.instances(study) if r.rejected_for is None and r.concept_code is None]


def push(store: StateStore, now: datetime) -> None:
    for claim in store.claim_due(now, 10, "n", 60):
        store.mark_pushed(claim, backend_id="b1", version_id="1", digest="x", now=now)


def test_a_note_rejects_what_it_names_and_the_rest_stays(store: StateStore) -> None:
    add(store, img("1.1"), img("1.2"), img("2.1", S2))
    (added,) = add(store, note("9.1", "113001", [(STUDY, S1, "1.1"), (STUDY, S2, "2.1")]))
    assert added.outcome is Verdict.ADDED and added.release == ()  # quality: bytes follow retention
    marks = {r.sop_uid: r.rejected_for for r in store.instances(STUDY)}
    assert marks == {"1.1": "113001", "1.2": None, "2.1": "113001", "9.1": None}
    assert kept(store) == ["1.2"]
    assert store.rejected_counts() == {STUDY: {"113001": 2}}
    no_patient = '["", "", ""]'  # the note's patient (these records have none)
    assert store.rejections(STUDY) == [
        Rejection(STUDY, S1, "1.1", "113001", "9.1", no_patient),
        Rejection(STUDY, S2, "2.1", "113001", "9.1", no_patient),
    ]
    row = store.study(STUDY)
    assert row is not None and row.dirty


def test_a_note_before_its_instances_keeps_them_out_across_a_reopen(store_factory: StoreFactory) -> None:
    store = store_factory()
    add(store, note("9.1", "113038", [(STUDY, S1, "1.1"), (STUDY, S1, "1.2")]))
    row = store.study(STUDY)
    assert row is not None and not row.dirty  # only a note: nothing to write until instances come
    store.close()
    store = store_factory()  # a restart: rejections are state
    add(store, img("1.1"), img("1.2"), img("1.3"), now=T0 + timedelta(seconds=30))
    row = store.study(STUDY)
    assert row is not None and row.dirty
    assert kept(store) == ["1.3"]
    assert store.rejected_counts() == {STUDY: {"113038": 2}}


def test_a_note_received_again_writes_nothing(store: StateStore) -> None:
    rejecting = note("9.1", "113001", [(STUDY, S1, "1.1")])
    add(store, img("1.1"), img("1.2"), rejecting)
    push(store, T0 + timedelta(seconds=10))
    (again,) = add(store, rejecting, now=T0 + timedelta(seconds=20))
    assert again.outcome is Verdict.DUPLICATE
    row = store.study(STUDY)
    assert row is not None and not row.dirty and row.state is StudyState.PUSHED
    assert len(store.rejections(STUDY)) == 1


def test_patient_safety_names_the_stored_instances_whose_bytes_go(store: StateStore) -> None:
    add(store, img("1.1"), img("1.2"))
    (added,) = add(store, note("9.1", "113037", [(STUDY, S1, "1.1"), (STUDY, S1, "1.7")]))
    assert (added.release, added.release_reason) == (("1.1",), "iocm:113037")  # 1.7 is not stored yet
    (late,) = add(store, img("1.7"))
    assert (late.outcome, late.release, late.release_reason) == (Verdict.ADDED, ("1.7",), "iocm:113037")
    (other,) = add(store, img("1.8"))
    assert other.release == ()


def test_a_note_naming_another_known_study_makes_it_due(store: StateStore) -> None:
    add(store, img("5.1", f"{OTHER}.1", OTHER))
    push(store, T0 + timedelta(seconds=10))
    rejecting = note("9.1", "113001", [(OTHER, f"{OTHER}.1", "5.1")])
    add(store, img("1.1"), rejecting, now=T0 + timedelta(seconds=20))
    row = store.study(OTHER)
    assert row is not None and row.dirty
    assert kept(store, OTHER) == []


def test_reject_a_whole_study_covers_later_arrivals_and_repeating_writes_nothing(store: StateStore) -> None:
    add(store, img("1.1"), img("2.1", S2))
    push(store, T0 + timedelta(seconds=10))
    when = T0 + timedelta(seconds=20)
    done = store.reject(Rejection(STUDY, "", "", "113039"), now=when)
    assert done.new and done.study_known and sorted(done.release) == ["1.1", "2.1"]
    row = store.study(STUDY)
    assert row is not None and row.dirty and row.due_at == when
    push(store, when)
    again = store.reject(Rejection(STUDY, "", "", "113039"), now=when + timedelta(seconds=1))
    assert not again.new and again.release == ()
    row = store.study(STUDY)
    assert row is not None and not row.dirty
    (late,) = add(store, img("3.1", f"{STUDY}.3"), now=when + timedelta(seconds=2))
    assert late.release == ("3.1",)
    assert kept(store) == []
    assert store.rejected_counts() == {STUDY: {"113039": 3}}


def test_reject_a_series_and_an_instance_of_an_unknown_study(store: StateStore) -> None:
    done = store.reject(Rejection(STUDY, S2, "", "113001"), now=T0)
    assert done.new and not done.study_known and store.study(STUDY) is None  # waits for the instances
    store.reject(Rejection(STUDY, "", "1.1", "113001"), now=T0)
    add(store, img("1.1"), img("1.2"), img("2.1", S2), img("2.2", S2))
    assert kept(store) == ["1.2"]


def test_reject_refuses_an_unknown_code(store: StateStore) -> None:
    with pytest.raises(ValueError, match="113000"):
        store.reject(Rejection(STUDY, "", "", "113000"), now=T0)


def test_replace_instance_takes_the_row_and_makes_the_study_due(store: StateStore) -> None:
    add(store, img("1.1", study_description="Wrong"), img("1.2"))
    push(store, T0 + timedelta(seconds=10))
    (conflict,) = add(store, img("1.1", study_description="Right"), digest="other")
    assert conflict.outcome is Verdict.CONFLICT
    when = T0 + timedelta(seconds=20)
    old = store.replace_instance(
        img("1.1", study_description="Right"), source="test2", spool_name="new-spool", digest="c1:new",
        data=None, now=when, due_at=when + timedelta(seconds=5),
    )
    assert old is not None and old.old_digest == "d-1.1" and old.old_spool_name is None
    by_uid = {r.sop_uid: r for r in store.instances(STUDY)}
    assert by_uid["1.1"].study_description == "Right"
    row = store.study(STUDY)
    assert row is not None and row.dirty and row.state is StudyState.PENDING
    assert store.replaced_counts() == {STUDY: 1}
    # the same version again is now a duplicate
    (dup,) = store.add_instances([(img("1.1", study_description="Right"), "t", None, "c1:new")], now=when,
                                 due_at=when)
    assert dup.outcome is Verdict.DUPLICATE


def test_replace_instance_of_another_study_writes_nothing(store: StateStore) -> None:
    add(store, img("1.1"))
    assert store.replace_instance(
        img("1.1", study=OTHER, series=f"{OTHER}.1"), source="t", spool_name=None, digest="x", data=None,
        now=T0, due_at=T0,
    ) is None
    assert [r.study_uid for r in store.instances(STUDY)] == [STUDY]


# -- whose instances a rejection or a replacement may touch ------------------------------------------------


def _add_from(
    store: StateStore, record: InstanceRecord, source: str, *, spool_name: str | None = None
) -> None:
    store.add_instances([(record, source, spool_name, f"d-{record.sop_uid}")], now=T0, due_at=T0)


def test_a_notes_rejection_covers_only_its_patients_instances(store: StateStore) -> None:
    patient_note = note("9.1", "113038", [(STUDY, S1, "1.1"), (STUDY, S1, "1.2")]).model_copy(
        update={"patient_id": "P1"}
    )
    add(store, patient_note)
    add(store, img("1.1", patient_id="P1"), img("1.2", patient_id="P2"))  # arriving later
    assert kept(store) == ["1.2"]
    assert store.study_patients([STUDY, OTHER]) == {STUDY: {'["P1", "", ""]', '["P2", "", ""]'}}
    rows = store.rejection_rows()
    assert [(r.rejection.sop_uid, r.rejection.patient, r.source, r.added_at) for r in rows] == [
        ("1.1", '["P1", "", ""]', "test", T0), ("1.2", '["P1", "", ""]', "test", T0)]
    assert store.rejection_rows(OTHER) == []


def test_held_rejected_lists_bytes_a_hold_kept_once_it_ends(store: StateStore) -> None:
    hold = T0 + timedelta(days=30)
    _add_from(store, img("1.1"), "dimse:A", spool_name="a" * 32)
    _add_from(store, img("1.2"), "dimse:A", spool_name="b" * 32)
    assert store.hold_bytes(["1.1"], until=hold) == 1
    done = store.reject(Rejection(STUDY, "", "", "113037"), now=T0)
    assert sorted(done.release) == ["1.1", "1.2"]  # what the rejection covers; the caller respects holds
    store.release_instance_bytes(["1.1", "1.2"], reason="iocm:113037", now=T0, unless_held_at=T0)
    assert store.held_rejected(now=hold - timedelta(seconds=1), limit=10) == {}
    assert store.held_rejected(now=hold, limit=10) == {"iocm:113037": ["1.1"]}


def test_unreject_removes_only_what_ingest_reject_made(store: StateStore) -> None:
    add(store, img("1.1"), img("1.2"), note("9.1", "113001", [(STUDY, S1, "1.2")]))
    store.reject(Rejection(STUDY, S1, "1.1", "113038"), now=T0)
    push(store, T0 + timedelta(minutes=1))
    later = T0 + timedelta(minutes=2)
    assert not store.unreject(Rejection(STUDY, S1, "1.2", "113001"), now=later)  # a note's
    assert not store.unreject(Rejection(STUDY, S1, "1.1", "113001"), now=later)  # another code
    row = store.study(STUDY)
    assert row is not None and not row.dirty
    assert store.unreject(Rejection(STUDY, S1, "1.1", "113038"), now=later)
    assert kept(store) == ["1.1"]
    row = store.study(STUDY)
    assert row is not None and row.dirty and row.due_at == later
    assert [r.source for r in store.rejection_rows(STUDY)] == ["test"]


def _replace(
    store: StateStore, record: InstanceRecord, source: str, *, trusted: bool, keep_held: bool = True
) -> Replaced | None:
    return store.replace_instance(record, source=source, spool_name="b" * 32, digest="d2", data=None,
                                  now=T0, due_at=T0, trusted=trusted, keep_held=keep_held)


def test_replace_instance_refuses_other_senders_other_patients_and_held_bytes(store: StateStore) -> None:
    first = img("1.1", patient_id="P1", study_description="A")
    _add_from(store, first, "dimse:A", spool_name="a" * 32)
    newer = img("1.1", patient_id="P1", study_description="B")
    refused = _replace(store, newer, "dimse:M", trusted=False)
    assert refused is not None and refused.refused == "replace_other_sender"
    moved = img("1.1", patient_id="P2")
    refused = _replace(store, moved, "dimse:A", trusted=False)
    assert refused is not None and refused.refused == "replace_other_patient"
    store.hold_bytes(["1.1"], until=T0 + timedelta(days=30))
    held = _replace(store, newer, "dimse:A", trusted=False, keep_held=False)
    assert held is not None and (held.refused, held.old_spool_name) == ("held", "a" * 32)
    (record,) = store.instances(STUDY)
    assert record.study_description == "A"  # nothing written by a refusal
    done = _replace(store, moved, "dimse:C", trusted=True)
    assert done is not None and done.refused == "" and done.patient_changed
    (record,) = store.instances(STUDY)
    assert record.patient_id == "P2"
