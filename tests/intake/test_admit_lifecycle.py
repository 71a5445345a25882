"""The acceptance path's study lifecycle (ingest.intake.admit): IOCM notes removing bytes, counting
rejections, and ``[intake] on_conflict = "replace"``. Real SQLite store, spool and quarantine folders."""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest.adapters.dicomfile import read_header_bytes
from ingest.adapters.spool import Quarantine, Spool
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.config import CallingAE
from ingest.core.records import InstanceRecord, RecordRow
from ingest.intake.admit import Admission, Candidate
from ingest.metrics import Metrics
from ingest.ports import Verdict
from tests import iocm

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
STUDY = "1.2.826.0.1.3680043.2.1125.90"
SERIES = f"{STUDY}.1"


class Parts:
    def __init__(
        self, tmp_path: Path, on_conflict: str, senders: tuple[CallingAE, ...] | None = None
    ) -> None:
        self.store = SQLiteStateStore(tmp_path / "state.sqlite3", node="test")
        self.spool = Spool(tmp_path / "spool")
        self.quarantine = Quarantine(tmp_path / "quarantine")
        self.metrics = Metrics()
        self.wakes = 0
        self.admission = Admission(
            self.store, spool=self.spool, quarantine=self.quarantine, metrics=self.metrics,
            stable_age_s=0, wake=self.wake, clock=lambda: T0, label="dimse", on_conflict=on_conflict,
            senders=(CallingAE(ae="MOD", reject=True),) if senders is None else senders,
        )

    def wake(self) -> None:
        self.wakes += 1

    def candidate(self, data: bytes, ae: str = "MOD") -> Candidate:
        parsed = read_header_bytes(data, source="test")
        kept = self.spool.write(data)
        return Candidate(parsed.record, parsed.digest, f"dimse:{ae}", spool_name=kept.name, body=data)

    def hold(self, *sops: str, until: datetime) -> None:
        assert self.store.hold_bytes(sops, until=until) == len(sops)

    def counter(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels or None) or 0.0


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    p = Parts(tmp_path, "quarantine")
    try:
        yield p
    finally:
        p.store.close()


@pytest.fixture
def replacing(tmp_path: Path) -> Iterator[Parts]:
    p = Parts(tmp_path, "replace")
    try:
        yield p
    finally:
        p.store.close()


def test_a_patient_safety_note_removes_the_bytes_of_what_it_rejects(parts: Parts) -> None:
    images = [parts.candidate(iocm.image(STUDY, SERIES, f"{SERIES}.{i}", number=i)) for i in (1, 2)]
    parts.admission.admit(images)
    rejecting = parts.candidate(iocm.note(STUDY, [(SERIES, f"{SERIES}.1")], code="113037"))
    (admitted,) = parts.admission.admit([rejecting])
    assert admitted.outcome is Verdict.ADDED
    # the rejected instance's bytes are gone, its row stays; the other image and the note keep theirs
    assert sorted(parts.spool.names()) == sorted([images[1].spool_name, rejecting.spool_name])
    assert [r.sop_uid for r in parts.store.instances(STUDY) if r.rejected_for == "113037"] == [f"{SERIES}.1"]
    assert parts.counter("ingest_rejections_total", code="113037") == 1
    assert parts.counter("ingest_spool_released_total", reason="iocm:113037") == 1


def test_an_instance_arriving_after_a_retention_rejection_loses_its_bytes(parts: Parts) -> None:
    parts.admission.admit([parts.candidate(iocm.note(STUDY, [(SERIES, f"{SERIES}.1")], code="113039"))])
    late = parts.candidate(iocm.image(STUDY, SERIES, f"{SERIES}.1"))
    (admitted,) = parts.admission.admit([late])
    assert admitted.outcome is Verdict.ADDED  # acknowledged: the sender is not at fault
    assert late.spool_name not in parts.spool.names()


def test_a_quality_note_leaves_the_bytes_to_retention(parts: Parts) -> None:
    image = parts.candidate(iocm.image(STUDY, SERIES, f"{SERIES}.1"))
    parts.admission.admit([image, parts.candidate(iocm.note(STUDY, [(SERIES, f"{SERIES}.1")]))])
    assert image.spool_name in parts.spool.names()
    assert parts.counter("ingest_rejections_total", code="113001") == 1


def test_replace_keeps_the_new_version_and_quarantines_the_old_one(replacing: Parts) -> None:
    sop = f"{SERIES}.1"
    first = replacing.candidate(iocm.image(STUDY, SERIES, sop, StudyDescription="Wrong",
                                           AccessionNumber="A1"))
    replacing.admission.admit([first])
    newer = replacing.candidate(iocm.image(STUDY, SERIES, sop, StudyDescription="Right",
                                           AccessionNumber="A2"))
    (admitted,) = replacing.admission.admit([newer])
    assert admitted.outcome is Verdict.ADDED and admitted.rule == "replaced"  # the sender gets success
    (record,) = replacing.store.instances(STUDY)
    assert (record.study_description, record.accession_number) == ("Right", "A2")
    assert replacing.spool.names() == [newer.spool_name]  # the old file left the spool...
    assert admitted.quarantined is not None and replacing.quarantine.holds(admitted.quarantined)
    side = replacing.quarantine.reason(admitted.quarantined)  # ...for the quarantine, saying why
    assert (side["reason"], side["rule"]) == ("replaced", "replaced_by")
    assert f"replaced by {newer.digest}" in str(side["detail"]) and first.digest in str(side["detail"])
    assert replacing.quarantine.path(admitted.quarantined).read_bytes() == first.body
    assert replacing.counter("ingest_instances_replaced_total") == 1
    assert replacing.counter("ingest_instances_accepted_total", source="dimse") == 2
    assert replacing.wakes == 2  # due at once (stable_age 0): woken by the first and the replacement
    row = replacing.store.study(STUDY)
    assert row is not None and row.dirty


def test_replace_never_moves_an_instance_to_another_study(replacing: Parts) -> None:
    sop = f"{SERIES}.1"
    replacing.admission.admit([replacing.candidate(iocm.image(STUDY, SERIES, sop))])
    other = "1.2.826.0.1.3680043.2.1125.91"
    (admitted,) = replacing.admission.admit([replacing.candidate(iocm.image(other, f"{other}.1", sop))])
    assert admitted.outcome is Verdict.CONFLICT and admitted.rule == "other_study"
    assert [r.study_uid for r in replacing.store.instances(STUDY)] == [STUDY]


def test_quarantine_mode_still_refuses_other_content(parts: Parts) -> None:
    sop = f"{SERIES}.1"
    parts.admission.admit([parts.candidate(iocm.image(STUDY, SERIES, sop, StudyDescription="A"))])
    second = parts.candidate(iocm.image(STUDY, SERIES, sop, StudyDescription="B"))
    (admitted,) = parts.admission.admit([second])
    assert admitted.outcome is Verdict.CONFLICT and admitted.rule == "other_content"
    assert parts.counter("ingest_instances_replaced_total") == 0


def test_a_replaced_version_of_a_patient_safety_rejection_loses_its_bytes_too(replacing: Parts) -> None:
    sop = f"{SERIES}.1"
    replacing.admission.admit([replacing.candidate(iocm.image(STUDY, SERIES, sop, StudyDescription="A"))])
    replacing.admission.admit([replacing.candidate(iocm.note(STUDY, [(SERIES, sop)], code="113037"))])
    newer = replacing.candidate(iocm.image(STUDY, SERIES, sop, StudyDescription="B"))
    (admitted,) = replacing.admission.admit([newer])
    assert admitted.rule == "replaced"
    assert newer.spool_name not in replacing.spool.names()  # still rejected: its bytes go as well
    assert [r.rejected_for for r in replacing.store.instances(STUDY) if r.sop_uid == sop] == ["113037"]


# -- who may reject and replace ------------------------------------------------------------------------

OTHER = "1.2.826.0.1.3680043.2.1125.92"  # another study, of another patient


@pytest.fixture
def two_senders(tmp_path: Path) -> Iterator[Parts]:
    """AE ``A`` sends images; ``B`` may send rejections; ``C`` may replace; ``MOD`` may do neither."""
    p = Parts(tmp_path, "replace", senders=(
        CallingAE(ae="A"), CallingAE(ae="B", reject=True), CallingAE(ae="C", replace=True),
        CallingAE(ae="MOD"),
    ))
    try:
        yield p
    finally:
        p.store.close()


def _quarantined(parts: Parts, name: str | None) -> tuple[object, object]:
    assert name is not None and parts.quarantine.holds(name)
    side = parts.quarantine.reason(name)
    return side["reason"], side["rule"]


def test_a_note_from_an_ae_without_reject_is_quarantined_and_rejects_nothing(two_senders: Parts) -> None:
    p = two_senders
    p.admission.admit([p.candidate(iocm.image(STUDY, SERIES, f"{SERIES}.1"), ae="A")])
    note = p.candidate(iocm.note(STUDY, [(SERIES, f"{SERIES}.1")], code="113037"), ae="MOD")
    (admitted,) = p.admission.admit([note])
    assert admitted.outcome is Verdict.CONFLICT and admitted.rule == "rejection_not_allowed"
    assert _quarantined(p, admitted.quarantined) == ("rejection_not_allowed", "rejection_not_allowed")
    assert p.counter("ingest_instances_rejected_total", reason="rejection_not_allowed") == 1
    assert [(r.sop_uid, r.rejected_for) for r in p.store.instances(STUDY)] == [(f"{SERIES}.1", None)]
    assert note.spool_name not in p.spool.names() and len(p.spool.names()) == 1


def test_a_note_naming_another_patients_study_is_quarantined(two_senders: Parts) -> None:
    p = two_senders
    p.admission.admit([p.candidate(iocm.image(STUDY, SERIES, f"{SERIES}.1"), ae="A")])
    # B may reject, but its note (its own study, another Patient ID) names study A's instance
    note = iocm.note(OTHER, [(SERIES, f"{SERIES}.1")], code="113037", evidence_study=STUDY, PatientID="P-B")
    (admitted,) = p.admission.admit([p.candidate(note, ae="B")])
    assert admitted.rule == "rejection_patient_mismatch"
    assert _quarantined(p, admitted.quarantined)[0] == "rejection_patient_mismatch"
    assert [r.rejected_for for r in p.store.instances(STUDY)] == [None]
    assert p.store.instances(OTHER) == []
    # the same note with an issuer of patient ID that differs: another patient as well
    note = iocm.note(STUDY, [(SERIES, f"{SERIES}.1")], code="113037", IssuerOfPatientID="ELSEWHERE")
    (admitted,) = p.admission.admit([p.candidate(note, ae="B")])
    assert admitted.rule == "rejection_patient_mismatch"


def test_a_note_keeps_out_only_its_own_patients_instances_arriving_later(two_senders: Parts) -> None:
    p = two_senders
    later = [(SERIES, f"{SERIES}.1"), (SERIES, f"{SERIES}.2")]
    (noted,) = p.admission.admit([p.candidate(iocm.note(STUDY, later, code="113037"), ae="B")])
    assert noted.outcome is Verdict.ADDED  # no instance of the study stored yet: nothing to compare
    # another AE sends the named instances, one of them for another patient
    same = p.candidate(iocm.image(STUDY, SERIES, f"{SERIES}.1"), ae="A")
    other = p.candidate(iocm.image(STUDY, SERIES, f"{SERIES}.2", PatientID="P-OTHER"), ae="A")
    assert [a.outcome for a in p.admission.admit([same, other])] == [Verdict.ADDED] * 2
    marks = {r.sop_uid: r.rejected_for for r in p.store.instances(STUDY) if r.sop_uid.startswith(SERIES)}
    assert marks == {f"{SERIES}.1": "113037", f"{SERIES}.2": None}
    assert other.spool_name in p.spool.names() and same.spool_name not in p.spool.names()


def test_a_rejection_leaves_held_bytes_until_the_hold_ends(two_senders: Parts) -> None:
    from ingest.intake.retention import Retention

    p = two_senders
    images = [p.candidate(iocm.image(STUDY, SERIES, f"{SERIES}.{i}", number=i), ae="A") for i in (1, 2)]
    p.admission.admit(images)
    hold = T0 + timedelta(days=30)
    p.hold(f"{SERIES}.1", until=hold)  # reported committed to its sender
    both = [(SERIES, f"{SERIES}.1"), (SERIES, f"{SERIES}.2")]
    (admitted,) = p.admission.admit([p.candidate(iocm.note(STUDY, both, code="113037"), ae="B")])
    assert admitted.outcome is Verdict.ADDED
    # both leave the study at once; only the unheld one's bytes go now
    assert {r.sop_uid: r.rejected_for for r in p.store.instances(STUDY) if r.sop_uid.startswith(SERIES)} == {
        f"{SERIES}.1": "113037", f"{SERIES}.2": "113037"}
    assert images[0].spool_name in p.spool.names() and images[1].spool_name not in p.spool.names()
    retention = Retention(p.store, p.spool, retain=None, release_rejected=True)
    assert retention.run_pass(hold - timedelta(seconds=1)).instances == 0
    assert images[0].spool_name in p.spool.names()
    assert retention.run_pass(hold).instances == 1  # the hold has ended: released, with the code as reason
    assert images[0].spool_name not in p.spool.names()
    with p.store._use("t") as cur:
        row = cur.execute("SELECT bytes_removed_reason FROM instances WHERE sop_uid = ?",
                          (f"{SERIES}.1",)).fetchone()
    assert row[0] == "iocm:113037"


def test_a_replacement_from_another_ae_is_refused(two_senders: Parts) -> None:
    p = two_senders
    sop = f"{SERIES}.1"
    first = p.candidate(iocm.image(STUDY, SERIES, sop, StudyDescription="A"), ae="A")
    p.admission.admit([first])
    for ae, attrs, rule in (("MOD", {"StudyDescription": "B"}, "replace_other_sender"),
                            ("A", {"PatientID": "P-OTHER"}, "replace_other_patient")):
        newer = p.candidate(iocm.image(STUDY, SERIES, sop, **attrs), ae=ae)
        (admitted,) = p.admission.admit([newer])
        assert admitted.outcome is Verdict.CONFLICT and admitted.rule == rule, ae
        assert _quarantined(p, admitted.quarantined) == ("conflict", rule)
        assert newer.spool_name not in p.spool.names()
    (record,) = p.store.instances(STUDY)
    assert (record.study_description, record.patient_id) == ("A", "IOCM-0001")
    assert p.spool.names() == [first.spool_name]
    # the sender of the stored version may replace it (same patient)
    again = p.candidate(iocm.image(STUDY, SERIES, sop, StudyDescription="A2"), ae="A")
    (admitted,) = p.admission.admit([again])
    assert admitted.rule == "replaced"


def test_a_replace_ae_may_change_the_patient_with_a_warning_without_the_ids(
    two_senders: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    p = two_senders
    sop = f"{SERIES}.1"
    p.admission.admit([p.candidate(iocm.image(STUDY, SERIES, sop), ae="A")])
    caplog.set_level("INFO")
    (admitted,) = p.admission.admit([p.candidate(iocm.image(STUDY, SERIES, sop, PatientID="P-NEW"), ae="C")])
    assert admitted.outcome is Verdict.ADDED and admitted.rule == "replaced"
    (record,) = p.store.instances(STUDY)
    assert record.patient_id == "P-NEW"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("another patient" in w and sop in w for w in warnings), warnings
    assert not any("P-NEW" in r.getMessage() or "IOCM-0001" in r.getMessage()
                   for r in caplog.records if r.levelno > 10)


def test_a_held_instance_is_replaced_only_once_its_old_bytes_are_quarantined(
    tmp_path: Path, two_senders: Parts
) -> None:
    p = two_senders
    sop = f"{SERIES}.1"
    first = p.candidate(iocm.image(STUDY, SERIES, sop, StudyDescription="A"), ae="A")
    p.admission.admit([first])
    p.hold(sop, until=T0 + timedelta(days=30))
    p.admission.quarantine = Quarantine(tmp_path / "tiny", max_bytes=10)  # no room for the old bytes
    newer = p.candidate(iocm.image(STUDY, SERIES, sop, StudyDescription="B"), ae="A")
    (admitted,) = p.admission.admit([newer])
    assert admitted.outcome is Verdict.CONFLICT and admitted.rule == "replace_held_not_kept"
    (record,) = p.store.instances(STUDY)
    assert record.study_description == "A" and p.spool.names() == [first.spool_name]  # kept, as stored
    p.admission.quarantine = p.quarantine  # room again
    newest = p.candidate(iocm.image(STUDY, SERIES, sop, StudyDescription="C"), ae="A")
    (admitted,) = p.admission.admit([newest])
    assert admitted.rule == "replaced" and admitted.quarantined is not None
    assert p.quarantine.path(admitted.quarantined).read_bytes() == first.body
    (record,) = p.store.instances(STUDY)
    assert record.study_description == "C"


# -- candidates given as their state store rows (ingest replay's parsing processes make them) ---------


def _as_row(candidate: Candidate) -> Candidate:
    """``candidate`` with its record as a parsing process hands it over (a pickled row: strings only)."""
    assert isinstance(candidate.record, InstanceRecord)
    return dataclasses.replace(candidate, record=pickle.loads(pickle.dumps(RecordRow.of(candidate.record))))


def test_rows_a_patient_safety_note_removes_the_bytes_of_what_it_rejects(parts: Parts) -> None:
    images = [_as_row(parts.candidate(iocm.image(STUDY, SERIES, f"{SERIES}.{i}", number=i))) for i in (1, 2)]
    parts.admission.admit(images)
    rejecting = _as_row(parts.candidate(iocm.note(STUDY, [(SERIES, f"{SERIES}.1")], code="113037")))
    (admitted,) = parts.admission.admit([rejecting])
    assert admitted.outcome is Verdict.ADDED
    assert sorted(parts.spool.names()) == sorted([images[1].spool_name, rejecting.spool_name])
    assert [r.sop_uid for r in parts.store.instances(STUDY) if r.rejected_for == "113037"] == [f"{SERIES}.1"]
    assert parts.counter("ingest_rejections_total", code="113037") == 1


def test_rows_an_instance_arriving_after_a_retention_rejection_loses_its_bytes(parts: Parts) -> None:
    note = iocm.note(STUDY, [(SERIES, f"{SERIES}.1")], code="113039")
    parts.admission.admit([_as_row(parts.candidate(note))])
    late = _as_row(parts.candidate(iocm.image(STUDY, SERIES, f"{SERIES}.1")))
    spared = _as_row(parts.candidate(iocm.image(STUDY, SERIES, f"{SERIES}.2")))  # not named by the note
    assert [a.outcome for a in parts.admission.admit([late, spared])] == [Verdict.ADDED, Verdict.ADDED]
    assert late.spool_name not in parts.spool.names()
    assert spared.spool_name in parts.spool.names()


def test_rows_a_note_from_a_sender_that_may_not_reject_is_refused(tmp_path: Path) -> None:
    p = Parts(tmp_path, "quarantine", senders=(CallingAE(ae="MOD"),))
    try:
        note = _as_row(p.candidate(iocm.note(STUDY, [(SERIES, f"{SERIES}.1")], code="113037")))
        (admitted,) = p.admission.admit([note])
        assert (admitted.outcome, admitted.rule) == (Verdict.CONFLICT, "rejection_not_allowed")
    finally:
        p.store.close()


def test_rows_replace_keeps_the_new_version(replacing: Parts) -> None:
    sop = f"{SERIES}.1"
    first = iocm.image(STUDY, SERIES, sop, AccessionNumber="A1")
    replacing.admission.admit([_as_row(replacing.candidate(first))])
    newer = _as_row(replacing.candidate(iocm.image(STUDY, SERIES, sop, AccessionNumber="A2")))
    (admitted,) = replacing.admission.admit([newer])
    assert admitted.outcome is Verdict.ADDED and admitted.rule == "replaced"
    (record,) = replacing.store.instances(STUDY)
    assert record.accession_number == "A2"
