"""Test support for the relay end-to-end tests: a fault-injecting reverse proxy and small helpers.

:class:`FaultProxy` is an aiohttp reverse proxy on 127.0.0.1 (port chosen by the OS) in front of a FHIR
GraphQL backend. It forwards every request unchanged unless a fault is armed:

- ``refuse``: stop listening (and drop open keep-alive connections) -> "connection refused";
- ``status``: answer an HTTP status (500, 429, ...) without forwarding;
- ``graphql_errors``: answer HTTP 200 with a GraphQL ``errors[]`` body without forwarding;
- ``drop_after_commit``: forward the request, receive the backend's answer, then abort the client
  connection: the write happened but the client never learns it ("response lost after commit");
- ``mutate``: forward a modified request body (e.g. an invalid value the backend then refuses);
- ``delay``: wait ``seconds`` before forwarding (a slow backend).

Faults are one-shot counters or predicates on the request body, so a test decides exactly which requests
fail. The helpers below start ``ingest`` as a child process (so a test can kill it), talk GraphQL to a
backend directly, and read the embedded backend's ``/stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

__all__ = [
    "Fault",
    "FaultProxy",
    "IngestRun",
    "any_request",
    "fault_proxy",
    "gql",
    "ingest_env",
    "is_create",
    "is_write",
    "run_ingest",
    "running_backend",
    "stats",
    "studies_with_identifier",
]

Predicate = Callable[[dict[str, Any]], bool]


def is_create(body: dict[str, Any]) -> bool:
    """The request is an ImagingStudyCreate mutation."""
    return "ImagingStudyCreate(" in str(body.get("query", ""))


def is_write(body: dict[str, Any]) -> bool:
    """The request is an ImagingStudyCreate or ImagingStudyUpdate mutation."""
    query = str(body.get("query", ""))
    return "ImagingStudyCreate(" in query or "ImagingStudyUpdate(" in query


def any_request(_body: dict[str, Any]) -> bool:
    """Every request."""
    return True


@dataclass
class Fault:
    """One armed fault: applies to the next ``times`` requests for which ``when(body)`` is true."""

    kind: str  # "status" | "graphql_errors" | "drop_after_commit" | "mutate" | "delay"
    times: int
    when: Predicate = any_request
    change: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # for "mutate"
    seconds: float = 0.0  # for "delay"
    status: int = 500
    headers: Mapping[str, str] = field(default_factory=dict)
    message: str = "injected failure"
    hits: int = 0


class FaultProxy:
    """A reverse proxy in front of ``upstream`` (the backend's base URL, e.g. ``http://127.0.0.1:8080``)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults: list[Fault] = []
        self.forwarded = 0  # requests passed to the backend
        self.injected = 0  # requests answered (or dropped) by a fault
        self.port = 0
        self.listening = False
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._client: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def graphql_url(self) -> str:
        return f"{self.base}/fhir/R4/$graphql"

    async def start(self) -> None:
        """Listen on 127.0.0.1 with an OS-chosen port (kept for later restarts)."""
        self._client = aiohttp.ClientSession()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await self.up()

    async def up(self) -> None:
        """(Re)start listening on the same port."""
        assert self._runner is not None
        if self.listening:
            return
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        self.port = int(self._runner.addresses[0][1]) if not self.port else self.port
        self.listening = True

    async def down(self) -> None:
        """Stop listening and drop every open connection: new connections are refused."""
        if not self.listening:
            return
        assert self._site is not None and self._runner is not None and self._runner.server is not None
        await self._site.stop()
        await self._runner.server.shutdown(0.1)
        self.listening = False

    def down_for(self, seconds: float) -> None:
        """Go down now (from a request handler or a test) and come back after ``seconds``."""

        async def outage() -> None:
            await self.down()
            await asyncio.sleep(seconds)
            await self.up()

        task = asyncio.get_running_loop().create_task(outage())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def arm(self, fault: Fault) -> Fault:
        """Add a fault; returns it (its ``hits`` count the requests it affected)."""
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        self.faults.clear()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.close()

    def _fault_for(self, body: dict[str, Any]) -> Fault | None:
        for fault in self.faults:
            if fault.hits < fault.times and fault.when(body):
                fault.hits += 1
                return fault
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        fault = self._fault_for(body if isinstance(body, dict) else {})
        if fault is not None and fault.kind == "status":
            self.injected += 1
            return web.json_response(
                {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "transient", "details": {"text": fault.message}}],
                },
                status=fault.status,
                headers=dict(fault.headers),
            )
        if fault is not None and fault.kind == "graphql_errors":
            self.injected += 1
            return web.json_response({"errors": [{"message": fault.message}], "data": None})
        if fault is not None and fault.kind == "mutate" and fault.change is not None:
            self.injected += 1
            raw = json.dumps(fault.change(body)).encode()
        if fault is not None and fault.kind == "delay":
            self.injected += 1
            await asyncio.sleep(fault.seconds)
        assert self._client is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        async with self._client.request(
            request.method, self.upstream + request.rel_url.path_qs, data=raw, headers=headers
        ) as upstream:
            payload = await upstream.read()
            status = upstream.status
            content_type = upstream.headers.get("Content-Type", "application/json")
        self.forwarded += 1
        if fault is not None and fault.kind == "drop_after_commit":
            self.injected += 1
            assert request.transport is not None
            request.transport.abort()  # the backend committed; the client never sees its answer
            raise asyncio.CancelledError
        response = web.Response(body=payload, status=status)
        response.headers["Content-Type"] = content_type
        return response


# --------------------------------------------------------------------------------------------------------
# Helpers


@contextlib.asynccontextmanager
async def running_backend(db: Path, token: str | None = None) -> AsyncIterator[str]:
    """The embedded backend on 127.0.0.1 (OS-chosen port) in this event loop; yields its base URL."""
    from ingest.backend.server import start_backend

    runner, port = await start_backend(db, host="127.0.0.1", port=0, token=token)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def fault_proxy(upstream: str) -> AsyncIterator[FaultProxy]:
    """A started :class:`FaultProxy` in front of ``upstream``; closed afterwards."""
    proxy = FaultProxy(upstream)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def gql(
    url: str, query: str, variables: Mapping[str, Any] | None = None, *, token: str | None = None
) -> dict[str, Any]:
    """POST one GraphQL request; returns the decoded body (``data`` and/or ``errors``)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json={"query": query, "variables": dict(variables or {})}, headers=headers) as resp,
    ):
        result: dict[str, Any] = await resp.json(content_type=None)
        return result


async def stats(base: str) -> dict[str, int]:
    """The embedded backend's request counters (``GET /stats``)."""
    async with aiohttp.ClientSession() as session, session.get(f"{base}/stats") as resp:
        result: dict[str, int] = await resp.json()
        return result


SEARCH = """query($identifier: String) {
  ImagingStudyList(identifier: $identifier, _count: 20) {
    id meta { versionId } status numberOfSeries numberOfInstances
    note { text } series { uid numberOfInstances instance { uid } }
  }
}"""


async def studies_with_identifier(
    url: str, study_uid: str, *, token: str | None = None
) -> list[dict[str, Any]]:
    """Every ImagingStudy carrying ``urn:dicom:uid|urn:oid:<study_uid>`` (``[]`` for none)."""
    body = await gql(url, SEARCH, {"identifier": f"urn:dicom:uid|urn:oid:{study_uid}"}, token=token)
    assert not body.get("errors"), body
    found: list[dict[str, Any]] = body["data"]["ImagingStudyList"] or []
    return found


def ingest_env(backend_url: str | None, **relay: Any) -> dict[str, str]:
    """The environment for an ``ingest`` child: no inherited ``INGEST_*``, fast relay settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    settings = {
        "INGEST_RELAY__STABLE_AGE_S": "0.2",
        "INGEST_RELAY__BASE_BACKOFF_S": "0.05",
        "INGEST_RELAY__MAX_BACKOFF_S": "0.4",
        "INGEST_RELAY__MAX_ATTEMPTS": "200",
        "INGEST_RELAY__POLL_INTERVAL_S": "0.05",
        "INGEST_RELAY__LEASE_S": "2",
        "INGEST_BACKEND__TIMEOUT_S": "5",
        "INGEST_LOG__LEVEL": "INFO",
    }
    settings.update({f"INGEST_RELAY__{k.upper()}": str(v) for k, v in relay.items()})
    env.update(settings)
    if backend_url is not None:
        env["INGEST_BACKEND__URL"] = backend_url
    return env


@dataclass
class IngestRun:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def run_ingest(
    data_dir: Path, *args: str, env: Mapping[str, str], cwd: Path, timeout: float = 60.0,
    stderr_lines: list[str] | None = None,
) -> IngestRun:
    """Run ``python -m ingest --data-dir DATA ARGS...`` as a child process and wait for it.

    ``stderr_lines``, when given, receives each stderr line as it is written (a test can wait for one)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ingest",
        "--data-dir",
        str(data_dir),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
        cwd=cwd,
    )

    async def both() -> tuple[bytes, bytes]:
        if stderr_lines is None:
            return await proc.communicate()
        assert proc.stdout is not None and proc.stderr is not None
        reader = asyncio.ensure_future(proc.stdout.read())
        err_parts: list[bytes] = []
        while line := await proc.stderr.readline():
            err_parts.append(line)
            stderr_lines.append(line.decode(errors="replace"))
        out = await reader
        await proc.wait()
        return out, b"".join(err_parts)

    try:
        out, err = await asyncio.wait_for(both(), timeout)
    except TimeoutError:
        proc.kill()  # our own child, by its handle
        out, err = await proc.communicate()
        raise AssertionError(
            f"ingest {' '.join(args)} timed out; stderr:\n{err.decode(errors='replace')}"
        ) from None
    assert proc.returncode is not None
    return IngestRun(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
