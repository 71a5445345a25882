"""Pydantic models of the FHIR R4 (4.0.1) resources ``ingest`` writes or the embedded backend validates.

``ImagingStudy`` is modelled with every element of the R4 StructureDefinition; ``Patient``,
``Endpoint``, ``Device``, ``Organization``, ``Provenance`` and ``Bundle`` with the elements the pipeline
(the profiles' manifest, :mod:`ingest.core.profiles`) and the embedded backend use. The data types carry the
elements of their R4 definitions that matter here (``Identifier``, ``Coding``, ``CodeableConcept``,
``Reference``, ``Annotation``, ``Narrative``, ``Meta``, ``Extension``, ``Period``, ``HumanName``).

Conventions
-----------
- Python attributes are snake_case; the FHIR JSON names (camelCase) are their aliases, and both are
  accepted on input (``ImagingStudy(number_of_series=1)`` and ``{"numberOfSeries": 1}``).
- Every model is frozen. List elements are typed ``Sequence[...]`` (pass a list or a tuple; they are
  stored as tuples) and default to empty.
- Input is strict: unknown elements are refused (``extra="forbid"``), and primitives are checked
  against the R4 regular expressions (``id``, ``dateTime``, ``date``, ``instant``, ``code``, ``uri``,
  ``string``, ``unsignedInt``, ``positiveInt``). A copy read back from a backend may carry elements we
  do not model (primitive extensions ``_status``, newer elements, server additions); read it with
  ``from_fhir(data, lenient=True)``, which *drops* those elements. Because that is lossy, the merge
  (:mod:`ingest.core.merge`) works on FHIR JSON dicts, not on these models.
- ``to_fhir()`` gives FHIR JSON: ``resourceType`` first, JSON names, and no ``null``, ``""``, ``[]`` or
  ``{}`` anywhere (docs/mapping.md, "Empty values").
- Validation errors never echo the offending value (``hide_input_in_errors``): a value may be patient
  data (a birth date, a name) and error messages end up in logs.
"""

from __future__ import annotations

import calendar
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

__all__ = [
    "Annotation",
    "Bundle",
    "BundleEntry",
    "Canonical",
    "Code",
    "CodeableConcept",
    "Coding",
    "Date",
    "DateTime",
    "Device",
    "DeviceName",
    "DeviceVersion",
    "Encounter",
    "Endpoint",
    "EndpointStatus",
    "Extension",
    "FhirId",
    "FhirList",
    "FhirString",
    "HumanName",
    "Identifier",
    "ImagingStudy",
    "ImagingStudySeries",
    "ImagingStudySeriesInstance",
    "ImagingStudySeriesPerformer",
    "ImagingStudyStatus",
    "Instant",
    "Markdown",
    "Meta",
    "Narrative",
    "Organization",
    "Patient",
    "Period",
    "PositiveInt",
    "Practitioner",
    "Provenance",
    "ProvenanceAgent",
    "Reference",
    "Resource",
    "ServiceRequest",
    "UnsignedInt",
    "Uri",
    "prune_empty",
    "strip_controls",
    "validate_resource",
]

# --------------------------------------------------------------------------------------------------
# Primitive types (FHIR R4 datatypes page, "Primitive Types"; the regexes are the spec's own)
# --------------------------------------------------------------------------------------------------

_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_MONTH = r"(0[1-9]|1[0-2])"
_DAY = r"(0[1-9]|[1-2][0-9]|3[0-1])"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
_ZONE = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"

_ID_RE = re.compile(r"[A-Za-z0-9\-\.]{1,64}")
_DATE_RE = re.compile(rf"{_YEAR}(-{_MONTH}(-{_DAY})?)?")
_DATETIME_RE = re.compile(rf"{_YEAR}(-{_MONTH}(-{_DAY}(T{_TIME}{_ZONE})?)?)?")
_INSTANT_RE = re.compile(rf"{_YEAR}-{_MONTH}-{_DAY}T{_TIME}{_ZONE}")
_CODE_RE = re.compile(r"[^\s]+(\s[^\s]+)*")
_URI_RE = re.compile(r"\S+")  # R4 says \S*; an empty uri is an empty value and is never emitted
_STRING_RE = re.compile(r"[ \r\n\t\S]+")

_INT32_MAX = 2_147_483_647

# Characters a FHIR string must not carry (R4 datatypes, "string": no Unicode character below U+0020
# other than tab, CR and LF): the other C0 controls, and DEL and the C1 controls (U+007F-U+009F).
_FORBIDDEN_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def strip_controls(value: str) -> str:
    """``value`` without the control characters a FHIR string may not contain.

    Parameters
    ----------
    value:
        Decoded text (a DICOM value).

    Returns
    -------
    str
        ``value`` with every C0 control character except tab, CR and LF removed, and DEL and the C1
        controls (U+007F-U+009F) removed; everything else is kept exactly.
    """
    return _FORBIDDEN_CONTROLS.sub("", value)


def _calendar_ok(value: str) -> bool:
    """``True`` unless a ``YYYY-MM-DD...`` value names a day its month does not have (2024-02-30)."""
    if len(value) < 10:
        return True
    year, month, day = int(value[0:4]), int(value[5:7]), int(value[8:10])
    return day <= calendar.monthrange(year, month)[1]


def _pattern(name: str, regex: re.Pattern[str], *, dated: bool = False) -> Callable[[str], str]:
    def check(value: str) -> str:
        if regex.fullmatch(value) is None:
            raise ValueError(f"Invalid {name} format")  # Medplum's wording
        if dated and not _calendar_ok(value):
            raise ValueError(f"Invalid {name}: no such day in that month")
        return value

    check.__name__ = f"check_{name}"
    return check


_STRICT_STR = Field(strict=True)

#: FHIR ``id``: ``[A-Za-z0-9\-\.]{1,64}`` (resource ids, series and instance UIDs).
FhirId = Annotated[str, _STRICT_STR, AfterValidator(_pattern("id", _ID_RE))]
#: FHIR ``string``: non-empty.
FhirString = Annotated[str, _STRICT_STR, AfterValidator(_pattern("string", _STRING_RE))]
#: FHIR ``markdown``: non-empty.
Markdown = Annotated[str, _STRICT_STR, AfterValidator(_pattern("markdown", _STRING_RE))]
#: FHIR ``code``: tokens separated by single spaces.
Code = Annotated[str, _STRICT_STR, AfterValidator(_pattern("code", _CODE_RE))]
#: FHIR ``uri``: no whitespace (non-empty).
Uri = Annotated[str, _STRICT_STR, AfterValidator(_pattern("uri", _URI_RE))]
#: FHIR ``canonical``: a uri, optionally ``|version``.
Canonical = Annotated[str, _STRICT_STR, AfterValidator(_pattern("canonical", _URI_RE))]
#: FHIR ``date``: ``YYYY[-MM[-DD]]``, a real calendar day.
Date = Annotated[str, _STRICT_STR, AfterValidator(_pattern("date", _DATE_RE, dated=True))]
#: FHIR ``dateTime``: ``YYYY[-MM[-DD[Thh:mm:ss[.f+](Z|±hh:mm)]]]``; a time needs seconds and a zone.
DateTime = Annotated[str, _STRICT_STR, AfterValidator(_pattern("dateTime", _DATETIME_RE, dated=True))]
#: FHIR ``instant``: a full timestamp with zone.
Instant = Annotated[str, _STRICT_STR, AfterValidator(_pattern("instant", _INSTANT_RE, dated=True))]
#: FHIR ``unsignedInt``: 0 .. 2^31-1, a JSON number (not a string, not a boolean).
UnsignedInt = Annotated[int, Field(strict=True, ge=0, le=_INT32_MAX)]
#: FHIR ``positiveInt``: 1 .. 2^31-1.
PositiveInt = Annotated[int, Field(strict=True, ge=1, le=_INT32_MAX)]
#: FHIR ``boolean``.
Boolean = Annotated[bool, Field(strict=True)]

_T = TypeVar("_T")

#: A repeating element (``0..*``): accepts a list or a tuple, stored as a tuple so equality and hashing
#: do not depend on which was passed. Typed as a ``Sequence`` for callers (they pass lists); validated
#: and serialised as a tuple, which pydantic does natively (a ``Sequence`` field goes through a Python
#: function per value both ways, which was most of the cost of writing a large ImagingStudy).
if TYPE_CHECKING:
    FhirList = Sequence[_T]
else:
    FhirList = tuple[_T, ...]

#: ImagingStudy.status (required binding ``imagingstudy-status``).
ImagingStudyStatus = Literal["registered", "available", "cancelled", "entered-in-error", "unknown"]
#: Patient.gender (required binding ``administrative-gender``).
AdministrativeGender = Literal["male", "female", "other", "unknown"]
#: Endpoint.status (required binding ``endpoint-status``).
EndpointStatus = Literal["active", "suspended", "error", "off", "entered-in-error", "test"]
#: Narrative.status (required binding ``narrative-status``).
NarrativeStatus = Literal["generated", "extensions", "additional", "empty"]
#: Device.status (required binding ``device-status``).
DeviceStatus = Literal["active", "inactive", "entered-in-error", "unknown"]
#: FHIR R4 request-status, request-intent and encounter-status value sets
RequestStatus = Literal["draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"]
RequestIntent = Literal[
    "proposal", "plan", "directive", "order", "original-order", "reflex-order", "filler-order",
    "instance-order", "option",
]
EncounterStatus = Literal[
    "planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled", "entered-in-error",
    "unknown",
]
#: Device.deviceName.type (required binding ``device-nametype``).
DeviceNameType = Literal[
    "udi-label-name", "user-friendly-name", "patient-reported-name", "manufacturer-name", "model-name",
    "other",
]
#: Bundle.type (required binding ``bundle-type``).
BundleType = Literal[
    "document", "message", "transaction", "transaction-response", "batch", "batch-response", "history",
    "searchset", "collection",
]
#: Identifier.use (required binding ``identifier-use``).
IdentifierUse = Literal["usual", "official", "temp", "secondary", "old"]
#: HumanName.use (required binding ``name-use``).
NameUse = Literal["usual", "official", "temp", "nickname", "anonymous", "old", "maiden"]


# --------------------------------------------------------------------------------------------------
# Serialisation helpers
# --------------------------------------------------------------------------------------------------


def prune_empty(value: Any) -> Any:
    """Remove ``None``, ``""``, ``[]`` and ``{}`` recursively from FHIR JSON.

    Parameters
    ----------
    value:
        A JSON-like value (dicts, lists, scalars).

    Returns
    -------
    Any
        A new value without empty elements; ``None`` when ``value`` itself is empty after pruning.
        Key order of dicts is kept. ``0`` and ``False`` are values, not empties.
    """
    kind = type(value)
    if kind is dict:
        return _prune_dict(value)
    if kind is list or kind is tuple:
        return _prune_list(value)
    if kind is str:
        return value or None
    if isinstance(value, Mapping):
        return _prune_dict(value)
    if isinstance(value, list | tuple):
        return _prune_list(value)
    if value is None or value == "":
        return None
    return value


# prune_empty runs over every element of every resource written (once per study and rerun): the two
# helpers below dispatch on the exact type first and recurse only into containers.
def _prune_dict(value: Mapping[str, Any]) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    for key, item in value.items():
        kind = type(item)
        if kind is str:
            if item:
                out[key] = item
            continue
        if kind is dict:
            item = _prune_dict(item)
        elif kind is list or kind is tuple:
            item = _prune_list(item)
        elif not (kind is int or kind is bool or kind is float):
            item = prune_empty(item)
        if item is not None:
            out[key] = item
    return out or None


def _prune_list(value: list[Any] | tuple[Any, ...]) -> list[Any] | None:
    out: list[Any] = []
    for item in value:
        kind = type(item)
        if kind is str:
            if item:
                out.append(item)
            continue
        if kind is dict:
            item = _prune_dict(item)
        elif kind is list or kind is tuple:
            item = _prune_list(item)
        elif not (kind is int or kind is bool or kind is float):
            item = prune_empty(item)
        if item is not None:
            out.append(item)
    return out or None


# --------------------------------------------------------------------------------------------------
# Base classes
# --------------------------------------------------------------------------------------------------


class _Base(BaseModel):
    """Frozen, strict, JSON names as aliases; ``context={"lenient": True}`` drops unknown elements."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        validate_by_name=True,  # with validate_by_alias: the v2.11+ spelling of populate_by_name=True
        validate_by_alias=True,
        serialize_by_alias=True,
        hide_input_in_errors=True,  # values may be PHI; messages go to logs
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_unknown_when_lenient(cls, data: Any, info: ValidationInfo) -> Any:
        context = info.context
        if context is None:  # the usual case, decided before the (slower) abstract-class checks below
            return data
        if isinstance(data, Mapping) and isinstance(context, Mapping) and context.get("lenient"):
            known = _known_names(cls)
            return {k: v for k, v in data.items() if k in known}
        return data


@functools.cache
def _known_names(cls: type[BaseModel]) -> frozenset[str]:
    """The field names and JSON names of ``cls`` (computed once per class: this runs per element)."""
    return frozenset(cls.model_fields) | {f.alias for f in cls.model_fields.values() if f.alias}


class Element(_Base):
    """FHIR Element: ``id`` (a string) and ``extension``."""

    id: FhirString | None = None
    extension: FhirList[Extension] = ()


class BackboneElement(Element):
    """FHIR BackboneElement: adds ``modifierExtension``."""

    modifier_extension: FhirList[Extension] = ()


# --------------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------------


class Period(Element):
    """FHIR Period."""

    start: DateTime | None = None
    end: DateTime | None = None


class Coding(Element):
    """FHIR Coding."""

    system: Uri | None = None
    version: FhirString | None = None
    code: Code | None = None
    display: FhirString | None = None
    user_selected: Boolean | None = None


class CodeableConcept(Element):
    """FHIR CodeableConcept."""

    coding: FhirList[Coding] = ()
    text: FhirString | None = None


class Identifier(Element):
    """FHIR Identifier."""

    use: IdentifierUse | None = None
    type: CodeableConcept | None = None
    system: Uri | None = None
    value: FhirString | None = None
    period: Period | None = None
    assigner: Reference | None = None


class Reference(Element):
    """FHIR Reference: literal (``reference``), logical (``identifier``) and/or ``display``."""

    reference: FhirString | None = None
    type: Uri | None = None
    identifier: Identifier | None = None
    display: FhirString | None = None


class Annotation(Element):
    """FHIR Annotation; ``author[x]`` is ``authorReference`` or ``authorString``."""

    author_reference: Reference | None = None
    author_string: FhirString | None = None
    time: DateTime | None = None
    text: Markdown

    @model_validator(mode="after")
    def _one_author(self) -> Self:
        if self.author_reference is not None and self.author_string is not None:
            raise ValueError("author[x]: only one of authorReference and authorString")
        return self


class Narrative(Element):
    """FHIR Narrative; ``div`` is the XHTML ``<div>`` (checked only for its outer element)."""

    status: NarrativeStatus
    div: FhirString

    @field_validator("div")
    @classmethod
    def _is_div(cls, value: str) -> str:
        stripped = value.strip()
        if not (stripped.startswith("<div") and stripped.endswith("</div>")):
            raise ValueError("Narrative.div must be an XHTML <div> element")
        return value


class Meta(Element):
    """FHIR Meta."""

    version_id: FhirId | None = None
    last_updated: Instant | None = None
    source: Uri | None = None
    profile: FhirList[Canonical] = ()
    security: FhirList[Coding] = ()
    tag: FhirList[Coding] = ()


class Extension(Element):
    """FHIR Extension with the ``value[x]`` types ``ingest`` uses; either a value or nested extensions."""

    url: Uri
    value_string: FhirString | None = None
    value_code: Code | None = None
    value_uri: Uri | None = None
    value_boolean: Boolean | None = None
    value_integer: Annotated[int, Field(strict=True, ge=-_INT32_MAX - 1, le=_INT32_MAX)] | None = None
    value_date_time: DateTime | None = None
    value_coding: Coding | None = None
    value_codeable_concept: CodeableConcept | None = None
    value_reference: Reference | None = None
    value_identifier: Identifier | None = None

    _VALUE_FIELDS: ClassVar[tuple[str, ...]] = (
        "value_string",
        "value_code",
        "value_uri",
        "value_boolean",
        "value_integer",
        "value_date_time",
        "value_coding",
        "value_codeable_concept",
        "value_reference",
        "value_identifier",
    )

    @model_validator(mode="after")
    def _value_or_extensions(self) -> Self:
        values = [name for name in self._VALUE_FIELDS if getattr(self, name) is not None]
        if len(values) > 1:
            raise ValueError("value[x]: only one value per extension")
        if values and self.extension:  # ext-1
            raise ValueError("ext-1: an extension has either a value[x] or nested extensions, not both")
        if not values and not self.extension:  # ext-1
            raise ValueError("ext-1: an extension needs a value[x] or nested extensions")
        return self


class HumanName(Element):
    """FHIR HumanName."""

    use: NameUse | None = None
    text: FhirString | None = None
    family: FhirString | None = None
    given: FhirList[FhirString] = ()
    prefix: FhirList[FhirString] = ()
    suffix: FhirList[FhirString] = ()
    period: Period | None = None


# --------------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------------


class Resource(_Base):
    """Base of the resources: Resource + DomainResource elements, ``to_fhir`` / ``from_fhir``."""

    resource_type: str  # narrowed to a Literal by each resource; serialised first
    id: FhirId | None = None
    meta: Meta | None = None
    implicit_rules: Uri | None = None
    language: Code | None = None
    text: Narrative | None = None
    contained: FhirList[dict[str, Any]] = ()
    extension: FhirList[Extension] = ()
    modifier_extension: FhirList[Extension] = ()

    @field_validator("contained")
    @classmethod
    def _check_contained(cls, value: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
        for index, item in enumerate(value):
            where = f"contained[{index}]"
            if not isinstance(item.get("resourceType"), str):
                raise ValueError(f"{where}.resourceType: required")
            if "contained" in item:  # dom-2
                raise ValueError(f"{where}: a contained resource cannot contain resources (dom-2)")
            meta = item.get("meta")
            if isinstance(meta, Mapping) and ("versionId" in meta or "lastUpdated" in meta):  # dom-4
                raise ValueError(f"{where}.meta: no versionId or lastUpdated in contained (dom-4)")
            if item["resourceType"] in _RESOURCES:
                validate_resource(item)
        return value

    def to_fhir(self) -> dict[str, Any]:
        """FHIR JSON of this resource.

        Returns
        -------
        dict[str, Any]
            ``resourceType`` first, FHIR JSON names, no ``None``/``""``/``[]``/``{}`` at any depth.
        """
        dumped = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        body = prune_empty(dumped) or {}
        body.pop("resourceType", None)
        return {"resourceType": self.resource_type, **body}

    @classmethod
    def from_fhir(cls, data: Mapping[str, Any], *, lenient: bool = False) -> Self:
        """Build the model from FHIR JSON.

        Parameters
        ----------
        data:
            FHIR JSON of one resource; ``resourceType`` must name this class's type.
        lenient:
            Drop elements the model does not know (a backend's copy) instead of refusing them.

        Returns
        -------
        Self
            The validated, frozen model.

        Raises
        ------
        ValueError
            ``resourceType`` is missing or names another type.
        pydantic.ValidationError
            An element breaks the R4 rules; the error locations are the FHIR JSON paths.
        """
        expected = cls.model_fields["resource_type"].default
        if data.get("resourceType") != expected:
            raise ValueError(f"resourceType: expected {expected!r}")
        return cls.model_validate(dict(data), context={"lenient": lenient})


class ImagingStudySeriesPerformer(BackboneElement):
    """ImagingStudy.series.performer."""

    function: CodeableConcept | None = None
    actor: Reference


class ImagingStudySeriesInstance(BackboneElement):
    """ImagingStudy.series.instance."""

    uid: FhirId  # <- SOP Instance UID (0008,0018)
    sop_class: Coding  # <- SOP Class UID (0008,0016)
    number: UnsignedInt | None = None  # <- Instance Number (0020,0013)
    title: FhirString | None = None


class ImagingStudySeries(BackboneElement):
    """ImagingStudy.series."""

    uid: FhirId  # <- Series Instance UID (0020,000E)
    number: UnsignedInt | None = None  # <- Series Number (0020,0011)
    modality: Coding  # <- Modality (0008,0060)
    description: FhirString | None = None  # <- Series Description (0008,103E)
    number_of_instances: UnsignedInt | None = None
    endpoint: FhirList[Reference] = ()
    body_site: Coding | None = None  # <- Body Part Examined (0018,0015)
    laterality: Coding | None = None  # <- Laterality (0020,0060) / (0020,0062)
    specimen: FhirList[Reference] = ()
    started: DateTime | None = None  # <- Series Date/Time (0008,0021)/(0008,0031)
    performer: FhirList[ImagingStudySeriesPerformer] = ()
    instance: FhirList[ImagingStudySeriesInstance] = ()


class ImagingStudy(Resource):
    """FHIR R4 ImagingStudy, every element."""

    resource_type: Literal["ImagingStudy"] = "ImagingStudy"
    identifier: FhirList[Identifier] = ()
    status: ImagingStudyStatus
    modality: FhirList[Coding] = ()
    subject: Reference
    encounter: Reference | None = None
    started: DateTime | None = None
    based_on: FhirList[Reference] = ()
    referrer: Reference | None = None
    interpreter: FhirList[Reference] = ()
    endpoint: FhirList[Reference] = ()
    number_of_series: UnsignedInt | None = None
    number_of_instances: UnsignedInt | None = None
    procedure_reference: Reference | None = None
    procedure_code: FhirList[CodeableConcept] = ()
    location: Reference | None = None
    reason_code: FhirList[CodeableConcept] = ()
    reason_reference: FhirList[Reference] = ()
    note: FhirList[Annotation] = ()
    description: FhirString | None = None
    series: FhirList[ImagingStudySeries] = ()


class Patient(Resource):
    """FHIR R4 Patient (the elements ``ingest`` uses)."""

    resource_type: Literal["Patient"] = "Patient"
    identifier: FhirList[Identifier] = ()
    active: Boolean | None = None
    name: FhirList[HumanName] = ()
    gender: AdministrativeGender | None = None
    birth_date: Date | None = None


class Endpoint(Resource):
    """FHIR R4 Endpoint (the elements ``ingest`` uses)."""

    resource_type: Literal["Endpoint"] = "Endpoint"
    identifier: FhirList[Identifier] = ()
    status: EndpointStatus
    connection_type: Coding
    name: FhirString | None = None
    payload_type: Annotated[FhirList[CodeableConcept], Field(min_length=1)]
    payload_mime_type: FhirList[Code] = ()
    address: Uri


class DeviceName(BackboneElement):
    """Device.deviceName."""

    name: FhirString
    type: DeviceNameType


class DeviceVersion(BackboneElement):
    """Device.version."""

    type: CodeableConcept | None = None
    value: FhirString


class Device(Resource):
    """FHIR R4 Device (the elements ``ingest`` uses: itself, as the creator of what it writes)."""

    resource_type: Literal["Device"] = "Device"
    identifier: FhirList[Identifier] = ()
    status: DeviceStatus | None = None
    manufacturer: FhirString | None = None
    device_name: FhirList[DeviceName] = ()
    type: CodeableConcept | None = None
    version: FhirList[DeviceVersion] = ()
    owner: Reference | None = None


class Organization(Resource):
    """FHIR R4 Organization (the elements ``ingest`` uses)."""

    resource_type: Literal["Organization"] = "Organization"
    identifier: FhirList[Identifier] = ()
    active: Boolean | None = None
    name: FhirString | None = None

    @model_validator(mode="after")
    def _org_1(self) -> Self:
        if not self.identifier and self.name is None:
            raise ValueError("org-1: an Organization needs at least a name or an identifier")
        return self


class ServiceRequest(Resource):
    """FHIR R4 ServiceRequest (the elements an order that ``ImagingStudy.basedOn`` links to carries)."""

    resource_type: Literal["ServiceRequest"] = "ServiceRequest"
    identifier: FhirList[Identifier] = ()
    status: RequestStatus
    intent: RequestIntent
    code: CodeableConcept | None = None
    subject: Reference
    encounter: Reference | None = None
    requester: Reference | None = None


class Encounter(Resource):
    """FHIR R4 Encounter (the elements a visit that ``ImagingStudy.encounter`` links to carries)."""

    resource_type: Literal["Encounter"] = "Encounter"
    identifier: FhirList[Identifier] = ()
    status: EncounterStatus
    class_: Annotated[Coding, Field(alias="class")]
    subject: Reference | None = None


class Practitioner(Resource):
    """FHIR R4 Practitioner (the elements a referrer that ``ImagingStudy.referrer`` links to carries)."""

    resource_type: Literal["Practitioner"] = "Practitioner"
    identifier: FhirList[Identifier] = ()
    active: Boolean | None = None
    name: FhirList[HumanName] = ()


class ProvenanceAgent(BackboneElement):
    """Provenance.agent."""

    type: CodeableConcept | None = None
    role: FhirList[CodeableConcept] = ()
    who: Reference
    on_behalf_of: Reference | None = None


class Provenance(Resource):
    """FHIR R4 Provenance (the elements ``ingest`` uses)."""

    resource_type: Literal["Provenance"] = "Provenance"
    target: Annotated[FhirList[Reference], Field(min_length=1)]
    recorded: Instant
    agent: Annotated[FhirList[ProvenanceAgent], Field(min_length=1)]


class BundleEntry(BackboneElement):
    """Bundle.entry (``resource`` is FHIR JSON, validated by :func:`validate_resource` when known)."""

    full_url: Uri | None = None
    resource: dict[str, Any] | None = None

    @field_validator("resource")
    @classmethod
    def _known(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("resourceType") in _RESOURCES:
            validate_resource(value)
        return value


class Bundle(Resource):
    """FHIR R4 Bundle (``collection``: the profiles' manifest of one study, :mod:`ingest.core.profiles`)."""

    resource_type: Literal["Bundle"] = "Bundle"
    identifier: Identifier | None = None
    type: BundleType
    timestamp: Instant | None = None
    entry: FhirList[BundleEntry] = ()

    @model_validator(mode="after")
    def _bdl_7(self) -> Self:
        urls = [e.full_url for e in self.entry if e.full_url is not None]
        if len(urls) != len(set(urls)):  # bdl-7 (no versions in a collection)
            raise ValueError("bdl-7: fullUrl must be unique in a bundle")
        return self


for _model in (Element, BackboneElement, Identifier, Reference, Extension, Coding, CodeableConcept):
    _model.model_rebuild()
del _model

_RESOURCES: dict[str, type[Resource]] = {
    "ImagingStudy": ImagingStudy,
    "Patient": Patient,
    "Endpoint": Endpoint,
    "Device": Device,
    "Organization": Organization,
    "Provenance": Provenance,
    "ServiceRequest": ServiceRequest,
    "Encounter": Encounter,
    "Practitioner": Practitioner,
}


def validate_resource(data: Mapping[str, Any]) -> None:
    """Validate FHIR JSON of one resource strictly, dispatching on ``resourceType``.

    Used by the embedded backend on every write.

    Parameters
    ----------
    data:
        FHIR JSON of an ImagingStudy, Patient, Endpoint, Device, Organization or Provenance.

    Raises
    ------
    ValueError
        ``resourceType`` is missing or not one of the supported types (the message names the field).
    pydantic.ValidationError
        An element is unknown or breaks the R4 rules; each error's ``loc`` is the FHIR JSON path.
    """
    if not isinstance(data, Mapping):
        raise ValueError("resourceType: the resource must be a JSON object")
    resource_type = data.get("resourceType")
    if not isinstance(resource_type, str):
        raise ValueError("resourceType: required")
    model = _RESOURCES.get(resource_type)
    if model is None:
        raise ValueError(f"resourceType: unsupported resource type {resource_type!r}")
    model.model_validate(dict(data))
