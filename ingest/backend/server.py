"""The embedded FHIR GraphQL backend: an aiohttp application over :mod:`ingest.backend.schema`.

Routes::

    POST /fhir/R4/$graphql   GraphQL (Medplum's URL); bearer token when one is configured
    GET  /stats              JSON counters: requests, lookups, reads, creates, updates, deletes
    GET  /healthz            200 "ok", never authenticated

Answers follow Medplum 4.5.2 (/work/shared/reference/medplum/probe-results.md):

- invalid JSON, a missing query, a syntax error, or a document the schema rejects (unknown field or
  argument, wrong inline literal): HTTP 400, an ``OperationOutcome`` as ``application/fhir+json``;
- variables that do not fit their types: HTTP 200 with ``errors`` and no ``data``;
- execution errors (``Not found``, a refused resource): HTTP 200 with ``errors`` and
  ``data: {field: null}``;
- a database failure: HTTP 503 with an ``OperationOutcome`` (the client may retry), not a GraphQL
  error a client would treat as permanent;
- graphql-core messages that quote an input value are cut before the value (it may be PHI);
- a missing or wrong bearer token: HTTP 401 with an ``OperationOutcome``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from inspect import isawaitable
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from graphql import (
    DocumentNode,
    ExecutionResult,
    GraphQLError,
    GraphQLSchema,
    GraphQLSyntaxError,
    execute,
    parse,
    validate,
)

from ingest.backend.schema import STAT_NAMES, BackendContext, build_backend_schema, normalize_numbers
from ingest.backend.store import BackendRequestError, ResourceStore, StorageError

__all__ = [
    "GRAPHQL_PATH",
    "STATS_KEY",
    "STORE_KEY",
    "create_app",
    "serve",
    "start_backend",
]

LOGGER = logging.getLogger(__name__)

#: Where the GraphQL endpoint lives, as on Medplum.
GRAPHQL_PATH: Final = "/fhir/R4/$graphql"
#: Request counters of an application (``GET /stats``).
STATS_KEY: Final = web.AppKey("ingest_backend_stats", dict[str, int])
#: The open store of a running application.
STORE_KEY: Final = web.AppKey("ingest_backend_store", ResourceStore)
_SCHEMA_KEY: Final = web.AppKey("ingest_backend_schema", GraphQLSchema)
_DOCS_KEY: Final = web.AppKey("ingest_backend_documents", dict[str, DocumentNode])

_FHIR_JSON: Final = "application/fhir+json"
_MAX_BODY: Final = 64 * 1024 * 1024  # one ImagingStudy of a large study with instance lists
_MAX_CACHED_DOCUMENTS: Final = 256


def _outcome(
    status: int, texts: list[str], *, code: str = "invalid", diagnostics: str | None = None
) -> web.Response:
    """An HTTP error answer carrying a FHIR OperationOutcome, one issue per text."""
    issues: list[dict[str, Any]] = []
    for text in texts:
        issue: dict[str, Any] = {"severity": "error", "code": code, "details": {"text": text}}
        if diagnostics:
            issue["diagnostics"] = diagnostics
        issues.append(issue)
    body = {"resourceType": "OperationOutcome", "issue": issues}
    return web.Response(status=status, text=json.dumps(body), content_type=_FHIR_JSON)


def _auth_middleware(token: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check_token(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path != "/healthz":
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time; the token is never logged
                response = _outcome(401, ["Unauthorized"], code="login")
                response.headers["WWW-Authenticate"] = 'Bearer realm="ingest"'
                return response
        return await handler(request)

    return check_token


def _document(app: web.Application, query: str) -> DocumentNode | web.Response:
    """The parsed and validated document, or the 400 answer (cached: clients repeat their queries)."""
    cache = app[_DOCS_KEY]
    document = cache.get(query)
    if document is not None:
        return document
    try:
        document = parse(query)
    except GraphQLSyntaxError as exc:
        return _outcome(400, ["GraphQL syntax error."], diagnostics=exc.message)
    errors = validate(app[_SCHEMA_KEY], document)
    if errors:
        return _outcome(400, [_redact(error.message) for error in errors])
    if len(cache) >= _MAX_CACHED_DOCUMENTS:
        cache.pop(next(iter(cache)))
    cache[query] = document
    return document


_FOUND = re.compile(r"(?s),? ?\b[Ff]ound: .*$")
_SCALAR_VALUE = re.compile(r"(?s)(cannot represent[^:]*): .*$")


def _redact(message: str) -> str:
    """A graphql-core message without the input value it quotes (values may be patient data)."""
    redacted = _SCALAR_VALUE.sub(r"\1", _FOUND.sub("", message)).rstrip()
    return redacted if redacted.endswith((".", "?", "!")) else redacted + "."


def _formatted(error: GraphQLError) -> dict[str, Any]:
    formatted = dict(error.formatted)
    if not isinstance(error.original_error, BackendRequestError):  # ours never quote values
        formatted["message"] = _redact(error.message)
    return formatted


def _storage_failed(errors: list[GraphQLError]) -> bool:
    return any(isinstance(error.original_error, StorageError) for error in errors)


async def _graphql(request: web.Request) -> web.Response:
    app = request.app
    stats = app[STATS_KEY]
    stats["requests"] += 1
    try:
        body = await request.json()
    except ValueError:
        return _outcome(400, ["Invalid JSON body"])
    if not isinstance(body, dict):
        return _outcome(400, ["Invalid JSON body"])
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        return _outcome(400, ["Must provide query."])
    variables = body.get("variables")
    if variables is not None and not isinstance(variables, dict):
        return _outcome(400, ["Variables must be provided as an object."])
    operation_name = body.get("operationName")
    if operation_name is not None and not isinstance(operation_name, str):
        return _outcome(400, ["operationName must be a string."])
    document = _document(app, query)
    if isinstance(document, web.Response):
        return document

    context = BackendContext(store=app[STORE_KEY], stats=stats)
    outcome = execute(
        app[_SCHEMA_KEY],
        document,
        context_value=context,
        variable_values=variables,
        operation_name=operation_name,
    )
    result: ExecutionResult = await outcome if isawaitable(outcome) else outcome
    payload: dict[str, Any] = {}
    if result.errors:
        if _storage_failed(result.errors):
            LOGGER.error("Embedded backend storage failure: %s", result.errors[0].original_error)
            return _outcome(503, ["Storage unavailable, retry later"], code="transient")
        payload["errors"] = [_formatted(error) for error in result.errors]
    if result.data is not None or not result.errors:  # variable errors: no data at all, like Medplum
        payload["data"] = normalize_numbers(result.data)
    return web.json_response(payload)


async def _stats(request: web.Request) -> web.Response:
    stats: dict[str, int] = request.app[STATS_KEY]
    return web.json_response(dict(stats))


async def _healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def create_app(db_path: Path, *, token: str | None = None) -> web.Application:
    """The backend as an aiohttp application; the database opens on startup and closes on cleanup.

    Parameters
    ----------
    db_path:
        The SQLite database file (created if missing; data is kept across restarts).
    token:
        If given, every request except ``/healthz`` needs ``Authorization: Bearer <token>``.

    Returns
    -------
    aiohttp.web.Application
        With ``app[STATS_KEY]`` (counters) and, while running, ``app[STORE_KEY]``.
    """
    middlewares = [_auth_middleware(token)] if token else []
    app = web.Application(client_max_size=_MAX_BODY, middlewares=middlewares)
    app[STATS_KEY] = dict.fromkeys(STAT_NAMES, 0)
    app[_SCHEMA_KEY] = build_backend_schema()
    app[_DOCS_KEY] = {}

    async def open_store(app: web.Application) -> AsyncIterator[None]:
        store = await asyncio.to_thread(ResourceStore, db_path)
        app[STORE_KEY] = store
        try:
            yield
        finally:
            await asyncio.to_thread(store.close)

    app.cleanup_ctx.append(open_store)
    app.router.add_post(GRAPHQL_PATH, _graphql)
    app.router.add_get("/stats", _stats)
    app.router.add_get("/healthz", _healthz)
    return app


async def start_backend(
    db_path: Path, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None
) -> tuple[web.AppRunner, int]:
    """Start the backend on ``host:port`` (``port=0``: chosen by the OS) and return at once.

    Parameters
    ----------
    db_path:
        The SQLite database file.
    host, port:
        Where to listen.
    token:
        Optional bearer token (see :func:`create_app`).

    Returns
    -------
    tuple[aiohttp.web.AppRunner, int]
        The runner (``await runner.cleanup()`` stops the server) and the bound port.
    """
    runner = web.AppRunner(create_app(db_path, token=token), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = int(runner.addresses[0][1])
    LOGGER.info("Embedded FHIR backend at http://%s:%d%s", host, bound, GRAPHQL_PATH)
    return runner, bound


async def serve(
    db_path: Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the backend until cancelled.

    Parameters
    ----------
    db_path:
        The SQLite database file.
    host, port:
        Where to listen.
    token:
        Optional bearer token.
    ready:
        Set once the server accepts connections.
    """
    runner, _port = await start_backend(db_path, host=host, port=port, token=token)
    try:
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
