"""Spool retention and the disk budget (docs/architecture.md "Retention and the disk budget").

Three parts, used by ``ingest serve`` / ``ingest watch`` and by whatever else removes accepted bytes:

- :func:`release_bytes` is the ONE way accepted bytes leave ``ingest``: the rows are marked first
  (``bytes_removed_at``, ``bytes_removed_reason``, ``spool_name`` cleared) and their in-row bytes deleted
  in the same transaction, then the spool files are unlinked. A crash in between leaves files no row
  names; the start-up sweep removes them. Retention calls it, and so does the IOCM rejection of
  instances (113037 / 113039).
- :class:`DiskBudget` is asked by the listener and the watcher before they write an instance's bytes.
  It refuses (the listener answers 0xA700, the watcher leaves the file where it is) when the spool files
  and in-row bytes together would pass ``[spool] max_bytes``, or the spool's file system would keep
  fewer than ``[spool] min_free_bytes`` free. It keeps a running total (the shared :class:`Spool`
  tracks its files; in-row bytes are added as they are committed) and never scans the folder per
  instance.
- :class:`Retention` removes, in the background and in small batches, the bytes ``[spool] retain`` no
  longer keeps (``until_pushed``: once the study is pushed; a duration: that long after its last push),
  never those of an instance under a Storage Commitment hold (``instances.hold_until``), and the
  quarantine's files older than ``[spool] quarantine_retain``. Each batch is one short transaction, so
  intake is never blocked for longer than one batch's commit. Its passes run at the time of
  :meth:`ingest.clock.Timekeeper.destructive_now`: after the wall clock steps forward, nothing is
  released (retention or the end of a commitment hold) until as much time has really passed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from ingest.adapters.spool import Quarantine, Spool
from ingest.clock import Timekeeper
from ingest.config import Settings, SpoolSettings
from ingest.errors import StoreError, StoreUnavailableError
from ingest.metrics import Metrics
from ingest.ports import StateStore

__all__ = [
    "MAX_BYTES",
    "MIN_FREE_BYTES",
    "REASON_RETAIN",
    "SQLITE_RESERVE_BYTES",
    "DiskBudget",
    "Retention",
    "RetentionPass",
    "SpoolFullError",
    "open_retention",
    "release_bytes",
    "run_retention",
]

LOGGER = logging.getLogger(__name__)

#: Refusal reasons of the disk budget (``ingest_spool_refusals_total{reason}``, ``/healthz`` ``spool``).
MAX_BYTES: Final = "max_bytes"
MIN_FREE_BYTES: Final = "min_free_bytes"

#: ``bytes_removed_reason`` of the retention policy (the quarantine's own is counted as
#: ``quarantine_retention``; its files have no rows).
REASON_RETAIN: Final = "retention"
#: Seconds between two WARNING lines about refusals of one reason (each refusal is counted).
_WARN_EVERY_S: Final = 60.0


class SpoolFullError(StoreUnavailableError):
    """The disk budget refused bytes before they were written (``reason``: :data:`MAX_BYTES` or
    :data:`MIN_FREE_BYTES`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the spool is full ([spool] {reason})")
        self.reason = reason


def release_bytes(
    store: StateStore,
    spool: Spool,
    sop_uids: Sequence[str],
    *,
    reason: str,
    now: datetime,
    budget: DiskBudget | None = None,
    metrics: Metrics | None = None,
    respect_holds: bool = False,
) -> int:
    """Remove the accepted bytes of ``sop_uids``; their rows stay (docs/architecture.md "Retention and
    the disk budget").

    The rows are marked first (``bytes_removed_at`` = ``now``, ``bytes_removed_reason`` = ``reason``,
    ``spool_name`` cleared) and their in-row bytes deleted, in one transaction; then their spool files
    are unlinked. Instances already released, or unknown, are skipped. A file that cannot be unlinked is
    logged and left to the start-up sweep (no row names it any more).

    By default this removes what it is asked to, commitment holds included: an IOCM rejection is an
    explicit instruction to delete. Retention passes ``respect_holds=True``: an instance whose
    commitment hold runs past ``now`` is skipped, checked in the same transaction that marks the rows
    (a commitment decided after :meth:`ingest.ports.RetentionState.releasable` listed it still wins).

    Parameters
    ----------
    store:
        The state store.
    spool:
        The spool holding the files (the process's shared one, so its running total stays right).
    sop_uids:
        SOP Instance UIDs whose bytes go.
    reason:
        Recorded with each row (``retention``, ``iocm:113039``...), a short code without patient data.
    now:
        Timezone-aware time recorded with each row.
    budget:
        The disk budget whose in-row total to lower, if any.
    metrics:
        ``ingest_spool_released_total{reason}`` / ``ingest_spool_released_bytes_total{reason}``, if any.
    respect_holds:
        Skip instances under a commitment hold at ``now``.

    Returns
    -------
    int
        How many instances had their bytes released.

    Raises
    ------
    StoreUnavailableError, StoreError
        When the rows cannot be marked (nothing was removed).
    """
    if not sop_uids:
        return 0
    released = store.release_instance_bytes(
        sop_uids, reason=reason, now=now, unless_held_at=now if respect_holds else None
    )
    in_row = sum(r.in_row_bytes for r in released)
    freed = in_row
    for item in released:
        if item.spool_name is None:
            continue
        try:
            size = _size(spool, item.spool_name)
            spool.remove(item.spool_name)
            freed += size
        except (StoreError, ValueError) as exc:
            LOGGER.warning(
                "could not remove spool file %s (the start-up sweep will): %s", item.spool_name, exc
            )
    if budget is not None and in_row:
        budget.add_in_row(-in_row)
    if metrics is not None and released:
        metrics.spool_released.labels(reason=reason).inc(len(released))
        metrics.spool_released_bytes.labels(reason=reason).inc(freed)
    if released:
        LOGGER.info("released the bytes of %d instances (%d bytes, reason %s)", len(released), freed, reason)
    return len(released)


def _size(spool: Spool, name: str) -> int:
    """The size of spool file ``name`` (0 when it is gone or cannot be read)."""
    try:
        return spool.path(name).lstat().st_size
    except OSError:
        return 0


class DiskBudget:
    """Whether the next instance's bytes may be written (module doc).

    Thread-safe. The spool files are counted by ``spool`` (the one :class:`Spool` the listener, the
    watcher and retention share: it scanned its folder once when opened and tracks every write and
    removal since); in-row bytes start at ``in_row_bytes`` (the store's total at start) and follow
    :meth:`add_in_row`.

    Parameters
    ----------
    spool:
        The shared spool.
    max_bytes:
        ``[spool] max_bytes``: most bytes of spool files and in-row bytes together; ``None``: no cap.
    min_free_bytes:
        ``[spool] min_free_bytes``: free bytes the spool's file system keeps after a write.
    in_row_max_bytes:
        ``[spool] inline_max_bytes``: instances up to this size go into the state store, where SQLite
        writes them twice (its write-ahead log, then the database), so they are counted twice against
        the free space (once against ``max_bytes``).
    in_row_bytes:
        Instance bytes held in the state store when the service starts.
    store_reserve_bytes:
        Free space kept on top of ``min_free_bytes`` for a state database on the same file system:
        SQLite copies its write-ahead log into the database at a checkpoint (every ~4 MiB of log), so
        the database grows in bursts the free space seen at a check does not show yet.
    metrics:
        ``ingest_spool_refusals_total{reason}`` and ``ingest_spool_bytes``, if any.
    statvfs:
        How the free space is read (tests replace it).
    """

    def __init__(
        self,
        spool: Spool,
        *,
        max_bytes: int | None,
        min_free_bytes: int,
        in_row_max_bytes: int = 0,
        in_row_bytes: int = 0,
        store_reserve_bytes: int = 0,
        metrics: Metrics | None = None,
        statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
    ) -> None:
        self.store_reserve_bytes = store_reserve_bytes
        self.spool = spool
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.in_row_max_bytes = in_row_max_bytes
        self.metrics = metrics
        self._statvfs = statvfs
        self._lock = threading.Lock()
        self._in_row = max(0, in_row_bytes)
        self._warned: dict[str, float] = {}
        self._refused: int | None = None  # size of the last request, while it was refused
        self.last_refusal: str | None = None

    @classmethod
    def from_settings(
        cls,
        spool: Spool,
        cfg: SpoolSettings,
        *,
        in_row_bytes: int = 0,
        store_reserve_bytes: int = 0,
        metrics: Metrics | None = None,
    ) -> DiskBudget:
        """The budget of ``[spool] max_bytes`` / ``min_free_bytes``."""
        return cls(
            spool, max_bytes=cfg.max_bytes, min_free_bytes=cfg.min_free_bytes,
            in_row_max_bytes=cfg.inline_max_bytes, in_row_bytes=in_row_bytes,
            store_reserve_bytes=store_reserve_bytes, metrics=metrics,
        )

    @property
    def used(self) -> int:
        """Bytes counted against ``max_bytes``: spool files plus in-row bytes."""
        with self._lock:
            in_row = self._in_row
        return self.spool.bytes_used() + in_row

    @property
    def in_row(self) -> int:
        """In-row instance bytes counted now."""
        with self._lock:
            return self._in_row

    def add_in_row(self, nbytes: int) -> None:
        """Count ``nbytes`` more (or, negative, fewer) in-row instance bytes."""
        with self._lock:
            self._in_row = max(0, self._in_row + nbytes)
        self._publish()

    def resync_in_row(self, total: int) -> None:
        """Set the in-row count to the store's ``total`` (retention does this once per pass, which
        corrects any release made without this budget)."""
        with self._lock:
            self._in_row = max(0, total)
        self._publish()

    def free_bytes(self) -> int | None:
        """Free bytes on the spool's file system for an unprivileged writer, or ``None`` when unknown."""
        try:
            st = self._statvfs(str(self.spool.root))
        except OSError:
            return None
        return int(st.f_bavail * st.f_frsize)

    def check(self, nbytes: int) -> str | None:
        """Why ``nbytes`` more would not fit (:data:`MAX_BYTES` / :data:`MIN_FREE_BYTES`), or ``None``;
        counts and logs nothing (``/healthz`` asks with 0)."""
        if self.max_bytes is not None and self.used + nbytes > self.max_bytes:
            return MAX_BYTES
        if self.min_free_bytes > 0:
            free = self.free_bytes()
            on_disk = 2 * nbytes if 0 < nbytes <= self.in_row_max_bytes else nbytes
            if free is not None and free - on_disk < self.min_free_bytes + self.store_reserve_bytes:
                return MIN_FREE_BYTES
        return None

    def refusal(self, nbytes: int, *, what: str = "an instance") -> str | None:
        """Ask before writing ``nbytes``: ``None`` to go ahead, else the reason, counted in
        ``ingest_spool_refusals_total{reason}`` and logged (a WARNING per reason at most once a minute).

        Until a later request fits, :meth:`describe` reports the spool full for one of this size.
        """
        reason = self.check(nbytes)
        with self._lock:
            self._refused = nbytes if reason is not None else None
        self.last_refusal = reason
        if reason is None:
            return None
        if self.metrics is not None:
            self.metrics.spool_refusals.labels(reason=reason).inc()
        now = time.monotonic()
        with self._lock:
            due = now - self._warned.get(reason, -_WARN_EVERY_S) >= _WARN_EVERY_S
            if due:
                self._warned[reason] = now
        if due:
            LOGGER.warning("spool full: refusing %s of %d bytes (%s)", what, nbytes, self._explain(reason))
        return reason

    def describe(self) -> str:
        """``ok``, or why the spool is full, for ``/healthz`` (``spool``): full when nothing more fits, or
        when the last request was refused and one of its size still would be."""
        with self._lock:
            refused = self._refused
        reason = self.check(0)
        if reason is None and refused is not None:
            reason = self.check(refused)
            if reason is not None:
                return f"full: {self._explain(reason)}, an instance of {refused} bytes does not fit"
        return "ok" if reason is None else f"full: {self._explain(reason)}"

    def _explain(self, reason: str) -> str:
        if reason == MAX_BYTES:
            return f"{self.used} of max_bytes {self.max_bytes} bytes used"
        reserve = self.store_reserve_bytes and f" plus {self.store_reserve_bytes} for the state database"
        return f"{self.free_bytes()} bytes free, min_free_bytes is {self.min_free_bytes}{reserve or ''}"

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.spool_bytes.set(self.used)


@dataclass(frozen=True)
class RetentionPass:
    """What one :meth:`Retention.run_pass` removed."""

    instances: int = 0
    quarantined: int = 0


class Retention:
    """The background removal of bytes ``[spool]`` no longer keeps (module doc).

    Parameters
    ----------
    store:
        The state store.
    spool:
        The shared spool.
    retain:
        How long after its study's last push an instance's bytes are kept: ``None`` forever (nothing
        is removed), ``timedelta(0)`` for ``until_pushed``.
    quarantine:
        The quarantine whose files age out, if any.
    quarantine_retain:
        How long a quarantined file (and its side file) is kept; ``None``: forever.
    budget:
        The disk budget (its in-row count is lowered and re-read every pass), if any.
    node:
        Release only spool files this node received (a store shared by several nodes); ``None``: all.
    batch:
        Instances per transaction.
    max_batches:
        Batches per pass (the rest waits for the next pass).
    metrics:
        Counters, if any.
    release_rejected:
        Also release the bytes of instances an IOCM rejection (113037 / 113039) removes whose commitment
        hold kept them, once the hold ends (with the rejection's reason, ``iocm:<code>``).
    """

    def __init__(
        self,
        store: StateStore,
        spool: Spool,
        *,
        retain: timedelta | None,
        quarantine: Quarantine | None = None,
        quarantine_retain: timedelta | None = None,
        budget: DiskBudget | None = None,
        node: str | None = None,
        batch: int = 200,
        max_batches: int = 50,
        metrics: Metrics | None = None,
        release_rejected: bool = False,
    ) -> None:
        self.store = store
        self.spool = spool
        self.retain = retain
        self.quarantine = quarantine
        self.quarantine_retain = quarantine_retain
        self.budget = budget
        self.node = node
        self.batch = batch
        self.max_batches = max_batches
        self.metrics = metrics
        # bytes of rejected instances (113037 / 113039) a commitment hold kept are released when it ends
        self.release_rejected = release_rejected

    @property
    def active(self) -> bool:
        """Whether a pass does anything: bytes or quarantined files to remove (``retain`` or
        ``quarantine_retain`` not forever, or rejected instances' bytes a commitment hold kept), or a
        byte cap whose in-row count it re-reads."""
        return (
            self.retain is not None
            or self.release_rejected
            or (self.quarantine is not None and self.quarantine_retain is not None)
            or (self.budget is not None and self.budget.max_bytes is not None)
        )

    def run_pass(self, now: datetime, *, pause_s: float = 0.0) -> RetentionPass:
        """Remove what is due at ``now``: spool bytes in batches, then old quarantine files.

        ``pause_s`` is slept between batches, so writers of the store get their turn.

        Raises
        ------
        StoreUnavailableError, StoreError
            When the store fails (what was released before stays released).
        """
        instances = 0
        if self.retain is not None:
            pushed_before = now - self.retain
            for number in range(self.max_batches):
                if number and pause_s > 0:
                    time.sleep(pause_s)
                uids = self.store.releasable(
                    pushed_before=pushed_before, now=now, limit=self.batch, node=self.node
                )
                if not uids:
                    break
                instances += release_bytes(
                    self.store, self.spool, uids, reason=REASON_RETAIN, now=now, budget=self.budget,
                    metrics=self.metrics, respect_holds=True,
                )
                if len(uids) < self.batch:
                    break
        # bytes an IOCM rejection removes but a commitment hold kept: released once the hold ends
        held = self.store.held_rejected(now=now, limit=self.batch) if self.release_rejected else {}
        for reason, uids in sorted(held.items()):
            instances += release_bytes(
                self.store, self.spool, uids, reason=reason, now=now, budget=self.budget,
                metrics=self.metrics, respect_holds=True,
            )
        if self.budget is not None:
            self.budget.resync_in_row(self.store.inline_bytes_total())
        quarantined = self._age_quarantine(now)
        return RetentionPass(instances=instances, quarantined=quarantined)

    def run_now(self, timekeeper: Timekeeper, *, pause_s: float = 0.0) -> RetentionPass:
        """:meth:`run_pass` at ``timekeeper``'s :meth:`~ingest.clock.Timekeeper.destructive_now`: the
        wall clock, held back while it has stepped forward past the time really elapsed (a WARNING says
        so), so a clock step never releases bytes or ends commitment holds early."""
        return self.run_pass(timekeeper.destructive_now(), pause_s=pause_s)

    def _age_quarantine(self, now: datetime) -> int:
        """Remove quarantined files whose side file is older than ``quarantine_retain``."""
        if self.quarantine is None or self.quarantine_retain is None:
            return 0
        cutoff = (now - self.quarantine_retain).timestamp()
        removed = 0
        try:
            entries = list(os.scandir(self.quarantine.root))
        except OSError as exc:
            LOGGER.warning("quarantine retention: cannot list %s: %s", self.quarantine.root, exc.strerror)
            return 0
        for entry in entries:
            name, dot, ext = entry.name.partition(".")
            if dot != "." or ext != "json" or len(name) != 32:
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue
                self.quarantine.remove(name)  # the bytes (if kept) and the side file
            except (OSError, ValueError, StoreError) as exc:
                LOGGER.warning("quarantine retention: cannot remove %s: %s", name, exc)
                continue
            removed += 1
        if removed:
            LOGGER.info("quarantine retention: removed %d quarantined inputs older than %s", removed,
                        self.quarantine_retain)
            if self.metrics is not None:
                self.metrics.spool_released.labels(reason="quarantine_retention").inc(removed)
        return removed


async def run_retention(
    retention: Retention,
    stop: asyncio.Event,
    *,
    interval_s: float,
    timekeeper: Timekeeper,
    pause_s: float = 0.05,
) -> None:
    """Run :meth:`Retention.run_now` every ``interval_s`` (first at once) until ``stop`` is set.

    Each pass runs in a worker thread; a failing pass is logged and the next one comes as planned.
    """
    while not stop.is_set():
        try:
            await asyncio.to_thread(retention.run_now, timekeeper, pause_s=pause_s)
        except StoreError as exc:
            LOGGER.warning("retention pass failed (next in %.0f s): %s", interval_s, exc)
        except Exception:
            LOGGER.exception("retention pass failed (next in %.0f s)", interval_s)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except TimeoutError:
            continue


#: What a SQLite state database on the spool's file system may still grow by that a free-space check
#: does not see: one checkpoint of its write-ahead log (1000 pages of 4 KiB by default) and a transaction.
SQLITE_RESERVE_BYTES: Final = 5 * 1024**2


def _sqlite_reserve(settings: Settings, spool: Spool) -> int:
    """:data:`SQLITE_RESERVE_BYTES` when the state store is SQLite on the spool's file system, else 0."""
    url = settings.state.url or ""
    if url and not url.startswith("sqlite:///"):
        return 0
    database = Path(url.removeprefix("sqlite:///")) if url else settings.data_dir / "state.sqlite3"
    try:
        same = os.stat(database.parent).st_dev == os.stat(spool.root).st_dev
    except OSError:
        same = True  # cannot tell: keep the reserve
    return SQLITE_RESERVE_BYTES if same else 0


def open_retention(
    settings: Settings, store: StateStore, *, metrics: Metrics | None = None
) -> tuple[DiskBudget, Retention]:
    """The disk budget and the retention of ``[spool]`` over ``data_dir/spool`` and ``data_dir/quarantine``.

    Call once at start, after the start-up sweep: the spool is scanned once here, the in-row bytes
    summed once; from then on both are running totals. The spool returned as ``budget.spool`` is the one
    every writer of this process must use.

    Raises
    ------
    StoreUnavailableError, StoreError
        When the spool cannot be read or the store cannot be asked.
    """
    cfg = settings.spool
    spool = Spool(settings.data_dir / "spool")
    budget = DiskBudget.from_settings(
        spool, cfg, in_row_bytes=store.inline_bytes_total(), metrics=metrics,
        store_reserve_bytes=_sqlite_reserve(settings, spool),
    )
    budget.resync_in_row(budget.in_row)  # publishes ingest_spool_bytes
    quarantine_retain = cfg.quarantine_retain_for
    quarantine = (
        Quarantine(settings.data_dir / "quarantine", max_bytes=settings.quarantine.max_bytes)
        if quarantine_retain is not None else None
    )
    url = settings.state.url or ""
    shared = url.startswith(("postgresql://", "postgres://"))
    retention = Retention(
        store, spool, retain=cfg.retain_after_push, quarantine=quarantine,
        quarantine_retain=quarantine_retain, budget=budget,
        node=(settings.state.node_id or socket.gethostname()) if shared else None,
        batch=cfg.retention_batch, metrics=metrics, release_rejected=True,
    )
    return budget, retention
