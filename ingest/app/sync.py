"""``ingest sync --from SOURCE``: ImagingStudy resources for every study a PACS holds, from its C-FIND or
QIDO-RS answers, without moving a pixel (README "Indexing an existing PACS", docs/architecture.md "Sync").

One run: take the source's lease, walk the PACS (``ingest.sources.sync.run``), admit and reconcile each
study, follow ``[sync] on_study_gone`` for the studies it no longer lists, push what changed with the
relay (the Endpoint is the source's WADO-RS URL), record the run and move the watermark. ``--dry-run``
prints the ImagingStudies and touches no store. :func:`sync_once` is also what ``ingest serve`` runs for
each configured source on its interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any, TextIO

from ingest.config import Settings, SyncSource
from ingest.errors import ConfigError, SyncSourceError
from ingest.exitcodes import ExitCode
from ingest.logs import printable
from ingest.ports import StudyState

if TYPE_CHECKING:
    from ingest.metrics import Metrics
    from ingest.relay.relay import Relay

__all__ = ["SyncOptions", "SyncSummary", "resolve_source", "run_sources", "run_sync", "sync_once"]

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncOptions:
    url: str | None = None  # --from
    name: str | None = None  # --name (or a configured source's)
    calling_ae: str | None = None
    query_limit: int | None = None
    since: date | None = None
    until: date | None = None
    studies: frozenset[str] = frozenset()
    full: bool = False
    dry_run: bool = False
    pretty: bool = False


@dataclass
class SyncSummary:
    source: str = ""
    counts: dict[str, Any] = field(default_factory=dict)
    studies: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str | None = None  # why the run did not happen (another node holds the source)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "instances": self.counts,
            "studies": {
                k: self.studies.get(k, 0) for k in ("created", "updated", "unchanged", "dead", "printed")
            },
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            **({"skipped": self.skipped} if self.skipped else {}),
        }

    def exit_code(self) -> ExitCode:
        if self.errors or self.skipped:
            return ExitCode.FATAL
        if self.studies.get("dead"):
            return ExitCode.DEAD
        if self.counts.get("bad_answers") or self.counts.get("conflicts"):
            return ExitCode.REJECTED
        return ExitCode.OK

    def rows(self) -> list[tuple[str, Any]]:
        c = self.counts
        rows: list[tuple[str, Any]] = [("source", self.source)]
        for key in ("studies", "series", "instances", "added", "unchanged", "withdrawn", "restored", "gone",
                    "bad_answers", "conflicts", "queries", "windows_split"):
            rows.append((key.replace("_", " "), c.get(key, 0)))
        for k in ("created", "updated", "unchanged", "dead", "printed"):
            if self.studies.get(k) or k != "printed":
                rows.append((f"studies {k}", self.studies.get(k, 0)))
        rows += [("errors", len(self.errors)), ("seconds", f"{self.seconds:.2f}")]
        return rows


def _derived_name(url: str) -> str:
    """A source name for a ``--from`` URL that no configured source has: its host, port and AE / path."""
    rest = re.sub(r"^[a-z]+://", "", url.strip().rstrip("/"))
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", rest).strip("-._")[:64] or "source"


def resolve_source(settings: Settings, opts: SyncOptions) -> SyncSource:
    """The source a ``ingest sync`` run uses: a configured one (by ``--name``, or with the ``--from``
    URL), or one made of ``--from`` alone.

    Raises
    ------
    ConfigError
        Neither ``--from`` nor a configured ``--name``.
    """
    configured = {s.name: s for s in settings.sync.sources}
    if opts.name and opts.name in configured and not opts.url:
        source = configured[opts.name]
    elif opts.url:
        same = [s for s in settings.sync.sources if s.url.rstrip("/") == opts.url.rstrip("/")]
        if opts.name is None and same:
            source = same[0]
        else:
            try:
                source = SyncSource(name=opts.name or _derived_name(opts.url), url=opts.url)
            except ValueError as exc:
                raise ConfigError(f"ingest sync: {exc}") from exc
    else:
        raise ConfigError("ingest sync: give --from URL, or --name of a configured [[sync.sources]] source")
    if opts.calling_ae:
        source = source.model_copy(update={"calling_ae": opts.calling_ae})
    if opts.query_limit:
        source = source.model_copy(update={"query_limit": opts.query_limit})
    return source


def _settings_for(settings: Settings, source: SyncSource) -> Settings:
    """``settings`` with the Endpoint of ``source`` (its WADO-RS URL) when it has one."""
    from ingest.sources.sync.run import endpoint_of

    url = endpoint_of(source)
    if url is None:
        return settings
    return settings.model_copy(update={"endpoint": settings.endpoint.model_copy(update={"wado_rs_url": url})})


def _walker(settings: Settings, source: SyncSource, metrics: Metrics | None) -> Any:
    from ingest.sources.sync.run import Walker, open_finder

    cfg = settings.sync
    return Walker(open_finder(source, cfg), query_limit=source.query_limit or cfg.query_limit,
                  concurrency=cfg.concurrency,
                  attempts=cfg.attempts, retry_base_s=cfg.retry_base_s, metrics=metrics)


async def run_sync(settings: Settings, opts: SyncOptions, *, stdout: TextIO, stderr: TextIO) -> SyncSummary:
    """``ingest sync``: one run (or a dry run) over the source ``opts`` names."""
    source = resolve_source(settings, opts)
    started = time.perf_counter()
    if opts.dry_run:
        summary = await asyncio.to_thread(_dry_run, settings, source, opts, stdout)
    else:
        from ingest.app.wiring import open_store

        store = open_store(settings)
        try:
            summary = await sync_once(settings, source, store, opts=opts, relay=None)
        finally:
            store.close()
    summary.seconds = time.perf_counter() - started
    for error in summary.errors:
        print(f"ingest sync: {printable(error)}", file=stderr)
    if summary.skipped:
        print(f"ingest sync: {printable(summary.skipped)}", file=stderr)
    return summary


def _dry_run(settings: Settings, source: SyncSource, opts: SyncOptions, stdout: TextIO) -> SyncSummary:
    from ingest.app.bundle import dry_run_study
    from ingest.sources.sync.run import SyncCounts, SyncScope

    settings = _settings_for(settings, source)
    walker = _walker(settings, source, None)
    counts = SyncCounts()
    summary = SyncSummary(source=source.name)
    try:
        for listing in walker.walk(SyncScope(opts.since, opts.until, opts.studies), counts):
            counts.instances += len(listing.records)
            if not listing.records:
                continue
            study = dry_run_study(settings, list(listing.records))
            stdout.write(json.dumps(study, ensure_ascii=False, indent=2 if opts.pretty else None) + "\n")
            summary.studies["printed"] = summary.studies.get("printed", 0) + 1
        stdout.flush()
    except SyncSourceError as exc:
        counts.errors.append(str(exc))
    finally:
        walker.finder.close()
    summary.counts = counts.as_dict()
    summary.errors = list(counts.errors)
    return summary


async def sync_once(
    settings: Settings,
    source: SyncSource,
    store: Any,
    *,
    opts: SyncOptions | None = None,
    relay: Relay | None = None,
    metrics: Metrics | None = None,
    every_s: float = 0.0,
    wake: Callable[[], None] | None = None,
) -> SyncSummary:
    """One run over ``source`` into ``store`` (module doc).

    ``relay``: ``ingest serve``'s (it pushes what the run touched as they become due; the Endpoint is
    then ``[endpoint]``'s); ``None``: a relay is wired here over the backend, with the source's Endpoint,
    and drained before returning. ``every_s``: skip the run unless the last one started that long ago
    (``ingest serve``'s interval; ``0``: run when no other node holds the source). ``wake``: called
    (from the run's thread) when something was admitted.
    """
    from ingest.relay.relay import utcnow
    from ingest.sources.sync.plan import parse_day
    from ingest.sources.sync.run import SyncCounts, SyncIntake, SyncScope, watermark_of

    opts = opts or SyncOptions()
    cfg = settings.sync
    summary = SyncSummary(source=source.name)
    owner = f"{settings.state.node_id or os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    started_at = utcnow()
    claimed = await asyncio.to_thread(store.sync_claim, source.name, owner=owner, now=started_at,
                                      lease_s=cfg.lease_s, every_s=every_s)
    if not claimed:
        summary.skipped = (f"source {source.name} is being synced by another process or node"
                           if every_s == 0 else "not due")
        return summary
    LOGGER.info("sync run of %s started at %s by %s", source.name, started_at.isoformat(), owner)
    since = opts.since
    incremental = not opts.full and since is None and not opts.studies and opts.until is None
    if incremental:
        mark = await asyncio.to_thread(store.sync_watermark, source.name)
        day = parse_day(mark or "")
        if day is not None:
            since = day - timedelta(days=cfg.overlap_days)
    scope = SyncScope(since, opts.until, opts.studies)
    counts = SyncCounts()
    pusher = _Pusher(_settings_for(settings, source), store) if relay is None else None
    intake = SyncIntake(store, name=source.name,
                        stable_age_s=0.0 if relay is None else settings.relay.stable_age_s,
                        on_study_gone=cfg.on_study_gone, metrics=metrics, wake=wake,
                        on_touched=pusher.add_threadsafe if pusher is not None else None)
    status, error = "ok", None
    try:
        walker = _walker(settings, source, metrics)
    except ConfigError as exc:
        if pusher is not None:
            await pusher.finish()
        await asyncio.to_thread(store.sync_finish, source.name, owner=owner, now=utcnow(), status="failed",
                                error=str(exc), counts={}, watermark=None)
        raise

    def read_all() -> None:
        try:
            for listing in walker.walk(scope, counts):
                intake(listing, counts)
            intake.reconcile_gone(scope, counts)
        finally:
            walker.finder.close()

    async def keep_lease() -> None:  # a run longer than [sync] lease_s keeps its source
        while True:
            await asyncio.sleep(cfg.lease_s / 3)
            if not await asyncio.to_thread(store.sync_renew, source.name, owner=owner, now=utcnow(),
                                           lease_s=cfg.lease_s):
                LOGGER.warning("sync of %s: the lease was taken over by another node", source.name)
                return

    renewing = asyncio.ensure_future(keep_lease())
    try:
        await asyncio.to_thread(read_all)
    except SyncSourceError as exc:
        counts.errors.append(str(exc))
    except BaseException as exc:  # (interrupted, or a fault of ingest's own): the lease is given back
        if pusher is not None:
            await pusher.abandon()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(store.sync_finish, source.name, owner=owner, now=utcnow(),
                                    status="failed", error=type(exc).__name__, counts=counts.as_dict(),
                                    watermark=None)
        raise
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await renewing
    if counts.errors:
        status, error = "failed", counts.errors[0]
    try:
        touched = set(intake.touched)
        for uid in sorted(intake.listed - touched):  # listed, but never pushed clean (an earlier failure)
            row = await asyncio.to_thread(store.study, uid)
            if row is not None and (row.state is not StudyState.PUSHED or row.dirty):
                touched.add(uid)
        if pusher is not None:
            for uid in sorted(touched - intake.touched):
                pusher.add(uid)
            summary.studies = await pusher.finish()
        if summary.studies.get("dead"):
            status = "failed" if status == "failed" else "dead"
    finally:
        done = counts.as_dict()
        # the watermark moves only past a run that asked everything since the last one (or everything)
        watermark = watermark_of(started_at) if status != "failed" and (opts.full or incremental) else None
        await asyncio.to_thread(store.sync_finish, source.name, owner=owner, now=utcnow(), status=status,
                                error=error, counts=done, watermark=watermark)
        if metrics is not None:
            metrics.sync_runs.labels(source=source.name, outcome=status).inc()
    summary.counts = counts.as_dict()
    summary.errors = list(counts.errors)
    LOGGER.info("sync of %s: %s", source.name, json.dumps(summary.counts, sort_keys=True))
    return summary


class _Pusher:
    """Pushes the studies a one-shot run touched, while the walk goes on: the backend is started and the
    relay wired (the source's Endpoint) when the first study is handed over, never for a run that
    touched nothing; :meth:`finish` waits for the last push and returns the relay's totals."""

    def __init__(self, settings: Settings, store: Any) -> None:
        self.settings = settings
        self.store = store
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.task: asyncio.Task[dict[str, int]] | None = None

    def add(self, study_uid: str) -> None:
        """Hand a study over (on the loop)."""
        if self.task is None:
            self.task = asyncio.ensure_future(self._run())
        self.queue.put_nowait(study_uid)

    def add_threadsafe(self, study_uid: str) -> None:
        """Hand a study over from the run's thread."""
        self.loop.call_soon_threadsafe(self.add, study_uid)

    async def finish(self) -> dict[str, int]:
        await asyncio.sleep(0)  # (hand-overs scheduled from the run's thread come first)
        if self.task is None:
            return {}
        self.queue.put_nowait(None)
        return await self.task

    async def abandon(self) -> None:
        """Stop pushing (the run failed); what was not pushed stays pending in the store."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task

    async def _run(self) -> dict[str, int]:
        from ingest.app.wiring import open_sink, wired_relay

        async with open_sink(self.settings, embedded_port=0) as sink:
            relay = await wired_relay(self.settings, self.store, sink)
            done = False
            while not done:
                batch = {await self.queue.get()}
                while not self.queue.empty():
                    batch.add(self.queue.get_nowait())
                done = None in batch
                await relay.drain(sorted(uid for uid in batch if uid is not None))
        results = dict(relay.totals.results)
        results.pop("retried", None)
        return results


async def run_sources(
    settings: Settings, store: Any, relay: Relay, stop: asyncio.Event, *, metrics: Metrics | None = None
) -> None:
    """``ingest serve``: sync each ``[[sync.sources]]`` every ``interval_s``, until ``stop`` is set.

    Several nodes sharing one PostgreSQL store run each source once per interval: a run starts only
    when the store grants this node the source's lease and its last run (by any node) started an
    interval ago (:meth:`~ingest.adapters.state.sync.SyncStore.sync_claim`). The studies a run
    touches are pushed by ``relay`` as they become due; a run that fails is logged and recorded, and
    the next interval tries again.
    """
    sources = settings.sync.sources
    if not sources:
        return
    loop = asyncio.get_running_loop()

    def wake() -> None:  # from the run's thread
        loop.call_soon_threadsafe(relay.wake)

    poll = max(0.5, min(30.0, min(s.interval_s for s in sources) / 4))
    while not stop.is_set():
        for source in sources:
            if stop.is_set():
                break
            try:
                summary = await sync_once(settings, source, store, relay=relay, metrics=metrics,
                                          every_s=source.interval_s, wake=wake,
                                          opts=SyncOptions(full=source.full))
            except Exception as exc:  # a source that cannot run (configuration, store) is logged, not fatal
                LOGGER.error("sync of %s could not run: %s", source.name, printable(exc))
                continue
            if summary.skipped is None:
                LOGGER.info("sync run of %s done: %d instances, %d added, %d withdrawn, %d errors",
                            source.name, summary.counts.get("instances", 0), summary.counts.get("added", 0),
                            summary.counts.get("withdrawn", 0), len(summary.errors))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), poll)
