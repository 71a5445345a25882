"""Read-only FHIR REST on the embedded backend, so that any FHIR tool can look at what ``ingest`` wrote.

Routes, at ``[base]`` = ``/fhir/R4`` (the GraphQL endpoint is ``[base]/$graphql``)::

    GET [base]/metadata             a CapabilityStatement: the types, their read and search interactions
    GET [base]/<type>/<id>          the resource (``ETag: W/"<versionId>"``, ``Last-Modified``), or 404
    GET [base]/<type>?<params>      a ``searchset`` Bundle (FHIR R4 search: the same parameters as the
                                    GraphQL list queries, ``_count``, ``_offset``, ``_sort``; a ``next``
                                    link when the page is full)

Answers are ``application/fhir+json``; errors are OperationOutcomes (404 unknown type or id, 400 a
search parameter the type does not have or a malformed value, 503 the database failed). The same rules
as GraphQL apply (the server's middlewares): bearer token when one is configured, no foreign ``Origin``
or ``Host``. Nothing here writes (other methods: 405).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Final

from aiohttp import web

from ingest.backend.schema import RESOURCE_TYPES
from ingest.backend.store import (
    FHIR_ID,
    MAX_COUNT,
    PARAMETERS,
    BackendRequestError,
    ResourceStore,
    SearchRequest,
    StorageError,
)

__all__ = ["BASE", "add_rest_routes", "capability_statement", "operation_outcome"]

BASE: Final = "/fhir/R4"
_FHIR_JSON: Final = "application/fhir+json"
_PAGING: Final = frozenset({"_count", "_offset", "_sort", "_format"})


def _json(status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type=_FHIR_JSON, headers=headers)


def operation_outcome(
    status: int, texts: list[str], *, code: str = "invalid", diagnostics: str | None = None
) -> web.Response:
    """An HTTP error answer carrying a FHIR OperationOutcome, one issue per text (REST and GraphQL)."""
    issues: list[dict[str, Any]] = []
    for text in texts:
        issue: dict[str, Any] = {"severity": "error", "code": code, "details": {"text": text}}
        if diagnostics:
            issue["diagnostics"] = diagnostics
        issues.append(issue)
    return _json(status, {"resourceType": "OperationOutcome", "issue": issues})


def _rest_name(name: str) -> str:
    """A search parameter as FHIR REST spells it (``connection-type``); the store uses ``_``."""
    return name if name.startswith("_") else name.replace("_", "-")


def capability_statement(base_url: str) -> dict[str, Any]:
    """What this server does: read and search-type for each stored type, JSON only."""
    resources = []
    for resource_type in RESOURCE_TYPES:
        params = PARAMETERS.get(resource_type, {})
        resources.append({
            "type": resource_type,
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "versioning": "versioned",
            "searchParam": [{"name": _rest_name(name), "type": "reference" if kind == "reference" else kind}
                            for name, kind in sorted(params.items())],
        })
    from ingest import __version__

    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "kind": "instance",
        "software": {"name": "ingest embedded backend", "version": __version__},
        "implementation": {"description": "ingest's embedded FHIR backend (read-only REST, GraphQL)",
                           "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "rest": [{"mode": "server", "resource": resources,
                  "operation": [{"name": "graphql",
                                 "definition": "http://hl7.org/fhir/OperationDefinition/Resource-graphql"}]}],
    }


def add_rest_routes(app: web.Application, store_key: web.AppKey[ResourceStore]) -> None:
    """Register the read-only REST routes on the backend's application."""

    def store_of(request: web.Request) -> ResourceStore:
        return request.app[store_key]

    def base_url(request: web.Request) -> str:
        return str(request.url.with_path(BASE).with_query(None))

    async def metadata(request: web.Request) -> web.Response:
        return _json(200, capability_statement(base_url(request)))

    async def read(request: web.Request) -> web.Response:
        resource_type, resource_id = request.match_info["type"], request.match_info["id"]
        if resource_type not in RESOURCE_TYPES:
            return operation_outcome(
                404, [f"Unknown resource type {resource_type!r}"[:200]], code="not-supported"
            )
        if not FHIR_ID.fullmatch(resource_id):
            return operation_outcome(404, ["Not found"], code="not-found")
        try:
            found = await asyncio.to_thread(store_of(request).read, resource_type, resource_id)
        except StorageError:
            return operation_outcome(503, ["The database failed; try again"], code="transient")
        if found is None:
            return operation_outcome(404, ["Not found"], code="not-found")
        meta = found.get("meta", {})
        headers = {}
        if meta.get("versionId"):
            headers["ETag"] = f'W/"{meta["versionId"]}"'
        if meta.get("lastUpdated"):
            when = datetime.fromisoformat(str(meta["lastUpdated"]).replace("Z", "+00:00"))
            headers["Last-Modified"] = format_datetime(when.astimezone(UTC), usegmt=True)
        return _json(200, found, headers)

    async def search(request: web.Request) -> web.Response:
        resource_type = request.match_info["type"]
        if resource_type not in RESOURCE_TYPES:
            return operation_outcome(
                404, [f"Unknown resource type {resource_type!r}"[:200]], code="not-supported"
            )
        query = request.rel_url.query
        known = {_rest_name(name): name for name in PARAMETERS.get(resource_type, {})}
        params: dict[str, str] = {}
        for name in query:
            values = query.getall(name)
            if name in _PAGING:
                continue
            if name not in known:
                return operation_outcome(
                    400, [f"Unknown search parameter {name[:64]!r} for {resource_type}"], code="not-supported"
                )
            if len(values) > 1:  # AND of one parameter with itself: not supported by the store
                return operation_outcome(
                    400, [f"Search parameter {name!r} given more than once"], code="not-supported"
                )
            params[known[name]] = values[0]
        try:
            count = int(query.get("_count", "20"))
            offset = int(query.get("_offset", "0"))
        except ValueError:
            return operation_outcome(400, ["_count and _offset must be integers"])
        count = min(max(count, 0), MAX_COUNT)
        sort = query.get("_sort")
        try:
            found = await asyncio.to_thread(
                store_of(request).search, resource_type,
                SearchRequest(params=params, count=count, offset=offset, sort=sort),
            )
        except BackendRequestError as exc:
            return operation_outcome(400, [str(exc)[:500]])
        except StorageError:
            return operation_outcome(503, ["The database failed; try again"], code="transient")
        base = base_url(request)
        links = [{"relation": "self", "url": str(request.url)}]
        if count and len(found) == count:
            links.append({"relation": "next",
                          "url": str(request.url.update_query({"_offset": str(offset + count)}))})
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "link": links,
            "entry": [{"fullUrl": f"{base}/{resource_type}/{r['id']}", "resource": r,
                       "search": {"mode": "match"}} for r in found],
        }
        return _json(200, bundle)

    async def refused(_request: web.Request) -> web.Response:
        return operation_outcome(
            405, ["This server is read-only over REST; write with GraphQL"], code="not-supported"
        )

    app.router.add_get(f"{BASE}/metadata", metadata)
    app.router.add_get(f"{BASE}/{{type:[A-Z][A-Za-z]{{1,63}}}}/{{id}}", read)
    app.router.add_get(f"{BASE}/{{type:[A-Z][A-Za-z]{{1,63}}}}", search)
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        app.router.add_route(method, f"{BASE}/{{type:[A-Z][A-Za-z]{{1,63}}}}/{{id}}", refused)
