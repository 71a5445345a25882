"""The lifecycle of a study against Medplum's own FHIR GraphQL implementation (``server.mjs``).

The scenario of ``tests/adapters/graphql/test_sink_foreign.py`` (another writer enriches the study, a late
series arrives, every foreign element survives element by element; the read goes deeper than its first
selection) against Medplum, read back independently by FHIR REST (``GET ImagingStudy/<id>``). Then the
case Medplum's GraphQL cannot carry: its ``ImagingStudyCreate`` input type has no ``contained`` (Medplum
leaves every Resource-typed element out of its input types), so a study with a contained Practitioner
referenced from ``interpreter`` is dead-lettered with ``unwritable_content`` and left as it is.
"""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp

from ingest.adapters.graphql.sink import GraphQLSink
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app.wiring import mapping_options
from ingest.config import RelaySettings, Settings
from ingest.relay.build import StudyBuilder
from ingest.relay.relay import Relay
from tests.adapters.graphql.test_sink_foreign import (
    OWNED_CHANGING,
    assert_foreign_content_kept,
    record,
    run_lifecycle,
)

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
PRACTITIONER = {
    "resourceType": "Practitioner",
    "id": "reader1",
    "name": [{"family": "Reader", "given": ["Ada"]}],
}


def _rest(graphql_url: str) -> str:
    return graphql_url.removesuffix("$graphql")


async def _get(graphql_url: str, rid: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{_rest(graphql_url)}ImagingStudy/{rid}") as resp,
    ):
        assert resp.status == 200
        found: dict[str, Any] = await resp.json(content_type=None)
        return found


async def _put(graphql_url: str, resource: dict[str, Any]) -> None:
    url = f"{_rest(graphql_url)}ImagingStudy/{resource['id']}"
    async with aiohttp.ClientSession() as session, session.put(url, json=resource) as resp:
        assert resp.status == 200, await resp.text()


async def test_foreign_content_survives_an_update_on_medplum(
    medplum_url: str, store: SQLiteStateStore
) -> None:
    async def read_stored(rid: str) -> dict[str, Any]:
        return await _get(medplum_url, rid)

    async with GraphQLSink(medplum_url, token_source=None, timeout_s=20) as sink:
        before, after = await run_lifecycle(sink, store, medplum_url, read_stored, f"2.25.{uuid.uuid4().int}")
    assert_foreign_content_kept(before, after)


async def test_a_contained_practitioner_survives_an_update_by_fhir_rest(
    medplum_url: str, store: SQLiteStateStore
) -> None:
    study = f"2.25.{uuid.uuid4().int}"
    settings = Settings(relay=RelaySettings(stable_age_s=0, concurrency=2))
    async with GraphQLSink(medplum_url, token_source=None, timeout_s=20) as sink:
        relay = Relay(store, sink, StudyBuilder(mapping_options(settings)), settings.relay, clock=lambda: NOW)
        store.add_instance(record(study, 1, 1), source="t", spool_name=None, digest="d1", now=NOW, due_at=NOW)
        await relay.run_once()
        row = store.study(study)
        assert row is not None and row.backend_id is not None
        # another writer adds a contained Practitioner and points interpreter at it (Medplum's GraphQL
        # input has no contained, so it writes by FHIR REST PUT)
        enriched = copy.deepcopy(await _get(medplum_url, row.backend_id))
        enriched["contained"] = [PRACTITIONER]
        enriched["interpreter"] = [{"reference": "#reader1"}]
        await _put(medplum_url, enriched)
        before = await _get(medplum_url, row.backend_id)
        store.add_instance(record(study, 2, 1), source="t", spool_name=None, digest="d2", now=NOW, due_at=NOW)
        await relay.run_once()
    assert relay.totals.results == {"created": 1, "updated": 1}
    after = await _get(medplum_url, row.backend_id)
    assert after["contained"] == [PRACTITIONER] == before["contained"]
    assert after["interpreter"] == [{"reference": "#reader1"}]
    for key in sorted(set(before) | set(after)):
        if key not in OWNED_CHANGING:
            assert after.get(key) == before.get(key), key
    assert after["numberOfSeries"] == 2 and after["meta"]["versionId"] != before["meta"]["versionId"]
