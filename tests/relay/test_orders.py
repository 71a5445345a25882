"""The order, the visit and the referrer as references (``ingest.relay.orders``, ``[links]``), against the
real embedded backend through the relay: ServiceRequests, Encounters and Practitioners are created first
(or after the study, for ``ingest relink``), and the ImagingStudy written is read back.

Expected references are written out from the identifiers the test created, never computed by ingest.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from ingest.adapters.graphql.sink import GraphQLSink
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app.wiring import wire_links
from ingest.backend.server import start_backend
from ingest.backend.store import ResourceStore
from ingest.config import Settings
from ingest.core.records import Code, InstanceRecord, OrderReference
from ingest.relay.relay import Relay
from tests.faultproxy import gql

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ROOT = "1.2.826.0.1.3680043.8.498.4400"
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
V2 = "http://terminology.hl7.org/CodeSystem/v2-0203"
HOSPITAL = "urn:oid:1.2.3.999"  # the issuer of accession numbers and admission ids (0040,0032), ISO
ACSN = {"coding": [{"system": V2, "code": "ACSN"}]}


def record(study: int, instance: int = 1, **values: Any) -> InstanceRecord:
    uid = f"{ROOT}.{study}"
    return InstanceRecord(study_uid=uid, series_uid=f"{uid}.1", sop_uid=f"{uid}.1.{instance}",
                          sop_class_uid=CT_IMAGE, modality="CT", series_number=1, instance_number=instance,
                          patient_id=f"PID-{study}", study_date="20240501", **values)


@pytest_asyncio.fixture
async def backend(tmp_path: Path) -> AsyncIterator[tuple[str, ResourceStore]]:
    db = tmp_path / "backend.sqlite3"
    runner, port = await start_backend(db, port=0)
    store = ResourceStore(db)
    try:
        yield f"http://127.0.0.1:{port}/fhir/R4/$graphql", store
    finally:
        store.close()
        await runner.cleanup()


async def _create(url: str, resource_type: str, resource: dict[str, Any]) -> str:
    mutation = f"mutation($res: {resource_type}Create!) {{ {resource_type}Create(res: $res) {{ id }} }}"
    answer = await gql(url, mutation, {"res": {"resourceType": resource_type, **resource}})
    assert "errors" not in answer, answer
    return str(answer["data"][f"{resource_type}Create"]["id"])


async def _order(url: str, value: str, system: str | None = None, code: str = "ACSN") -> str:
    identifier: dict[str, Any] = {"type": {"coding": [{"system": V2, "code": code}]}, "value": value}
    if system:
        identifier["system"] = system
    return await _create(url, "ServiceRequest", {
        "identifier": [identifier], "status": "active", "intent": "order",
        "subject": {"reference": "Patient/p-1"},
    })


def _settings(tmp_path: Path, url: str, **links: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", backend={"url": url, "token_env": None},
                    relay={"stable_age_s": 0, "concurrency": 1}, links=links)


async def _push(settings: Settings, *records: InstanceRecord) -> dict[str, int]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    async with GraphQLSink(str(settings.backend.url), token_source=None, timeout_s=10) as sink:
        build, link = await wire_links(settings, sink)
        with SQLiteStateStore(settings.data_dir / "state.sqlite3", node="n") as store:
            relay = Relay(store, sink, build, settings.relay, clock=lambda: NOW, link=link)
            for rec in records:
                store.add_instance(rec, source="test", spool_name=None, digest=f"d-{rec.sop_uid}", now=NOW,
                                   due_at=NOW)
            await relay.run_once()
            return dict(relay.totals.results)


def _study(store: ResourceStore, study: int) -> dict[str, Any]:
    from ingest.backend.store import SearchRequest

    (found,) = store.search("ImagingStudy", SearchRequest(
        params={"identifier": f"urn:dicom:uid|urn:oid:{ROOT}.{study}"}))
    return found


async def test_orders_found_by_accession_with_and_without_a_system_become_literal(
    tmp_path: Path, backend: tuple[str, ResourceStore]
) -> None:
    url, store = backend
    with_system = await _order(url, "ACC-1", HOSPITAL)
    without = await _order(url, "ACC-2")
    settings = _settings(tmp_path, url, based_on="lookup")
    await _push(settings, record(1, accession_number="ACC-1", accession_issuer_uid="1.2.3.999",
                                 accession_issuer_uid_type="ISO"),
                record(2, accession_number="ACC-2"))
    first, second = _study(store, 1), _study(store, 2)
    assert [r.get("reference") for r in first["basedOn"]] == [f"ServiceRequest/{with_system}"]
    assert first["basedOn"][0]["identifier"]["system"] == HOSPITAL
    assert first["basedOn"][0]["identifier"]["value"] == "ACC-1"
    assert [r.get("reference") for r in second["basedOn"]] == [f"ServiceRequest/{without}"]


async def test_request_attributes_give_placer_and_filler_orders(
    tmp_path: Path, backend: tuple[str, ResourceStore]
) -> None:
    url, store = backend
    placer = await _order(url, "PL-77", code="PLAC")
    request = OrderReference(placer_order_number="PL-77", filler_order_number="FI-88",
                             requested_procedure_id="RP")
    await _push(_settings(tmp_path, url, based_on="lookup"), record(3, requests=(request,)))
    based_on = _study(store, 3)["basedOn"]
    by_code = {r["identifier"]["type"]["coding"][0]["code"] if "coding" in r["identifier"].get("type", {})
               else r["identifier"]["type"]["text"]: r for r in based_on}
    assert by_code["PLAC"]["reference"] == f"ServiceRequest/{placer}"
    assert "reference" not in by_code["FILL"]  # no such ServiceRequest: logical
    assert by_code["FILL"]["identifier"]["value"] == "FI-88"
    assert by_code["Requested Procedure ID"]["identifier"]["value"] == "RP"


async def test_two_orders_with_one_accession_stay_logical_with_a_warning(
    tmp_path: Path, backend: tuple[str, ResourceStore], caplog: pytest.LogCaptureFixture
) -> None:
    url, store = backend
    await _order(url, "ACC-DUP")
    await _order(url, "ACC-DUP")
    with caplog.at_level(logging.WARNING):
        await _push(_settings(tmp_path, url, based_on="lookup"), record(4, accession_number="ACC-DUP"))
    (ref,) = _study(store, 4)["basedOn"]
    assert "reference" not in ref and ref["type"] == "ServiceRequest"
    assert ref["identifier"]["value"] == "ACC-DUP"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"study {ROOT}.4" in m and "2 ServiceRequest" in m for m in warned), warned
    assert not any("ACC-DUP" in m for m in warned)  # the identifier itself is not logged


async def test_a_late_order_is_linked_by_relink_with_one_new_version_then_nothing(
    tmp_path: Path, backend: tuple[str, ResourceStore]
) -> None:
    from ingest.app.relink import run_relink

    url, store = backend
    settings = _settings(tmp_path, url, based_on="lookup")
    await _push(settings, record(5, accession_number="ACC-LATE"))
    before = _study(store, 5)
    assert "reference" not in before["basedOn"][0]
    order = await _order(url, "ACC-LATE")
    assert await run_relink(settings) == 0
    after = _study(store, 5)
    assert after["basedOn"][0]["reference"] == f"ServiceRequest/{order}"
    assert after["meta"]["versionId"] != before["meta"]["versionId"]
    assert await run_relink(settings) == 0  # nothing logical left: nothing written
    assert _study(store, 5)["meta"]["versionId"] == after["meta"]["versionId"]


async def test_encounter_by_admission_id_with_issuer_and_practitioner_by_identifier(
    tmp_path: Path, backend: tuple[str, ResourceStore]
) -> None:
    url, store = backend
    visit = await _create(url, "Encounter", {
        "identifier": [{"system": HOSPITAL, "value": "V-42"}], "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
    })
    # a visit with the same number under another issuer must not be taken
    await _create(url, "Encounter", {
        "identifier": [{"system": "urn:oid:9.9.9", "value": "V-42"}], "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
    })
    doctor = await _create(url, "Practitioner", {"identifier": [{"value": "NPI-123"}],
                                                 "name": [{"family": "Other"}]})
    settings = _settings(tmp_path, url, based_on="off", encounter="lookup", referrer="lookup")
    from ingest.core.records import PersonName

    await _push(settings, record(6, admission_id="V-42", admission_issuer_uid="1.2.3.999",
                                 admission_issuer_uid_type="ISO",
                                 referring_physician=PersonName(alphabetic="Referrer^Rita"),
                                 referrer_ids=(Code(designator="L", value="NPI-123"),)))
    written = _study(store, 6)
    assert written["encounter"]["reference"] == f"Encounter/{visit}"
    assert written["encounter"]["identifier"] == {
        "type": {"coding": [{"system": V2, "code": "VN", "display": "Visit number"}]},
        "system": HOSPITAL, "value": "V-42",
    }
    assert written["referrer"]["reference"] == f"Practitioner/{doctor}"
    assert written["referrer"]["display"] == "Rita Referrer"
    assert "basedOn" not in written


async def test_a_name_alone_never_links_the_referrer(
    tmp_path: Path, backend: tuple[str, ResourceStore]
) -> None:
    from ingest.core.records import PersonName

    url, store = backend
    await _create(url, "Practitioner", {"identifier": [{"value": "X-1"}], "name": [{"family": "Referrer"}]})
    await _push(_settings(tmp_path, url, referrer="lookup"),
                record(7, referring_physician=PersonName(alphabetic="Referrer^Rita")))
    referrer = _study(store, 7)["referrer"]
    assert referrer == {"display": "Rita Referrer"}


async def test_another_writers_order_is_kept_across_an_update(
    tmp_path: Path, backend: tuple[str, ResourceStore]
) -> None:
    url, store = backend
    settings = _settings(tmp_path, url, based_on="logical")
    await _push(settings, record(8, accession_number="ACC-8"))
    written = _study(store, 8)
    edited = copy.deepcopy({k: v for k, v in written.items() if k not in ("meta", "text")})
    edited["basedOn"] = [*edited["basedOn"], {"reference": "ServiceRequest/theirs"}]
    update = "mutation($id: ID!, $res: ImagingStudyCreate!) { ImagingStudyUpdate(id: $id, res: $res) { id } }"
    answer = await gql(url, update, {"id": written["id"], "res": edited})
    assert "errors" not in answer, answer
    await _push(settings, record(8, 1, accession_number="ACC-8"), record(8, 2, accession_number="ACC-8"))
    after = _study(store, 8)
    assert after["numberOfInstances"] == 2
    assert {"reference": "ServiceRequest/theirs"} in after["basedOn"]
    logical = [r for r in after["basedOn"] if "reference" not in r]
    assert len(logical) == 1 and logical[0]["identifier"]["value"] == "ACC-8"
