"""The imaging profiles' rules (ingest.core.profiles, and the profile-typed parts of ingest.core.mapping).

Expected values come from the profiles (docs/mapping.md "Imaging profiles" cites them): IHE MADO
(MadoImagingStudy, MadoStudyInstanceUidIdentifier, MadoAccessionNumberIdentifier, MadoNumberOfFrames,
MadoKeyObjectDocumentTitle, MadoFhirBundle, MadoCreator, MadoProvenance) and SMART Imaging Access
(SmartImagingStudy, SmartWadoEndpoint). Every resource is also validated with fhir.resources' R4B models.
"""

from __future__ import annotations

from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle as R4BBundle
from fhir.resources.R4B.imagingstudy import ImagingStudy as R4BImagingStudy

from ingest.core.aggregate import aggregate
from ingest.core.linked import device_resource, endpoint_resource, organization_resource
from ingest.core.mapping import MappingOptions, build_imaging_study
from ingest.core.merge import merge
from ingest.core.profiles import (
    Linked,
    SeriesEndpoints,
    apply_profile,
    endpoint_placeholder,
    manifest,
    profile_problems,
    series_sources,
)
from ingest.core.records import Code, InstanceRecord, PersonName

STUDY = "1.2.826.0.1.3680043.8.498.91"
CT = "1.2.840.10008.5.1.4.1.1.2"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
BASIC_SR = "1.2.840.10008.5.1.4.1.1.88.11"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
FRAMES_URL = "https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoNumberOfFrames"
KO_TITLE_URL = "https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoKeyObjectDocumentTitle"
WADO = "https://pacs.example.org/dicom-web"
WADO2 = "https://pacs2.example.org/rs"
NOW = "2026-12-02T19:00:00.000Z"

# MADO: Study Instance UID identifier type = DCM 110180; accession type = v2-0203 ACSN + DCM 121022
STUDY_UID_TYPE = {"coding": [{"system": DCM, "code": "110180", "display": "Study Instance UID"}]}
ACCESSION_TYPE = {
    "coding": [
        {"system": V2_0203, "code": "ACSN", "display": "Accession ID"},
        {"system": DCM, "code": "121022", "display": "Accession Number"},
    ]
}


def rec(series: str, sop: str, **fields: Any) -> InstanceRecord:
    defaults: dict[str, Any] = {
        "sop_class_uid": CT,
        "modality": "CT",
        "patient_id": "PID-1",
        "patient_id_issuer_uid": "2.16.840.1.113883.3.9",
        "patient_id_issuer_uid_type": "ISO",
        "patient_name": PersonName(alphabetic="Doe^Jane"),
        "patient_sex": "F",
        "patient_birth_date": "19700101",
        "study_date": "20240115",
        "study_description": "CT Thorax",
        "accession_number": "ACC-1",
        "accession_issuer_uid": "2.16.840.1.113883.3.1",
        "accession_issuer_uid_type": "ISO",
    }
    defaults.update(fields)
    return InstanceRecord(
        study_uid=STUDY, series_uid=f"{STUDY}.{series}", sop_uid=f"{STUDY}.{series}.{sop}", **defaults
    )


def mapped(records: list[InstanceRecord], **options: Any) -> tuple[dict[str, Any], list[str]]:
    study, warnings = build_imaging_study(aggregate(records), MappingOptions(**options))
    resource = study.to_fhir()
    R4BImagingStudy.model_validate(resource)
    return resource, warnings


def study_records() -> list[InstanceRecord]:
    return [
        rec("1", "1", instance_number=1, series_number=1),
        rec("1", "2", instance_number=2, series_number=1),
        rec("2", "1", modality="US", sop_class_uid=US_MULTIFRAME, number_of_frames=8, series_number=2),
        rec("9", "1", modality="SR", sop_class_uid=BASIC_SR, concept_name="Imaging Report", series_number=9),
    ]


# --------------------------------------------------------------------------------------------------
# 1. identifiers
# --------------------------------------------------------------------------------------------------


def test_study_instance_uid_identifier_is_typed_dcm_110180() -> None:
    resource, _ = mapped(study_records())
    assert resource["identifier"][0] == {
        "type": STUDY_UID_TYPE,
        "system": "urn:dicom:uid",
        "value": f"urn:oid:{STUDY}",
    }


@pytest.mark.parametrize(
    ("issuer", "issuer_systems", "system"),
    [
        # Universal Entity ID + type ISO -> urn:oid:
        ({"accession_issuer_uid": "1.2.3.4", "accession_issuer_uid_type": "ISO"}, {}, "urn:oid:1.2.3.4"),
        # a Local Namespace Entity ID that is a URI is the system itself
        ({"accession_issuer_uid": None, "accession_issuer_local": "https://ris.example.org/acc"}, {},
         "https://ris.example.org/acc"),
        # a plain local name -> the URI the site configured for it
        ({"accession_issuer_uid": None, "accession_issuer_local": "SYNTH-RIS"},
         {"SYNTH-RIS": "urn:oid:2.25.1"}, "urn:oid:2.25.1"),
        # Universal Entity ID wins over the local name
        ({"accession_issuer_local": "SYNTH-RIS"}, {"SYNTH-RIS": "urn:oid:2.25.1"},
         "urn:oid:2.16.840.1.113883.3.1"),
    ],
)
def test_accession_identifier_type_and_system_from_the_issuer(
    issuer: dict[str, Any], issuer_systems: dict[str, str], system: str
) -> None:
    resource, warnings = mapped([rec("1", "1", **issuer)], issuer_systems=issuer_systems)
    assert resource["identifier"][1] == {"type": ACCESSION_TYPE, "system": system, "value": "ACC-1"}
    assert not [w for w in warnings if "0008,0051" in w]


def test_accession_without_a_usable_issuer_has_no_system_and_a_warning() -> None:
    local_only = rec("1", "1", accession_issuer_uid=None, accession_issuer_local="SYNTH-RIS")
    resource, warnings = mapped([local_only])
    assert resource["identifier"][1] == {"type": ACCESSION_TYPE, "value": "ACC-1"}
    assert any("Local Namespace Entity ID is not a URI" in w for w in warnings)
    # MADO requires the accession system: the profile check names the rule
    _, problems = apply_profile(resource, "mado", SeriesEndpoints(study="Endpoint/e1"))
    assert any("accession identifier needs a system" in p for p in problems)


def test_merge_replaces_identifiers_written_before_the_types() -> None:
    """A backend copy written before this change: untyped study UID, ACSN-only accession, plus another
    system's identifier. The merge keeps one study UID and one accession identifier, now typed, and the
    foreign identifier (the lookup token ``urn:dicom:uid|urn:oid:<uid>`` is the same for both forms)."""
    ours, _ = mapped(study_records())
    foreign = {"system": "urn:oid:9.9.9", "value": "X-1"}
    theirs = {
        "resourceType": "ImagingStudy",
        "id": "is1",
        "status": "available",
        "subject": ours["subject"],
        "identifier": [
            {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY}"},
            {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]},
             "system": "urn:oid:2.16.840.1.113883.3.1", "value": "ACC-1"},
            foreign,
        ],
    }
    result = merge(ours, theirs)
    assert result["identifier"] == [ours["identifier"][0], ours["identifier"][1], foreign]


# --------------------------------------------------------------------------------------------------
# 2. endpoints
# --------------------------------------------------------------------------------------------------


def test_series_endpoints_follow_the_calling_ae_of_the_series() -> None:
    s1, s2, s9 = f"{STUDY}.1", f"{STUDY}.2", f"{STUDY}.9"
    endpoints = SeriesEndpoints(
        study="Endpoint/main",
        by_source={"PACS2": "Endpoint/p2"},
        sources={s1: {"PACS2"}, s2: {"PACS2", "CT01"}, s9: {"CT01"}},
    )
    assert endpoints.of(s1, required=False) == ["Endpoint/p2"]  # served elsewhere only
    assert endpoints.of(s2, required=False) == ["Endpoint/main", "Endpoint/p2"]  # partly by the study's
    assert endpoints.of(s9, required=False) == []  # the study-level Endpoint serves it
    assert endpoints.of(s9, required=True) == ["Endpoint/main"]  # MADO: series.endpoint 1..*

    resource, _ = mapped(study_records(), endpoint_reference="Endpoint/main")
    base, problems = apply_profile(resource, "base", endpoints)
    assert problems == []
    by_uid = {s["uid"]: s.get("endpoint") for s in base["series"]}
    assert by_uid == {
        s1: [{"reference": "Endpoint/p2"}],
        s2: [{"reference": "Endpoint/main"}, {"reference": "Endpoint/p2"}],
        s9: None,
    }
    assert base["endpoint"] == [{"reference": "Endpoint/main"}]
    R4BImagingStudy.model_validate(base)
    mado, _ = apply_profile(resource, "mado", endpoints)
    assert {s["uid"]: s["endpoint"] for s in mado["series"]}[s9] == [{"reference": "Endpoint/main"}]


def test_series_sources_take_the_calling_ae_of_dimse_sources_only() -> None:
    pairs = [("1.1", "dimse:PACS2"), ("1.1", "dimse:CT01"), ("1.2", "file:/x/y.dcm"), ("1.2", "watch")]
    assert series_sources(pairs) == {"1.1": {"PACS2", "CT01"}}


def test_smart_imaging_needs_an_endpoint_and_a_modality() -> None:
    # a study of only an SR series: no acquisition modality, so SMART's modality 1..* takes the series'
    sr_only = [rec("9", "1", modality="SR", sop_class_uid=BASIC_SR)]
    resource, _ = mapped(sr_only)
    assert "modality" not in resource
    smart, problems = apply_profile(resource, "smart-imaging", SeriesEndpoints())
    assert smart["modality"] == [{"system": DCM, "code": "SR"}]
    assert problems == [
        "smart-imaging: ImagingStudy.endpoint 1..*: no WADO-RS Endpoint ([endpoint] wado_rs_url)"
    ]
    ok, problems = apply_profile(resource, "smart-imaging", SeriesEndpoints(study="Endpoint/e1"))
    assert ok["endpoint"] == [{"reference": "Endpoint/e1"}] and problems == []
    R4BImagingStudy.model_validate(ok)


# --------------------------------------------------------------------------------------------------
# 3. instance detail
# --------------------------------------------------------------------------------------------------


def test_number_of_frames_is_the_mado_extension() -> None:
    resource, _ = mapped(study_records(), mado_extensions=True)
    instances = {i["uid"]: i for s in resource["series"] for i in s["instance"]}
    multi = instances[f"{STUDY}.2.1"]
    assert multi["extension"] == [{"url": FRAMES_URL, "valueInteger": 8}]
    assert "extension" not in instances[f"{STUDY}.1.1"]  # no (0028,0008): no extension
    assert multi["sopClass"] == {
        "system": "urn:ietf:rfc:3986",
        "code": f"urn:oid:{US_MULTIFRAME}",
        "display": "Ultrasound Multi-frame Image Storage",
    }


def test_mado_extensions_are_written_under_the_mado_profile_only() -> None:
    # base / smart-imaging (mado_extensions=False, the default): the titles stay, no MADO extension
    title = Code(designator="DCM", value="113000", meaning="Of Interest")
    records = [
        *study_records(),
        rec("8", "1", modality="KO", sop_class_uid=KOS, concept_name="Of Interest", concept_code=title),
    ]
    resource, _ = mapped(records)
    instances = {i["uid"]: i for s in resource["series"] for i in s["instance"]}
    assert instances[f"{STUDY}.8.1"]["title"] == "Of Interest"
    assert all("extension" not in i for i in instances.values())
    for profile in ("base", "smart-imaging"):
        applied, _ = apply_profile(resource, profile, SeriesEndpoints(study="Endpoint/e1"))
        assert "Mado" not in str(applied)
    mado, _ = mapped(records, mado_extensions=True)
    urls = {e["url"] for s in mado["series"] for i in s["instance"] for e in i.get("extension", [])}
    assert urls == {FRAMES_URL, KO_TITLE_URL}


def test_kos_and_sr_titles_and_the_ko_document_title_extension() -> None:
    title = Code(designator="DCM", value="113000", meaning="Of Interest")
    records = [
        rec("9", "1", modality="SR", sop_class_uid=BASIC_SR, concept_name="Imaging Report"),
        rec("9", "2", modality="SR", sop_class_uid=BASIC_SR, concept_name="Imaging Report"),
        rec("8", "1", modality="KO", sop_class_uid=KOS, concept_name="Of Interest", concept_code=title),
        rec("8", "2", modality="KO", sop_class_uid=KOS, concept_name="Of Interest", concept_code=title),
    ]
    resource, _ = mapped(records, mado_extensions=True)
    instances = {i["uid"]: i for s in resource["series"] for i in s["instance"]}
    assert instances[f"{STUDY}.9.1"]["title"] == "Imaging Report"  # (0040,A043) code meaning
    assert "extension" not in instances[f"{STUDY}.9.1"]
    kos = instances[f"{STUDY}.8.1"]
    assert kos["title"] == "Of Interest"
    # the document title wins over the Series Description of a single-instance series
    single, _ = mapped([rec("7", "1", modality="KO", sop_class_uid=KOS, series_description="Key Images",
                            concept_name="Of Interest", concept_code=title)])
    assert single["series"][0]["instance"][0]["title"] == "Of Interest"
    assert kos["extension"] == [
        {
            "url": KO_TITLE_URL,
            "valueCodeableConcept": {
                "coding": [{"system": DCM, "code": "113000", "display": "Of Interest"}],
                "text": "Of Interest",
            },
        }
    ]


# --------------------------------------------------------------------------------------------------
# mado: ImagingStudy rules
# --------------------------------------------------------------------------------------------------


def test_mado_procedure_code_is_readable_and_based_on_names_the_order() -> None:
    resource, _ = mapped(study_records(), endpoint_reference="Endpoint/e1")
    assert "procedureCode" not in resource
    mado, problems = apply_profile(resource, "mado", SeriesEndpoints(study="Endpoint/e1"))
    assert problems == []
    # mado-reqproc-1: procedureCode.text or .coding.display; from Study Description (0008,1030)
    assert mado["procedureCode"] == [{"text": "CT Thorax"}]
    # basedOn[order]: a reference by the MADO accession identifier
    assert mado["basedOn"] == [{"type": "ServiceRequest", "identifier": resource["identifier"][1]}]
    R4BImagingStudy.model_validate(mado)
    coded, _ = mapped(
        [rec("1", "1", procedure_codes=(Code(designator="LN", value="24627-2", meaning="CT Chest"),))]
    )
    mado_coded, _ = apply_profile(coded, "mado", SeriesEndpoints(study="Endpoint/e1"))
    assert mado_coded["procedureCode"] == coded["procedureCode"]  # already readable: unchanged


def test_mado_problems_name_each_unmet_rule() -> None:
    resource, _ = mapped(
        [rec("1", "1", study_description=None)], include_instances=False
    )
    _, problems = apply_profile(resource, "mado", SeriesEndpoints())
    assert problems == [
        "mado: mado-reqproc-1: no procedureCode text or display (no Procedure Code Sequence (0008,1032) "
        "with a meaning, no Study Description (0008,1030))",
        f"mado: series {STUDY}.1: series.endpoint 1..*: no WADO-RS Endpoint serves it",
        f"mado: series {STUDY}.1: series.instance 1..*: no instance list "
        "([mapping] include_instances = false)",
    ]
    assert profile_problems(resource, "base") == []


# --------------------------------------------------------------------------------------------------
# 4. the manifest Bundle
# --------------------------------------------------------------------------------------------------


def mado_bundle(organization: bool = True) -> dict[str, Any]:
    records = study_records()
    resource, _ = mapped(records, endpoint_reference=endpoint_placeholder(WADO))
    endpoints = SeriesEndpoints(study=endpoint_placeholder(WADO))
    mado, _ = apply_profile(resource, "mado", endpoints)
    linked = Linked(
        patient={"resourceType": "Patient", "identifier": [{"system": "urn:oid:2.16.840.1.113883.3.9",
                                                            "value": "PID-1"}]},
        endpoints={WADO: endpoint_resource(WADO)},
        device=device_resource("ingest", "1.0", manufacturer="ACME"),
        organization=organization_resource("Synthetic Imaging") if organization else None,
    )
    return manifest(mado, linked, profile="mado", timestamp=NOW)


def test_mado_bundle_is_a_collection_with_creator_and_provenance() -> None:
    bundle = mado_bundle()
    R4BBundle.model_validate(bundle)
    # MadoFhirBundle: identifier 1..1, timestamp 1..1, no total; entries as its slices list them
    assert bundle["type"] == "collection"
    assert bundle["timestamp"] == NOW
    assert bundle["meta"] == {"profile": ["https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoFhirBundle"]}
    assert bundle["identifier"]["system"] == "urn:ietf:rfc:3986"
    assert bundle["identifier"]["value"].startswith("urn:uuid:")
    assert "total" not in bundle
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert types == ["ImagingStudy", "Patient", "Endpoint", "Device", "Organization", "Provenance"]
    urls = {e["resource"]["resourceType"]: e["fullUrl"] for e in bundle["entry"]}
    assert all(u.startswith("urn:uuid:") for u in urls.values())
    study = bundle["entry"][0]["resource"]
    assert study["meta"] == {"profile": ["https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoImagingStudy"]}
    # references point at the entries
    assert study["subject"]["reference"] == urls["Patient"]
    assert study["endpoint"] == [{"reference": urls["Endpoint"]}]
    assert all(s["endpoint"] == [{"reference": urls["Endpoint"]}] for s in study["series"])
    device = bundle["entry"][3]["resource"]
    assert device["owner"] == {"reference": urls["Organization"], "type": "Organization"}
    # MadoProvenance: target = every other resource; recorded; agent assembler, who = the creator Device,
    # onBehalfOf = its Organization
    provenance = bundle["entry"][5]["resource"]
    assert provenance["target"] == [{"reference": urls[t]} for t in types[:-1]]
    assert provenance["recorded"] == NOW
    assert provenance["agent"] == [
        {
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                 "code": "assembler", "display": "Assembler"}]},
            "who": {"reference": urls["Device"], "type": "Device"},
            "onBehalfOf": {"reference": urls["Organization"], "type": "Organization"},
        }
    ]


def test_bundle_identity_is_stable_and_follows_the_content() -> None:
    first, again = mado_bundle(), mado_bundle()
    assert first["identifier"] == again["identifier"]
    assert [e["fullUrl"] for e in first["entry"]] == [e["fullUrl"] for e in again["entry"]]
    without_org = mado_bundle(organization=False)
    assert without_org["identifier"] != first["identifier"]
    assert "onBehalfOf" not in without_org["entry"][-1]["resource"]["agent"][0]
    R4BBundle.model_validate(without_org)


def test_plain_bundle_has_no_creator_or_provenance() -> None:
    resource, _ = mapped(study_records(), endpoint_reference=endpoint_placeholder(WADO))
    plain = manifest(
        resource,
        Linked(endpoints={WADO: endpoint_resource(WADO)}, device=device_resource("ingest", "1.0")),
        profile="base",
        timestamp=NOW,
    )
    R4BBundle.model_validate(plain)
    assert plain["type"] == "collection" and "meta" not in plain
    assert [e["resource"]["resourceType"] for e in plain["entry"]] == ["ImagingStudy", "Endpoint"]
    assert "meta" not in plain["entry"][0]["resource"]
