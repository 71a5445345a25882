"""FHIR building for the linked resources: the Patient and the Endpoints ``ingest`` creates, the Device
(``ingest`` itself) and Organization of the profiles' manifest, and the search tokens it finds them by
(``ImagingStudy.subject`` / ``ImagingStudy.endpoint``, docs/mapping.md "Imaging profiles").

Pure: no I/O, no settings, no metrics; the resolvers that search and create them over the backend are
``ingest.relay.links``. Patient identifiers, names and birth dates are PHI: nothing here logs them.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Final

from pydantic import ValidationError

from ingest.core.aggregate import pick
from ingest.core.datetimes import parse_da
from ingest.core.fhir import (
    AdministrativeGender,
    CodeableConcept,
    Coding,
    Device,
    DeviceName,
    DeviceVersion,
    Endpoint,
    Extension,
    HumanName,
    Identifier,
    Organization,
    Patient,
    Reference,
    strip_controls,
)
from ingest.core.mapping import person_display
from ingest.core.records import InstanceRecord, PersonName
from ingest.core.terminology import (
    CONNECTION_TYPE_SYSTEM,
    MADO_DEVICE_TYPE_SYSTEM,
    PAYLOAD_TYPE_SYSTEM,
    URI_SYSTEM,
)

__all__ = [
    "NAME_REPRESENTATION_URL",
    "REQUIRES_ACCESS_TOKEN_URL",
    "RETRIEVE_LOCATION_UID_URL",
    "device_identifier",
    "device_resource",
    "endpoint_resource",
    "human_names",
    "organization_identifier",
    "organization_resource",
    "patient_resource",
    "retrieve_location_uid",
    "search_token",
    "uuid_urn",
]

#: ISO 21090 EN.representation on HumanName (FHIR R4 core extension): ABC | IDE | SYL.
NAME_REPRESENTATION_URL: Final = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
#: SMART Imaging Access: whether WADO-RS requests carry the same access token (Endpoint extension).
REQUIRES_ACCESS_TOKEN_URL: Final = "http://fhir.org/argonaut/smart-imaging/StructureDefinition/requires-access-token"
#: IHE MADO: the Retrieve Location UID (0040,E011) of the WADO-RS service (Endpoint extension).
RETRIEVE_LOCATION_UID_URL: Final = (
    "https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoRetrieveLocationUIDExtension"
)

# uuid5 namespace of every name-based UUID ingest derives (Endpoints, its Device, Bundle entries)
_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ingest")

# Patient.gender (administrative-gender) <- Patient's Sex (0010,0040); anything else is omitted
_GENDER: Final[dict[str, AdministrativeGender]] = {"M": "male", "F": "female", "O": "other"}


def _escape(text: str) -> str:
    # FHIR search escaping (R4 3.1.1.5.9): "\", "|", "," and "$" in a value are escaped with "\"
    for ch in ("\\", "|", ",", "$"):
        text = text.replace(ch, "\\" + ch)
    return text


def search_token(system: str | None, value: str) -> str:
    """A FHIR token search value ``system|value``, escaped; the value alone (any system) when ``system``
    is ``None``.

    Parameters
    ----------
    system, value:
        ``Identifier.system`` and ``Identifier.value``.

    Examples
    --------
    >>> search_token("urn:oid:1.2.3", "A|1")
    'urn:oid:1.2.3|A\\\\|1'
    >>> search_token(None, "A|1")
    'A\\\\|1'
    """
    if system is None:
        return _escape(value)
    return f"{_escape(system)}|{_escape(value)}"


def _components(group: str) -> list[str]:
    # PN component group: family^given^middle^prefix^suffix (PS3.5 6.2)
    parts = [" ".join(strip_controls(p).split()) for p in group.split("^")]
    return (parts + [""] * 5)[:5]


def _human_name(group: str, representation: str | None) -> HumanName | None:
    family, given, middle, prefix, suffix = _components(group)
    if not any((family, given, middle, prefix, suffix)):
        return None
    # HumanName.text: alphabetic given-name first, ideographic/phonetic family-name first (as the
    # mapping's subject.display, ingest.core.mapping.person_display)
    as_pn = PersonName(alphabetic=group) if representation is None else PersonName(ideographic=group)
    extension = [{"url": NAME_REPRESENTATION_URL, "valueCode": representation}] if representation else []
    try:
        return HumanName.model_validate(
            {
                "extension": extension,  # HumanName.extension: iso21090-EN-representation IDE / SYL
                "text": person_display(as_pn),  # HumanName.text
                "family": family or None,  # HumanName.family <- component 1
                "given": [g for g in (given, middle) if g],  # HumanName.given <- components 2, 3
                "prefix": [prefix] if prefix else [],  # HumanName.prefix <- component 4
                "suffix": [suffix] if suffix else [],  # HumanName.suffix <- component 5
            }
        )
    except ValidationError:
        return None  # e.g. control characters: the name is left out, the Patient is still created


def human_names(name: PersonName | None) -> list[HumanName]:
    """Patient's Name (0010,0010) as FHIR R4 HumanNames, one per PN component group.

    The alphabetic group becomes a plain HumanName; the ideographic and phonetic groups carry the
    ISO 21090 ``EN.representation`` extension (``IDE`` / ``SYL``), the way FHIR R4 represents the
    alternative script forms of one name. Components: family -> ``family``; given and middle ->
    ``given``; prefix -> ``prefix``; suffix -> ``suffix``; ``text`` is the whole name as written.

    Parameters
    ----------
    name:
        The decoded PN value.

    Returns
    -------
    list of HumanName
        Empty groups (and groups FHIR cannot hold) are skipped.
    """
    if name is None:
        return []
    out: list[HumanName] = []
    for group, representation in ((name.alphabetic, None), (name.ideographic, "IDE"), (name.phonetic, "SYL")):
        human = _human_name(group, representation)
        if human is not None:
            out.append(human)
    return out


def _text(value: str | None) -> str | None:
    return strip_controls(value or "").strip() or None


def patient_resource(system: str | None, value: str, records: Sequence[InstanceRecord]) -> dict[str, Any]:
    """The Patient to create for ``system|value`` from the study's instances (FHIR JSON).

    Demographics come from the instances whose Patient ID (0010,0020) is ``value`` (all instances when
    none is), each value chosen by :func:`ingest.core.aggregate.pick` (most common, then lowest SOP
    Instance UID).

    Parameters
    ----------
    system, value:
        ``Patient.identifier`` (the subject's logical identifier).
    records:
        The study's instance records.

    Returns
    -------
    dict
        ``{"resourceType": "Patient", "identifier": [...], "name": [...], "gender": ..., "birthDate": ...}``
        without empty elements; an unknown sex and an invalid birth date are left out.
    """
    mine = [r for r in records if _text(r.patient_id) == value] or list(records)
    name = pick(mine, lambda r: r.patient_name)  # Patient.name <- (0010,0010)
    sex = pick(mine, lambda r: _text(r.patient_sex))  # Patient.gender <- (0010,0040)
    born = pick(mine, lambda r: parse_da(r.patient_birth_date or ""))  # Patient.birthDate <- (0010,0030)
    patient = Patient(
        identifier=[Identifier(system=system, value=value)],  # Patient.identifier <- (0010,0020) + issuer
        name=human_names(name),
        gender=_GENDER.get((sex or "").upper()),
        birth_date=born.isoformat() if born is not None else None,
    )
    return patient.to_fhir()


def uuid_urn(*parts: str) -> str:
    """A name-based ``urn:uuid:`` (UUID version 5) for ``parts``: the same parts, the same URN."""
    return f"urn:uuid:{uuid.uuid5(_NAMESPACE, chr(0x1F).join(parts))}"


def retrieve_location_uid(url: str) -> str:
    """The Retrieve Location UID ``ingest`` gives a WADO-RS base URL without a configured one.

    A UUID-derived UID (DICOM PS3.5 B.2: ``2.25.`` and the UUID as one integer) of the name-based
    UUID of the URL: unique per URL, the same on every node and run.
    """
    return f"2.25.{uuid.uuid5(_NAMESPACE, 'wado-rs ' + url).int}"


def endpoint_resource(
    url: str,
    *,
    name: str = "DICOMweb WADO-RS",
    requires_access_token: bool = True,
    location_uid: str | None = None,
    mado: bool = True,
) -> dict[str, Any]:
    """The DICOMweb WADO-RS Endpoint for ``url`` (FHIR JSON, validated against the R4 model).

    It carries what the SMART WADO-RS Endpoint and the MADO WADO Endpoint profiles require (docs/mapping.md
    "Imaging profiles"): ``status`` active, ``connectionType`` endpoint-connection-type ``dicom-wado-rs``,
    ``payloadType`` endpoint-payload-type ``none`` with text "DICOM WADO-RS", ``address``, ``name``, and
    the ``requires-access-token`` extension, and with ``mado`` the ``MadoRetrieveLocationUIDExtension``.

    Parameters
    ----------
    url:
        The WADO-RS base URL (``[endpoint] wado_rs_url``, already validated by the settings).
    name:
        ``Endpoint.name``.
    requires_access_token:
        ``[endpoint] requires_access_token``: whether a client sends its SMART access token there.
    location_uid:
        The Retrieve Location UID; default :func:`retrieve_location_uid` of ``url``.
    mado:
        Write ``MadoRetrieveLocationUIDExtension``: the MADO profile's extension, only under ``[profile]
        name = "mado"``.
    """
    extensions = [Extension(url=REQUIRES_ACCESS_TOKEN_URL, value_boolean=requires_access_token)]
    if mado:
        extensions.append(
            Extension(url=RETRIEVE_LOCATION_UID_URL, value_string=location_uid or retrieve_location_uid(url))
        )
    endpoint = Endpoint(
        extension=extensions,
        identifier=[Identifier(system=URI_SYSTEM, value=url)],  # what we search it by
        status="active",
        connection_type=Coding(system=CONNECTION_TYPE_SYSTEM, code="dicom-wado-rs", display="DICOM WADO-RS"),
        name=_text(name) or "DICOMweb WADO-RS",
        payload_type=[
            CodeableConcept(coding=[Coding(system=PAYLOAD_TYPE_SYSTEM, code="none")], text="DICOM WADO-RS")
        ],
        payload_mime_type=["application/dicom"],
        address=url,
    )
    return endpoint.to_fhir()


def device_identifier(name: str) -> Identifier:
    """The identifier ``ingest``'s Device is found by: a name-based URN of the device name."""
    return Identifier(system=URI_SYSTEM, value=uuid_urn("device", name))


def device_resource(
    name: str, version: str, *, manufacturer: str | None = None, owner: str | None = None
) -> dict[str, Any]:
    """``ingest`` as the creator of what it writes: a Device per the MADO Creator profile (FHIR JSON).

    Parameters
    ----------
    name:
        ``[profile] device_name``: ``Device.deviceName`` (``model-name``).
    version:
        ``ingest``'s version: ``Device.version``.
    manufacturer:
        ``[profile] manufacturer``: ``Device.manufacturer``.
    owner:
        A reference to the Organization running it (``Device.owner``), if any.
    """
    device = Device(
        identifier=[device_identifier(name)],
        status="active",
        manufacturer=_text(manufacturer),
        device_name=[DeviceName(name=name, type="model-name")],
        # Device.type: MadoDeviceType#mado-creator "MADO Creator", the one coding the profile fixes
        type=CodeableConcept(
            coding=[Coding(system=MADO_DEVICE_TYPE_SYSTEM, code="mado-creator", display="MADO Creator")]
        ),
        version=[DeviceVersion(value=version)],
        owner=Reference(reference=owner, type="Organization") if owner else None,
    )
    return device.to_fhir()


def organization_identifier(name: str) -> Identifier:
    """The identifier the Organization named ``name`` is found by, when none is configured."""
    return Identifier(system=URI_SYSTEM, value=uuid_urn("organization", name))


def organization_resource(name: str, identifier: Identifier | None = None) -> dict[str, Any]:
    """The Organization on whose behalf ``ingest`` creates the manifest (MADO Creator Organization)."""
    return Organization(
        identifier=[identifier or organization_identifier(name)], active=True, name=name
    ).to_fhir()
