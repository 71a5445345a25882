"""``contained`` and the other content GraphQL cannot carry whole (docs/mapping.md, "The lifecycle").

Against the graphql-core server of ``test_sink`` (Medplum's introspected ImagingStudy SDL), with a FHIR REST
route next to it where a test needs one. Medplum's ``ImagingStudyCreate`` input type has no ``contained``
(Medplum leaves every Resource-typed element out of its input types), while its output type returns
``contained`` as the ``ResourceList`` union.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ingest.adapters.graphql.sink import GraphQLSink
from ingest.errors import ForeignContentError, RetryableSinkError
from tests.adapters.graphql.test_sink import MEDPLUM_SDL, STUDY_UID, FakeBackend, study

#: An Observation contained in the study (``Observation`` is a member of the fixture's ResourceList union;
#: the fixture keeps only its ``resourceType`` and ``id``).
OBSERVATION = {"resourceType": "Observation", "id": "obs1"}
#: The server's schema names Practitioner in the union; the SDL the sink is given (``[backend] schema``,
#: the checked-in fixture) does not.
WIDER_SDL = (
    MEDPLUM_SDL.replace(
        "union ResourceList = ImagingStudy |", "union ResourceList = Practitioner | ImagingStudy |"
    )
    + "\ntype Practitioner { resourceType: String! id: String }\n"
)


def with_contained(item: dict[str, Any]) -> dict[str, Any]:
    res = study()
    # graphql-core resolves a union member from "__typename" in the stored dict
    res["contained"] = [{**item, "__typename": item["resourceType"]}]
    res["interpreter"] = [{"reference": f"#{item['id']}"}]
    return res


async def _server(aiohttp_server: Any, backend: FakeBackend, rest: Any = None) -> TestServer:
    app = web.Application()
    app.router.add_post("/fhir/R4/$graphql", backend.handle)
    if rest is not None:
        app.router.add_route("*", "/fhir/R4/ImagingStudy/{id}", rest)
    srv: TestServer = await aiohttp_server(app, host="127.0.0.1")
    return srv


async def test_contained_of_a_type_the_schema_cannot_return_is_an_incomplete_read(
    aiohttp_server: Any,
) -> None:
    backend = FakeBackend(WIDER_SDL)
    stored = backend.put(with_contained({"resourceType": "Practitioner", "id": "p1"}))
    srv = await _server(aiohttp_server, backend)
    url = str(srv.make_url("/fhir/R4/$graphql"))
    async with GraphQLSink(url, token_source=None, timeout_s=5, schema=MEDPLUM_SDL) as sink:
        with pytest.raises(ForeignContentError, match="contained resource of type 'Practitioner'") as caught:
            await sink.find(STUDY_UID, stored["id"])
    assert caught.value.reason == "incomplete_read"
    assert [r["query"].split("(")[0].split("{")[0].strip() for r in backend.requests] == [
        "query IngestProbe",
        "query ReadImagingStudy",
    ]


async def test_contained_is_read_whole_but_without_a_rest_route_the_update_is_refused(
    aiohttp_server: Any,
) -> None:
    backend = FakeBackend(MEDPLUM_SDL)
    stored = backend.put(with_contained(OBSERVATION))
    srv = await _server(aiohttp_server, backend)  # no REST route: GET ImagingStudy/<id> answers 404
    async with GraphQLSink(str(srv.make_url("/fhir/R4/$graphql")), token_source=None, timeout_s=5) as sink:
        found = await sink.find(STUDY_UID, stored["id"])
        assert found is not None
        # the deeper read fetched the contained Observation through "... on Observation"
        assert found.resource["contained"] == [OBSERVATION]
        assert any("... on Observation" in r["query"] for r in backend.requests)
        with pytest.raises(ForeignContentError, match=r"contained.*cannot carry") as caught:
            await sink.update(found.id, {**found.resource, "numberOfInstances": 3})
    assert caught.value.reason == "unwritable_content"
    assert not any("ImagingStudyUpdate" in r["query"] for r in backend.requests)


async def test_with_a_rest_route_the_update_is_a_put_with_if_match(aiohttp_server: Any) -> None:
    backend = FakeBackend(MEDPLUM_SDL)
    stored = backend.put(with_contained(OBSERVATION))
    rest_copy = {k: v for k, v in stored.items()}
    rest_copy["contained"] = [OBSERVATION]
    seen: list[tuple[str, str | None, Any]] = []
    answers = [412, 200]

    async def rest(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            seen.append(("GET", None, None))
            return web.json_response(rest_copy, content_type="application/fhir+json")
        seen.append(("PUT", request.headers.get("If-Match"), await request.json()))
        status = answers.pop(0)
        if status != 200:
            return web.json_response({"resourceType": "OperationOutcome", "issue": []}, status=status)
        return web.json_response({**(await request.json()), "meta": {"versionId": "v2"}})

    srv = await _server(aiohttp_server, backend, rest)
    async with GraphQLSink(str(srv.make_url("/fhir/R4/$graphql")), token_source=None, timeout_s=5) as sink:
        found = await sink.find(STUDY_UID, stored["id"])
        assert found is not None and found.resource == rest_copy  # the REST copy, whole
        with pytest.raises(RetryableSinkError, match="changed since it was read"):  # 412: read again
            await sink.update(found.id, {**found.resource, "numberOfInstances": 3})
        found = await sink.find(STUDY_UID, stored["id"])
        assert found is not None
        written = await sink.update(found.id, {**found.resource, "numberOfInstances": 3})
    assert written.version_id == "v2"
    puts = [s for s in seen if s[0] == "PUT"]
    assert [p[1] for p in puts] == [f'W/"{stored["meta"]["versionId"]}"'] * 2
    assert puts[-1][2]["contained"] == [OBSERVATION] and puts[-1][2]["numberOfInstances"] == 3
    assert "versionId" not in puts[-1][2].get("meta", {})
