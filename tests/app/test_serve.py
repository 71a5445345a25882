"""``ingest serve`` (``ingest.app.serve``): intake never waits for the backend; ``/healthz`` tells the truth.

The service runs in-process (``serve()`` with a stop event) with its listener and admin endpoint on free
loopback ports and ``[backend] url`` pointing at a loopback port where nothing listens yet; the embedded
backend is started on that port later in the same event loop. The ``/healthz`` checks are also driven one
by one through :class:`ingest.app.serve.Health`, with each fault simulated as described in its test.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app.serve import Health, admin_app, serve
from ingest.config import AdminSettings, ListenerSettings, RelaySettings, Settings, WatchSettings
from ingest.errors import ConfigError, RetryableSinkError, StoreUnavailableError
from ingest.metrics import Metrics
from ingest.relay.relay import BackendHealth, wait_for_backend
from samples.generate import generate
from tests import free_ports
from tests.faultproxy import studies_with_identifier

GRAPHQL = "/fhir/R4/$graphql"


def free_port() -> int:
    return free_ports(1)[0]


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def get_json(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.json()


# -- intake comes up while the backend is down, and the studies arrive once it is up ------------------


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[asyncio.Task[int]]:
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.shield(task), timeout=30)


def echo_and_store(port: int, path: Path) -> tuple[int, int]:
    """C-ECHO, then C-STORE of ``path`` in one association; returns both statuses."""
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ds = dcmread(path)
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="INGEST")
    assert assoc.is_established
    try:
        echo = assoc.send_c_echo()
        store = assoc.send_c_store(ds)
        return int(echo.Status), int(store.Status)
    finally:
        assoc.release()


async def test_listener_and_admin_up_at_once_with_backend_down_then_study_arrives(tmp_path: Path) -> None:
    from ingest.backend.server import start_backend

    backend_port, dicom_port, admin_port = free_port(), free_port(), free_port()
    settings = Settings(
        data_dir=tmp_path / "data",
        listener=ListenerSettings(port=dicom_port, accept_any_calling_ae=True),
        admin=AdminSettings(port=admin_port, min_free_bytes=0),
        relay=RelaySettings(stable_age_s=0.2, release_grace_s=0.1, base_backoff_s=0.05, max_backoff_s=0.3,
                            max_attempts=2, poll_interval_s=0.05),
        backend={"url": f"http://127.0.0.1:{backend_port}{GRAPHQL}", "timeout_s": 2, "token_env": None},
    )
    corpus = generate(tmp_path / "corpus", studies=1, files=1, seed=77, tiny=True)
    [path] = corpus.paths()
    [study] = corpus.studies

    runner = None
    try:
        async with serving(settings) as task:
            started = time.monotonic()
            # within 2 s the listener answers C-ECHO and accepts a C-STORE although no backend answers
            health_url = f"http://127.0.0.1:{admin_port}/healthz"
            # (asked through /healthz: pynetdicom leaks a socket when a connection is refused)
            await until(
                lambda: _health_if(health_url, lambda b: b.get("listener") == "ok"), 2.0, "listener up"
            )
            statuses = await asyncio.to_thread(echo_and_store, dicom_port, path)
            assert statuses == (0x0000, 0x0000)
            assert time.monotonic() - started < 2.0
            status, body = await until(
                lambda: _health_if(health_url,
                                   lambda b: str(b.get("backend", "")).startswith("unavailable: ")
                                   and "attempts" in b["backend"]),
                3.0, "healthz names the unreachable backend",
            )
            assert status == 200 and body["status"] == "degraded" and body["accepting"] is True
            assert body["listener"] == "ok" and body["relay"] == "ok"

            # more connection attempts than [relay] max_attempts later, the study still waits untouched
            await asyncio.sleep(1.0)
            assert not task.done()
            with SQLiteStateStore(settings.data_dir / "state.sqlite3", node="probe") as store:
                row = store.study(study.study_uid)
            assert row is not None and row.state.value == "pending" and row.attempts == 0

            runner, _ = await start_backend(tmp_path / "backend.sqlite3", host="127.0.0.1", port=backend_port)
            url = f"http://127.0.0.1:{backend_port}{GRAPHQL}"
            found = await until(lambda: studies_with_identifier(url, study.study_uid), 10.0, "study pushed")
            assert len(found) == 1 and found[0]["numberOfInstances"] == 1
            status, body = await until(
                lambda: _health_if(health_url,
                                   lambda b: b.get("backend") == "ok"),
                5.0, "healthz: backend ok",
            )
            assert status == 200 and body["status"] == "ok"
        assert task.result() == 0
    finally:
        if runner is not None:  # stopped after the service, which may still be talking to it
            await runner.cleanup()


async def _health_if(url: str, good: Callable[[dict[str, Any]], bool]) -> tuple[int, dict[str, Any]] | None:
    try:
        status, body = await get_json(url)
    except aiohttp.ClientError:
        return None
    return (status, body) if good(body) else None


async def test_serve_healthz_is_computed_when_asked_503_while_the_disk_is_low(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        listener=ListenerSettings(port=free_port(), accept_any_calling_ae=True),
        admin=AdminSettings(port=free_port(), min_free_bytes=1 << 20),
        embedded_backend={"port": 0},
    )
    spool = settings.data_dir / "spool"
    low = {"on": True}
    real = os.statvfs

    class Low:  # simulated: the spool's file system has 4 KiB left (below min_free_bytes = 1 MiB)
        f_bavail = 1
        f_frsize = 4096

    monkeypatch.setattr(os, "statvfs", lambda p: Low() if low["on"] and Path(p) == spool else real(p))
    url = f"http://127.0.0.1:{settings.admin.port}/healthz"
    async with serving(settings):
        status, body = await until(
            lambda: _health_if(url, lambda b: b.get("listener") == "ok" and b.get("backend") == "ok"),
            5.0, "service up",
        )
        assert status == 503 and body["status"] == "failing" and body["accepting"] is False
        assert body["disk"] == "low (4096 bytes free)"
        low["on"] = False  # space freed: the next request sees it
        status, body = await get_json(url)
        assert status == 200 and body["status"] == "ok" and body["disk"] == "ok"


# -- /healthz, part by part -------------------------------------------------------------------------------


class _Store:
    """A state store stand-in for the health query: answers, or fails like an unreachable database."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.queries = 0

    def study(self, _uid: str) -> None:
        self.queries += 1
        if self.fail:
            raise StoreUnavailableError("state store unreachable: connection refused")

    def studies(self, _state: Any = None) -> list[Any]:
        return []


class _Listener:
    def __init__(self, alive: bool) -> None:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._stop.wait, daemon=True)
        if alive:
            self._thread.start()

    def close(self) -> None:
        self._stop.set()


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """A healthy service's parts: a live listener thread and relay task, a connected backend."""
    settings = Settings(data_dir=tmp_path, admin=AdminSettings(min_free_bytes=1024))
    (tmp_path / "spool").mkdir()
    backend = BackendHealth()
    backend.answered()
    store = _Store()
    health = Health(settings, store, backend)  # type: ignore[arg-type]
    listener = _Listener(alive=True)
    health.listener = listener
    never = asyncio.Event()
    health.relay = asyncio.create_task(never.wait())
    yield {"health": health, "backend": backend, "store": store, "spool": tmp_path / "spool"}
    listener.close()
    health.relay.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await health.relay


async def test_healthz_ok_over_http_when_every_part_runs(
    parts: dict[str, Any], aiohttp_client: Any
) -> None:
    client = await aiohttp_client(admin_app(Metrics(), parts["store"], parts["health"]))
    resp = await client.get("/healthz")
    body = await resp.json()
    assert resp.status == 200
    assert body["status"] == "ok" and body["accepting"] is True
    for part in ("listener", "disk", "data_dir", "store", "relay", "backend"):
        assert body[part] == "ok", part
    assert isinstance(body["disk_free_bytes"], int) and body["disk_free_bytes"] > 1024
    assert parts["store"].queries == 1  # computed when asked
    assert list(parts["spool"].iterdir()) == []  # the write probe leaves nothing behind


async def test_backend_down_alone_is_200_degraded(parts: dict[str, Any]) -> None:
    parts["backend"].connect_failed("connection failed: ClientConnectorError")
    status, body = await parts["health"].report()
    assert status == 200
    assert body["status"] == "degraded" and body["accepting"] is True
    assert body["backend"] == "unavailable: connection failed: ClientConnectorError (1 failed attempts)"


async def test_backend_failing_pushes_are_counted(parts: dict[str, Any]) -> None:
    for _ in range(3):
        parts["backend"].push_failed("HTTP 503")
    status, body = await parts["health"].report()
    assert status == 200 and body["status"] == "degraded"
    assert body["backend"] == "failing: 3 consecutive failures, last: HTTP 503"


async def test_disk_low_is_503(parts: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # simulated: the spool's file system reports 512 free bytes (below min_free_bytes = 1024)
    real = os.statvfs

    class Low:
        f_bavail = 128
        f_frsize = 4

    monkeypatch.setattr(os, "statvfs", lambda p: Low() if Path(p) == parts["spool"] else real(p))
    status, body = await parts["health"].report()
    assert status == 503
    assert body["status"] == "failing" and body["accepting"] is False
    assert body["disk"] == "low (512 bytes free)"
    assert body["data_dir"] == "ok" and body["store"] == "ok"


async def test_data_dir_not_writable_is_503(parts: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # simulated: creating a file in the spool fails with EROFS, as on a file system remounted read-only.
    # (The tests run as root, for whom chmod 0500 and os.access do not stop writes, so the refusal is
    # injected at os.open; what is checked is that the probe write, not os.access, decides.)
    real_open = os.open

    def refusing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path).parent == parts["spool"] and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    assert os.access(parts["spool"], os.W_OK)  # what an access-only check would have believed
    status, body = await parts["health"].report()
    assert status == 503 and body["accepting"] is False
    assert body["data_dir"] == "not writable: EROFS (Read-only file system)"


async def test_store_unreachable_is_503(parts: dict[str, Any]) -> None:
    parts["store"].fail = True
    status, body = await parts["health"].report()
    assert status == 503 and body["accepting"] is False
    assert body["store"] == "unavailable: state store unreachable: connection refused"


async def test_listener_thread_gone_is_503(parts: dict[str, Any]) -> None:
    parts["health"].listener.close()
    parts["health"].listener._thread.join(5)
    status, body = await parts["health"].report()
    assert status == 503 and body["listener"] == "stopped"


async def test_watcher_task_dead_is_503_relay_task_dead_is_degraded(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, listener=ListenerSettings(enabled=False),
        watch=WatchSettings(folder=tmp_path / "drop"), admin=AdminSettings(min_free_bytes=0),
    )
    backend = BackendHealth()
    backend.answered()
    health = Health(settings, _Store(), backend)  # type: ignore[arg-type]

    async def crash() -> None:
        raise RuntimeError("boom")

    never = asyncio.Event()
    health.watcher = asyncio.create_task(never.wait())
    health.relay = asyncio.create_task(crash())
    await asyncio.wait([health.relay])
    status, body = await health.report()
    assert "listener" not in body  # not configured, not reported
    assert status == 200 and body["status"] == "degraded" and body["relay"] == "stopped: RuntimeError"

    health.watcher.cancel()
    await asyncio.wait([health.watcher])
    status, body = await health.report()
    assert status == 503 and body["watcher"] == "stopped: cancelled"


# -- waiting for the backend -------------------------------------------------------------------------------


def _relay_settings() -> RelaySettings:
    return RelaySettings(base_backoff_s=0.01, max_backoff_s=0.05, max_attempts=2)


async def test_wait_for_backend_keeps_trying_past_max_attempts() -> None:
    failures = [RetryableSinkError(f"connection refused #{i}") for i in range(5)]
    calls = 0

    async def connect() -> None:
        nonlocal calls
        calls += 1
        if failures:
            raise failures.pop(0)

    health = BackendHealth()
    ok = await wait_for_backend(connect, _relay_settings(), asyncio.Event(), health, what="t",
                                token_configured=False)
    assert ok and calls == 6  # 5 failures with max_attempts = 2, then connected
    assert health.describe() == "ok"


async def test_401_without_token_and_unusable_schema_are_fatal_but_do_not_end_the_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = asyncio.Event()
    health = BackendHealth()
    seen: list[str] = []
    errors = [
        RetryableSinkError("schema introspection: unauthorized (HTTP 401)", code=401),
        ConfigError("the backend schema lacks ImagingStudyCreate"),
    ]

    async def connect() -> None:
        if errors:
            raise errors.pop(0)
        seen.append(health.describe())
        stop.set()
        raise RetryableSinkError("connection refused")

    with caplog.at_level("ERROR", logger="ingest.relay.relay"):
        ok = await asyncio.wait_for(
            wait_for_backend(connect, _relay_settings(), stop, health, what="t", token_configured=False),
            timeout=5,
        )
    assert not ok  # stopped, never gave up by itself
    assert seen == ["fatal: the backend schema lacks ImagingStudyCreate"]
    messages = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("requires a token (HTTP 401) and none is configured" in m for m in messages)
    assert any("lacks ImagingStudyCreate" in m for m in messages)


async def test_wait_for_backend_returns_promptly_on_stop() -> None:
    stop = asyncio.Event()

    async def connect() -> None:
        raise RetryableSinkError("connection refused")

    settings = RelaySettings(base_backoff_s=30, max_backoff_s=300)
    waiting = asyncio.create_task(
        wait_for_backend(connect, settings, stop, BackendHealth(), what="t", token_configured=False)
    )
    await asyncio.sleep(0.1)
    stop.set()
    assert await asyncio.wait_for(waiting, timeout=2) is False


async def test_relay_claims_nothing_until_connected_and_wired_then_uses_the_wiring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ingest.relay.links
    from ingest.app.wiring import mapping_options, wire_links
    from ingest.relay.build import StudyBuilder
    from ingest.relay.links import Links
    from ingest.relay.relay import Relay, run_relay
    from tests.relay.test_relay import FakeSink, record

    settings = Settings(data_dir=tmp_path, relay=RelaySettings(
        stable_age_s=0, base_backoff_s=0.01, max_backoff_s=0.05, max_attempts=1, poll_interval_s=0.02,
    ))
    sink = FakeSink()
    connects: list[str] = []
    wirings: list[str] = []

    async def connect() -> None:
        connects.append("try")
        if len(connects) < 3:
            raise RetryableSinkError("connection refused")

    async def prepare_links(
        _patient: Any, _endpoint: Any, _sink: Any, *, metrics: Any = None, **_options: Any
    ) -> Links:
        wirings.append("try")
        assert sink.calls["find"] == 0  # nothing pushed before the wiring is done
        if len(wirings) < 3:
            raise RetryableSinkError("Endpoint lookup: HTTP 503", code=503)
        return Links(endpoint_reference="Endpoint/e1", link=None)

    monkeypatch.setattr(ingest.relay.links, "prepare_links", prepare_links)
    uid = "1.2.826.0.1.3680043.8.498.77"
    with SQLiteStateStore(tmp_path / "state.sqlite3", node="t") as store:
        now = datetime.now(UTC)
        store.add_instance(record(uid, 1, 1), source="test", spool_name=None, digest="d", now=now, due_at=now)
        relay = Relay(store, sink, StudyBuilder(mapping_options(settings)), settings.relay, metrics=None)
        stop = asyncio.Event()
        wire = functools.partial(wire_links, settings, sink)  # type: ignore[arg-type]
        task = asyncio.create_task(run_relay(relay, connect, wire, stop))
        try:
            await until(lambda: sink.resources, 5.0, "study pushed")
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=5)
        row = store.study(uid)
    assert len(connects) == 3 and len(wirings) == 3  # both steps waited past max_attempts = 1
    [resource] = sink.resources.values()
    assert resource["endpoint"] == [{"reference": "Endpoint/e1"}]
    assert row is not None and row.state.value == "pushed" and relay.backend.describe() == "ok"


async def test_wait_for_backend_stops_during_a_connect_that_hangs() -> None:
    stop = asyncio.Event()
    cancelled = asyncio.Event()

    async def connect() -> None:  # a backend that accepts the connection and never answers
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    waiting = asyncio.create_task(
        wait_for_backend(connect, _relay_settings(), stop, BackendHealth(), what="t", token_configured=False)
    )
    await asyncio.sleep(0.1)
    stop.set()
    assert await asyncio.wait_for(waiting, timeout=2) is False
    assert cancelled.is_set()


# -- Storage Commitment: a requester that never answers delays no one else's report ---------------------


def _ask_commitment(port: int, calling_ae: str, transaction_uids: list[str]) -> list[int]:
    """N-ACTION requests from ``calling_ae`` (without the SCP role: reports come on a new association)."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    from tests.sources.dimse.test_commitment import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH
    from tests.sources.dimse.test_commitment import _request as action_information

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="INGEST")
    assert assoc.is_established
    try:
        statuses = []
        for uid in transaction_uids:
            status, _ = assoc.send_n_action(
                action_information(uid, [("1.2.840.10008.5.1.4.1.1.2", f"{uid}.1")]), 1,
                STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE,
            )
            statuses.append(int(status.Status))
        return statuses
    finally:
        assoc.release()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.slow
async def test_a_commitment_requester_that_never_answers_delays_no_other_requesters_report(
    tmp_path: Path,
) -> None:
    from ingest.config import CommitmentSettings
    from tests.relay.test_reports import Tarpit
    from tests.sources.dimse.test_commitment import report_scp

    tarpit = Tarpit()
    dicom_port, reply_port, backend_port = free_port(), free_port(), free_port()
    settings = Settings(
        data_dir=tmp_path / "data",
        listener=ListenerSettings(
            port=dicom_port,
            allowed_calling_aes=[
                {"ae": "TARPIT", "host": "127.0.0.1", "port": tarpit.port},
                {"ae": "REQUESTER", "host": "127.0.0.1", "port": reply_port},
            ],
            commitment=CommitmentSettings(report_timeout_s=8, retry_base_s=600, retry_max_s=600),
        ),
        admin=AdminSettings(enabled=False),
        backend={"url": f"http://127.0.0.1:{backend_port}{GRAPHQL}", "timeout_s": 2, "token_env": None},
    )
    try:
        with report_scp(reply_port, ae_title="REQUESTER") as reports:
            async with serving(settings):
                tarpitted = [f"1.2.826.0.1.3680043.10.99.{n}" for n in range(1, 7)]
                await until(lambda: _accepts(dicom_port), 10, "the listener up")
                assert await asyncio.to_thread(_ask_commitment, dicom_port, "TARPIT", tarpitted) == [0] * 6
                await until(lambda: tarpit.open == 1, 5, "a report association to the tarpit")
                started = time.monotonic()
                assert await asyncio.to_thread(
                    _ask_commitment, dicom_port, "REQUESTER", ["1.2.826.0.1.3680043.10.98.1"]
                ) == [0]
                await until(lambda: not reports.received.empty(), 5, "the other requester's report")
                assert time.monotonic() - started < 5
                assert tarpit.open == 1  # the tarpit still hangs, on one connection
                event_type, info = reports.get()
                assert event_type == 2  # its instance was never received: 0x0112
                assert str(info.TransactionUID) == "1.2.826.0.1.3680043.10.98.1"
            assert tarpit.most == 1
    finally:
        tarpit.close()
