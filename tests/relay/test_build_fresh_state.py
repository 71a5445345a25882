"""A push from a state store with no record of what ``ingest`` wrote last (a fresh data dir, another node,
lost state), against the real embedded backend (docs/mapping.md, "The lifecycle of a study").

Node A creates the study; another writer adds an ``interpreter`` (the DICOM names no reading physician), a
``referrer``, a ``note``, ``basedOn`` and a series of its own; then a node with a fresh data dir receives
the study again with one more instance and updates it. With no record of its own earlier values, nothing
on the backend copy is known to be ``ingest``'s: everything the mapping does not produce now is kept.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest_asyncio

from ingest.adapters.graphql.sink import GraphQLSink
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app.wiring import mapping_options
from ingest.backend.server import start_backend
from ingest.backend.store import ResourceStore
from ingest.config import RelaySettings, Settings
from ingest.core.records import InstanceRecord
from ingest.relay.build import StudyBuilder
from ingest.relay.relay import Relay
from tests.faultproxy import gql

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"  # SOP Class UID (0008,0016): CT Image Storage
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
STUDY = "1.2.826.0.1.3680043.8.498.913"
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
UPDATE = """mutation($id: ID!, $res: ImagingStudyCreate!) {
  ImagingStudyUpdate(id: $id, res: $res) { id meta { versionId } }
}"""
#: What the other writer adds: none of it is in the DICOM.
INTERPRETER = [{"reference": "Practitioner/pr-7", "display": "Dr Foreign Reader"}]
REFERRER = {"reference": "Practitioner/pr-8", "display": "Dr Foreign Referrer"}
NOTE = [{"text": "Read in the tumour board."}]
BASED_ON = [{"reference": "ServiceRequest/sr-1"}]
THEIR_SERIES = {
    "uid": f"{STUDY}.77",
    "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "SEG"},
    "numberOfInstances": 1,
    "instance": [
        {
            "uid": f"{STUDY}.77.1",
            "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{SEGMENTATION}"},
        }
    ],
}


def record(instance: int) -> InstanceRecord:
    return InstanceRecord(
        study_uid=STUDY,  # (0020,000D)
        series_uid=f"{STUDY}.1",  # (0020,000E)
        sop_uid=f"{STUDY}.1.{instance}",  # (0008,0018)
        sop_class_uid=CT_IMAGE,  # (0008,0016)
        modality="CT",  # (0008,0060)
        series_number=1,  # (0020,0011)
        instance_number=instance,  # (0020,0013)
        patient_id="PID-913",  # (0010,0020)
        study_date="20240501",  # (0008,0020)
        study_description="CT CHEST",  # (0008,1030); no (0008,0090), no (0008,1060)
    )


@pytest_asyncio.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[tuple[GraphQLSink, Path, str]]:
    db = tmp_path / "backend.sqlite3"
    runner, port = await start_backend(db, port=0)
    url = f"http://127.0.0.1:{port}/fhir/R4/$graphql"
    try:
        async with GraphQLSink(url, token_source=None, timeout_s=10) as sink:
            yield sink, db, url
    finally:
        await runner.cleanup()


async def _push(data_dir: Path, sink: GraphQLSink, *records: InstanceRecord) -> tuple[dict[str, int], str]:
    """The relay of a node whose data dir is ``data_dir`` pushes ``records``: its results, the backend id."""
    settings = Settings(relay=RelaySettings(stable_age_s=0, concurrency=1))
    data_dir.mkdir(parents=True, exist_ok=True)
    with SQLiteStateStore(data_dir / "state.sqlite3", node=data_dir.name) as store:
        relay = Relay(store, sink, StudyBuilder(mapping_options(settings)), settings.relay, clock=lambda: NOW)
        for rec in records:
            store.add_instance(
                rec, source="test", spool_name=None, digest=f"d-{rec.sop_uid}", now=NOW, due_at=NOW
            )
        await relay.run_once()
        row = store.study(STUDY)
        assert row is not None and row.backend_id is not None
        return dict(relay.totals.results), row.backend_id


async def test_a_fresh_data_dir_keeps_what_another_writer_added(
    embedded: tuple[GraphQLSink, Path, str], tmp_path: Path
) -> None:
    sink, db, url = embedded
    backend = ResourceStore(db)
    try:
        results, backend_id = await _push(tmp_path / "node-a", sink, record(1))
        assert results.get("created") == 1
        # another writer names the reader, the referrer, the order, adds a note and a series of its own
        written = backend.read("ImagingStudy", backend_id)
        assert written is not None and "interpreter" not in written and "referrer" not in written
        edited = copy.deepcopy({k: v for k, v in written.items() if k not in ("meta", "text")})
        edited |= {"interpreter": INTERPRETER, "referrer": REFERRER, "note": NOTE, "basedOn": BASED_ON}
        edited["series"] = [*edited["series"], THEIR_SERIES]
        answer = await gql(url, UPDATE, {"id": backend_id, "res": edited})
        assert "errors" not in answer, answer

        # a node with a fresh data dir receives the study again, with one more instance
        results, again = await _push(tmp_path / "node-fresh", sink, record(1), record(2))
        assert again == backend_id and results.get("updated") == 1, results
        after = backend.read("ImagingStudy", backend_id)
    finally:
        backend.close()
    assert after is not None
    assert after["interpreter"] == INTERPRETER
    assert after["referrer"] == REFERRER
    assert after["note"] == NOTE and after["basedOn"] == BASED_ON
    by_uid: dict[str, Any] = {s["uid"]: s for s in after["series"]}
    assert set(by_uid) == {f"{STUDY}.1", f"{STUDY}.77"}
    assert [i["uid"] for i in by_uid[f"{STUDY}.1"]["instance"]] == [f"{STUDY}.1.1", f"{STUDY}.1.2"]
    assert after["numberOfSeries"] == 2 and after["numberOfInstances"] == 3
    assert after["description"] == "CT CHEST"
