"""Synthetic DICOM for the study lifecycle tests: small CT images and IOCM rejection notes (Key Object
Selection Documents, PS3.3 A.35.4, with the Current Requested Procedure Evidence of IHE RAD IOCM), built
with pydicom. Every value is made up."""

from __future__ import annotations

import io
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
