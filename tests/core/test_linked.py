"""Tests for ingest.core.linked: the Patient and Endpoint resources ``ingest`` creates and their search
tokens (pure FHIR building; the resolvers over the backend are tested in tests/relay/test_links.py)."""

from __future__ import annotations

from typing import Any

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file

from ingest.core.extract import extract
from ingest.core.linked import (
    NAME_REPRESENTATION_URL,
    device_identifier,
    device_resource,
    endpoint_resource,
    human_names,
    organization_resource,
    patient_resource,
    search_token,
)
from ingest.core.records import InstanceRecord, PersonName
from ingest.core.terminology import CONNECTION_TYPE_SYSTEM, URI_SYSTEM

SYSTEM = "urn:oid:1.2.826.0.1.3680043.2.1143.99"
WADO = "https://pacs.example.org/dicom-web"
IDE = {"url": NAME_REPRESENTATION_URL, "valueCode": "IDE"}
SYL = {"url": NAME_REPRESENTATION_URL, "valueCode": "SYL"}


def charset_record(name: str) -> InstanceRecord:
    """Extract one of pydicom's character-set test files."""
    [path] = get_charset_files(name)
    return extract(pydicom.dcmread(path, stop_before_pixels=True), source=name)


def record(study: str, sop: str, patient_id: str | None = "PID-1", **fields: Any) -> InstanceRecord:
    return InstanceRecord(
        study_uid=study,
        series_uid=f"{study}.1",
        sop_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
        patient_id=patient_id,
        **fields,
    )


def names_json(name: PersonName | None) -> list[dict[str, Any]]:
    return [h.model_dump(mode="json", by_alias=True, exclude_defaults=True) for h in human_names(name)]


# --------------------------------------------------------------------------------------------------
# Names, Patient and Endpoint resources (pure)
# --------------------------------------------------------------------------------------------------


def test_japanese_three_group_name_becomes_three_human_names() -> None:
    # PS3.5 H.3.1: Yamada^Tarou=山田^太郎=やまだ^たろう (ISO 2022 IR 87)
    rec = charset_record("chrH31.dcm")
    assert names_json(rec.patient_name) == [
        {"text": "Tarou Yamada", "family": "Yamada", "given": ["Tarou"]},
        {"extension": [IDE], "text": "山田 太郎", "family": "山田", "given": ["太郎"]},
        {"extension": [SYL], "text": "やまだ たろう", "family": "やまだ", "given": ["たろう"]},
    ]


def test_japanese_half_width_katakana_alphabetic_group() -> None:
    # PS3.5 H.3.2: the alphabetic group in JIS X 0201 katakana (ISO 2022 IR 13)
    rec = charset_record("chrH32.dcm")
    names = names_json(rec.patient_name)
    assert names[0] == {"text": "ﾀﾛｳ ﾔﾏﾀﾞ", "family": "ﾔﾏﾀﾞ", "given": ["ﾀﾛｳ"]}
    assert [n.get("extension") for n in names] == [None, [IDE], [SYL]]
    assert names[1]["family"] == "山田" and names[2]["family"] == "やまだ"


def test_korean_three_group_name_becomes_three_human_names() -> None:
    # PS3.5 I.2: Hong^Gildong=洪^吉洞=홍^길동 (ISO 2022 IR 149)
    rec = charset_record("chrI2.dcm")
    assert names_json(rec.patient_name) == [
        {"text": "Gildong Hong", "family": "Hong", "given": ["Gildong"]},
        {"extension": [IDE], "text": "洪 吉洞", "family": "洪", "given": ["吉洞"]},
        {"extension": [SYL], "text": "홍 길동", "family": "홍", "given": ["길동"]},
    ]


def test_korean_single_group_patient_from_charset_file() -> None:
    rec = charset_record("chrKoreanMulti.dcm")
    patient = patient_resource(SYSTEM, "2008-3", [rec])
    assert patient == {
        "resourceType": "Patient",
        "identifier": [{"system": SYSTEM, "value": "2008-3"}],
        "name": [{"text": "김희중", "family": "김희중"}],
        "gender": "male",  # (0010,0040) M
        "birthDate": "1800-01-01",  # (0010,0030) 18000101
    }


def test_japanese_single_group_patient_from_charset_file() -> None:
    rec = charset_record("chrJapMulti.dcm")
    patient = patient_resource(SYSTEM, "2008-4", [rec])
    assert patient["name"] == [{"text": "たろう やまだ", "family": "やまだ", "given": ["たろう"]}]
    assert patient["gender"] == "male" and patient["birthDate"] == "1800-01-01"


def test_all_components_and_empty_groups() -> None:
    name = PersonName(alphabetic="Adams^John Robert Quincy^B^Rev.^B.A. M.Div.", ideographic="", phonetic="^")
    assert names_json(name) == [
        {
            "text": "Rev. John Robert Quincy B Adams B.A. M.Div.",
            "family": "Adams",
            "given": ["John Robert Quincy", "B"],
            "prefix": ["Rev."],
            "suffix": ["B.A. M.Div."],
        }
    ]
    assert human_names(None) == [] and human_names(PersonName()) == []


def test_control_characters_are_dropped_from_patient_names() -> None:
    # FHIR strings may not hold C0 controls other than tab/CR/LF: the name is kept, cleaned, not dropped
    name = PersonName(alphabetic="Ad\x1bams^Jo\x00hn\x01")
    assert names_json(name) == [{"text": "John Adams", "family": "Adams", "given": ["John"]}]


@pytest.mark.parametrize(
    ("sex", "gender"),
    [("M", "male"), ("F", "female"), ("O", "other"), ("o", "other"), ("U", None), (None, None)],
)
def test_gender_mapping(sex: str | None, gender: str | None) -> None:
    patient = patient_resource(SYSTEM, "X", [record("1.2.3", "1.2.3.1", "X", patient_sex=sex)])
    assert patient.get("gender") == gender


@pytest.mark.parametrize(
    ("raw", "expected"), [("19800229", "1980-02-29"), ("19810229", None), ("1980", None), ("", None)]
)
def test_birth_date_valid_or_dropped(raw: str, expected: str | None) -> None:
    patient = patient_resource(SYSTEM, "X", [record("1.2.3", "1.2.3.1", "X", patient_birth_date=raw)])
    assert patient.get("birthDate") == expected
    assert patient["identifier"] == [{"system": SYSTEM, "value": "X"}]


def test_demographics_come_from_the_subjects_instances() -> None:
    records = [
        record("1.2.3", "1.2.3.1", "OTHER", patient_sex="F", patient_name=PersonName(alphabetic="Wrong^One")),
        record("1.2.3", "1.2.3.2", "X", patient_sex="M", patient_name=PersonName(alphabetic="Right^One")),
    ]
    patient = patient_resource(SYSTEM, "X", records)
    assert patient["gender"] == "male"
    assert patient["name"][0]["family"] == "Right"


def test_search_token_escapes_fhir_search_characters() -> None:
    assert search_token("urn:oid:1.2", "A|B,C$D\\E") == "urn:oid:1.2|A\\|B\\,C\\$D\\\\E"
    assert search_token(URI_SYSTEM, WADO) == f"{URI_SYSTEM}|{WADO}"


def test_endpoint_resource_shape() -> None:
    """What the SMART WADO-RS Endpoint and the MADO WADO Endpoint profiles require (docs/mapping.md
    "Imaging profiles"): status active, connectionType dicom-wado-rs, payloadType endpoint-payload-type
    ``none`` with text "DICOM WADO-RS", the address, requires-access-token and Retrieve Location UID."""
    endpoint = endpoint_resource(WADO)
    location = endpoint["extension"][1]["valueString"]
    assert endpoint == {
        "resourceType": "Endpoint",
        "extension": [
            {"url": "http://fhir.org/argonaut/smart-imaging/StructureDefinition/requires-access-token",
             "valueBoolean": True},
            {"url": "https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoRetrieveLocationUIDExtension",
             "valueString": location},
        ],
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": WADO}],
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs",
            "display": "DICOM WADO-RS",
        },
        "name": "DICOMweb WADO-RS",
        "payloadType": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/endpoint-payload-type", "code": "none"}
                ],
                "text": "DICOM WADO-RS",
            }
        ],
        "payloadMimeType": ["application/dicom"],
        "address": WADO,
    }
    assert CONNECTION_TYPE_SYSTEM == "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
    # a UUID-derived UID (PS3.5 B.2), the same for the same URL, another for another URL
    assert location.startswith("2.25.") and len(location) <= 64 and location[5:].isdigit()
    assert endpoint_resource(WADO)["extension"][1]["valueString"] == location
    assert endpoint_resource(WADO + "2")["extension"][1]["valueString"] != location
    assert endpoint_resource(WADO, location_uid="1.2.3")["extension"][1]["valueString"] == "1.2.3"
    no_token = endpoint_resource(WADO, requires_access_token=False)
    assert no_token["extension"][0]["valueBoolean"] is False


def test_endpoint_outside_the_mado_profile_has_no_mado_extension() -> None:
    endpoint = endpoint_resource(WADO, mado=False)
    assert endpoint["extension"] == [
        {"url": "http://fhir.org/argonaut/smart-imaging/StructureDefinition/requires-access-token",
         "valueBoolean": True},
    ]
    assert "MADO" not in str(endpoint)


def test_linked_resources_validate_with_fhir_resources_r4b() -> None:
    """The Endpoint, Device and Organization pass an independent R4(B) implementation."""
    from fhir.resources.R4B.device import Device
    from fhir.resources.R4B.endpoint import Endpoint
    from fhir.resources.R4B.organization import Organization

    Endpoint.model_validate(endpoint_resource(WADO))
    Device.model_validate(device_resource("ingest", "1.2.3", manufacturer="ACME", owner="Organization/o1"))
    Organization.model_validate(organization_resource("Synthetic Imaging"))


def test_device_resource_is_the_mado_creator() -> None:
    device = device_resource("ingest", "1.2.3", manufacturer="ACME")
    # MadoCreator: type.coding 1..1 = MadoDeviceType#mado-creator "MADO Creator"; manufacturer
    assert device["type"] == {
        "coding": [{"system": "https://profiles.ihe.net/RAD/MADO/CodeSystem/MadoDeviceType",
                    "code": "mado-creator", "display": "MADO Creator"}]
    }
    assert device["manufacturer"] == "ACME"
    assert device["deviceName"] == [{"name": "ingest", "type": "model-name"}]
    assert device["version"] == [{"value": "1.2.3"}]
    assert device["identifier"] == [{"system": URI_SYSTEM, "value": device_identifier("ingest").value}]
    assert device["identifier"][0]["system"] == URI_SYSTEM
    assert device["identifier"][0]["value"].startswith("urn:uuid:")
    assert "owner" not in device
    assert device_resource("ingest", "9")["identifier"] == device["identifier"]  # found again by it
    assert device_resource("other", "1")["identifier"] != device["identifier"]


def test_ct_small_patient_resource_is_valid_fhir() -> None:
    """A real file's demographics pass the strict R4 model the embedded backend validates with."""
    from ingest.core.fhir import validate_resource

    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    rec = extract(pydicom.dcmread(path, stop_before_pixels=True), source="CT_small")
    assert rec.patient_id
    resource = patient_resource(SYSTEM, rec.patient_id, [rec])
    validate_resource(resource)
    assert resource["name"][0]["family"] == "CompressedSamples"
