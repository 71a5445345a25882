"""The evidence of a Key Object Selection Document (0040,A375) as ingest.adapters.dicomfile walks it: the
same references and warnings pydicom's reading gives, a cap on the instances one note may name, checked
while walking, and memory that follows the references kept rather than the note's size."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import pydicom
import pydicom.config
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from ingest.adapters.dicomfile import DEFAULT_MAX_REJECTION_ITEMS, read_header, read_header_bytes
from ingest.config import ListenerSettings
from ingest.core.extract import extract
from ingest.core.records import SopReference
from ingest.errors import TooManyReferencesError
from tests import iocm

STUDY = "1.2.826.0.1.3680043.2.1125.71"
SERIES = f"{STUDY}.1"
NOTE = f"{STUDY}.99.1"


def _refs(count: int) -> list[SopReference]:
    """What a :func:`iocm.large_note` of ``count`` instances names, in SOP Instance UID order."""
    uids = sorted(f"{SERIES}.{n}" for n in range(1, count + 1))
    return [SopReference(study_uid=STUDY, series_uid=SERIES, sop_uid=uid) for uid in uids]


@pytest.mark.parametrize("how", ["bytes", "file", "windowed"])
def test_a_note_naming_one_instance_more_than_the_cap_is_refused(tmp_path: Path, how: str) -> None:
    path = tmp_path / "note.dcm"

    def read(count: int, cap: int) -> tuple[SopReference, ...]:
        data = iocm.large_note(STUDY, SERIES, count, sop=NOTE)
        path.write_bytes(data)
        if how == "bytes":
            return read_header_bytes(data, source="note", max_rejection_items=cap).record.evidence
        large = 0 if how == "windowed" else None  # windowed: as a data set spilled to disk is read
        return read_header(path, max_rejection_items=cap, large_file_bytes=large).record.evidence

    assert list(read(10, 10)) == _refs(10)
    with pytest.raises(TooManyReferencesError) as caught:
        read(11, 10)
    assert caught.value.reason == "too_many_references"
    assert caught.value.uid == NOTE
    message = str(caught.value)
    assert "more than 10 instances" in message and "max_rejection_items" in message
    assert "(0040,A375)" in message


def test_the_default_cap_is_100000_instances_and_the_setting_defaults_to_it(tmp_path: Path) -> None:
    assert DEFAULT_MAX_REJECTION_ITEMS == ListenerSettings().max_rejection_items == 100_000
    path = tmp_path / "note.dcm"
    path.write_bytes(iocm.large_note(STUDY, SERIES, 300_001, sop=NOTE))
    with pytest.raises(TooManyReferencesError, match="more than 100000 instances"):
        read_header(path)
    path.write_bytes(iocm.large_note(STUDY, SERIES, 100_000, sop=NOTE))
    assert len(read_header(path).record.evidence) == 100_000


def test_a_300001_instance_note_is_refused_without_its_items_being_made(tmp_path: Path) -> None:
    # the note of the finding (300,001 instances; 25 MiB here with short UIDs), read as the listener reads
    # a data set it spilled to disk; with a cap of 10,000 at most 10,001 items are ever looked at
    path = tmp_path / "note.dcm"
    path.write_bytes(iocm.large_note(STUDY, SERIES, 300_001, sop=NOTE))
    tracemalloc.start()
    try:
        with pytest.raises(TooManyReferencesError):
            read_header(path, large_file_bytes=0, max_rejection_items=10_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024**2, f"peak {peak / 2**20:.1f} MiB"


def test_a_note_under_the_cap_costs_memory_for_its_references_not_for_pydicom_items() -> None:
    # 20,000 references (a 1.6 MiB note): the record keeps them (about 0.6 KiB each), the digest hashes
    # them as it walks; below 1 KiB per reference in all, where pydicom items for them cost 2.4 KiB
    data = iocm.large_note(STUDY, SERIES, 20_000, sop=NOTE)
    tracemalloc.start()
    try:
        record = read_header_bytes(data, source="note").record
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(record.evidence) == 20_000
    assert peak < 20_000 * 1024, f"peak {peak / 2**20:.1f} MiB"


def _note_ds(**kw: object) -> Dataset:
    with pydicom.config.disable_value_validation():  # a sender's invalid UIDs, written as they are
        data = iocm.note(
            STUDY,
            [(SERIES, f"{SERIES}.2"), (SERIES, f"{SERIES}.1"), (SERIES, "1.02.3"),
             (f"{STUDY}.2", f"{STUDY}.2.1"), ("1..2", f"{STUDY}.3.1"), (SERIES, f"{SERIES}.1")],
            sop=NOTE,
        )
    return pydicom.dcmread(io.BytesIO(data))


def _save(ds: Dataset, ts: str) -> bytes:
    ds.file_meta.TransferSyntaxUID = ts
    buf = io.BytesIO()
    with pydicom.config.disable_value_validation():
        if ts == ExplicitVRBigEndian:  # written from the decoded values (pydicom re-encodes them)
            pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=False, force_encoding=True)
        else:
            ds.save_as(buf, implicit_vr=ts == ImplicitVRLittleEndian, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("encoding", ["defined", "undefined", "implicit", "big_endian", "un", "no_study_uid"])
def test_the_walked_evidence_is_what_pydicom_reads(tmp_path: Path, encoding: str) -> None:
    ds = _note_ds()
    ts = "1.2.840.10008.1.2.1"
    evidence = ds.CurrentRequestedProcedureEvidenceSequence
    if encoding == "undefined":
        evidence.is_undefined_length = True
        for item in evidence:
            item.is_undefined_length_sequence_item = True
            item.ReferencedSeriesSequence.is_undefined_length = True
            for series in item.ReferencedSeriesSequence:
                series.is_undefined_length_sequence_item = True
                series.ReferencedSOPSequence.is_undefined_length = True
    elif encoding == "implicit":
        ts = ImplicitVRLittleEndian
    elif encoding == "big_endian":
        ts = ExplicitVRBigEndian
    elif encoding == "no_study_uid":
        del evidence[0].StudyInstanceUID
    data = _save(ds, ts)
    if encoding == "un":  # the evidence sent as UN (PS3.5 6.2.2: its content Implicit VR Little Endian)
        implicit = pydicom.dcmread(io.BytesIO(_save(_note_ds(), ImplicitVRLittleEndian)), force=True)
        raw = implicit.get_item(0x0040A375).value
        at = data.rindex(b"\x40\x00\x75\xa3SQ")
        data = data[:at] + b"\x40\x00\x75\xa3UN\0\0" + len(raw).to_bytes(4, "little") + raw
    expected = extract(pydicom.dcmread(io.BytesIO(data)), source="note")
    for path_or_bytes in ("bytes", "windowed"):
        if path_or_bytes == "bytes":
            record = read_header_bytes(data, source="note").record
        else:
            path = tmp_path / "note.dcm"
            path.write_bytes(data)
            record = read_header(path, large_file_bytes=0, media_sop_class=True).record
        assert record.evidence == expected.evidence
        assert record.warnings == expected.warnings
    assert len(expected.evidence) == (0 if encoding == "no_study_uid" else 3)


def test_an_evidence_that_is_not_a_sequence_is_dropped_with_a_warning() -> None:
    data = _save(_note_ds(), "1.2.840.10008.1.2.1")
    at = data.rindex(b"\x40\x00\x75\xa3SQ")
    data = data[:at] + b"\x40\x00\x75\xa3SQ\0\0" + (16).to_bytes(4, "little") + b"\x01" * 16
    record = read_header_bytes(data, source="note").record
    assert record.evidence == ()
    assert any("(0040,A375): undecodable value dropped" in w for w in record.warnings)
