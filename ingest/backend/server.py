"""The embedded FHIR GraphQL backend: an aiohttp application over :mod:`ingest.backend.schema`.

Routes::

    POST    /fhir/R4/$graphql   GraphQL (Medplum's URL); bearer token when one is configured
    OPTIONS /fhir/R4/$graphql   204 with ``Allow``; never an ``Access-Control-Allow-*`` grant
    GET     /stats              JSON counters: requests, lookups, reads, creates, updates, deletes
    GET     /healthz            200 "ok", never authenticated
    GET     /fhir/R4/metadata, /fhir/R4/<type>/<id>, /fhir/R4/<type>?<params>
                                read-only FHIR REST (ingest.backend.rest), same token and origin rules

GraphQL is POST only (a mutation cannot ride on a GET). A browser page of another site must not be
able to use the backend (it has no CORS grant, but a "simple" cross-site POST is sent anyway), so:

- a request with an ``Origin`` header that is not the server's own origin (the scheme and the
  ``Host`` header it was reached at) is refused with 403 (except ``/healthz``);
- when the server is bound to a loopback address, a ``Host`` header naming another host is refused
  with 403 (a DNS-rebinding page has its own host name in ``Host``);
- a POST must be ``Content-Type: application/json`` or ``application/graphql`` (the query as the body),
  otherwise 415: the form and ``text/plain`` bodies a page can send without a preflight are refused.

Before anything is executed a request is checked against :class:`ingest.backend.limits.QueryLimits`
(body size, JSON nesting, query length, depth, fields, aliases, operations); at most
``max_concurrent_requests`` requests are decoded and executed at once.

Answers follow Medplum 4.5.2 (captured in tests/fixtures/medplum/probe-results.md):

- invalid JSON, a missing query, a syntax error, or a document the schema rejects (unknown field or
  argument, wrong inline literal): HTTP 400, an ``OperationOutcome`` as ``application/fhir+json``;
- variables that do not fit their types: HTTP 200 with ``errors`` and no ``data``;
- execution errors (``Not found``, a refused resource): HTTP 200 with ``errors`` and
  ``data: {field: null}``;
- a database failure (disk full, I/O error, locked): HTTP 503 with ``Retry-After`` and an
  ``OperationOutcome`` with issue code ``no-store`` (the client retries), not a GraphQL error a client
  would treat as permanent; the failed write is rolled back and the database is usable again as soon
  as space returns;
- graphql-core messages that quote an input value are cut before the value (it may be PHI);
- a missing or wrong bearer token: HTTP 401 with an ``OperationOutcome``;
- a foreign ``Origin`` or ``Host``: 403; a body that is not JSON or GraphQL: 415; a body over the size
  limit: 413; a query or JSON body over a cost limit: 400 with issue code ``too-costly`` (all
  ``OperationOutcome``).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from inspect import isawaitable
from pathlib import Path
from typing import Any, Final

from aiohttp import hdrs, web
from graphql import (
    ASTValidationRule,
    DocumentNode,
    ExecutionResult,
    GraphQLError,
    GraphQLSchema,
    GraphQLSyntaxError,
    execute,
    parse,
    validate,
)
from yarl import URL

from ingest.backend.limits import QueryLimits, cost_rule, json_depth_exceeds
from ingest.backend.rest import add_rest_routes, operation_outcome
from ingest.backend.schema import STAT_NAMES, BackendContext, build_backend_schema, normalize_numbers
from ingest.backend.store import BackendRequestError, ResourceStore, StorageError
from ingest.logs import printable

__all__ = [
    "GRAPHQL_PATH",
    "STATS_KEY",
    "STORE_KEY",
    "QueryLimits",
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
_LIMITS_KEY: Final = web.AppKey("ingest_backend_limits", QueryLimits)
_COST_RULE_KEY: Final[web.AppKey[type[ASTValidationRule]]] = web.AppKey("ingest_backend_cost_rule")
_SLOTS_KEY: Final = web.AppKey("ingest_backend_slots", asyncio.Semaphore)

_JSON: Final = "application/json"
_GRAPHQL: Final = "application/graphql"
_MAX_CACHED_DOCUMENTS: Final = 256
#: Host names that reach a server bound to a loopback address (besides the bound address itself).
_LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})


def _auth_middleware(token: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check_token(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path != "/healthz":
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time; the token is never logged
                response = operation_outcome(401, ["Unauthorized"], code="login")
                response.headers["WWW-Authenticate"] = 'Bearer realm="ingest"'
                return response
        return await handler(request)

    return check_token


def _own_authority(request: web.Request) -> URL | None:
    """The scheme and ``Host`` header the request reached us at, or ``None`` if there is no usable one."""
    host = request.headers.get(hdrs.HOST)
    if not host:
        return None
    try:
        own = URL.build(scheme=request.scheme, authority=host)
    except (ValueError, TypeError):
        return None
    return own if own.host else None


def _same_origin(origin: str, own: URL) -> bool:
    """Whether an ``Origin`` header (RFC 6454: scheme, host, port) names the server's own origin."""
    try:
        url = URL(origin)
    except (ValueError, TypeError):
        return False  # includes the opaque origin "null"
    if url.scheme not in ("http", "https") or not url.host or url.raw_path not in ("", "/"):
        return False
    return (url.scheme, url.host.lower(), url.port) == (own.scheme, (own.host or "").lower(), own.port)


def _host_allowed(own: URL, allowed_hosts: frozenset[str]) -> bool:
    host = (own.host or "").lower()
    if host in allowed_hosts:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refusal(request: web.Request, allowed_hosts: frozenset[str] | None) -> str | None:
    """Why a request must be refused as cross-site (``None``: it may proceed)."""
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is None and allowed_hosts is None:
        return None  # not from a browser page, and any Host is fine
    own = _own_authority(request)
    if own is None:
        return "no usable Host header"
    if allowed_hosts is not None and not _host_allowed(own, allowed_hosts):
        return "a Host header naming another host"
    if origin is not None and not _same_origin(origin, own):
        return "a cross-origin request"
    return None


def _origin_middleware(
    allowed_hosts: frozenset[str] | None,
) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def check_origin(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        reason = None if request.path == "/healthz" else _refusal(request, allowed_hosts)
        if reason is not None:  # no header values in the log; the path is escaped (the client's text)
            path = printable(request.path)
            LOGGER.info("Embedded backend refused %s (%s %s)", reason, request.method, path)
            return operation_outcome(
                403, ["Forbidden: cross-origin requests are not accepted"], code="forbidden"
            )
        return await handler(request)

    return check_origin


def _too_costly(text: str) -> web.Response:
    return operation_outcome(400, [text], code="too-costly")


def _document(app: web.Application, query: str) -> DocumentNode | web.Response:
    """The parsed and validated document, or the 400 answer (cached: clients repeat their queries).

    The cost rule runs first and alone: the standard rules are not run on a document it refuses.
    """
    cache = app[_DOCS_KEY]
    document = cache.get(query)
    if document is not None:
        return document
    limits = app[_LIMITS_KEY]
    try:
        document = parse(
            query,
            max_lexical_tokens=limits.max_tokens,
            max_comments=limits.max_comments,
            max_source_length=limits.max_query_chars,
        )
    except GraphQLSyntaxError as exc:
        if exc.message.endswith("Parsing aborted."):  # over a parser limit, not malformed
            return _too_costly(f"Query too complex: {exc.message.removeprefix('Syntax Error: ')}")
        return operation_outcome(400, ["GraphQL syntax error."], diagnostics=exc.message)
    except RecursionError:
        return _too_costly("Query too complex: nested too deeply.")
    schema = app[_SCHEMA_KEY]
    costly = validate(schema, document, [app[_COST_RULE_KEY]])
    if costly:
        return _too_costly(costly[0].message)
    try:
        errors = validate(schema, document)
    except RecursionError:
        return _too_costly("Query too complex: nested too deeply.")
    if errors:
        return operation_outcome(400, [_redact(error.message) for error in errors])
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


def _storage_failure(errors: list[GraphQLError]) -> StorageError | None:
    return next((e.original_error for e in errors if isinstance(e.original_error, StorageError)), None)


#: Seconds a client is asked to wait after a storage failure (HTTP Retry-After of the 503 answer).
STORAGE_RETRY_AFTER_S: Final = 5


def _storage_unavailable(failure: StorageError) -> web.Response:
    """HTTP 503, issue code ``no-store`` (FHIR: the persistent store is unavailable) and Retry-After:
    a client retries later and never treats it as a refusal of its resource."""
    what = "Storage full" if failure.full else "Storage unavailable"
    answer = operation_outcome(503, [f"{what}, retry later"], code="no-store")
    answer.headers["Retry-After"] = str(STORAGE_RETRY_AFTER_S)
    return answer


async def _graphql(request: web.Request) -> web.Response:
    app = request.app
    stats = app[STATS_KEY]
    stats["requests"] += 1
    limits = app[_LIMITS_KEY]
    content_type = request.content_type
    if content_type not in (_JSON, _GRAPHQL):
        return operation_outcome(
            415, ["Content-Type must be application/json or application/graphql"], code="not-supported"
        )
    too_large = operation_outcome(
        413, [f"Request body larger than {limits.max_body_bytes} bytes"], code="too-costly"
    )
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        return too_large
    try:
        raw = await request.read()  # bounded by client_max_size
    except web.HTTPRequestEntityTooLarge:
        return too_large
    async with app[_SLOTS_KEY]:
        return await _answer(app, content_type, raw)


async def _answer(app: web.Application, content_type: str, raw: bytes) -> web.Response:
    """Decode, check, execute: the part of a GraphQL request that costs CPU."""
    if content_type == _GRAPHQL:
        try:
            body: Any = {"query": raw.decode("utf-8")}
        except UnicodeDecodeError:
            return operation_outcome(400, ["Invalid GraphQL body"])
    else:
        try:
            body = json.loads(raw)
        except RecursionError:
            return _too_costly("JSON body nested too deeply.")
        except ValueError:  # also a body that is not UTF-8
            return operation_outcome(400, ["Invalid JSON body"])
        deepest = app[_LIMITS_KEY].max_json_depth
        if json_depth_exceeds(body, deepest):
            return _too_costly(f"JSON body nested too deeply (at most {deepest} levels).")
    if not isinstance(body, dict):
        return operation_outcome(400, ["Invalid JSON body"])
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        return operation_outcome(400, ["Must provide query."])
    variables = body.get("variables")
    if variables is not None and not isinstance(variables, dict):
        return operation_outcome(400, ["Variables must be provided as an object."])
    operation_name = body.get("operationName")
    if operation_name is not None and not isinstance(operation_name, str):
        return operation_outcome(400, ["operationName must be a string."])
    document = _document(app, query)
    if isinstance(document, web.Response):
        return document

    stats: dict[str, int] = app[STATS_KEY]
    context = BackendContext(store=app[STORE_KEY], stats=stats, max_resources=app[_LIMITS_KEY].max_resources)
    try:
        outcome = execute(
            app[_SCHEMA_KEY],
            document,
            context_value=context,
            variable_values=variables,
            operation_name=operation_name,
        )
        result: ExecutionResult = await outcome if isawaitable(outcome) else outcome
    except RecursionError:  # an inline argument literal nested thousands of levels deep
        return _too_costly("Query too complex: nested too deeply.")
    payload: dict[str, Any] = {}
    if result.errors:
        failure = _storage_failure(result.errors)
        if failure is not None:  # SQLite's words only: nothing of the request
            LOGGER.error("Embedded backend storage failure: %s", failure)
            return _storage_unavailable(failure)
        payload["errors"] = [_formatted(error) for error in result.errors]
    if result.data is not None or not result.errors:  # variable errors: no data at all, like Medplum
        payload["data"] = normalize_numbers(result.data)
    return web.json_response(payload)


async def _stats(request: web.Request) -> web.Response:
    stats: dict[str, int] = request.app[STATS_KEY]
    return web.json_response(dict(stats))


async def _healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _preflight(_request: web.Request) -> web.Response:
    """A CORS preflight: answered, but never with an ``Access-Control-Allow-*`` grant."""
    return web.Response(status=204, headers={hdrs.ALLOW: "POST, OPTIONS"})


def create_app(
    db_path: Path,
    *,
    token: str | None = None,
    limits: QueryLimits | None = None,
    allowed_hosts: Collection[str] | None = None,
) -> web.Application:
    """The backend as an aiohttp application; the database opens on startup and closes on cleanup.

    Parameters
    ----------
    db_path:
        The SQLite database file (created if missing; data is kept across restarts).
    token:
        If given, every request except ``/healthz`` needs ``Authorization: Bearer <token>``.
    limits:
        What one request may cost; default :class:`~ingest.backend.limits.QueryLimits`.
    allowed_hosts:
        If given, requests whose ``Host`` header names another host than these or a loopback
        address are refused (403); ``None`` accepts any ``Host``. :func:`start_backend` sets it for a
        loopback bind address.

    Returns
    -------
    aiohttp.web.Application
        With ``app[STATS_KEY]`` (counters) and, while running, ``app[STORE_KEY]``.
    """
    limits = limits or QueryLimits()
    hosts = None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)
    middlewares = [_origin_middleware(hosts)]
    if token:
        middlewares.append(_auth_middleware(token))
    app = web.Application(client_max_size=limits.max_body_bytes, middlewares=middlewares)
    app[STATS_KEY] = dict.fromkeys(STAT_NAMES, 0)
    app[_SCHEMA_KEY] = build_backend_schema()
    app[_DOCS_KEY] = {}
    app[_LIMITS_KEY] = limits
    app[_COST_RULE_KEY] = cost_rule(limits)
    app[_SLOTS_KEY] = asyncio.Semaphore(limits.max_concurrent_requests)

    async def open_store(app: web.Application) -> AsyncIterator[None]:
        store = await asyncio.to_thread(ResourceStore, db_path)
        app[STORE_KEY] = store
        try:
            yield
        finally:
            await asyncio.to_thread(store.close)

    app.cleanup_ctx.append(open_store)
    app.router.add_post(GRAPHQL_PATH, _graphql)
    app.router.add_route(hdrs.METH_OPTIONS, GRAPHQL_PATH, _preflight)
    app.router.add_get("/stats", _stats)
    app.router.add_get("/healthz", _healthz)
    add_rest_routes(app, STORE_KEY)  # read-only FHIR REST at /fhir/R4 (ingest.backend.rest)
    return app


async def start_backend(
    db_path: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    limits: QueryLimits | None = None,
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
    limits:
        Request cost limits (see :func:`create_app`).

    Returns
    -------
    tuple[aiohttp.web.AppRunner, int]
        The runner (``await runner.cleanup()`` stops the server) and the bound port.
    """
    app = create_app(db_path, token=token, limits=limits, allowed_hosts=_allowed_hosts(host))
    runner = web.AppRunner(app, access_log=None)
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


def _allowed_hosts(host: str) -> frozenset[str] | None:
    """The ``Host`` names accepted when bound to ``host``: loopback names for a loopback bind, else any."""
    name = host.strip("[]").lower()
    try:
        loopback = ipaddress.ip_address(name).is_loopback
    except ValueError:
        loopback = name == "localhost"
    return _LOOPBACK_NAMES | {name} if loopback else None


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
