"""What Medplum's FHIR GraphQL implementation really answers, request by request.

These tests talk plain HTTP (aiohttp) to ``server.mjs`` (Medplum 4.5.2 FhirRouter over MemoryRepository,
writes checked by ``validateResource``) and pin the response shapes that the project's GraphQL sink must
handle. The expectations come from the Medplum 4.5.2 captures in tests/fixtures/medplum/
(probe-results.md, imagingstudy-sdl.graphql) and the checked-in SDL excerpt, not from the project's
code. Each test uses its own random study UID (``2.25.<uuid>``), so tests do not depend on each other or
on order, even though they share one server per session.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from graphql import (
    FieldDefinitionNode,
    InputObjectTypeDefinitionNode,
    InputValueDefinitionNode,
    ObjectTypeDefinitionNode,
    parse,
    print_ast,
)
from multidict import CIMultiDict

from tests import FIXTURES

# Captured from exactly this setup (see README.md), checked in with a note on its origin.
REFERENCE_SDL = FIXTURES / "medplum" / "imagingstudy-sdl.graphql"
SCHEMA_FIXTURE = FIXTURES / "medplum_schema.graphql"

DCM = "http://dicom.nema.org/resources/ontology/DCM"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
JSON = "application/json"
FHIR_JSON = "application/fhir+json"

CREATE = (
    "mutation($res: ImagingStudyCreate!) "
    "{ ImagingStudyCreate(res: $res) { id meta { versionId lastUpdated } status } }"
)
UPDATE = (
    "mutation($id: ID!, $res: ImagingStudyCreate!) { ImagingStudyUpdate(id: $id, res: $res) "
    "{ id meta { versionId lastUpdated } status numberOfInstances } }"
)
READ = (
    "query($id: ID!) { ImagingStudy(id: $id) "
    "{ id meta { versionId lastUpdated } identifier { system value } status } }"
)
LIST_BY_IDENTIFIER = (
    "query($i: String!) { ImagingStudyList(identifier: $i) { id meta { versionId lastUpdated } } }"
)


# -- helpers ---------------------------------------------------------------------------------------------


def new_study_uid() -> str:
    """A fresh UID under the UUID-derived root 2.25 (PS3.5 B.2), unique per call."""
    return f"2.25.{uuid.uuid4().int}"


def study_identifier(study_uid: str) -> dict[str, str]:
    # ImagingStudy.identifier <- (0020,000D) StudyInstanceUID, as urn:oid (docs/mapping.md)
    return {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}


def imaging_study(study_uid: str, instances: int = 2, **overrides: Any) -> dict[str, Any]:
    """An R4 ImagingStudy for one MR series with ``instances`` instances, as the sink would send it."""
    series_uid = f"{study_uid}.1"
    resource: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": [study_identifier(study_uid)],
        "status": "available",
        "subject": {"reference": "Patient/p-1"},
        "started": "2024-05-01T10:15:00Z",
        "numberOfSeries": 1,
        "numberOfInstances": instances,
        "series": [
            {
                "uid": series_uid,  # ImagingStudy.series.uid <- (0020,000E)
                "number": 1,
                "modality": {"system": DCM, "code": "MR"},  # ImagingStudy.series.modality <- (0008,0060)
                "numberOfInstances": instances,
                "instance": [
                    {
                        "uid": f"{series_uid}.{n}",  # ImagingStudy.series.instance.uid <- (0008,0018)
                        "number": n,
                        # ImagingStudy.series.instance.sopClass <- (0008,0016)
                        "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{MR_IMAGE_STORAGE}"},
                    }
                    for n in range(1, instances + 1)
                ],
            }
        ],
    }
    resource.update(overrides)
    return resource


class Response:
    """Status, bare content type, headers (case-insensitive) and decoded JSON body of one HTTP exchange."""

    def __init__(self, status: int, content_type: str, headers: CIMultiDict[str], body: Any) -> None:
        self.status = status
        self.content_type = content_type
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.content_type!r}, {self.body!r})"


async def post_raw(
    url: str, data: bytes, headers: dict[str, str] | None = None, content_type: str = JSON
) -> Response:
    """POST ``data`` as-is and decode the JSON answer (whatever its status)."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=data, headers={"Content-Type": content_type, **(headers or {})}) as resp,
    ):
        body = await resp.json(content_type=None)
        return Response(resp.status, resp.content_type, CIMultiDict(resp.headers), body)


async def graphql(
    url: str, query: str, variables: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> Response:
    """POST one GraphQL request ``{"query", "variables"}`` as JSON."""
    payload: dict[str, Any] = {"query": query}
    if variables is not None:
        payload["variables"] = variables
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=payload, headers=headers or {}) as resp,
    ):
        body = await resp.json(content_type=None)
        return Response(resp.status, resp.content_type, CIMultiDict(resp.headers), body)


async def get(url: str, headers: dict[str, str] | None = None) -> Response:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers or {}) as resp:
        body = await resp.json(content_type=None)
        return Response(resp.status, resp.content_type, CIMultiDict(resp.headers), body)


async def create(url: str, resource: dict[str, Any]) -> dict[str, Any]:
    """Create through GraphQL and return the ``ImagingStudyCreate`` object; fail on any error."""
    resp = await graphql(url, CREATE, {"res": resource})
    assert resp.status == 200, resp
    assert "errors" not in resp.body, resp
    created: dict[str, Any] = resp.body["data"]["ImagingStudyCreate"]
    return created


def assert_operation_outcome(resp: Response, status: int, text: str) -> None:
    """HTTP ``status`` with one OperationOutcome issue (error/invalid) whose details.text is ``text``."""
    assert resp.status == status, resp
    assert resp.content_type == FHIR_JSON
    assert resp.body == {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "invalid", "details": {"text": text}}],
    }


def rest_url(graphql_url: str, path: str) -> str:
    return graphql_url.removesuffix("$graphql") + path


def parse_instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# -- create / read / list ------------------------------------------------------------------------------


async def test_create_returns_server_id_and_version(medplum_url: str) -> None:
    resp = await graphql(medplum_url, CREATE, {"res": imaging_study(new_study_uid())})

    assert resp.status == 200
    assert resp.content_type == JSON
    assert set(resp.body) == {"data"}
    created = resp.body["data"]["ImagingStudyCreate"]
    assert set(created) == {"id", "meta", "status"}
    assert isinstance(created["id"], str) and created["id"]
    assert isinstance(created["meta"]["versionId"], str) and created["meta"]["versionId"]
    assert created["meta"]["versionId"] != created["id"]
    assert parse_instant(created["meta"]["lastUpdated"]).tzinfo is not None
    assert created["status"] == "available"


async def test_two_creates_get_distinct_ids(medplum_url: str) -> None:
    first = await create(medplum_url, imaging_study(new_study_uid()))
    second = await create(medplum_url, imaging_study(new_study_uid()))
    assert first["id"] != second["id"]
    assert first["meta"]["versionId"] != second["meta"]["versionId"]


async def test_read_by_id_returns_meta_and_identifier(medplum_url: str) -> None:
    study_uid = new_study_uid()
    created = await create(medplum_url, imaging_study(study_uid))

    resp = await graphql(medplum_url, READ, {"id": created["id"]})

    assert resp.status == 200
    assert resp.body == {
        "data": {
            "ImagingStudy": {
                "id": created["id"],
                "meta": created["meta"],
                "identifier": [study_identifier(study_uid)],
                "status": "available",
            }
        }
    }


async def test_list_by_identifier_token_finds_the_study(medplum_url: str) -> None:
    study_uid = new_study_uid()
    created = await create(medplum_url, imaging_study(study_uid))
    await create(medplum_url, imaging_study(new_study_uid()))  # another study must not match

    resp = await graphql(medplum_url, LIST_BY_IDENTIFIER, {"i": f"urn:dicom:uid|urn:oid:{study_uid}"})

    assert resp.status == 200
    assert resp.body == {"data": {"ImagingStudyList": [{"id": created["id"], "meta": created["meta"]}]}}


async def test_list_with_no_match_is_null_not_empty_list(medplum_url: str) -> None:
    resp = await graphql(medplum_url, LIST_BY_IDENTIFIER, {"i": f"urn:dicom:uid|urn:oid:{new_study_uid()}"})

    assert resp.status == 200
    assert resp.body == {"data": {"ImagingStudyList": None}}


async def test_aliased_lookups_in_one_query(medplum_url: str) -> None:
    hit_uid = new_study_uid()
    created = await create(medplum_url, imaging_study(hit_uid))
    query = (
        f'query {{ x: ImagingStudyList(identifier: "urn:dicom:uid|urn:oid:{hit_uid}") {{ id }} '
        f'y: ImagingStudyList(identifier: "urn:dicom:uid|urn:oid:{new_study_uid()}") {{ id }} }}'
    )

    resp = await graphql(medplum_url, query)

    assert resp.body == {"data": {"x": [{"id": created["id"]}], "y": None}}


async def test_read_missing_id_is_http_200_with_errors(medplum_url: str) -> None:
    resp = await graphql(medplum_url, '{ ImagingStudy(id: "nope") { id } }')

    assert resp.status == 200
    assert resp.content_type == JSON
    assert resp.body == {
        "errors": [
            {"message": "Not found", "locations": [{"line": 1, "column": 3}], "path": ["ImagingStudy"]}
        ],
        "data": {"ImagingStudy": None},
    }


# -- update ----------------------------------------------------------------------------------------------


async def test_update_takes_create_input_and_bumps_version(medplum_url: str) -> None:
    study_uid = new_study_uid()
    created = await create(medplum_url, imaging_study(study_uid, instances=2))
    study_id = created["id"]

    resp = await graphql(
        medplum_url, UPDATE, {"id": study_id, "res": imaging_study(study_uid, instances=3, id=study_id)}
    )

    assert resp.status == 200
    updated = resp.body["data"]["ImagingStudyUpdate"]
    assert "errors" not in resp.body
    assert updated["id"] == study_id
    assert updated["numberOfInstances"] == 3
    assert updated["meta"]["versionId"] != created["meta"]["versionId"]
    assert parse_instant(updated["meta"]["lastUpdated"]) >= parse_instant(created["meta"]["lastUpdated"])
    read = await graphql(medplum_url, READ, {"id": study_id})
    assert read.body["data"]["ImagingStudy"]["meta"] == updated["meta"]


async def test_identical_update_still_creates_a_new_version(medplum_url: str) -> None:
    """The backend does not diff: an unchanged resource gets a new versionId, so the client must diff."""
    study_uid = new_study_uid()
    created = await create(medplum_url, imaging_study(study_uid))
    same = imaging_study(study_uid, id=created["id"])

    first = await graphql(medplum_url, UPDATE, {"id": created["id"], "res": same})
    second = await graphql(medplum_url, UPDATE, {"id": created["id"], "res": same})

    versions = {
        created["meta"]["versionId"],
        first.body["data"]["ImagingStudyUpdate"]["meta"]["versionId"],
        second.body["data"]["ImagingStudyUpdate"]["meta"]["versionId"],
    }
    assert len(versions) == 3


async def test_update_with_stale_meta_version_is_not_rejected(medplum_url: str) -> None:
    """No optimistic locking through GraphQL: a stale res.meta.versionId is ignored (last write wins)."""
    study_uid = new_study_uid()
    created = await create(medplum_url, imaging_study(study_uid))
    stale = created["meta"]["versionId"]
    await graphql(
        medplum_url, UPDATE, {"id": created["id"], "res": imaging_study(study_uid, id=created["id"])}
    )

    resp = await graphql(
        medplum_url,
        UPDATE,
        {
            "id": created["id"],
            "res": imaging_study(study_uid, id=created["id"], status="cancelled", meta={"versionId": stale}),
        },
    )

    assert resp.status == 200
    assert "errors" not in resp.body
    assert resp.body["data"]["ImagingStudyUpdate"]["status"] == "cancelled"
    assert resp.body["data"]["ImagingStudyUpdate"]["meta"]["versionId"] != stale


async def test_update_if_match_argument_does_not_exist(medplum_url: str) -> None:
    query = (
        "mutation($id: ID!, $res: ImagingStudyCreate!) "
        '{ ImagingStudyUpdate(id: $id, res: $res, ifMatch: "W/\\"x\\"") { id } }'
    )
    study_uid = new_study_uid()
    resp = await graphql(medplum_url, query, {"id": "x", "res": imaging_study(study_uid, id="x")})

    assert_operation_outcome(
        resp, 400, 'Unknown argument "ifMatch" on field "MutationType.ImagingStudyUpdate".'
    )


@pytest.mark.parametrize(
    ("res_overrides", "drop", "message"),
    [
        pytest.param({}, "id", "Invalid ID", id="res-without-id"),
        pytest.param({"id": "some-other-id"}, None, "Invalid ID", id="res-id-differs"),
        pytest.param({}, "resourceType", "Invalid resourceType", id="res-without-resourceType"),
    ],
)
async def test_update_needs_res_id_and_resource_type(
    medplum_url: str, res_overrides: dict[str, Any], drop: str | None, message: str
) -> None:
    study_uid = new_study_uid()
    created = await create(medplum_url, imaging_study(study_uid))
    res = imaging_study(study_uid, **{"id": created["id"], **res_overrides})
    if drop is not None:
        del res[drop]

    resp = await graphql(medplum_url, UPDATE, {"id": created["id"], "res": res})

    assert resp.status == 200
    assert resp.body == {
        "errors": [
            {"message": message, "locations": [{"line": 1, "column": 49}], "path": ["ImagingStudyUpdate"]}
        ],
        "data": {"ImagingStudyUpdate": None},
    }
    unchanged = await graphql(medplum_url, READ, {"id": created["id"]})
    assert unchanged.body["data"]["ImagingStudy"]["meta"] == created["meta"]


async def test_update_of_unknown_id_creates_it(medplum_url: str) -> None:
    client_id = f"client-{uuid.uuid4()}"
    resp = await graphql(
        medplum_url, UPDATE, {"id": client_id, "res": imaging_study(new_study_uid(), id=client_id)}
    )

    assert resp.status == 200
    assert resp.body["data"]["ImagingStudyUpdate"]["id"] == client_id


# -- request errors: HTTP 400 with an OperationOutcome -----------------------------------------------------


async def test_syntax_error_is_http_400_operation_outcome(medplum_url: str) -> None:
    resp = await graphql(medplum_url, "mutation { ImagingStudyCreate(res: { ")
    assert_operation_outcome(resp, 400, "GraphQL syntax error.")


async def test_missing_query_is_http_400(medplum_url: str) -> None:
    resp = await post_raw(medplum_url, b'{"variables": {}}')
    assert_operation_outcome(resp, 400, "Must provide query.")


async def test_invalid_json_body_is_http_400(medplum_url: str) -> None:
    resp = await post_raw(medplum_url, b"{not json")
    assert_operation_outcome(resp, 400, "Invalid JSON body")


async def test_unknown_field_is_http_400(medplum_url: str) -> None:
    resp = await graphql(medplum_url, "{ ImagingStudyList { id bogusField } }")
    assert_operation_outcome(resp, 400, 'Cannot query field "bogusField" on type "ImagingStudy".')


async def test_unknown_search_argument_is_http_400(medplum_url: str) -> None:
    resp = await graphql(medplum_url, '{ ImagingStudyList(studyInstanceUid: "x") { id } }')
    assert_operation_outcome(
        resp, 400, 'Unknown argument "studyInstanceUid" on field "QueryType.ImagingStudyList".'
    )


# -- invalid resources: HTTP 200 with errors[] ------------------------------------------------------------


async def test_missing_subject_in_variables_fails_variable_coercion(medplum_url: str) -> None:
    """``subject: ReferenceCreate!`` is checked by GraphQL coercion: errors[] and no ``data`` key at all."""
    res = imaging_study(new_study_uid())
    del res["subject"]

    resp = await graphql(medplum_url, CREATE, {"res": res})

    assert resp.status == 200
    assert resp.content_type == JSON
    assert set(resp.body) == {"errors"}
    [error] = resp.body["errors"]
    assert error["message"].startswith('Variable "$res" got invalid value ')
    assert error["message"].endswith('Field "subject" of required type "ReferenceCreate!" was not provided.')
    assert error["locations"] == [{"line": 1, "column": 10}]
    assert "path" not in error


async def test_missing_subject_inline_is_http_400(medplum_url: str) -> None:
    query = (
        'mutation { ImagingStudyCreate(res: { resourceType: "ImagingStudy", status: "available" }) { id } }'
    )
    resp = await graphql(medplum_url, query)
    assert_operation_outcome(
        resp, 400, 'Field "ImagingStudyCreate.subject" of required type "ReferenceCreate!" was not provided.'
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(
            {"started": "May 1st 2024"}, "Invalid dateTime format (ImagingStudy.started)", id="started"
        ),
        pytest.param({"resourceType": "Patient"}, "Invalid resourceType", id="wrong-resourceType"),
        pytest.param({"resourceType": None}, "Invalid resourceType", id="missing-resourceType"),
    ],
)
async def test_invalid_resource_is_rejected_by_the_resolver(
    medplum_url: str, overrides: dict[str, Any], message: str
) -> None:
    """Server-side validation (validateResource) fails the field: errors[] with a path, data null."""
    resp = await graphql(medplum_url, CREATE, {"res": imaging_study(new_study_uid(), **overrides)})

    assert resp.status == 200
    assert resp.body == {
        "errors": [
            {"message": message, "locations": [{"line": 1, "column": 39}], "path": ["ImagingStudyCreate"]}
        ],
        "data": {"ImagingStudyCreate": None},
    }


async def test_invalid_series_uid_is_rejected_and_nothing_is_stored(medplum_url: str) -> None:
    study_uid = new_study_uid()
    res = imaging_study(study_uid)
    res["series"][0]["uid"] = "not a valid id!"

    resp = await graphql(medplum_url, CREATE, {"res": res})

    assert resp.body["errors"][0]["message"] == "Invalid id format (ImagingStudy.series[0].uid)"
    assert resp.body["data"] == {"ImagingStudyCreate": None}
    found = await graphql(medplum_url, LIST_BY_IDENTIFIER, {"i": f"urn:dicom:uid|urn:oid:{study_uid}"})
    assert found.body == {"data": {"ImagingStudyList": None}}


async def test_unknown_status_code_is_accepted(medplum_url: str) -> None:
    """No terminology check: status "bogus" violates the required binding but is stored as sent."""
    resp = await graphql(medplum_url, CREATE, {"res": imaging_study(new_study_uid(), status="bogus")})

    assert resp.status == 200
    assert "errors" not in resp.body
    assert resp.body["data"]["ImagingStudyCreate"]["status"] == "bogus"


async def test_batch_failure_in_the_middle_keeps_the_others(medplum_url: str) -> None:
    """Mutation fields run one by one without a transaction: a bad field is null, the others are written."""
    query = (
        "mutation Batch($a: ImagingStudyCreate!, $b: ImagingStudyCreate!, $c: ImagingStudyCreate!) {\n"
        "  a: ImagingStudyCreate(res: $a) { id }\n"
        "  b: ImagingStudyCreate(res: $b) { id }\n"
        "  c: ImagingStudyCreate(res: $c) { id }\n"
        "}"
    )
    variables = {
        "a": imaging_study(new_study_uid()),
        "b": imaging_study(new_study_uid(), started="not-a-date"),
        "c": imaging_study(new_study_uid()),
    }

    resp = await graphql(medplum_url, query, variables)

    assert resp.status == 200
    assert resp.body["errors"] == [
        {
            "message": "Invalid dateTime format (ImagingStudy.started)",
            "locations": [{"line": 3, "column": 3}],
            "path": ["b"],
        }
    ]
    assert resp.body["data"]["b"] is None
    assert resp.body["data"]["a"]["id"] and resp.body["data"]["c"]["id"]


# -- REST read, delete -------------------------------------------------------------------------------------


async def test_rest_read_has_etag_of_the_current_version(medplum_url: str) -> None:
    study_uid = new_study_uid()
    created = await create(medplum_url, imaging_study(study_uid))

    resp = await get(rest_url(medplum_url, f"ImagingStudy/{created['id']}"))

    assert resp.status == 200
    assert resp.content_type == FHIR_JSON
    assert resp.headers["ETag"] == f'W/"{created["meta"]["versionId"]}"'
    last_modified = parsedate_to_datetime(resp.headers["Last-Modified"])
    assert last_modified == parse_instant(created["meta"]["lastUpdated"]).replace(microsecond=0)
    assert resp.body["resourceType"] == "ImagingStudy"
    assert resp.body["id"] == created["id"]
    assert resp.body["meta"] == created["meta"]
    assert resp.body["identifier"] == [study_identifier(study_uid)]
    assert [i["number"] for i in resp.body["series"][0]["instance"]] == [1, 2]


async def test_rest_read_of_unknown_id_is_404(medplum_url: str) -> None:
    resp = await get(rest_url(medplum_url, "ImagingStudy/does-not-exist"))
    assert resp.status == 404
    assert resp.body["resourceType"] == "OperationOutcome"
    assert resp.body["issue"][0]["code"] == "not-found"


async def test_delete_then_read_and_delete_again(medplum_url: str) -> None:
    created = await create(medplum_url, imaging_study(new_study_uid()))
    delete = "mutation($id: ID!) { ImagingStudyDelete(id: $id) { id } }"

    first = await graphql(medplum_url, delete, {"id": created["id"]})
    read = await graphql(
        medplum_url, "query($id: ID!) { ImagingStudy(id: $id) { id } }", {"id": created["id"]}
    )
    again = await graphql(medplum_url, delete, {"id": created["id"]})

    assert first.body == {"data": {"ImagingStudyDelete": None}}
    assert read.body["errors"][0]["message"] == "Not found"
    assert read.body["data"] == {"ImagingStudy": None}
    assert again.body["errors"][0]["message"] == "Not found"
    assert again.body["errors"][0]["path"] == ["ImagingStudyDelete"]


# -- authentication, introspection -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong-token"),
        pytest.param({"Authorization": "Basic dXNlcjpwYXNz"}, id="wrong-scheme"),
    ],
)
async def test_token_server_rejects_without_the_token(
    medplum_token_url: str, headers: dict[str, str]
) -> None:
    resp = await graphql(medplum_token_url, "{ __typename }", headers=headers)

    assert resp.status == 401
    assert resp.content_type == FHIR_JSON
    assert resp.body["resourceType"] == "OperationOutcome"
    assert resp.body["issue"][0]["code"] == "login"


async def test_token_server_accepts_the_token(medplum_token_url: str, medplum_token: str) -> None:
    auth = {"Authorization": f"Bearer {medplum_token}"}
    resp = await graphql(medplum_token_url, CREATE, {"res": imaging_study(new_study_uid())}, headers=auth)

    assert resp.status == 200
    assert resp.body["data"]["ImagingStudyCreate"]["id"]
    rest = await get(
        rest_url(medplum_token_url, f"ImagingStudy/{resp.body['data']['ImagingStudyCreate']['id']}")
    )
    assert rest.status == 401


async def test_server_without_token_ignores_authorization(medplum_url: str) -> None:
    resp = await graphql(medplum_url, "{ __typename }", headers={"Authorization": "Bearer anything"})
    assert resp.body == {"data": {"__typename": "QueryType"}}


async def test_introspection_is_allowed(medplum_url: str) -> None:
    resp = await graphql(medplum_url, "{ __schema { queryType { name } mutationType { name } } }")

    assert resp.status == 200
    assert resp.body == {
        "data": {"__schema": {"queryType": {"name": "QueryType"}, "mutationType": {"name": "MutationType"}}}
    }


# -- the served schema is the probed one -------------------------------------------------------------------

ROOT_TYPES = ("QueryType", "MutationType")
_TYPE_REF = "kind name ofType { kind name ofType { kind name ofType { kind name } } }"


def _type_string(ref: dict[str, Any]) -> str:
    """Render an introspection type reference the way SDL writes it (``[CodingCreate!]``)."""
    if ref["kind"] == "NON_NULL":
        return _type_string(ref["ofType"]) + "!"
    if ref["kind"] == "LIST":
        return "[" + _type_string(ref["ofType"]) + "]"
    name: str = ref["name"]
    return name


def _sdl_fields(node: InputObjectTypeDefinitionNode | ObjectTypeDefinitionNode) -> dict[str, str]:
    """Field name -> SDL type; root fields also carry their arguments (the reference drops them elsewhere)."""
    fields: dict[str, str] = {}
    for field in node.fields or ():
        assert isinstance(field, InputValueDefinitionNode | FieldDefinitionNode)
        rendered = print_ast(field.type)
        if node.name.value in ROOT_TYPES and isinstance(field, FieldDefinitionNode) and field.arguments:
            args = ", ".join(f"{a.name.value}: {print_ast(a.type)}" for a in field.arguments)
            rendered = f"({args}) {rendered}"
        fields[field.name.value] = rendered
    return fields


def _sdl_types(path: Path) -> dict[str, dict[str, str]]:
    """Type name -> {field name -> SDL type} for every input/object type in an SDL file."""
    types: dict[str, dict[str, str]] = {}
    for definition in parse(path.read_text()).definitions:
        if isinstance(definition, InputObjectTypeDefinitionNode | ObjectTypeDefinitionNode):
            types[definition.name.value] = _sdl_fields(definition)
    return types


async def _served_types(url: str, names: list[str]) -> dict[str, dict[str, str]]:
    """The same view as ``_sdl_types``, read from the live server with one aliased introspection query."""
    selections = " ".join(
        f't{i}: __type(name: "{name}") {{ name '
        f"inputFields {{ name type {{ {_TYPE_REF} }} }} "
        f"fields {{ name args {{ name type {{ {_TYPE_REF} }} }} type {{ {_TYPE_REF} }} }} }}"
        for i, name in enumerate(names)
    )
    resp = await graphql(url, f"{{ {selections} }}")
    assert resp.status == 200 and "errors" not in resp.body, resp
    served: dict[str, dict[str, str]] = {}
    for alias, item in resp.body["data"].items():
        assert item is not None, f"type {names[int(alias[1:])]} is not served"
        fields: dict[str, str] = {}
        for f in item["inputFields"] or ():
            fields[f["name"]] = _type_string(f["type"])
        for f in item["fields"] or ():
            rendered = _type_string(f["type"])
            if item["name"] in ROOT_TYPES and f["args"]:
                args = ", ".join(f"{a['name']}: {_type_string(a['type'])}" for a in f["args"])
                rendered = f"({args}) {rendered}"
            fields[f["name"]] = rendered
        served[item["name"]] = fields
    return served


async def test_served_schema_is_the_probed_one(medplum_url: str) -> None:
    """Every type of the captured Medplum SDL is served exactly (root types: its fields)."""
    expected = _sdl_types(REFERENCE_SDL)

    served = await _served_types(medplum_url, list(expected))

    for type_name, expected_fields in expected.items():
        if type_name in ROOT_TYPES:  # the reference keeps only the ImagingStudy* root fields
            subset = {k: v for k, v in served[type_name].items() if k in expected_fields}
            assert subset == expected_fields, type_name
        else:
            assert served[type_name] == expected_fields, type_name


async def test_checked_in_schema_fixture_is_a_subset_of_medplum(medplum_url: str) -> None:
    """Each field of tests/fixtures/medplum_schema.graphql exists on Medplum with the same type and args.

    The sink tests validate their documents against that file, so anything it allows Medplum accepts.
    """
    expected = _sdl_types(SCHEMA_FIXTURE)

    served = await _served_types(medplum_url, list(expected))

    for type_name, expected_fields in expected.items():
        subset = {k: v for k, v in served[type_name].items() if k in expected_fields}
        assert subset == expected_fields, type_name
