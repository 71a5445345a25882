"""The bearer token (``ingest.adapters.graphql.token``) through the sink: read from a file or an environment
variable, re-read once on HTTP 401, and never shown in a log line, an exception or a repr."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ingest.adapters.graphql.sink import GraphQLSink
from ingest.adapters.graphql.token import TokenSource
from ingest.errors import ConfigError, RetryableSinkError
from tests.adapters.graphql.test_sink import MEDPLUM_SDL, STUDY_UID, FakeBackend, url_of

SECRET = "tok-9f2c1e7a-very-secret"
FRESH_SECRET = "tok-2b7d44c0-rotated-secret"


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(MEDPLUM_SDL)


@pytest.fixture
async def server(aiohttp_server: Any, backend: FakeBackend) -> TestServer:
    app = web.Application()
    app.router.add_post("/fhir/R4/$graphql", backend.handle)
    srv: TestServer = await aiohttp_server(app, host="127.0.0.1")
    return srv


async def test_401_rereads_the_token_file_and_retries(
    server: TestServer, backend: FakeBackend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token_file = tmp_path / "token"
    token_file.write_text(SECRET + "\n")
    backend.token = SECRET
    sink = GraphQLSink(url_of(server), token_source=TokenSource(env=None, file=token_file), timeout_s=2.0)
    async with sink:
        assert backend.requests[-1]["authorization"] == f"Bearer {SECRET}"
        backend.token = FRESH_SECRET  # the token is rotated on the server ...
        token_file.write_text(FRESH_SECRET)  # ... and in the file
        assert await sink.find(STUDY_UID, None) is None
        assert [r["authorization"] for r in backend.requests[-2:]] == [
            f"Bearer {SECRET}",
            f"Bearer {FRESH_SECRET}",
        ]
        backend.token = "yet-another-token"  # rotated on the server only: still 401 after the re-read
        with pytest.raises(RetryableSinkError) as info:
            await sink.find(STUDY_UID, None)
        assert "unauthorized" in str(info.value) and info.value.code == 401
        texts = [str(info.value), repr(info.value), repr(sink), str(info.value.__cause__)]
    for secret in (SECRET, FRESH_SECRET):
        assert secret not in caplog.text
        assert all(secret not in t for t in texts)
    assert logging.getLogger("gql.transport.aiohttp").getEffectiveLevel() >= logging.WARNING


async def test_env_token_is_sent_and_missing_token_file_is_a_config_error(
    server: TestServer, backend: FakeBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INGEST_TEST_TOKEN", SECRET)
    backend.token = SECRET
    async with GraphQLSink(url_of(server), token_source=TokenSource(env="INGEST_TEST_TOKEN"), timeout_s=2.0):
        pass
    assert backend.requests[-1]["authorization"] == f"Bearer {SECRET}"
    missing = GraphQLSink(
        url_of(server), token_source=TokenSource(env=None, file=tmp_path / "nope"), timeout_s=2.0
    )
    with pytest.raises(ConfigError, match="token file"):
        await missing.connect()
