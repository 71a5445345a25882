"""The throughput paths of ``ingest replay`` keep their behaviour.

- The sink's documents are parsed and validated together (:func:`fit_schema`): each one still prints and
  validates exactly as a document parsed from its own text; an invalid one is still refused by name.
- Patient/Endpoint documents are fitted on first use, not at connect.
- A drain claims more studies per round than ``[relay] concurrency`` but never pushes more at once.
- ``replay`` prepares the sink while the input is read, and gives that up when nothing was accepted.
"""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from graphql import build_schema, parse, print_ast, validate

from ingest.adapters.graphql.fit import _parse_and_validate, fit_schema
from ingest.adapters.graphql.sink import GraphQLSink
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app.replay import ReplayOptions, run_replay
from ingest.app.wiring import mapping_options
from ingest.backend.schema import build_backend_schema
from ingest.config import BackendSettings, RelaySettings, Settings
from ingest.relay.build import StudyBuilder
from ingest.relay.relay import Relay
from tests import FIXTURES, free_ports
from tests.faultproxy import running_backend
from tests.relay.test_relay import FakeSink, record

MEDPLUM_SDL = (FIXTURES / "medplum_schema.graphql").read_text()


@pytest.mark.parametrize("which", ["embedded", "medplum"])
def test_fitted_documents_equal_their_texts_parsed_and_validated_alone(which: str) -> None:
    schema = build_backend_schema() if which == "embedded" else build_schema(MEDPLUM_SDL)
    fit = fit_schema(schema)
    texts = {"read": fit.read, "search": fit.search, "create": fit.create, "update": fit.update}
    assert set(fit.documents) == {k for k, v in texts.items() if v is not None}
    for key, doc in fit.documents.items():
        text = texts[key]
        assert text is not None
        alone = parse(text)
        assert print_ast(doc) == print_ast(alone)  # what is sent on the wire is unchanged
        assert validate(schema, alone) == []
        assert validate(schema, doc) == []


def test_documents_validated_together_refuse_an_invalid_operation() -> None:
    schema = build_schema("type Query { a(x: Int): T }\ntype T { b: Int, c: String }")
    fragments = {"F": "fragment F on T { b }", "G": "fragment G on T { c ...F }"}
    ok = {"one": "query One($x: Int) { a(x: $x) { ...G } }", "two": "query Two { a { ...F } }"}
    docs = _parse_and_validate(schema, ok, fragments)
    assert docs is not None
    one_alone = "\n".join([ok["one"], fragments["F"], fragments["G"]])  # fragments sorted by name
    assert print_ast(docs["one"]) == print_ast(parse(one_alone))
    assert print_ast(docs["two"]) == print_ast(parse(ok["two"] + "\n" + fragments["F"]))
    bad = {**ok, "two": "query Two { a { nope } }"}
    assert _parse_and_validate(schema, bad, fragments) is None
    undefined_variable = {**ok, "two": "query Two { a(x: $y) { ...F } }"}
    assert _parse_and_validate(schema, undefined_variable, fragments) is None


async def test_linked_documents_are_fitted_on_first_use(tmp_path: Path) -> None:
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        sink = GraphQLSink(f"{base}/fhir/R4/$graphql", token_source=None, timeout_s=10)
        assert not sink.supports("Patient")  # not connected
        async with sink:
            assert sink._linked == {}  # nothing fitted at connect
            assert sink.supports("Patient") and sink.supports("Endpoint")
            assert not sink.supports("Observation")
            assert set(sink._linked) == {"Patient", "Endpoint"}
            found = await sink.search_resources("Patient", identifier="urn:example|nobody")
            assert found == []
            created = await sink.create_resource(
                "Endpoint",
                {
                    "resourceType": "Endpoint",
                    "status": "active",
                    "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                                       "code": "dicom-wado-rs"},
                    "payloadType": [{"text": "DICOM"}],
                    "address": "https://pacs.example/wado",
                },
            )
            assert created["id"]


class _CountingSink(FakeSink):
    """Records how many creates run at the same time."""

    def __init__(self) -> None:
        super().__init__()
        self.running = 0
        self.most = 0

    async def create(self, resource: dict[str, Any]) -> Any:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.01)
            return await super().create(resource)
        finally:
            self.running -= 1


def _relay(tmp_path: Path, store: SQLiteStateStore, sink: FakeSink, studies: int) -> tuple[Relay, list[str]]:
    settings = Settings(data_dir=tmp_path, relay=RelaySettings(stable_age_s=0, concurrency=2, lease_s=60))
    now = datetime.now(UTC)
    uids = [f"1.2.826.0.1.3680043.8.498.{n + 1}" for n in range(studies)]
    for uid in uids:
        store.add_instance(record(uid, 1, 1), source="test", spool_name=None, digest=f"d-{uid}",
                           now=now - timedelta(seconds=5), due_at=now - timedelta(seconds=1))
    relay = Relay(store, sink, StudyBuilder(mapping_options(settings)), settings.relay, node="relay-1")
    return relay, uids


async def test_run_once_claims_at_most_its_limit(tmp_path: Path) -> None:
    sink = FakeSink()
    with SQLiteStateStore(tmp_path / "state.sqlite3", node="test") as store:
        relay, _uids = _relay(tmp_path, store, sink, 3)
        assert await relay.run_once(limit=1) == 1
        assert await relay.run_once() == 2  # default: twice the concurrency (4) -- the two left
    assert len(sink.resources) == 3


async def test_drain_claims_more_but_pushes_at_most_concurrency_at_once(tmp_path: Path) -> None:
    sink = _CountingSink()
    with SQLiteStateStore(tmp_path / "state.sqlite3", node="test") as store:
        relay, uids = _relay(tmp_path, store, sink, 9)
        await relay.drain(uids)
    assert len(sink.resources) == 9
    assert relay.totals.results["created"] == 9
    assert sink.most == 2  # [relay] concurrency


def _closed_port() -> int:
    return free_ports(1)[0]


async def test_replay_with_nothing_accepted_never_waits_for_the_backend(tmp_path: Path) -> None:
    junk = tmp_path / "in" / "notes.txt"
    junk.parent.mkdir()
    junk.write_text("not DICOM")
    url = f"http://127.0.0.1:{_closed_port()}/fhir/R4/$graphql"  # nobody listens: every connect fails
    settings = Settings(
        data_dir=tmp_path / "data",
        backend=BackendSettings(url=url, timeout_s=2),
        relay=RelaySettings(max_attempts=3, base_backoff_s=5, max_backoff_s=5),
    )
    stderr = io.StringIO()
    loop = asyncio.get_running_loop()
    started = loop.time()
    summary = await run_replay(settings, ReplayOptions(paths=[junk.parent], jobs=2), stdout=io.StringIO(),
                               stderr=stderr)
    assert loop.time() - started < 5  # no backoff wait: the early connection attempt was given up
    assert summary.files == 1 and summary.accepted == 0
    assert summary.exit_code() == 2
    assert "backend unreachable" not in stderr.getvalue()


async def test_replay_waits_for_a_backend_that_comes_up_after_the_input_is_read(tmp_path: Path) -> None:
    from samples.generate import generate

    corpus = generate(tmp_path / "corpus", studies=2, files=4, seed=7, tiny=True)
    port = _closed_port()
    settings = Settings(
        data_dir=tmp_path / "data",
        backend=BackendSettings(url=f"http://127.0.0.1:{port}/fhir/R4/$graphql", timeout_s=2),
        # full jitter: enough attempts and backoff that the retries outlast the backend's late start
        relay=RelaySettings(max_attempts=12, base_backoff_s=0.5, max_backoff_s=1.0),
    )
    from aiohttp import web

    from ingest.backend.server import create_app

    async def late_backend() -> web.AppRunner:
        await asyncio.sleep(0.5)  # the first connection attempt (during reading) is refused
        runner = web.AppRunner(create_app(tmp_path / "backend.sqlite3"), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    starting = asyncio.ensure_future(late_backend())
    try:
        summary = await run_replay(settings, ReplayOptions(paths=[corpus.root], jobs=1),
                                   stdout=io.StringIO(), stderr=io.StringIO())
    finally:
        runner = await starting
        await runner.cleanup()
    assert summary.accepted == 4
    assert summary.studies["created"] == 2
    assert summary.exit_code() == 0
