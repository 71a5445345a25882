"""Backend error messages never carry patient data past DEBUG (``redact_backend_message``).

Each server family words its errors differently, and several quote the request: graphql-js ("got invalid
value"), Medplum (OperationOutcome ``details.text`` / ``diagnostics`` / ``expression``), HAPI ("Error was:
..."), Java/Jackson ("from String ..."), servers that print the resource JSON or echo the whole query with
its variables. For every shape the redacted text must hold none of the synthetic PHI below and still say
which element and which rule failed. Then the same through the sink, and through the relay into the state
store's ``last_error`` (what ``ingest status`` shows) and the log.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ingest.adapters.graphql.errors import PLACEHOLDER, redact_backend_message, schema_names
from ingest.adapters.graphql.sink import GraphQLSink
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app.wiring import mapping_options
from ingest.config import RelaySettings, Settings
from ingest.core.records import InstanceRecord, PersonName
from ingest.errors import MultipleMatchesError, PermanentSinkError, RetryableSinkError
from ingest.ports import StudyState
from ingest.relay.build import StudyBuilder
from ingest.relay.relay import Relay
from tests.adapters.graphql.test_sink import (
    MEDPLUM_SDL,
    STUDY_UID,
    FakeBackend,
    _schema,
    canned_json,
    canned_text,
    study,
    url_of,
)

# Synthetic patient data, as a backend would quote it back.
NAME = "Doe^John"
NAME_UPPER = "DOE^JANE"
FAMILY = "Kowalczyk"  # a family name on its own, no ^ to give it away
PATIENT_ID = "PID-448812"
PATIENT_ID_NUMERIC = "448812"
ACCESSION = "ACC20240117"
DESCRIPTION = "MRI BRAIN W/O CONTRAST"
REFERRER = "Welby^Marcus"
BIRTH_DATE = "19700412"
BIRTH_DATE_ISO = "1970-04-12"
PHI = (
    NAME, NAME_UPPER, "Doe", "John", "JANE", FAMILY, PATIENT_ID, PATIENT_ID_NUMERIC, ACCESSION,
    DESCRIPTION, "BRAIN", "CONTRAST", REFERRER, "Welby", "Marcus", BIRTH_DATE, BIRTH_DATE_ISO,
)


def assert_no_phi(text: str) -> None:
    leaked = [value for value in PHI if value in text]
    assert not leaked, f"{leaked} in {text!r}"


RESOURCE_JSON = (
    '{"resourceType":"ImagingStudy","subject":{"display":"' + NAME + '","identifier":{"value":"'
    + PATIENT_ID + '"}},"identifier":[{"value":"' + ACCESSION + '"}],"description":"' + DESCRIPTION
    + '","referrer":{"display":"' + REFERRER + '"}}'
)

SHAPES = [
    pytest.param(
        'Variable "$res" got invalid value { resourceType: "ImagingStudy", subject: { display: "'
        + NAME + '", identifier: { value: "' + PATIENT_ID + '" } }, description: "' + DESCRIPTION
        + '", referrer: { display: "' + REFERRER + '" } } at "res.subject"; Field "reference" of required '
        'type "String!" was not provided.',
        ['"res.subject"', 'Field "reference" of required type "String!" was not provided'],
        id="graphql-js-object",
    ),
    pytest.param(
        'Variable "$res" got invalid value "' + BIRTH_DATE + '" at "res.started"; DateTime cannot '
        "represent an invalid date-time-string " + BIRTH_DATE + ".",
        ['Variable "$res" got invalid value', '"res.started"', "DateTime cannot represent"],
        id="graphql-js-scalar",
    ),
    pytest.param(
        "HAPI-0450: Failed to parse request body as JSON resource. Error was: HAPI-1821: "
        '[element="family"] Invalid attribute value "' + NAME + '": Unexpected character at '
        '[Source: (String)"' + RESOURCE_JSON.replace('"', '\\"') + '"; line: 1, column: 57]',
        ["HAPI-0450: Failed to parse request body as JSON resource", 'element="family"',
         "Invalid attribute value", "line: 1, column: 57"],
        id="hapi-0450",
    ),
    pytest.param(
        "HAPI-0450: Failed to parse request body as JSON resource. Error was: Invalid value '" + NAME
        + "' for ImagingStudy.subject.display, family " + FAMILY + " (id " + PATIENT_ID_NUMERIC + ")",
        ["HAPI-0450", "Invalid value", "for ImagingStudy.subject.display"],
        id="hapi-single-quotes-and-bare-values",
    ),
    pytest.param(
        "JSON parse error: Cannot deserialize value of type `java.time.LocalDate` from String \""
        + BIRTH_DATE_ISO + '": Failed to deserialize java.time.LocalDate: (java.time.format.'
        "DateTimeParseException) Text '" + BIRTH_DATE_ISO + "' could not be parsed",
        ["Cannot deserialize value of type `java.time.LocalDate` from String", "java.time.LocalDate"],
        id="jackson",
    ),
    pytest.param(
        'Cannot deserialize value of type `java.lang.Integer` from String "' + NAME_UPPER + '": not a '
        "valid `java.lang.Integer` value",
        ["Cannot deserialize value of type `java.lang.Integer` from String", "not a valid"],
        id="jackson-name",
    ),
    pytest.param(
        "Resource is invalid: " + RESOURCE_JSON + " (ImagingStudy.subject.reference is required)",
        ["ImagingStudy.subject.reference is required"],
        id="resource-json",
    ),
    pytest.param(
        "Error in query mutation CreateImagingStudy($res: ImagingStudyCreate!) { ImagingStudyCreate(res: "
        '$res) { id meta { versionId } } } with variables {"res": ' + RESOURCE_JSON + '}: Field '
        '"ImagingStudyCreate.subject" of required type "ReferenceCreate!" was not provided.',
        ['Field "ImagingStudyCreate.subject" of required type "ReferenceCreate!" was not provided'],
        id="query-and-variables-echo",
    ),
    pytest.param(
        "Constraint img-3 not met: series description " + DESCRIPTION + " for patient " + NAME_UPPER
        + " at ImagingStudy.series[0].description",
        ["Constraint img-3 not met", "ImagingStudy.series[0].description"],
        id="constraint-with-bare-values",
    ),
    pytest.param(
        "Invalid identifier " + PATIENT_ID + " (born " + BIRTH_DATE + ", accession " + ACCESSION
        + ") at Patient.identifier[0].value",
        ["Invalid identifier", "Patient.identifier[0].value"],
        id="bare-identifiers",
    ),
    pytest.param(
        'Unterminated string "' + NAME + " at ImagingStudy.subject",
        ["Unterminated string"],
        id="unterminated-quote",
    ),
]


@pytest.mark.parametrize(("message", "kept"), SHAPES)
def test_each_server_shape_loses_the_values_and_keeps_element_and_rule(message: str, kept: list[str]) -> None:
    redacted = redact_backend_message(message)
    assert_no_phi(redacted)
    for part in kept:
        assert part in redacted
    assert PLACEHOLDER in redacted


def test_medplum_wordings_pass_unchanged() -> None:
    # what Medplum 4.5.2 answers (tests/interop/test_medplum_shapes.py): no values, so nothing to withhold
    for message in (
        "Invalid dateTime format (ImagingStudy.started)",
        "Invalid id format (ImagingStudy.series[0].uid)",
        'Unknown argument "ifMatch" on field "MutationType.ImagingStudyUpdate".',
        'Cannot query field "bogusField" on type "ImagingStudy".',
        "Constraint ext-1 not met: Must have either extensions or value[x], not both",
        "Invalid resourceType",
        "Not found",
    ):
        assert redact_backend_message(message) == message


def test_result_is_one_line_without_control_characters_and_bounded() -> None:
    forged = "Invalid value\n" + NAME + "\r\n\x1b[31mforged log line\x00" + "x" * 5000
    redacted = redact_backend_message(forged)
    assert_no_phi(redacted)
    assert all(ch.isprintable() for ch in redacted)
    assert len(redacted) <= 400
    assert redacted.startswith("Invalid value ")


def test_schema_names_keep_elements_that_are_not_in_a_path() -> None:
    names = schema_names(_schema(MEDPLUM_SDL))
    message = 'Missing required property "referrer" and "' + FAMILY + '": invalid modality ' + NAME_UPPER
    redacted = redact_backend_message(message, names=names)
    assert '"referrer"' in redacted and "modality" in redacted
    assert_no_phi(redacted)


# -- through the sink: structured parts (code, path, OperationOutcome issues) -----------------------------


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(MEDPLUM_SDL)


@pytest.fixture
async def server(aiohttp_server: Any, backend: FakeBackend) -> TestServer:
    async def route(request: web.Request) -> web.StreamResponse:
        return await backend.handle(request)  # looked up per request: a test may patch it

    app = web.Application()
    app.router.add_post("/fhir/R4/$graphql", route)
    srv: TestServer = await aiohttp_server(app, host="127.0.0.1")
    return srv


@pytest.fixture
async def sink(server: TestServer) -> Any:
    s = GraphQLSink(url_of(server), token_source=None, timeout_s=2.0)
    await s.connect()
    yield s
    await s.aclose()


GRAPHQL_ERRORS = {
    "errors": [
        {
            "message": 'Variable "$res" got invalid value "' + NAME + '" at "res.subject.display"; '
            "Expected type String, found " + REFERRER,
            "locations": [{"line": 1, "column": 10}],
            "path": ["ImagingStudyCreate", "series", 0],
            "extensions": {"code": "BAD_USER_INPUT", "exception": {"stacktrace": [RESOURCE_JSON]}},
        }
    ],
    "data": {"ImagingStudyCreate": None},
}

MEDPLUM_OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [
        {
            "severity": "error",
            "code": "invariant",
            "details": {"text": "Constraint img-3 not met: " + DESCRIPTION},
            "diagnostics": "value " + NAME_UPPER + " of " + RESOURCE_JSON,
            "expression": ["ImagingStudy.series[0].modality"],
        },
        {
            "severity": "error",
            "code": "structure",
            "details": {"text": "Invalid JSON type " + ACCESSION},
            "expression": ["ImagingStudy.identifier[0].value"],
        },
    ],
}


async def test_graphql_error_keeps_code_and_path_and_debug_keeps_the_rest(
    sink: GraphQLSink, backend: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ingest")
    backend.canned.append(canned_json(GRAPHQL_ERRORS))
    with pytest.raises(PermanentSinkError) as info:
        await sink.create(study())
    text = str(info.value)
    assert_no_phi(text)
    assert "code BAD_USER_INPUT" in text and "path ImagingStudyCreate.series[0]" in text
    assert '"res.subject.display"' in text
    assert info.value.__cause__ is None and info.value.__suppress_context__
    above_debug = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    assert_no_phi(" ".join(above_debug))
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(NAME in m and "unredacted" in m for m in debug)  # the admin can still see it, at DEBUG


async def test_operation_outcome_issues_keep_severity_code_expression_and_rule(
    sink: GraphQLSink, backend: FakeBackend
) -> None:
    backend.canned.append(canned_json(MEDPLUM_OUTCOME, 400))
    with pytest.raises(PermanentSinkError) as info:
        await sink.update("some-id", study())
    text = str(info.value)
    assert_no_phi(text)
    assert "error invariant at ImagingStudy.series[0].modality: Constraint img-3 not met" in text
    assert "error structure at ImagingStudy.identifier[0].value: Invalid JSON type" in text
    assert info.value.code == 400


async def test_retryable_outcome_and_non_graphql_answer_are_redacted(
    sink: GraphQLSink, backend: FakeBackend
) -> None:
    backend.canned.append(canned_json(MEDPLUM_OUTCOME, 503))
    with pytest.raises(RetryableSinkError) as retry:
        await sink.create(study())
    assert_no_phi(str(retry.value))
    assert "ImagingStudy.series[0].modality" in str(retry.value)
    backend.canned.append(canned_text("<pre>could not store " + RESOURCE_JSON + "</pre>", 200))
    with pytest.raises(PermanentSinkError) as html:
        await sink.create(study())
    assert "not a GraphQL response" in str(html.value)
    assert_no_phi(str(html.value))
    # gql's error quotes the body: it is not chained, so no traceback of this error shows it
    assert html.value.__cause__ is None and html.value.__suppress_context__


async def test_multiple_matches_names_only_well_formed_ids(sink: GraphQLSink, backend: FakeBackend) -> None:
    backend.put({**study(), "id": "good-id-1"})
    backend.put({**study(), "id": "forged\n" + NAME + " ERROR fake line"})
    with pytest.raises(MultipleMatchesError) as info:
        await sink.find(STUDY_UID, None)
    text = str(info.value)
    assert "good-id-1" in text and PLACEHOLDER in text
    assert_no_phi(text)
    assert "\n" not in text


# -- through the relay: last_error in the state store and the ERROR / WARNING lines ----------------------

RELAY_STUDY = "1.2.826.0.1.3680043.8.498.7311.1"
T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


def phi_record(instance: int) -> InstanceRecord:
    return InstanceRecord(
        study_uid=RELAY_STUDY,  # (0020,000D)
        series_uid=f"{RELAY_STUDY}.1",  # (0020,000E)
        sop_uid=f"{RELAY_STUDY}.1.{instance}",  # (0008,0018)
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",  # (0008,0016) MR Image Storage
        modality="MR",  # (0008,0060)
        series_number=1,  # (0020,0011)
        instance_number=instance,  # (0020,0013)
        study_date="20240501",  # (0008,0020)
        patient_id=PATIENT_ID,  # (0010,0020)
        patient_name=PersonName(alphabetic=NAME),  # (0010,0010)
        patient_birth_date=BIRTH_DATE,  # (0010,0030)
        accession_number=ACCESSION,  # (0008,0050)
        study_description=DESCRIPTION,  # (0008,1030)
        referring_physician=PersonName(alphabetic=REFERRER),  # (0008,0090)
    )


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.mark.parametrize(
    ("answer", "state"),
    [
        (canned_json({"errors": [{"message": f"Invalid resource {RESOURCE_JSON} at ImagingStudy.subject"}]}),
         StudyState.DEAD),
        (canned_json(MEDPLUM_OUTCOME, 400), StudyState.DEAD),
        (canned_json(MEDPLUM_OUTCOME, 503), StudyState.PENDING),
    ],
    ids=["errors-dead", "outcome-400-dead", "outcome-503-retry"],
)
async def test_last_error_and_log_lines_hold_no_phi(
    sink: GraphQLSink,
    backend: FakeBackend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    answer: Any,
    state: StudyState,
) -> None:
    caplog.set_level(logging.INFO)
    settings = Settings(data_dir=tmp_path, relay=RelaySettings(stable_age_s=10, max_attempts=4))
    clock = Clock()
    with SQLiteStateStore(tmp_path / "state.sqlite3", node="test") as store:
        store.add_instance(
            phi_record(1), source="test", spool_name=None, digest="d-1", now=clock(),
            due_at=clock() + timedelta(seconds=10),
        )
        clock.now += timedelta(seconds=11)
        build = StudyBuilder(mapping_options(settings))
        relay = Relay(store, sink, build, settings.relay, node="n1", clock=clock)
        # the search answers normally (nothing there yet), the create gets the canned answer
        original = backend.handle

        async def create_fails(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            if "ImagingStudyCreate" in body.get("query", ""):
                await original(request)  # recorded in backend.requests, stored nowhere that matters
                canned: web.StreamResponse = await answer(request)
                return canned
            return await original(request)

        monkeypatch.setattr(backend, "handle", create_fails)
        assert await relay.run_once() == 1
        row = store.study(RELAY_STUDY)
    assert row is not None and row.state is state
    assert row.last_error is not None
    assert_no_phi(row.last_error)
    assert re.search(r"ImagingStudy\.(subject|series\[0\]\.modality)", row.last_error)
    sent = [r for r in backend.requests if "ImagingStudyCreate" in r["query"]]
    assert sent and ACCESSION in str(sent[-1]["variables"])  # PHI was in the request the backend quoted
    assert_no_phi(" ".join(r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG))
