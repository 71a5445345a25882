"""The gql client: session, transport, TLS and what ``ingest`` changes in gql's behaviour.

One gql session (``AIOHTTPTransport``) per sink for the life of the process. gql's own retries are off
(a plain ``AsyncClientSession``): the relay owns the retry policy (docs/architecture.md "Writing the
backend"). Every change to gql's or aiohttp's behaviour is here, each naming what it stands in for:

- :class:`ValidatingClient`: documents are validated once, not on every request;
- :class:`PrintedRequest`: a document's query text is printed once, not on every request;
- :func:`recording`: the HTTP status, ``Retry-After`` and decoded body of each exchange, which gql does not
  report, for :func:`ingest.adapters.graphql.errors.map_errors`;
- :class:`RestClient`: the FHIR REST read and update of one ImagingStudy at the base the GraphQL endpoint
  is an operation of (``[base]/$graphql`` -> ``[base]/ImagingStudy/<id>``), for the content a backend's
  GraphQL input types cannot carry (docs/mapping.md, "The lifecycle of a study").

Security: TLS certificates are always verified, against the system CA store or, with ``[backend] ca``,
against that PEM bundle only (:func:`load_ca_bundle`). gql logs whole requests and responses (patient
data) at DEBUG, so its loggers are capped at WARNING (:func:`cap_gql_loggers`; docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Final

import aiohttp
from gql import Client, GraphQLRequest
from gql.client import AsyncClientSession
from gql.transport.aiohttp import AIOHTTPTransport
from graphql import DocumentNode, print_ast
from yarl import URL

from ingest.adapters.graphql.errors import Exchange
from ingest.errors import ConfigError

__all__ = [
    "PrintedRequest",
    "RestAnswer",
    "RestClient",
    "ValidatingClient",
    "cap_gql_loggers",
    "connect",
    "load_ca_bundle",
    "make_client",
    "recording",
    "rest_base",
]

_MAX_PRINTED: Final = 64  # query texts kept per sink (the fitted documents are a handful)
_KEEPALIVE_S: Final = 2.0  # client keep-alive: shorter than common server idle timeouts (Node: 5 s)

# gql logs full variables and responses (PHI) at DEBUG; these loggers never go below WARNING.
_GQL_LOGGERS: Final = ("gql", "gql.client", "gql.transport", "gql.transport.aiohttp", "gql.dsl")


_EXCHANGE: ContextVar[Exchange | None] = ContextVar("ingest_graphql_exchange", default=None)


def _loads(text: str) -> Any:
    """``json.loads`` that also keeps the decoded body for the error mapping (OperationOutcome on 400)."""
    value = json.loads(text)
    exchange = _EXCHANGE.get()
    if exchange is not None:
        exchange.body = value
    return value


async def _on_request_end(
    session: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
) -> None:
    exchange = _EXCHANGE.get()
    if exchange is not None:
        exchange.status = params.response.status
        exchange.retry_after = params.response.headers.get("Retry-After")


@contextlib.contextmanager
def recording() -> Iterator[Exchange]:
    """An :class:`Exchange` that the hooks fill in for the requests sent inside the ``with`` block."""
    exchange = Exchange()
    reset = _EXCHANGE.set(exchange)
    try:
        yield exchange
    finally:
        _EXCHANGE.reset(reset)


class ValidatingClient(Client):
    """gql's ``Client`` that validates each document once, not on every request.

    gql re-validates the document of every request against the schema; our documents are the few fixed
    ones built (and validated) by :mod:`ingest.adapters.graphql.fit`, and validating the full-read
    selection costs hundreds of milliseconds each time. Documents are kept (pinned) by identity, so an id
    is never reused.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._validated: dict[int, DocumentNode] = {}

    def validate(self, request: GraphQLRequest) -> None:
        doc = request.document
        if self._validated.get(id(doc)) is doc:
            return
        super().validate(request)
        self._validated[id(doc)] = doc

    def trust(self, documents: Iterable[DocumentNode]) -> None:
        """Record ``documents`` as valid: ``fit_schema`` / ``fit_resource`` (``graphql/fit.py``) validated
        them against this client's schema already (the same ``graphql.validate`` gql would run again)."""
        for doc in documents:
            self._validated[id(doc)] = doc


class PrintedRequest(GraphQLRequest):
    """A request whose query text is printed once per document, not on every request.

    gql prints the document AST (``print_ast``) for every request it sends; for the full-read selection
    that costs ~0.1 s each time. ``cache`` maps a document's identity to (the document, its text); the
    document is kept in the entry, so an id is never reused while its entry exists.
    """

    def __init__(self, request: GraphQLRequest, cache: dict[int, tuple[DocumentNode, str]]) -> None:
        super().__init__(request)
        doc = self.document
        hit = cache.get(id(doc))
        if hit is None or hit[0] is not doc:
            if len(cache) >= _MAX_PRINTED:
                cache.clear()
            hit = cache[id(doc)] = (doc, print_ast(doc))
        self._text = hit[1]

    @property
    def payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"query": self._text}
        if self.operation_name:
            payload["operationName"] = self.operation_name
        if self.variable_values:
            payload["variables"] = self.variable_values
        if self.extensions:
            payload["extensions"] = self.extensions
        return payload


def make_client(url: str, *, ssl_context: ssl.SSLContext | bool, timeout_s: float) -> ValidatingClient:
    """A gql client for ``url`` with the exchange hooks, the keep-alive and the timeouts; not connected.

    Parameters
    ----------
    url:
        The GraphQL endpoint.
    ssl_context:
        ``True`` (the system CA store) or the context of :func:`load_ca_bundle`; never unverified.
    timeout_s:
        Timeout of one HTTP request (connect + answer), seconds.
    """
    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(_on_request_end)
    transport = AIOHTTPTransport(
        url=url,
        ssl=ssl_context,  # verification stays on; [backend] ca only replaces the trust store
        json_deserialize=_loads,
        client_session_args={
            "timeout": aiohttp.ClientTimeout(total=timeout_s),
            "trace_configs": [trace],
            # idle connections are dropped before the server's keep-alive timeout (Node, and so
            # Medplum: 5 s) can close them under us; a POST on such a socket fails with "Server
            # disconnected" and is not retried by aiohttp
            "connector": aiohttp.TCPConnector(keepalive_timeout=_KEEPALIVE_S),
        },
    )
    return ValidatingClient(transport=transport, execute_timeout=timeout_s + 1.0)


async def connect(client: ValidatingClient) -> AsyncClientSession:
    """Open ``client``'s session: a plain ``AsyncClientSession`` (reconnecting=False), so gql retries
    nothing and the relay owns retries."""
    session = await client.connect_async(reconnecting=False)  # type: ignore[no-untyped-call]
    assert isinstance(session, AsyncClientSession)
    return session


def load_ca_bundle(path: Path) -> ssl.SSLContext:
    """A client TLS context that trusts exactly the CAs in ``path`` (``[backend] ca``).

    The bundle replaces the system CA store for the backend connection (a private CA is pinned; a public
    CA does not vouch for the hospital's backend); certificate and host name verification stay on.

    Parameters
    ----------
    path:
        A PEM file with one or more CA certificates.

    Raises
    ------
    ConfigError
        The file does not exist, cannot be read or holds no PEM certificate (the message names
        ``[backend] ca``).
    """
    if not path.is_file():
        raise ConfigError(f"[backend] ca: {path} does not exist or is not a file")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(path))
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"[backend] ca: {path} is not a PEM CA bundle ({type(exc).__name__})") from None
    if not context.cert_store_stats().get("x509"):
        raise ConfigError(f"[backend] ca: {path} holds no certificate")
    return context


def cap_gql_loggers() -> None:
    """Raise gql's loggers to WARNING (they log whole requests and responses, patient data, at DEBUG)."""
    for name in _GQL_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:  # NOTSET (0) included
            logger.setLevel(logging.WARNING)


GRAPHQL_OPERATION: Final = "$graphql"
FHIR_JSON: Final = "application/fhir+json"


def rest_base(url: str) -> str | None:
    """The FHIR base of a GraphQL endpoint ``[base]/$graphql`` (with a trailing ``/``), else ``None``.

    FHIR defines GraphQL as the ``$graphql`` operation of a RESTful FHIR server at ``[base]``; an endpoint
    of any other shape gives no REST route.
    """
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return None
    if not parsed.path.endswith("/" + GRAPHQL_OPERATION):
        return None
    base = parsed.with_path(parsed.path[: -len(GRAPHQL_OPERATION)]).with_query(None).with_fragment(None)
    return str(base)


@dataclass(frozen=True)
class RestAnswer:
    """One FHIR REST answer: HTTP status, decoded JSON body (``None`` when not JSON), ``Retry-After``."""

    status: int
    body: Any
    retry_after: str | None


class RestClient:
    """FHIR REST requests to ``[base]`` with the sink's TLS and timeout; the session is opened on first use.

    Parameters
    ----------
    base:
        From :func:`rest_base`.
    ssl_context:
        As for :func:`make_client`; verification is never turned off.
    timeout_s:
        Timeout of one HTTP request (connect + answer), seconds.
    """

    def __init__(self, base: str, *, ssl_context: ssl.SSLContext | bool, timeout_s: float) -> None:
        self.base = base
        self._ssl = ssl_context
        self._timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def request(
        self, method: str, path: str, *, headers: dict[str, str], body: Any = None
    ) -> RestAnswer:
        """``method [base]<path>`` with ``body`` as FHIR JSON; raises aiohttp / OS / timeout errors as they
        come (the caller maps them with :func:`ingest.adapters.graphql.errors.map_errors`)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                connector=aiohttp.TCPConnector(ssl=self._ssl, keepalive_timeout=_KEEPALIVE_S),
            )
        sent = {"Accept": FHIR_JSON, **headers}
        data = None
        if body is not None:
            sent["Content-Type"] = FHIR_JSON
            data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        async with self._session.request(method, self.base + path, headers=sent, data=data) as resp:
            text = await resp.text()
            try:
                decoded = _loads(text) if text else None
            except ValueError:
                decoded = None
            return RestAnswer(resp.status, decoded, resp.headers.get("Retry-After"))

    async def close(self) -> None:
        """Close the session (idempotent)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
