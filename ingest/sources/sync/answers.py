"""Query answers -> the core's :class:`~ingest.core.records.InstanceRecord` (no I/O).

One image-level answer, with the series-level answer of its series and the study-level answer of its
study, is one instance: their attributes are put into one data set (image over series over study) and
read by the core's :func:`~ingest.core.extract.extract`, as a received header is. What the PACS did not
answer (an attribute it left empty or did not return) stays absent: nothing is invented.

The record is admitted *metadata-only* (:data:`ingest.core.admission.METADATA_SCHEME`): its digest is
``m1:`` and the SHA-256 of the record, so the same answers again are an identical duplicate.
"""

from __future__ import annotations

import hashlib
from typing import Final

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from ingest.core.admission import METADATA_SCHEME
from ingest.core.extract import extract
from ingest.core.records import InstanceRecord

__all__ = [
    "IMAGE_KEYS",
    "SERIES_KEYS",
    "STUDY_KEYS",
    "SeriesRecords",
    "identifier",
    "metadata_digest",
    "record_of",
]

#: Return keys asked at each level (Study Root, PS3.4 C.6.2; QIDO-RS includefield).
STUDY_KEYS: Final = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "TimezoneOffsetFromUTC", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "PatientID", "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "PatientName", "PatientSex", "PatientBirthDate", "StudyID",
    "StudyDescription", "ReferringPhysicianName", "NameOfPhysiciansReadingStudy", "ProcedureCodeSequence",
    "ReasonForTheRequestedProcedure", "ReasonForRequestedProcedureCodeSequence",
    "NumberOfStudyRelatedInstances",
)
SERIES_KEYS: Final = (
    "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined", "Laterality",
    "SeriesDate", "SeriesTime", "PerformingPhysicianName", "OperatorsName",
)
IMAGE_KEYS: Final = (
    "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "NumberOfFrames", "ContentLabel",
    "ConceptNameCodeSequence",
)

# answer bookkeeping that is no attribute of the instance
_NOT_ATTRIBUTES: Final = frozenset({
    0x00080005,  # Specific Character Set (values here are already decoded)
    0x00080052,  # Query/Retrieve Level
    0x00080054,  # Retrieve AE Title
    0x00081190,  # Retrieve URL
    0x00080056,  # Instance Availability
    0x00201208,  # Number of Study Related Instances
    0x00201206,  # Number of Study Related Series
    0x00201209,  # Number of Series Related Instances
    0x00080061,  # Modalities in Study
})


def identifier(level: str, keys: tuple[str, ...], **matching: str) -> Dataset:
    """A C-FIND identifier: ``level``, every key of ``keys`` as an empty return key (sequences empty),
    and the ``matching`` keys' values."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for key in keys:
        setattr(ds, key, DicomSequence([]) if key.endswith("Sequence") else "")
    for key, value in matching.items():
        setattr(ds, key, value)
    return ds


def _empty(value: object) -> bool:
    if isinstance(value, (list, tuple, DicomSequence)):
        return len(value) == 0
    return value is None or value == ""


def record_of(study: Dataset, series: Dataset, image: Dataset, *, source: str) -> InstanceRecord:
    """One instance's record from its study, series and image answers (module doc).

    Raises
    ------
    HeaderError
        As :func:`~ingest.core.extract.extract` does (a UID missing or invalid in the answers...).
    """
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # every value below is decoded text already
    for answer in (study, series, image):
        for elem in answer:  # (iterating converts raw values with the answer's own character set)
            if elem.tag in _NOT_ATTRIBUTES or elem.tag.group == 0x0002 or _empty(elem.value):
                continue
            ds.add(elem)
    return extract(ds, source=source)


# The record's fields an image-level answer carries (everything else is the study's and the series').
_IMAGE_FIELDS: Final = (
    "sop_uid", "sop_class_uid", "transfer_syntax_uid", "instance_number", "content_label",
    "number_of_frames", "concept_name", "concept_code", "evidence",
)


class SeriesRecords:
    """The records of one series' image-level answers, as :func:`record_of` gives them, without reading
    the study's and the series' answers again for every instance: the first image is read whole, each
    other image alone (its own answer, with its own character set), its fields put on the first one's
    study and series fields."""

    def __init__(self, study: Dataset, series: Dataset, *, source: str) -> None:
        self.study = study
        self.series = series
        self.source = source
        self._base: InstanceRecord | None = None
        self._shared_warnings: tuple[str, ...] = ()

    def record(self, image: Dataset) -> InstanceRecord:
        """The record of ``image``; raises :class:`~ingest.errors.HeaderError` as :func:`record_of`."""
        if self._base is None:
            whole = record_of(self.study, self.series, image, source=self.source)
            own = extract(image, source=self.source)
            self._base = whole
            self._shared_warnings = tuple(w for w in whole.warnings if w not in own.warnings)
            return whole
        own = extract(image, source=self.source)
        if (own.study_uid, own.series_uid) != (self._base.study_uid, self._base.series_uid):
            return record_of(self.study, self.series, image, source=self.source)
        update = {name: getattr(own, name) for name in _IMAGE_FIELDS}
        update["warnings"] = tuple(dict.fromkeys((*self._shared_warnings, *own.warnings)))
        return self._base.model_copy(update=update)


def metadata_digest(record: InstanceRecord) -> str:
    """The digest of a metadata-only instance: ``m1:`` + SHA-256 of its record's JSON."""
    return f"{METADATA_SCHEME}:{hashlib.sha256(record.model_dump_json().encode()).hexdigest()}"
