"""The embedded FHIR GraphQL backend, over HTTP, against the shapes Medplum 4.5.2 answers with.

Expected answers come from tests/fixtures/medplum/probe-results.md and the FHIR R4 search
rules, not from the code under test.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from gql import Client, GraphQLRequest
from gql.transport.aiohttp import AIOHTTPTransport
from graphql import GraphQLList, GraphQLNonNull, GraphQLObjectType, get_named_type

from ingest.backend.server import GRAPHQL_PATH, STORE_KEY, create_app, serve, start_backend
from ingest.backend.store import date_range, format_instant

AiohttpClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
Client_ = TestClient[web.Request, web.Application]

DCM = "http://dicom.nema.org/resources/ontology/DCM"
MR_STORAGE = "urn:oid:1.2.840.10008.5.1.4.1.1.4"
ROOT = "1.2.826.0.1.3680043.8.498.2000"
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
INSTANT_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")

CREATE = (
    "mutation($res: ImagingStudyCreate!) { ImagingStudyCreate(res: $res) "
    "{ id meta { versionId lastUpdated } status numberOfSeries } }"
)
UPDATE = (
    "mutation($id: ID!, $res: ImagingStudyCreate!) { ImagingStudyUpdate(id: $id, res: $res) "
    "{ id meta { versionId lastUpdated } status numberOfInstances } }"
)
READ = (
    "query($id: ID!) { ImagingStudy(id: $id) "
    "{ id meta { versionId lastUpdated } identifier { system value } status } }"
)
LIST_IDS = "query($i: String) { ImagingStudyList(identifier: $i) { id } }"


def study(
    n: int, *, started: str = "2024-05-01T10:15:00Z", modality: str = "MR", **extra: Any
) -> dict[str, Any]:
    """A valid ImagingStudy (the probe's create body) for study number ``n``."""
    uid = f"{ROOT}.{n}"
    body: dict[str, Any] = {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "status": "available",
        "subject": {"reference": "Patient/p-1"},
        "started": started,
        "numberOfSeries": 1,
        "numberOfInstances": 2,
        "series": [
            {
                "uid": f"{uid}.1",
                "number": 1,
                "modality": {"system": DCM, "code": modality},
                "numberOfInstances": 2,
                "instance": [
                    {
                        "uid": f"{uid}.1.{i}",
                        "number": i,
                        "sopClass": {"system": "urn:ietf:rfc:3986", "code": MR_STORAGE},
                    }
                    for i in (1, 2)
                ],
            }
        ],
    }
    body.update(extra)
    return body


async def post(
    client: Client_, query: str, variables: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    resp = await client.post(GRAPHQL_PATH, json={"query": query, "variables": variables})
    return resp.status, await resp.json(content_type=None)


async def create(client: Client_, res: dict[str, Any]) -> dict[str, Any]:
    status, body = await post(client, CREATE, {"res": res})
    assert status == 200 and "errors" not in body, body
    result: dict[str, Any] = body["data"]["ImagingStudyCreate"]
    return result


async def list_ids(client: Client_, args: str) -> list[str] | None:
    arguments = f"({args})" if args else ""
    status, body = await post(client, f"{{ ImagingStudyList{arguments} {{ id }} }}")
    assert status == 200 and "errors" not in body, body
    found = body["data"]["ImagingStudyList"]
    return None if found is None else [item["id"] for item in found]


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, tmp_path: Path) -> Client_:
    return await aiohttp_client(create_app(tmp_path / "backend.sqlite"))


# ---------------------------------------------------------------------------------------------- CRUD


async def test_create_read_update_delete(client: Client_) -> None:
    created = await create(client, study(1))
    assert UUID_RE.fullmatch(created["id"])
    assert UUID_RE.fullmatch(created["meta"]["versionId"])
    assert INSTANT_RE.fullmatch(created["meta"]["lastUpdated"])
    assert created["status"] == "available"
    assert created["numberOfSeries"] == 1 and isinstance(created["numberOfSeries"], int)  # JSON 1, not 1.0

    status, body = await post(client, READ, {"id": created["id"]})
    assert status == 200
    read = body["data"]["ImagingStudy"]
    assert read["meta"] == created["meta"]
    assert read["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{ROOT}.1"}]

    res = study(1, numberOfInstances=3, id=created["id"])
    res["series"][0]["instance"].append(
        {"uid": f"{ROOT}.1.1.3", "number": 3, "sopClass": {"system": "urn:ietf:rfc:3986", "code": MR_STORAGE}}
    )
    status, body = await post(client, UPDATE, {"id": created["id"], "res": res})
    updated = body["data"]["ImagingStudyUpdate"]
    assert status == 200 and updated["id"] == created["id"] and updated["numberOfInstances"] == 3
    assert updated["meta"]["versionId"] != created["meta"]["versionId"]
    assert updated["meta"]["lastUpdated"] >= created["meta"]["lastUpdated"]

    # identical content still makes a new version (as Medplum does)
    _, body = await post(client, UPDATE, {"id": created["id"], "res": res})
    assert body["data"]["ImagingStudyUpdate"]["meta"]["versionId"] not in {
        created["meta"]["versionId"],
        updated["meta"]["versionId"],
    }

    delete = "mutation($id: ID!) { ImagingStudyDelete(id: $id) { id } }"
    status, body = await post(client, delete, {"id": created["id"]})
    assert (status, body) == (200, {"data": {"ImagingStudyDelete": None}})

    status, body = await post(client, READ, {"id": created["id"]})
    assert status == 200 and body["data"] == {"ImagingStudy": None}
    assert [e["message"] for e in body["errors"]] == ["Not found"]
    assert body["errors"][0]["path"] == ["ImagingStudy"]

    _, body = await post(client, delete, {"id": created["id"]})
    assert body["data"] == {"ImagingStudyDelete": None} and body["errors"][0]["message"] == "Not found"


async def test_numbers_round_trip_as_json_integers(client: Client_, tmp_path: Path) -> None:
    created = await create(client, study(2))
    query = (
        "query($id: ID!) { ImagingStudy(id: $id) "
        "{ numberOfInstances series { number instance { number } } } }"
    )
    _, body = await post(client, query, {"id": created["id"]})
    read = body["data"]["ImagingStudy"]
    numbers = [read["numberOfInstances"], read["series"][0]["number"]]
    numbers += [instance["number"] for instance in read["series"][0]["instance"]]
    assert numbers == [2, 1, 1, 2]
    assert all(type(n) is int for n in numbers)  # JSON 1, not 1.0 (a client's digest stays stable)
    with sqlite3.connect(tmp_path / "backend.sqlite") as conn:  # stored as FHIR JSON integers too
        (stored,) = conn.execute("SELECT json FROM resources WHERE id = ?", (created["id"],)).fetchone()
    assert json.loads(stored)["series"][0]["instance"][1]["number"] == 2
    assert '"number":2' in stored


async def test_update_rules_follow_medplum(client: Client_) -> None:
    created = await create(client, study(3))
    cases = [
        (study(3), "Invalid ID"),  # res without id
        (study(3, id="some-other-id"), "Invalid ID"),
        (
            {k: v for k, v in study(3, id=created["id"]).items() if k != "resourceType"},
            "Invalid resourceType",
        ),
    ]
    for res, message in cases:
        status, body = await post(client, UPDATE, {"id": created["id"], "res": res})
        assert status == 200
        assert body["data"] == {"ImagingStudyUpdate": None}
        assert [e["message"] for e in body["errors"]] == [message]

    # update of a missing id creates it under that id
    _, body = await post(
        client, UPDATE, {"id": "client-chosen-id-1", "res": study(4, id="client-chosen-id-1")}
    )
    assert body["data"]["ImagingStudyUpdate"]["id"] == "client-chosen-id-1"
    assert await list_ids(client, f'identifier: "urn:dicom:uid|urn:oid:{ROOT}.4"') == ["client-chosen-id-1"]


async def test_create_keeps_a_client_id_and_refuses_a_taken_one(client: Client_) -> None:
    created = await create(client, study(5, id="client-chosen-id-2"))
    assert created["id"] == "client-chosen-id-2"
    _, body = await post(client, CREATE, {"res": study(6, id="client-chosen-id-2")})
    assert body["data"] == {"ImagingStudyCreate": None}
    assert "already exists" in body["errors"][0]["message"]
    _, body = await post(client, CREATE, {"res": study(6, id="bad_id")})
    assert body["errors"][0]["message"] == "Invalid id format (ImagingStudy.id)"


async def test_aliased_mutations_run_independently(client: Client_) -> None:
    query = (
        "mutation($a: ImagingStudyCreate!, $b: ImagingStudyCreate!, $c: ImagingStudyCreate!) {\n"
        "  a: ImagingStudyCreate(res: $a) { id }\n  b: ImagingStudyCreate(res: $b) { id }\n"
        "  c: ImagingStudyCreate(res: $c) { id }\n}"
    )
    variables = {"a": study(7), "b": study(8, started="2024-05-01T10:15:00"), "c": study(9)}
    status, body = await post(client, query, variables)
    assert status == 200
    assert body["data"]["a"]["id"] and body["data"]["c"]["id"] and body["data"]["b"] is None
    assert body["errors"][0]["path"] == ["b"]
    assert await list_ids(client, f'identifier: "urn:dicom:uid|urn:oid:{ROOT}.8"') is None


# ------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"status": "bogus"}, "ImagingStudy.status"),
        ({"started": "2024-05-01T10:15:00"}, "ImagingStudy.started"),  # a time without a zone
        ({"started": "2024-02-30"}, "ImagingStudy.started"),
        ({"numberOfSeries": -1}, "ImagingStudy.numberOfSeries"),
    ],
)
async def test_invalid_resource_is_refused_naming_the_field(
    client: Client_, change: dict[str, Any], path: str
) -> None:
    status, body = await post(client, CREATE, {"res": study(10, **change)})
    assert status == 200
    assert body["data"] == {"ImagingStudyCreate": None}
    assert f"({path})" in body["errors"][0]["message"]
    assert body["errors"][0]["path"] == ["ImagingStudyCreate"]
    assert await list_ids(client, "") is None  # nothing stored


async def test_invalid_nested_element_names_its_path(client: Client_) -> None:
    res = study(11)
    res["series"][0]["uid"] = "1.2_3"
    _, body = await post(client, CREATE, {"res": res})
    assert "(ImagingStudy.series[0].uid)" in body["errors"][0]["message"]


async def test_wrong_resource_type_is_refused(client: Client_) -> None:
    _, body = await post(client, CREATE, {"res": study(12, resourceType="Patient")})
    assert [e["message"] for e in body["errors"]] == ["Invalid resourceType"]


async def test_variable_errors_answer_200_without_data_and_without_values(client: Client_) -> None:
    res = study(13, numberOfSeries="one")
    res["subject"] = {"display": "Doe^Jane"}
    status, body = await post(client, CREATE, {"res": res})
    assert status == 200
    assert "data" not in body
    message = body["errors"][0]["message"]
    assert "numberOfSeries" in message and "Float" in message
    assert "Jane" not in message and "one" not in message.replace("cannot", "")


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        ({"query": "mutation { ImagingStudyCreate(res: { "}, "GraphQL syntax error."),
        ({"variables": {}}, "Must provide query."),
        (
            {"query": "{ ImagingStudyList { id bogusField } }"},
            "Cannot query field 'bogusField' on type 'ImagingStudy'.",
        ),
        (
            {"query": "mutation { ImagingStudyUpsert(res: {}) { id } }"},
            "Cannot query field 'ImagingStudyUpsert'",
        ),
        (
            {"query": '{ ImagingStudyList(studyInstanceUid: "x") { id } }'},
            "Unknown argument 'studyInstanceUid'",
        ),
    ],
)
async def test_request_errors_answer_400_operation_outcome(
    client: Client_, payload: dict[str, Any], text: str
) -> None:
    resp = await client.post(GRAPHQL_PATH, json=payload)
    assert resp.status == 400
    assert resp.content_type == "application/fhir+json"
    body = await resp.json(content_type=None)
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "error" and body["issue"][0]["code"] == "invalid"
    assert body["issue"][0]["details"]["text"].startswith(text)


async def test_invalid_json_body_answers_400(client: Client_) -> None:
    resp = await client.post(GRAPHQL_PATH, data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and resp.content_type == "application/fhir+json"
    body = await resp.json(content_type=None)
    assert body["issue"][0]["details"]["text"] == "Invalid JSON body"


async def test_storage_failure_answers_503_so_clients_retry(client: Client_) -> None:
    app = client.app
    assert app is not None
    app[STORE_KEY].close()
    status, body = await post(client, CREATE, {"res": study(14)})
    assert status == 503 and body["resourceType"] == "OperationOutcome"


# ------------------------------------------------------------------------------------------ search


async def test_identifier_search_is_exact(client: Client_) -> None:
    one = (await create(client, study(20)))["id"]
    two = (await create(client, study(21)))["id"]
    assert await list_ids(client, f'identifier: "urn:dicom:uid|urn:oid:{ROOT}.20"') == [one]
    assert await list_ids(client, f'identifier: "urn:oid:{ROOT}.21"') == [two]  # any system
    assert await list_ids(client, f'identifier: "|urn:oid:{ROOT}.21"') is None  # no system: none match
    assert await list_ids(client, f'identifier: "urn:dicom:uid|urn:oid:{ROOT}.2"') is None  # no prefix match
    assert await list_ids(client, f'identifier: "other|urn:oid:{ROOT}.20"') is None
    assert sorted(await list_ids(client, 'identifier: "urn:dicom:uid|"') or []) == sorted([one, two])
    both = f'identifier: "urn:dicom:uid|urn:oid:{ROOT}.20,urn:dicom:uid|urn:oid:{ROOT}.21"'
    assert sorted(await list_ids(client, both) or []) == sorted([one, two])


async def test_no_match_is_null_not_empty_list(client: Client_) -> None:
    status, body = await post(client, LIST_IDS, {"i": "urn:dicom:uid|urn:oid:1.2.3.4.5.6.7"})
    assert (status, body) == (200, {"data": {"ImagingStudyList": None}})


async def test_count_offset_and_sort(client: Client_) -> None:
    ids = [(await create(client, study(30 + n)))["id"] for n in range(3)]
    assert await list_ids(client, '_sort: "_lastUpdated"') == ids
    assert await list_ids(client, '_sort: "-_lastUpdated"') == ids[::-1]
    assert await list_ids(client, '_count: 2, _sort: "_lastUpdated"') == ids[:2]
    assert await list_ids(client, '_count: 2, _offset: 2, _sort: "_lastUpdated"') == ids[2:]
    assert await list_ids(client, '_count: 5, _sort: "-_lastUpdated", status: "available"') == ids[::-1]
    assert await list_ids(client, "_count: 0") is None
    _, body = await post(client, '{ ImagingStudyList(_sort: "bogus") { id } }')
    assert body["data"] == {"ImagingStudyList": None} and "bogus" in body["errors"][0]["message"]


async def test_started_date_prefixes(client: Client_) -> None:
    a = (await create(client, study(40, started="2024-05-01T10:15:00Z")))["id"]
    b = (await create(client, study(41, started="2024-05-03")))["id"]
    c = (await create(client, study(42, started="2024-04-30T23:30:00-02:00")))["id"]  # 2024-05-01T01:30Z

    async def started(value: str) -> list[str]:
        return sorted(await list_ids(client, f'started: "{value}"') or [])

    assert await started("2024-05-01") == sorted([a, c])
    assert await started("eq2024-05-01") == sorted([a, c])
    assert await started("ne2024-05-01") == [b]
    assert await started("gt2024-05-01") == [b]
    assert await started("ge2024-05-03") == [b]
    assert await started("lt2024-05-01T10:00:00Z") == [c]
    assert await started("lt2024-05-01T10:15:01Z") == sorted([a, c])
    assert await started("lt2024-05-01") == []
    assert await started("le2024-05-01") == sorted([a, c])
    assert await started("2024-05") == sorted([a, b, c])
    assert await started("eq2024-05-01T10:15:00Z") == [a]
    assert await started("sa2024-05-02") == [b]
    assert await started("eb2024-05-01T02:00:00Z") == [c]
    assert await list_ids(client, '_sort: "started"') == [c, a, b]
    assert await list_ids(client, '_sort: "-started"') == [b, a, c]
    _, body = await post(client, '{ ImagingStudyList(started: "ap2024") { id } }')
    assert "ap" in body["errors"][0]["message"]


async def test_modality_status_subject_and_patient_search(client: Client_) -> None:
    mr = (await create(client, study(50, modality="MR")))["id"]
    logical = {
        "type": "Patient",
        "identifier": {"system": "urn:oid:1.2.3.99", "value": "PID-7"},
    }
    ct = (await create(client, study(51, modality="CT", subject=logical, status="registered")))["id"]
    assert await list_ids(client, 'modality: "CT"') == [ct]
    assert await list_ids(client, f'modality: "{DCM}|MR"') == [mr]
    assert await list_ids(client, 'modality: "DCM|MR"') is None  # system must match
    assert await list_ids(client, 'status: "registered"') == [ct]
    assert await list_ids(client, 'subject: "Patient/p-1"') == [mr]
    assert await list_ids(client, 'patient: "p-1"') == [mr]
    assert await list_ids(client, 'patient: "urn:oid:1.2.3.99|PID-7"') == [ct]
    assert await list_ids(client, 'subject: "urn:oid:1.2.3.99|PID-7"') == [ct]
    assert await list_ids(client, 'patient: "Patient/other"') is None
    assert await list_ids(client, f'series: "{ROOT}.51.1"') == [ct]
    assert await list_ids(client, f'instance: "{ROOT}.50.1.2"') == [mr]
    assert await list_ids(client, 'modality: "CT", status: "available"') is None  # AND


# ------------------------------------------------------------------------------ Patient / Endpoint


async def test_patient_crud_and_search(client: Client_) -> None:
    create_q = (
        "mutation($res: PatientCreate!) { PatientCreate(res: $res) "
        "{ id meta { versionId } name { family given } } }"
    )
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.3.99", "value": "PID-7"}],
        "name": [{"family": "Müller", "given": ["Jürgen", "K"]}],
        "gender": "male",
        "birthDate": "1970-01-02",
    }
    _, body = await post(client, create_q, {"res": patient})
    created = body["data"]["PatientCreate"]
    assert created["name"] == [{"family": "Müller", "given": ["Jürgen", "K"]}]

    async def find(args: str) -> list[str] | None:
        _, body = await post(client, f"{{ PatientList({args}) {{ id }} }}")
        assert "errors" not in body, body
        found = body["data"]["PatientList"]
        return None if found is None else [p["id"] for p in found]

    me = [created["id"]]
    assert await find('identifier: "urn:oid:1.2.3.99|PID-7"') == me
    assert await find('family: "mull"') == me  # starts-with, case and accent insensitive
    assert await find('given: "jurg"') == me
    assert await find('name: "MÜLLER"') == me
    assert await find('name: "ller"') is None  # not a contains search
    assert await find('gender: "male"') == me and await find('gender: "female"') is None
    assert await find('birthdate: "1970"') == me and await find('birthdate: "gt1970-01-02"') is None

    update_q = (
        "mutation($id: ID!, $res: PatientCreate!) { PatientUpdate(id: $id, res: $res) "
        "{ id meta { versionId } gender } }"
    )
    _, body = await post(
        client, update_q, {"id": created["id"], "res": {**patient, "id": created["id"], "gender": "other"}}
    )
    assert body["data"]["PatientUpdate"]["gender"] == "other"
    assert body["data"]["PatientUpdate"]["meta"]["versionId"] != created["meta"]["versionId"]

    _, body = await post(client, create_q, {"res": {**patient, "gender": "bloke"}})
    assert "(Patient.gender)" in body["errors"][0]["message"]

    _, body = await post(
        client, "mutation($id: ID!) { PatientDelete(id: $id) { id } }", {"id": created["id"]}
    )
    assert body == {"data": {"PatientDelete": None}}
    assert await find('identifier: "urn:oid:1.2.3.99|PID-7"') is None


async def test_endpoint_crud_and_search(client: Client_) -> None:
    endpoint = {
        "resourceType": "Endpoint",
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "dicom-wado-rs",
        },
        "name": "PACS WADO-RS",
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
        "address": "https://pacs.example.org/dicom-web",
    }
    create_q = (
        "mutation($res: EndpointCreate!) { EndpointCreate(res: $res) { id address connectionType { code } } }"
    )
    _, body = await post(client, create_q, {"res": endpoint})
    created = body["data"]["EndpointCreate"]
    assert created["address"] == "https://pacs.example.org/dicom-web"

    _, body = await post(
        client, "query($id: ID!) { Endpoint(id: $id) { name payloadType { text } } }", {"id": created["id"]}
    )
    assert body["data"]["Endpoint"] == {"name": "PACS WADO-RS", "payloadType": [{"text": "DICOM"}]}

    _, body = await post(
        client, '{ EndpointList(connection_type: "dicom-wado-rs", status: "active") { id } }'
    )
    assert body["data"]["EndpointList"] == [{"id": created["id"]}]
    _, body = await post(client, '{ EndpointList(name: "pacs") { id } }')
    assert body["data"]["EndpointList"] == [{"id": created["id"]}]
    _, body = await post(client, '{ EndpointList(connection_type: "hl7-fhir-rest") { id } }')
    assert body["data"]["EndpointList"] is None

    update_q = "mutation($id: ID!, $res: EndpointCreate!) { EndpointUpdate(id: $id, res: $res) { status } }"
    res = {**endpoint, "id": created["id"], "status": "off"}
    _, body = await post(client, update_q, {"id": created["id"], "res": res})
    assert body["data"]["EndpointUpdate"] == {"status": "off"}
    _, body = await post(
        client, "mutation($id: ID!) { EndpointDelete(id: $id) { id } }", {"id": created["id"]}
    )
    assert body == {"data": {"EndpointDelete": None}}


# ----------------------------------------------------------------------- persistence, auth, stats


async def test_restart_keeps_data(tmp_path: Path) -> None:
    db = tmp_path / "backend.sqlite"
    runner, port = await start_backend(db)
    url = f"http://127.0.0.1:{port}{GRAPHQL_PATH}"
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json={"query": CREATE, "variables": {"res": study(60)}}) as resp,
        ):
            created = (await resp.json())["data"]["ImagingStudyCreate"]
    finally:
        await runner.cleanup()

    runner, port = await start_backend(db)
    url = f"http://127.0.0.1:{port}{GRAPHQL_PATH}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json={"query": READ, "variables": {"id": created["id"]}}) as resp:
                read = (await resp.json())["data"]["ImagingStudy"]
            ident = {"query": LIST_IDS, "variables": {"i": f"urn:dicom:uid|urn:oid:{ROOT}.60"}}
            async with session.post(url, json=ident) as resp:
                listed = (await resp.json())["data"]["ImagingStudyList"]
    finally:
        await runner.cleanup()
    assert read["meta"] == created["meta"]
    assert listed == [{"id": created["id"]}]


async def test_token_is_required_when_configured(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    secret = uuid.uuid4().hex
    client = await aiohttp_client(create_app(tmp_path / "backend.sqlite", token=secret))
    query = {"query": "{ ImagingStudyList { id } }"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": secret}):
        resp = await client.post(GRAPHQL_PATH, json=query, headers=headers)
        assert resp.status == 401 and resp.content_type == "application/fhir+json"
        body = await resp.json(content_type=None)
        assert body["resourceType"] == "OperationOutcome"
        assert secret not in await resp.text()
    resp = await client.post(GRAPHQL_PATH, json=query, headers={"Authorization": f"Bearer {secret}"})
    assert resp.status == 200 and await resp.json() == {"data": {"ImagingStudyList": None}}
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/stats")).status == 401


async def test_stats_count_operations(client: Client_) -> None:
    await post(client, LIST_IDS, {"i": f"urn:dicom:uid|urn:oid:{ROOT}.70"})
    created = await create(client, study(70))
    resp = await client.get("/stats")
    stats = await resp.json()
    assert stats["lookups"] == 1 and stats["creates"] == 1 and stats["updates"] == 0 and stats["reads"] == 0
    assert stats["requests"] == 2
    await post(client, READ, {"id": created["id"]})
    await post(client, UPDATE, {"id": created["id"], "res": study(70, id=created["id"])})
    stats = await (await client.get("/stats")).json()
    assert (stats["reads"], stats["updates"]) == (1, 1)


async def test_healthz(client: Client_) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200


# ------------------------------------------------------------------------------------ introspection


async def test_gql_client_introspects_and_writes(client: Client_) -> None:
    url = str(client.make_url(GRAPHQL_PATH))
    gql_client = Client(transport=AIOHTTPTransport(url=url), fetch_schema_from_transport=True)
    async with gql_client as session:
        schema = gql_client.schema
        assert schema is not None
        assert schema.query_type is not None and schema.query_type.name == "QueryType"
        assert schema.mutation_type is not None and schema.mutation_type.name == "MutationType"
        update = schema.mutation_type.fields["ImagingStudyUpdate"]
        res_type = update.args["res"].type
        assert isinstance(res_type, GraphQLNonNull) and get_named_type(res_type).name == "ImagingStudyCreate"
        listing = schema.query_type.fields["ImagingStudyList"].type
        assert isinstance(listing, GraphQLList)
        imaging_study = schema.type_map["ImagingStudy"]
        assert isinstance(imaging_study, GraphQLObjectType)
        number = imaging_study.fields["numberOfSeries"]
        assert get_named_type(number.type).name == "Float"
        assert isinstance(schema.type_map["Patient"], GraphQLObjectType)

        result = await session.execute(GraphQLRequest(CREATE, variable_values={"res": study(80)}))
        assert UUID_RE.fullmatch(result["ImagingStudyCreate"]["id"])


# ------------------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("text", "low", "high"),
    [
        ("2024", "2024-01-01T00:00:00.000000", "2025-01-01T00:00:00.000000"),
        ("2024-12", "2024-12-01T00:00:00.000000", "2025-01-01T00:00:00.000000"),
        ("2024-02-28", "2024-02-28T00:00:00.000000", "2024-02-29T00:00:00.000000"),
        ("2024-05-01T10:15:00Z", "2024-05-01T10:15:00.000000", "2024-05-01T10:15:01.000000"),
        ("2024-05-01T00:30:00+01:00", "2024-04-30T23:30:00.000000", "2024-04-30T23:30:01.000000"),
        ("2024-05-01T10:15:00.25-05:30", "2024-05-01T15:45:00.250000", "2024-05-01T15:45:00.260000"),
        ("2024-05-01T10:15", "2024-05-01T10:15:00.000000", "2024-05-01T10:16:00.000000"),
    ],
)
def test_date_range(text: str, low: str, high: str) -> None:
    assert date_range(text) == (low, high)


@pytest.mark.parametrize("text", ["2024-13", "2024-02-30", "24-05-01", "2024-05-01T25:00:00Z", ""])
def test_date_range_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        date_range(text)


def test_format_instant_is_utc_with_milliseconds() -> None:
    moment = datetime(2026, 11, 27, 5, 47, 49, 793512, tzinfo=UTC)
    assert format_instant(moment) == "2026-11-27T05:47:49.793Z"


async def test_serve_sets_ready_and_stops_on_cancel(tmp_path: Path) -> None:
    ready = asyncio.Event()
    task = asyncio.create_task(serve(tmp_path / "backend.sqlite", port=0, ready=ready))
    await asyncio.wait_for(ready.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (tmp_path / "backend.sqlite").exists()
