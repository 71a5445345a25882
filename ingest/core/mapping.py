"""Study aggregate -> FHIR R4 ImagingStudy, per docs/mapping.md (study, series and instance levels).

Pure and deterministic: the same aggregate and options give an equal resource, field for field.
Problems with optional values never fail the mapping; they drop the element and add a warning.
Warnings name the DICOM element, the rule and the series by UID; they never carry patient data.

Choices the contract leaves open:

- ``subject`` without a Patient ID (0010,0020): a reference with ``type: "Patient"`` and, when there
  is a name, ``display`` only (valid FHIR; R4 requires ``subject``), plus a warning. With neither a
  Patient ID nor a name nothing names the patient: ``subject`` says so with the FHIR Data Absent
  Reason extension (``unknown``) instead of being an empty reference.
- ``subject.display`` from the ideographic group (no alphabetic group): components in DICOM order,
  family name first ("Prefix Family Given Middle Suffix"), as those scripts write names.
- Values that differ between the instances of one study or series are chosen by
  :func:`ingest.core.aggregate.pick` (most common, then lowest SOP Instance UID) and reported.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final

from ingest.core.aggregate import SeriesAggregate, StudyAggregate, distinct, pick
from ingest.core.datetimes import fhir_datetime
from ingest.core.fhir import (
    CodeableConcept,
    Coding,
    Extension,
    Identifier,
    ImagingStudy,
    ImagingStudySeries,
    ImagingStudySeriesInstance,
    ImagingStudySeriesPerformer,
    Reference,
    strip_controls,
)
from ingest.core.lifecycle import KEY_OBJECT_SELECTION
from ingest.core.records import Code, InstanceRecord, PersonName
from ingest.core.terminology import (
    ACCESSION_ID_CONCEPT,
    ACCESSION_NUMBER_CONCEPT,
    DCM_SYSTEM,
    FILLER_ORDER_CONCEPT,
    PARTICIPATION_SYSTEM,
    PLACER_ORDER_CONCEPT,
    STUDY_INSTANCE_UID_CONCEPT,
    STUDY_UID_SYSTEM,
    URI_SYSTEM,
    VISIT_NUMBER_CONCEPT,
    Concept,
    body_part_concept,
    coding_system,
    is_acquisition_modality,
    laterality_concept,
    sop_class_name,
)

__all__ = [
    "DATA_ABSENT_REASON_URL",
    "KO_DOCUMENT_TITLE_URL",
    "NUMBER_OF_FRAMES_URL",
    "MappingOptions",
    "build_imaging_study",
    "issuer_system",
    "person_display",
]

#: ImagingStudy.series.instance.extension: Number of Frames (0028,0008), as IHE MADO defines it.
NUMBER_OF_FRAMES_URL: Final = "https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoNumberOfFrames"
#: ImagingStudy.series.instance.extension: the document title of a Key Object Selection document (IHE MADO).
KO_DOCUMENT_TITLE_URL: Final = (
    "https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoKeyObjectDocumentTitle"
)
#: The FHIR Data Absent Reason extension: why a required element has no value.
DATA_ABSENT_REASON_URL: Final = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
_UNKNOWN_MODALITY: Final = "OT"  # DICOM "Other"
_UID_RE: Final = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_UUID_RE: Final = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_URI_PREFIXES: Final = ("urn:", "http://", "https://")


@dataclass(frozen=True)
class MappingOptions:
    """What the mapping needs from the settings (built from ``[mapping]`` and ``[patient]`` by the
    composition root, ``ingest.app.wiring.mapping_options``; the core never reads settings).

    Parameters
    ----------
    site_timezone:
        IANA zone for dates and times without Timezone Offset From UTC (0008,0201); ``None``: date only.
    include_instances:
        Emit ``series.instance`` lists (counts stay exact either way).
    include_study_id:
        Emit Study ID (0020,0010) as a secondary identifier.
    operator_function:
        v3-ParticipationType code for Operators' Name (0008,1070) performers; ``None``: no function.
    patient_default_system:
        ``subject.identifier.system`` when the instances carry no usable issuer.
    endpoint_reference:
        Literal reference to the study's Endpoint (e.g. ``"Endpoint/wado"``), or ``None``.
    narrative:
        ``[mapping] narrative``: write the generated ``text`` (docs/mapping.md "Narrative"); it is
        attached after the merge, ``ingest.core.merge.plan(..., narrative=...)``.
    issuer_systems:
        ``[profile] issuer_systems``: Local Namespace Entity ID (0040,0031) of an Issuer of Accession
        Number that is not a URI -> the ``Identifier.system`` URI the site gave it.
    mado_extensions:
        Write the IHE MADO instance extensions (``MadoNumberOfFrames``, ``MadoKeyObjectDocumentTitle``):
        only under ``[profile] name = "mado"``, the profile that defines them.
    based_on, encounter:
        ``[links] based_on`` / ``encounter``: ``"off"`` (not written), ``"logical"`` or ``"lookup"``
        (written as logical references by identifier; the relay's link step makes them literal when the
        backend holds exactly one match, ``ingest.relay.links``).
    """

    site_timezone: str | None = None
    include_instances: bool = True
    include_study_id: bool = False
    operator_function: str | None = "SPRF"
    patient_default_system: str | None = None
    endpoint_reference: str | None = None
    narrative: bool = True
    issuer_systems: Mapping[str, str] = field(default_factory=dict)
    mado_extensions: bool = False
    based_on: str = "logical"
    encounter: str = "off"


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------


# Every DICOM text that reaches the resource goes through _text, _token or person_display, which drop
# the control characters FHIR strings may not contain (strip_controls) before anything else.


# _text and person_display read the same few values once per instance and study-level attribute: the
# results are cached (both are pure; the values are the study's own strings and names).
@lru_cache(maxsize=4096)
def _text(value: str | None) -> str | None:
    """A DICOM string as a FHIR string: forbidden controls dropped, stripped, ``None`` when blank."""
    if value is None:
        return None
    value = strip_controls(value).strip()
    return value or None


def _token(value: str | None) -> str | None:
    """A value as a FHIR ``code``: controls dropped, whitespace collapsed to single spaces, ``None`` when
    blank."""
    if value is None:
        return None
    return " ".join(strip_controls(value).split()) or None


def _is_uri(value: str) -> bool:
    return value.startswith(_URI_PREFIXES) and not any(ch.isspace() for ch in value)


def issuer_system(entity_id: str | None, entity_type: str | None, local: str | None = None) -> str | None:
    """An issuer (Issuer of Patient ID, Issuer of Accession Number) as an Identifier ``system`` URI.

    Parameters
    ----------
    entity_id:
        Universal Entity ID (0040,0032).
    entity_type:
        Universal Entity ID Type (0040,0033): ``ISO`` (an OID) -> ``urn:oid:<id>``; ``URI``/``URL``
        -> the URI itself; ``UUID`` -> ``urn:uuid:<id>``. Other types are not URIs.
    local:
        Local Namespace Entity ID (0040,0031) or Issuer of Patient ID (0010,0021): used only when it is
        already a URI (``urn:``, ``http://``, ``https://``).

    Returns
    -------
    str | None
        The system, or ``None`` when no issuer value is a usable URI.
    """
    uid = _text(entity_id)
    kind = (_text(entity_type) or "").upper()
    if uid:
        if kind == "ISO" and len(uid) <= 64 and _UID_RE.match(uid):
            return f"urn:oid:{uid}"
        if kind in ("URI", "URL") and _is_uri(uid):
            return uid
        if kind == "UUID" and _UUID_RE.match(uid):
            return f"urn:uuid:{uid.lower()}"
    name = _text(local)
    if name and _is_uri(name):
        return name
    return None


def _join(parts: Iterable[str]) -> str | None:
    return " ".join(" ".join(parts).split()) or None


@lru_cache(maxsize=4096)
def person_display(name: PersonName | None) -> str | None:
    """A PN value as a display string, keeping its exact Unicode.

    The alphabetic group ``Family^Given^Middle^Prefix^Suffix`` becomes
    ``"Prefix Given Middle Family Suffix"``; without an alphabetic group, the ideographic one
    (then the phonetic one) is written family name first: ``"Prefix Family Given Middle Suffix"``.
    Blank components are skipped and runs of spaces collapsed; control characters a FHIR string may
    not contain are dropped.

    Returns
    -------
    str | None
        ``None`` when every group is blank.
    """
    if name is None:
        return None

    def components(group: str) -> list[str]:
        parts = [p.strip() for p in strip_controls(group).split("^")]
        return (parts + [""] * 5)[:5]

    family, given, middle, prefix, suffix = components(name.alphabetic)
    western = _join([prefix, given, middle, family, suffix])
    if western:
        return western
    for group in (name.ideographic, name.phonetic):
        family, given, middle, prefix, suffix = components(group)
        eastern = _join([prefix, family, given, middle, suffix])
        if eastern:
            return eastern
    return None


def _concept_coding(concept: Concept) -> Coding:
    return Coding(system=concept.system, code=concept.code, display=concept.display)


def _coding(code: Code) -> Coding | None:
    # a designator without a known system URI gives no system (and so no version: a version is of a
    # system); the code and its meaning stay, as FHIR allows for a code whose system is not known
    value = _token(code.value)
    system = coding_system(code.designator)
    if value is None:
        return None
    version = _text(code.version) if system is not None else None
    return Coding(system=system, version=version, code=value, display=_text(code.meaning))


def _codings(codes: Iterable[Code]) -> list[Coding]:
    return [c for c in map(_coding, codes) if c is not None]


def _modality_coding(code: str) -> Coding:
    # ImagingStudy.modality / ImagingStudy.series.modality <- (0008,0060), DCM code system URI
    return Coding(system=DCM_SYSTEM, code=code)


def _started(
    instances: tuple[InstanceRecord, ...],
    date_of: Callable[[InstanceRecord], str | None],
    time_of: Callable[[InstanceRecord], str | None],
    element: str,
    site_tz: str | None,
    warnings: list[str],
) -> str | None:
    """``started`` from a DA/TM pair; date, time and offset are taken together from one record."""

    def when(r: InstanceRecord) -> tuple[str, str | None, str | None] | None:
        date = _text(date_of(r))
        return None if date is None else (date, time_of(r), r.timezone_offset)

    picked = pick(instances, when)
    if picked is None:  # no date: a time alone only earns a warning
        value, problems = fhir_datetime(
            None, pick(instances, lambda r: _text(time_of(r))), None, None, element=element
        )
    else:
        value, problems = fhir_datetime(*picked, site_tz, element=element)
    warnings.extend(problems)
    return value


class _Warnings(list[str]):
    """The warnings of one mapping run."""

    def disagree(
        self, records: Iterable[InstanceRecord], get: Callable[[InstanceRecord], object], what: str
    ) -> None:
        """Warn when the instances hold more than one value for a study/series-level attribute."""
        if distinct(records, get) > 1:
            self.append(f"{what}: the instances disagree; the most common value is used")


# --------------------------------------------------------------------------------------------------
# study level
# --------------------------------------------------------------------------------------------------


def _identifiers(agg: StudyAggregate, options: MappingOptions, warnings: _Warnings) -> list[Identifier]:
    # ImagingStudy.identifier[0] <- Study Instance UID (0020,000D); the study's identity in the backend
    # (found by system|value, so a copy written before the type was added is found the same way)
    identifiers = [
        Identifier(
            type=CodeableConcept(coding=[_concept_coding(STUDY_INSTANCE_UID_CONCEPT)]),  # DCM 110180
            system=STUDY_UID_SYSTEM,
            value=f"urn:oid:{agg.study_uid}",
        )
    ]

    # ImagingStudy.identifier[1] <- Accession Number (0008,0050) + Issuer (0008,0051)
    def accession(r: InstanceRecord) -> tuple[str, str | None, str | None, str | None] | None:
        value = _text(r.accession_number)
        if value is None:
            return None
        return (value, r.accession_issuer_uid, r.accession_issuer_uid_type, r.accession_issuer_local)

    warnings.disagree(agg.instances, accession, "AccessionNumber (0008,0050)")
    picked = agg.value(accession)
    if picked is not None:
        value, uid, kind, local = picked
        system = _accession_system(uid, kind, local, options)
        local_name = _text(local)
        if system is None and _text(uid):
            warnings.append(
                "IssuerOfAccessionNumberSequence (0008,0051): the Universal Entity ID is not a usable "
                "ISO OID or URI; the accession identifier has no system"
            )
        elif system is None and local_name is not None:
            warnings.append(
                "IssuerOfAccessionNumberSequence (0008,0051): the Local Namespace Entity ID is not a URI "
                "and [profile] issuer_systems names none for it; the accession identifier has no system"
            )
        # v2-0203 ACSN and DCM 121022, the codings the MADO accession identifier requires
        identifiers.append(_typed_identifier(ACCESSION_ID_CONCEPT, value, system))

    # ImagingStudy.identifier[2] <- Study ID (0020,0010), only when configured
    if options.include_study_id:
        warnings.disagree(agg.instances, lambda r: _text(r.study_id), "StudyID (0020,0010)")
        study_id = agg.value(lambda r: _text(r.study_id))
        if study_id is not None:
            identifiers.append(Identifier(use="secondary", value=study_id))
    return identifiers


def _typed_identifier(concept: Concept, value: str, system: str | None) -> Identifier:
    codings = [_concept_coding(concept)]
    if concept == ACCESSION_ID_CONCEPT:  # as ImagingStudy.identifier carries it (the MADO accession)
        codings.append(_concept_coding(ACCESSION_NUMBER_CONCEPT))
    return Identifier(type=CodeableConcept(coding=codings), system=system, value=value)


def _accession_system(
    uid: str | None, kind: str | None, local: str | None, options: MappingOptions
) -> str | None:
    """The system of an issuer (Universal Entity ID and its type, Local Namespace Entity ID), else the
    site's URI for a local issuer ([profile] issuer_systems)."""
    system = issuer_system(uid, kind, local)
    local_name = _text(local)
    if system is None and local_name is not None:
        system = _text(options.issuer_systems.get(local_name))
    return system


def _based_on(agg: StudyAggregate, options: MappingOptions) -> list[Reference]:
    """ImagingStudy.basedOn: logical ServiceRequest references by the order's identifiers
    <- Accession Number (0008,0050) + Issuer (0008,0051), and each Request Attributes Sequence (0040,0275)
    item's Accession Number, Placer (0040,2016) / Filler (0040,2017) Order Number and Requested
    Procedure ID (0040,1001); each identifier once."""
    if options.based_on == "off":
        return []
    # each distinct identifier once, in order of first appearance, as its (type, value, system) before
    # any model is built: a study's instances almost always repeat the same few orders (this loop runs
    # once per instance); a type of None is the Requested Procedure ID's (a text, no code)
    keys: dict[tuple[Concept | None, str, str | None], None] = {}
    for r in agg.instances:
        acc = _text(r.accession_number)
        if acc is not None:
            system = _accession_system(r.accession_issuer_uid, r.accession_issuer_uid_type,
                                       r.accession_issuer_local, options)
            keys[(ACCESSION_ID_CONCEPT, acc, system)] = None
        for req in r.requests:
            acc = _text(req.accession_number)
            if acc is not None:
                system = _accession_system(req.accession_issuer_uid, req.accession_issuer_uid_type,
                                           req.accession_issuer_local, options)
                keys[(ACCESSION_ID_CONCEPT, acc, system)] = None
            if (placer := _text(req.placer_order_number)) is not None:
                keys[(PLACER_ORDER_CONCEPT, placer, None)] = None
            if (filler := _text(req.filler_order_number)) is not None:
                keys[(FILLER_ORDER_CONCEPT, filler, None)] = None
            if (procedure := _text(req.requested_procedure_id)) is not None:
                keys[(None, procedure, None)] = None
    found = [
        _typed_identifier(concept, value, system) if concept is not None
        else Identifier(type=CodeableConcept(text="Requested Procedure ID"), value=value)
        for concept, value, system in keys
    ]
    # one logical reference per identifier, accession first; the same accession without and with a
    # system is one order: the one with a system is kept
    with_system = {i.value for i in found if i.system}
    kept = [i for i in found if i.system or i.value not in with_system or not _is_acsn(i)]
    return [Reference(type="ServiceRequest", identifier=i) for i in kept]


def _is_acsn(identifier: Identifier) -> bool:
    codings = identifier.type.coding if identifier.type is not None else ()
    return any(c.code == "ACSN" for c in codings)


def _encounter(agg: StudyAggregate, options: MappingOptions, warnings: _Warnings) -> Reference | None:
    """ImagingStudy.encounter: a logical Encounter reference <- Admission ID (0038,0010) + Issuer of
    Admission ID Sequence (0038,0014), typed v2-0203 VN."""
    if options.encounter == "off":
        return None

    def admission(r: InstanceRecord) -> tuple[str, str | None, str | None, str | None] | None:
        value = _text(r.admission_id)
        if value is None:
            return None
        return (value, r.admission_issuer_uid, r.admission_issuer_uid_type, r.admission_issuer_local)

    warnings.disagree(agg.instances, admission, "AdmissionID (0038,0010)")
    picked = agg.value(admission)
    if picked is None:
        return None
    value, uid, kind, local = picked
    system = _accession_system(uid, kind, local, options)
    return Reference(type="Encounter", identifier=_typed_identifier(VISIT_NUMBER_CONCEPT, value, system))


def _subject(agg: StudyAggregate, options: MappingOptions, warnings: _Warnings) -> Reference:
    # ImagingStudy.subject <- Patient ID (0010,0020) + issuer (0010,0021)/(0010,0024), Patient's Name
    def identity(r: InstanceRecord) -> tuple[str, str | None, str | None, str | None] | None:
        value = _text(r.patient_id)
        if value is None:
            return None
        return (value, r.patient_id_issuer_uid, r.patient_id_issuer_uid_type, r.patient_id_issuer)

    warnings.disagree(agg.instances, identity, "PatientID (0010,0020) with its issuer")
    warnings.disagree(agg.instances, lambda r: person_display(r.patient_name), "PatientName (0010,0010)")
    display = agg.value(lambda r: person_display(r.patient_name))
    picked = agg.value(identity)
    if picked is None and display is None:
        # R4 ImagingStudy.subject is 1..1; with nothing that names the patient, say so explicitly
        warnings.append(
            "PatientID (0010,0020) and PatientName (0010,0010) are absent: subject is marked "
            "data-absent-reason 'unknown'"
        )
        return Reference(
            type="Patient", extension=[Extension(url=DATA_ABSENT_REASON_URL, value_code="unknown")]
        )
    if picked is None:
        warnings.append("PatientID (0010,0020) is absent: subject carries no identifier")
        return Reference(type="Patient", display=display)
    value, uid, kind, issuer = picked
    system = issuer_system(uid, kind, issuer) or _text(options.patient_default_system)
    return Reference(type="Patient", identifier=Identifier(system=system, value=value), display=display)


def _procedure_codes(agg: StudyAggregate) -> list[CodeableConcept]:
    # ImagingStudy.procedureCode <- Procedure Code Sequence (0008,1032): one concept per item
    concepts = []
    for code in agg.value(lambda r: r.procedure_codes) or ():
        coding = _coding(code)
        if coding is not None:
            concepts.append(CodeableConcept(coding=[coding], text=coding.display))
    return concepts


def _reason_codes(agg: StudyAggregate) -> list[CodeableConcept]:
    # ImagingStudy.reasonCode <- (0040,1002) text + (0040,100A) codes
    text = agg.value(lambda r: _text(r.reason_text))
    codings = _codings(agg.value(lambda r: r.reason_codes) or ())
    if text is None and not codings:
        return []
    return [CodeableConcept(coding=codings, text=text)]


# --------------------------------------------------------------------------------------------------
# series and instance level
# --------------------------------------------------------------------------------------------------


def _unsigned(value: int | None, what: str, warnings: _Warnings) -> int | None:
    if value is None:
        return None
    if value < 0:
        warnings.append(f"{what} is negative; not an unsignedInt, dropped")
        return None
    return value


def _performers(series: SeriesAggregate, options: MappingOptions) -> list[ImagingStudySeriesPerformer]:
    # ImagingStudy.series.performer <- Performing Physician's Name (0008,1050) as PRF,
    # Operators' Name (0008,1070) with the configured function
    def function(code: str | None) -> CodeableConcept | None:
        if not code:
            return None
        return CodeableConcept(coding=[Coding(system=PARTICIPATION_SYSTEM, code=code)])

    performers = []
    for names, code in (
        (series.value(lambda r: r.performing_physicians), "PRF"),
        (series.value(lambda r: r.operators), options.operator_function),
    ):
        for name in names or ():
            display = person_display(name)
            if display is not None:
                performers.append(
                    ImagingStudySeriesPerformer(function=function(code), actor=Reference(display=display))
                )
    return performers


@lru_cache(maxsize=256)
def _sop_class_coding(sop_class_uid: str) -> Coding:
    # one (frozen) Coding per SOP Class, shared by the instances of every study
    return Coding(
        system=URI_SYSTEM, code=f"urn:oid:{sop_class_uid}", display=sop_class_name(sop_class_uid)
    )


def _instance_number(record: InstanceRecord, warnings: _Warnings) -> int | None:
    number = record.instance_number
    if number is None or number >= 0:
        return number  # the common case: no warning text to build
    return _unsigned(number, f"InstanceNumber (0020,0013) of SOPInstanceUID={record.sop_uid}", warnings)


def _instance(
    record: InstanceRecord, series_description: str | None, single: bool, options: MappingOptions,
    warnings: _Warnings,
) -> ImagingStudySeriesInstance:
    # ImagingStudy.series.instance.title <- Content Label (0070,0080), else the document title of an
    # SR / KOS document, Concept Name Code Sequence meaning (0040,A043 > 0008,0104), else the Series
    # Description of a single-instance series
    title = (
        _text(record.content_label) or _text(record.concept_name) or (series_description if single else None)
    )
    extensions: list[Extension] = []
    # ImagingStudy.series.instance.extension[number-of-frames] <- Number of Frames (0028,0008); the MADO
    # extensions are written under the MADO profile only (MappingOptions.mado_extensions)
    frames = record.number_of_frames if options.mado_extensions else None
    if frames is not None and frames < 0:
        frames = _unsigned(frames, f"NumberOfFrames (0028,0008) of SOPInstanceUID={record.sop_uid}", warnings)
    if frames is not None and frames > 0:
        extensions.append(Extension(url=NUMBER_OF_FRAMES_URL, value_integer=frames))
    # ImagingStudy.series.instance.extension[ko-document-title] <- (0040,A043) of a Key Object Selection
    title_code = _coding(record.concept_code) if record.concept_code is not None else None
    if options.mado_extensions and record.sop_class_uid == KEY_OBJECT_SELECTION and title_code is not None:
        extensions.append(
            Extension(
                url=KO_DOCUMENT_TITLE_URL,
                value_codeable_concept=CodeableConcept(coding=[title_code], text=title_code.display),
            )
        )
    return ImagingStudySeriesInstance(
        extension=extensions,
        uid=record.sop_uid,  # <- SOP Instance UID (0008,0018)
        sop_class=_sop_class_coding(record.sop_class_uid),  # <- SOP Class UID (0008,0016)
        number=_instance_number(record, warnings),  # <- Instance Number (0020,0013)
        title=title,
    )


def _series(series: SeriesAggregate, options: MappingOptions, warnings: _Warnings) -> ImagingStudySeries:
    where = f"series {series.series_uid}"
    for get, what in (
        (lambda r: _text(r.modality), "Modality (0008,0060)"),
        (lambda r: r.series_number, "SeriesNumber (0020,0011)"),
        (lambda r: _text(r.series_description), "SeriesDescription (0008,103E)"),
    ):
        warnings.disagree(series.instances, get, f"{what} in {where}")

    modality = series.value(lambda r: _token(r.modality))
    if modality is None:
        warnings.append(f"Modality (0008,0060) is absent in {where}: coded as {_UNKNOWN_MODALITY}")
        modality = _UNKNOWN_MODALITY

    body_part = series.value(lambda r: _text(r.body_part))
    body_site = body_part_concept(body_part)
    if body_part is not None and body_site is None:
        warnings.append(
            f"BodyPartExamined (0018,0015) {body_part!r} in {where} has no SNOMED CT code "
            "(PS3.16 Annex L); bodySite omitted"
        )

    side = series.value(lambda r: _text(r.laterality))
    side_code = laterality_concept(side)
    if side is not None and side_code is None and side.upper() != "U":
        warnings.append(f"Laterality (0020,0060/0020,0062) {side!r} in {where} is not R, L, B or U; omitted")

    # ImagingStudy.series.started <- Series Date (0008,0021) + Series Time (0008,0031) + (0008,0201)
    started = _started(
        series.instances,
        lambda r: r.series_date,
        lambda r: r.series_time,
        f"SeriesDate/SeriesTime (0008,0021/0008,0031) in {where}",
        options.site_timezone,
        warnings,
    )

    description = series.value(lambda r: _text(r.series_description))
    instances: list[ImagingStudySeriesInstance] = []
    if options.include_instances:
        single = len(series.instances) == 1
        ordered = sorted(
            series.instances,
            key=lambda r: (r.instance_number is None, r.instance_number or 0, r.sop_uid),
        )
        instances = [_instance(r, description, single, options, warnings) for r in ordered]

    def coding(concept: Concept | None) -> Coding | None:
        return (
            None
            if concept is None
            else Coding(system=concept.system, code=concept.code, display=concept.display)
        )

    return ImagingStudySeries(
        uid=series.series_uid,  # <- Series Instance UID (0020,000E)
        number=_unsigned(series.number, f"SeriesNumber (0020,0011) in {where}", warnings),
        modality=_modality_coding(modality),
        description=description,  # <- Series Description (0008,103E)
        number_of_instances=len(series.instances),  # computed
        body_site=coding(body_site),  # <- Body Part Examined (0018,0015)
        laterality=coding(side_code),  # <- Laterality (0020,0060), else Image Laterality (0020,0062)
        started=started,  # <- Series Date (0008,0021) + Series Time (0008,0031)
        performer=_performers(series, options),
        instance=instances,
    )


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def build_imaging_study(agg: StudyAggregate, settings: MappingOptions) -> tuple[ImagingStudy, list[str]]:
    """Map a study aggregate to a FHIR R4 ImagingStudy (docs/mapping.md, every row).

    Parameters
    ----------
    agg:
        All known instances of the study.
    settings:
        The mapping options (time zone, instance lists, Study ID, operator function, patient default
        system, endpoint).

    Returns
    -------
    tuple[ImagingStudy, list[str]]
        The resource (``status`` ``available``; counts computed; series ordered by number then UID,
        instances by number then UID) and the warnings for elements that were dropped or chosen among
        disagreeing instances. Warnings contain no patient data.

    Raises
    ------
    ConfigError
        When ``settings.site_timezone`` is not a known IANA zone.
    """
    warnings = _Warnings()
    identifiers = _identifiers(agg, settings, warnings)
    subject = _subject(agg, settings, warnings)

    # ImagingStudy.started <- Study Date (0008,0020) + Study Time (0008,0030) + (0008,0201)
    started = _started(
        agg.instances,
        lambda r: r.study_date,
        lambda r: r.study_time,
        "StudyDate/StudyTime (0008,0020/0008,0030)",
        settings.site_timezone,
        warnings,
    )

    series = [_series(s, settings, warnings) for s in agg.series]
    # ImagingStudy.modality <- union of series Modality (0008,0060), restricted to DICOM CID 29
    modalities = sorted({code for s in series if is_acquisition_modality(code := s.modality.code or "")})

    warnings.disagree(agg.instances, lambda r: _text(r.study_description), "StudyDescription (0008,1030)")
    referrer = person_display(agg.value(lambda r: r.referring_physician))
    readers = agg.value(lambda r: r.reading_physicians) or ()
    interpreters = [d for d in map(person_display, readers) if d is not None]

    study = ImagingStudy(
        identifier=identifiers,
        status="available",
        modality=[_modality_coding(code) for code in modalities],
        subject=subject,
        started=started,
        referrer=Reference(display=referrer) if referrer else None,  # <- (0008,0090)
        based_on=_based_on(agg, settings),  # <- (0008,0050), (0040,0275)
        encounter=_encounter(agg, settings, warnings),  # <- (0038,0010) + (0038,0014)
        interpreter=[Reference(display=d) for d in interpreters],  # <- (0008,1060), one per value
        endpoint=[Reference(reference=settings.endpoint_reference)] if settings.endpoint_reference else [],
        number_of_series=agg.number_of_series,  # computed, never (0020,1206)
        number_of_instances=agg.number_of_instances,  # computed, never (0020,1208)
        procedure_code=_procedure_codes(agg),
        reason_code=_reason_codes(agg),
        description=agg.value(lambda r: _text(r.study_description)),  # <- (0008,1030)
        series=series,
    )
    return study, list(warnings)
