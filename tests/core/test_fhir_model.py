"""Tests for ingest.core.fhir: FHIR R4 models, primitive rules, serialisation, validate_resource."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fhir.resources.R4B.imagingstudy import ImagingStudy as R4BImagingStudy
from pydantic import TypeAdapter, ValidationError

from ingest.core.fhir import (
    Annotation,
    CodeableConcept,
    Coding,
    Endpoint,
    Extension,
    HumanName,
    Identifier,
    ImagingStudy,
    ImagingStudySeries,
    ImagingStudySeriesInstance,
    ImagingStudySeriesPerformer,
    Meta,
    Narrative,
    Patient,
    Period,
    PositiveInt,
    Reference,
    prune_empty,
    validate_resource,
)

DCM = "http://dicom.nema.org/resources/ontology/DCM"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def check_r4b(resource: dict[str, Any]) -> None:
    """Every ImagingStudy these tests build must also pass the independent fhir.resources model."""
    R4BImagingStudy.model_validate(resource)


def full_study() -> ImagingStudy:
    """An ImagingStudy that uses every element of the R4 definition."""
    ref = Reference(reference="Patient/p-1")
    return ImagingStudy(
        id="study-1",
        meta=Meta(version_id="7", last_updated="2024-05-01T10:15:00.123Z", tag=[Coding(code="t")]),
        implicit_rules="http://example.org/rules",
        language="en-GB",
        text=Narrative(status="generated", div='<div xmlns="http://www.w3.org/1999/xhtml">CT</div>'),
        contained=[{"resourceType": "Patient", "id": "p", "gender": "other"}],
        extension=[
            Extension(url="http://example.org/a", value_string="a"),
            Extension(
                url="http://example.org/nested",
                extension=[Extension(url="part", value_integer=-3), Extension(url="ok", value_boolean=False)],
            ),
        ],
        modifier_extension=[Extension(url="http://example.org/m", value_code="x")],
        identifier=[
            Identifier(system="urn:dicom:uid", value=f"urn:oid:{STUDY_UID}"),
            Identifier(
                type=CodeableConcept(
                    coding=[Coding(system="http://terminology.hl7.org/CodeSystem/v2-0203", code="ACSN")]
                ),
                value="ACC-1",
                period=Period(start="2024"),
                assigner=Reference(display="Radiology"),
            ),
        ],
        status="available",
        modality=[Coding(system=DCM, code="CT")],
        subject=Reference(
            type="Patient", identifier=Identifier(system="urn:oid:1.2.3", value="PID-1"), display="Jane Doe"
        ),
        encounter=Reference(reference="Encounter/e-1"),
        started="2024-05-01T10:15:00+02:00",
        based_on=[Reference(reference="ServiceRequest/sr-1")],
        referrer=Reference(display="Dr Who"),
        interpreter=[Reference(display="Dr A"), Reference(display="Dr B")],
        endpoint=[Reference(reference="Endpoint/wado")],
        number_of_series=1,
        number_of_instances=1,
        procedure_reference=Reference(reference="Procedure/pr-1"),
        procedure_code=[
            CodeableConcept(coding=[Coding(system="http://loinc.org", code="24627-2")], text="CT")
        ],
        location=Reference(reference="Location/l-1"),
        reason_code=[CodeableConcept(text="Cough")],
        reason_reference=[Reference(reference="Condition/c-1")],
        note=[Annotation(author_string="Tech", time="2024-05-01", text="**moved**")],
        description="CT CHEST",
        series=[
            ImagingStudySeries(
                id="s1",
                modifier_extension=[Extension(url="http://example.org/sm", value_uri="urn:x")],
                uid=SERIES_UID,
                number=0,
                modality=Coding(system=DCM, code="CT"),
                description="AXIAL",
                number_of_instances=1,
                endpoint=[ref.model_copy(update={"reference": "Endpoint/e2"})],
                body_site=Coding(system="http://snomed.info/sct", code="51185008", display="Thorax"),
                laterality=Coding(system="http://snomed.info/sct", code="24028007", display="Right"),
                specimen=[Reference(reference="Specimen/sp-1")],
                started="2024-05-01",
                performer=[
                    ImagingStudySeriesPerformer(
                        function=CodeableConcept(
                            coding=[
                                Coding(
                                    system="http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                    code="PRF",
                                )
                            ]
                        ),
                        actor=Reference(display="Op"),
                    )
                ],
                instance=[
                    ImagingStudySeriesInstance(
                        uid=f"{SERIES_UID}.1",
                        sop_class=Coding(
                            system="urn:ietf:rfc:3986",
                            code=f"urn:oid:{CT_STORAGE}",
                            display="CT Image Storage",
                        ),
                        number=1,
                        title="Slice 1",
                    )
                ],
            )
        ],
    )


def test_full_study_serialises_with_fhir_json_names_and_validates_with_r4b() -> None:
    data = full_study().to_fhir()
    assert next(iter(data)) == "resourceType"
    assert data["resourceType"] == "ImagingStudy"
    assert data["numberOfSeries"] == 1
    assert data["basedOn"] == [{"reference": "ServiceRequest/sr-1"}]
    assert data["procedureCode"][0]["coding"][0] == {"system": "http://loinc.org", "code": "24627-2"}
    assert data["meta"] == {
        "versionId": "7",
        "lastUpdated": "2024-05-01T10:15:00.123Z",
        "tag": [{"code": "t"}],
    }
    assert data["implicitRules"] == "http://example.org/rules"
    assert data["modifierExtension"] == [{"url": "http://example.org/m", "valueCode": "x"}]
    assert data["extension"][1]["extension"][0] == {"url": "part", "valueInteger": -3}
    assert data["extension"][1]["extension"][1] == {"url": "ok", "valueBoolean": False}
    assert data["note"] == [{"authorString": "Tech", "time": "2024-05-01", "text": "**moved**"}]
    series = data["series"][0]
    assert series["number"] == 0  # 0 is a value, not an empty one
    assert series["bodySite"]["code"] == "51185008"
    assert series["instance"][0]["sopClass"]["code"] == f"urn:oid:{CT_STORAGE}"
    assert series["instance"][0]["number"] == 1
    assert series["modifierExtension"] == [{"url": "http://example.org/sm", "valueUri": "urn:x"}]
    check_r4b(data)


def test_round_trip_through_json() -> None:
    study = full_study()
    text = json.dumps(study.to_fhir())
    again = ImagingStudy.from_fhir(json.loads(text))
    assert again == study
    assert again.to_fhir() == study.to_fhir()


def test_to_fhir_omits_empty_values_recursively() -> None:
    study = ImagingStudy(
        status="registered",
        subject=Reference(display="x"),
        identifier=[Identifier(system="urn:dicom:uid", value="urn:oid:1.2", type=CodeableConcept())],
        contained=[{"resourceType": "Basic", "id": "b", "note": "", "code": {"coding": []}, "x": [{}]}],
        series=[ImagingStudySeries(uid="1.2.3", modality=Coding(code="MR"), instance=[])],
    )
    data = study.to_fhir()
    assert data == {
        "resourceType": "ImagingStudy",
        "contained": [{"resourceType": "Basic", "id": "b"}],
        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2"}],
        "status": "registered",
        "subject": {"display": "x"},
        "series": [{"uid": "1.2.3", "modality": {"code": "MR"}}],
    }
    check_r4b({k: v for k, v in data.items() if k != "contained"})


def test_prune_empty() -> None:
    assert prune_empty({"a": "", "b": [], "c": {}, "d": [{}, None, ""], "e": {"f": {"g": []}}}) is None
    assert prune_empty({"a": 0, "b": False, "c": [" "], "d": ({"x": 1},)}) == {
        "a": 0,
        "b": False,
        "c": [" "],
        "d": [{"x": 1}],
    }


def test_snake_case_and_json_names_both_accepted() -> None:
    by_name = ImagingStudy(status="available", subject=Reference(display="p"), number_of_instances=3)
    by_alias = ImagingStudy.model_validate(
        {"status": "available", "subject": {"display": "p"}, "numberOfInstances": 3}
    )
    assert by_name == by_alias
    assert by_name.number_of_instances == 3


def test_lists_are_stored_as_tuples_and_models_are_frozen() -> None:
    study = ImagingStudy(status="available", subject=Reference(display="p"), modality=[Coding(code="CT")])
    assert study.modality == (Coding(code="CT"),)
    assert study == ImagingStudy(
        status="available", subject=Reference(display="p"), modality=(Coding(code="CT"),)
    )
    with pytest.raises(ValidationError):
        study.status = "cancelled"


def _minimal() -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "status": "available",
        "subject": {"display": "p"},
        "series": [
            {
                "uid": "1.2.3",
                "modality": {"system": DCM, "code": "CT"},
                "instance": [{"uid": "1.2.3.4", "sopClass": {"code": "urn:oid:1.2"}}],
            }
        ],
    }


def _with(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    data = _minimal()
    target: Any = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("id",), "bad_id"),  # '_' is not in the id alphabet
        (("id",), "x" * 65),  # longer than 64
        (("series", 0, "uid"), "1.2.3_not valid uid"),
        (("started",), "2024-05-01T10:15:00"),  # a time requires a zone
        (("started",), "2024-05-01T10:15Z"),  # a time requires seconds
        (("started",), "2024-13-01"),
        (("started",), "2024-02-30"),  # no such day
        (("started",), "20240501"),  # DICOM DA, not FHIR
        (("started",), ""),
        (("numberOfSeries",), -1),  # unsignedInt
        (("numberOfSeries",), "1"),  # a number, not a string
        (("numberOfSeries",), True),
        (("numberOfSeries",), 1.5),
        (("numberOfSeries",), 2**31),
        (("series", 0, "instance", 0, "number"), -4),
        (("status",), "bogus"),
        (("status",), "Available"),
        (("description",), ""),  # string: non-empty
        (("description",), 5),
        (("series", 0, "modality", "system"), "http://has space"),  # uri: no whitespace
        (("series", 0, "modality", "code"), "two  spaces"),  # code: single spaces between tokens
        (("series", 0, "modality", "code"), " CT"),
        (("meta",), {"lastUpdated": "2024-05-01"}),  # instant: full timestamp
        (("meta",), {"versionId": "a b"}),
        (("unknownElement",), 1),
        (("series", 0, "unknownElement"), 1),
        (("_status",), {"extension": []}),
        (("subject",), None),  # 1..1
        (("series", 0, "instance", 0, "sopClass"), None),  # 1..1
        (("extension",), [{"url": "http://x"}]),  # ext-1: a value or nested extensions
        (("extension",), [{"url": "http://x", "valueString": "a", "valueCode": "b"}]),
        (
            ("extension",),
            [{"url": "http://x", "valueString": "a", "extension": [{"url": "y", "valueCode": "b"}]}],
        ),
        (("note",), [{"text": "x", "authorString": "a", "authorReference": {"display": "b"}}]),
        (("text",), {"status": "generated", "div": "plain text"}),
        (("contained",), [{"id": "no-type"}]),
        (("contained",), [{"resourceType": "Patient", "gender": "robot"}]),
        (("contained",), [{"resourceType": "Basic", "contained": [{"resourceType": "Basic"}]}]),
    ],
)
def test_bad_values_are_rejected(path: tuple[str | int, ...], value: Any) -> None:
    data = _with(path, value)
    with pytest.raises((ValidationError, ValueError)):
        ImagingStudy.from_fhir(data)
    with pytest.raises((ValidationError, ValueError)):
        validate_resource(data)


@pytest.mark.parametrize(
    "started",
    [
        "2024",
        "2024-05",
        "2024-05-01",
        "2024-02-29",  # leap day
        "2024-05-01T10:15:00Z",
        "2024-05-01T10:15:00.123456-05:00",
        "2024-05-01T23:59:60+14:00",
    ],
)
def test_good_datetimes_are_accepted(started: str) -> None:
    data = _with(("started",), started)
    assert ImagingStudy.from_fhir(data).started == started
    validate_resource(data)
    check_r4b(data)


def test_positive_int_rejects_zero() -> None:
    adapter: TypeAdapter[int] = TypeAdapter(PositiveInt)
    assert adapter.validate_python(1) == 1
    with pytest.raises(ValidationError):
        adapter.validate_python(0)


def test_errors_name_the_path_and_never_echo_the_value() -> None:
    data = _with(("series", 0, "uid"), "SECRET_1")
    with pytest.raises(ValidationError) as info:
        validate_resource(data)
    assert info.value.errors()[0]["loc"] == ("series", 0, "uid")
    assert "SECRET_1" not in str(info.value)

    patient = {"resourceType": "Patient", "birthDate": "1970-02-31"}  # PHI must not reach a log line
    with pytest.raises(ValidationError) as pinfo:
        validate_resource(patient)
    assert pinfo.value.errors()[0]["loc"] == ("birthDate",)
    assert "1970-02-31" not in str(pinfo.value)


def test_lenient_read_drops_unknown_elements() -> None:
    backend_copy = _minimal() | {"id": "abc", "_status": {"extension": []}, "newR5Element": {"x": 1}}
    backend_copy["series"][0]["serverAddition"] = True
    with pytest.raises(ValidationError):
        ImagingStudy.from_fhir(backend_copy)
    study = ImagingStudy.from_fhir(backend_copy, lenient=True)
    assert study.id == "abc"
    assert study.series[0].uid == "1.2.3"
    out = study.to_fhir()
    assert "newR5Element" not in out
    assert "serverAddition" not in out["series"][0]
    # lenient is about unknown elements only: known elements are still checked
    with pytest.raises(ValidationError):
        ImagingStudy.from_fhir(_with(("status",), "bogus") | {"x": 1}, lenient=True)


def test_from_fhir_checks_resource_type() -> None:
    with pytest.raises(ValueError, match="resourceType"):
        ImagingStudy.from_fhir({k: v for k, v in _minimal().items() if k != "resourceType"})
    with pytest.raises(ValueError, match="resourceType"):
        ImagingStudy.from_fhir(_minimal() | {"resourceType": "Patient"})


def test_validate_resource_dispatches_on_resource_type() -> None:
    validate_resource(_minimal())
    validate_resource(
        {
            "resourceType": "Patient",
            "id": "p-1",
            "identifier": [{"system": "urn:oid:1.2.3", "value": "PID-1"}],
            "active": True,
            "name": [{"family": "Doe", "given": ["Jane"]}],
            "gender": "female",
            "birthDate": "1970-01-01",
        }
    )
    validate_resource(
        {
            "resourceType": "Endpoint",
            "status": "active",
            "connectionType": {
                "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                "code": "dicom-wado-rs",
            },
            "name": "PACS",
            "payloadType": [{"text": "DICOM"}],
            "payloadMimeType": ["application/dicom"],
            "address": "https://pacs.example.org/dicomweb",
        }
    )
    with pytest.raises(ValueError, match="resourceType"):
        validate_resource({"status": "available"})
    with pytest.raises(ValueError, match="resourceType"):
        validate_resource({"resourceType": "Observation"})
    with pytest.raises(ValidationError):
        validate_resource({"resourceType": "Patient", "gender": "M"})
    with pytest.raises(ValidationError):
        validate_resource({"resourceType": "Patient", "active": "yes"})
    with pytest.raises(ValidationError):  # payloadType is 1..*
        validate_resource(
            {
                "resourceType": "Endpoint",
                "status": "active",
                "connectionType": {"code": "dicom-wado-rs"},
                "payloadType": [],
                "address": "https://pacs.example.org/dicomweb",
            }
        )
    with pytest.raises(ValidationError):
        validate_resource(
            {
                "resourceType": "Endpoint",
                "status": "on",
                "connectionType": {"code": "dicom-wado-rs"},
                "payloadType": [{"text": "DICOM"}],
                "address": "https://pacs.example.org/dicomweb",
            }
        )


def test_patient_and_endpoint_models_serialise() -> None:
    patient = Patient(
        id="p-1",
        name=[HumanName(family="Doe", given=["Jane"], use="official")],
        gender="female",
        birth_date="1970",
    )
    assert patient.to_fhir() == {
        "resourceType": "Patient",
        "id": "p-1",
        "name": [{"use": "official", "family": "Doe", "given": ["Jane"]}],
        "gender": "female",
        "birthDate": "1970",
    }
    endpoint = Endpoint(
        status="active",
        connection_type=Coding(code="dicom-wado-rs"),
        payload_type=[CodeableConcept(text="DICOM")],
        payload_mime_type=["application/dicom"],
        address="https://pacs.example.org/dicomweb",
    )
    data = endpoint.to_fhir()
    assert data["payloadMimeType"] == ["application/dicom"]
    assert data["connectionType"] == {"code": "dicom-wado-rs"}
    assert Endpoint.from_fhir(data) == endpoint


def test_prune_empty_handles_every_json_like_container_and_scalar() -> None:
    from types import MappingProxyType

    class Label(str):
        pass

    value = {
        "proxy": MappingProxyType({"x": "", "y": 1.5}),  # a Mapping that is not a dict
        "nested": ((), [[], [None, ""]], ({"z": None},)),  # tuples and lists, all empty
        "blank": Label(""),  # a str subclass that is empty
        "text": Label("t"),
        "zero": 0.0,
        "list": [0, False, "", "s", {"k": []}],
    }
    assert prune_empty(value) == {"proxy": {"y": 1.5}, "text": "t", "zero": 0.0, "list": [0, False, "s"]}
    assert prune_empty("") is None
    assert prune_empty(()) is None
    assert prune_empty(0) == 0
