"""The GraphQL schema of the embedded FHIR backend (``schema.graphql``) with its resolvers attached.

For every resource type ``X`` in :data:`RESOURCE_TYPES` (the shapes follow Medplum 4.5.2):

- ``X(id)``: the current version, or the execution error ``Not found``;
- ``XList(...)``: a FHIR search; ``null`` rather than ``[]`` when nothing matches;
- ``XCreate(res)``: validated with :func:`ingest.core.fhir.validate_resource`; a valid client ``id``
  is kept, otherwise a uuid4 is assigned;
- ``XUpdate(id, res)``: ``res.resourceType`` must be ``X`` and ``res.id`` must equal ``id`` (Medplum's
  ``Invalid resourceType`` / ``Invalid ID``); a missing id is created;
- ``XDelete(id)``: returns ``null``; ``Not found`` when absent.

Every write gets a new ``meta.versionId`` (uuid4) and ``meta.lastUpdated`` (UTC, ms, ``Z``). A
refused input is a GraphQL error whose message names the FHIR path and the rule, e.g.
``dateTime with a time needs a zone (ImagingStudy.started)``; values are never echoed (PHI).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any, Final
from uuid import uuid4

from graphql import GraphQLObjectType, GraphQLResolveInfo, GraphQLSchema, build_schema
from pydantic import ValidationError

from ingest.backend.store import (
    DEFAULT_COUNT,
    FHIR_ID,
    MAX_COUNT,
    PARAMETERS,
    BackendRequestError,
    NotFoundError,
    ResourceStore,
    SearchRequest,
)
from ingest.core.fhir import validate_resource

__all__ = [
    "RESOURCE_TYPES",
    "STAT_NAMES",
    "BackendContext",
    "build_backend_schema",
    "normalize_numbers",
    "schema_sdl",
    "validation_message",
]

#: Resource types the backend serves.
RESOURCE_TYPES: Final = (
    "ImagingStudy", "Patient", "Endpoint", "Device", "Organization", "Provenance", "ServiceRequest",
    "Encounter", "Practitioner",
)
#: Counters kept per backend (``GET /stats``): one per root field call, plus HTTP requests.
STAT_NAMES: Final = ("requests", "lookups", "reads", "creates", "updates", "deletes")

_PAGING_ARGS: Final = frozenset({"_count", "_offset", "_sort"})


@dataclass
class BackendContext:
    """What the resolvers need, passed as the GraphQL ``context_value``.

    Parameters
    ----------
    store:
        The resource store (blocking; called through ``asyncio.to_thread``).
    stats:
        Counters by name (:data:`STAT_NAMES`), incremented by the resolvers.
    max_resources:
        Resources one request may read, searches (their page size) and reads together; ``None``: no
        limit. Aliases could otherwise ask for the same page of a thousand resources many times over.
    """

    store: ResourceStore
    stats: MutableMapping[str, int] = field(default_factory=lambda: dict.fromkeys(STAT_NAMES, 0))
    max_resources: int | None = None
    resources: int = 0

    def count(self, name: str) -> None:
        """Increment one counter."""
        self.stats[name] = self.stats.get(name, 0) + 1

    def take(self, resources: int) -> None:
        """Reserve ``resources`` of the request's read budget before reading them.

        Raises
        ------
        BackendRequestError
            The request would read more than ``max_resources`` (nothing is reserved).
        """
        if self.max_resources is not None and self.resources + resources > self.max_resources:
            raise BackendRequestError(f"Too many resources in one request (at most {self.max_resources})")
        self.resources += resources


def schema_sdl() -> str:
    """The schema as SDL text (``ingest/backend/schema.graphql``).

    Returns
    -------
    str
        The SDL, as shipped in the package.
    """
    return files("ingest.backend").joinpath("schema.graphql").read_text(encoding="utf-8")


def normalize_numbers(value: Any) -> Any:
    """Turn integral floats into ints, recursively (``1.0`` -> ``1``).

    GraphQL ``Float`` values are Python floats in graphql-core, so ``1`` becomes ``1.0``; FHIR JSON
    and Medplum (JavaScript) write ``1``. Applied to what is stored and to what is sent back, so a
    client's digest of a resource does not change on the round trip.

    Parameters
    ----------
    value:
        JSON-like data.

    Returns
    -------
    Any
        A copy with integral floats as ints.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {key: normalize_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [normalize_numbers(item) for item in value]
    return value


def _clean_input(value: Any) -> Any:
    """Input as FHIR JSON: integral floats as ints; ``null`` members and empty lists/objects dropped."""
    # runs over every element of every resource written: exact types first (JSON gives dict, list,
    # str, int, float, bool), the general Mapping check only for anything else
    kind = type(value)
    if kind is str or kind is int or kind is bool:
        return value
    if kind is dict or (kind is not list and isinstance(value, Mapping)):
        out = {}
        for key, item in value.items():
            clean = _clean_input(item)
            if clean is None or (not clean and type(clean) in (list, dict)):
                continue
            out[key] = clean
        return out
    if kind is list:
        return [_clean_input(item) for item in value if item is not None]
    return normalize_numbers(value)


def _path(resource_type: str, loc: tuple[int | str, ...]) -> str:
    text = resource_type
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def validation_message(resource_type: str, exc: ValidationError | ValueError) -> str:
    """The client-facing message for a refused resource: the rule and the FHIR path of each error.

    Parameters
    ----------
    resource_type:
        The resource type, the root of the paths.
    exc:
        What :func:`ingest.core.fhir.validate_resource` raised.

    Returns
    -------
    str
        E.g. ``Invalid dateTime: a time needs seconds and a zone (ImagingStudy.started)``; several
        errors are joined with ``; ``. Input values are not included.
    """
    if not isinstance(exc, ValidationError):
        return f"{exc} ({resource_type})"
    messages = []
    for error in exc.errors(include_input=False, include_url=False):
        msg = str(error["msg"])
        for prefix in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(prefix)
        if error["type"] == "extra_forbidden":
            msg = "Unknown element or not supported by this backend"
        elif error["type"] == "missing":
            msg = "Missing required element"
        messages.append(f"{msg} ({_path(resource_type, tuple(error['loc']))})")
    return "; ".join(messages)


def _prepare(resource_type: str, res: Mapping[str, Any], resource_id: str) -> dict[str, Any]:
    """The resource to store: normalized, ``id`` set, server-owned meta dropped, validated."""
    resource: dict[str, Any] = _clean_input(res)
    resource["id"] = resource_id
    meta = resource.get("meta")
    if isinstance(meta, dict):  # Resource.meta.versionId / .lastUpdated are the server's to set
        meta.pop("versionId", None)
        meta.pop("lastUpdated", None)
        if not meta:
            del resource["meta"]
    try:
        validate_resource(resource)
    except (ValidationError, ValueError) as exc:
        raise BackendRequestError(validation_message(resource_type, exc)) from exc
    return resource


def _check_type(resource_type: str, res: Mapping[str, Any]) -> None:
    if res.get("resourceType") != resource_type:  # Medplum's message for a missing or wrong type
        raise BackendRequestError("Invalid resourceType")


def _check_id(resource_type: str, resource_id: str) -> None:
    if not FHIR_ID.fullmatch(resource_id):
        raise BackendRequestError(f"Invalid id format ({resource_type}.id)")


Resolver = Callable[..., Awaitable[Any]]
Info = GraphQLResolveInfo["BackendContext"]


def _resolvers(resource_type: str) -> dict[str, Resolver]:
    async def read(_root: Any, info: Info, id: str) -> dict[str, Any]:
        ctx = info.context
        ctx.count("reads")
        ctx.take(1)
        found = await asyncio.to_thread(ctx.store.read, resource_type, id)
        if found is None:
            raise NotFoundError
        return found

    async def search(_root: Any, info: Info, **args: Any) -> list[dict[str, Any]] | None:
        ctx = info.context
        ctx.count("lookups")
        count = args.get("_count")
        offset = args.get("_offset")
        request = SearchRequest(
            params={k: str(v) for k, v in args.items() if k not in _PAGING_ARGS and v is not None},
            count=DEFAULT_COUNT if count is None else int(count),
            offset=0 if offset is None else int(offset),
            sort=args.get("_sort"),
        )
        ctx.take(request.count if 0 <= request.count <= MAX_COUNT else 0)  # the store refuses other sizes
        found = await asyncio.to_thread(ctx.store.search, resource_type, request)
        return found or None  # Medplum answers null, not [], when nothing matches

    async def create(_root: Any, info: Info, res: dict[str, Any]) -> dict[str, Any]:
        ctx = info.context
        ctx.count("creates")
        _check_type(resource_type, res)
        client_id = res.get("id")
        if client_id is not None:  # Medplum keeps a client-chosen id
            _check_id(resource_type, str(client_id))
        resource = _prepare(resource_type, res, str(client_id) if client_id is not None else str(uuid4()))
        return await asyncio.to_thread(ctx.store.create, resource)

    async def update(_root: Any, info: Info, id: str, res: dict[str, Any]) -> dict[str, Any]:
        ctx = info.context
        ctx.count("updates")
        _check_type(resource_type, res)
        if res.get("id") != id:  # Medplum: res.id is required and must equal the id argument
            raise BackendRequestError("Invalid ID")
        _check_id(resource_type, id)
        resource = _prepare(resource_type, res, id)
        stored, _created = await asyncio.to_thread(ctx.store.put, resource)
        return stored

    async def delete(_root: Any, info: Info, id: str) -> None:
        ctx = info.context
        ctx.count("deletes")
        if not await asyncio.to_thread(ctx.store.delete, resource_type, id):
            raise NotFoundError
        return None  # Medplum returns null for a delete

    return {
        resource_type: read,
        f"{resource_type}List": search,
        f"{resource_type}Create": create,
        f"{resource_type}Update": update,
        f"{resource_type}Delete": delete,
    }


@functools.cache
def build_backend_schema() -> GraphQLSchema:
    """Build the executable schema: SDL from ``schema.graphql`` plus the resolvers.

    Returns
    -------
    GraphQLSchema
        Root types ``QueryType`` and ``MutationType``; cached (the schema is immutable once built).

    Raises
    ------
    RuntimeError
        The SDL and the resolvers or the search parameters disagree (a packaging error).
    """
    schema = build_schema(schema_sdl())
    roots: list[GraphQLObjectType] = [t for t in (schema.query_type, schema.mutation_type) if t is not None]
    for resource_type in RESOURCE_TYPES:
        for name, resolver in _resolvers(resource_type).items():
            root = next((r for r in roots if name in r.fields), None)
            if root is None:
                raise RuntimeError(f"schema.graphql has no root field {name}")
            root.fields[name].resolve = resolver
        list_args = set(roots[0].fields[f"{resource_type}List"].args) - _PAGING_ARGS - {"_id"}
        if list_args != set(PARAMETERS[resource_type]):
            raise RuntimeError(f"{resource_type}List arguments and store.PARAMETERS differ")
    return schema
