"""Foreign content through an update, against the real embedded backend (docs/mapping.md, "The lifecycle").

A study is pushed, then another writer enriches the ImagingStudy (an extension nested three levels deep on
the study, a series-level extension, a modifierExtension, an instance ``title``, ``meta.tag`` / ``security``
/ ``profile``, ``procedureCode`` and ``note``, elements the mapping does not write for this study), then a
late series arrives. The update must keep every one of those element by element; only what ``ingest``
owns (the new series, the counts, the narrative, the server's meta) may differ. The first read's selection
stops two extension levels down, so the sink has to see the sentinel and read deeper.
``tests/interop/test_interop_lifecycle.py`` runs the same scenario against Medplum.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from graphql import parse

from ingest.adapters.graphql.fit import READ_FIELD, sentinel_paths
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
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
UPDATE = """mutation($id: ID!, $res: ImagingStudyCreate!) {
  ImagingStudyUpdate(id: $id, res: $res) { id meta { versionId } }
}"""

#: What the other writer adds (FHIR R4: ext-1, an extension has extensions or a value, not both).
QUALITY_REVIEW = {
    "url": "urn:example:quality-review",
    "extension": [
        {
            "url": "reviewer",
            "extension": [
                {
                    "url": "credential",
                    "extension": [{"url": "board", "valueString": "EBR"}],
                }
            ],
        },
        {"url": "score", "valueInteger": 4},
    ],
}
MODIFIER = {"url": "urn:example:not-for-ai-training", "valueBoolean": True}
SERIES_EXTENSION = {"url": "urn:example:series-qa", "valueCodeableConcept": {"text": "artefact-free"}}
META = {
    "tag": [{"system": "urn:example:tags", "code": "reviewed"}],
    "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "N"}],
    "profile": ["http://example.org/StructureDefinition/reviewed-imagingstudy"],
}
PROCEDURE = [{"coding": [{"system": "http://loinc.org", "code": "24627-2"}], "text": "CT Chest"}]
NOTE = [{"text": "Quality reviewed; see the extension."}]
#: ImagingStudy elements ``ingest`` recomputes when a series arrives (docs/mapping.md, "Merging").
OWNED_CHANGING = {"series", "numberOfSeries", "numberOfInstances", "text", "meta", "id", "modality"}


def record(study: str, series: int, instance: int) -> InstanceRecord:
    return InstanceRecord(
        study_uid=study,  # (0020,000D)
        series_uid=f"{study}.{series}",  # (0020,000E)
        sop_uid=f"{study}.{series}.{instance}",  # (0008,0018)
        sop_class_uid=CT_IMAGE,  # (0008,0016)
        modality="CT",  # (0008,0060)
        series_number=series,  # (0020,0011)
        instance_number=instance,  # (0020,0013)
        study_date="20240501",  # (0008,0020)
        study_description="CT CHEST",  # (0008,1030)
    )


def enrich(resource: dict[str, Any]) -> dict[str, Any]:
    """The other writer's edit of the pushed ImagingStudy (a new dict)."""
    res = copy.deepcopy(resource)
    res.setdefault("meta", {}).update(copy.deepcopy(META))
    res["extension"] = [copy.deepcopy(QUALITY_REVIEW)]
    res["modifierExtension"] = [dict(MODIFIER)]
    res["procedureCode"] = copy.deepcopy(PROCEDURE)
    res["note"] = copy.deepcopy(NOTE)
    res["series"][0]["extension"] = [copy.deepcopy(SERIES_EXTENSION)]
    res["series"][0]["instance"][0]["title"] = "Key image (reviewer)"
    return res


async def run_lifecycle(
    sink: GraphQLSink,
    store: SQLiteStateStore,
    graphql_url: str,
    read_stored: Callable[[str], Awaitable[dict[str, Any]]],
    study: str,
    *,
    token: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Push series 1, let the other writer enrich the study, push series 2.

    Returns the backend copy right after the enrichment and after the update (as ``read_stored`` reads
    them, independently of the sink).
    """
    settings = Settings(relay=RelaySettings(stable_age_s=0, concurrency=2))
    relay = Relay(store, sink, StudyBuilder(mapping_options(settings)), settings.relay, clock=lambda: NOW)

    async def push(rec: InstanceRecord) -> None:
        store.add_instance(
            rec, source="test", spool_name=None, digest=f"d-{rec.sop_uid}", now=NOW, due_at=NOW
        )
        await relay.run_once()

    await push(record(study, 1, 1))
    assert relay.totals.results["created"] == 1
    row = store.study(study)
    assert row is not None and row.backend_id is not None
    enriched = enrich(await read_stored(row.backend_id))
    res = {k: v for k, v in enriched.items() if k != "meta"} | {"meta": dict(META)}
    answer = await gql(graphql_url, UPDATE, {"id": row.backend_id, "res": res}, token=token)
    assert "errors" not in answer, answer
    before = await read_stored(row.backend_id)
    await push(record(study, 2, 1))
    assert relay.totals.results["updated"] == 1, relay.totals.results
    return before, await read_stored(row.backend_id)


def assert_foreign_content_kept(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Element by element: all but ``ingest``'s owned, changing parts is as the other writer left it."""
    assert before["extension"] == [QUALITY_REVIEW] and before["note"] == NOTE  # the backend took the edit
    for key in sorted(set(before) | set(after)):
        if key not in OWNED_CHANGING:
            assert after.get(key) == before.get(key), key
    for key in ("tag", "security", "profile"):
        assert after["meta"][key] == before["meta"][key], key
    by_uid = {s["uid"]: s for s in after["series"]}
    first = before["series"][0]
    assert by_uid[first["uid"]] == first  # the series ingest did not change: as it was, extension included
    assert by_uid[first["uid"]]["instance"][0]["title"] == "Key image (reviewer)"
    assert after["numberOfSeries"] == 2 and after["numberOfInstances"] == 2


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


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStateStore]:
    with SQLiteStateStore(tmp_path / "state.sqlite3", node="test") as s:
        yield s


async def test_foreign_content_at_every_level_survives_an_update_that_adds_a_series(
    embedded: tuple[GraphQLSink, Path, str], store: SQLiteStateStore, caplog: pytest.LogCaptureFixture
) -> None:
    sink, db, url = embedded
    backend = ResourceStore(db)

    async def read_stored(rid: str) -> dict[str, Any]:
        found = backend.read("ImagingStudy", rid)
        assert found is not None
        return found

    caplog.set_level(logging.DEBUG, logger="ingest.adapters.graphql.sink")
    try:
        before, after = await run_lifecycle(sink, store, url, read_stored, "1.2.826.0.1.3680043.8.498.77")
    finally:
        backend.close()
    assert_foreign_content_kept(before, after)
    # the first selection stopped at the second extension level: the sink read deeper for this resource
    assert any("deeper read" in r.getMessage() for r in caplog.records)


async def test_the_first_read_stops_short_and_its_sentinel_shows_it(
    embedded: tuple[GraphQLSink, Path, str], store: SQLiteStateStore
) -> None:
    sink, _db, url = embedded
    study = "1.2.826.0.1.3680043.8.498.78"
    created = await sink.create(
        enrich(
            {
                "resourceType": "ImagingStudy",
                "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study}"}],
                "status": "available",
                "subject": {"display": "Test"},
                "series": [
                    {
                        "uid": f"{study}.1",
                        "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"},
                        "instance": [{"uid": f"{study}.1.1", "sopClass": {"code": f"urn:oid:{CT_IMAGE}"}}],
                    }
                ],
            }
        )
    )
    assert sink.fit.read is not None
    raw = await gql(url, sink.fit.read, {"id": created.id})
    first = raw["data"][READ_FIELD]
    # the first read holds the first two levels of the extension, and a non-null sentinel below them
    assert first["extension"][0]["extension"][0]["extension"][0] == {"__typename": "Extension"}
    assert ("extension", "extension", "extension") in sentinel_paths(first)
    parse(sink.fit.read)  # (the document is plain GraphQL)
    found = await sink.find(study, created.id)
    assert found is not None and found.resource["extension"] == [QUALITY_REVIEW]
    assert "__typename" not in repr(found.resource)
