"""The embedded backend under attack: cross-site requests, bearer token, query cost, deep JSON.

Each test talks HTTP to a real server on 127.0.0.1 and checks the effect through a separate, legitimate
request (a refused write must not have happened), not only the status code.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from gql.utilities import get_introspection_query_ast
from graphql import get_introspection_query, print_ast

from ingest.adapters.graphql.fit import fit_resource, fit_schema
from ingest.adapters.graphql.sink import study_identifier
from ingest.app.wiring import embedded_backend
from ingest.backend.limits import QueryLimits
from ingest.backend.schema import build_backend_schema
from ingest.backend.server import GRAPHQL_PATH, create_app, start_backend
from ingest.config import EmbeddedBackendSettings, Settings
from tests.backend.test_backend import CREATE, LIST_IDS, READ, ROOT, study

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
Client_ = TestClient[web.Request, web.Application]

EVIL = "http://evil.example"
DELETE = "mutation($id: ID!) { ImagingStudyDelete(id: $id) { id } }"


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, tmp_path: Path) -> Client_:
    return await aiohttp_client(create_app(tmp_path / "backend.sqlite"))


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[str]:
    """A backend started as ``ingest serve`` starts it (loopback bind); yields its base URL."""
    runner, port = await start_backend(tmp_path / "served.sqlite", host="127.0.0.1", port=0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def post(client: Client_, query: str, variables: dict[str, Any] | None = None) -> tuple[int, Any]:
    resp = await client.post(GRAPHQL_PATH, json={"query": query, "variables": variables})
    return resp.status, await resp.json(content_type=None)


async def study_ids(client: Client_, n: int) -> list[str]:
    status, body = await post(client, LIST_IDS, {"i": f"urn:dicom:uid|urn:oid:{ROOT}.{n}"})
    assert status == 200 and "errors" not in body, body
    return [item["id"] for item in body["data"]["ImagingStudyList"] or []]


async def create(client: Client_, n: int) -> str:
    status, body = await post(client, CREATE, {"res": study(n)})
    assert status == 200 and "errors" not in body, body
    created: str = body["data"]["ImagingStudyCreate"]["id"]
    return created


def outcome_text(body: Any) -> str:
    assert body["resourceType"] == "OperationOutcome", body
    text: str = body["issue"][0]["details"]["text"]
    return text


# ------------------------------------------------------------------------------------- cross-site


def _simple_body(query: str, variables: dict[str, Any], content_type: str) -> str:
    """What a page of another site can POST without a preflight, crafted so the body is still JSON."""
    payload = json.dumps({"query": query, "variables": variables})
    if content_type == "application/x-www-form-urlencoded":  # <input name='{"query":...,"x":"' value='"}'>
        return payload[:-1] + ', "x": "=y"}'
    return payload


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
@pytest.mark.parametrize("origin", [EVIL, None])
async def test_cross_site_simple_posts_neither_create_nor_delete(
    client: Client_, content_type: str, origin: str | None
) -> None:
    kept = await create(client, 100)
    headers = {"Content-Type": content_type}
    if origin is not None:
        headers["Origin"] = origin
    for query, variables in ((CREATE, {"res": study(101)}), (DELETE, {"id": kept})):
        body = _simple_body(query, variables, content_type)
        json.loads(body)  # the attack only works because the body is valid JSON
        resp = await client.post(GRAPHQL_PATH, data=body, headers=headers)
        assert resp.status == (403 if origin else 415)
        assert resp.content_type == "application/fhir+json"
    assert await study_ids(client, 101) == []  # not created
    _, read = await post(client, READ, {"id": kept})
    assert read["data"]["ImagingStudy"]["id"] == kept  # not deleted


async def test_foreign_origin_is_refused_even_with_json(client: Client_) -> None:
    own = str(client.make_url("")).rstrip("/")
    port = client.port
    assert port is not None
    for origin in (EVIL, "null", f"http://localhost:{port + 1}", f"https://127.0.0.1:{port}"):
        resp = await client.post(
            GRAPHQL_PATH, json={"query": CREATE, "variables": {"res": study(102)}}, headers={"Origin": origin}
        )
        assert resp.status == 403, origin
    assert await study_ids(client, 102) == []
    resp = await client.post(
        GRAPHQL_PATH, json={"query": CREATE, "variables": {"res": study(102)}}, headers={"Origin": own}
    )
    assert resp.status == 200
    assert len(await study_ids(client, 102)) == 1


async def test_preflight_grants_nothing(client: Client_) -> None:
    for origin in (EVIL, str(client.make_url("")).rstrip("/")):
        resp = await client.options(
            GRAPHQL_PATH,
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, authorization",
            },
        )
        assert resp.status in (204, 403)
        granted = [k for k in resp.headers if k.lower().startswith("access-control-allow")]
        assert granted == [], (origin, granted)


async def test_mutation_over_get_is_refused(client: Client_) -> None:
    resp = await client.get(
        GRAPHQL_PATH, params={"query": CREATE, "variables": json.dumps({"res": study(103)})}
    )
    assert resp.status == 405
    assert await study_ids(client, 103) == []


async def test_graphql_content_type_is_accepted(client: Client_) -> None:
    resp = await client.post(
        GRAPHQL_PATH, data="{ ImagingStudyList { id } }", headers={"Content-Type": "application/graphql"}
    )
    assert resp.status == 200 and await resp.json() == {"data": {"ImagingStudyList": None}}


async def test_dns_rebinding_host_is_refused_on_loopback(served: str) -> None:
    port = served.rsplit(":", 1)[1]
    query = {"query": CREATE, "variables": {"res": study(104)}}
    async with aiohttp.ClientSession() as session:
        rebound = {
            "Host": f"evil.example:{port}",
            "Origin": f"http://evil.example:{port}",
        }  # same-origin to it
        async with session.post(served + GRAPHQL_PATH, json=query, headers=rebound) as resp:
            assert resp.status == 403
        check = {"query": LIST_IDS, "variables": {"i": f"urn:dicom:uid|urn:oid:{ROOT}.104"}}
        async with session.post(
            served + GRAPHQL_PATH, json=check, headers={"Host": f"localhost:{port}"}
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["data"]["ImagingStudyList"] is None


# ------------------------------------------------------------------------------------------ token


def _settings(tmp_path: Path, token_env: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        embedded_backend=EmbeddedBackendSettings(port=0, token_env=token_env, database=tmp_path / "b.sqlite"),
    )


async def test_configured_token_is_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    variable, secret = f"INGEST_TEST_TOKEN_{uuid.uuid4().hex}", uuid.uuid4().hex
    monkeypatch.setenv(variable, secret)
    query = {"query": CREATE, "variables": {"res": study(105)}}
    async with embedded_backend(_settings(tmp_path, variable), port=0) as url, aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": secret}):
            async with s.post(url, json=query, headers=headers) as resp:
                assert resp.status == 401
        check = {"query": LIST_IDS, "variables": {"i": f"urn:dicom:uid|urn:oid:{ROOT}.105"}}
        async with s.post(url, json=check, headers={"Authorization": f"Bearer {secret}"}) as resp:
            assert resp.status == 200 and (await resp.json())["data"]["ImagingStudyList"] is None


# ------------------------------------------------------------------------------------------- cost


async def assert_too_costly(client: Client_, payload: dict[str, Any], words: str) -> None:
    started = time.perf_counter()
    resp = await client.post(GRAPHQL_PATH, json=payload)
    elapsed = time.perf_counter() - started
    body = await resp.json(content_type=None)
    assert resp.status == 400, body
    assert body["issue"][0]["code"] == "too-costly"
    assert words in outcome_text(body)
    assert elapsed < 3.0, elapsed  # ~0.3 s alone; 2 loaded cores in CI triple it
    stats = await (await client.get("/stats")).json()
    assert stats["lookups"] == stats["reads"] == stats["creates"] == 0  # nothing was executed


async def test_alias_bomb_is_refused_quickly(client: Client_) -> None:
    query = "{ " + " ".join(f"a{i}: ImagingStudyList {{ id }}" for i in range(8000)) + " }"
    await assert_too_costly(client, {"query": query}, "Query too complex")


@pytest.mark.parametrize(
    ("aliases", "words"), [(150, "150 aliases (at most 100)"), (2000, "more than 1000 fields")]
)
async def test_aliases_and_fields_are_capped(client: Client_, aliases: int, words: str) -> None:
    query = "{ " + " ".join(f"a{i}: ImagingStudyList {{ id }}" for i in range(aliases)) + " }"
    await assert_too_costly(client, {"query": query}, words)


async def test_repeated_fields_are_refused_quickly(client: Client_) -> None:
    # no aliases: the same field 3,000 times (the standard overlap check compares them pairwise)
    query = "{ " + " ".join("ImagingStudyList { id }" for _ in range(3000)) + " }"
    await assert_too_costly(client, {"query": query}, "Query too complex")


async def test_alias_bomb_through_fragments_is_refused(client: Client_) -> None:
    # each fragment asks twice for the next one: 2**10 copies of `url` from a document of 20 aliases
    levels = 10
    fragments = " ".join(
        f"fragment F{i} on Extension {{ a: extension {{ ...F{i + 1} }} b: extension {{ ...F{i + 1} }} }}"
        for i in range(levels)
    )
    last = f"fragment F{levels} on Extension {{ url }}"
    query = f"{{ ImagingStudyList {{ extension {{ ...F0 }} }} }} {fragments} {last}"
    await assert_too_costly(client, {"query": query}, "aliases")


async def test_depth_bomb_is_refused(client: Client_) -> None:
    nested = "extension { " * 30 + "url" + " }" * 30
    await assert_too_costly(client, {"query": f"{{ ImagingStudyList {{ {nested} }} }}"}, "levels deep")
    chain = " ".join(f"fragment F{i} on Extension {{ extension {{ ...F{i + 1} }} }}" for i in range(30))
    query = f"{{ ImagingStudyList {{ extension {{ ...F0 }} }} }} {chain} fragment F30 on Extension {{ url }}"
    await assert_too_costly(client, {"query": query}, "levels deep")


async def test_too_many_operations_and_tokens_are_refused(client: Client_) -> None:
    operations = " ".join(f"query Q{i} {{ ImagingStudyList {{ id }} }}" for i in range(50))
    await assert_too_costly(client, {"query": operations, "operationName": "Q0"}, "operations")
    tokens = "{ ImagingStudyList(" + ", ".join(f'p{i}: "x"' for i in range(8000)) + ") { id } }"
    await assert_too_costly(client, {"query": tokens}, "tokens")


@pytest.mark.parametrize("levels", [100, 100_000])
async def test_deeply_nested_variables_answer_400_without_traceback(
    client: Client_, caplog: pytest.LogCaptureFixture, levels: int
) -> None:
    res = '{"a": ' * levels + "1" + "}" * levels
    body = f'{{"query": {json.dumps(CREATE)}, "variables": {{"res": {res}}}}}'
    caplog.set_level(logging.DEBUG)
    resp = await client.post(GRAPHQL_PATH, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    answer = await resp.json(content_type=None)
    assert "nested too deeply" in outcome_text(answer)
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert (await client.get("/healthz")).status == 200  # still serving


async def test_deeply_nested_inline_literal_answers_400(
    client: Client_, caplog: pytest.LogCaptureFixture
) -> None:
    levels = 1500  # well within the token limit, deeper than the parser's recursion can go
    literal = "{ extension: [" * levels + '{ url: "u" }' + "] }" * levels
    query = f"mutation {{ ImagingStudyCreate(res: {literal}) {{ id }} }}"
    resp = await client.post(GRAPHQL_PATH, json={"query": query})
    assert resp.status == 400
    body = await resp.json(content_type=None)
    assert body["issue"][0]["code"] == "too-costly" and "nested too deeply" in outcome_text(body)
    assert not [r for r in caplog.records if r.exc_info]


async def test_body_over_the_limit_answers_413(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    client = await aiohttp_client(
        create_app(tmp_path / "backend.sqlite", limits=QueryLimits(max_body_bytes=4096))
    )
    resp = await client.post(
        GRAPHQL_PATH, json={"query": CREATE, "variables": {"res": study(106, pad="x" * 8000)}}
    )
    assert resp.status == 413
    assert "larger than 4096 bytes" in outcome_text(await resp.json(content_type=None))
    assert await study_ids(client, 106) == []


# ---------------------------------------------------------------------------- legitimate clients


async def test_ingest_sink_documents_and_introspection_pass_the_limits(client: Client_) -> None:
    schema = build_backend_schema()
    fit = fit_schema(schema)
    created = await create(client, 107)
    token = study_identifier(f"{ROOT}.107")
    requests: list[tuple[str, dict[str, Any]]] = [
        (fit.read or "", {"id": created}),
        (fit.search, {"identifier": token, "count": 2}),
        (fit.update, {"id": created, "res": study(107, id=created)}),
        (fit.create, {"res": study(108)}),
        (get_introspection_query(), {}),
        (print_ast(get_introspection_query_ast(descriptions=False, input_value_deprecation=False)), {}),
    ]
    for resource_type in ("Patient", "Endpoint"):
        fitted = fit_resource(schema, resource_type)
        assert fitted is not None
        requests.append((print_ast(fitted.search), {"identifier": "urn:oid:1.2.3|x"}))
    for query, variables in requests:
        assert query
        status, body = await post(client, query, variables)
        assert status == 200 and "errors" not in body, (query[:80], body)
    status, body = await post(client, fit.read or "", {"id": created})
    assert body["data"]["ImagingStudy"]["series"][0]["instance"][1]["number"] == 2


async def test_aliases_cannot_multiply_a_full_page(client: Client_) -> None:
    await create(client, 109)
    query = "{ " + " ".join(f"p{i}: ImagingStudyList(_count: 600) {{ id }}" for i in range(3)) + " }"
    status, body = await post(client, query)
    assert status == 200
    pages = [body["data"][f"p{i}"] for i in range(3)]
    assert sum(page is not None for page in pages) == 1  # 600 fit the budget of 1000, 1200 do not
    assert [e["message"] for e in body["errors"]] == ["Too many resources in one request (at most 1000)"] * 2
    status, body = await post(client, "{ ImagingStudyList(_count: 1000) { id } }")  # one full page is fine
    assert status == 200 and "errors" not in body and len(body["data"]["ImagingStudyList"]) == 1
