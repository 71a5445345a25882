"""The GraphQL sink: the edge between ``ingest`` and a FHIR GraphQL backend (Medplum, the embedded one, ...).

One :class:`GraphQLSink` holds one gql session (:mod:`ingest.adapters.graphql.client`) for the life of the
process. At :meth:`GraphQLSink.connect` it introspects the backend once (or, for a backend that refuses
introspection, reads the SDL given as ``[backend] schema``) and fits its documents to what it finds
(:mod:`ingest.adapters.graphql.fit`). Then it finds, reads, creates and updates ImagingStudy resources
(the :class:`ingest.ports.Sink` port) and searches and creates the linked Patient and Endpoint resources.

Every document is validated locally against the schema. Every foreign error is mapped to
:mod:`ingest.errors` in one place (:func:`ingest.adapters.graphql.errors.map_errors`); backend messages
reach a log line above DEBUG or an exception message only redacted (docs/reliability.md).

Security: the bearer token (:mod:`ingest.adapters.graphql.token`) is re-read once on HTTP 401, sent only
as the ``Authorization`` header and never appears in a log line, an exception message or a repr. TLS
certificates are always verified (:func:`ingest.adapters.graphql.client.load_ca_bundle`).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NoReturn

from gql import GraphQLRequest
from gql.client import AsyncClientSession
from gql.utilities import build_client_schema, get_introspection_query_ast
from graphql import DocumentNode, GraphQLError, GraphQLSchema, build_schema, parse
from yarl import URL

from ingest.adapters.graphql.client import (
    PrintedRequest,
    RestAnswer,
    RestClient,
    ValidatingClient,
    cap_gql_loggers,
    connect,
    load_ca_bundle,
    make_client,
    recording,
    rest_base,
)
from ingest.adapters.graphql.errors import (
    Exchange,
    QueryErrors,
    UntrustedCertificateError,
    describe,
    http_error,
    map_errors,
    request_words,
    safe_id,
    schema_names,
)
from ingest.adapters.graphql.fit import (
    CREATE_FIELD,
    DEFAULT_MAX_DEPTH,
    LINKED_MAX_DEPTH,
    LIST_FIELD,
    READ_FIELD,
    UPDATE_FIELD,
    ResourceFit,
    SchemaFit,
    deeper_read,
    fit_resource,
    graft,
    prune_to,
    sentinel_paths,
    strip_typenames,
)
from ingest.adapters.graphql.fitcache import cached_fit
from ingest.adapters.graphql.token import ClientCredentialsToken, Secret, TokenSource
from ingest.core.records import BackendStudy
from ingest.core.terminology import STUDY_UID_SYSTEM
from ingest.errors import (
    ConfigError,
    ForeignContentError,
    MultipleMatchesError,
    PermanentSinkError,
    RetryableSinkError,
)

__all__ = [
    "GraphQLSink",
    "study_identifier",
]

LOGGER = logging.getLogger(__name__)

RESOURCE_TYPE: Final = "ImagingStudy"
SEARCH_COUNT: Final = 2  # two are enough to tell "one" from "several"
# resources the linked-resource resolvers read and create (Device, Organization, Provenance: [profile]
# write_linked, ingest.relay.links); a Provenance is searched by target, R4 gives it no identifier
LINKED_TYPES: Final = (
    "Patient", "Endpoint", "Device", "Organization", "Provenance", "ServiceRequest", "Encounter",
    "Practitioner",
)
_SEARCH_ARG: Final = {"Provenance": "target"}
_PROBE: Final = parse("query IngestProbe { __typename }")
#: Deeper reads of one resource before its read counts as incomplete (each goes DEEPER_BUDGET levels on).
MAX_DEEPER_READS: Final = 6
#: Paths ``prune`` drops from a backend copy that are not content (server-managed, or set by the sink).
_NOT_CONTENT: Final = frozenset({"resourceType", "id"})


def study_identifier(study_uid: str) -> str:
    """The FHIR search token for a study: ``urn:dicom:uid|urn:oid:<uid>`` (ImagingStudy.identifier).

    Parameters
    ----------
    study_uid:
        Study Instance UID (0020,000D).
    """
    return f"{STUDY_UID_SYSTEM}|urn:oid:{study_uid}"


def _strip_empty(value: Any) -> Any:
    """FHIR JSON has no ``null``, ``[]`` or ``{}``; GraphQL answers null for every absent selected field."""
    if isinstance(value, Mapping):
        out = {k: v for k, v in ((k, _strip_empty(v)) for k, v in value.items()) if v is not None}
        return out or None
    if isinstance(value, list):
        items = [v for v in (_strip_empty(v) for v in value) if v is not None]
        return items or None
    return value


class GraphQLSink:
    """A FHIR GraphQL backend holding ImagingStudy resources (implements :class:`ingest.ports.Sink`).

    Parameters
    ----------
    url:
        The GraphQL endpoint, e.g. ``https://medplum.example/fhir/R4/$graphql``.
    token_source:
        Where the bearer token comes from; ``None`` sends no ``Authorization`` header.
    timeout_s:
        Timeout of one HTTP request (connect + answer), seconds.
    schema:
        The backend schema as SDL, for backends that refuse introspection (``[backend] schema``, read by
        :func:`ingest.adapters.graphql.fit.load_schema_file`), or as the schema object the embedded
        backend serves; introspected when ``None``. A given schema is trusted: one ``{ __typename }``
        probe checks that the backend answers.
    max_depth:
        Nesting depth of the full-read selection below ImagingStudy.
    ca:
        A PEM CA bundle (``[backend] ca``) that the backend's TLS certificate is verified against *instead
        of* the system CA store; ``None``: the system store. Verification is never turned off.

    Examples
    --------
    >>> async with GraphQLSink(url, token_source=TokenSource(env="TOKEN"), timeout_s=30) as sink:
    ...     found = await sink.find(study_uid, None)
    """

    def __init__(
        self,
        url: str,
        *,
        token_source: TokenSource | None,
        timeout_s: float,
        schema: str | GraphQLSchema | None = None,
        max_depth: int = DEFAULT_MAX_DEPTH,
        ca: Path | None = None,
        oauth: ClientCredentialsToken | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ConfigError(f"backend timeout_s must be positive, got {timeout_s}")
        self.url = url
        self._ca = ca
        self._ssl: ssl.SSLContext | bool = load_ca_bundle(ca) if ca is not None else True
        self._names: frozenset[str] = frozenset()  # the schema's names (see redact_backend_message)
        self._token_source = token_source
        self._oauth = oauth  # [backend] token_url: an OAuth2 token, refreshed before it expires
        self._timeout_s = float(timeout_s)
        self._given_schema = schema
        self._max_depth = max_depth
        self._token: Secret | None = None
        self._client: ValidatingClient | None = None
        self._session: AsyncClientSession | None = None
        self._fit: SchemaFit | None = None
        self._printed: dict[int, tuple[DocumentNode, str]] = {}  # see PrintedRequest
        # backend id -> the elements of its last read copy that the update input type cannot carry
        self._unwritable: dict[str, list[str]] = {}
        # FHIR REST at the base ``$graphql`` belongs to, for copies GraphQL cannot send back whole; backend
        # id -> the versionId its REST read returned (the update goes by PUT with If-Match then)
        base = rest_base(url)
        self._rest = RestClient(base, ssl_context=self._ssl, timeout_s=self._timeout_s) if base else None
        self._rest_versions: dict[str, str | None] = {}
        self._deeper: dict[str, DocumentNode] = {}  # deeper-read documents by text, parsed once
        # Patient/Endpoint documents, fitted on first use (most configurations never link): type -> fit,
        # ``None`` when the backend's schema does not offer that type's operations
        self._linked: dict[str, ResourceFit | None] = {}
        cap_gql_loggers()

    def __repr__(self) -> str:
        state = "connected" if self._session is not None else "closed"
        return f"<GraphQLSink {_safe_url(self.url)} {state}>"

    @property
    def fit(self) -> SchemaFit:
        """The documents fitted at :meth:`connect`."""
        if self._fit is None:
            raise RetryableSinkError("the GraphQL sink is not connected")
        return self._fit

    async def __aenter__(self) -> GraphQLSink:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def connect(self) -> None:
        """Open the session, read the token, learn the schema and fit the documents.

        Raises
        ------
        ConfigError
            The token file is unreadable, the backend refuses introspection, or its schema lacks
            ImagingStudyList / ImagingStudyCreate / ImagingStudyUpdate.
        RetryableSinkError
            The backend cannot be reached now.
        """
        if self._session is not None:
            return
        self._token = self._token_source.read() if self._token_source is not None else None
        if self._oauth is not None:
            self._token = await self._oauth.current()
        self._client = make_client(self.url, ssl_context=self._ssl, timeout_s=self._timeout_s)
        # plain AsyncClientSession (reconnecting=False): gql retries nothing, the relay owns retries
        self._session = await connect(self._client)
        try:
            schema = await self._load_schema()
            self._names = schema_names(schema)
            self._client.schema = schema  # from now on gql validates every document locally
            self._fit = cached_fit(schema, max_depth=self._max_depth)  # validated once per schema
            self._client.trust(self._fit.documents.values())  # validated (now, or when first cached)
            self._linked = {}
        except BaseException:
            await self.aclose()
            raise
        LOGGER.info(
            "GraphQL backend %s: update takes res: %s; _count %s",
            _safe_url(self.url),
            self._fit.update_res_type,
            "supported" if self._fit.has_count else "not supported",
        )

    async def aclose(self) -> None:
        """Close the session (idempotent)."""
        client, self._client, self._session = self._client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close_async()  # type: ignore[no-untyped-call]
        if self._rest is not None:
            with contextlib.suppress(Exception):
                await self._rest.close()

    async def _load_schema(self) -> GraphQLSchema:
        if isinstance(self._given_schema, GraphQLSchema):  # the embedded backend's own schema
            await self._probe()
            return self._given_schema
        if self._given_schema is not None:
            try:
                schema = build_schema(self._given_schema)
            except (GraphQLError, TypeError) as exc:
                raise ConfigError(f"the configured backend schema SDL is invalid: {exc}") from exc
            await self._probe()
            return schema
        request = GraphQLRequest(
            get_introspection_query_ast(descriptions=False, input_value_deprecation=False)
        )
        try:
            data = await self._execute(request, what="schema introspection")
            return build_client_schema(data)  # type: ignore[arg-type]
        except UntrustedCertificateError as exc:
            raise ConfigError(str(exc)) from None
        except PermanentSinkError as exc:
            raise ConfigError(
                f"cannot learn the schema of {_safe_url(self.url)} by introspection: {exc} "
                "(if the backend refuses introspection, set [backend] schema to a file with its schema "
                "as SDL)"
            ) from None
        except (TypeError, KeyError, GraphQLError) as exc:
            raise ConfigError(
                f"the introspection answer of {_safe_url(self.url)} is not a schema: {describe(exc)}"
            ) from exc

    async def _probe(self) -> None:
        """One ``{ __typename }`` request when the schema was given: a wrong URL, CA or network shows at
        start, not at the first push. A backend that refuses the probe itself is only logged."""
        try:
            await self._execute(GraphQLRequest(_PROBE), what="backend probe")
        except UntrustedCertificateError as exc:
            raise ConfigError(str(exc)) from None
        except PermanentSinkError as exc:
            LOGGER.warning("the backend refused the start-up probe (continuing): %s", exc)

    # -- the Sink protocol ---------------------------------------------------------------------------

    async def probe(self) -> None:
        """One cheap request (``{ __typename }``): does the backend answer now? The relay asks this while
        pushes fail, to resume as soon as the backend is back.

        Raises
        ------
        RetryableSinkError, PermanentSinkError
            As any request.
        """
        from gql import gql as parse_document

        await self._execute(GraphQLRequest(parse_document("{ __typename }")), what="backend probe")

    async def find(self, study_uid: str, backend_id: str | None) -> BackendStudy | None:
        """The backend copy of a study: read ``backend_id`` (search if it is gone), else search.

        Parameters
        ----------
        study_uid:
            Study Instance UID (0020,000D); searched as ``ImagingStudy.identifier``
            ``urn:dicom:uid|urn:oid:<uid>``.
        backend_id:
            The ImagingStudy id stored from an earlier write, if any.

        Returns
        -------
        BackendStudy or None
            ``None`` when no resource carries the identifier.

        Raises
        ------
        MultipleMatchesError
            Two or more resources carry the identifier.
        RetryableSinkError, PermanentSinkError
        """
        fit = self.fit
        if backend_id is not None and fit.read is not None:
            what = f"read ImagingStudy/{backend_id} (study {study_uid})"
            try:
                data = await self._execute(
                    GraphQLRequest(fit.documents["read"], variable_values={"id": backend_id}), what=what
                )
            except QueryErrors as exc:
                if not exc.not_found:
                    raise
            else:
                found = data.get(READ_FIELD)
                if isinstance(found, Mapping):
                    return await self._whole(found, what)
            LOGGER.info("ImagingStudy/%s is gone from the backend; searching study %s", backend_id, study_uid)
        return await self._search(study_uid)

    async def _search(self, study_uid: str) -> BackendStudy | None:
        fit = self.fit
        what = f"search ImagingStudy for study {study_uid}"
        variables: dict[str, Any] = {"identifier": study_identifier(study_uid)}
        if fit.has_count:
            variables["count"] = SEARCH_COUNT
        data = await self._execute(
            GraphQLRequest(fit.documents["search"], variable_values=variables), what=what
        )
        found = data.get(LIST_FIELD)
        if found is None:
            return None  # Medplum answers null, not [], when nothing matches
        if not isinstance(found, list):
            raise PermanentSinkError(f"{what}: {LIST_FIELD} answered a {type(found).__name__}, not a list")
        matches = [m for m in found if isinstance(m, Mapping)]
        if len(matches) >= 2:
            ids = ", ".join(safe_id(m.get("id")) for m in matches)
            raise MultipleMatchesError(
                f"{what}: {len(matches)} or more ImagingStudy resources carry identifier "
                f"{study_identifier(study_uid)} ({ids}); refusing to guess"
            )
        return await self._whole(matches[0], what) if matches else None

    async def create(self, resource: dict[str, Any]) -> BackendStudy:
        """``ImagingStudyCreate(res:)``; returns the created resource as the backend holds it.

        Raises
        ------
        RetryableSinkError, PermanentSinkError
        """
        res = self._prepare(resource, backend_id=None)
        what = f"create ImagingStudy for {_uid_of(resource)}"
        data = await self._execute(
            GraphQLRequest(self.fit.documents["create"], variable_values={"res": res}), what=what
        )
        return self._written(res, data.get(CREATE_FIELD), what)

    async def update(self, backend_id: str, resource: dict[str, Any]) -> BackendStudy:
        """``ImagingStudyUpdate(id:, res:)`` with ``res.id = backend_id``; returns the new version.

        Raises
        ------
        RetryableSinkError, PermanentSinkError
        """
        what = f"update ImagingStudy/{backend_id} ({_uid_of(resource)})"
        if backend_id in self._rest_versions:
            return await self._rest_update(backend_id, resource, self._rest_versions.pop(backend_id), what)
        unwritable = self._unwritable.pop(backend_id, None)
        if unwritable:
            route = "" if self._rest is None else " and the backend offers no FHIR REST read of it"
            raise ForeignContentError(
                f"{what}: the backend copy holds {', '.join(unwritable)}, which "
                f"{self.fit.input_type.name} cannot carry{route}; an update through GraphQL would drop "
                "what another writer put there",
                reason="unwritable_content",
            )
        res = self._prepare(resource, backend_id=backend_id)
        data = await self._execute(
            GraphQLRequest(self.fit.documents["update"], variable_values={"id": backend_id, "res": res}),
            what=what,
        )
        return self._written(res, data.get(UPDATE_FIELD), what)

    # -- other resource types (Patient, Endpoint): ingest.relay.links -------------------------------------

    def supports(self, resource_type: str) -> bool:
        """Whether the backend schema offers ``<Type>List(identifier:)`` and ``<Type>Create(res:)``.

        Parameters
        ----------
        resource_type:
            ``"Patient"`` or ``"Endpoint"`` (the types fitted at :meth:`connect`).
        """
        return self._fit is not None and self._fitted(resource_type) is not None

    def _fitted(self, resource_type: str) -> ResourceFit | None:
        """The fit of a linked type, built on first use from the schema learnt at :meth:`connect`."""
        if resource_type not in LINKED_TYPES:
            return None
        if resource_type not in self._linked:
            depth = min(self._max_depth, LINKED_MAX_DEPTH)
            fitted = fit_resource(
                self.fit.schema, resource_type, max_depth=depth,
                search_arg=_SEARCH_ARG.get(resource_type, "identifier"),
            )
            if fitted is not None and self._client is not None:
                self._client.trust((fitted.search, fitted.create))  # validated by fit_resource
            self._linked[resource_type] = fitted
        return self._linked[resource_type]

    def _linked_fit(self, resource_type: str) -> ResourceFit:
        _ = self.fit  # raises when not connected
        fitted = self._fitted(resource_type)
        if fitted is None:
            raise PermanentSinkError(
                f"the backend schema has no usable {resource_type}List(identifier:) / "
                f"{resource_type}Create(res:)"
            )
        return fitted

    async def search_resources(
        self, resource_type: str, *, identifier: str, count: int = SEARCH_COUNT
    ) -> list[dict[str, Any]]:
        """``<Type>List(identifier:[, _count:])``: the resources carrying a token ``system|value``.

        Parameters
        ----------
        resource_type:
            ``"Patient"`` or ``"Endpoint"``.
        identifier:
            A FHIR token search value (``system|value``, escaped as FHIR search requires). It may hold
            patient data, so it never appears in a message.
        count:
            ``_count`` when the backend accepts it (at most this many resources are asked for).

        Returns
        -------
        list of dict
            FHIR JSON of each match (``[]`` when the backend answers ``null``).

        Raises
        ------
        RetryableSinkError, PermanentSinkError
        """
        fitted = self._linked_fit(resource_type)
        what = f"search {resource_type} by identifier"
        variables: dict[str, Any] = {"identifier": identifier}
        if fitted.has_count:
            variables["count"] = count
        data = await self._execute(GraphQLRequest(fitted.search, variable_values=variables), what=what)
        found = data.get(f"{resource_type}List")
        if found is None:
            return []  # Medplum answers null, not [], when nothing matches
        if not isinstance(found, list):
            raise PermanentSinkError(f"{what}: {resource_type}List answered a {type(found).__name__}")
        out: list[dict[str, Any]] = []
        for item in found:
            if isinstance(item, Mapping):
                resource = _strip_empty(item) or {}
                resource.setdefault("resourceType", resource_type)
                out.append(resource)
        return out

    async def create_resource(self, resource_type: str, resource: Mapping[str, Any]) -> dict[str, Any]:
        """``<Type>Create(res:)``; returns the created resource as the backend holds it.

        Parameters
        ----------
        resource_type:
            ``"Patient"`` or ``"Endpoint"``.
        resource:
            FHIR JSON; pruned to what the create input type accepts.

        Raises
        ------
        RetryableSinkError, PermanentSinkError
            Also when the backend answers without a resource id.
        """
        fitted = self._linked_fit(resource_type)
        what = f"create {resource_type}"
        res, dropped = prune_to(resource, fitted.create_input_type)
        if "resourceType" in fitted.create_input_type.fields:
            res["resourceType"] = resource_type
        if dropped:
            LOGGER.debug("pruned %d field(s) from %s: %s", len(dropped), what, ", ".join(dropped))
        data = await self._execute(GraphQLRequest(fitted.create, variable_values={"res": res}), what=what)
        found = data.get(f"{resource_type}Create")
        created = _strip_empty(found) if isinstance(found, Mapping) else None
        if not isinstance(created, dict) or not isinstance(created.get("id"), str) or not created["id"]:
            raise PermanentSinkError(f"{what}: the backend answered without a resource id")
        created.setdefault("resourceType", resource_type)
        return created

    # -- internals -----------------------------------------------------------------------------------

    async def _whole(self, found: Mapping[str, Any], what: str) -> BackendStudy:
        """The whole backend copy from a first read: read deeper where it stopped short, then check
        that an update could send every element back.

        The read selections have a finite depth and see ``contained`` only as type names: their cut-off
        fields are sentinels (:func:`ingest.adapters.graphql.fit.sentinel_paths`). While one is non-null,
        the paths below it are read again, deeper (:func:`ingest.adapters.graphql.fit.deeper_read`), and
        grafted in. A copy that is still incomplete after :data:`MAX_DEEPER_READS` reads, or that holds
        what the schema cannot return, raises ``ForeignContentError`` (``incomplete_read``): it is never
        merged or written. Elements the update input type cannot carry are remembered for :meth:`update`.

        Raises
        ------
        ForeignContentError
            ``incomplete_read``.
        RetryableSinkError
            The copy changed between two reads (its version differs, or the answers do not line up).
        """
        raw: dict[str, Any] = dict(found)
        rid = raw.get("id")
        version = _version(raw)
        for _ in range(MAX_DEEPER_READS):
            paths = sentinel_paths(raw)
            if not paths:
                break
            if not isinstance(rid, str) or not rid:
                raise PermanentSinkError(f"{what}: the backend's ImagingStudy has no id")
            text = deeper_read(self.fit.schema, paths)
            document = self._deeper.get(text)
            if document is None:
                document = self._deeper[text] = parse(text)
            deeper_what = f"{what}: deeper read of {len(paths)} element path(s)"
            LOGGER.debug("%s: %s", deeper_what, ", ".join(".".join(p) for p in paths))
            try:
                data = await self._execute(
                    GraphQLRequest(document, variable_values={"id": rid}), what=deeper_what
                )
            except PermanentSinkError as exc:
                raise ForeignContentError(
                    f"{what}: the backend copy holds content below the read's depth and the backend "
                    f"refused to return it: {exc}",
                    reason="incomplete_read",
                ) from None
            deep = data.get(READ_FIELD)
            if not isinstance(deep, Mapping) or _version(deep) != version or not graft(raw, deep):
                raise RetryableSinkError(f"{what}: the resource changed between two reads; reading again")
        else:
            if sentinel_paths(raw):
                raise ForeignContentError(
                    f"{what}: the backend copy is nested deeper than {MAX_DEEPER_READS} deeper reads "
                    "reach; it is not written, so nothing in it is lost",
                    reason="incomplete_read",
                )
        study = self._backend_study(strip_typenames(raw), what)
        _, dropped = self.fit.prune(study.resource)
        unwritable = [p for p in dropped if p not in _NOT_CONTENT and not p.startswith("meta.")]
        self._unwritable.pop(study.id, None)
        self._rest_versions.pop(study.id, None)
        if not unwritable:
            return study
        rest = await self._rest_read(study.id, what)
        if rest is None:
            self._unwritable[study.id] = unwritable
            return study
        LOGGER.info(
            "%s: the copy holds %s, which %s cannot carry; read and written by FHIR REST instead",
            what, ", ".join(unwritable), self.fit.input_type.name,
        )
        self._rest_versions[rest.id] = rest.version_id
        return rest

    async def _rest_call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> RestAnswer:
        """One FHIR REST request; on HTTP 401 the token is re-read once, as for GraphQL."""
        rest = self._rest
        if rest is None:
            raise PermanentSinkError(f"{what}: the backend URL names no FHIR base")
        withhold = request_words(body)
        for attempt in (1, 2):
            sent = await self._token_now()
            with map_errors(
                what, Exchange(), self._timeout_s, names=self._names, withhold=withhold, ca=self._ca
            ):
                answer = await rest.request(
                    method, path, headers={**self._headers(sent), **(headers or {})}, body=body
                )
            if answer.status == 401 and attempt == 1 and await self._reload_token(sent):
                LOGGER.info("%s: HTTP 401, token re-read from its source; resending", what)
                continue
            return answer
        raise AssertionError("unreachable")  # pragma: no cover

    async def _rest_read(self, backend_id: str, what: str) -> BackendStudy | None:
        """``GET [base]/ImagingStudy/<id>``: the copy as FHIR JSON, whole; ``None`` without a REST route."""
        if self._rest is None:
            return None
        path, rest_what = f"{RESOURCE_TYPE}/{backend_id}", f"{what}: FHIR REST read"
        answer = await self._rest_call("GET", path, what=rest_what)
        if answer.status in (404, 405, 410, 501):
            return None
        if answer.status != 200:
            raise http_error(what, answer.status, answer.body, answer.retry_after, names=self._names)
        body = answer.body
        if not isinstance(body, dict) or (body.get("resourceType"), body.get("id")) != (
            RESOURCE_TYPE, backend_id
        ):
            return None
        return self._backend_study(body, what)

    async def _rest_update(
        self, backend_id: str, resource: Mapping[str, Any], version: str | None, what: str
    ) -> BackendStudy:
        """``PUT [base]/ImagingStudy/<id>`` with ``If-Match`` on the version read: another writer's change
        in between is never overwritten (HTTP 409/412: retried, so the copy is read again)."""
        body = {**resource, "resourceType": RESOURCE_TYPE, "id": backend_id}
        meta = body.get("meta")
        if isinstance(meta, Mapping):  # the server's bookkeeping is not ours to send
            body["meta"] = {k: v for k, v in meta.items() if k in ("profile", "security", "tag")}
        headers = {"If-Match": f'W/"{version}"'} if version else {}
        rest_what = f"{what}: FHIR REST update"
        answer = await self._rest_call(
            "PUT", f"{RESOURCE_TYPE}/{backend_id}", what=rest_what, body=body, headers=headers
        )
        if answer.status in (409, 412):
            raise RetryableSinkError(
                f"{rest_what}: the backend copy changed since it was read (HTTP {answer.status}); "
                "it is read again", code=answer.status,
            )
        if answer.status not in (200, 201):
            raise http_error(
                rest_what, answer.status, answer.body, answer.retry_after, names=self._names,
                withhold=request_words(body),
            )
        found = answer.body if isinstance(answer.body, Mapping) else {}
        return self._backend_study({**body, **found}, rest_what)

    def _prepare(self, resource: Mapping[str, Any], *, backend_id: str | None) -> dict[str, Any]:
        fit = self.fit
        res, dropped = fit.prune(resource, for_create=backend_id is None)
        input_type = fit.create_input_type if backend_id is None else fit.input_type
        if "resourceType" in input_type.fields:
            res["resourceType"] = RESOURCE_TYPE  # Medplum refuses res without it ("Invalid resourceType")
        if backend_id is not None and "id" in input_type.fields:
            res["id"] = backend_id  # Medplum: res.id must equal the id argument
        if dropped:
            LOGGER.debug(
                "pruned %d field(s) that %s does not accept: %s",
                len(dropped),
                input_type.name,
                ", ".join(dropped),
            )
        return res

    def _written(self, sent: Mapping[str, Any], found: Any, what: str) -> BackendStudy:
        """What the backend now holds: the resource we sent with the id and meta it answered."""
        if not isinstance(found, Mapping):
            raise PermanentSinkError(f"{what}: the backend answered without a resource")
        return self._backend_study({**sent, **found}, what)

    @staticmethod
    def _backend_study(found: Mapping[str, Any], what: str) -> BackendStudy:
        resource = _strip_empty(found) or {}
        rid = resource.get("id")
        if not isinstance(rid, str) or not rid:
            raise PermanentSinkError(f"{what}: the backend's ImagingStudy has no id")
        resource.setdefault("resourceType", RESOURCE_TYPE)
        meta = resource.get("meta")
        version = meta.get("versionId") if isinstance(meta, Mapping) else None
        return BackendStudy(
            id=rid, version_id=str(version) if version is not None else None, resource=resource
        )

    def _headers(self, token: Secret | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token.reveal()}"} if token is not None else {}

    async def _execute(self, request: GraphQLRequest, *, what: str) -> dict[str, Any]:
        """Send one request; on HTTP 401 re-read the token once and resend at once if it changed."""
        withhold = request_words(request.variable_values)  # what a backend message may quote back
        request = PrintedRequest(request, self._printed)
        for attempt in (1, 2):
            if self._session is None:
                raise RetryableSinkError(f"{what}: the GraphQL sink is not connected")
            sent = await self._token_now()
            with recording() as exchange:
                try:
                    with map_errors(
                        what, exchange, self._timeout_s, names=self._names, withhold=withhold, ca=self._ca
                    ):
                        result = await self._session.execute(
                            request, extra_args={"headers": self._headers(sent)}
                        )
                    return result
                except RetryableSinkError as exc:
                    if exc.code != 401:
                        raise
                    if attempt == 1 and await self._reload_token(sent):
                        LOGGER.info("%s: HTTP 401, token re-read from its source; resending", what)
                        continue
                    self._unauthorized(what, exc, sent)
        raise AssertionError("unreachable")  # pragma: no cover

    def _unauthorized(self, what: str, exc: RetryableSinkError, sent: Secret | None) -> NoReturn:
        if sent is None:  # nothing was sent: say where a token would come from
            names = [f"[backend] token_env {self._token_source.env} is unset or empty"
                     if self._token_source is not None and self._token_source.env else "",
                     f"[backend] token_file {self._token_source.file} is empty"
                     if self._token_source is not None and self._token_source.file else ""]
            where = "; ".join(n for n in names if n) or "no token source is configured"
            raise RetryableSinkError(
                f"{what}: unauthorized (HTTP 401): no token was sent ({where})", code=401
            ) from exc
        how = "a fresh OAuth2 token" if self._oauth is not None else "re-reading the token"
        raise RetryableSinkError(f"{what}: unauthorized (HTTP 401) even after {how}", code=401) from exc

    async def _token_now(self) -> Secret | None:
        """The token to send: the OAuth2 token (fetched again when close to expiry), else the one read."""
        if self._oauth is not None:
            self._token = await self._oauth.current()
        return self._token

    async def _reload_token(self, sent: Secret | None) -> bool:
        """Re-read the token; ``True`` when the token to use now differs from the one just rejected."""
        if self._oauth is not None:
            self._token = await self._oauth.current(refresh=True)
            return self._token != sent
        if self._token_source is None:
            return False
        try:
            fresh = self._token_source.read()
        except ConfigError as exc:
            LOGGER.warning("cannot re-read the backend token: %s", exc)
            return False
        self._token = fresh
        return fresh != sent


def _version(resource: Mapping[str, Any]) -> Any:
    meta = resource.get("meta")
    return meta.get("versionId") if isinstance(meta, Mapping) else None


def _uid_of(resource: Mapping[str, Any]) -> str:
    """The Study Instance UID from ``ImagingStudy.identifier`` (for messages), or ``"unknown study"``."""
    for ident in resource.get("identifier") or []:
        if isinstance(ident, Mapping) and ident.get("system") == STUDY_UID_SYSTEM:
            return f"study {str(ident.get('value', '')).removeprefix('urn:oid:')}"
    return "unknown study"


def _safe_url(url: str) -> str:
    """The URL without userinfo, query or fragment (they may carry credentials)."""
    try:
        u = URL(url)
        return str(u.with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return "<backend url>"
