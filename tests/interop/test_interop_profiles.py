"""The imaging profiles (docs/mapping.md "Imaging profiles") against Medplum's own FHIR GraphQL
implementation (``server.mjs``: Medplum's router; every write is checked by Medplum's ``validateResource``).

Each rule of the SMART Imaging Access and IHE MADO profiles that ``ingest`` writes is checked on what
Medplum holds afterwards: typed identifiers (and a copy written before the types, found by the same
token and updated), series-level Endpoints by calling AE, the Endpoint resources, the number-of-frames and
KOS document-title extensions, SMART's modality and endpoint, and with ``[profile] write_linked`` the
creator Device, its Organization and one Provenance per write. The committed samples are the input
(their UIDs renamed per test: the server lives for the whole session).
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ingest.adapters.dicomfile import read_header
from ingest.adapters.graphql.sink import GraphQLSink
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app.wiring import wired_relay
from ingest.config import (
    EndpointSettings,
    MappingSettings,
    PatientSettings,
    ProfileSettings,
    RelaySettings,
    Settings,
)
from ingest.core.linked import device_identifier, search_token
from ingest.core.records import InstanceRecord
from ingest.core.terminology import URI_SYSTEM

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "studies"
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
DCM = "http://dicom.nema.org/resources/ontology/DCM"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
MADO = "https://profiles.ihe.net/RAD/MADO/StructureDefinition/"
SMART_TOKEN_URL = "http://fhir.org/argonaut/smart-imaging/StructureDefinition/requires-access-token"
PATIENT_SYSTEM = "urn:oid:1.2.826.0.1.3680043.2.1143.78"
medplum = pytest.mark.asyncio(loop_scope="module")


def sample(folder: str) -> tuple[str, list[InstanceRecord]]:
    """The header records of one committed sample study, every UID renamed (fresh per call)."""
    prefix = f"2.25.{uuid.uuid4().int % 10**30}"
    renamed: dict[str, str] = {}

    def fresh(uid: str) -> str:
        return renamed.setdefault(uid, f"{prefix}.{len(renamed) + 1}")

    records = []
    for path in sorted((SAMPLES / folder).rglob("*.dcm")):
        rec = read_header(path).record
        records.append(rec.model_copy(update={
            "study_uid": fresh(rec.study_uid),
            "series_uid": fresh(rec.series_uid),
            "sop_uid": fresh(rec.sop_uid),
            "patient_id": f"{rec.patient_id}-{prefix[-8:]}",
        }))
    return records[0].study_uid, records


def add(store: SQLiteStateStore, records: list[InstanceRecord], source_of: dict[str, str]) -> None:
    for rec in records:
        digest = hashlib.sha256(rec.model_dump_json().encode()).hexdigest()
        store.add_instance(rec, source=source_of.get(rec.series_uid, "dimse:MODALITY"), spool_name=None,
                           digest=digest, now=NOW, due_at=NOW)


async def push(store: SQLiteStateStore, sink: GraphQLSink, settings: Settings) -> dict[str, int]:
    relay = await wired_relay(settings, store, sink, clock=lambda: NOW)
    await relay.run_once()
    return dict(relay.totals.results)


async def endpoint_of(sink: GraphQLSink, url: str) -> dict[str, Any]:
    [found] = await sink.search_resources("Endpoint", identifier=search_token(URI_SYSTEM, url), count=10)
    return found


def fresh_url(name: str) -> str:
    return f"https://{name}-{uuid.uuid4().hex[:10]}.example.org/dicom-web"


@medplum
async def test_mado_study_in_medplum(sink: GraphQLSink, store: SQLiteStateStore) -> None:
    """study-003 (US, one 8-frame cine): its cine series arrived from PACS2, which serves it itself."""
    uid, records = sample("study-003")
    cine = next(r.series_uid for r in records if r.number_of_frames)
    wado, wado2 = fresh_url("main"), fresh_url("pacs2")
    add(store, records, {cine: "dimse:PACS2"})
    settings = Settings(
        patient=PatientSettings(mode="create", default_system=PATIENT_SYSTEM),
        endpoint=EndpointSettings(wado_rs_url=wado, series_wado_rs_urls={"PACS2": wado2},
                                  requires_access_token=False),
        profile=ProfileSettings(name="mado", write_linked=True, organization="Synthetic Imaging Interop",
                                device_name=f"ingest-{uuid.uuid4().hex[:8]}"),
        relay=RelaySettings(stable_age_s=0),
    )
    assert await push(store, sink, settings) == {"created": 1}
    found = await sink.find(uid, None)
    assert found is not None
    study = found.resource

    # MadoStudyInstanceUidIdentifier and MadoAccessionNumberIdentifier, as Medplum keeps them
    assert study["identifier"][0] == {
        "type": {"coding": [{"system": DCM, "code": "110180", "display": "Study Instance UID"}]},
        "system": "urn:dicom:uid",
        "value": f"urn:oid:{uid}",
    }
    accession = study["identifier"][1]
    codings = [(c["system"], c["code"]) for c in accession["type"]["coding"]]
    assert codings == [(V2_0203, "ACSN"), (DCM, "121022")]
    assert accession["system"].startswith("urn:oid:2.25.")  # (0008,0051) Universal Entity ID, type ISO
    assert study["basedOn"] == [{"type": "ServiceRequest", "identifier": accession}]
    assert study["subject"]["reference"].startswith("Patient/")

    # series.endpoint 1..*: the cine series at PACS2's Endpoint, the other at the study's
    main, second = await endpoint_of(sink, wado), await endpoint_of(sink, wado2)
    assert study["endpoint"] == [{"reference": f"Endpoint/{main['id']}"}]
    by_series = {s["uid"]: s["endpoint"] for s in study["series"]}
    assert by_series.pop(cine) == [{"reference": f"Endpoint/{second['id']}"}]
    assert list(by_series.values()) == [[{"reference": f"Endpoint/{main['id']}"}]]
    # MadoWadoEndpoint / SmartWadoEndpoint
    for endpoint, url in ((main, wado), (second, wado2)):
        assert endpoint["status"] == "active"
        assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
        assert endpoint["payloadType"][0]["coding"][0]["code"] == "none"
        assert endpoint["payloadType"][0]["text"] == "DICOM WADO-RS"
        assert endpoint["address"] == url and endpoint["name"]
        ext = {x["url"]: x for x in endpoint["extension"]}
        assert ext[SMART_TOKEN_URL]["valueBoolean"] is False
        assert ext[MADO + "MadoRetrieveLocationUIDExtension"]["valueString"].startswith("2.25.")

    # MadoNumberOfFrames on the cine instance, nowhere else
    [cine_series] = [s for s in study["series"] if s["uid"] == cine]
    frames = [{"url": MADO + "MadoNumberOfFrames", "valueInteger": 8}]
    assert cine_series["instance"][0]["extension"] == frames
    others = [i for s in study["series"] if s["uid"] != cine for i in s["instance"]]
    assert others and all("extension" not in i for i in others)

    # write_linked: the creator Device, its Organization and the Provenance of this write
    device_id = str(device_identifier(settings.profile.device_name).value)
    [device] = await sink.search_resources("Device", identifier=search_token(URI_SYSTEM, device_id), count=10)
    assert device["type"]["coding"][0]["code"] == "mado-creator"
    versioned = f"ImagingStudy/{found.id}/_history/{found.version_id}"
    [provenance] = await sink.search_resources("Provenance", identifier=versioned, count=10)
    assert provenance["target"][0]["reference"] == f"ImagingStudy/{found.id}/_history/{found.version_id}"
    [agent] = provenance["agent"]
    assert agent["type"]["coding"][0]["code"] == "assembler"
    assert agent["who"]["reference"] == f"Device/{device['id']}"
    assert agent["onBehalfOf"]["reference"] == device["owner"]["reference"]


@medplum
async def test_kos_title_and_document_title_extension_in_medplum(
    sink: GraphQLSink, store: SQLiteStateStore
) -> None:
    uid, records = sample("study-002")  # MR + a Key Object Selection document "Of Interest"
    add(store, records, {})
    settings = Settings(
        endpoint=EndpointSettings(wado_rs_url=fresh_url("kos")),
        profile=ProfileSettings(name="mado", issuer_systems={"SYNTH-RIS": "urn:oid:2.25.4242"}),
        relay=RelaySettings(stable_age_s=0),
    )
    assert await push(store, sink, settings) == {"created": 1}
    found = await sink.find(uid, None)
    assert found is not None
    instances = [i for s in found.resource["series"] for i in s["instance"]]
    [instance] = [i for i in instances if i["sopClass"]["code"].endswith(".88.59")]
    assert instance["title"] == "Of Interest"  # Concept Name (0040,A043) code meaning
    [ext] = instance["extension"]
    assert ext["url"] == MADO + "MadoKeyObjectDocumentTitle"
    assert ext["valueCodeableConcept"]["coding"][0]["display"] == "Of Interest"
    # the local issuer SYNTH-RIS, given its URI by [profile] issuer_systems
    assert found.resource["identifier"][1]["system"] == "urn:oid:2.25.4242"


@medplum
async def test_smart_imaging_modality_and_endpoint_in_medplum(
    sink: GraphQLSink, store: SQLiteStateStore
) -> None:
    """A study of only its SR series (study-001's report): SMART's modality 1..* lists SR."""
    uid, records = sample("study-001")
    report = [r for r in records if r.modality == "SR"]
    add(store, report, {})
    wado = fresh_url("smart")
    settings = Settings(
        endpoint=EndpointSettings(wado_rs_url=wado),
        profile=ProfileSettings(name="smart-imaging"),
        relay=RelaySettings(stable_age_s=0),
    )
    assert await push(store, sink, settings) == {"created": 1}
    found = await sink.find(uid, None)
    assert found is not None
    assert found.resource["modality"] == [{"system": DCM, "code": "SR"}]
    endpoint = await endpoint_of(sink, wado)
    assert found.resource["endpoint"] == [{"reference": f"Endpoint/{endpoint['id']}"}]
    assert {x["url"]: x.get("valueBoolean") for x in endpoint["extension"]}[SMART_TOKEN_URL] is True
    assert found.resource["series"][0]["instance"][0]["title"] == "Diagnostic imaging report"


@medplum
async def test_study_written_before_the_types_is_found_and_updated(
    sink: GraphQLSink, store: SQLiteStateStore
) -> None:
    """A copy with the old identifiers (untyped study UID, ACSN-only accession): found by the same token,
    updated once with the typed ones, no second ImagingStudy; another system's identifier is kept."""
    uid, records = sample("study-004")
    first = records[0]
    foreign = {"system": "urn:oid:1.2.3.999", "value": "OTHER-1"}
    old = await sink.create({
        "resourceType": "ImagingStudy",
        "status": "available",
        "subject": {"type": "Patient", "identifier": {"value": first.patient_id}},
        "identifier": [
            {"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"},
            {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": first.accession_number},
            foreign,
        ],
    })
    add(store, records, {})
    settings = Settings(mapping=MappingSettings(), relay=RelaySettings(stable_age_s=0))
    assert await push(store, sink, settings) == {"updated": 1}
    found = await sink.find(uid, None)
    assert found is not None and found.id == old.id
    identifiers = found.resource["identifier"]
    assert [i.get("system") for i in identifiers].count("urn:dicom:uid") == 1
    assert identifiers[0]["type"]["coding"][0]["code"] == "110180"
    accession = [
        i for i in identifiers if any(c["code"] == "ACSN" for c in i.get("type", {}).get("coding", []))
    ]
    assert len(accession) == 1 and accession[0]["type"]["coding"][1]["code"] == "121022"
    assert foreign in identifiers
