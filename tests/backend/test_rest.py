"""Read-only FHIR REST on the embedded backend (``ingest.backend.rest``): what GraphQL wrote, read with
plain FHIR REST, each answer validated with fhir.resources' R4B models (not with ingest's own)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.operationoutcome import OperationOutcome
from yarl import URL

from ingest.backend.server import GRAPHQL_PATH, create_app
from tests.backend.test_backend import CREATE, study

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
FHIR_JSON = "application/fhir+json"


async def _created(client: TestClient[web.Request, web.Application], n: int) -> dict[str, Any]:
    resp = await client.post(GRAPHQL_PATH, json={"query": CREATE, "variables": {"res": study(n)}})
    body = await resp.json()
    return dict(body["data"]["ImagingStudyCreate"])


async def test_read_search_and_metadata_are_valid_fhir(tmp_path: Path, aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(tmp_path / "b.sqlite3"))
    made = [await _created(client, n) for n in (1, 2, 3)]

    resp = await client.get(f"/fhir/R4/ImagingStudy/{made[0]['id']}")
    assert resp.status == 200 and resp.content_type == FHIR_JSON
    assert resp.headers["ETag"] == f'W/"{made[0]["meta"]["versionId"]}"'
    assert "Last-Modified" in resp.headers
    read = ImagingStudy.model_validate(await resp.json())
    assert read.id == made[0]["id"] and read.identifier[0].value == "urn:oid:1.2.826.0.1.3680043.8.498.2000.1"

    resp = await client.get("/fhir/R4/ImagingStudy",
                            params={"identifier": "urn:dicom:uid|urn:oid:1.2.826.0.1.3680043.8.498.2000.2"})
    assert resp.status == 200
    bundle = Bundle.model_validate(await resp.json())
    assert bundle.type == "searchset"
    assert [e.resource.id for e in bundle.entry] == [made[1]["id"]]
    assert bundle.entry[0].fullUrl.endswith(f"/fhir/R4/ImagingStudy/{made[1]['id']}")

    resp = await client.get("/fhir/R4/ImagingStudy", params={"_count": "2"})
    page = Bundle.model_validate(await resp.json())
    assert len(page.entry) == 2
    (nxt,) = [link.url for link in page.link if link.relation == "next"]
    follow = URL(str(nxt))  # absolute; followed through its path and query
    resp = await client.get(follow.path, params=dict(follow.query))
    second = Bundle.model_validate(await resp.json())
    seen = {e.resource.id for e in page.entry} | {e.resource.id for e in second.entry}
    assert seen == {m["id"] for m in made}

    resp = await client.get("/fhir/R4/metadata")
    assert resp.status == 200
    capability = CapabilityStatement.model_validate(await resp.json())
    types = {r.type: r for r in capability.rest[0].resource}
    assert {"ImagingStudy", "Patient", "Endpoint"} <= set(types)
    assert {i.code for i in types["ImagingStudy"].interaction} == {"read", "search-type"}


async def test_errors_are_operation_outcomes_and_nothing_is_writable(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    client = await aiohttp_client(create_app(tmp_path / "b.sqlite3"))
    made = await _created(client, 1)
    for path, status in (("/fhir/R4/ImagingStudy/no-such-id", 404), ("/fhir/R4/Observation/x", 404),
                         ("/fhir/R4/ImagingStudy?nonsense=1", 400), ("/fhir/R4/ImagingStudy?_count=x", 400)):
        resp = await client.get(path)
        assert resp.status == status, path
        OperationOutcome.model_validate(await resp.json())
    resp = await client.put(f"/fhir/R4/ImagingStudy/{made['id']}", data=json.dumps(study(1)),
                            headers={"Content-Type": FHIR_JSON})
    assert resp.status == 405
    resp = await client.delete(f"/fhir/R4/ImagingStudy/{made['id']}")
    assert resp.status == 405
    assert (await client.get(f"/fhir/R4/ImagingStudy/{made['id']}")).status == 200


async def test_rest_reads_need_the_token_and_refuse_foreign_origins(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    client = await aiohttp_client(create_app(tmp_path / "b.sqlite3", token="s3cret"))
    assert (await client.get("/fhir/R4/metadata")).status == 401
    assert (await client.get("/fhir/R4/ImagingStudy")).status == 401
    auth = {"Authorization": "Bearer s3cret"}
    assert (await client.get("/fhir/R4/ImagingStudy", headers=auth)).status == 200
    foreign = {**auth, "Origin": "https://evil.example"}
    assert (await client.get("/fhir/R4/ImagingStudy", headers=foreign)).status == 403
