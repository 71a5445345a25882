"""The GraphQL sink: the edge between ``ingest`` and a FHIR GraphQL backend (Medplum, the embedded one, ...).

One :class:`GraphQLSink` holds one gql session (``AIOHTTPTransport``) for the life of the process. At
:meth:`GraphQLSink.connect` it introspects the backend once (or, for a backend that refuses
introspection, reads the SDL given as ``[backend] schema``) and *fits* its documents to what it finds
(:func:`fit_schema`):

- the update mutation's ``res`` argument type is read from the schema (Medplum:
  ``ImagingStudyUpdate(id: ID!, res: ImagingStudyCreate!)``; the FHIR GraphQL spec: ``res: ImagingStudy``),
- the selection set that reads a *full* ImagingStudy is built from the output type (every field, object
  fields recursively up to ``max_depth``; fields with required arguments, union/interface fields such as
  ``Reference.resource`` and nested resources such as Medplum's reverse-lookup ``...List`` fields are
  skipped),
- resources are pruned to the fields the input type accepts before they are sent (:meth:`SchemaFit.prune`).

Every document is validated locally against the introspected schema (gql does it once the client has
a schema). Every foreign error (gql, aiohttp, asyncio timeouts, graphql-core validation) is mapped to
:mod:`ingest.errors` in one place, :func:`_map_errors`; this is the only module that imports them.
gql's own retries are off (a plain ``AsyncClientSession``): the relay owns the retry policy.

Security: the bearer token comes from an environment variable or a file (re-read once on HTTP 401), is
sent only as the ``Authorization`` header and never appears in a log line, an exception message or a
repr. gql logs whole requests and responses (patient data) at DEBUG, so its loggers are capped at WARNING.
TLS certificates are always verified, against the system CA store or, with ``[backend] ca``, against
that PEM bundle only (:func:`load_ca_bundle`).

Backend messages may quote the request, i.e. patient data (graphql-js "got invalid value", HAPI's
"Error was: ...", Jackson's "from String ...", servers that echo the query and its variables). They
reach a log line above DEBUG, an exception message (and so the state store's ``last_error`` and
``ingest status``) only through :func:`redact_backend_message`, an allow-list that keeps rule words,
codes, element paths and schema names and withholds everything else; the whole message is logged at
DEBUG only (see docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import os
import re
import ssl
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace, TracebackType
from typing import Any, Final, NoReturn

import aiohttp
from gql import Client, GraphQLRequest
from gql.client import AsyncClientSession
from gql.transport.aiohttp import AIOHTTPTransport
from gql.transport.exceptions import (
    TransportClosed,
    TransportConnectionFailed,
    TransportError,
    TransportProtocolError,
    TransportQueryError,
    TransportServerError,
)
from gql.utilities import build_client_schema, get_introspection_query_ast
from graphql import (
    DocumentNode,
    GraphQLError,
    GraphQLField,
    GraphQLInputObjectType,
    GraphQLInputType,
    GraphQLList,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLSchema,
    build_schema,
    get_named_type,
    is_input_object_type,
    is_leaf_type,
    is_object_type,
    is_required_argument,
    parse,
    print_ast,
    validate,
)
from yarl import URL

from ingest.errors import ConfigError, MultipleMatchesError, PermanentSinkError, RetryableSinkError, SinkError
from ingest.ports import BackendStudy

__all__ = [
    "GraphQLSink",
    "ResourceFit",
    "SchemaFit",
    "TokenSource",
    "fit_resource",
    "fit_schema",
    "load_ca_bundle",
    "load_schema_file",
    "redact_backend_message",
    "schema_names",
    "study_identifier",
]

LOGGER = logging.getLogger(__name__)

RESOURCE_TYPE: Final = "ImagingStudy"
STUDY_SYSTEM: Final = "urn:dicom:uid"  # ImagingStudy.identifier.system for the Study Instance UID
READ_FIELD: Final = "ImagingStudy"
LIST_FIELD: Final = "ImagingStudyList"
CREATE_FIELD: Final = "ImagingStudyCreate"
UPDATE_FIELD: Final = "ImagingStudyUpdate"
DEFAULT_MAX_DEPTH: Final = 7
SEARCH_COUNT: Final = 2  # two are enough to tell "one" from "several"
_MAX_PRINTED: Final = 64  # query texts kept per sink (the fitted documents are a handful)
_KEEPALIVE_S: Final = 2.0  # client keep-alive: shorter than common server idle timeouts (Node: 5 s)
LINKED_TYPES: Final = ("Patient", "Endpoint")  # resources the linked-resource resolvers read and create
# Patient/Endpoint are only searched and created, never merged: a shallow selection (identifier, name with
# its extensions, address, ...) is enough and keeps the documents small (validation cost grows with size).
LINKED_MAX_DEPTH: Final = 3
_PROBE: Final = parse("query IngestProbe { __typename }")

# gql logs full variables and responses (PHI) at DEBUG; these loggers never go below WARNING.
_GQL_LOGGERS: Final = ("gql", "gql.client", "gql.transport", "gql.transport.aiohttp", "gql.dsl")

# Meta elements a client may set (FHIR R4 Meta): kept so that an update does not strip security labels
# or tags; everything else in ``meta`` (versionId, lastUpdated, server bookkeeping) is server-managed.
_CLIENT_META: Final = frozenset({"profile", "security", "tag"})

_NOT_FOUND_RE: Final = re.compile(r"\b(not found|gone|deleted)\b", re.IGNORECASE)


def study_identifier(study_uid: str) -> str:
    """The FHIR search token for a study: ``urn:dicom:uid|urn:oid:<uid>`` (ImagingStudy.identifier).

    Parameters
    ----------
    study_uid:
        Study Instance UID (0020,000D).
    """
    return f"{STUDY_SYSTEM}|urn:oid:{study_uid}"


# --------------------------------------------------------------------------------------------------------
# The bearer token


class _Secret:
    """A string that never shows itself in a repr, a str() or a log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class TokenSource:
    """Where the backend bearer token comes from: a file (preferred when both are set) or an env variable.

    Only the *names* are held here, never the token, so a repr is safe to log.

    Parameters
    ----------
    env:
        Name of the environment variable holding the token.
    file:
        Path of a file holding the token (surrounding whitespace is ignored); re-read on HTTP 401, so a
        rotated token is picked up without a restart.
    """

    env: str | None = None
    file: Path | None = None

    def read(self) -> _Secret | None:
        """Read the token now; ``None`` when no source holds one.

        Raises
        ------
        ConfigError
            When the token file cannot be read (the message names the file, never its content).
        """
        if self.file is not None:
            try:
                text = self.file.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"cannot read the backend token file {self.file}: {type(exc).__name__}"
                ) from None
            if text:
                return _Secret(text)
        if self.env:
            value = os.environ.get(self.env, "").strip()
            if value:
                return _Secret(value)
        return None


# --------------------------------------------------------------------------------------------------------
# Fitting the documents to the backend schema


def _unwrap_nullable(t: Any) -> Any:
    return t.of_type if isinstance(t, GraphQLNonNull) else t


def _is_resource(t: GraphQLObjectType) -> bool:
    """A FHIR resource type (has ``resourceType``): nested ones are reverse lookups or embedded resources."""
    return "resourceType" in t.fields


_EXTENSION_BUDGET: Final = 2


class _SelectionBuilder:
    """Named fragments per (object type, remaining depth): linear in size, no fragment cycles."""

    def __init__(self) -> None:
        self.fragments: dict[str, str] = {}

    def fragment(self, t: GraphQLObjectType, budget: int) -> str | None:
        name = f"D{budget}_{t.name}"
        if name in self.fragments:
            return name
        parts: list[str] = []
        for fname, fdef in t.fields.items():
            if fname.startswith("__") or any(is_required_argument(a) for a in fdef.args.values()):
                continue  # e.g. Medplum's reverse lookups ``ObservationList(_reference: ...!)``
            named = get_named_type(fdef.type)
            if is_leaf_type(named):
                parts.append(fname)
            elif isinstance(named, GraphQLObjectType) and budget > 0 and not _is_resource(named):
                sub_budget = budget - 1
                if named.name == "Extension":
                    # Every FHIR datatype has ``extension`` and Extension has ~50 value[x] datatypes: read
                    # extensions only two levels deep (url, primitive values, codings, nested extension
                    # urls/primitives), or the document grows to tens of kilobytes and every backend parse
                    # and validation of it costs hundreds of milliseconds.
                    sub_budget = min(sub_budget, _EXTENSION_BUDGET)
                sub = self.fragment(named, sub_budget)
                if sub is not None:
                    parts.append(f"{fname} {{ ...{sub} }}")
            # union/interface fields (Reference.resource, contained) and nested resources are skipped
        if not parts:
            return None
        self.fragments[name] = f"fragment {name} on {t.name} {{ {' '.join(parts)} }}"
        return name


@dataclass(frozen=True)
class SchemaFit:
    """The documents and input type fitted to one backend schema (built by :func:`fit_schema`).

    Attributes
    ----------
    read:
        ``ImagingStudy(id:)`` full read, or ``None`` when the backend has no read-by-id field.
    search:
        ``ImagingStudyList(identifier:[, _count:])`` returning full resources.
    create, update:
        The two mutations, ``res`` typed as the schema says.
    input_type:
        The input object type of the update's ``res`` argument (what :meth:`prune` keeps).
    has_count:
        Whether ``ImagingStudyList`` accepts ``_count``.
    """

    schema: GraphQLSchema
    read: str | None
    search: str
    create: str
    update: str
    input_type: GraphQLInputObjectType
    create_input_type: GraphQLInputObjectType
    has_count: bool
    documents: Mapping[str, DocumentNode] = field(repr=False)

    @property
    def update_res_type(self) -> str:
        """The declared type of the update's ``$res`` variable (e.g. ``ImagingStudyCreate!``)."""
        mutation = self.schema.mutation_type
        assert mutation is not None
        return str(mutation.fields[UPDATE_FIELD].args["res"].type)

    def prune(
        self, resource: Mapping[str, Any], *, for_create: bool = False
    ) -> tuple[dict[str, Any], list[str]]:
        """Keep only what the input type accepts, recursively; ``None`` values are dropped.

        Parameters
        ----------
        resource:
            FHIR JSON of an ImagingStudy.
        for_create:
            Prune against the create mutation's input type instead of the update's.

        Returns
        -------
        tuple
            The pruned copy, and the sorted dotted paths that were dropped (names only, never values).
        """
        input_type = self.create_input_type if for_create else self.input_type
        dropped: set[str] = set()
        out: dict[str, Any] = {}
        for key, value in resource.items():
            if key == "meta" and isinstance(value, Mapping):  # ImagingStudy.meta: server-managed parts out
                dropped.update(f"meta.{k}" for k in value if k not in _CLIENT_META)
                value = {k: v for k, v in value.items() if k in _CLIENT_META}
                if not value:
                    continue
            fdef = input_type.fields.get(key)
            if fdef is None:
                dropped.add(key)
                continue
            kept = _prune_value(value, fdef.type, key, dropped)
            if kept is not None:
                out[key] = kept
        return out, sorted(dropped)


def _prune_to(
    resource: Mapping[str, Any], input_type: GraphQLInputObjectType
) -> tuple[dict[str, Any], list[str]]:
    """``resource`` without what ``input_type`` does not accept (and without server-managed ``meta``)."""
    dropped: set[str] = set()
    source = {k: v for k, v in resource.items() if k not in ("meta", "id")}
    pruned = _prune_value(source, input_type, "", dropped)
    return (pruned if isinstance(pruned, dict) else {}), sorted(p.lstrip(".") for p in dropped)


def _prune_value(value: Any, t: GraphQLInputType, path: str, dropped: set[str]) -> Any:
    t = _unwrap_nullable(t)
    if value is None:
        return None
    if isinstance(t, GraphQLList):
        if not isinstance(value, list):
            return value  # let the backend say what is wrong with it
        items = [_prune_value(v, t.of_type, f"{path}[]", dropped) for v in value]
        return [v for v in items if v is not None]
    if isinstance(t, GraphQLInputObjectType) and isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            fdef = t.fields.get(key)
            if fdef is None:
                dropped.add(f"{path}.{key}")
                continue
            kept = _prune_value(sub, fdef.type, f"{path}.{key}", dropped)
            if kept is not None:
                out[key] = kept
        return out
    return value


def _field(parent: GraphQLObjectType | None, name: str, *, required: bool = True) -> GraphQLField | None:
    f = parent.fields.get(name) if parent is not None else None
    if f is None and required:
        kind = "query" if name in (READ_FIELD, LIST_FIELD) else "mutation"
        raise ConfigError(
            f"the backend schema has no {kind} field {name}; ingest needs {LIST_FIELD}, {CREATE_FIELD} "
            f"and {UPDATE_FIELD} (a FHIR GraphQL server exposing ImagingStudy)"
        )
    return f


def _args_for(fdef: GraphQLField, fname: str, supplied: set[str]) -> None:
    for aname in supplied:
        if aname not in fdef.args:
            raise ConfigError(f"the backend's {fname} has no argument {aname!r}; cannot fit the document")
    for aname, arg in fdef.args.items():
        if aname not in supplied and is_required_argument(arg):
            raise ConfigError(
                f"the backend's {fname} requires argument {aname!r}, which ingest cannot supply"
            )


def _input_object(fdef: GraphQLField, fname: str) -> GraphQLInputObjectType:
    named = get_named_type(fdef.args["res"].type)
    if not is_input_object_type(named):
        raise ConfigError(f"the backend's {fname}(res:) is not an input object type ({named})")
    assert isinstance(named, GraphQLInputObjectType)
    return named


def _object_of(fdef: GraphQLField, fname: str) -> GraphQLObjectType:
    named = get_named_type(fdef.type)
    if not is_object_type(named):
        raise ConfigError(f"the backend's {fname} does not return an object type ({named})")
    assert isinstance(named, GraphQLObjectType)
    return named


def fit_schema(schema: GraphQLSchema, *, max_depth: int = DEFAULT_MAX_DEPTH) -> SchemaFit:
    """Build the documents for one backend schema; pure (no I/O).

    Parameters
    ----------
    schema:
        The backend schema (introspected or built from SDL).
    max_depth:
        How many levels of nested object types below ImagingStudy the full read selects.

    Returns
    -------
    SchemaFit

    Raises
    ------
    ConfigError
        When the schema lacks ``ImagingStudyList``, ``ImagingStudyCreate`` or ``ImagingStudyUpdate``, their
        arguments do not fit, or a built document does not validate against the schema.
    """
    query, mutation = schema.query_type, schema.mutation_type
    list_f = _field(query, LIST_FIELD)
    read_f = _field(query, READ_FIELD, required=False)
    create_f = _field(mutation, CREATE_FIELD)
    update_f = _field(mutation, UPDATE_FIELD)
    assert list_f is not None and create_f is not None and update_f is not None

    has_count = "_count" in list_f.args
    _args_for(list_f, LIST_FIELD, {"identifier", "_count"} if has_count else {"identifier"})
    _args_for(create_f, CREATE_FIELD, {"res"})
    _args_for(update_f, UPDATE_FIELD, {"id", "res"})
    if read_f is not None and "id" not in read_f.args:
        read_f = None  # a read field we cannot call: search instead

    builder = _SelectionBuilder()

    def selection(fdef: GraphQLField, fname: str) -> str:
        name = builder.fragment(_object_of(fdef, fname), max_depth)
        if name is None:
            raise ConfigError(f"the backend's {fname} returns a type without selectable fields")
        return f"{{ ...{name} }}"

    def written_selection(fdef: GraphQLField, fname: str) -> str:
        # A write only needs the new id and version back (the content is what we sent); asking for the
        # whole resource makes the backend serialise it again for nothing.
        out = _object_of(fdef, fname)
        meta = get_named_type(out.fields["meta"].type) if "meta" in out.fields else None
        if "id" in out.fields and isinstance(meta, GraphQLObjectType) and "versionId" in meta.fields:
            last = " lastUpdated" if "lastUpdated" in meta.fields else ""
            return f"{{ id meta {{ versionId{last} }} }}"
        return selection(fdef, fname)

    def arg_type(fdef: GraphQLField, aname: str) -> str:
        return str(fdef.args[aname].type)

    ops: dict[str, str] = {}
    if read_f is not None:
        ops["read"] = (
            f"query ReadImagingStudy($id: {arg_type(read_f, 'id')}) "
            f"{{ {READ_FIELD}(id: $id) {selection(read_f, READ_FIELD)} }}"
        )
    count_var = f", $count: {arg_type(list_f, '_count')}" if has_count else ""
    count_arg = ", _count: $count" if has_count else ""
    ops["search"] = (
        f"query FindImagingStudy($identifier: {arg_type(list_f, 'identifier')}{count_var}) "
        f"{{ {LIST_FIELD}(identifier: $identifier{count_arg}) {selection(list_f, LIST_FIELD)} }}"
    )
    ops["create"] = (
        f"mutation CreateImagingStudy($res: {arg_type(create_f, 'res')}) "
        f"{{ {CREATE_FIELD}(res: $res) {written_selection(create_f, CREATE_FIELD)} }}"
    )
    ops["update"] = (
        f"mutation UpdateImagingStudy($id: {arg_type(update_f, 'id')}, $res: {arg_type(update_f, 'res')}) "
        f"{{ {UPDATE_FIELD}(id: $id, res: $res) {written_selection(update_f, UPDATE_FIELD)} }}"
    )

    texts = {key: op + "\n" + "\n".join(_used_fragments(op, builder.fragments)) for key, op in ops.items()}
    documents = _parse_and_validate(schema, ops, builder.fragments)
    if documents is None:  # say which document does not validate
        for key, text in texts.items():
            errors = validate(schema, parse(text))
            if errors:
                raise ConfigError(
                    f"the {key} document does not validate against the backend schema: {errors[0]}"
                )
        raise ConfigError("the fitted documents do not validate together against the backend schema")
    return SchemaFit(
        schema=schema,
        read=texts.get("read"),
        search=texts["search"],
        create=texts["create"],
        update=texts["update"],
        input_type=_input_object(update_f, UPDATE_FIELD),
        create_input_type=_input_object(create_f, CREATE_FIELD),
        has_count=has_count,
        documents=documents,
    )


def _parse_and_validate(
    schema: GraphQLSchema, ops: Mapping[str, str], fragments: Mapping[str, str]
) -> dict[str, DocumentNode] | None:
    """Each operation of ``ops`` as its own document (the operation, then the fragments it uses, sorted by
    name, as :func:`_used_fragments` lists them); ``None`` when they do not validate against ``schema``.

    The operations share most of their (large) fragments: all of them are parsed and validated as one
    document, which costs about what one of them alone does. A document holding the operations (distinct
    names) and exactly the fragments they use is valid if and only if each operation with the fragments
    it uses is: every validation rule looks at one operation and what it reaches, or at names that are
    unique in either case.
    """
    used = {key: _used_names(op, fragments) for key, op in ops.items()}
    names = sorted(set().union(*used.values()))
    combined = parse("\n".join([*ops.values(), *(fragments[n] for n in names)]))
    if validate(schema, combined):
        return None
    definitions = list(combined.definitions)
    operations = dict(zip(ops, definitions[: len(ops)], strict=True))
    by_name = dict(zip(names, definitions[len(ops) :], strict=True))
    return {
        key: DocumentNode(definitions=(operations[key], *(by_name[n] for n in sorted(used[key]))))
        for key in ops
    }


def _used_names(text: str, fragments: Mapping[str, str]) -> list[str]:
    """The names of the fragments ``text`` reaches (transitively)."""
    seen: list[str] = []
    todo = re.findall(r"\.\.\.(\w+)", text)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        todo.extend(re.findall(r"\.\.\.(\w+)", fragments[name]))
    return seen


def _used_fragments(text: str, fragments: Mapping[str, str]) -> list[str]:
    """The fragment definitions ``text`` reaches (transitively); unused ones would fail validation."""
    return [fragments[n] for n in sorted(_used_names(text, fragments))]


@dataclass(frozen=True)
class ResourceFit:
    """Search-by-identifier and create documents for one more resource type (Patient, Endpoint).

    Built by :func:`fit_resource` the same way :func:`fit_schema` builds ImagingStudy's.

    Attributes
    ----------
    resource_type:
        The FHIR resource type, e.g. ``"Patient"``.
    search, create:
        ``<Type>List(identifier:[, _count:])`` and ``<Type>Create(res:)``, selecting full resources.
    create_input_type:
        The input object type of the create's ``res`` argument (what resources are pruned to).
    has_count:
        Whether ``<Type>List`` accepts ``_count``.
    """

    resource_type: str
    search: DocumentNode = field(repr=False)
    create: DocumentNode = field(repr=False)
    create_input_type: GraphQLInputObjectType
    has_count: bool


def fit_resource(
    schema: GraphQLSchema, resource_type: str, *, max_depth: int = LINKED_MAX_DEPTH
) -> ResourceFit | None:
    """Fit the identifier search and the create mutation of ``resource_type`` to a backend schema; pure.

    Parameters
    ----------
    schema:
        The backend schema (introspected or built from SDL).
    resource_type:
        A FHIR resource type the backend may expose, e.g. ``"Patient"`` or ``"Endpoint"``.
    max_depth:
        How many levels of nested object types the selection reads.

    Returns
    -------
    ResourceFit or None
        ``None`` when the schema has no ``<Type>List(identifier:)`` or ``<Type>Create(res:)``, or when
        they take arguments ingest cannot supply; callers that need the type refuse to start then.
    """
    list_name, create_name = f"{resource_type}List", f"{resource_type}Create"
    query, mutation = schema.query_type, schema.mutation_type
    list_f = query.fields.get(list_name) if query is not None else None
    create_f = mutation.fields.get(create_name) if mutation is not None else None
    if list_f is None or create_f is None or "identifier" not in list_f.args:
        return None
    has_count = "_count" in list_f.args
    try:
        _args_for(list_f, list_name, {"identifier", "_count"} if has_count else {"identifier"})
        _args_for(create_f, create_name, {"res"})
        input_type = _input_object(create_f, create_name)
        builder = _SelectionBuilder()
        selected = builder.fragment(_object_of(list_f, list_name), max_depth)
        created = builder.fragment(_object_of(create_f, create_name), max_depth)
    except ConfigError as exc:
        LOGGER.info("the backend's %s operations do not fit: %s", resource_type, exc)
        return None
    if selected is None or created is None:
        return None
    count_var = f", $count: {list_f.args['_count'].type}" if has_count else ""
    count_arg = ", _count: $count" if has_count else ""
    ops = {
        "search": (
            f"query Find{resource_type}($identifier: {list_f.args['identifier'].type}{count_var}) "
            f"{{ {list_name}(identifier: $identifier{count_arg}) {{ ...{selected} }} }}"
        ),
        "create": (
            f"mutation Create{resource_type}($res: {create_f.args['res'].type}) "
            f"{{ {create_name}(res: $res) {{ ...{created} }} }}"
        ),
    }
    documents: dict[str, DocumentNode] = {}
    for key, op in ops.items():
        doc = parse(op + "\n" + "\n".join(_used_fragments(op, builder.fragments)))
        errors = validate(schema, doc)
        if errors:
            LOGGER.info("the %s %s document does not validate: %s", resource_type, key, errors[0])
            return None
        documents[key] = doc
    return ResourceFit(
        resource_type=resource_type,
        search=documents["search"],
        create=documents["create"],
        create_input_type=input_type,
        has_count=has_count,
    )


# --------------------------------------------------------------------------------------------------------
# Error mapping (the only place foreign errors become ingest errors)


@dataclass
class _Exchange:
    """What one HTTP exchange showed us beyond what gql reports (filled in by hooks, per request)."""

    status: int | None = None
    retry_after: str | None = None
    body: Any = None


_EXCHANGE: ContextVar[_Exchange | None] = ContextVar("ingest_graphql_exchange", default=None)


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


class _QueryErrors(PermanentSinkError):
    """HTTP 200 with ``errors[]``: the backend executed the request and refused it."""

    def __init__(self, message: str, messages: tuple[str, ...]) -> None:
        super().__init__(message)
        self.messages = messages

    @property
    def not_found(self) -> bool:
        return bool(self.messages) and all(_NOT_FOUND_RE.search(m) for m in self.messages)


# --------------------------------------------------------------------------------------------------------
# Backend messages: an allow-list redaction (they may quote the request, i.e. patient data)

#: What stands in for everything in a backend message that is not known to be safe.
PLACEHOLDER: Final = "«…»"
_MAX_REDACTED: Final = 400  # characters of one redacted message (``ingest status`` shows 120)

# Words a backend's error wording is made of (compared lower-cased; an ALL-CAPS token must be in
# _UPPER_WORDS instead, so a DICOM name like DOE or a code like MRI never matches). Nothing here is a
# plausible value of a patient, a study or a physician on its own.
_RULE_WORDS_TEXT: Final = """
    a about accept accepted accepts after against allowed already also an and any are argument arguments
    array as at attribute attributes bad be been before body boolean both but by can cannot can't
    canonical cardinality character characters class code coding column comma constraint constraints
    contain contained contains content could data date datetime decimal declared defined deleted
    deserialize did didn't directive disabled does doesn't either element elements empty encoded end
    endpoint entries enum error errors exceeds executing expected expecting expression extension
    extensions failed failure false field fields for forbidden format found from gone got graphql has
    have id identifier imagingstudy in incorrect input instant integer internal introspection invalid
    invariant is isn't it its json length line list match matches maximum mean met minimum missing more
    must mutation no non non-null not null number object of on one only operation operationoutcome or
    out parse parsing parameter path patient positiveint position processing profile property provided
    query reason reference referenced represent request required requested resource resourcetype rule
    schema separate server should source string structure such supported syntax than that the this time
    to token type types unexpected unknown unrecognized unterminated unsignedint unsupported uri url uuid
    valid validation value values variable variables was were when which while with without you
"""
_RULE_WORDS: Final = frozenset(_RULE_WORDS_TEXT.split())
_UPPER_WORDS: Final = frozenset({"FHIR", "HTTP", "ID", "JSON", "UNKNOWN", "URI", "URL", "UTF-8", "XML"})
# A quoted string right after one of these words names a part of the request (a field, a type, a path),
# not a value: kept when it also looks like a name.
_NAMING_WORDS: Final = frozenset(
    {
        "argument", "attribute", "class", "directive", "element", "enum", "field", "fields", "input",
        "mean", "operation", "parameter", "property", "type", "variable",
    }
)
_NUMBER_WORDS: Final = frozenset({"column", "line", "offset", "position"})  # "line: 1, column: 57"
# Java packages, for Jackson's "value of type `java.lang.String`" wording
_JAVA_ROOTS: Final = frozenset({"ca", "com", "io", "jakarta", "java", "javax", "org"})

_SEGMENT: Final = r"[^\W\d][\w^]*(?:-[\w^]+)*(?:\[(?:\d+|x|\*)?\])*"
_TOKEN_RE: Final = re.compile(
    r"(?P<ws>\s+)"
    r"|(?P<quoted>\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`|“[^”]*”|‘[^’]*’)"
    r"|(?P<open>[\"'`“‘].*)"  # an unterminated quote: everything after it is withheld
    r"|(?P<brace>\{)"
    rf"|(?P<word>\$?{_SEGMENT}(?:\.{_SEGMENT})*(?:'[a-z]{{1,2}}\b)?)"
    r"|(?P<number>\d[\w.:/+^-]*)"
    r"|(?P<punct>[.,;:!?()\[\]<>=|/+*&#%@~—–-])"
    r"|(?P<other>.)",
    re.DOTALL,
)
_NAME_RE: Final = re.compile(r"^\[*\$?[_A-Za-z][_0-9A-Za-z]*(?:\.[_A-Za-z][_0-9A-Za-z]*)*[!\]]*$")
_ELEMENT_RE: Final = re.compile(r"^[a-z][A-Za-z0-9]*(?:\[(?:\d+|x|\*)?\])*$")
# Where a path may start when the schema is not known yet (or in any case): GraphQL argument names
# ingest uses, the root types, and the resource types ingest writes
_PATH_HEADS: Final = frozenset(
    {"res", "input", "Query", "QueryType", "Mutation", "MutationType", "ImagingStudy", "Patient", "Endpoint"}
)
_RULE_KEY_RE: Final = re.compile(r"^(?:[a-z]{2,5}-\d{1,2}|HAPI-\d{3,5})$")  # ext-1, img-3; HAPI-0450
_CODE_RE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_SEVERITIES: Final = frozenset({"fatal", "error", "warning", "information"})
_PLACEHOLDERS_RE: Final = re.compile(rf"{re.escape(PLACEHOLDER)}(?:[\s,;]*{re.escape(PLACEHOLDER)})+")


def _bare(segment: str) -> str:
    return segment.split("[", 1)[0]


def _is_path(token: str, names: Collection[str]) -> bool:
    """A FHIRPath / GraphQL path (``ImagingStudy.series[0].modality``, ``res.started``) or a qualified name
    (``MutationType.ImagingStudyUpdate``, ``java.lang.String``): made of names only, never of values."""
    segments = token.lstrip("$").split(".")
    if len(segments) < 2:
        return False
    head, rest = _bare(segments[0]), segments[1:]
    if head in _JAVA_ROOTS and all(_NAME_RE.match(s) for s in rest):
        return True
    if head not in names and head not in _PATH_HEADS:
        return False
    return all(_bare(s) in names or _ELEMENT_RE.match(s) for s in rest)


def _keep_word(token: str, names: Collection[str]) -> bool:
    """Whether an unquoted token of a backend message is a rule word, a name or a path (never a value)."""
    if "." in token:
        return _is_path(token, names)
    base = token.lstrip("$")
    if token.startswith("$"):
        return bool(_NAME_RE.match(base))  # a GraphQL variable: ingest named it
    if _RULE_KEY_RE.match(token) or token in names or token in _UPPER_WORDS:
        return True
    if len(token) > 1 and token.isupper():
        return False  # DOE, MRI, ACC123: only the ALL-CAPS words above
    return _bare(token).lower() in _RULE_WORDS


def _keep_quoted(content: str, previous: str, names: Collection[str]) -> bool:
    """Whether a quoted part of a backend message names something (``Field "subject"``) or is a path."""
    if not _NAME_RE.match(content) and not _is_path(content, names):
        return False
    if content.startswith("$") or content in names or _is_path(content, names):
        return True
    return previous in _NAMING_WORDS


def _brace_end(text: str, start: int) -> int:
    """The index after the ``}`` that closes the ``{`` at ``start`` (quotes respected), or ``len(text)``."""
    depth, i, quote = 0, start, ""
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(text)


def redact_backend_message(text: str, *, names: Collection[str] = ()) -> str:
    """A backend's error message with every value withheld: safe for a log line above DEBUG, an
    exception message and the state store's ``last_error``.

    An allow-list, not a deny-list: rule words (``Invalid``, ``Constraint``, ``not``, ``met``, ...), rule
    keys (``ext-1``, ``HAPI-0450``), GraphQL variables (``$res``), paths made of names
    (``ImagingStudy.series[0].modality``) and quoted names after a naming word (``Field "subject"``) are
    kept; every other quoted string, JSON or GraphQL ``{...}`` fragment, number (unless a line or column)
    and word becomes ``«…»``. Whitespace (line breaks included) becomes one space, so the result is one
    line without control characters.

    Parameters
    ----------
    text:
        The backend's message (GraphQL ``errors[].message``, OperationOutcome ``details.text`` /
        ``diagnostics``, ...).
    names:
        Names of the backend schema (types, fields, arguments): kept wherever they appear.

    Returns
    -------
    str
        At most 400 characters.

    Examples
    --------
    >>> redact_backend_message("Invalid dateTime format (ImagingStudy.started): 'May 1st 2024'")
    'Invalid dateTime format (ImagingStudy.started): «…»'
    """
    out: list[str] = []
    previous = ""  # the last word (lower-cased) before the current token, "" after punctuation
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        assert m is not None  # the last alternative matches any character
        kind, token = m.lastgroup, m.group()
        pos = m.end()
        if kind == "ws":
            out.append(" ")
            continue
        if kind == "quoted":
            content = token[1:-1]
            out.append(token if _keep_quoted(content, previous, names) else PLACEHOLDER)
        elif kind == "brace":
            pos = _brace_end(text, m.start())
            out.append(PLACEHOLDER)
        elif kind == "word":
            out.append(token if _keep_word(token, names) else PLACEHOLDER)
        elif kind == "number":
            out.append(token if previous in _NUMBER_WORDS and token.isdigit() else PLACEHOLDER)
        elif kind == "punct":
            out.append(token)
            if (token == ":" and previous in _NUMBER_WORDS) or (token == "=" and previous in _NAMING_WORDS):
                continue  # "line: 1", HAPI's [element="family"]
        else:  # "open" (the rest of the text) and any other character
            out.append(PLACEHOLDER)
        previous = token.lower() if kind == "word" else ""
    redacted = _PLACEHOLDERS_RE.sub(PLACEHOLDER, "".join(out)).strip()
    if len(redacted) > _MAX_REDACTED:
        redacted = redacted[: _MAX_REDACTED - 1].rstrip() + "…"
    return redacted


def schema_names(schema: GraphQLSchema) -> frozenset[str]:
    """The names a backend schema defines (types, their fields and arguments, input fields): the
    vocabulary :func:`redact_backend_message` keeps, so messages still say which element failed."""
    out: set[str] = set()
    for tname, t in schema.type_map.items():
        if tname.startswith("__"):
            continue
        out.add(tname)
        if isinstance(t, GraphQLObjectType):
            for fname, fdef in t.fields.items():
                out.add(fname)
                out.update(fdef.args)
        elif isinstance(t, GraphQLInputObjectType):
            out.update(t.fields)
    return frozenset(out)


def _path_text(path: Any) -> str | None:
    """A GraphQL error ``path`` (response keys and list indices) as ``ImagingStudyCreate.series[0]``."""
    if not isinstance(path, list) or not path:
        return None
    text = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        elif isinstance(part, str) and _NAME_RE.match(part):
            text += f".{part}" if text else part
        else:
            text += f".{PLACEHOLDER}"
    return text


def _graphql_messages(errors: Any, names: Collection[str] = ()) -> tuple[str, ...]:
    """Each GraphQL error redacted, with its ``extensions.code`` and ``path`` (names only)."""
    out: list[str] = []
    for err in errors if isinstance(errors, list) else [errors]:
        if not isinstance(err, Mapping):
            out.append(redact_backend_message(str(err), names=names))
            continue
        text = redact_backend_message(str(err.get("message") or "no message"), names=names)
        extras: list[str] = []
        extensions = err.get("extensions")
        if isinstance(extensions, Mapping):
            code = extensions.get("code")
            if isinstance(code, str) and _CODE_RE.match(code):
                extras.append(f"code {code}")
            outcome = _outcome_text(extensions.get("outcome"), names)
            if outcome:
                extras.append(outcome)
        path = _path_text(err.get("path"))
        if path:
            extras.append(f"path {path}")
        out.append(f"{text} [{'; '.join(extras)}]" if extras else text)
    return tuple(out)


def _outcome_text(body: Any, names: Collection[str] = ()) -> str | None:
    """The issues of a FHIR OperationOutcome body, redacted, or ``None`` if it is not one.

    Each issue as ``<severity> <code> at <expression>: <details.text or diagnostics>``: severity and
    code are kept when they are codes, expressions when they are paths, the texts are redacted.
    """
    if not isinstance(body, Mapping) or body.get("resourceType") != "OperationOutcome":
        return None
    texts: list[str] = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, Mapping):
            continue
        head: list[str] = []
        severity, code = issue.get("severity"), issue.get("code")
        if isinstance(severity, str) and severity in _SEVERITIES:
            head.append(severity)
        if isinstance(code, str) and _CODE_RE.match(code):
            head.append(code)
        expressions = issue.get("expression") or issue.get("location") or []
        paths = [
            redact_backend_message(e, names=names)
            for e in (expressions if isinstance(expressions, list) else [expressions])
            if isinstance(e, str)
        ]
        if paths:
            head.append("at " + ", ".join(paths))
        details = issue.get("details")
        text = (details.get("text") if isinstance(details, Mapping) else None) or issue.get("diagnostics")
        body_text = redact_backend_message(str(text), names=names) if text else ""
        summary = " ".join(head) or "issue"
        texts.append(f"{summary}: {body_text}" if body_text else summary)
    return "; ".join(texts) or "OperationOutcome without issues"


def _retry_after(value: str | None) -> float | None:
    """HTTP Retry-After: delta-seconds or an HTTP-date (RFC 9110 10.2.3), as seconds from now."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _http_error(what: str, code: int, exchange: _Exchange, names: Collection[str]) -> SinkError:
    outcome = _outcome_text(exchange.body, names)
    if exchange.body is not None:
        LOGGER.debug("%s: HTTP %d body (unredacted): %s", what, code, _debug_json(exchange.body))
    detail = f": {outcome}" if outcome else ""
    if code == 401:
        return RetryableSinkError(f"{what}: backend answered HTTP 401 (unauthorized)", code=code)
    if code == 429 or code == 408 or code >= 500:
        hint = _retry_after(exchange.retry_after)
        return RetryableSinkError(
            f"{what}: backend answered HTTP {code}{detail}", code=code, retry_after=hint
        )
    return PermanentSinkError(f"{what}: backend refused the request (HTTP {code}){detail}", code=code)


def _debug_json(value: Any) -> str:
    """``value`` as one escaped line for a DEBUG record (the only place a backend message is kept whole)."""
    try:
        return json.dumps(value, ensure_ascii=True, default=str)[:8000]
    except (TypeError, ValueError):
        return repr(value)[:8000]


class _CertificateError(RetryableSinkError):
    """The backend's TLS certificate does not verify (at :meth:`GraphQLSink.connect`: a ConfigError)."""


def _certificate_error(what: str, cause: BaseException, ca: Path | None) -> _CertificateError:
    cert = getattr(cause, "certificate_error", cause)  # aiohttp.ClientConnectorCertificateError
    reason = str(getattr(cert, "verify_message", None) or getattr(cert, "reason", None) or "unverified")
    reason = "".join(ch if ch.isprintable() else "?" for ch in reason)[:200]  # OpenSSL's words, one line
    if ca is None:
        hint = (
            "verified against the system CA store; if the backend's certificate comes from a private CA, "
            "set [backend] ca to that CA's PEM bundle"
        )
    else:
        hint = f"verified against [backend] ca {ca} only; is it the CA that signed the backend's certificate?"
    return _CertificateError(f"{what}: the backend's TLS certificate is not trusted ({reason}): {hint}")


def _is_certificate_error(exc: BaseException | None) -> bool:
    return isinstance(exc, aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError)


@contextlib.contextmanager
def _map_errors(
    what: str,
    exchange: _Exchange,
    timeout_s: float,
    *,
    names: Collection[str] = (),
    ca: Path | None = None,
) -> Iterator[None]:
    """Turn every gql / aiohttp / asyncio / graphql-core error into :mod:`ingest.errors`.

    Like httpx's ``map_httpcore_exceptions``: the one place where foreign errors are classified.
    Retryable: connection refused/reset, DNS, timeouts, HTTP 401/408/429/5xx, an untrusted TLS
    certificate (a :class:`_CertificateError`). Permanent: GraphQL ``errors[]``, HTTP 400
    (OperationOutcome) and other 4xx, non-GraphQL answers, documents that do not validate locally.

    Backend messages only reach an exception message through :func:`redact_backend_message` (``names``:
    the schema's names it keeps); the whole message is logged at DEBUG only. Exceptions that carry the
    backend's words are not chained, so no traceback shows them either.
    """
    try:
        yield
    except SinkError:
        raise
    except TransportQueryError as exc:
        raw = exc.errors if exc.errors is not None else str(exc)
        LOGGER.debug("%s: backend errors (unredacted): %s", what, _debug_json(raw))
        messages = _graphql_messages(raw, names)
        raise _QueryErrors(f"{what}: backend rejected the request: {'; '.join(messages)}", messages) from None
    except TransportServerError as exc:
        code = exc.code if exc.code is not None else exchange.status
        if code is None:
            raise RetryableSinkError(f"{what}: backend failed without an HTTP status") from None
        raise _http_error(what, code, exchange, names) from None
    except TransportProtocolError as exc:
        LOGGER.debug("%s: not a GraphQL answer (unredacted): %s", what, _debug_json(str(exc)))
        status = exchange.status if exchange.status is not None else "?"
        raise PermanentSinkError(
            f"{what}: the backend's answer is not a GraphQL response (HTTP {status}); is the URL right?",
            code=exchange.status,
        ) from None
    except TransportConnectionFailed as exc:
        cause = exc.__cause__
        if isinstance(cause, TimeoutError):
            raise RetryableSinkError(f"{what}: no answer within {timeout_s:g} s") from exc
        if _is_certificate_error(cause):
            assert cause is not None
            raise _certificate_error(what, cause, ca) from exc
        if cause is None or isinstance(cause, aiohttp.ClientError | OSError):
            raise RetryableSinkError(f"{what}: connection failed: {_describe(cause or exc)}") from exc
        raise PermanentSinkError(f"{what}: could not send the request: {type(cause).__name__}") from exc
    except TransportClosed as exc:
        raise RetryableSinkError(f"{what}: the backend session is closed") from exc
    except TransportError as exc:
        raise RetryableSinkError(f"{what}: transport failed: {type(exc).__name__}") from None
    except TimeoutError as exc:  # gql's execute_timeout (anyio.fail_after) and asyncio timeouts
        raise RetryableSinkError(f"{what}: no answer within {timeout_s:g} s") from exc
    except (aiohttp.ClientError, OSError) as exc:
        if _is_certificate_error(exc):
            raise _certificate_error(what, exc, ca) from exc
        raise RetryableSinkError(f"{what}: connection failed: {_describe(exc)}") from exc
    except GraphQLError as exc:  # local validation of the document against the backend schema
        raise PermanentSinkError(
            f"{what}: the document does not validate against the backend schema: {exc.message}"
        ) from exc


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------------
# The sink


def _strip_empty(value: Any) -> Any:
    """FHIR JSON has no ``null``, ``[]`` or ``{}``; GraphQL answers null for every absent selected field."""
    if isinstance(value, Mapping):
        out = {k: v for k, v in ((k, _strip_empty(v)) for k, v in value.items()) if v is not None}
        return out or None
    if isinstance(value, list):
        items = [v for v in (_strip_empty(v) for v in value) if v is not None]
        return items or None
    return value


class _Client(Client):
    """gql's ``Client`` that validates each document once, not on every request.

    gql re-validates the document of every request against the schema; our documents are the few fixed
    ones built (and validated) by :func:`fit_schema`, and validating the full-read selection costs
    hundreds of milliseconds each time. Documents are kept (pinned) by identity, so an id is never reused.
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
        """Record ``documents`` as valid: :func:`fit_schema` / :func:`fit_resource` validated them
        against this client's schema already (the same ``graphql.validate`` gql would run again)."""
        for doc in documents:
            self._validated[id(doc)] = doc


class _PrintedRequest(GraphQLRequest):
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
        :func:`load_schema_file`); introspected when ``None``.
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
        schema: str | None = None,
        max_depth: int = DEFAULT_MAX_DEPTH,
        ca: Path | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ConfigError(f"backend timeout_s must be positive, got {timeout_s}")
        self.url = url
        self._ca = ca
        self._ssl: ssl.SSLContext | bool = load_ca_bundle(ca) if ca is not None else True
        self._names: frozenset[str] = frozenset()  # the schema's names (see redact_backend_message)
        self._token_source = token_source
        self._timeout_s = float(timeout_s)
        self._schema_sdl = schema
        self._max_depth = max_depth
        self._token: _Secret | None = None
        self._client: _Client | None = None
        self._session: AsyncClientSession | None = None
        self._fit: SchemaFit | None = None
        self._printed: dict[int, tuple[DocumentNode, str]] = {}  # see _PrintedRequest
        # Patient/Endpoint documents, fitted on first use (most configurations never link): type -> fit,
        # ``None`` when the backend's schema does not offer that type's operations
        self._linked: dict[str, ResourceFit | None] = {}
        _cap_gql_loggers()

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
        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(_on_request_end)
        transport = AIOHTTPTransport(
            url=self.url,
            ssl=self._ssl,  # verification stays on; [backend] ca only replaces the trust store
            json_deserialize=_loads,
            client_session_args={
                "timeout": aiohttp.ClientTimeout(total=self._timeout_s),
                "trace_configs": [trace],
                # idle connections are dropped before the server's keep-alive timeout (Node, and so
                # Medplum: 5 s) can close them under us; a POST on such a socket fails with "Server
                # disconnected" and is not retried by aiohttp
                "connector": aiohttp.TCPConnector(keepalive_timeout=_KEEPALIVE_S),
            },
        )
        # plain AsyncClientSession (reconnecting=False): gql retries nothing, the relay owns retries
        self._client = _Client(transport=transport, execute_timeout=self._timeout_s + 1.0)
        session = await self._client.connect_async(reconnecting=False)  # type: ignore[no-untyped-call]
        assert isinstance(session, AsyncClientSession)
        self._session = session
        try:
            schema = await self._load_schema()
            self._names = schema_names(schema)
            self._client.schema = schema  # from now on gql validates every document locally
            self._fit = fit_schema(schema, max_depth=self._max_depth)
            self._client.trust(self._fit.documents.values())  # validated by fit_schema just now
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

    async def _load_schema(self) -> GraphQLSchema:
        if self._schema_sdl is not None:
            try:
                schema = build_schema(self._schema_sdl)
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
        except _CertificateError as exc:
            raise ConfigError(str(exc)) from None
        except PermanentSinkError as exc:
            raise ConfigError(
                f"cannot learn the schema of {_safe_url(self.url)} by introspection: {exc} "
                "(if the backend refuses introspection, set [backend] schema to a file with its schema "
                "as SDL)"
            ) from None
        except (TypeError, KeyError, GraphQLError) as exc:
            raise ConfigError(
                f"the introspection answer of {_safe_url(self.url)} is not a schema: {_describe(exc)}"
            ) from exc

    async def _probe(self) -> None:
        """One ``{ __typename }`` request when the schema was given: a wrong URL, CA or network shows at
        start, not at the first push. A backend that refuses the probe itself is only logged."""
        try:
            await self._execute(GraphQLRequest(_PROBE), what="backend probe")
        except _CertificateError as exc:
            raise ConfigError(str(exc)) from None
        except PermanentSinkError as exc:
            LOGGER.warning("the backend refused the start-up probe (continuing): %s", exc)

    # -- the Sink protocol ---------------------------------------------------------------------------

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
            except _QueryErrors as exc:
                if not exc.not_found:
                    raise
            else:
                found = data.get(READ_FIELD)
                if isinstance(found, Mapping):
                    return self._backend_study(found, what)
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
            ids = ", ".join(_safe_id(m.get("id")) for m in matches)
            raise MultipleMatchesError(
                f"{what}: {len(matches)} or more ImagingStudy resources carry identifier "
                f"{study_identifier(study_uid)} ({ids}); refusing to guess"
            )
        return self._backend_study(matches[0], what) if matches else None

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
        res = self._prepare(resource, backend_id=backend_id)
        what = f"update ImagingStudy/{backend_id} ({_uid_of(resource)})"
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
            fitted = fit_resource(self.fit.schema, resource_type, max_depth=depth)
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
        res, dropped = _prune_to(resource, fitted.create_input_type)
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

    def _headers(self, token: _Secret | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token.reveal()}"} if token is not None else {}

    async def _execute(self, request: GraphQLRequest, *, what: str) -> dict[str, Any]:
        """Send one request; on HTTP 401 re-read the token once and resend at once if it changed."""
        request = _PrintedRequest(request, self._printed)
        for attempt in (1, 2):
            if self._session is None:
                raise RetryableSinkError(f"{what}: the GraphQL sink is not connected")
            sent = self._token
            exchange = _Exchange()
            reset = _EXCHANGE.set(exchange)
            try:
                with _map_errors(what, exchange, self._timeout_s, names=self._names, ca=self._ca):
                    result = await self._session.execute(request, extra_args={"headers": self._headers(sent)})
                return result
            except RetryableSinkError as exc:
                if exc.code != 401:
                    raise
                if attempt == 1 and self._reload_token(sent):
                    LOGGER.info("%s: HTTP 401, token re-read from its source; resending", what)
                    continue
                self._unauthorized(what, exc)
            finally:
                _EXCHANGE.reset(reset)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _unauthorized(what: str, exc: RetryableSinkError) -> NoReturn:
        raise RetryableSinkError(
            f"{what}: unauthorized (HTTP 401) even after re-reading the token", code=401
        ) from exc

    def _reload_token(self, sent: _Secret | None) -> bool:
        """Re-read the token; ``True`` when the token to use now differs from the one just rejected."""
        if self._token_source is None:
            return False
        try:
            fresh = self._token_source.read()
        except ConfigError as exc:
            LOGGER.warning("cannot re-read the backend token: %s", exc)
            return False
        self._token = fresh
        return fresh != sent


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


def load_schema_file(path: Path) -> str:
    """The SDL in ``path`` (``[backend] schema``), checked to parse as a GraphQL schema.

    Parameters
    ----------
    path:
        An SDL file, e.g. the backend's schema printed by an admin who may introspect it.

    Raises
    ------
    ConfigError
        The file does not exist, cannot be read, or is not a GraphQL schema (the message names
        ``[backend] schema``).
    """
    try:
        sdl = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"[backend] schema: cannot read {path} ({type(exc).__name__})") from None
    try:
        build_schema(sdl)
    except (GraphQLError, TypeError) as exc:
        detail = exc.message if isinstance(exc, GraphQLError) else str(exc)
        raise ConfigError(f"[backend] schema: {path} is not a GraphQL schema (SDL): {detail}") from None
    return sdl


def _uid_of(resource: Mapping[str, Any]) -> str:
    """The Study Instance UID from ``ImagingStudy.identifier`` (for messages), or ``"unknown study"``."""
    for ident in resource.get("identifier") or []:
        if isinstance(ident, Mapping) and ident.get("system") == STUDY_SYSTEM:
            return f"study {str(ident.get('value', '')).removeprefix('urn:oid:')}"
    return "unknown study"


_FHIR_ID_RE: Final = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR R4 id datatype


def _safe_id(value: Any) -> str:
    """A resource id the backend answered, for a message: only when it is a FHIR id (untrusted text)."""
    return value if isinstance(value, str) and _FHIR_ID_RE.match(value) else PLACEHOLDER


def _safe_url(url: str) -> str:
    """The URL without userinfo, query or fragment (they may carry credentials)."""
    try:
        u = URL(url)
        return str(u.with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return "<backend url>"


def _cap_gql_loggers() -> None:
    for name in _GQL_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:  # NOTSET (0) included
            logger.setLevel(logging.WARNING)
