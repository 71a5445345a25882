"""Study aggregate -> FHIR R4 ImagingStudy (docs/mapping.md), validated with fhir.resources' R4B model."""

from __future__ import annotations

import json
from typing import Any

import pydicom
import pytest
from fhir.resources.R4B.imagingstudy import ImagingStudy as R4BImagingStudy
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset

from ingest.core.aggregate import aggregate
from ingest.core.mapping import MappingOptions, build_imaging_study, issuer_system, person_display
from ingest.core.records import Code, InstanceRecord, PersonName

STUDY = "1.2.826.0.1.3680043.8.498.77"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
BASIC_SR = "1.2.840.10008.5.1.4.1.1.88.11"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"

PATIENT_ID = "PID-4711"
PATIENT_NAME = PersonName(alphabetic="Müller^Jürgen^Karl^Dr.^Jr.")


def rec(series: str, sop: str, **fields: Any) -> InstanceRecord:
    defaults: dict[str, Any] = {
        "sop_class_uid": CT,
        "modality": "CT",
        "patient_id": PATIENT_ID,
        "patient_name": PATIENT_NAME,
        "study_date": "20240115",
        "study_time": "083000",
    }
    defaults.update(fields)
    return InstanceRecord(
        study_uid=STUDY, series_uid=f"{STUDY}.{series}", sop_uid=f"{STUDY}.{series}.{sop}", **defaults
    )


def build(records: list[InstanceRecord], **options: Any) -> tuple[dict[str, Any], list[str]]:
    study, warnings = build_imaging_study(aggregate(records), MappingOptions(**options))
    resource = study.to_fhir()
    R4BImagingStudy.model_validate(resource)  # every produced resource is valid FHIR
    return resource, warnings


def full_study() -> list[InstanceRecord]:
    common: dict[str, Any] = {
        "accession_number": "ACC-1",
        "accession_issuer_uid": "2.16.840.1.113883.3.1",
        "accession_issuer_uid_type": "ISO",
        "study_id": "S1",
        "study_description": "CT Thorax",
        "timezone_offset": "+0100",
        "referring_physician": PersonName(alphabetic="Who^John"),
        "reading_physicians": (PersonName(alphabetic="Reader^Ann"), PersonName(alphabetic="Second^Bob")),
        "procedure_codes": (Code(designator="LN", value="24627-2", meaning="CT Chest"),),
        "reason_text": "Cough",
        "reason_codes": (Code(designator="SCT", value="49727002", meaning="Cough"),),
    }
    ct = {
        **common,
        "series_number": 2,
        "series_description": "Lung 1mm",
        "body_part": "CHEST",
        "laterality": "B",
        "series_date": "20240115",
        "series_time": "083512",
        "performing_physicians": (PersonName(alphabetic="Perf^Paula"),),
        "operators": (PersonName(alphabetic="Tech^Tom"),),
    }
    return [
        rec("2", "3", instance_number=3, **ct),
        rec("2", "1", instance_number=1, **ct),
        rec("2", "2", instance_number=2, **ct),
        rec("2", "10", **ct),  # no Instance Number: last
        rec(
            "9",
            "1",
            **{**common, "modality": "SR", "sop_class_uid": BASIC_SR},
            series_number=900,
            concept_name="Imaging Report",
        ),
    ]


# --------------------------------------------------------------------------------------------------
# study level
# --------------------------------------------------------------------------------------------------


def test_full_study_maps_every_study_level_row() -> None:
    resource, warnings = build(full_study(), endpoint_reference="Endpoint/wado")
    assert warnings == []
    assert resource["status"] == "available"
    # types as the MADO identifier profiles fix them: DCM 110180; v2-0203 ACSN and DCM 121022
    assert resource["identifier"] == [
        {
            "type": {"coding": [{"system": DCM, "code": "110180", "display": "Study Instance UID"}]},
            "system": "urn:dicom:uid",
            "value": f"urn:oid:{STUDY}",
        },
        {
            "type": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN",
                     "display": "Accession ID"},
                    {"system": DCM, "code": "121022", "display": "Accession Number"},
                ]
            },
            "system": "urn:oid:2.16.840.1.113883.3.1",
            "value": "ACC-1",
        },
    ]
    assert resource["modality"] == [{"system": DCM, "code": "CT"}]
    assert resource["started"] == "2024-01-15T08:30:00+01:00"
    assert resource["referrer"] == {"display": "John Who"}
    assert resource["interpreter"] == [{"display": "Ann Reader"}, {"display": "Bob Second"}]
    assert resource["endpoint"] == [{"reference": "Endpoint/wado"}]
    assert resource["numberOfSeries"] == 2
    assert resource["numberOfInstances"] == 5
    assert resource["procedureCode"] == [
        {
            "coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}],
            "text": "CT Chest",
        }
    ]
    assert resource["reasonCode"] == [
        {"coding": [{"system": SCT, "code": "49727002", "display": "Cough"}], "text": "Cough"}
    ]
    assert resource["description"] == "CT Thorax"
    assert "note" not in resource and "location" not in resource


def test_study_id_only_when_configured() -> None:
    without, _ = build(full_study())
    assert all(i.get("use") != "secondary" for i in without["identifier"])
    with_id, _ = build(full_study(), include_study_id=True)
    assert with_id["identifier"][2] == {"use": "secondary", "value": "S1"}


@pytest.mark.parametrize(
    ("uid", "kind", "local", "system"),
    [
        ("2.16.840.1.113883.3.1", "ISO", None, "urn:oid:2.16.840.1.113883.3.1"),
        ("https://hospital.example/acsn", "URI", None, "https://hospital.example/acsn"),
        ("https://hospital.example/acsn", "URL", None, "https://hospital.example/acsn"),
        (None, None, "urn:oid:1.2.3", "urn:oid:1.2.3"),
        (None, None, "RIS-A", None),  # a local namespace that is no URI gives no system
        ("hospital.example", "DNS", None, None),
        ("1.2.03", "ISO", None, None),  # not an OID
    ],
)
def test_accession_issuer_system(
    uid: str | None, kind: str | None, local: str | None, system: str | None
) -> None:
    records = [
        rec(
            "1",
            "1",
            accession_number="A9",
            accession_issuer_uid=uid,
            accession_issuer_uid_type=kind,
            accession_issuer_local=local,
        )
    ]
    resource, _ = build(records)
    accession = resource["identifier"][1]
    assert accession["value"] == "A9"
    assert accession.get("system") == system


def test_modality_is_the_sorted_union_of_acquisition_modalities_only() -> None:
    records = [
        rec("1", "1", modality="MR", sop_class_uid=MR),
        rec("2", "1", modality="CT"),
        rec("3", "1", modality="SR", sop_class_uid=BASIC_SR),
        rec("4", "1", modality="KO", sop_class_uid=KOS),
        rec("5", "1", modality="PR", sop_class_uid=GSPS),
        rec("6", "1", modality="SEG", sop_class_uid=SEG),
        rec("7", "1", modality="CT"),
    ]
    resource, _ = build(records)
    assert resource["modality"] == [{"system": DCM, "code": "CT"}, {"system": DCM, "code": "MR"}]
    by_uid = {s["uid"]: s["modality"]["code"] for s in resource["series"]}
    assert by_uid == {
        f"{STUDY}.{n}": m for n, m in zip("1234567", ["MR", "CT", "SR", "KO", "PR", "SEG", "CT"], strict=True)
    }


def test_study_of_only_non_acquisition_objects_has_no_modality() -> None:
    resource, _ = build([rec("1", "1", modality="SR", sop_class_uid=BASIC_SR)])
    assert "modality" not in resource


# --------------------------------------------------------------------------------------------------
# subject
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "default", "system"),
    [
        (
            {"patient_id_issuer_uid": "1.2.840.99", "patient_id_issuer_uid_type": "ISO"},
            None,
            "urn:oid:1.2.840.99",
        ),
        (
            {"patient_id_issuer_uid": "https://mpi.example/p", "patient_id_issuer_uid_type": "URI"},
            None,
            "https://mpi.example/p",
        ),
        ({"patient_id_issuer": "urn:oid:1.2.5"}, "urn:oid:9.9", "urn:oid:1.2.5"),
        ({"patient_id_issuer": "http://mpi.example"}, None, "http://mpi.example"),
        ({"patient_id_issuer": "HOSP A"}, "urn:oid:9.9", "urn:oid:9.9"),
        ({}, "urn:oid:9.9", "urn:oid:9.9"),
        ({}, None, None),
    ],
)
def test_subject_identifier_system(fields: dict[str, Any], default: str | None, system: str | None) -> None:
    resource, _ = build([rec("1", "1", **fields)], patient_default_system=default)
    subject = resource["subject"]
    assert subject["type"] == "Patient"
    expected = {"value": PATIENT_ID} if system is None else {"system": system, "value": PATIENT_ID}
    assert subject["identifier"] == expected
    assert subject["display"] == "Dr. Jürgen Karl Müller Jr."


def test_subject_without_patient_id_has_display_only_and_a_warning() -> None:
    resource, warnings = build([rec("1", "1", patient_id=None)])
    assert resource["subject"] == {"type": "Patient", "display": "Dr. Jürgen Karl Müller Jr."}
    assert any("0010,0020" in w for w in warnings)


def test_subject_without_a_patient_id_or_name_says_the_patient_is_unknown() -> None:
    # never an empty reference: R4's 1..1 subject carries the Data Absent Reason extension instead
    resource, warnings = build([rec("1", "1", patient_id=None, patient_name=None)])
    assert resource["subject"] == {
        "extension": [
            {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}
        ],
        "type": "Patient",
    }
    assert any("0010,0020" in w and "0010,0010" in w and "data-absent-reason" in w for w in warnings)
    assert not any("Müller" in w or PATIENT_ID in w for w in warnings)


def test_private_coding_scheme_keeps_code_and_display_without_an_invented_system() -> None:
    private = Code(designator="99MKC", value="CTCHEST", meaning="CT chest w/o contrast", version="2")
    resource, _ = build(
        [rec("1", "1", procedure_codes=(private,), reason_codes=(private,), reason_text=None)]
    )
    coding = {"code": "CTCHEST", "display": "CT chest w/o contrast"}  # no system, so no version either
    assert resource["procedureCode"] == [{"coding": [coding], "text": "CT chest w/o contrast"}]
    assert resource["reasonCode"] == [{"coding": [coding]}]
    assert "urn:dicom:csd" not in json.dumps(resource)


@pytest.mark.parametrize(
    ("name", "display"),
    [
        (PersonName(alphabetic="Doe^John"), "John Doe"),
        (PersonName(alphabetic="Doe"), "Doe"),
        (PersonName(alphabetic="Doe^John^^^"), "John Doe"),
        (PersonName(alphabetic="  Doe ^ John  "), "John Doe"),
        (PersonName(alphabetic="^^^^"), None),
        (PersonName(alphabetic="", ideographic="山田^太郎"), "山田 太郎"),
        (PersonName(alphabetic="", ideographic="", phonetic="やまだ^たろう"), "やまだ たろう"),
        (None, None),
    ],
)
def test_person_display(name: PersonName | None, display: str | None) -> None:
    assert person_display(name) == display


def _decoded_name(filename: str) -> PersonName:
    """Patient's Name decoded by pydicom with the file's Specific Character Set."""
    ds = pydicom.dcmread(get_charset_files(filename)[0])
    pn = ds.PatientName
    return PersonName(alphabetic=pn.alphabetic, ideographic=pn.ideographic, phonetic=pn.phonetic)


def test_japanese_name_keeps_exact_unicode() -> None:
    name = _decoded_name("chrH31.dcm")  # ISO 2022 IR 87: Yamada^Tarou=山田^太郎=やまだ^たろう
    assert name.ideographic == "山田^太郎"
    resource, _ = build([rec("1", "1", patient_name=name)])
    assert resource["subject"]["display"] == "Tarou Yamada"
    ideographic_only = name.model_copy(update={"alphabetic": ""})
    resource, _ = build([rec("1", "1", patient_name=ideographic_only)])
    assert resource["subject"]["display"] == "山田 太郎"


def test_korean_name_keeps_exact_unicode() -> None:
    name = _decoded_name("chrKoreanMulti.dcm")  # ISO 2022 IR 149, Hangul in the alphabetic group
    resource, _ = build([rec("1", "1", patient_name=name, referring_physician=_decoded_name("chrI2.dcm"))])
    assert resource["subject"]["display"] == "김희중"
    assert resource["referrer"]["display"] == "Gildong Hong"
    assert json.loads(json.dumps(resource, ensure_ascii=False))["subject"]["display"] == "김희중"


def test_warnings_carry_no_patient_data() -> None:
    records = [
        rec("1", "1", patient_id="SECRET-ID", study_date="20241301", modality=None, body_part="NOPE"),
        rec(
            "1",
            "2",
            patient_id="OTHER-ID",
            patient_name=PersonName(alphabetic="Secret^Name"),
            instance_number=-1,
        ),
    ]
    _, warnings = build(records)
    assert warnings
    for warning in warnings:
        for secret in ("SECRET-ID", "OTHER-ID", "Secret", "Müller", "20241301"):
            assert secret not in warning


# --------------------------------------------------------------------------------------------------
# dates
# --------------------------------------------------------------------------------------------------


def test_started_uses_site_timezone_without_offset() -> None:
    january, _ = build([rec("1", "1", study_time="1200")], site_timezone="America/New_York")
    july, _ = build(
        [rec("1", "1", study_date="20240715", study_time="1200")], site_timezone="America/New_York"
    )
    assert january["started"] == "2024-01-15T12:00:00-05:00"
    assert july["started"] == "2024-07-15T12:00:00-04:00"


def test_started_is_date_only_without_any_zone() -> None:
    resource, _ = build([rec("1", "1")])
    assert resource["started"] == "2024-01-15"


def test_impossible_date_drops_started_not_the_instance() -> None:
    resource, warnings = build(
        [rec("1", "1", study_date="20240230", series_date="20240230", series_time="1200")]
    )
    assert "started" not in resource
    assert "started" not in resource["series"][0]
    assert resource["numberOfInstances"] == 1
    assert len(warnings) == 2


def test_series_started() -> None:
    resource, _ = build(
        [rec("1", "1", series_date="20240715", series_time="101530.25", timezone_offset="-0500")]
    )
    assert resource["series"][0]["started"] == "2024-07-15T10:15:30.25-05:00"


# --------------------------------------------------------------------------------------------------
# series and instances
# --------------------------------------------------------------------------------------------------


def test_full_study_series_and_instances() -> None:
    resource, _ = build(full_study())
    ct, sr = resource["series"]
    assert ct["uid"] == f"{STUDY}.2"
    assert ct["number"] == 2
    assert ct["modality"] == {"system": DCM, "code": "CT"}
    assert ct["description"] == "Lung 1mm"
    assert ct["numberOfInstances"] == 4
    assert ct["bodySite"] == {"system": SCT, "code": "51185008", "display": "Thorax"}
    assert ct["laterality"] == {"system": SCT, "code": "51440002", "display": "Right and left"}
    assert ct["started"] == "2024-01-15T08:35:12+01:00"
    assert ct["performer"] == [
        {
            "function": {"coding": [{"system": PARTICIPATION, "code": "PRF"}]},
            "actor": {"display": "Paula Perf"},
        },
        {
            "function": {"coding": [{"system": PARTICIPATION, "code": "SPRF"}]},
            "actor": {"display": "Tom Tech"},
        },
    ]
    assert [i["uid"].rsplit(".", 1)[1] for i in ct["instance"]] == ["1", "2", "3", "10"]
    assert [i.get("number") for i in ct["instance"]] == [1, 2, 3, None]
    assert ct["instance"][0]["sopClass"] == {
        "system": "urn:ietf:rfc:3986",
        "code": f"urn:oid:{CT}",
        "display": "CT Image Storage",
    }
    assert all("title" not in i for i in ct["instance"])  # multi-instance series, no label
    assert sr["modality"]["code"] == "SR"
    assert sr["instance"][0]["title"] == "Imaging Report"  # SR concept name
    assert sr["instance"][0]["sopClass"]["display"] == "Basic Text SR Storage"


def test_series_order_by_number_then_uid() -> None:
    records = [
        rec("5", "1", series_number=1),
        rec("4", "1", series_number=1),
        rec("3", "1"),
        rec("2", "1", series_number=0),
    ]
    resource, _ = build(records)
    assert [s["uid"][-1] for s in resource["series"]] == ["2", "4", "5", "3"]


def test_instance_order_by_number_then_uid() -> None:
    records = [
        rec("1", "b", instance_number=2),
        rec("1", "a", instance_number=2),
        rec("1", "c", instance_number=1),
    ]
    resource, _ = build(records)
    assert [i["uid"][-1] for i in resource["series"][0]["instance"]] == ["c", "a", "b"]


def test_instance_title_rules() -> None:
    labelled = rec("1", "1", content_label="SEG_LUNG", series_description="Desc", concept_name="X")
    single = rec("2", "1", series_description="Only one")
    pair = [rec("3", "1", series_description="Two"), rec("3", "2", series_description="Two")]
    resource, _ = build([labelled, single, *pair])
    titles = {s["uid"][-1]: [i.get("title") for i in s["instance"]] for s in resource["series"]}
    assert titles == {"1": ["SEG_LUNG"], "2": ["Only one"], "3": [None, None]}


def test_instances_can_be_left_out_with_exact_counts() -> None:
    resource, _ = build(full_study(), include_instances=False)
    assert all("instance" not in s for s in resource["series"])
    assert [s["numberOfInstances"] for s in resource["series"]] == [4, 1]
    assert resource["numberOfInstances"] == 5


def test_missing_modality_is_coded_ot_with_warning() -> None:
    resource, warnings = build([rec("1", "1", modality=None)])
    assert resource["series"][0]["modality"] == {"system": DCM, "code": "OT"}
    assert "modality" not in resource
    assert any("0008,0060" in w for w in warnings)


def test_unknown_body_part_is_omitted_with_warning() -> None:
    resource, warnings = build([rec("1", "1", body_part="BELLYBUTTON")])
    assert "bodySite" not in resource["series"][0]
    assert any("BELLYBUTTON" in w and "0018,0015" in w for w in warnings)


def test_unpaired_laterality_is_omitted_silently() -> None:
    resource, warnings = build([rec("1", "1", laterality="U")])
    assert "laterality" not in resource["series"][0]
    assert warnings == []


def test_negative_numbers_are_dropped_with_warning() -> None:
    resource, warnings = build([rec("1", "1", series_number=-2, instance_number=-1)])
    assert "number" not in resource["series"][0]
    assert "number" not in resource["series"][0]["instance"][0]
    assert len(warnings) == 2


def test_operator_function_is_configurable() -> None:
    records = [rec("1", "1", operators=(PersonName(alphabetic="Tech^Tom"),))]
    resource, _ = build(records, operator_function="SPRF")
    assert resource["series"][0]["performer"][0]["function"]["coding"][0]["code"] == "SPRF"
    resource, _ = build(records, operator_function=None)
    assert resource["series"][0]["performer"] == [{"actor": {"display": "Tom Tech"}}]


def test_disagreeing_instances_are_reported() -> None:
    records = [
        rec("1", "1", study_description="A"),
        rec("1", "2", study_description="A"),
        rec("1", "3", study_description="B"),
    ]
    resource, warnings = build(records)
    assert resource["description"] == "A"
    assert any("0008,1030" in w for w in warnings)


def test_real_file_header_maps_to_valid_fhir() -> None:
    ds: Dataset = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")), stop_before_pixels=True)
    record = InstanceRecord(
        study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID,
        sop_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        patient_id=ds.PatientID,
        patient_name=PersonName(alphabetic=ds.PatientName.alphabetic),
        study_date=ds.StudyDate,
        study_time=ds.StudyTime,
        modality=ds.Modality,
        series_number=int(ds.SeriesNumber),
        instance_number=int(ds.InstanceNumber),
    )
    study, warnings = build_imaging_study(aggregate([record]), MappingOptions(site_timezone="Europe/Berlin"))
    resource = study.to_fhir()
    R4BImagingStudy.model_validate(resource)
    assert resource["identifier"][0]["value"] == f"urn:oid:{ds.StudyInstanceUID}"
    assert resource["series"][0]["instance"][0]["sopClass"]["display"] == "CT Image Storage"
    assert resource["started"].startswith(f"{ds.StudyDate[:4]}-{ds.StudyDate[4:6]}-{ds.StudyDate[6:]}T")
    assert warnings == []


@settings(max_examples=40, deadline=None)
@given(st.permutations(full_study()))
def test_output_is_deterministic(order: list[InstanceRecord]) -> None:
    expected, expected_warnings = build(full_study(), site_timezone="Europe/Berlin")
    resource, warnings = build(order, site_timezone="Europe/Berlin")
    assert json.dumps(resource) == json.dumps(expected)
    assert warnings == expected_warnings


def test_issuer_system_uuid() -> None:
    assert (
        issuer_system("0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0", "UUID")
        == "urn:uuid:0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    )


# FHIR R4 datatypes, "string": no character below U+0020 except tab, CR and LF; C1 and DEL dropped too
_FORBIDDEN = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]} - {"\t", "\r", "\n"}


def _strings(value: Any) -> list[str]:
    """Every string (keys and values) in FHIR JSON."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _dataset_with_controls() -> Dataset:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = f"{STUDY}.1.1"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = f"{STUDY}.1"
    ds.Modality = "CT"
    ds.PatientID = "PID\x00-1\x1b"
    ds.StudyDescription = "CT\x00 Th\x1bor\x7fax\x85"
    ds.SeriesDescription = "Lung\x0b\x0c 1mm\x9f\ttab"
    ds.PatientName = "Doe\x01^Jane\x1b"
    ds.ReferringPhysicianName = "\x02^\x03\x1b"  # nothing left: no referrer
    ds.AccessionNumber = "\x01\x02"  # nothing left: no accession identifier
    return ds


@pytest.mark.parametrize("source", ["file", "memory"])
def test_control_characters_never_reach_fhir_strings(source: str) -> None:
    import io

    from ingest.core.extract import extract

    ds = _dataset_with_controls()
    if source == "file":  # raw elements, decoded by the extractor (the file and listener path)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        ds = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    resource, _ = build([extract(ds)])
    assert not {ch for s in _strings(resource) for ch in s} & _FORBIDDEN
    assert resource["description"] == "CT Thorax"
    assert resource["series"][0]["description"] == "Lung 1mm\ttab"  # tab is allowed in a FHIR string
    assert resource["series"][0]["instance"][0]["title"] == "Lung 1mm\ttab"
    assert resource["subject"]["display"] == "Jane Doe"
    assert resource["subject"]["identifier"]["value"] == "PID-1"
    assert "referrer" not in resource
    assert [i["system"] for i in resource["identifier"]] == ["urn:dicom:uid"]


def test_control_characters_are_dropped_from_codes_and_people() -> None:
    record = rec(
        "1", "1",
        modality="C\x01T",
        procedure_codes=(Code(designator="LN", value="2462\x007-2", meaning="CT\x1b Chest", version="\x01"),),
        performing_physicians=(PersonName(alphabetic="Perf\x7f^Paula"),),
        reading_physicians=(PersonName(ideographic="\x1b$B\x85"),),
        reason_text="\x9b31m",
    )
    resource, _ = build([record])
    assert not {ch for s in _strings(resource) for ch in s} & _FORBIDDEN
    assert resource["modality"] == [{"system": DCM, "code": "CT"}]
    assert resource["procedureCode"] == [{
        "coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}],
        "text": "CT Chest",
    }]
    assert resource["series"][0]["performer"][0]["actor"] == {"display": "Paula Perf"}
    assert resource["interpreter"] == [{"display": "$B"}]
    assert resource["reasonCode"] == [{"text": "31m"}]


# ------------------------------------------------------- basedOn and encounter (docs/mapping.md)

V2 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def test_based_on_names_each_order_identifier_once_logically() -> None:
    from ingest.core.records import OrderReference

    request = OrderReference(accession_number="ACC-1", placer_order_number="PL-1",
                             filler_order_number="FI-1", requested_procedure_id="RP-1")
    records = [rec("1", "1", accession_number="ACC-1", accession_issuer_uid="1.2.3",
                   accession_issuer_uid_type="ISO", requests=(request,)),
               rec("1", "2", accession_number="ACC-1", accession_issuer_uid="1.2.3",
                   accession_issuer_uid_type="ISO", requests=(request,))]
    resource, _ = build(records)
    acsn = {"coding": [{"system": V2, "code": "ACSN", "display": "Accession ID"},
                       {"system": DCM, "code": "121022", "display": "Accession Number"}]}
    assert resource["basedOn"] == [
        # the accession with its issuer; the same accession without one (in the request item) is that order
        {"type": "ServiceRequest",
         "identifier": {"type": acsn, "system": "urn:oid:1.2.3", "value": "ACC-1"}},
        {"type": "ServiceRequest", "identifier": {
            "type": {"coding": [{"system": V2, "code": "PLAC", "display": "Placer Identifier"}]},
            "value": "PL-1"}},
        {"type": "ServiceRequest", "identifier": {
            "type": {"coding": [{"system": V2, "code": "FILL", "display": "Filler Identifier"}]},
            "value": "FI-1"}},
        {"type": "ServiceRequest",
         "identifier": {"type": {"text": "Requested Procedure ID"}, "value": "RP-1"}},
    ]
    assert "basedOn" not in build(records, based_on="off")[0]


def test_encounter_from_the_admission_id_only_when_asked() -> None:
    records = [rec("1", "1", admission_id="V-9", admission_issuer_uid="1.2.3.4",
                   admission_issuer_uid_type="ISO")]
    assert "encounter" not in build(records)[0]  # [links] encounter defaults to "off"
    resource, _ = build(records, encounter="logical")
    assert resource["encounter"] == {"type": "Encounter", "identifier": {
        "type": {"coding": [{"system": V2, "code": "VN", "display": "Visit number"}]},
        "system": "urn:oid:1.2.3.4", "value": "V-9"}}
    assert "encounter" not in build([rec("1", "1")], encounter="logical")[0]
