"""GraphQLSink against a canned FHIR GraphQL server on 127.0.0.1 (graphql-core, Medplum-shaped schema).

The server executes real GraphQL over ``tests/fixtures/medplum_schema.graphql`` (Medplum's introspected
ImagingStudy SDL) with an in-memory store, so introspection, validation of variables and the
``null``-for-no-match behaviour are the server's, not the sink's. Each test can queue canned answers
(the shapes in the Medplum probe results) that are served before normal execution.
"""

from __future__ import annotations

import asyncio
import copy
import email.utils
import functools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from graphql import GraphQLError, GraphQLSchema, build_schema, graphql

from ingest.adapters.graphql.sink import GraphQLSink, study_identifier
from ingest.errors import (
    ConfigError,
    MultipleMatchesError,
    PermanentSinkError,
    RetryableSinkError,
)
from tests import FIXTURES, free_ports

MEDPLUM_SDL = (FIXTURES / "medplum_schema.graphql").read_text()

# The FHIR GraphQL spec's shape: the mutations take the *resource* type as input (``res: ImagingStudy``),
# the list has no ``_count``; an output field with a required argument must be left out of the read.
SPEC_SDL = """
schema { query: Query mutation: Mutation }
type Query {
  ImagingStudy(id: ID!): ImagingStudyResource
  ImagingStudyList(identifier: String, status: String): [ImagingStudyResource]
}
type Mutation {
  ImagingStudyCreate(res: ImagingStudy): ImagingStudyResource
  ImagingStudyUpdate(id: ID, res: ImagingStudy): ImagingStudyResource
}
input ImagingStudy { resourceType: String id: ID status: String identifier: [IdentifierInput] }
input IdentifierInput { system: String value: String }
type Identifier { system: String value: String }
type Meta { versionId: ID lastUpdated: String }
type ImagingStudyResource {
  resourceType: String
  id: ID
  meta: Meta
  status: String
  identifier: [Identifier]
  history(since: String!): [Identifier]
}
"""

STUDY_UID = "1.2.826.0.1.3680043.8.498.2000.1"
PATIENT_NAME = "Yamada^Tarou"

Canned = Callable[[web.Request], Awaitable[web.StreamResponse]]


def study(uid: str = STUDY_UID, *, instances: int = 2) -> dict[str, Any]:
    """An ImagingStudy as the core would build it (FHIR JSON)."""
    return {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "status": "available",
        "subject": {"reference": "Patient/p-1", "display": "Tarou Yamada"},
        "started": "2024-05-01",
        "numberOfSeries": 1,
        "numberOfInstances": instances,
        "series": [
            {
                "uid": f"{uid}.1",
                "number": 1,
                "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "MR"},
                "numberOfInstances": instances,
                "instance": [
                    {
                        "uid": f"{uid}.1.{n}",
                        "number": n,
                        "sopClass": {
                            "system": "urn:ietf:rfc:3986",
                            "code": "urn:oid:1.2.840.10008.5.1.4.1.1.4",
                        },
                    }
                    for n in range(1, instances + 1)
                ],
            }
        ],
    }


@functools.cache
def _schema(sdl: str) -> GraphQLSchema:
    return build_schema(sdl)


class FakeBackend:
    """A FHIR GraphQL server: graphql-core over a schema, an in-memory store, a queue of canned answers."""

    def __init__(self, sdl: str) -> None:
        self.schema: GraphQLSchema = _schema(sdl)
        self.store: dict[str, dict[str, Any]] = {}
        self.canned: list[Canned] = []
        self.requests: list[dict[str, Any]] = []
        self.token: str | None = None  # when set, other bearer tokens get HTTP 401

    def put(self, resource: dict[str, Any]) -> dict[str, Any]:
        rid = resource.get("id") or str(uuid.uuid4())
        stored = {**copy.deepcopy(resource), "id": rid, "meta": {"versionId": str(uuid.uuid4())}}
        stored["meta"]["lastUpdated"] = "2026-11-27T05:47:49.793Z"
        self.store[rid] = stored
        return stored

    # -- resolvers (Medplum's behaviour per probe-results.md)
    def _read(self, info: Any, id: str) -> dict[str, Any]:
        if id not in self.store:
            raise GraphQLError("Not found")
        return self.store[id]

    def _list(self, info: Any, identifier: str | None = None, _count: int | None = None, **_: Any) -> Any:
        system, _sep, value = (identifier or "").partition("|")
        hits = [
            r
            for r in self.store.values()
            if any(i.get("system") == system and i.get("value") == value for i in r.get("identifier", []))
        ]
        return hits[:_count] if hits else None  # Medplum: null, not [], when nothing matches

    def _create(self, info: Any, res: dict[str, Any]) -> dict[str, Any]:
        if res.get("resourceType") != "ImagingStudy":
            raise GraphQLError("Invalid resourceType")
        return self.put({k: v for k, v in res.items() if k != "id"})

    def _update(self, info: Any, id: str, res: dict[str, Any]) -> dict[str, Any]:
        if res.get("id") != id:
            raise GraphQLError("Incorrect ID")
        return self.put(res)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(
            {
                "query": body.get("query", ""),
                "variables": body.get("variables"),
                "authorization": request.headers.get("Authorization"),
            }
        )
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(
                {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login"}]},
                status=401,
            )
        if self.canned:
            return await self.canned.pop(0)(request)
        root = {
            "ImagingStudy": self._read,
            "ImagingStudyList": self._list,
            "ImagingStudyCreate": self._create,
            "ImagingStudyUpdate": self._update,
        }
        result = await graphql(
            self.schema, body["query"], root_value=root, variable_values=body.get("variables")
        )
        out: dict[str, Any] = {"data": result.data}
        if result.errors:
            out["errors"] = [e.formatted for e in result.errors]
        return web.json_response(out)


def canned_json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Canned:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(
            text=json.dumps(body), status=status, headers=headers, content_type="application/fhir+json"
        )

    return answer


def canned_text(text: str, status: int, headers: dict[str, str] | None = None) -> Canned:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(text=text, status=status, headers=headers, content_type="text/html")

    return answer


async def cut_mid_body(request: web.Request) -> web.StreamResponse:
    """Send headers promising 1000 bytes, then part of the JSON, then close the connection."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": "1000"})
    await resp.prepare(request)
    await resp.write(b'{"data": {"ImagingStudyList": [')
    assert request.transport is not None
    request.transport.close()
    return resp


async def too_slow(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(3)
    return web.json_response({"data": {"ImagingStudyList": None}})


OperationOutcome400 = {
    "resourceType": "OperationOutcome",
    "issue": [
        {
            "severity": "error",
            "code": "invalid",
            "details": {"text": 'Unknown argument "ifMatch" on field "MutationType.ImagingStudyUpdate".'},
        }
    ],
}


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(MEDPLUM_SDL)


@pytest.fixture
async def server(aiohttp_server: Any, backend: FakeBackend) -> TestServer:
    app = web.Application()
    app.router.add_post("/fhir/R4/$graphql", backend.handle)
    srv: TestServer = await aiohttp_server(app, host="127.0.0.1")
    return srv


def url_of(server: TestServer) -> str:
    return str(server.make_url("/fhir/R4/$graphql"))


@pytest.fixture
async def sink(server: TestServer) -> Any:
    s = GraphQLSink(url_of(server), token_source=None, timeout_s=2.0)
    await s.connect()
    yield s
    await s.aclose()


# -- round trip against the Medplum-shaped server ----------------------------------------------------


async def test_create_find_update_round_trip(sink: GraphQLSink, backend: FakeBackend) -> None:
    assert await sink.find(STUDY_UID, None) is None  # the server answers ImagingStudyList: null

    created = await sink.create(study())
    assert created.id in backend.store
    assert created.version_id == backend.store[created.id]["meta"]["versionId"]
    assert created.resource["series"][0]["instance"][1]["uid"] == f"{STUDY_UID}.1.2"

    found = await sink.find(STUDY_UID, None)
    assert found is not None and found.id == created.id and found.version_id == created.version_id
    search = backend.requests[-1]
    assert search["variables"] == {"identifier": f"urn:dicom:uid|urn:oid:{STUDY_UID}", "count": 2}

    updated = await sink.update(created.id, {**found.resource, "numberOfInstances": 3})
    assert updated.id == created.id and updated.version_id != created.version_id
    sent = backend.requests[-1]
    assert "$res: ImagingStudyCreate!" in sent["query"]
    assert sent["variables"]["id"] == created.id
    assert sent["variables"]["res"]["id"] == created.id
    assert sent["variables"]["res"]["resourceType"] == "ImagingStudy"
    assert "versionId" not in json.dumps(sent["variables"]["res"])  # server-managed meta never sent
    assert backend.store[created.id]["numberOfInstances"] == 3

    by_id = await sink.find(STUDY_UID, created.id)
    assert by_id is not None and by_id.version_id == updated.version_id
    assert "ImagingStudy(id: $id)" in backend.requests[-1]["query"]


async def test_full_read_returns_what_the_merge_must_preserve(
    sink: GraphQLSink, backend: FakeBackend
) -> None:
    theirs = study()
    theirs["note"] = [{"text": "reported by phone", "time": "2024-05-02"}]
    theirs["basedOn"] = [{"reference": "ServiceRequest/sr-1"}]
    theirs["extension"] = [
        {"url": "http://example.org/x", "valueCodeableConcept": {"coding": [{"system": "s", "code": "c"}]}}
    ]
    theirs["series"][0]["performer"] = [{"actor": {"display": "Operator"}, "function": {"text": "PRF"}}]
    theirs["identifier"].append({"system": "http://other.example", "value": "A-1"})
    stored = backend.put(theirs)

    found = await sink.find(STUDY_UID, None)
    assert found is not None
    assert found.resource == stored  # every element, and no nulls or empties added
    assert "null" not in json.dumps(found.resource)


async def test_gone_backend_id_falls_back_to_search(sink: GraphQLSink, backend: FakeBackend) -> None:
    stored = backend.put(study())
    found = await sink.find(STUDY_UID, "deleted-id")
    assert found is not None and found.id == stored["id"]
    assert "ImagingStudy(id: $id)" in backend.requests[-2]["query"]
    assert "ImagingStudyList(identifier: $identifier" in backend.requests[-1]["query"]


async def test_two_matches_raise_multiple_matches(sink: GraphQLSink, backend: FakeBackend) -> None:
    first, second = backend.put(study()), backend.put(study())
    with pytest.raises(MultipleMatchesError) as info:
        await sink.find(STUDY_UID, None)
    assert first["id"] in str(info.value) and second["id"] in str(info.value)
    assert study_identifier(STUDY_UID) in str(info.value)


async def test_pruned_fields_logged_at_debug_without_values(
    sink: GraphQLSink, backend: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ingest")
    resource = study()
    resource["meta"] = {"versionId": "v-old", "lastUpdated": "2020-01-01T00:00:00Z"}
    resource["series"][0]["secretSauce"] = PATIENT_NAME
    created = await sink.create(resource)  # the server would refuse unknown fields: pruning made it pass
    assert "secretSauce" not in backend.store[created.id]["series"][0]
    messages = [r.getMessage() for r in caplog.records if r.name == "ingest.adapters.graphql.sink"]
    assert any("series[].secretSauce" in m and "meta.versionId" in m for m in messages)
    assert PATIENT_NAME not in caplog.text and "v-old" not in caplog.text


# -- classification of every answer shape ------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "error", "code", "text"),
    [
        (canned_json(OperationOutcome400, 400), PermanentSinkError, 400, 'Unknown argument "ifMatch"'),
        (
            canned_json(
                {
                    "errors": [{"message": "Invalid dateTime format (ImagingStudy.started)", "path": ["x"]}],
                    "data": {"ImagingStudyCreate": None},
                }
            ),
            PermanentSinkError,
            None,
            "Invalid dateTime format (ImagingStudy.started)",
        ),
        (canned_text("<h1>Internal Server Error</h1>", 500), RetryableSinkError, 500, "HTTP 500"),
        (canned_json({"message": "upstream down"}, 503), RetryableSinkError, 503, "HTTP 503"),
        (canned_text("slow down", 429, {"Retry-After": "7"}), RetryableSinkError, 429, "HTTP 429"),
        (canned_json({"resourceType": "OperationOutcome", "issue": []}, 403), PermanentSinkError, 403, "403"),
        (canned_text("<html>login page</html>", 200), PermanentSinkError, 200, "not a GraphQL response"),
        (cut_mid_body, RetryableSinkError, None, "connection failed"),
    ],
    ids=["400-outcome", "200-errors", "500", "503-json", "429", "403", "200-html", "cut-mid-body"],
)
async def test_answer_shapes_are_classified(
    sink: GraphQLSink,
    backend: FakeBackend,
    answer: Canned,
    error: type[Exception],
    code: int | None,
    text: str,
) -> None:
    backend.canned.append(answer)
    with pytest.raises(error) as info:
        await sink.create(study())
    assert text in str(info.value)
    assert getattr(info.value, "code", None) == code
    if code == 429:
        assert getattr(info.value, "retry_after", None) == 7.0
    # permanent errors are not retried silently: exactly one request reached the server
    assert backend.canned == [] and len([r for r in backend.requests if "Create" in r["query"]]) == 1


async def test_invalid_value_echo_is_withheld(sink: GraphQLSink, backend: FakeBackend) -> None:
    echo = (
        'Variable "$res" got invalid value { resourceType: "ImagingStudy", subject: { display: "'
        + PATIENT_NAME
        + '" }, foo: "bar" }; Field "foo" is not defined by type "ImagingStudyCreate".'
    )
    backend.canned.append(canned_json({"errors": [{"message": echo}]}))
    with pytest.raises(PermanentSinkError) as info:
        await sink.create(study())
    assert PATIENT_NAME not in str(info.value)
    assert 'Field "foo" is not defined by type "ImagingStudyCreate"' in str(info.value)


async def test_timeout_is_retryable(server: TestServer, backend: FakeBackend) -> None:
    # the schema is given as SDL (no introspection round trip), so only the slow answer meets the timeout
    async with GraphQLSink(url_of(server), token_source=None, timeout_s=0.3, schema=MEDPLUM_SDL) as sink:
        backend.canned.append(too_slow)
        with pytest.raises(RetryableSinkError, match=r"no answer within 0\.3 s"):
            await sink.find(STUDY_UID, None)


async def test_connection_refused_at_connect_is_retryable() -> None:
    port = free_ports(1)[0]  # nothing listens there
    sink = GraphQLSink(f"http://127.0.0.1:{port}/fhir/R4/$graphql", token_source=None, timeout_s=2.0)
    with pytest.raises(RetryableSinkError, match="connection failed"):
        await sink.connect()
    await sink.aclose()


async def test_backend_without_imagingstudy_mutations_refuses_to_start(aiohttp_server: Any) -> None:
    bare = FakeBackend("type Query { ImagingStudyList(identifier: String): [S] } type S { id: ID }")
    app = web.Application()
    app.router.add_post("/g", bare.handle)
    srv = await aiohttp_server(app, host="127.0.0.1")
    sink = GraphQLSink(str(srv.make_url("/g")), token_source=None, timeout_s=2.0)
    with pytest.raises(ConfigError, match="no mutation field ImagingStudyCreate"):
        await sink.connect()


async def test_spec_shaped_backend_gets_resource_input(aiohttp_server: Any) -> None:
    spec = FakeBackend(SPEC_SDL)
    app = web.Application()
    app.router.add_post("/g", spec.handle)
    srv = await aiohttp_server(app, host="127.0.0.1")
    async with GraphQLSink(str(srv.make_url("/g")), token_source=None, timeout_s=2.0) as sink:
        created = await sink.create(study())
        assert spec.store[created.id]["identifier"] == study()["identifier"]
        assert "$res: ImagingStudy)" in spec.requests[-1]["query"]
        found = await sink.find(STUDY_UID, None)
        assert found is not None and found.id == created.id
        assert "_count" not in spec.requests[-1]["query"] and "count" not in spec.requests[-1]["variables"]


async def test_retry_after_as_http_date_is_a_hint(sink: GraphQLSink, backend: FakeBackend) -> None:
    when = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    backend.canned.append(canned_text("maintenance", 503, {"Retry-After": when}))
    with pytest.raises(RetryableSinkError) as info:
        await sink.update("some-id", study())
    assert info.value.code == 503
    assert info.value.retry_after is not None and 60 < info.value.retry_after <= 90


async def test_forbidden_introspection_is_a_config_error(server: TestServer, backend: FakeBackend) -> None:
    forbidden = {
        "resourceType": "OperationOutcome",
        "issue": [{"code": "forbidden", "details": {"text": "Forbidden"}}],
    }
    backend.canned.append(canned_json(forbidden, 403))
    sink = GraphQLSink(url_of(server), token_source=None, timeout_s=2.0)
    with pytest.raises(ConfigError, match=r"introspection.*HTTP 403.*Forbidden.*set \[backend\] schema"):
        await sink.connect()
    # with the schema given as SDL the sink starts without introspecting
    async with GraphQLSink(url_of(server), token_source=None, timeout_s=2.0, schema=MEDPLUM_SDL) as ok:
        assert await ok.find(STUDY_UID, None) is None
    assert "__schema" not in backend.requests[-1]["query"]
