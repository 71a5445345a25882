"""The title and evidence of a Key Object Selection Document, read by the header reader
(ingest.core.extract through ingest.adapters.dicomfile), for IOCM rejection notes."""

from __future__ import annotations

import io

import pydicom
import pydicom.config
from pydicom.uid import ImplicitVRLittleEndian

from ingest.adapters.dicomfile import read_header_bytes
from ingest.core.lifecycle import rejection_code
from ingest.core.records import Code, SopReference
from tests import iocm

STUDY = "1.2.826.0.1.3680043.2.1125.71"
SERIES = f"{STUDY}.1"


def test_a_rejection_note_gives_its_title_code_and_every_instance_it_names() -> None:
    named = [(SERIES, f"{SERIES}.2"), (SERIES, f"{SERIES}.1"), (f"{STUDY}.2", f"{STUDY}.2.1")]
    data = iocm.note(STUDY, named, code="113037", sop=f"{STUDY}.99.1")
    record = read_header_bytes(data, source="note.dcm").record
    assert record.concept_code == Code(designator="DCM", value="113037",
                                       meaning="Rejected for Patient Safety Reasons")
    assert record.concept_name == "Rejected for Patient Safety Reasons"
    assert record.evidence == (  # sorted by SOP Instance UID
        SopReference(study_uid=STUDY, series_uid=SERIES, sop_uid=f"{SERIES}.1"),
        SopReference(study_uid=STUDY, series_uid=SERIES, sop_uid=f"{SERIES}.2"),
        SopReference(study_uid=STUDY, series_uid=f"{STUDY}.2", sop_uid=f"{STUDY}.2.1"),
    )
    assert rejection_code(record) == "113037"
    assert record.warnings == ()


def test_implicit_vr_gives_the_same_record() -> None:
    data = iocm.note(STUDY, [(SERIES, f"{SERIES}.1")], sop=f"{STUDY}.99.2")
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=True)
    explicit = read_header_bytes(data, source="a").record
    implicit = read_header_bytes(buf.getvalue(), source="b").record
    assert implicit.evidence == explicit.evidence and implicit.concept_code == explicit.concept_code


def test_an_invalid_referenced_uid_is_dropped_with_a_warning() -> None:
    with pydicom.config.disable_value_validation():  # a sender's invalid UID, written as it is
        data = iocm.note(STUDY, [(SERIES, "1.02.3"), (SERIES, f"{SERIES}.1")], sop=f"{STUDY}.99.3")
    record = read_header_bytes(data, source="x").record
    assert [r.sop_uid for r in record.evidence] == [f"{SERIES}.1"]
    assert any("(0040,A375)" in w and "Referenced SOP Instance UID" in w for w in record.warnings)


def test_an_image_keeps_no_title_code_or_evidence() -> None:
    ds = pydicom.dcmread(io.BytesIO(iocm.note(STUDY, [(SERIES, f"{SERIES}.1")])))
    ds.SOPClassUID = iocm.CT  # the same sequences on an image are not read
    ds.file_meta.MediaStorageSOPClassUID = iocm.CT
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    record = read_header_bytes(buf.getvalue(), source="x").record
    assert record.concept_code is None and record.evidence == ()
