"""``[links]`` lookups against Medplum's own FHIR GraphQL implementation (every write validated by
Medplum): a ServiceRequest and an Encounter found by identifier become literal references, and Medplum
accepts the ImagingStudy that carries them."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from ingest.adapters.graphql.sink import GraphQLSink
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app.wiring import wire_links
from ingest.config import Settings
from ingest.core.records import InstanceRecord
from ingest.relay.relay import Relay
from tests import LOOPBACK_HTTP
from tests.faultproxy import gql, studies_with_identifier

V2 = "http://terminology.hl7.org/CodeSystem/v2-0203"


async def _create(url: str, resource_type: str, resource: dict[str, Any]) -> str:
    mutation = f"mutation($res: {resource_type}Create!) {{ {resource_type}Create(res: $res) {{ id }} }}"
    answer = await gql(url, mutation, {"res": {"resourceType": resource_type, **resource}})
    assert "errors" not in answer, answer
    return str(answer["data"][f"{resource_type}Create"]["id"])


async def test_order_and_visit_become_literal_on_medplum(medplum_url: str, tmp_path: Path) -> None:
    study = f"2.25.{uuid.uuid4().int}"
    accession, visit_number = f"A{uuid.uuid4().hex[:10]}", f"V{uuid.uuid4().hex[:10]}"
    patient = await _create(medplum_url, "Patient", {"identifier": [{"value": f"P{uuid.uuid4().hex[:8]}"}]})
    order = await _create(medplum_url, "ServiceRequest", {
        "identifier": [{"type": {"coding": [{"system": V2, "code": "ACSN"}]}, "value": accession}],
        "status": "active", "intent": "order", "subject": {"reference": f"Patient/{patient}"},
        "code": {"text": "CT chest"},
    })
    visit = await _create(medplum_url, "Encounter", {
        "identifier": [{"value": visit_number}], "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
    })
    settings = Settings(data_dir=tmp_path / "data", backend={"url": medplum_url, "token_env": None},
                        relay={"stable_age_s": 0, "concurrency": 1},
                        links={"based_on": "lookup", "encounter": "lookup"})
    settings.data_dir.mkdir(parents=True)
    rec = InstanceRecord(study_uid=study, series_uid=f"{study}.1", sop_uid=f"{study}.1.1",
                         sop_class_uid="1.2.840.10008.5.1.4.1.1.2", modality="CT", patient_id="PID-1",
                         accession_number=accession, admission_id=visit_number, study_date="20240501")
    async with GraphQLSink(medplum_url, token_source=None, timeout_s=30) as sink:
        build, link = await wire_links(settings, sink)
        with SQLiteStateStore(settings.data_dir / "state.sqlite3", node="n") as store:
            relay = Relay(store, sink, build, settings.relay, link=link)
            from datetime import UTC, datetime

            now = datetime.now(UTC)
            store.add_instance(rec, source="test", spool_name=None, digest="d", now=now, due_at=now)
            await relay.run_once()
            assert relay.totals.results.get("created") == 1, relay.totals.results
    [found] = await studies_with_identifier(medplum_url, study)
    base = medplum_url.removesuffix("/$graphql")
    with LOOPBACK_HTTP.open(f"{base}/ImagingStudy/{found['id']}", timeout=30) as answer:
        written = json.load(answer)  # the whole resource, by FHIR REST
    assert [r.get("reference") for r in written["basedOn"]] == [f"ServiceRequest/{order}"]
    assert written["encounter"]["reference"] == f"Encounter/{visit}"
