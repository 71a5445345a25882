"""``ingest replay --dry-run --bundle mado|plain`` over the committed samples (samples/README.md).

The expectations are written from the IHE MADO profiles (MadoFhirBundle, MadoImagingStudy,
MadoStudyInstanceUidIdentifier, MadoAccessionNumberIdentifier, MadoWadoEndpoint, MadoNumberOfFrames,
MadoKeyObjectDocumentTitle, MadoCreator, MadoProvenance) and from the sample files themselves, read with
pydicom independently of ``ingest``; every Bundle is validated with fhir.resources' R4B models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle as R4BBundle

pytestmark = pytest.mark.timeout(120)

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "studies"
WADO = "https://pacs.example.org/dicom-web"
LOCAL_ISSUER_SYSTEM = "urn:oid:2.25.77"  # the site's URI for the samples' "SYNTH-RIS" issuer
DCM = "http://dicom.nema.org/resources/ontology/DCM"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
MADO = "https://profiles.ihe.net/RAD/MADO/StructureDefinition/"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
SR_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.33"
)

CONFIG = f"""
[endpoint]
wado_rs_url = "{WADO}"

[profile]
organization = "Synthetic Imaging"
manufacturer = "ingest project"

[profile.issuer_systems]
SYNTH-RIS = "{LOCAL_ISSUER_SYSTEM}"
"""


def _ingest(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``ingest`` with its own config and data dir, in a folder of its own."""
    config = tmp / "ingest.toml"
    config.write_text(CONFIG, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    command = [sys.executable, "-m", "ingest", "-q", "--config", str(config), "--data-dir", str(tmp / "data")]
    return subprocess.run(
        [*command, *args],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=100,
    )


def _samples() -> dict[str, dict[str, list[pydicom.Dataset]]]:
    """Study Instance UID -> Series Instance UID -> data sets, read by pydicom."""
    studies: dict[str, dict[str, list[pydicom.Dataset]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(SAMPLES.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        studies[ds.StudyInstanceUID][ds.SeriesInstanceUID].append(ds)
    return studies


@pytest.fixture(scope="module")
def mado(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    done = _ingest(tmp_path_factory.mktemp("mado"), "replay", str(SAMPLES), "--dry-run", "--bundle", "mado",
                   "--jobs", "1")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _entries(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


def test_one_valid_mado_bundle_per_sample_study(mado: list[dict[str, Any]]) -> None:
    samples = _samples()
    assert len(mado) == len(samples) == 4
    for bundle in mado:
        R4BBundle.model_validate(bundle)
        # MadoFhirBundle: type collection, identifier 1..1, timestamp 1..1, total 0..0
        assert bundle["type"] == "collection"
        assert bundle["meta"]["profile"] == [MADO + "MadoFhirBundle"]
        assert bundle["identifier"]["value"]
        assert bundle["timestamp"]
        assert "total" not in bundle
        # slices: imaging-study 1..1, patient 0..1, wado-endpoint 1..*, creator 1..1,
        # creator-organization 0..1, provenance 1..1
        counts = {k: len(_entries(bundle, k)) for k in
                  ("ImagingStudy", "Patient", "Endpoint", "Device", "Organization", "Provenance")}
        assert counts == {"ImagingStudy": 1, "Patient": 1, "Endpoint": 1, "Device": 1, "Organization": 1,
                          "Provenance": 1}


def test_mado_identifiers_match_the_files(mado: list[dict[str, Any]]) -> None:
    samples = _samples()
    seen = set()
    for bundle in mado:
        study = _entries(bundle, "ImagingStudy")[0]["resource"]
        assert study["meta"]["profile"] == [MADO + "MadoImagingStudy"]
        uid_ident, acc_ident = study["identifier"][0], study["identifier"][1]
        # MadoStudyInstanceUidIdentifier: system urn:dicom:uid, type DCM 110180
        assert uid_ident["system"] == "urn:dicom:uid"
        assert uid_ident["type"]["coding"] == [
            {"system": DCM, "code": "110180", "display": "Study Instance UID"}
        ]
        uid = uid_ident["value"].removeprefix("urn:oid:")
        seen.add(uid)
        first = next(iter(samples[uid].values()))[0]
        # MadoAccessionNumberIdentifier: type v2-0203 ACSN and DCM 121022, system from (0008,0051)
        assert [(c["system"], c["code"]) for c in acc_ident["type"]["coding"]] == [
            (V2_0203, "ACSN"), (DCM, "121022")
        ]
        assert acc_ident["value"] == first.AccessionNumber
        issuer = first.IssuerOfAccessionNumberSequence[0]
        if issuer.get("UniversalEntityID") and issuer.get("UniversalEntityIDType") == "ISO":
            assert acc_ident["system"] == f"urn:oid:{issuer.UniversalEntityID}"
        else:
            assert issuer.LocalNamespaceEntityID == "SYNTH-RIS"
            assert acc_ident["system"] == LOCAL_ISSUER_SYSTEM
        # basedOn[order]: by the accession identifier
        assert study["basedOn"] == [{"type": "ServiceRequest", "identifier": acc_ident}]
        # subject -> the Patient entry, which carries Patient ID (0010,0020)
        patient = _entries(bundle, "Patient")[0]
        assert study["subject"]["reference"] == patient["fullUrl"]
        assert patient["resource"]["identifier"][0]["value"] == first.PatientID
    assert seen == set(samples)


def test_mado_endpoints_per_series_and_instance_detail(mado: list[dict[str, Any]]) -> None:
    samples = _samples()
    for bundle in mado:
        study = _entries(bundle, "ImagingStudy")[0]["resource"]
        endpoint = _entries(bundle, "Endpoint")[0]
        # MadoWadoEndpoint: status active, dicom-wado-rs, payloadType text, address, retrieve location UID
        res = endpoint["resource"]
        assert res["status"] == "active"
        assert res["connectionType"]["code"] == "dicom-wado-rs"
        assert res["payloadType"][0]["text"] == "DICOM WADO-RS"
        assert res["address"] == WADO
        assert [x["url"] for x in res["extension"]].count(MADO + "MadoRetrieveLocationUIDExtension") == 1
        assert study["endpoint"] == [{"reference": endpoint["fullUrl"]}]
        uid = study["identifier"][0]["value"].removeprefix("urn:oid:")
        files = samples[uid]
        assert study["numberOfSeries"] == len(files)
        assert {s["uid"] for s in study["series"]} == set(files)
        for series in study["series"]:
            # series.endpoint 1..* (wado slice), numberOfInstances 1..1, instance 1..*
            assert series["endpoint"] == [{"reference": endpoint["fullUrl"]}]
            datasets = {ds.SOPInstanceUID: ds for ds in files[series["uid"]]}
            assert series["numberOfInstances"] == len(datasets)
            assert {i["uid"] for i in series["instance"]} == set(datasets)
            for instance in series["instance"]:
                ds = datasets[instance["uid"]]
                assert instance["sopClass"]["code"] == f"urn:oid:{ds.SOPClassUID}"
                assert instance["sopClass"]["display"] == ds.SOPClassUID.name
                ext = {x["url"]: x for x in instance.get("extension", [])}
                frames = ds.get("NumberOfFrames")
                if frames is not None and int(frames) > 0:
                    assert ext[MADO + "MadoNumberOfFrames"] == {
                        "url": MADO + "MadoNumberOfFrames", "valueInteger": int(frames)
                    }
                else:
                    assert MADO + "MadoNumberOfFrames" not in ext
                if ds.SOPClassUID in SR_CLASSES or ds.SOPClassUID == KOS:
                    title = ds.ConceptNameCodeSequence[0]
                    assert instance["title"] == title.CodeMeaning
                if ds.SOPClassUID == KOS:
                    coding = ext[MADO + "MadoKeyObjectDocumentTitle"]["valueCodeableConcept"]["coding"][0]
                    assert (coding["code"], coding["display"]) == (title.CodeValue, title.CodeMeaning)
    # the samples have one multi-frame instance (study-003, 8 frames) and one KOS (study-002)
    text = json.dumps(mado)
    assert text.count(MADO + "MadoNumberOfFrames") == 1
    assert text.count(MADO + "MadoKeyObjectDocumentTitle") == 1


def test_mado_creator_and_provenance(mado: list[dict[str, Any]]) -> None:
    for bundle in mado:
        device = _entries(bundle, "Device")[0]
        org = _entries(bundle, "Organization")[0]
        # MadoCreator: type = MadoDeviceType#mado-creator, manufacturer, owner -> the Organization
        assert device["resource"]["type"]["coding"] == [
            {"system": "https://profiles.ihe.net/RAD/MADO/CodeSystem/MadoDeviceType", "code": "mado-creator",
             "display": "MADO Creator"}
        ]
        assert device["resource"]["manufacturer"] == "ingest project"
        assert device["resource"]["owner"]["reference"] == org["fullUrl"]
        assert org["resource"]["name"] == "Synthetic Imaging"
        # MadoProvenance: target = all resources in the Bundle, agent assembler who = Device onBehalfOf org
        provenance = _entries(bundle, "Provenance")[0]["resource"]
        others = [e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] != "Provenance"]
        assert [t["reference"] for t in provenance["target"]] == others
        assert provenance["recorded"] == bundle["timestamp"]
        [agent] = provenance["agent"]
        assert agent["type"]["coding"][0]["code"] == "assembler"
        assert agent["who"]["reference"] == device["fullUrl"]
        assert agent["onBehalfOf"]["reference"] == org["fullUrl"]


def test_plain_bundle_and_bundle_needs_dry_run(tmp_path: Path) -> None:
    study_002 = str(SAMPLES / "study-002")
    done = _ingest(tmp_path, "replay", study_002, "--dry-run", "--bundle", "plain", "--jobs", "1")
    assert done.returncode == 0, done.stderr
    [bundle] = [json.loads(line) for line in done.stdout.splitlines()]
    R4BBundle.model_validate(bundle)
    assert bundle["type"] == "collection" and "meta" not in bundle
    assert [e["resource"]["resourceType"] for e in bundle["entry"]] == ["ImagingStudy", "Patient", "Endpoint"]
    study = bundle["entry"][0]["resource"]
    assert "meta" not in study  # [profile] name = "base": no profile claimed, no series endpoints
    assert all("endpoint" not in s for s in study["series"])
    assert study["endpoint"] == [{"reference": bundle["entry"][2]["fullUrl"]}]

    refused = _ingest(tmp_path, "replay", str(SAMPLES / "study-002"), "--bundle", "mado")
    assert refused.returncode == 1
    assert "--bundle needs --dry-run" in refused.stderr


def test_dry_run_without_bundle_follows_the_profile_with_logical_endpoints(tmp_path: Path) -> None:
    """Plain --dry-run NDJSON under [profile] name = "mado": the study as a first push writes it; with no
    backend ids, each Endpoint is referenced by the identifier ingest finds it by."""
    config = tmp_path / "mado.toml"
    config.write_text(CONFIG.replace("[profile]\n", '[profile]\nname = "mado"\n'), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    done = subprocess.run(
        [sys.executable, "-m", "ingest", "-q", "--config", str(config), "--data-dir", str(tmp_path / "data"),
         "replay", str(SAMPLES / "study-003"), "--dry-run", "--jobs", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100,
    )
    assert done.returncode == 0, done.stderr
    [study] = [json.loads(line) for line in done.stdout.splitlines()]
    from fhir.resources.R4B.imagingstudy import ImagingStudy as R4BImagingStudy

    R4BImagingStudy.model_validate(study)
    logical = [{"type": "Endpoint", "identifier": {"system": "urn:ietf:rfc:3986", "value": WADO}}]
    assert study["endpoint"] == logical
    assert all(s["endpoint"] == logical for s in study["series"])
    assert "meta" not in study  # the profile is claimed in the manifest Bundle only


def test_a_dry_run_leaves_out_what_a_rejection_note_among_its_input_rejects() -> None:
    # IHE IOCM: the note's evidence names the rejected instance; neither it nor the note is listed
    from ingest.app.bundle import dry_run_study
    from ingest.config import Settings
    from ingest.core.lifecycle import KEY_OBJECT_SELECTION
    from ingest.core.records import Code, InstanceRecord, SopReference

    study, series = "1.2.826.0.1.3680043.2.1125.71", "1.2.826.0.1.3680043.2.1125.71.1"
    ct = "1.2.840.10008.5.1.4.1.1.2"
    kept = InstanceRecord(study_uid=study, series_uid=series, sop_uid=f"{series}.1", sop_class_uid=ct)
    gone = InstanceRecord(study_uid=study, series_uid=series, sop_uid=f"{series}.2", sop_class_uid=ct)
    note = InstanceRecord(
        study_uid=study, series_uid=f"{study}.99", sop_uid=f"{study}.99.1",
        sop_class_uid=KEY_OBJECT_SELECTION,
        concept_code=Code(designator="DCM", value="113001", meaning="Rejected for Quality Reasons"),
        evidence=(SopReference(study_uid=study, series_uid=series, sop_uid=gone.sop_uid),),
    )
    out = dry_run_study(Settings(), [kept, gone, note])
    listed = [i["uid"] for s in out["series"] for i in s.get("instance", [])]
    assert listed == [kept.sop_uid]
    assert [s["uid"] for s in out["series"]] == [series]
    assert out["numberOfInstances"] == 1
    assert "ingest:withdrawn" not in out
