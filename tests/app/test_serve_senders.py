"""One sender acting on another's patients, through a real ``ingest serve`` child process and pynetdicom
SCUs with their own AE titles: IOCM rejection notes (``reject = true``), replacements (``[intake]
on_conflict = "replace"``, ``replace = true``) and Storage Commitment between allowed AEs.

``AE_A`` sends study A (and commits it); ``AE_B`` may send rejections; ``AE_M`` may do neither; ``AE_C``
may replace. Expected statuses: 0x0000 success, 0xC010 the conflict status; Failure Reason 0x0112 (no such
object instance, PS3.3 C.14.1.1)."""

from __future__ import annotations

import io
import json
import queue
import shutil
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_role, evt

from ingest.sources.dimse.commitment import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH
from tests import iocm
from tests.app.test_serve_dcmtk import Serve, _free_ports, _prometheus, _wait_for
from tests.app.test_serve_lifecycle import _listed, _log, _resource

pytestmark = [
    pytest.mark.dcmtk,  # Serve waits for the listener with echoscu
    pytest.mark.skipif(shutil.which("echoscu") is None, reason="dcmtk echoscu not installed"),
]

SENDERS = [
    {"ae": "AE_A"},
    {"ae": "AE_B", "reject": True},
    {"ae": "AE_M"},
    {"ae": "AE_C", "replace": True},
]


def _send(port: int, ae_title: str, *files: bytes) -> list[int]:
    """C-STORE each of ``files`` from ``ae_title``; the statuses."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(iocm.CT, ExplicitVRLittleEndian)
    ae.add_requested_context(iocm.KOS, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="INGEST")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(dcmread(io.BytesIO(data))).Status) for data in files]
    finally:
        assoc.release()


def _commit(port: int, ae_title: str, transaction: str, sops: Sequence[str]) -> Dataset:
    """A Storage Commitment request from ``ae_title``; the report's event information (same association)."""
    reports: queue.Queue[Dataset] = queue.Queue()

    def on_report(event: Any) -> tuple[int, None]:
        reports.put(event.event_information)
        return 0x0000, None

    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH, ExplicitVRLittleEndian)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="INGEST",
        ext_neg=[build_role(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)],
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
    )
    assert assoc.is_established
    try:
        info = Dataset()
        info.TransactionUID = transaction
        refs = []
        for sop in sops:
            item = Dataset()
            item.ReferencedSOPClassUID = iocm.CT
            item.ReferencedSOPInstanceUID = sop
            refs.append(item)
        info.ReferencedSOPSequence = DicomSequence(refs)
        status, _ = assoc.send_n_action(info, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE)
        assert status.Status == 0x0000
        return reports.get(timeout=30)
    finally:
        assoc.release()


def _outcome(info: Dataset) -> tuple[list[str], dict[str, int]]:
    committed = [str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])]
    failed = {
        str(i.ReferencedSOPInstanceUID): int(i.FailureReason) for i in info.get("FailedSOPSequence", [])
    }
    return committed, failed


def _bytes_kept(s: Serve, sop: str) -> bool:
    """Whether the instance's accepted bytes are still held (in its row, or its spool file on disk)."""
    with sqlite3.connect(s.data / "state.sqlite3") as db:
        row = db.execute("SELECT spool_name, bytes_removed_at FROM instances WHERE sop_uid = ?",
                         (sop,)).fetchone()
        inline = db.execute("SELECT 1 FROM instance_bytes WHERE sop_uid = ?", (sop,)).fetchone()
    assert row is not None
    spooled = row[0] is not None and (s.data / "spool" / row[0]).is_file()
    return row[1] is None and (spooled or inline is not None)


def _quarantine_reasons(s: Serve) -> list[str]:
    return sorted(json.loads(p.read_text())["rule"] for p in (s.data / "quarantine").glob("*.json"))


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Serve]:
    monkeypatch.setenv("INGEST_LISTENER__ALLOWED_CALLING_AES", json.dumps(SENDERS))
    monkeypatch.setenv("INGEST_INTAKE__ON_CONFLICT", "replace")
    s = Serve(tmp_path / "data", *_free_ports())
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_one_sender_cannot_act_on_anothers_patients(served: Serve) -> None:
    s = served
    port = s.dicom_port
    study_a = iocm.uid()
    series_a = f"{study_a}.1"
    a1, a2 = f"{series_a}.1", f"{series_a}.2"
    images = [iocm.image(study_a, series_a, sop, number=n) for n, sop in enumerate((a1, a2), start=1)]
    assert _send(port, "AE_A", *images) == [0x0000, 0x0000]
    assert _wait_for(lambda: _listed(_resource(s, study_a)) == {series_a: [a1, a2]}, 30), _log(s)
    assert _outcome(_commit(port, "AE_A", iocm.uid(), [a1, a2])) == ([a1, a2], {})  # held 30 days

    # Storage Commitment: AE_B learns nothing about what AE_A sent (as if never received)
    assert _outcome(_commit(port, "AE_B", iocm.uid(), [a1, a2])) == ([], {a1: 0x0112, a2: 0x0112})

    # AE_B (reject = true) in its own study, another Patient ID, naming study A's instances: refused
    other = iocm.note(iocm.uid(), [(series_a, a1), (series_a, a2)], code="113037", evidence_study=study_a,
                      PatientID="OTHER-PATIENT")
    assert _send(port, "AE_B", other) == [0xC010]
    # AE_M (no reject) with study A's own Patient ID: refused as well
    unallowed = iocm.note(study_a, [(series_a, a1)], code="113037")
    assert _send(port, "AE_M", unallowed) == [0xC010]
    assert _quarantine_reasons(s) == ["rejection_not_allowed", "rejection_patient_mismatch"]
    resource = _resource(s, study_a)
    assert resource is not None and resource["status"] != "entered-in-error"
    assert _listed(resource) == {series_a: [a1, a2]}
    assert _bytes_kept(s, a1) and _bytes_kept(s, a2)
    samples = _prometheus(s.admin("/metrics")[1])
    assert samples['ingest_instances_rejected_total{reason="rejection_not_allowed"}'] == 1
    assert samples['ingest_instances_rejected_total{reason="rejection_patient_mismatch"}'] == 1

    # AE_B with study A's Patient ID: applied; a1 leaves the study, but its committed bytes stay
    assert _send(port, "AE_B", iocm.note(study_a, [(series_a, a1)], code="113037")) == [0x0000]
    assert _wait_for(lambda: _listed(_resource(s, study_a)) == {series_a: [a2]}, 30), _log(s)
    assert _bytes_kept(s, a1)

    # a note naming instances another AE sends later, for another patient: those are stored and listed
    study_l = iocm.uid()
    series_l = f"{study_l}.1"
    later = [f"{series_l}.1", f"{series_l}.2"]
    ahead = iocm.note(study_l, [(series_l, sop) for sop in later], code="113037", PatientID="P-NOTE")
    assert _send(port, "AE_B", ahead) == [0x0000]
    arriving = [iocm.image(study_l, series_l, sop, number=n, PatientID="P-IMAGES")
                for n, sop in enumerate(later, start=1)]
    assert _send(port, "AE_A", *arriving) == [0x0000, 0x0000]
    assert _wait_for(lambda: _listed(_resource(s, study_l)) == {series_l: later}, 30), _log(s)
    assert all(_bytes_kept(s, sop) for sop in later)


def test_a_replacement_needs_the_original_sender_or_replace(served: Serve) -> None:
    s = served
    port = s.dicom_port
    study = iocm.uid()
    series = f"{study}.1"
    sop = f"{series}.1"
    assert _send(port, "AE_A", iocm.image(study, series, sop, StudyDescription="Original")) == [0x0000]
    assert _wait_for(lambda: (_resource(s, study) or {}).get("description") == "Original", 30), _log(s)
    # another AE, another Patient ID: refused with the conflict status, the original kept
    moved = iocm.image(study, series, sop, StudyDescription="Moved", PatientID="OTHER-PATIENT")
    assert _send(port, "AE_M", moved) == [0xC010]
    assert "replace_other_sender" in _quarantine_reasons(s)
    with sqlite3.connect(s.data / "state.sqlite3") as db:
        (record,) = db.execute("SELECT record_json FROM instances WHERE sop_uid = ?", (sop,)).fetchone()
    assert json.loads(record)["patient_id"] == "IOCM-0001"
    # an AE with replace = true may, and the change of patient is logged at WARNING without the IDs
    fixed = iocm.image(study, series, sop, StudyDescription="Fixed", PatientID="NEW-PATIENT")
    assert _send(port, "AE_C", fixed) == [0x0000]
    assert _wait_for(lambda: (_resource(s, study) or {}).get("description") == "Fixed", 30), _log(s)
    log = (s.data / "serve.log").read_text()
    warning = [line for line in log.splitlines() if "another patient" in line]
    assert warning and "WARNING" in warning[0] and sop in warning[0]
    assert "NEW-PATIENT" not in log and "IOCM-0001" not in log
