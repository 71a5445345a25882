"""No value of the request that failed survives a backend's error message, whatever its shape.

The redaction is an allow-list of shapes: rule wording from a fixed vocabulary (capitalised only at the
start of a sentence), FHIR invariant keys, element paths, type and schema names; every other token is
``«…»``, and so is any token made of a value of the request that failed (a patient called "Patient Can
Field", an id ``ext-12``). Property-based: names, identifiers, birth dates and accession numbers drawn by
hypothesis, put into a request, quoted back in many message shapes. Then end to end: a backend that
quotes the request it received, a relay, the state store's ``last_error``, the log above DEBUG,
``ingest status`` and the status page.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.adapters.graphql.errors import PLACEHOLDER, redact_backend_message, request_words, schema_names
from ingest.adapters.graphql.sink import GraphQLSink
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app.admin import mount_status
from ingest.app.serve import Health, admin_app
from ingest.app.status import run_status
from ingest.app.wiring import mapping_options
from ingest.config import RelaySettings, Settings
from ingest.core.records import InstanceRecord, PersonName
from ingest.metrics import Metrics
from ingest.ports import StudyState
from ingest.relay.build import StudyBuilder
from ingest.relay.relay import BackendHealth, Relay
from tests.adapters.graphql.test_errors import T0, Clock, backend, server, sink  # noqa: F401 (fixtures)
from tests.adapters.graphql.test_sink import MEDPLUM_SDL, FakeBackend, _schema, canned_json

NAMES = schema_names(_schema(MEDPLUM_SDL))

# -- the shapes that leaked -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "leaked", "kept"),
    [
        ("Invalid reference for patient «…» with id mrn-42", ["mrn-42", "mrn", "42"], "Invalid reference"),
        ("Reference display «…» id mrn-42", ["mrn-42"], "Reference display"),
        (
            "Invalid value: Patient Can Field identifier ext-12 at ImagingStudy.subject",
            ["Can", "Field", "ext-12"],
            "Invalid value: Patient «…» identifier «…» at ImagingStudy.subject",
        ),
    ],
)
def test_identifiers_and_capitalised_names_are_withheld_without_knowing_the_request(
    message: str, leaked: list[str], kept: str
) -> None:
    redacted = redact_backend_message(message, names=NAMES)
    words = set(re.findall(r"[\w-]+", redacted))
    assert not words & set(leaked), redacted
    assert kept in redacted


def test_words_of_the_request_are_withheld_even_when_they_are_rule_words() -> None:
    request = {
        "resourceType": "ImagingStudy",
        "subject": {"reference": "Patient/mrn-42", "display": "Patient Can Field"},
        "identifier": [{"system": "urn:x", "value": "ele-1"}],
    }
    redacted = redact_backend_message(
        "Invalid value: Patient Can Field identifier ele-1 (Constraint ele-1) at ImagingStudy.subject",
        names=NAMES, withhold=request_words(request),
    )
    assert redacted == "Invalid value: «…» identifier «…» (Constraint «…») at ImagingStudy.subject"


def test_words_of_structure_stay_usable() -> None:
    # a resource type, a status, a coding (system, code, display) are not patient data
    request = {
        "resourceType": "ImagingStudy", "status": "available",
        "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "MR",
                      "display": "Magnetic Resonance"}],
        "series": [{"uid": "1.2.3.4", "instance": [{"uid": "1.2.3.4.5", "number": 1}]}],
        "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml"><table><tr>'
                 "<th>started</th><td>2024-05-01</td></tr><tr><th>accession</th><td>Hill&amp;42</td>"
                 "</tr></table></div>"},
    }
    message = (
        "Invalid id format (ImagingStudy.series[0].instance[0].uid); Constraint ext-1 not met: status; "
        "Invalid dateTime format (ImagingStudy.started)"
    )
    words = request_words(request)
    assert redact_backend_message(message, names=NAMES, withhold=words) == message
    # the narrative's cells are data all the same
    assert redact_backend_message("Invalid value hill", withhold=words) == "Invalid value «…»"


# -- property: values drawn by hypothesis, quoted back in many shapes --------------------------------------

TRICKY_WORDS = [
    "Patient", "Can", "Field", "Invalid", "Reference", "Value", "Error", "Null", "String", "Date", "Code",
    "Identifier", "Missing", "Required", "Constraint", "Failed", "Not", "Found", "Type", "Series", "Given",
    "Family", "Display", "Instance", "Status", "Element", "Storage", "Full", "Line", "Column", "Id", "Van",
    "De", "Le", "May", "June", "Will", "Bell", "Young", "Long", "Hill", "Price",
]
letters = st.characters(categories=["Lu", "Ll", "Lo"], max_codepoint=0x9FFF)  # Latin, Greek, Cyrillic, CJK
word = st.one_of(
    st.sampled_from(TRICKY_WORDS),
    st.sampled_from(TRICKY_WORDS).map(str.lower),
    st.text(letters, min_size=2, max_size=10),
)
identifier = st.one_of(
    st.from_regex(r"[a-z]{2,4}-[0-9]{1,3}", fullmatch=True),  # mrn-42, ext-12, ele-1
    st.from_regex(r"[A-Z]{1,3}[0-9]{3,8}", fullmatch=True),  # PID448812
    st.from_regex(r"[0-9]{3,10}", fullmatch=True),
    st.from_regex(r"HAPI-[0-9]{4}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9.-]{2,15}", fullmatch=True),
)
birth = st.dates(min_value=date(1900, 1, 1), max_value=date(2024, 12, 31))


def _request(family: str, given_: str, pid: str, born: date, accession: str) -> dict[str, Any]:
    """The variables of an ImagingStudy create carrying the patient's data, as the sink sends them."""
    return {
        "res": {
            "resourceType": "ImagingStudy",
            "status": "available",
            "identifier": [
                {"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.8.498.1"},
                {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                      "code": "ACSN", "display": "Accession ID"}]}, "value": accession},
            ],
            "subject": {"reference": f"Patient/{pid}", "identifier": {"value": pid},
                        "display": f"{given_} {family}"},
            "contained": [{"resourceType": "Patient", "id": "p",
                           "name": [{"family": family, "given": [given_]}],
                           "birthDate": born.isoformat(), "identifier": [{"value": pid}]}],
            "started": "2024-05-01",
        }
    }


def _renderings(family: str, given_: str, pid: str, born: date, accession: str) -> list[str]:
    """Each value as a backend may print it."""
    names = [family, given_, f"{given_} {family}", f"{family}^{given_}", f"{family}, {given_}",
             f"{family.upper()}^{given_.upper()}", f"{given_.lower()} {family.lower()}"]
    dates = [born.isoformat(), born.strftime("%Y%m%d"), f"{born.isoformat()}T00:00:00Z"]
    return [*names, pid, pid.upper(), accession, *dates]


WRAPS = ["{}", '"{}"', "'{}'", "`{}`", "“{}”", "({})", "[{}]", '{{"value": "{}"}}', "{}:", "={}",
         '{{ display: "{}" }}', "«{}»", "<{}>"]
LEADS = [
    "Invalid reference for patient", "Reference display", "Invalid value:", "Invalid value", "Patient",
    "Missing required property", "Constraint failed:", "Constraint ext-1 not met:", "Field", "identifier",
    "id", "with id", "for", "Error was:", "Invalid dateTime format (ImagingStudy.started):",
    'Variable "$res" got invalid value', "at ImagingStudy.subject.display;", "birthDate", "born", "accession",
    "HAPI-0450:", "", "Cannot deserialize value of type `java.time.LocalDate` from String",
]
JOINS = [" ", ": ", "; ", ", ", " (", ") ", "\n", " - ", "", "|"]


def _value_words(values: list[str]) -> set[str]:
    """The words of the values (the test's own split: runs of letters and digits); numbers of one or two
    digits alone are not a value (an index, a line number)."""
    out: set[str] = set()
    for v in values:
        for w in re.findall(r"[^\W_]+", v.casefold()):
            if not (w.isdigit() and len(w) < 3):
                out.add(w)
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    family=word, given_=word, pid=identifier, born=birth, accession=identifier,
    parts=st.lists(
        st.tuples(st.sampled_from(LEADS), st.sampled_from(WRAPS), st.integers(0, 12), st.sampled_from(JOINS),
                  st.sampled_from([str, str.upper, str.lower, str.title])),
        min_size=1, max_size=5,
    ),
)
def test_no_value_of_the_request_survives_any_message_shape(
    family: str, given_: str, pid: str, born: date, accession: str,
    parts: list[tuple[str, str, int, str, Any]],
) -> None:
    values = _renderings(family, given_, pid, born, accession)
    message = ""
    for lead, wrap, which, join, case in parts:
        message += f"{lead} {wrap.format(case(values[which]))}{join}"
    message += json.dumps(_request(family, given_, pid, born, accession))  # servers that echo the variables
    redacted = redact_backend_message(
        message, names=NAMES, withhold=request_words(_request(family, given_, pid, born, accession))
    )
    folded = redacted.casefold()
    leaked_words = _value_words(values) & set(re.findall(r"[^\W_]+", folded))
    assert not leaked_words, f"{leaked_words} of {message!r} in {redacted!r}"
    for v in (pid, accession, born.isoformat(), born.strftime("%Y%m%d")):
        assert v.casefold() not in folded, redacted
    assert all(ch.isprintable() for ch in redacted)


# -- end to end: a backend that quotes the request it received ---------------------------------------------

STUDY = "1.2.826.0.1.3680043.8.498.7312.1"
FAMILY, GIVEN = "Field", "Patient Can"  # DICOM PN Field^Patient Can: the display is "Patient Can Field"
PATIENT_ID, ACCESSION, DESCRIPTION = "mrn-42", "ext-12", "Young Price"
SECRETS = ["Can", "Field", "mrn-42", "ext-12", "Young", "Price", "mrn", "ext-", "Patient Can"]


def _record() -> InstanceRecord:
    return InstanceRecord(
        study_uid=STUDY, series_uid=f"{STUDY}.1", sop_uid=f"{STUDY}.1.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4", modality="MR", series_number=1, instance_number=1,
        study_date="20240501", patient_id=PATIENT_ID, patient_name=PersonName(alphabetic=f"{FAMILY}^{GIVEN}"),
        patient_birth_date="19700412", accession_number=ACCESSION, study_description=DESCRIPTION,
    )


def _quoting(res: dict[str, Any]) -> list[str]:
    """The finding's shapes, filled from the resource the backend received."""
    subject = res["subject"]
    pid = subject["identifier"]["value"]
    accession = next(i["value"] for i in res["identifier"] if i.get("system") != "urn:dicom:uid")
    return [
        f"Invalid reference for patient {subject['display']} with id {pid}",
        f"Reference display {subject['display']} id {pid}",
        f"Invalid value: {subject['display']} identifier {accession} at ImagingStudy.identifier[1].value",
        f"Constraint failed: {res['description']} (ImagingStudy.description)",
    ]


def _assert_secret_free(text: str) -> None:
    words = set(re.findall(r"[\w-]+", text))
    leaked = [s for s in SECRETS if s in words or (" " in s and s in text)]
    assert not leaked, f"{leaked} in {text!r}"


@pytest.mark.parametrize("status", [200, 400, 503], ids=["graphql-errors", "outcome-400", "outcome-503"])
async def test_a_backend_quoting_the_request_leaks_nothing_to_log_status_or_page(
    sink: GraphQLSink,  # noqa: F811
    backend: FakeBackend,  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    aiohttp_client: Any,
    status: int,
) -> None:
    caplog.set_level(logging.DEBUG)
    db = tmp_path / "state.sqlite3"
    settings_ = Settings(data_dir=tmp_path, relay=RelaySettings(stable_age_s=10, max_attempts=4))
    clock = Clock()
    original = backend.handle
    received: list[dict[str, Any]] = []

    async def quoting_backend(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if "ImagingStudyCreate" not in body.get("query", ""):
            return await original(request)
        res = body["variables"]["res"]
        received.append(res)
        texts = _quoting(res)
        if status == 200:
            answer = {"errors": [{"message": t, "extensions": {"code": res["subject"]["identifier"]["value"]},
                                  "path": ["ImagingStudyCreate", res["subject"]["display"]]} for t in texts],
                      "data": {"ImagingStudyCreate": None}}
        else:
            answer = {"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "invalid", "details": {"text": t}, "diagnostics": t,
                 "expression": [f"ImagingStudy.subject.display {res['subject']['display']}"]} for t in texts]}
        return await canned_json(answer, status)(request)

    monkeypatch.setattr(backend, "handle", quoting_backend)
    with SQLiteStateStore(db, node="test") as store:
        store.add_instance(_record(), source="test", spool_name=None, digest="d-1", now=clock(),
                           due_at=clock() + timedelta(seconds=10))
        clock.now = T0 + timedelta(seconds=11)
        relay = Relay(store, sink, StudyBuilder(mapping_options(settings_)), settings_.relay, node="n1",
                      clock=clock)
        assert await relay.run_once() == 1
        row = store.study(STUDY)
    assert received and received[0]["subject"]["display"] == "Patient Can Field"  # the request held them
    assert received[0]["subject"]["identifier"]["value"] == PATIENT_ID
    assert row is not None and row.last_error is not None
    assert row.state is (StudyState.PENDING if status == 503 else StudyState.DEAD)
    _assert_secret_free(row.last_error)
    assert "Invalid reference" in row.last_error and "ImagingStudy.description" in row.last_error

    above_debug = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG]
    assert above_debug
    _assert_secret_free(" ".join(above_debug))
    debug = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    assert "mrn-42" in debug  # the whole message is kept, at DEBUG only

    capsys.readouterr()
    assert await run_status(settings_) == 0
    table = capsys.readouterr().out
    assert await run_status(settings_, as_json=True) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "ingest status" in table and listed["studies"][0]["study_uid"] == STUDY
    # `ingest status` shows the accession by design (a column); its error cells hold nothing of the
    # request, and nothing of the patient appears anywhere
    (study,) = listed["studies"]
    _assert_secret_free(study["last_error"])
    patient = [s for s in SECRETS if s not in (ACCESSION, "ext-")]
    words = set(re.findall(r"[\w-]+", table))
    assert not [s for s in patient if s in words or (" " in s and s in table)], table

    with SQLiteStateStore(db, node="page") as store:
        health = Health(settings_, store, BackendHealth())
        app = admin_app(Metrics(), store, health)
        mount_status(app, settings_, store, health, Metrics(), node="page")
        client = await aiohttp_client(app)
        for path in ("/", f"/study/{STUDY}"):
            resp = await client.get(path)
            assert resp.status == 200
            page = await resp.text()  # it shows accession and description by design: its error cells here
            if path == "/":  # the list shows the state (its last error shortened) in one cell
                shown = re.findall(r'<td class="[a-z]+ state">([^<]*)</td>', page)
                assert shown and all("create ImagingStudy for" in text for text in shown), page
            else:  # the study page shows it whole
                shown = re.findall(rf"create ImagingStudy for study {re.escape(STUDY)}:[^<]*", page)
                assert shown and all("Invalid reference" in text for text in shown), page
            _assert_secret_free(" ".join(shown))
    assert PLACEHOLDER in row.last_error


def test_a_capitalised_quoted_word_after_a_naming_word_is_a_value_unless_a_type() -> None:
    message = 'Unknown field "Kowalczyk"; Field "subject" of required type "String!"; type "Reference"'
    assert redact_backend_message(message) == (
        'Unknown field «…»; Field "subject" of required type "String!"; type "Reference"'
    )
