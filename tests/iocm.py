"""Synthetic DICOM for the study lifecycle tests: small CT images and IOCM rejection notes (Key Object
Selection Documents, PS3.3 A.35.4, with the Current Requested Procedure Evidence of IHE RAD IOCM), built
with pydicom. Every value is made up."""

from __future__ import annotations

import io
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
KOS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage

#: The rejection titles of PS3.16 CID 7011 (DCM), code value -> code meaning.
TITLES = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
    "113000": "Of Interest",  # not a rejection: an ordinary key object selection
}


def uid() -> str:
    """A fresh UID under 2.25 (a UUID as an integer)."""
    return f"2.25.{uuid.uuid4().int}"


def _file(ds: Dataset) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _common(ds: Dataset, study: str, series: str, sop: str, sop_class: str, **attrs: Any) -> None:
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = "IOCM-0001"
    ds.PatientName = "Test^Lifecycle"
    ds.StudyDate = "20240301"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC-IOCM-1"
    ds.StudyDescription = "Lifecycle test"
    for key, value in attrs.items():
        setattr(ds, key, value)


def image(
    study: str, series: str, sop: str, *, number: int = 1, series_number: int = 1, **attrs: Any
) -> bytes:
    """A small CT image (8x8 pixels) of ``study`` / ``series``."""
    ds = Dataset()
    _common(ds, study, series, sop, CT, Modality="CT", SeriesNumber=series_number, InstanceNumber=number)
    ds.SeriesDescription = f"Series {series_number}"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(64))
    for key, value in attrs.items():
        setattr(ds, key, value)
    return _file(ds)


def note(
    study: str,
    rejected: Sequence[tuple[str, str]],
    *,
    code: str = "113001",
    sop: str | None = None,
    series: str | None = None,
    evidence_study: str | None = None,
    **attrs: Any,
) -> bytes:
    """A Key Object Selection Document titled ``(code, DCM)`` whose evidence names ``rejected``
    (``(series UID, SOP Instance UID)`` pairs, CT images) of ``evidence_study`` (default ``study``);
    ``attrs`` set other attributes (``PatientID``...)."""
    ds = Dataset()
    _common(ds, study, series or generate_uid(), sop or generate_uid(), KOS, Modality="KO", SeriesNumber=99,
            InstanceNumber=1, **attrs)
    title = Dataset()
    title.CodeValue = code
    title.CodingSchemeDesignator = "DCM"
    title.CodeMeaning = TITLES[code]
    ds.ConceptNameCodeSequence = DicomSequence([title])
    ds.ValueType = "CONTAINER"
    by_series: dict[str, list[str]] = {}
    for series_uid, sop_uid in rejected:
        by_series.setdefault(series_uid, []).append(sop_uid)
    item = Dataset()
    item.StudyInstanceUID = evidence_study or study
    refs = []
    for series_uid, sops in by_series.items():
        ref = Dataset()
        ref.SeriesInstanceUID = series_uid
        entries = []
        for sop_uid in sops:
            entry = Dataset()
            entry.ReferencedSOPClassUID = CT
            entry.ReferencedSOPInstanceUID = sop_uid
            entries.append(entry)
        ref.ReferencedSOPSequence = DicomSequence(entries)
        refs.append(ref)
    item.ReferencedSeriesSequence = DicomSequence(refs)
    ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence([item])
    return _file(ds)


def write(folder: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to ``folder/name`` (the folder created) and return the path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element (PS3.5 7.1.2), its value padded to even length."""
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr == b"SQ":
        return struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _item(content: bytes) -> bytes:
    return struct.pack("<HHL", 0xFFFE, 0xE000, len(content)) + content


def large_note(study: str, series: str, count: int, *, sop: str | None = None, code: str = "113001") -> bytes:
    """A rejection note (as :func:`note`) naming ``count`` CT instances ``<series>.1`` ...
    ``<series>.<count>`` of one series, its evidence encoded directly (pydicom would need ~4 KiB per
    item to build it): the size of a note naming a whole large study."""
    head = note(study, [], code=code, sop=sop)
    at = head.rindex(struct.pack("<HH2s", 0x0040, 0xA375, b"SQ"))  # the evidence is the last element
    ct = _element(0x00081150, b"UI", CT.encode())
    sops = b"".join(
        _item(ct + _element(0x00081155, b"UI", f"{series}.{n}".encode())) for n in range(1, count + 1)
    )
    series_item = _item(_element(0x00081199, b"SQ", sops) + _element(0x0020000E, b"UI", series.encode()))
    study_item = _item(_element(0x00081115, b"SQ", series_item) + _element(0x0020000D, b"UI", study.encode()))
    return head[:at] + _element(0x0040A375, b"SQ", study_item)
