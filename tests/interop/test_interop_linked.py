"""Patient subject resolution and the WADO-RS Endpoint against Medplum's own FHIR GraphQL implementation.

The scenarios of ``tests/test_linked.py`` with the sink pointed at the ``medplum_url`` server
(``server.mjs``: Medplum's router, every write checked by Medplum's ``validateResource``): each
``[patient] mode``, Japanese names with the ISO 21090 representation extension accepted by Medplum's
validator, one Patient for concurrent studies, a literal subject that survives a later logical push, the
Endpoint found by identifier. The relay is wired as ``ingest serve`` wires it (``prepare_links``); the
CLI wiring itself is tested against the embedded backend in ``tests/test_linked.py``. The server lives
for the whole session, so every test uses fresh Patient IDs and Study Instance UIDs.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pydicom
import pytest
from pydicom.data import get_charset_files

from ingest.adapters.graphql.sink import GraphQLSink
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app.wiring import wired_relay
from ingest.config import EndpointSettings, PatientSettings, RelaySettings, Settings
from ingest.core.extract import extract
from ingest.core.linked import NAME_REPRESENTATION_URL, search_token
from ingest.core.records import InstanceRecord, PersonName
from ingest.core.terminology import URI_SYSTEM
from ingest.metrics import Metrics
from ingest.relay.links import prepare_links

SYSTEM = "urn:oid:1.2.826.0.1.3680043.2.1143.77"
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
medplum = pytest.mark.asyncio(loop_scope="module")


def fresh_uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def fresh_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def record(study: str, patient_id: str, **fields: Any) -> InstanceRecord:
    return InstanceRecord(
        study_uid=study,
        series_uid=f"{study}.1",
        sop_uid=f"{study}.1.{uuid.uuid4().int % 10**9}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
        patient_id=patient_id,
        **fields,
    )


def settings_for(mode: str, wado: str | None = None) -> Settings:
    return Settings(
        patient=PatientSettings(mode=mode, default_system=SYSTEM),  # type: ignore[arg-type]
        endpoint=EndpointSettings(wado_rs_url=wado),
        relay=RelaySettings(stable_age_s=0, concurrency=4),
    )


async def push(
    store: SQLiteStateStore,
    sink: GraphQLSink,
    settings: Settings,
    records: Sequence[InstanceRecord],
    *,
    metrics: Metrics | None = None,
) -> dict[str, int]:
    for rec in records:
        digest = hashlib.sha256(rec.model_dump_json().encode()).hexdigest()
        store.add_instance(rec, source="interop", spool_name=None, digest=digest, now=NOW, due_at=NOW)
    relay = await wired_relay(settings, store, sink, metrics=metrics, clock=lambda: NOW)
    await relay.run_once()
    return dict(relay.totals.results)


async def patients(sink: GraphQLSink, value: str) -> list[dict[str, Any]]:
    return await sink.search_resources("Patient", identifier=search_token(SYSTEM, value), count=10)


async def study(sink: GraphQLSink, study_uid: str) -> dict[str, Any]:
    found = await sink.find(study_uid, None)
    assert found is not None
    return found.resource


@medplum
async def test_logical_mode(sink: GraphQLSink, store: SQLiteStateStore) -> None:
    pid, uid = fresh_id("LOG"), fresh_uid()
    rec = record(uid, pid, patient_name=PersonName(alphabetic="Doe^John"))
    assert await push(store, sink, settings_for("logical"), [rec]) == {"created": 1}
    assert (await study(sink, uid))["subject"] == {
        "type": "Patient",
        "identifier": {"system": SYSTEM, "value": pid},
        "display": "John Doe",
    }
    assert await patients(sink, pid) == []  # Medplum answers null: no Patient was made


@medplum
async def test_lookup_mode(sink: GraphQLSink, store: SQLiteStateStore) -> None:
    metrics = Metrics()
    pid = fresh_id("LOOK")
    first = fresh_uid()
    await push(store, sink, settings_for("lookup"), [record(first, pid)], metrics=metrics)
    assert "reference" not in (await study(sink, first))["subject"]
    assert metrics.registry.get_sample_value("ingest_patient_fallbacks_total", {"cause": "not_found"}) == 1
    assert await patients(sink, pid) == []

    existing = await sink.create_resource(
        "Patient", {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": pid}]}
    )
    second = fresh_uid()
    await push(store, sink, settings_for("lookup"), [record(second, pid)])
    assert (await study(sink, second))["subject"]["reference"] == f"Patient/{existing['id']}"


@medplum
async def test_create_mode_with_japanese_names(sink: GraphQLSink, store: SQLiteStateStore) -> None:
    [path] = get_charset_files("chrH31.dcm")  # Yamada^Tarou=山田^太郎=やまだ^たろう
    base = extract(pydicom.dcmread(path, stop_before_pixels=True), source="chrH31.dcm")
    pid, uid = fresh_id("H31"), fresh_uid()
    rec = base.model_copy(
        update={
            "study_uid": uid,
            "series_uid": f"{uid}.1",
            "sop_uid": f"{uid}.1.1",
            "patient_id": pid,
            "patient_sex": "M",
            "patient_birth_date": "19650412",
        }
    )
    assert await push(store, sink, settings_for("create"), [rec]) == {"created": 1}
    [patient] = await patients(sink, pid)
    assert patient["gender"] == "male" and patient["birthDate"] == "1965-04-12"
    assert patient["name"] == [
        {"text": "Tarou Yamada", "family": "Yamada", "given": ["Tarou"]},
        {
            "extension": [{"url": NAME_REPRESENTATION_URL, "valueCode": "IDE"}],
            "text": "山田 太郎",
            "family": "山田",
            "given": ["太郎"],
        },
        {
            "extension": [{"url": NAME_REPRESENTATION_URL, "valueCode": "SYL"}],
            "text": "やまだ たろう",
            "family": "やまだ",
            "given": ["たろう"],
        },
    ]
    subject = (await study(sink, uid))["subject"]
    assert subject["reference"] == f"Patient/{patient['id']}" and subject["display"] == "Tarou Yamada"


@medplum
async def test_create_mode_keeps_existing_demographics(sink: GraphQLSink, store: SQLiteStateStore) -> None:
    pid, uid = fresh_id("KEEP"), fresh_uid()
    existing = await sink.create_resource(
        "Patient",
        {
            "resourceType": "Patient",
            "identifier": [{"system": SYSTEM, "value": pid}],
            "name": [{"family": "Registered"}],
            "gender": "female",
        },
    )
    rec = record(uid, pid, patient_name=PersonName(alphabetic="Other^Name"), patient_sex="M")
    await push(store, sink, settings_for("create"), [rec])
    [patient] = await patients(sink, pid)
    assert patient["meta"]["versionId"] == existing["meta"]["versionId"]
    assert patient["name"] == [{"family": "Registered"}] and patient["gender"] == "female"


@medplum
async def test_concurrent_studies_of_one_new_patient(sink: GraphQLSink, store: SQLiteStateStore) -> None:
    pid = fresh_id("CONC")
    uids = [fresh_uid() for _ in range(3)]
    assert await push(store, sink, settings_for("create"), [record(u, pid) for u in uids]) == {"created": 3}
    [patient] = await patients(sink, pid)
    for u in uids:
        assert (await study(sink, u))["subject"]["reference"] == f"Patient/{patient['id']}"


@medplum
async def test_literal_subject_survives_later_logical_push(
    sink: GraphQLSink, store: SQLiteStateStore
) -> None:
    pid, uid = fresh_id("LIT"), fresh_uid()
    await push(store, sink, settings_for("create"), [record(uid, pid)])
    literal = (await study(sink, uid))["subject"]["reference"]
    assert await push(store, sink, settings_for("logical"), [record(uid, pid)]) == {"updated": 1}
    resource = await study(sink, uid)
    assert resource["numberOfInstances"] == 2
    assert resource["subject"]["reference"] == literal


@medplum
async def test_endpoint_found_by_identifier_and_referenced(
    sink: GraphQLSink, store: SQLiteStateStore
) -> None:
    wado = f"https://pacs-{uuid.uuid4().hex[:8]}.example.org/dicom-web"
    settings = settings_for("logical", wado=wado)
    first = await prepare_links(settings.patient, settings.endpoint, sink)
    again = await prepare_links(settings.patient, settings.endpoint, sink)
    assert first.endpoint_reference == again.endpoint_reference
    assert first.endpoint_reference is not None
    [endpoint] = await sink.search_resources("Endpoint", identifier=search_token(URI_SYSTEM, wado), count=10)
    assert f"Endpoint/{endpoint['id']}" == first.endpoint_reference
    assert endpoint["address"] == wado and endpoint["connectionType"]["code"] == "dicom-wado-rs"
    uid = fresh_uid()
    await push(store, sink, settings, [record(uid, fresh_id("EP"))])
    assert (await study(sink, uid))["endpoint"] == [{"reference": first.endpoint_reference}]
