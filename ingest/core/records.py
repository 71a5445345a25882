"""Frozen records that carry what the mapping needs from one DICOM instance.

A pydicom ``Dataset`` never travels past :func:`ingest.core.extract.extract`; from there on only these
small, JSON-serialisable records move (into the state store, across processes, into the mapping).
Dates and times are kept as the raw DICOM strings (DA/TM/DT); the mapping normalises them, because the
result depends on settings (site time zone). Person names are decoded to Unicode per component group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BackendStudy", "Code", "InstanceRecord", "OrderReference", "PersonName", "RecordRow", "SopReference",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PersonName(_Frozen):
    """A DICOM PN value decoded with the dataset's Specific Character Set.

    Each group keeps DICOM's ``^``-separated components
    (family^given^middle^prefix^suffix), exactly as decoded.
    """

    alphabetic: str = ""
    ideographic: str = ""
    phonetic: str = ""


class Code(_Frozen):
    """A coded entry from a DICOM code sequence item."""

    designator: str  # Coding Scheme Designator (0008,0102)
    value: str  # Code Value (0008,0100) / Long Code Value / URN Code Value
    meaning: str | None = None  # Code Meaning (0008,0104)
    version: str | None = None  # Coding Scheme Version (0008,0103)


class SopReference(_Frozen):
    """One instance a Key Object Selection Document names in its evidence (0040,A375): the item's
    Study Instance UID, the Referenced Series item's Series Instance UID and the Referenced SOP
    Instance UID (0008,1155)."""

    study_uid: str
    series_uid: str
    sop_uid: str


class OrderReference(_Frozen):
    """One Request Attributes Sequence (0040,0275) item: the identifiers of the order (the imaging service
    request and its requested procedure) that the series answers."""

    accession_number: str | None = None  # (0008,0050) in the item
    accession_issuer_uid: str | None = None  # (0008,0051) > (0040,0032)
    accession_issuer_uid_type: str | None = None  # (0008,0051) > (0040,0033)
    accession_issuer_local: str | None = None  # (0008,0051) > (0040,0031)
    requested_procedure_id: str | None = None  # (0040,1001)
    placer_order_number: str | None = None  # (0040,2016) Placer Order Number / Imaging Service Request
    filler_order_number: str | None = None  # (0040,2017) Filler Order Number / Imaging Service Request


class InstanceRecord(_Frozen):
    """Everything ``ingest`` keeps from one accepted instance's header."""

    # identity (acceptance: all four valid per the DICOM UID grammar)
    study_uid: str  # (0020,000D)
    series_uid: str  # (0020,000E)
    sop_uid: str  # (0008,0018)
    sop_class_uid: str  # (0008,0016)
    transfer_syntax_uid: str | None = None  # (0002,0010)

    # patient (PHI: never logged above DEBUG)
    patient_id: str | None = None  # (0010,0020)
    patient_id_issuer: str | None = None  # (0010,0021)
    patient_id_issuer_uid: str | None = None  # (0010,0024) > Universal Entity ID (0040,0032)
    patient_id_issuer_uid_type: str | None = None  # (0010,0024) > Universal Entity ID Type (0040,0033)
    patient_name: PersonName | None = None  # (0010,0010)
    patient_sex: str | None = None  # (0010,0040)
    patient_birth_date: str | None = None  # (0010,0030) raw DA

    # study
    study_date: str | None = None  # (0008,0020) raw DA
    study_time: str | None = None  # (0008,0030) raw TM
    timezone_offset: str | None = None  # (0008,0201) raw "+HHMM"
    accession_number: str | None = None  # (0008,0050)
    accession_issuer_uid: str | None = None  # (0008,0051) > (0040,0032)
    accession_issuer_uid_type: str | None = None  # (0008,0051) > (0040,0033)
    accession_issuer_local: str | None = None  # (0008,0051) > Local Namespace Entity ID (0040,0031)
    study_id: str | None = None  # (0020,0010)
    study_description: str | None = None  # (0008,1030)
    referring_physician: PersonName | None = None  # (0008,0090)
    reading_physicians: tuple[PersonName, ...] = ()  # (0008,1060)
    procedure_codes: tuple[Code, ...] = ()  # (0008,1032)
    reason_text: str | None = None  # (0040,1002)
    reason_codes: tuple[Code, ...] = ()  # (0040,100A)
    # the visit: Admission ID (0038,0010) + Issuer of Admission ID Sequence (0038,0014)
    admission_id: str | None = None
    admission_issuer_uid: str | None = None  # (0038,0014) > (0040,0032)
    admission_issuer_uid_type: str | None = None  # (0038,0014) > (0040,0033)
    admission_issuer_local: str | None = None  # (0038,0014) > (0040,0031)
    # (0008,0096) Referring Physician Identification Sequence > (0040,1101) Person Identification Code
    # Sequence: the referrer's identifiers, as codes (value and the scheme that issued it)
    referrer_ids: tuple[Code, ...] = ()

    # series
    modality: str | None = None  # (0008,0060)
    series_number: int | None = None  # (0020,0011)
    series_description: str | None = None  # (0008,103E)
    body_part: str | None = None  # (0018,0015)
    laterality: str | None = None  # (0020,0060), else (0020,0062)
    series_date: str | None = None  # (0008,0021) raw DA
    series_time: str | None = None  # (0008,0031) raw TM
    performing_physicians: tuple[PersonName, ...] = ()  # (0008,1050)
    operators: tuple[PersonName, ...] = ()  # (0008,1070)
    requests: tuple[OrderReference, ...] = ()  # (0040,0275) Request Attributes Sequence

    # instance
    instance_number: int | None = None  # (0020,0013)
    content_label: str | None = None  # (0070,0080)
    number_of_frames: int | None = None  # (0028,0008), multi-frame images
    concept_name: str | None = None  # (0040,A043) > (0008,0104), SR documents
    # (0040,A043) first item as a code: the document title of a Key Object Selection Document, which
    # makes it an IOCM rejection note (ingest.core.lifecycle); read for KOS instances only
    concept_code: Code | None = None
    # (0040,A375) Current Requested Procedure Evidence > (0008,1115) > (0008,1199): the instances a KOS
    # names; read for KOS instances only
    evidence: tuple[SopReference, ...] = ()

    # non-fatal problems found while reading optional tags (no patient data in them)
    warnings: tuple[str, ...] = ()

    # state, not header: the rejection code (DCM 113001...) of an IOCM rejection covering this instance,
    # set by the state store when it reads a study back (ingest.core.lifecycle); never stored
    rejected_for: str | None = Field(default=None, exclude=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> InstanceRecord:
        """The record a state store row holds as JSON (``record_json``).

        Validated from UTF-8 bytes: pydantic reads JSON given as a ``str`` that holds non-ASCII text
        (names in other scripts) markedly slower than the same JSON as bytes, and a study's records are
        read back at every push.
        """
        return cls.model_validate_json(text.encode("utf-8") if isinstance(text, str) else text)


@dataclass(frozen=True, slots=True)
class RecordRow:
    """An instance's record as the state store keeps it: the columns it is found by and the JSON of its
    :class:`InstanceRecord` (``record_json``).

    Made where the header is read (a parsing process of ``ingest replay``), it crosses to the process
    that stores it as a few strings, and is stored as it is: no model is built per file there. The record
    itself is validated from the JSON when something needs more than these columns (a rejection note, a
    conflict), and once per study when the relay maps it. A row made in this process keeps the record
    it was made from (:meth:`record` returns it); pickled, it is the six strings only.
    """

    study_uid: str  # (0020,000D)
    series_uid: str  # (0020,000E)
    sop_uid: str  # (0008,0018)
    sop_class_uid: str  # (0008,0016)
    study_date: str | None  # (0008,0020) raw DA, for ``--since``
    json: str
    made_from: InstanceRecord | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, record: InstanceRecord | RecordRow) -> RecordRow:
        """The row of ``record`` (a row is its own)."""
        if isinstance(record, RecordRow):
            return record
        return cls(record.study_uid, record.series_uid, record.sop_uid, record.sop_class_uid,
                   record.study_date, record.model_dump_json(), record)

    def record(self) -> InstanceRecord:
        """The record: the one the row was made from, or validated from :attr:`json`."""
        return self.made_from if self.made_from is not None else InstanceRecord.from_json(self.json)

    def __reduce__(self) -> tuple[type[RecordRow], tuple[str, str, str, str, str | None, str]]:
        return RecordRow, (self.study_uid, self.series_uid, self.sop_uid, self.sop_class_uid,
                           self.study_date, self.json)


@dataclass(frozen=True)
class BackendStudy:
    """An ImagingStudy as the backend holds it (FHIR JSON); what the merge plans against and what the
    ``Sink`` port (:mod:`ingest.ports`) returns."""

    id: str
    version_id: str | None
    resource: dict[str, Any] = field(default_factory=dict)
