"""The declarative tag table: every DICOM attribute :class:`~ingest.core.records.InstanceRecord` needs.

One row per attribute: keyword, information-model level, whether a missing or invalid
value rejects the instance, and the record field it fills. :data:`HEADER_TAGS` is derived from the
table and handed to the reader (``dcmread(specific_tags=...)`` or the fast reader in
:mod:`ingest.adapters.dicomfile`), so nothing outside this table is ever decoded.

Sequence item attributes (code items, issuer items) are listed separately in :data:`ITEM_TAGS`; a
reader that filters top-level elements keeps whole sequences, so they are documentation and a check.
File meta information (group 0002) is read separately by the file reader.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Final

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.tag import BaseTag, Tag

__all__ = [
    "HEADER_TAGS",
    "ITEM_TAGS",
    "NON_PATIENT_SOP_CLASSES",
    "TAGS",
    "Level",
    "TagSpec",
    "tag_of",
]


class Level(enum.Enum):
    """The DICOM information-model level an attribute belongs to."""

    PATIENT = "patient"
    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"


@dataclass(frozen=True)
class TagSpec:
    """One row of the tag table.

    Parameters
    ----------
    keyword:
        The DICOM keyword (PS3.6), e.g. ``"StudyInstanceUID"``.
    level:
        Information-model level.
    required:
        ``True``: missing or invalid rejects the instance. ``False``: a bad value is dropped with a
        warning in :attr:`InstanceRecord.warnings`.
    field:
        The :class:`~ingest.core.records.InstanceRecord` field filled from it (``""`` for helper tags).
    """

    keyword: str
    level: Level
    required: bool
    field: str

    @property
    def tag(self) -> BaseTag:
        """The tag of :attr:`keyword`."""
        return tag_of(self.keyword)

    @property
    def vr(self) -> str:
        """The dictionary VR of :attr:`keyword`."""
        return str(dictionary_VR(self.tag))


@functools.cache
def tag_of(keyword: str) -> BaseTag:
    """Return the tag of a DICOM keyword.

    Parameters
    ----------
    keyword:
        A keyword from the PS3.6 data dictionary.

    Returns
    -------
    BaseTag
        The tag.

    Raises
    ------
    KeyError
        If pydicom's dictionary does not know the keyword.
    """
    value = tag_for_keyword(keyword)
    if value is None:
        raise KeyError(f"Unknown DICOM keyword {keyword!r}")
    return Tag(value)


_P, _ST, _SE, _I = Level.PATIENT, Level.STUDY, Level.SERIES, Level.INSTANCE

TAGS: Final[tuple[TagSpec, ...]] = (
    # keyword                                       level required record field
    # identity: acceptance needs all four (docs/architecture.md "Acceptance")
    TagSpec("StudyInstanceUID", _ST, True, "study_uid"),  # (0020,000D)
    TagSpec("SeriesInstanceUID", _SE, True, "series_uid"),  # (0020,000E)
    TagSpec("SOPInstanceUID", _I, True, "sop_uid"),  # (0008,0018)
    TagSpec("SOPClassUID", _I, True, "sop_class_uid"),  # (0008,0016)
    # character set of every text value below (PS3.5 6.1)
    TagSpec("SpecificCharacterSet", _I, False, ""),  # (0008,0005)
    # patient
    TagSpec("PatientID", _P, False, "patient_id"),  # (0010,0020)
    TagSpec("IssuerOfPatientID", _P, False, "patient_id_issuer"),  # (0010,0021)
    TagSpec("IssuerOfPatientIDQualifiersSequence", _P, False, "patient_id_issuer_uid"),  # (0010,0024)
    TagSpec("PatientName", _P, False, "patient_name"),  # (0010,0010)
    TagSpec("PatientSex", _P, False, "patient_sex"),  # (0010,0040)
    TagSpec("PatientBirthDate", _P, False, "patient_birth_date"),  # (0010,0030)
    # study
    TagSpec("StudyDate", _ST, False, "study_date"),  # (0008,0020)
    TagSpec("StudyTime", _ST, False, "study_time"),  # (0008,0030)
    TagSpec("TimezoneOffsetFromUTC", _ST, False, "timezone_offset"),  # (0008,0201)
    TagSpec("AccessionNumber", _ST, False, "accession_number"),  # (0008,0050)
    TagSpec("IssuerOfAccessionNumberSequence", _ST, False, "accession_issuer_uid"),  # (0008,0051)
    TagSpec("StudyID", _ST, False, "study_id"),  # (0020,0010)
    TagSpec("StudyDescription", _ST, False, "study_description"),  # (0008,1030)
    TagSpec("ReferringPhysicianName", _ST, False, "referring_physician"),  # (0008,0090)
    TagSpec("NameOfPhysiciansReadingStudy", _ST, False, "reading_physicians"),  # (0008,1060)
    TagSpec("ProcedureCodeSequence", _ST, False, "procedure_codes"),  # (0008,1032)
    TagSpec("ReasonForTheRequestedProcedure", _ST, False, "reason_text"),  # (0040,1002)
    TagSpec("ReasonForRequestedProcedureCodeSequence", _ST, False, "reason_codes"),  # (0040,100A)
    TagSpec("AdmissionID", _ST, False, "admission_id"),  # (0038,0010)
    TagSpec("IssuerOfAdmissionIDSequence", _ST, False, "admission_issuer_uid"),  # (0038,0014)
    TagSpec("ReferringPhysicianIdentificationSequence", _ST, False, "referrer_ids"),  # (0008,0096)
    # series
    TagSpec("Modality", _SE, False, "modality"),  # (0008,0060)
    TagSpec("SeriesNumber", _SE, False, "series_number"),  # (0020,0011)
    TagSpec("SeriesDescription", _SE, False, "series_description"),  # (0008,103E)
    TagSpec("BodyPartExamined", _SE, False, "body_part"),  # (0018,0015)
    TagSpec("Laterality", _SE, False, "laterality"),  # (0020,0060)
    TagSpec("ImageLaterality", _I, False, "laterality"),  # (0020,0062), used when (0020,0060) is absent
    TagSpec("SeriesDate", _SE, False, "series_date"),  # (0008,0021)
    TagSpec("SeriesTime", _SE, False, "series_time"),  # (0008,0031)
    TagSpec("PerformingPhysicianName", _SE, False, "performing_physicians"),  # (0008,1050)
    TagSpec("OperatorsName", _SE, False, "operators"),  # (0008,1070)
    TagSpec("RequestAttributesSequence", _SE, False, "requests"),  # (0040,0275)
    # instance
    TagSpec("InstanceNumber", _I, False, "instance_number"),  # (0020,0013)
    TagSpec("ContentLabel", _I, False, "content_label"),  # (0070,0080)
    TagSpec("NumberOfFrames", _I, False, "number_of_frames"),  # (0028,0008), multi-frame images
    TagSpec("ConceptNameCodeSequence", _I, False, "concept_name"),  # (0040,A043), SR documents
    # IOCM rejection notes (Key Object Selection): the instances they name (ingest.core.lifecycle)
    TagSpec("CurrentRequestedProcedureEvidenceSequence", _I, False, "evidence"),  # (0040,A375)
    # marker of a DICOMDIR (Basic Directory IOD), which carries no SOP Class UID in its dataset
    TagSpec("FileSetID", _I, False, ""),  # (0004,1130)
)

#: Attributes read inside sequence items (code items PS3.3 8.8, HL7v2 hierarchic designators 10.14).
ITEM_TAGS: Final[tuple[str, ...]] = (
    "CodeValue",  # (0008,0100)
    "CodingSchemeDesignator",  # (0008,0102)
    "CodingSchemeVersion",  # (0008,0103)
    "CodeMeaning",  # (0008,0104)
    "LongCodeValue",  # (0008,0119)
    "URNCodeValue",  # (0008,0120)
    "LocalNamespaceEntityID",  # (0040,0031)
    "UniversalEntityID",  # (0040,0032)
    "UniversalEntityIDType",  # (0040,0033)
    "ReferencedSeriesSequence",  # (0008,1115), in (0040,A375) items
    "ReferencedSOPSequence",  # (0008,1199), in (0008,1115) items
    "ReferencedSOPInstanceUID",  # (0008,1155), in (0008,1199) items
    "AccessionNumber",  # (0008,0050), in (0040,0275) items
    "IssuerOfAccessionNumberSequence",  # (0008,0051), in (0040,0275) items
    "RequestedProcedureID",  # (0040,1001), in (0040,0275) items
    "PlacerOrderNumberImagingServiceRequest",  # (0040,2016), in (0040,0275) items
    "FillerOrderNumberImagingServiceRequest",  # (0040,2017), in (0040,0275) items
    "PersonIdentificationCodeSequence",  # (0040,1101), in (0008,0096) items
)

#: The top-level tags to read; everything else is skipped unread (pass to ``specific_tags``).
HEADER_TAGS: Final[frozenset[BaseTag]] = frozenset(spec.tag for spec in TAGS)

#: SOP classes whose objects are not instances of a patient's study (docs/architecture.md "Acceptance").
NON_PATIENT_SOP_CLASSES: Final[frozenset[str]] = frozenset(
    {
        "1.2.840.10008.1.3.10",  # Media Storage Directory Storage (DICOMDIR)
        "1.2.840.10008.5.1.4.39.1",  # Color Palette Storage
        "1.2.840.10008.5.1.4.38.1",  # Hanging Protocol Storage
        "1.2.840.10008.5.1.4.43.1",  # Generic Implant Template Storage
        "1.2.840.10008.5.1.4.44.1",  # Implant Assembly Template Storage
        "1.2.840.10008.5.1.4.45.1",  # Implant Template Group Storage
        "1.2.840.10008.5.1.4.1.1.200.1",  # CT Defined Procedure Protocol Storage
        "1.2.840.10008.5.1.4.1.1.200.3",  # Protocol Approval Storage
        "1.2.840.10008.5.1.4.1.1.200.7",  # XA Defined Procedure Protocol Storage
    }
)
