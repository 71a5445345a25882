"""Tests for ingest.relay.links: Patient subject resolution and the DICOMweb Endpoint.

Pure parts (names, the Patient and Endpoint resources) run without I/O; the modes
run end to end through the relay against the embedded backend on 127.0.0.1 (port chosen by the OS).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pydicom.data import get_charset_files

from ingest.adapters.graphql.sink import GraphQLSink
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app.wiring import mapping_options
from ingest.backend.server import start_backend
from ingest.backend.store import ResourceStore, SearchRequest
from ingest.config import EndpointSettings, PatientSettings, RelaySettings, Settings
from ingest.core.linked import search_token
from ingest.core.records import InstanceRecord, PersonName
from ingest.core.terminology import URI_SYSTEM
from ingest.errors import ConfigError, PermanentSinkError, RetryableSinkError
from ingest.metrics import Metrics
from ingest.relay.build import StudyBuilder
from ingest.relay.links import EndpointResolver, PatientResolver, prepare_links
from ingest.relay.relay import Relay
from tests.core.test_linked import IDE, SYL, SYSTEM, WADO, charset_record, record
from tests.faultproxy import ingest_env, run_ingest

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


# --------------------------------------------------------------------------------------------------
# Resolver units with a fake backend (errors, cache, locks)
# --------------------------------------------------------------------------------------------------


class FakeBackend:
    """In-memory LinkedBackend: search yields to the loop first, like a real round trip."""

    def __init__(self, *, supports: bool = True) -> None:
        self.resources: dict[str, list[dict[str, Any]]] = {"Patient": [], "Endpoint": []}
        self.searches = 0
        self.search_error: Exception | None = None
        self.create_error: Exception | None = None
        self._supports = supports

    def supports(self, resource_type: str) -> bool:
        return self._supports

    async def search_resources(
        self, resource_type: str, *, identifier: str, count: int = 2
    ) -> list[dict[str, Any]]:
        self.searches += 1
        await asyncio.sleep(0.01)
        if self.search_error is not None:
            raise self.search_error
        system, value = identifier.split("|", 1)
        found = [
            r
            for r in self.resources[resource_type]
            if any(i.get("system") == system and i.get("value") == value for i in r.get("identifier", []))
        ]
        return found[:count]

    async def create_resource(self, resource_type: str, resource: Mapping[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        if self.create_error is not None:
            raise self.create_error
        created = {**resource, "id": f"{resource_type.lower()}-{len(self.resources[resource_type]) + 1}"}
        self.resources[resource_type].append(created)
        return created


def logical_study(value: str = "PID-1", display: str | None = "Tarou Yamada") -> dict[str, Any]:
    subject: dict[str, Any] = {"type": "Patient", "identifier": {"system": SYSTEM, "value": value}}
    if display:
        subject["display"] = display
    return {"resourceType": "ImagingStudy", "status": "available", "subject": subject}


def fallbacks(metrics: Metrics, cause: str) -> float:
    value = metrics.registry.get_sample_value("ingest_patient_fallbacks_total", {"cause": cause})
    return value or 0.0


async def test_lookup_fallback_is_cached_until_it_expires() -> None:
    backend, metrics, clock = FakeBackend(), Metrics(), [100.0]
    resolver = PatientResolver(backend, "lookup", metrics=metrics, negative_ttl_s=30, clock=lambda: clock[0])
    recs = [record("1.2.3", "1.2.3.1")]
    assert await resolver(logical_study(), recs) == logical_study()
    assert await resolver(logical_study(), recs) == logical_study()
    assert backend.searches == 1 and fallbacks(metrics, "not_found") == 2
    backend.resources["Patient"].append(
        {"resourceType": "Patient", "id": "p9", "identifier": [{"system": SYSTEM, "value": "PID-1"}]}
    )
    clock[0] += 31
    resolved = await resolver(logical_study(), recs)
    assert resolved["subject"]["reference"] == "Patient/p9" and backend.searches == 2


async def test_several_matches_fall_back_to_logical() -> None:
    backend, metrics = FakeBackend(), Metrics()
    for pid in ("a", "b"):
        backend.resources["Patient"].append({"id": pid, "identifier": [{"system": SYSTEM, "value": "PID-1"}]})
    resolver = PatientResolver(backend, "create", metrics=metrics)
    assert await resolver(logical_study(), [record("1.2.3", "1.2.3.1")]) == logical_study()
    assert fallbacks(metrics, "multiple") == 1 and len(backend.resources["Patient"]) == 2


async def test_match_without_the_identifier_is_not_trusted() -> None:
    """A backend that ignores the search argument must not link the study to somebody else."""

    class Ignoring(FakeBackend):
        async def search_resources(
            self, resource_type: str, *, identifier: str, count: int = 2
        ) -> list[dict[str, Any]]:
            return [{"id": "stranger", "identifier": [{"system": SYSTEM, "value": "SOMEONE-ELSE"}]}]

    metrics = Metrics()
    resolver = PatientResolver(Ignoring(), "lookup", metrics=metrics)
    assert await resolver(logical_study(), [record("1.2.3", "1.2.3.1")]) == logical_study()
    assert fallbacks(metrics, "not_found") == 1


async def test_subject_without_identifier_falls_back() -> None:
    metrics = Metrics()
    study = {"resourceType": "ImagingStudy", "subject": {"type": "Patient", "display": "X"}}
    resolver = PatientResolver(FakeBackend(), "create", metrics=metrics)
    assert await resolver(study, [record("1.2.3", "1.2.3.1", None)]) == study
    assert fallbacks(metrics, "no_identifier") == 1


async def test_retryable_search_error_propagates_and_permanent_falls_back() -> None:
    backend, metrics = FakeBackend(), Metrics()
    resolver = PatientResolver(backend, "create", metrics=metrics)
    backend.search_error = RetryableSinkError("search Patient by identifier: connection refused")
    with pytest.raises(RetryableSinkError):
        await resolver(logical_study(), [record("1.2.3", "1.2.3.1")])
    backend.search_error = PermanentSinkError("search Patient by identifier: rejected")
    assert await resolver(logical_study(), [record("1.2.3", "1.2.3.1")]) == logical_study()
    assert fallbacks(metrics, "search_failed") == 1


async def test_refused_create_falls_back_and_is_tried_again() -> None:
    backend, metrics = FakeBackend(), Metrics()
    resolver = PatientResolver(backend, "create", metrics=metrics)
    backend.create_error = PermanentSinkError("create Patient: invalid")
    assert await resolver(logical_study(), [record("1.2.3", "1.2.3.1")]) == logical_study()
    assert fallbacks(metrics, "create_failed") == 1
    backend.create_error = None
    resolved = await resolver(logical_study(), [record("1.2.3", "1.2.3.1")])
    assert resolved["subject"] == {
        "reference": "Patient/patient-1",
        "type": "Patient",
        "identifier": {"system": SYSTEM, "value": "PID-1"},
        "display": "Tarou Yamada",
    }


async def test_concurrent_studies_of_one_new_patient_create_one_patient_fake() -> None:
    backend = FakeBackend()
    resolver = PatientResolver(backend, "create")
    results = await asyncio.gather(
        *(resolver(logical_study(), [record(f"1.2.{n}", f"1.2.{n}.1")]) for n in range(5))
    )
    assert len(backend.resources["Patient"]) == 1
    assert {r["subject"]["reference"] for r in results} == {"Patient/patient-1"}
    assert resolver._locks == {}  # locks are released with their last user


async def test_missing_backend_support_refuses_to_start() -> None:
    settings = Settings(patient=PatientSettings(mode="lookup", default_system=SYSTEM))
    with pytest.raises(ConfigError, match="PatientList"):
        await prepare_links(settings.patient, settings.endpoint, FakeBackend(supports=False))
    with pytest.raises(ConfigError, match="EndpointList"):
        await EndpointResolver(FakeBackend(supports=False), WADO).reference()
    links = await prepare_links(
        Settings().patient, Settings().endpoint, FakeBackend(supports=False)
    )  # logical, no endpoint: nothing needed
    assert links.link is None and links.endpoint_reference is None


@pytest.mark.parametrize(("name", "mado"), [("base", False), ("smart-imaging", False), ("mado", True)])
async def test_the_endpoint_carries_the_mado_extension_under_the_mado_profile_only(
    name: str, mado: bool
) -> None:
    from ingest.config import ProfileSettings

    backend = FakeBackend()
    endpoint = EndpointSettings(wado_rs_url=WADO, series_wado_rs_urls={"PACS2": WADO + "/2"})
    await prepare_links(Settings().patient, endpoint, backend, profile=ProfileSettings(name=name))
    created = backend.resources["Endpoint"]
    assert [e["address"] for e in created] == [WADO, WADO + "/2"]
    for resource in created:
        urls = [e["url"] for e in resource["extension"]]
        assert ("MadoRetrieveLocationUIDExtension" in str(urls)) is mado, (name, urls)


# --------------------------------------------------------------------------------------------------
# End to end: relay -> embedded backend
# --------------------------------------------------------------------------------------------------


# One embedded backend and one sink for the end-to-end tests of this module (start-up and the first use
# of each document cost seconds on a busy machine); every test uses its own patients and studies.
e2e = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sink(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GraphQLSink]:
    runner, port = await start_backend(tmp_path_factory.mktemp("backend") / "backend.sqlite3", port=0)
    try:
        async with GraphQLSink(
            f"http://127.0.0.1:{port}/fhir/R4/$graphql", token_source=None, timeout_s=10
        ) as s:
            yield s
    finally:
        await runner.cleanup()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStateStore]:
    opened = SQLiteStateStore(tmp_path / "state.sqlite3", node="test")
    yield opened
    opened.close()


def settings_for(mode: str, wado: str | None = None) -> Settings:
    return Settings(
        patient=PatientSettings(mode=mode, default_system=SYSTEM),  # type: ignore[arg-type]
        endpoint=EndpointSettings(wado_rs_url=wado),
        relay=RelaySettings(stable_age_s=0, concurrency=4),
    )


async def push(
    store: SQLiteStateStore,
    sink: Any,
    settings: Settings,
    records: Sequence[InstanceRecord],
    *,
    metrics: Metrics | None = None,
    links: Any = None,
) -> dict[str, int]:
    """Add ``records`` and run the relay once, wired exactly as ``ingest serve`` wires it."""
    for rec in records:
        digest = hashlib.sha256(rec.model_dump_json().encode()).hexdigest()
        store.add_instance(rec, source="test", spool_name=None, digest=digest, now=NOW, due_at=NOW)
    links = links or await prepare_links(settings.patient, settings.endpoint, sink, metrics=metrics)
    options = mapping_options(settings, endpoint_reference=links.endpoint_reference)
    relay = Relay(
        store, sink, StudyBuilder(options), settings.relay, clock=lambda: NOW, metrics=metrics,
        link=links.link,
    )
    await relay.run_once()
    return dict(relay.totals.results)


async def patients(sink: GraphQLSink, value: str) -> list[dict[str, Any]]:
    return await sink.search_resources("Patient", identifier=search_token(SYSTEM, value), count=10)


async def subject_of(sink: GraphQLSink, study_uid: str) -> dict[str, Any]:
    found = await sink.find(study_uid, None)
    assert found is not None
    subject: dict[str, Any] = found.resource["subject"]
    return subject


@e2e
async def test_logical_mode_writes_a_logical_subject(sink: GraphQLSink, store: SQLiteStateStore) -> None:
    rec = charset_record("chrH31.dcm")
    assert await push(store, sink, settings_for("logical"), [rec]) == {"created": 1}
    assert await subject_of(sink, rec.study_uid) == {
        "type": "Patient",
        "identifier": {"system": SYSTEM, "value": "H31EXAMPLE"},
        "display": "Tarou Yamada",
    }
    assert await patients(sink, "H31EXAMPLE") == []


@e2e
async def test_lookup_mode_against_embedded_backend(sink: GraphQLSink, store: SQLiteStateStore) -> None:
    metrics = Metrics()
    first = record("1.2.40.1", "1.2.40.1.1", "LOOK-1", patient_name=PersonName(alphabetic="Doe^Jane"))
    await push(store, sink, settings_for("lookup"), [first], metrics=metrics)
    assert "reference" not in await subject_of(sink, "1.2.40.1")
    assert fallbacks(metrics, "not_found") == 1
    assert await patients(sink, "LOOK-1") == []  # lookup never creates

    existing = await sink.create_resource(
        "Patient", {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": "LOOK-1"}]}
    )
    second = record("1.2.40.2", "1.2.40.2.1", "LOOK-1", patient_name=PersonName(alphabetic="Doe^Jane"))
    await push(store, sink, settings_for("lookup"), [second])
    assert await subject_of(sink, "1.2.40.2") == {
        "reference": f"Patient/{existing['id']}",
        "type": "Patient",
        "identifier": {"system": SYSTEM, "value": "LOOK-1"},
        "display": "Jane Doe",
    }


@e2e
async def test_create_mode_creates_patient_with_korean_names(
    sink: GraphQLSink, store: SQLiteStateStore
) -> None:
    rec = charset_record("chrI2.dcm")
    assert await push(store, sink, settings_for("create"), [rec]) == {"created": 1}
    [patient] = await patients(sink, "I2EXAMPLE")
    assert patient["name"] == [
        {"text": "Gildong Hong", "family": "Hong", "given": ["Gildong"]},
        {"extension": [IDE], "text": "洪 吉洞", "family": "洪", "given": ["吉洞"]},
        {"extension": [SYL], "text": "홍 길동", "family": "홍", "given": ["길동"]},
    ]
    assert (await subject_of(sink, rec.study_uid))["reference"] == f"Patient/{patient['id']}"


@e2e
async def test_create_mode_never_updates_an_existing_patient(
    sink: GraphQLSink, store: SQLiteStateStore
) -> None:
    existing = await sink.create_resource(
        "Patient",
        {
            "resourceType": "Patient",
            "identifier": [{"system": SYSTEM, "value": "2008-4"}],
            "name": [{"family": "Registered", "given": ["Name"]}],
            "gender": "unknown",
        },
    )
    rec = charset_record("chrJapMulti.dcm")  # PatientID 2008-4, sex M, another name
    await push(store, sink, settings_for("create"), [rec])
    [patient] = await patients(sink, "2008-4")
    assert patient["id"] == existing["id"]
    assert patient["meta"]["versionId"] == existing["meta"]["versionId"]
    assert patient["name"] == [{"family": "Registered", "given": ["Name"]}] and patient["gender"] == "unknown"
    assert (await subject_of(sink, rec.study_uid))["reference"] == f"Patient/{existing['id']}"


@e2e
async def test_two_studies_of_one_new_patient_pushed_concurrently_create_one_patient(
    sink: GraphQLSink, store: SQLiteStateStore
) -> None:
    records = [
        record(f"1.2.50.{n}", f"1.2.50.{n}.1", "NEW-1", patient_sex="F", patient_birth_date="19700101")
        for n in (1, 2, 3)
    ]
    assert await push(store, sink, settings_for("create"), records) == {"created": 3}  # one relay pass
    [patient] = await patients(sink, "NEW-1")
    assert patient["gender"] == "female" and patient["birthDate"] == "1970-01-01"
    for n in (1, 2, 3):
        assert (await subject_of(sink, f"1.2.50.{n}"))["reference"] == f"Patient/{patient['id']}"


@e2e
async def test_existing_literal_subject_survives_a_later_logical_push(
    sink: GraphQLSink, store: SQLiteStateStore
) -> None:
    first = record("1.2.60.1", "1.2.60.1.1", "LIT-1")
    await push(store, sink, settings_for("create"), [first])
    literal = (await subject_of(sink, "1.2.60.1"))["reference"]
    assert literal.startswith("Patient/")

    # a later instance of the same study pushed by a node in logical mode: the study is updated ...
    later = record("1.2.60.1", "1.2.60.1.2", "LIT-1")
    assert await push(store, sink, settings_for("logical"), [later]) == {"updated": 1}
    found = await sink.find("1.2.60.1", None)
    assert found is not None and found.resource["numberOfInstances"] == 2
    # ... and its literal subject is kept
    assert found.resource["subject"]["reference"] == literal


@e2e
async def test_endpoint_found_or_created_once_and_referenced(
    sink: GraphQLSink, store: SQLiteStateStore
) -> None:
    settings = settings_for("logical", wado=WADO)
    links = await prepare_links(settings.patient, settings.endpoint, sink)
    assert links.endpoint_reference is not None and links.endpoint_reference.startswith("Endpoint/")
    # a restart: found by identifier, not created again
    again = await prepare_links(settings.patient, settings.endpoint, sink)
    assert again.endpoint_reference == links.endpoint_reference
    found = await sink.search_resources("Endpoint", identifier=search_token(URI_SYSTEM, WADO), count=10)
    assert len(found) == 1
    [endpoint] = found
    assert endpoint["address"] == WADO and endpoint["status"] == "active"
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert endpoint["payloadMimeType"] == ["application/dicom"]

    await push(store, sink, settings, [record("1.2.70.1", "1.2.70.1.1")], links=links)
    study = await sink.find("1.2.70.1", None)
    assert study is not None and study.resource["endpoint"] == [{"reference": links.endpoint_reference}]

    elsewhere = settings_for("logical", wado=WADO + "2")
    other = await prepare_links(
        elsewhere.patient, elsewhere.endpoint, sink
    )  # another URL, another Endpoint
    assert other.endpoint_reference != links.endpoint_reference


# --------------------------------------------------------------------------------------------------
# The CLI: wiring and refusal at start
# --------------------------------------------------------------------------------------------------


async def test_replay_cli_refuses_invalid_endpoint_url_at_start(tmp_path: Path) -> None:
    env = ingest_env(None)
    env["INGEST_ENDPOINT__WADO_RS_URL"] = f"{WADO}/studies"
    run = await run_ingest(tmp_path / "data", "replay", str(tmp_path), env=env, cwd=tmp_path)
    assert run.returncode == 1
    assert "configuration error" in run.stderr and "endpoint.wado_rs_url" in run.stderr
    assert not (tmp_path / "data" / "backend.sqlite3").exists()  # refused before anything started


async def test_replay_cli_wires_patient_and_endpoint(tmp_path: Path) -> None:
    path = get_charset_files("chrI2.dcm")[0]  # Hong^Gildong=洪^吉洞=홍^길동
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "one.dcm").write_bytes(Path(path).read_bytes())
    env = ingest_env(None)  # the embedded backend, started by the replay in data/backend.sqlite3
    env.update(
        {
            "INGEST_PATIENT__MODE": "create",
            "INGEST_PATIENT__DEFAULT_SYSTEM": SYSTEM,
            "INGEST_ENDPOINT__WADO_RS_URL": WADO,
        }
    )
    data = tmp_path / "data"
    run = await run_ingest(data, "replay", str(folder), "--jobs", "1", "--json", env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.json()["studies"]["created"] == 1

    db = ResourceStore(data / "backend.sqlite3")
    try:
        [patient] = db.search("Patient", SearchRequest({"identifier": search_token(SYSTEM, "I2EXAMPLE")}))
        [endpoint] = db.search("Endpoint", SearchRequest({"identifier": search_token(URI_SYSTEM, WADO)}))
        [imaging] = db.search("ImagingStudy", SearchRequest({"patient": f"Patient/{patient['id']}"}))
    finally:
        db.close()
    assert [n.get("text") for n in patient["name"]] == ["Gildong Hong", "洪 吉洞", "홍 길동"]
    assert imaging["endpoint"] == [{"reference": f"Endpoint/{endpoint['id']}"}]
    assert imaging["subject"]["display"] == "Gildong Hong"


# --------------------------------------------------------------------------------------------------
# Profiles: series-level endpoints by calling AE, the profile's rules (docs/mapping.md "Imaging profiles")
# --------------------------------------------------------------------------------------------------


def test_check_profile_refuses_settings_no_study_can_meet() -> None:
    from ingest.config import ProfileSettings
    from ingest.relay.links import check_profile

    with_url = EndpointSettings(wado_rs_url=WADO)
    for name in ("smart-imaging", "mado"):
        with pytest.raises(ConfigError, match="needs \\[endpoint\\] wado_rs_url"):
            check_profile(ProfileSettings(name=name), EndpointSettings(), include_instances=True)
        check_profile(ProfileSettings(name=name), with_url, include_instances=True)
    with pytest.raises(ConfigError, match="include_instances = true"):
        check_profile(ProfileSettings(name="mado"), with_url, include_instances=False)
    check_profile(ProfileSettings(name="base"), EndpointSettings(), include_instances=False)


@e2e
async def test_series_served_elsewhere_reference_their_own_endpoint(
    sink: GraphQLSink, store: SQLiteStateStore
) -> None:
    """[endpoint] series_wado_rs_urls = {"PACS2" = WADO2}: the series PACS2 sent reference the Endpoint
    of WADO2; with the mado profile every other series references the study's Endpoint."""
    from ingest.app.wiring import wire_links
    from ingest.config import ProfileSettings

    wado2 = "https://pacs2.example.org/rs"
    settings = Settings(
        endpoint=EndpointSettings(wado_rs_url=WADO, series_wado_rs_urls={"PACS2": wado2}),
        profile=ProfileSettings(name="mado"),
        relay=RelaySettings(stable_age_s=0),
    )
    study = "1.2.70.9"

    def instance(series: str, sop: str) -> InstanceRecord:
        return InstanceRecord(
            study_uid=study, series_uid=f"{study}.{series}", sop_uid=f"{study}.{series}.{sop}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", modality="CT", patient_id="PID-9",
        )

    sent = [
        (instance("1", "1"), "dimse:PACS2"),
        (instance("1", "2"), "dimse:PACS2"),
        (instance("2", "1"), "dimse:CT01"),
    ]
    for rec, source in sent:
        digest = hashlib.sha256(rec.model_dump_json().encode()).hexdigest()
        store.add_instance(rec, source=source, spool_name=None, digest=digest, now=NOW, due_at=NOW)
    build, link = await wire_links(settings, sink, store=store)
    relay = Relay(store, sink, build, settings.relay, clock=lambda: NOW, link=link)
    await relay.run_once()
    assert dict(relay.totals.results) == {"created": 1}

    [main] = await sink.search_resources("Endpoint", identifier=search_token(URI_SYSTEM, WADO), count=10)
    [second] = await sink.search_resources("Endpoint", identifier=search_token(URI_SYSTEM, wado2), count=10)
    assert second["address"] == wado2 and second["connectionType"]["code"] == "dicom-wado-rs"
    found = await sink.find(study, None)
    assert found is not None
    resource = found.resource
    assert resource["endpoint"] == [{"reference": f"Endpoint/{main['id']}"}]
    endpoints = {s["uid"]: s["endpoint"] for s in resource["series"]}
    assert endpoints == {
        f"{study}.1": [{"reference": f"Endpoint/{second['id']}"}],
        f"{study}.2": [{"reference": f"Endpoint/{main['id']}"}],  # MADO: series.endpoint 1..*
    }
    assert resource["identifier"][0]["type"]["coding"][0]["code"] == "110180"


@e2e
async def test_write_linked_writes_creator_and_a_provenance_per_write(
    sink: GraphQLSink, store: SQLiteStateStore
) -> None:
    """[profile] write_linked: the Device (MADO Creator) and Organization are found or created once, and
    every ImagingStudy create / update is followed by a Provenance naming that version of it."""
    from ingest.app.wiring import wire_links, with_provenance
    from ingest.config import ProfileSettings
    from ingest.core.linked import device_identifier, organization_identifier

    settings = Settings(
        profile=ProfileSettings(write_linked=True, organization="Synthetic Imaging", manufacturer="ACME",
                                device_name="ingest-linked-test"),
        relay=RelaySettings(stable_age_s=0),
    )
    study = "1.2.70.11"

    async def push_one(sop: str) -> dict[str, int]:
        rec = record(study, f"{study}.1.{sop}")
        digest = hashlib.sha256(rec.model_dump_json().encode()).hexdigest()
        store.add_instance(rec, source="test", spool_name=None, digest=digest, now=NOW, due_at=NOW)
        build, link = await wire_links(settings, sink, store=store)
        relay = Relay(store, with_provenance(settings, sink, clock=lambda: NOW), build, settings.relay,
                      clock=lambda: NOW, link=link)
        await relay.run_once()
        return dict(relay.totals.results)

    assert await push_one("1") == {"created": 1}
    assert await push_one("2") == {"updated": 1}  # a new process each time: the Device is found again

    device_id = device_identifier("ingest-linked-test")
    [device] = await sink.search_resources(
        "Device", identifier=search_token(URI_SYSTEM, str(device_id.value)), count=10
    )
    org_id = organization_identifier("Synthetic Imaging")
    [org] = await sink.search_resources(
        "Organization", identifier=search_token(URI_SYSTEM, str(org_id.value)), count=10
    )
    assert device["type"]["coding"][0]["code"] == "mado-creator"
    assert device["manufacturer"] == "ACME"
    assert device["owner"]["reference"] == f"Organization/{org['id']}"
    found = await sink.find(study, None)
    assert found is not None
    provenances = await sink.search_resources("Provenance", identifier=f"ImagingStudy/{found.id}", count=10)
    assert len(provenances) == 2  # one per write
    targets = sorted(p["target"][0]["reference"] for p in provenances)
    assert all(t.startswith(f"ImagingStudy/{found.id}/_history/") for t in targets)
    assert f"ImagingStudy/{found.id}/_history/{found.version_id}" in targets  # the latest write's version
    for p in provenances:
        [agent] = p["agent"]
        assert agent["type"]["coding"][0]["code"] == "assembler"
        assert agent["who"]["reference"] == f"Device/{device['id']}"
        assert agent["onBehalfOf"]["reference"] == f"Organization/{org['id']}"
        assert p["recorded"].startswith("2024-05-01T12:00:00")


async def test_refused_provenance_keeps_the_imaging_study_write(caplog: pytest.LogCaptureFixture) -> None:
    from ingest.config import ProfileSettings
    from ingest.relay.links import Creator, ProvenanceSink

    class Written:
        def __init__(self) -> None:
            self.backend = FakeBackend()
            self.backend.resources.update({"Device": [], "Provenance": []})

        async def create(self, resource: dict[str, Any]) -> Any:
            from ingest.core.records import BackendStudy

            return BackendStudy(id="is-1", version_id="v1", resource=resource)

    inner = Written()
    creator = Creator(inner.backend, ProfileSettings(write_linked=True), "1.0", clock=lambda: NOW)
    wrapped = ProvenanceSink(inner, creator)  # type: ignore[arg-type]
    assert (await creator.references())[0] == "Device/device-1"  # the creator exists already
    inner.backend.create_error = PermanentSinkError("ProvenanceCreate refused: invalid")
    written = await wrapped.create({"resourceType": "ImagingStudy"})
    assert written.id == "is-1"  # the study's write stands
    assert creator.written == 0 and inner.backend.resources["Provenance"] == []
    assert "ImagingStudy/is-1 written, but its Provenance was not" in caplog.text
    inner.backend.create_error = None  # the next write gets its Provenance
    await wrapped.create({"resourceType": "ImagingStudy"})
    [provenance] = inner.backend.resources["Provenance"]
    assert provenance["target"] == [{"reference": "ImagingStudy/is-1/_history/v1", "type": "ImagingStudy"}]
    assert provenance["agent"][0]["who"] == {"reference": "Device/device-1", "type": "Device"}
