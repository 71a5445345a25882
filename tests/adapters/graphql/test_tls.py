"""``[backend] ca`` (a private CA) and ``[backend] schema`` (a backend that refuses introspection).

The embedded backend (``ingest.backend.server.create_app``) runs on 127.0.0.1, behind an aiohttp TLS site
whose certificate is issued by a CA made in the test (``trustme``), or behind a middleware that answers
HTTP 403 to introspection, as newer Medplum servers do.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from ingest.adapters.graphql.client import load_ca_bundle
from ingest.adapters.graphql.fit import load_schema_file
from ingest.adapters.graphql.sink import GraphQLSink
from ingest.app.wiring import start_sink
from ingest.backend.server import GRAPHQL_PATH, create_app
from ingest.config import BackendSettings, Settings
from ingest.errors import ConfigError
from tests import REPO
from tests.adapters.graphql.test_sink import STUDY_UID, study

EMBEDDED_SDL = REPO / "ingest" / "backend" / "schema.graphql"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def running(app: web.Application, **site_args: Any) -> AsyncIterator[int]:
    """Serve ``app`` on 127.0.0.1 (a free port) and yield the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, **site_args)
        await site.start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


@pytest.fixture(scope="module")
def private_ca() -> trustme.CA:
    return trustme.CA(organization_name="ingest test hospital CA")


@pytest.fixture
def ca_file(private_ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "hospital-ca.pem"
    private_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
async def https_url(private_ca: trustme.CA, tmp_path: Path) -> AsyncIterator[str]:
    """The embedded backend over https, its certificate for 127.0.0.1 issued by ``private_ca``."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    private_ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    async with running(create_app(tmp_path / "backend.sqlite3"), ssl_context=server_ctx) as port:
        yield f"https://127.0.0.1:{port}{GRAPHQL_PATH}"


# -- [backend] ca ---------------------------------------------------------------------------------------


async def test_private_ca_backend_is_trusted_with_ca_and_a_study_is_written(
    https_url: str, ca_file: Path
) -> None:
    async with GraphQLSink(https_url, token_source=None, timeout_s=5.0, ca=ca_file) as sink:
        created = await sink.create(study())
        found = await sink.find(STUDY_UID, None)
    assert found is not None and found.id == created.id


async def test_private_ca_backend_without_ca_fails_at_start_naming_the_key(https_url: str) -> None:
    sink = GraphQLSink(https_url, token_source=None, timeout_s=5.0)
    with pytest.raises(ConfigError, match=r"not trusted.*set \[backend\] ca"):
        await sink.connect()


async def test_ca_that_did_not_sign_the_backend_fails_naming_the_file(https_url: str, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    # also with the schema given (no introspection): the start-up probe meets the certificate
    sink = GraphQLSink(
        https_url, token_source=None, timeout_s=5.0, ca=other, schema=EMBEDDED_SDL.read_text()
    )
    with pytest.raises(ConfigError, match=rf"not trusted.*\[backend\] ca {other}"):
        await sink.connect()


def test_ca_file_is_checked_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[backend\] ca: .* does not exist"):
        load_ca_bundle(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError, match=r"\[backend\] ca: .* not a PEM CA bundle"):
        load_ca_bundle(garbage)
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"\[backend\] ca"):
        GraphQLSink("https://127.0.0.1:1/g", token_source=None, timeout_s=1.0, ca=empty)


# -- [backend] schema -----------------------------------------------------------------------------------


def refusing_introspection(app: web.Application) -> web.Application:
    """``app`` behind a middleware that answers introspection with HTTP 403, as newer Medplum does."""

    @web.middleware
    async def refuse(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "POST" and "__schema" in (await request.text()):
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "forbidden", "details": {"text": "Forbidden"}}],
            }
            return web.Response(text=json.dumps(outcome), status=403, content_type="application/fhir+json")
        return await handler(request)

    app.middlewares.append(refuse)
    return app


@pytest.fixture
async def refusing_url(tmp_path: Path) -> AsyncIterator[str]:
    async with running(refusing_introspection(create_app(tmp_path / "backend.sqlite3"))) as port:
        yield f"http://127.0.0.1:{port}{GRAPHQL_PATH}"


def settings_for(tmp_path: Path, url: str, **backend: Any) -> Settings:
    return Settings(data_dir=tmp_path, backend=BackendSettings(url=url, token_env=None, **backend))


async def test_schema_file_replaces_refused_introspection_and_a_study_is_written(
    refusing_url: str, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, refusing_url, schema=EMBEDDED_SDL)
    async with contextlib.AsyncExitStack() as stack:
        sink = await start_sink(settings, stack)
        await sink.connect()
        created = await sink.create(study())
        found = await sink.find(STUDY_UID, None)
    assert found is not None and found.id == created.id


async def test_refused_introspection_without_schema_says_to_set_it(refusing_url: str, tmp_path: Path) -> None:
    async with contextlib.AsyncExitStack() as stack:
        sink = await start_sink(settings_for(tmp_path, refusing_url), stack)
        with pytest.raises(ConfigError, match=r"introspection.*HTTP 403.*set \[backend\] schema"):
            await sink.connect()


async def test_schema_and_ca_files_are_checked_at_start(tmp_path: Path) -> None:
    bad_sdl = tmp_path / "bad.graphql"
    bad_sdl.write_text("type Query { ImagingStudyList(: [ }")
    url = "https://127.0.0.1:1/fhir/R4/$graphql"  # never contacted: start_sink does not connect
    cases = [
        ({"schema": tmp_path / "missing.graphql"}, r"\[backend\] schema: cannot read"),
        ({"schema": bad_sdl}, r"\[backend\] schema: .* is not a GraphQL schema"),
        ({"ca": tmp_path / "missing.pem"}, r"\[backend\] ca: .* does not exist"),
    ]
    for backend, message in cases:
        async with contextlib.AsyncExitStack() as stack:
            with pytest.raises(ConfigError, match=message):
                await start_sink(settings_for(tmp_path, url, **backend), stack)
    assert "ImagingStudyCreate" in load_schema_file(EMBEDDED_SDL)
