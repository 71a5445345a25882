"""``ingest serve``: listener, watcher, relay, admin endpoint and (optionally) the embedded backend.

Intake never waits for the backend (``docs/reliability.md``): the state store is opened, then the admin
endpoint, the listener and the watcher start at once; the relay task connects to the backend with capped
backoff and no attempt limit, wires ``[endpoint]`` / ``[patient]``, and only then claims studies, so
whatever arrives meanwhile stays pending and is pushed once the backend answers.

``/healthz`` computes each part's state when it is asked (see :class:`Health`): HTTP 503 when intake
cannot accept (listener or watcher down, disk below ``[admin] min_free_bytes``, spool full by ``[spool]
max_bytes`` / ``min_free_bytes``, data dir not writable, state store unreachable); HTTP 200 with
status ``degraded`` when intake accepts but the backend or the relay is not well (studies wait as
pending); HTTP 200 with status ``ok`` otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ingest.adapters.datadir import DataDirLock
from ingest.app.startup import open_checked_store
from ingest.app.wiring import (
    attach_commitment_reports,
    relay_before_backend,
    start_sink,
    token_configured,
    wire_links,
)
from ingest.clock import Timekeeper
from ingest.config import Settings
from ingest.core.records import InstanceRecord
from ingest.errors import StoreError
from ingest.exitcodes import ExitCode
from ingest.intake.retention import DiskBudget, open_retention, run_retention
from ingest.intake.sweep import sweep_at_start
from ingest.logs import printable
from ingest.metrics import Metrics
from ingest.ports import StateStore, StudyState
from ingest.relay.relay import BackendHealth, run_relay, short_reason

__all__ = ["Health", "admin_app", "serve"]

LOGGER = logging.getLogger(__name__)

#: A Study Instance UID no study has (PS3.5 9.1 UID under the 2.25 root): the store's cheap health query.
_PROBE_UID = "2.25.0"
#: Probe files start like the spool's temporary files, so a crash leftover is swept with them.
_PROBE_PREFIX = ".tmp-healthz-"
#: Parts that decide whether intake can accept (503 when one of them is not "ok").
_INTAKE_PARTS = ("listener", "watcher", "disk", "spool", "data_dir", "store")


class Health:
    """The parts of a running ``ingest serve`` and their state, computed when ``/healthz`` asks.

    Parameters
    ----------
    settings:
        ``data_dir`` (the spool's folder is probed), ``[admin] min_free_bytes``, and whether the
        listener and the watcher are expected to run.
    store:
        The state store; one cheap query per check.
    backend:
        What the relay last learnt about the backend (``None``: not reported).
    check_timeout_s:
        Longest wait for one file system or store check; a check that takes longer is reported as
        failing (its thread finishes in the background).

    Attributes
    ----------
    listener:
        The running listener, once started.
    watcher, relay:
        The watcher's and the relay's tasks, once started.
    budget:
        The spool's disk budget (the ``spool`` part: ``full: ...`` while nothing more fits), once made.
    """

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        backend: BackendHealth | None,
        *,
        check_timeout_s: float = 2.0,
    ) -> None:
        self.data_dir = settings.data_dir
        self.min_free_bytes = settings.admin.min_free_bytes
        self.store = store
        self.backend = backend
        self.expect_listener = settings.listener.enabled
        self.expect_watcher = settings.watch.folder is not None
        self.check_timeout_s = check_timeout_s
        self.listener: Any = None
        self.budget: DiskBudget | None = None  # [spool] max_bytes / min_free_bytes (the ``spool`` part)
        self.watcher: asyncio.Task[Any] | None = None
        self.relay: asyncio.Task[Any] | None = None

    @property
    def probe_dir(self) -> Path:
        """Where received files are written: the spool, or the data dir before the spool exists."""
        spool = self.data_dir / "spool"
        return spool if spool.is_dir() else self.data_dir

    async def report(self) -> tuple[int, dict[str, Any]]:
        """Check every part now.

        Returns
        -------
        tuple of (int, dict)
            The HTTP status (200 or 503) and the JSON body: ``status`` (``ok`` / ``degraded`` /
            ``failing``), ``accepting`` (whether intake can accept), one entry per part (``"ok"`` or
            what is wrong) and ``disk_free_bytes``.
        """
        late = "unknown: no answer in time"
        (disk, free, data_dir), store = await asyncio.gather(
            self._bounded(self._check_files, (late, None, late)),
            self._bounded(self._check_store, "unavailable: no answer in time"),
        )
        parts: dict[str, str] = {}
        if self.expect_listener:
            parts["listener"] = _listener_state(self.listener)
        if self.expect_watcher:
            parts["watcher"] = _task_state(self.watcher)
        parts["disk"] = disk
        if self.budget is not None:
            parts["spool"] = await self._bounded(self.budget.describe, late)
        parts["data_dir"] = data_dir
        parts["store"] = store
        parts["relay"] = _task_state(self.relay)
        if self.backend is not None:
            parts["backend"] = self.backend.describe()
        accepting = all(parts[p] == "ok" for p in _INTAKE_PARTS if p in parts)
        everything = all(v == "ok" for v in parts.values())
        status = "ok" if everything else "degraded" if accepting else "failing"
        body: dict[str, Any] = {"status": status, "accepting": accepting, **parts, "disk_free_bytes": free}
        return (200 if accepting else 503), body

    async def _bounded(self, check: Callable[[], Any], late: Any) -> Any:
        try:
            return await asyncio.wait_for(asyncio.to_thread(check), timeout=self.check_timeout_s)
        except TimeoutError:
            return late

    def _check_files(self) -> tuple[str, int | None, str]:
        """(disk state, free bytes, data dir state) of the folder received files go to."""
        folder = self.probe_dir
        try:
            st = os.statvfs(folder)
        except OSError as exc:
            return f"unknown: {_os_reason(exc)}", None, _writable(folder)
        free = st.f_bavail * st.f_frsize
        disk = "ok" if free >= self.min_free_bytes else f"low ({free} bytes free)"
        return disk, free, _writable(folder)

    def _check_store(self) -> str:
        try:
            self.store.study(_PROBE_UID)
        except StoreError as exc:
            return f"unavailable: {short_reason(exc)}"
        except Exception as exc:  # a health check never fails itself
            LOGGER.debug("state store health query failed", exc_info=True)
            return f"unavailable: {type(exc).__name__}"
        return "ok"


def _writable(folder: Path) -> str:
    """``ok`` when a file can be created, written and removed in ``folder`` now.

    ``os.access`` alone is not enough (it ignores read-only mounts on some systems and is always true
    for root); the probe file is what a received instance would need.
    """
    if not os.access(folder, os.W_OK | os.X_OK):
        return "not writable: permission denied"
    probe = folder / f"{_PROBE_PREFIX}{secrets.token_hex(8)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(probe)
        return f"not writable: {_os_reason(exc)}"
    return "ok"


def _os_reason(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "error")
    return f"{name} ({exc.strerror})" if exc.strerror else name


def _listener_state(listener: Any) -> str:
    if listener is None:
        return "not running"
    thread = getattr(listener, "_thread", None)  # the thread serving associations
    return "ok" if thread is not None and thread.is_alive() else "stopped"


def _task_state(task: asyncio.Task[Any] | None) -> str:
    if task is None:
        return "not running"
    if not task.done():
        return "ok"
    if task.cancelled():
        return "stopped: cancelled"
    exc = task.exception()
    return f"stopped: {type(exc).__name__}" if exc is not None else "stopped"


def _log_if_failed(what: str) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            LOGGER.error("%s stopped with an error; /healthz reports it", what, exc_info=exc)

    return done


def admin_app(metrics: Metrics, store: StateStore, health: Health) -> web.Application:
    """``/healthz`` (see :class:`Health`: 200 while intake accepts, else 503) and Prometheus ``/metrics``."""

    async def healthz(_: web.Request) -> web.Response:
        status, body = await health.report()
        return web.json_response(body, status=status)

    async def metrics_view(_: web.Request) -> web.Response:
        try:
            pending = await asyncio.to_thread(store.studies, StudyState.PENDING)
            metrics.relay_queue_depth.set(len(pending))
        except Exception:  # metrics must not fail because the store is down
            LOGGER.debug("could not read queue depth", exc_info=True)
        return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_view)
    return app


def _read_spooled(max_inflated_bytes: int, path: Path) -> tuple[InstanceRecord, str]:
    """A spool file's record and digest, for the start-up sweep's re-admission."""
    from ingest.adapters.dicomfile import read_header

    parsed = read_header(path, max_inflated_bytes=max_inflated_bytes)
    return parsed.record, parsed.digest


async def serve(settings: Settings, stop: asyncio.Event, *, adopt_spool: bool = False) -> int:
    """Run until ``stop`` is set; returns the process exit code.

    ``adopt_spool`` (``--adopt-spool``): start on a new or empty state store although the spool holds
    files, and admit them all again (:mod:`ingest.app.startup`).
    """
    metrics = Metrics()
    # wall clock for due times, monotonic time guarding the destructive timers (docs/reliability.md)
    timekeeper = Timekeeper()
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # one service per data dir: the lock's holder may remove every temporary file at start
    owner = DataDirLock(settings.data_dir)
    if not owner.held:
        # the data dir's lock first: a second service would fight the first over its ports and files
        LOGGER.error("data dir %s is in use by a running ingest: refusing to start (one service per data "
                     "dir; stop the other or give this one another --data-dir)",
                     printable(str(settings.data_dir)))
        return ExitCode.FATAL
    from ingest.app.preflight import problems

    found = await asyncio.to_thread(problems, settings, command="serve" if settings.listener.enabled
                                    else "watch")
    if found:  # every port, file and secret, checked before anything binds (README "Configuration")
        for problem in found:
            LOGGER.error("cannot start: %s", problem)
        owner.release()
        return ExitCode.FATAL
    try:
        # a damaged store, or a new/empty one while the spool holds acknowledged files, refuses the start
        store = await asyncio.to_thread(open_checked_store, settings, adopt_spool=adopt_spool)
    except BaseException:
        owner.release()
        raise
    code = ExitCode.OK
    try:
        # before any listener/watcher writes: spool files no instance row names are admitted again (a
        # restored or replaced store, a crash before a row's commit), and temporary files are removed
        # (of any age when this process holds the lock: a kill -9 during a receive)
        await asyncio.to_thread(
            sweep_at_start, settings.data_dir, store, owns_data_dir=owner.held,
            read=functools.partial(_read_spooled, settings.listener.max_inflated_bytes),
            stable_age_s=settings.relay.stable_age_s, quarantine_max_bytes=settings.quarantine.max_bytes,
        )
        # [spool]: the one spool of this process (a running total of its bytes) and its retention
        budget, retention = await asyncio.to_thread(open_retention, settings, store, metrics=metrics)
        async with contextlib.AsyncExitStack() as stack:
            # the embedded backend (when no URL is set) starts here; nothing talks to a backend yet
            sink = await start_sink(settings, stack)
            # [endpoint] / [patient] are wired by the relay task once the backend answers
            relay = relay_before_backend(settings, store, sink, metrics=metrics)
            health = Health(settings, store, relay.backend)
            health.budget = budget

            if settings.admin.enabled:
                from ingest.app.admin import mount_status  # the status page at / (README "Status page")

                app = admin_app(metrics, store, health)
                # the relay's builder is replaced once the backend answers ([patient] / [endpoint] links):
                # the page asks for the current one each time
                mount_status(app, settings, store, health, metrics, node=relay.node,
                             builder=lambda records: relay.build(records))
                runner = web.AppRunner(app, access_log=None)
                await runner.setup()
                site = web.TCPSite(runner, settings.admin.host, settings.admin.port)
                await site.start()
                stack.push_async_callback(runner.cleanup)
                LOGGER.info("admin endpoint on http://%s:%d (/, /healthz, /metrics)",
                            settings.admin.host, settings.admin.port)

            tasks: list[asyncio.Task[Any]] = []
            listener = None
            if settings.listener.enabled:
                from ingest.sources.dimse.listener import start_listener

                listener = await start_listener(settings, store, relay.wake, metrics, budget=budget)
                if listener.commitment is not None:  # its report sender ([listener.commitment])
                    attach_commitment_reports(
                        settings, store, listener.commitment, metrics=metrics, timekeeper=timekeeper
                    )
                stack.push_async_callback(listener.aclose)
                health.listener = listener
            if settings.watch.folder is not None:
                from ingest.sources.dropfolder import run_watcher

                watcher = asyncio.create_task(
                    run_watcher(settings, store, relay.wake, metrics, stop, budget=budget)
                )
                watcher.add_done_callback(_log_if_failed("the watcher"))
                tasks.append(watcher)
                health.watcher = watcher

            relay_task = asyncio.create_task(run_relay(
                relay, sink.connect,
                functools.partial(wire_links, settings, sink, metrics=metrics, store=store), stop,
                token_configured=token_configured(settings),
            ))
            relay_task.add_done_callback(_log_if_failed("the relay"))
            health.relay = relay_task
            if settings.sync.sources:  # [[sync.sources]]: each synced on its interval (README)
                from ingest.app.sync import run_sources

                sync_task = asyncio.create_task(run_sources(settings, store, relay, stop, metrics=metrics))
                sync_task.add_done_callback(_log_if_failed("sync"))
                tasks.append(sync_task)
            if retention.active:  # [spool] retain / quarantine_retain, in the background
                retention_task = asyncio.create_task(run_retention(
                    retention, stop, interval_s=settings.spool.retention_interval_s, timekeeper=timekeeper
                ))
                retention_task.add_done_callback(_log_if_failed("spool retention"))
                tasks.append(retention_task)
            LOGGER.info("ingest serve running (node %s); SIGTERM or Ctrl-C stops it", relay.node)
            await stop.wait()
            LOGGER.info("stopping: no new associations, finishing in-flight work")
            # 1. the listener stops accepting and lets in-flight stores finish (they are acknowledged
            #    only once durable); 2. the watcher stops after its current file; 3. the relay finishes
            #    its current writes. Whatever is left is in the state store for the next start.
            if listener is not None:
                await listener.aclose()
            if tasks:
                _, still = await asyncio.wait(tasks, timeout=10)
                for t in still:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            (relay_outcome,) = await asyncio.gather(relay_task, return_exceptions=True)
            if isinstance(relay_outcome, BaseException):
                code = ExitCode.FATAL  # logged when it happened
            totals = relay.totals.results
            LOGGER.info(
                "shutdown ◆ %d created ◆ %d updated ◆ %d unchanged ◆ %d retried ◆ %d dead",
                totals["created"], totals["updated"], totals["unchanged"], totals["retried"], totals["dead"],
            )
    finally:
        store.close()
        owner.release()
    return code
