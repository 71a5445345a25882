"""OAuth2 client credentials against a Medplum-shaped token endpoint (``server.mjs`` with
``MEDPLUM_CLIENT_ID``/``SECRET``; tokens live 3 s): the sink fetches a token, fetches a new one before
the old expires (no 401 on the way), recovers from a revoked token with one 401, and a wrong secret is a
configuration error that never shows the secret."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid

import pytest

from ingest.adapters.graphql.sink import GraphQLSink
from ingest.adapters.graphql.token import ClientCredentialsToken, TokenSource
from ingest.errors import ConfigError
from tests import LOOPBACK_HTTP

pytestmark = pytest.mark.timeout(120)


def _stats(base: str) -> dict[str, int]:
    with LOOPBACK_HTTP.open(f"{base}/oauth2/stats", timeout=10) as answer:
        return dict(json.load(answer))


def _expire_all(base: str) -> None:
    request = urllib.request.Request(f"{base}/oauth2/expire", data=b"", method="POST")
    with LOOPBACK_HTTP.open(request, timeout=10):
        pass


async def _until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):  # type: ignore[arg-type]
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def test_a_token_that_expires_during_a_run_is_replaced_before_it_is_refused(
    medplum_oauth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    variable = f"INGEST_TEST_CLIENT_SECRET_{uuid.uuid4().hex}"
    monkeypatch.setenv(variable, medplum_oauth["secret"])
    base = medplum_oauth["base"]
    before = _stats(base)
    oauth = ClientCredentialsToken(medplum_oauth["token_url"], medplum_oauth["client_id"],
                                   TokenSource(env=variable), timeout_s=10)
    async with GraphQLSink(medplum_oauth["url"], token_source=None, timeout_s=30, oauth=oauth) as sink:
        assert await sink.find(f"2.25.{uuid.uuid4().int}", None) is None
        first = _stats(base)
        assert first["issued"] > before["issued"]  # (a slow schema read may take two 3 s tokens)
        assert first["unauthorized"] == before["unauthorized"]
        # every token issued so far has expired on the server's clock
        await _until(lambda: _stats(base)["active"] == 0, 30, "the first token's expiry")
        assert await sink.find(f"2.25.{uuid.uuid4().int}", None) is None
        after = _stats(base)
        assert after["issued"] > first["issued"]  # a new token, fetched before the request
        assert after["unauthorized"] == before["unauthorized"]  # and never refused on the way
        # revoked on the server: one 401, one new token, the request goes through
        _expire_all(base)
        assert await sink.find(f"2.25.{uuid.uuid4().int}", None) is None
        last = _stats(base)
        assert last["unauthorized"] == after["unauthorized"] + 1
        assert last["issued"] > after["issued"]


async def test_a_wrong_client_secret_is_a_configuration_error_without_the_secret(
    medplum_oauth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    variable = f"INGEST_TEST_CLIENT_SECRET_{uuid.uuid4().hex}"
    wrong = "not-" + medplum_oauth["secret"]
    monkeypatch.setenv(variable, wrong)
    oauth = ClientCredentialsToken(medplum_oauth["token_url"], medplum_oauth["client_id"],
                                   TokenSource(env=variable), timeout_s=10)
    sink = GraphQLSink(medplum_oauth["url"], token_source=None, timeout_s=30, oauth=oauth)
    with pytest.raises(ConfigError) as err:
        await sink.connect()
    await sink.aclose()
    text = str(err.value)
    assert "invalid_client" in text and medplum_oauth["token_url"] in text
    assert wrong not in text and wrong not in repr(oauth)
