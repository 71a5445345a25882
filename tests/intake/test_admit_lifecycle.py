"""The acceptance path's study lifecycle (ingest.intake.admit): IOCM notes removing bytes, counting
rejections, and ``[intake] on_conflict = "replace"``. Real SQLite store, spool and quarantine folders."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ingest.adapters.dicomfile import read_header_bytes
from ingest.adapters.spool import Quarantine, Spool
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.config import CallingAE
from ingest.intake.admit import Admission, Candidate
from ingest.metrics import Metrics
from ingest.ports import AddOutcome
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
            stable_age_s=30, wake=self.wake, clock=lambda: T0, label="dimse", on_conflict=on_conflict,
            senders=(CallingAE(ae="MOD", reject=True),) if senders is None else senders,
        )

    def wake(self) -> None:
        self.wakes += 1

    def candidate(self, data: bytes) -> Candidate:
        parsed = read_header_bytes(data, source="test")
        kept = self.spool.write(data)
        return Candidate(parsed.record, parsed.digest, "dimse:MOD", spool_name=kept.name, body=data)

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
    assert admitted.outcome is AddOutcome.ADDED
    # the rejected instance's bytes are gone, its row stays; the other image and the note keep theirs
    assert sorted(parts.spool.names()) == sorted([images[1].spool_name, rejecting.spool_name])
    assert [r.sop_uid for r in parts.store.instances(STUDY) if r.rejected_for == "113037"] == [f"{SERIES}.1"]
    assert parts.counter("ingest_rejections_total", code="113037") == 1
    assert parts.counter("ingest_spool_released_total", reason="iocm:113037") == 1


def test_an_instance_arriving_after_a_retention_rejection_loses_its_bytes(parts: Parts) -> None:
    parts.admission.admit([parts.candidate(iocm.note(STUDY, [(SERIES, f"{SERIES}.1")], code="113039"))])
    late = parts.candidate(iocm.image(STUDY, SERIES, f"{SERIES}.1"))
    (admitted,) = parts.admission.admit([late])
    assert admitted.outcome is AddOutcome.ADDED  # acknowledged: the sender is not at fault
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
    assert admitted.outcome is AddOutcome.ADDED and admitted.rule == "replaced"  # the sender gets success
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
    assert replacing.wakes == 2
    row = replacing.store.study(STUDY)
    assert row is not None and row.dirty


def test_replace_never_moves_an_instance_to_another_study(replacing: Parts) -> None:
    sop = f"{SERIES}.1"
    replacing.admission.admit([replacing.candidate(iocm.image(STUDY, SERIES, sop))])
    other = "1.2.826.0.1.3680043.2.1125.91"
    (admitted,) = replacing.admission.admit([replacing.candidate(iocm.image(other, f"{other}.1", sop))])
    assert admitted.outcome is AddOutcome.CONFLICT and admitted.rule == "other_study"
    assert [r.study_uid for r in replacing.store.instances(STUDY)] == [STUDY]


def test_quarantine_mode_still_refuses_other_content(parts: Parts) -> None:
    sop = f"{SERIES}.1"
    parts.admission.admit([parts.candidate(iocm.image(STUDY, SERIES, sop, StudyDescription="A"))])
    second = parts.candidate(iocm.image(STUDY, SERIES, sop, StudyDescription="B"))
    (admitted,) = parts.admission.admit([second])
    assert admitted.outcome is AddOutcome.CONFLICT and admitted.rule == "other_content"
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
