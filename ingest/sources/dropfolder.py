"""The drop-folder watcher (edge): files dropped into ``[watch] folder`` become accepted instances.

How a file travels (docs/architecture.md, Durability; docs/reliability.md):

1. **Seen**: by a watchfiles event (inotify, or ``poll = true`` polling for network shares), by the scan
   at start, or by the periodic rescan that catches missed events. Dot-files, files in dot-folders,
   ``*.part`` and ``*.tmp`` are ignored, and so is anything that is not a regular file (links
   included).
2. **Settled**: its size and mtime stayed the same for ``settle_ms``; a file still being written is
   never read.
   A file that then reads as incomplete (truncated: a declared length runs past its end; or
   shorter than a preamble and ``DICM``, empty included) is a copy that paused (a slow network
   copy), not yet a refusal: it stays in the folder, untouched, and is read again once it changes
   and settles. Only when it has stayed unchanged for ``[watch] incomplete_timeout`` (default
   ``"5m"``) is it quarantined as ``truncated`` (or ``not_dicom``).
3. **Parsed**: headers in ``[watch] jobs`` worker processes for bursts
   (:func:`ingest.sources.parse.parse_items`), each record handed over as its state store row.
4. **Accepted**: the bytes are copied into what ``ingest`` owns, whatever the user later does to the
   folder: a file up to ``[spool] inline_max_bytes`` into the state store with its row (one transaction
   for the chunk), a larger one into the spool (fsync'd under a random name, one folder fsync for the
   chunk); then the chunk is admitted
   (:class:`ingest.intake.admit.Admission`: rows committed, studies due, duplicates and conflicts
   settled, the relay woken).
5. **After**: only then, and only if the file has not changed since it was read (else it stays and is
   read again), ``after = "move"`` (to ``archive_dir``, default ``<data_dir>/archive``, under a
   random name, mode 0600), ``"delete"``, or ``"keep"`` (remembered by path, size, mtime and SHA-256
   in ``<data_dir>/watch.sqlite3``, never read again while unchanged).

A file that is refused (not DICOM, bad UIDs, incomplete past the timeout...) or conflicts with an
instance already stored (same SOP Instance UID, other content or other study) is copied into
``<data_dir>/quarantine`` with a side file (reason code, rule, time; no patient data) and removed from
the folder, and only when it did not change since it was read (a file that changed is left in place, its
quarantine copy dropped, and read again). A file over ``max_instance_bytes`` is never copied, and
neither is one that would take the quarantine past ``[quarantine] max_bytes``: the quarantine gets only
a side file describing it, and the file stays in the folder (it is the only copy), remembered by size
and mtime so it is not reported again until it changes or the watcher restarts. An identical duplicate
(a restart after a crash between commit and move) is answered by the store's digest check: nothing is
added twice, and the file gets its after-action.

When the state store or a folder cannot be written, the file stays where it is and is tried again at
the next rescan; the watcher never stops for one file.

The remembered ``keep`` files live in a small SQLite file of their own rather than in the state store:
they describe this node's local folder, while the state store may be a PostgreSQL database shared by
several nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

from ingest.adapters.dicomfile import DEFAULT_MAX_REJECTION_ITEMS, ignored_name, iter_dicom_files
from ingest.adapters.spool import Quarantine, Spool, fsync_dir
from ingest.config import Settings, WatchSettings, parse_duration
from ingest.errors import ConfigError, StoreError, StoreUnavailableError
from ingest.intake.admit import Admission, Admitted, Candidate, utcnow
from ingest.intake.retention import DiskBudget
from ingest.metrics import Metrics
from ingest.ports import StateStore, Verdict
from ingest.sources.parse import Item, ParsedRow, Rejected, parse_items

__all__ = ["DropFolder", "StepResult", "WatchTotals", "open_drop_folder", "run_watcher"]

LOGGER = logging.getLogger(__name__)

_SOURCE: Final = "watch"
_TOO_LARGE: Final = "too_large"
#: Smaller files cannot hold a preamble and ``DICM``: "not DICOM" may be a copy that has only begun.
_SHORT: Final = 132
#: Files per store transaction (and per parse call).
_CHUNK: Final = 256
#: Below this many settled files, headers are parsed in process (starting workers costs more).
_PARALLEL_FROM: Final = 32
_COPY_CHUNK: Final = 1024 * 1024
_FILE_MODE: Final = 0o600
#: Default seconds between safety-net rescans of the whole folder.
DEFAULT_RESCAN_S: Final = 30.0


@dataclass
class WatchTotals:
    """What the watcher did since it started (for logs, tests and benchmarks)."""

    accepted: int = 0
    duplicate: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    deferred: int = 0  # changed while being read, or the store/folders were unavailable: tried again later
    incomplete: int = 0  # read as incomplete while young or changing: left in place, read again later
    not_kept: int = 0  # rejected, recorded by a quarantine side file only (over the size cap, quota full)


@dataclass(frozen=True)
class StepResult:
    """The outcome of one :meth:`DropFolder.step`."""

    accepted: int
    pending: int  # files seen but not settled yet


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float  # monotonic time when this (size, mtime) was first observed
    incomplete: bool = False  # read as incomplete: read again when it changes, or at incomplete_timeout


@dataclass(frozen=True)
class _Copied:
    path: Path
    parsed: ParsedRow
    spool_name: str | None  # None: the bytes go into the state store with the row (``data``)
    sha256: str
    size: int
    mtime_ns: int
    data: bytes | None = None


class _KeptFiles:
    """Files left in place by ``after = "keep"``: path -> (size, mtime, SHA-256), in a small SQLite file."""

    def __init__(self, db: Path) -> None:
        self._lock = threading.Lock()
        try:
            db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False, timeout=10.0)
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS kept (path TEXT PRIMARY KEY, size INTEGER NOT NULL, "
                "mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL, kept_at TEXT NOT NULL)"
            )
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailableError(f"watch database {db}: cannot open: {exc}") from exc
        self.db = db

    def unchanged(self, path: Path, size: int, mtime_ns: int) -> bool:
        """Whether ``path`` was kept with exactly this size and mtime."""
        with self._lock:
            row = self._conn.execute(
                "SELECT size, mtime_ns FROM kept WHERE path = ?", (str(path),)
            ).fetchone()
        return row is not None and int(row[0]) == size and int(row[1]) == mtime_ns

    def remember(self, path: Path, size: int, mtime_ns: int, sha256: str, now: datetime) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO kept (path, size, mtime_ns, sha256, kept_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
                "sha256 = excluded.sha256, kept_at = excluded.kept_at",
                (str(path), size, mtime_ns, sha256, now.isoformat()),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class DropFolder:
    """The synchronous half of the watcher: which files settled, and ingesting them.

    Not thread-safe: call it from one thread at a time (:func:`run_watcher` calls it from a worker
    thread, one step after the other). :meth:`halt` may be called from any thread.

    Parameters
    ----------
    cfg:
        ``[watch]`` (``folder`` must be set).
    admission:
        Commits the rows of a chunk (and settles duplicates and conflicts, wakes the relay).
    spool, quarantine:
        Where files are copied before their rows are committed, and where refused files go (the
        admission's own).
    data_dir:
        The data dir (never watched; ``archive`` and ``watch.sqlite3`` live there).
    max_instance_bytes, max_inflated_bytes, max_rejection_items:
        The listener's caps, applied to files too.
    metrics:
        Counters to increment (``source="watch"``), if any.
    clock:
        Wall-clock "now" for side files and the kept-files record (the admission's clock).
    monotonic:
        Clock for settle times.
    budget:
        The disk budget asked before a file is copied to the spool; when it refuses, the file stays
        where it is and the next rescan picks it up.

    Raises
    ------
    ConfigError
        When ``[watch] folder`` is not set.
    StoreUnavailableError
        When the archive or watch database cannot be prepared.
    """

    def __init__(
        self,
        cfg: WatchSettings,
        admission: Admission,
        *,
        spool: Spool,
        quarantine: Quarantine,
        data_dir: Path,
        max_instance_bytes: int,
        max_inflated_bytes: int,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        budget: DiskBudget | None = None,
        inline_max_bytes: int = 0,
        max_rejection_items: int = DEFAULT_MAX_REJECTION_ITEMS,
    ) -> None:
        self.max_rejection_items = max_rejection_items
        self.budget = budget
        self.inline_max_bytes = inline_max_bytes
        if cfg.folder is None:
            raise ConfigError("[watch] folder is not set")
        try:
            cfg.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"[watch] folder {cfg.folder}: cannot create: {exc.strerror or exc}") from exc
        self.folder = cfg.folder.resolve()
        self.cfg = cfg
        self.admission = admission
        self.max_bytes = max_instance_bytes
        self.max_inflated = max_inflated_bytes
        self.metrics = metrics
        self.clock = clock
        self.monotonic = monotonic
        self.totals = WatchTotals()
        data_dir = data_dir.resolve()
        self.spool = spool
        self.quarantine = quarantine
        # rejected files left in place (their bytes not kept): path -> (size, mtime_ns) when refused
        self._left_in_place: dict[Path, tuple[int, int]] = {}
        self.archive: Spool | None = None
        self.kept: _KeptFiles | None = None
        if cfg.after == "move":
            self.archive = Spool((cfg.archive_dir or data_dir / "archive").resolve())
        elif cfg.after == "keep":
            self.kept = _KeptFiles(data_dir / "watch.sqlite3")
        # Our own folders must never be watched, even when they lie inside the drop folder.
        self._excluded = [p for p in (data_dir, self.archive.root if self.archive else None) if p is not None]
        self._seen: dict[Path, _Seen] = {}
        # what settled() saw of the files it handed out, until they are read (incomplete files' age)
        self._taken: dict[Path, _Seen] = {}
        self.incomplete_s = parse_duration(cfg.incomplete_timeout).total_seconds()
        self._halt = threading.Event()
        self._pool: ProcessPoolExecutor | None = None  # header-parsing processes for bursts

    # -- which files -------------------------------------------------------------------------------------

    def wanted(self, path: Path) -> bool:
        """Whether ``path`` (under the folder) is a name the watcher reads: no part of it an ignored name
        (:func:`ingest.adapters.dicomfile.ignored_name`), not inside the data or archive folder."""
        try:
            rel = path.relative_to(self.folder)
        except ValueError:
            return False
        if not rel.parts or any(ignored_name(part) for part in rel.parts):
            return False
        return not any(path == ex or path.is_relative_to(ex) for ex in self._excluded)

    def _stat(self, path: Path) -> os.stat_result | None:
        try:
            st = path.lstat()
        except OSError:
            return None
        return st if stat.S_ISREG(st.st_mode) else None

    def note(self, paths: Iterable[Path]) -> None:
        """Start (or keep) watching ``paths`` until they settle; unwanted and vanished paths are ignored."""
        now = self.monotonic()
        for raw in paths:
            path = raw if raw.is_absolute() else self.folder / raw
            if path in self._seen or not self.wanted(path):
                continue
            st = self._stat(path)
            if st is None:
                # a new folder: files written into it before its watch was added raised no event
                if path.is_dir() and not path.is_symlink():
                    self.note(iter_dicom_files(path))
                continue
            if self.kept is not None and self.kept.unchanged(path, st.st_size, st.st_mtime_ns):
                continue
            if self._left_in_place.get(path) == (st.st_size, st.st_mtime_ns):
                continue
            self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, now)

    def scan(self) -> None:
        """Note every file under the folder (the scan at start and the safety-net rescan)."""
        self.note(iter_dicom_files(self.folder))

    @property
    def pending(self) -> int:
        """Files seen and not settled (or not yet ingested)."""
        return len(self._seen)

    def settled(self) -> list[Path]:
        """Take the files whose size and mtime have not changed for ``settle_ms``, in name order."""
        now = self.monotonic()
        settle_s = self.cfg.settle_ms / 1000.0
        ready: list[Path] = []
        for path, seen in list(self._seen.items()):
            st = self._stat(path)
            if st is None:
                del self._seen[path]
            elif (st.st_size, st.st_mtime_ns) != (seen.size, seen.mtime_ns):
                self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, now)
            elif now - seen.since >= (self.incomplete_s if seen.incomplete else settle_s):
                del self._seen[path]
                self._taken[path] = seen
                ready.append(path)
        return sorted(ready)

    def halt(self) -> None:
        """Ask a running :meth:`ingest` to stop after the current chunk (thread-safe)."""
        self._halt.set()

    # -- one step ----------------------------------------------------------------------------------------

    def step(self, changed: Iterable[Path], rescan: bool) -> StepResult:
        """Note ``changed`` paths (and the whole folder if ``rescan``), then ingest what has settled."""
        if rescan:
            self.scan()
        self.note(changed)
        accepted = self.ingest(self.settled())
        return StepResult(accepted=accepted, pending=self.pending)

    def ingest(self, paths: list[Path]) -> int:
        """Ingest settled files, chunk by chunk; returns how many instances were newly accepted."""
        accepted = 0
        for start in range(0, len(paths), _CHUNK):
            if self._halt.is_set():
                self.totals.deferred += len(paths) - start
                return accepted
            accepted += self._ingest_chunk(paths[start : start + _CHUNK])
        return accepted

    def _ingest_chunk(self, paths: list[Path]) -> int:
        try:
            return self._ingest_taken(paths)
        finally:
            for path in paths:
                self._taken.pop(path, None)

    def _ingest_taken(self, paths: list[Path]) -> int:
        stats: dict[str, os.stat_result] = {}
        items: list[Item] = []
        for path in paths:
            st = self._stat(path)
            if st is None:
                continue
            stats[str(path)] = st
            if st.st_size > self.max_bytes:
                why = f"{st.st_size} bytes, over max_instance_bytes {self.max_bytes} (source={path})"
                items.append(Item(str(path), rejection=(_TOO_LARGE, why)))
            else:
                items.append(Item(str(path), path=path))
        jobs = self.cfg.jobs if len(items) >= _PARALLEL_FROM else 1
        if jobs > 1 and self._pool is None:  # started at the first burst, kept for the next ones
            self._pool = ProcessPoolExecutor(jobs)
        copied: list[_Copied] = []
        results = parse_items(
            items, jobs=jobs, max_inflated_bytes=self.max_inflated, pool=self._pool if jobs > 1 else None,
            max_rejection_items=self.max_rejection_items, rows=True,
        )
        for result in results:
            path = Path(result.label)
            before = stats[result.label]
            if self.metrics is not None:
                self.metrics.instances_received.labels(source=_SOURCE).inc()
            if isinstance(result, Rejected):
                if self._changed(path, before):
                    self._defer(path)
                elif result.reason == _TOO_LARGE:
                    self._reject(path, result.reason, "max_instance_bytes", result.message, over_cap=before)
                elif self._incomplete(result, before) and self._wait_incomplete(path, before):
                    pass  # left in place: read again when it changes, or at incomplete_timeout
                elif self._incomplete(result, before):
                    detail = (f"{result.message}; unchanged for {self.cfg.incomplete_timeout} "
                              "([watch] incomplete_timeout)")
                    self._reject(path, result.reason, "incomplete_timeout", detail, before=before)
                else:
                    self._reject(path, result.reason, "dicom_header", result.message, before=before)
                continue
            if self.budget is not None and self.budget.refusal(before.st_size, what=f"file {path}"):
                self.totals.deferred += 1  # left where it is; the next rescan finds it again
                continue
            kept = self._copy_to_spool(path, result, before)
            if kept is not None:
                copied.append(kept)
        return self._commit(copied) if copied else 0

    def _changed(self, path: Path, before: os.stat_result) -> bool:
        st = self._stat(path)
        return st is None or (st.st_size, st.st_mtime_ns) != (before.st_size, before.st_mtime_ns)

    @staticmethod
    def _incomplete(result: Rejected, before: os.stat_result) -> bool:
        """Whether a refusal may only mean the file is still being written (truncated, or too short to
        hold a preamble and ``DICM``)."""
        return result.reason == "truncated" or (result.reason == "not_dicom" and before.st_size < _SHORT)

    def _wait_incomplete(self, path: Path, before: os.stat_result) -> bool:
        """Leave an incomplete file in place while it is younger than ``incomplete_timeout`` (unchanged
        for less than it, as this watcher saw it); ``False`` once it has been unchanged for that long."""
        taken = self._taken.get(path)
        now = self.monotonic()
        same = taken is not None and (taken.size, taken.mtime_ns) == (before.st_size, before.st_mtime_ns)
        since = taken.since if taken is not None and same else now
        if now - since >= self.incomplete_s:
            return False
        self.totals.incomplete += 1
        self._seen[path] = _Seen(before.st_size, before.st_mtime_ns, since, incomplete=True)
        LOGGER.debug("watch: %s reads as incomplete (%d bytes), waiting for the rest", path, before.st_size)
        return True

    def _defer(self, path: Path) -> None:
        """Watch ``path`` again from now (it changed while being read)."""
        self.totals.deferred += 1
        st = self._stat(path)
        if st is not None:
            self._seen[path] = _Seen(st.st_size, st.st_mtime_ns, self.monotonic())

    def _copy_to_spool(self, path: Path, parsed: ParsedRow, before: os.stat_result) -> _Copied | None:
        if before.st_size <= self.inline_max_bytes:
            return self._read_inline(path, parsed, before)
        try:
            with self.spool.open_writer() as writer:
                try:
                    with path.open("rb") as fh:
                        while chunk := fh.read(_COPY_CHUNK):
                            writer.write(chunk)
                except OSError as exc:
                    LOGGER.warning("watch: cannot read %s, will try again: %s", path, exc.strerror or exc)
                    self.totals.deferred += 1
                    return None
                if self._changed(path, before):
                    self._defer(path)
                    return None  # leaving the block aborts the writer
                spooled = writer.commit(sync_dir=False)  # the chunk's folder fsync comes in _commit
        except StoreUnavailableError as exc:
            LOGGER.warning("watch: cannot spool %s, will try again at the next rescan: %s", path, exc)
            self.totals.deferred += 1
            return None
        return _Copied(path, parsed, spooled.name, spooled.sha256, before.st_size, before.st_mtime_ns)

    def _read_inline(self, path: Path, parsed: ParsedRow, before: os.stat_result) -> _Copied | None:
        """A small file's bytes, committed with its row (``[spool] inline_max_bytes``): no spool file."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            LOGGER.warning("watch: cannot read %s, will try again: %s", path, exc.strerror or exc)
            self.totals.deferred += 1
            return None
        if len(data) != before.st_size or self._changed(path, before):
            self._defer(path)
            return None
        digest = hashlib.sha256(data).hexdigest()
        return _Copied(path, parsed, None, digest, before.st_size, before.st_mtime_ns, data)

    def _commit(self, copied: list[_Copied]) -> int:
        try:
            if any(c.spool_name is not None for c in copied):
                self.spool.sync()  # one folder fsync for the chunk: the spool files are durable from here
        except StoreUnavailableError as exc:
            LOGGER.warning("watch: cannot sync the spool, %d files wait for the next rescan: %s",
                           len(copied), exc)
            for c in copied:
                if c.spool_name is not None:
                    self._forget_spooled(c.spool_name)
            self.totals.deferred += len(copied)
            return 0
        try:
            results = self.admission.admit(
                [Candidate(c.parsed.row, c.parsed.digest, _SOURCE, spool_name=c.spool_name, body=c.path,
                           origin=str(c.path), data=c.data) for c in copied]
            )
        except StoreError as exc:  # the admission removed the spool copies
            LOGGER.warning("watch: state store unavailable, %d files wait for the next rescan: %s",
                           len(copied), exc)
            self.totals.deferred += len(copied)
            return 0
        accepted = 0
        for c, admitted in zip(copied, results, strict=True):
            now = admitted.now
            if admitted.outcome is Verdict.ADDED:
                accepted += 1
                self.totals.accepted += 1
                LOGGER.debug("watch: accepted %s as SOP Instance %s", c.path, c.parsed.row.sop_uid)
                self._after(c, now)
            elif admitted.outcome is Verdict.DUPLICATE:
                self.totals.duplicate += 1
                self._after(c, now)
            else:
                self._conflicted(c.path, admitted)
        if copied:
            LOGGER.info("watch: %d files read, %d accepted", len(copied), accepted)
        return accepted

    def _forget_spooled(self, name: str) -> None:
        try:
            self.spool.remove(name)
        except StoreUnavailableError as exc:
            LOGGER.warning("watch: cannot remove an unused spool file: %s", exc)

    # -- outcomes ----------------------------------------------------------------------------------------

    def _reject(
        self, path: Path, reason: str, rule: str, detail: str, *, over_cap: os.stat_result | None = None,
        before: os.stat_result | None = None,
    ) -> None:
        """Quarantine ``path`` with why, then remove it from the folder (see :meth:`_quarantined`).

        ``over_cap`` (the file's stat) marks a file over the size cap: it is described by a side file,
        never copied. ``before`` (the stat the file was read with): when the file changed by the time
        its copy is in the quarantine, the copy is dropped and the file is read again (the quarantine
        holds what was read, whole, or nothing).
        """
        source = str(path)
        try:
            if over_cap is not None:
                name = self.quarantine.describe(over_cap.st_size, reason, rule, detail, self.clock(),
                                                source=source)
            else:
                name = self.quarantine.put(path, reason, rule, detail, self.clock(), source=source)
                if before is not None and self._changed(path, before):
                    self.quarantine.remove(name)
                    self._defer(path)
                    return
        except StoreUnavailableError as exc:
            LOGGER.warning("watch: %s rejected (%s) but cannot be quarantined, left in place: %s",
                           path, reason, exc)
            self._count_rejected(reason)
            return
        self._count_rejected(reason)
        self._quarantined(path, reason, rule, detail, name, over_cap=over_cap)

    def _count_rejected(self, reason: str) -> None:
        self.totals.rejected[reason] += 1
        if self.metrics is not None:
            self.metrics.instances_rejected.labels(reason=reason).inc()

    def _conflicted(self, path: Path, admitted: Admitted) -> None:
        """A file the admission refused as a conflict (counted and quarantined there)."""
        self.totals.rejected["conflict"] += 1
        if admitted.quarantined is None:
            LOGGER.warning("watch: %s rejected (conflict) but cannot be quarantined, left in place", path)
            return
        self._quarantined(path, "conflict", admitted.rule, admitted.detail, admitted.quarantined)

    def _quarantined(
        self, path: Path, reason: str, rule: str, detail: str, name: str,
        *, over_cap: os.stat_result | None = None,
    ) -> None:
        """Remove a quarantined file from the folder; a file whose bytes the quarantine did not keep
        (over the cap, or quarantine full) stays in the folder and is remembered until it changes."""
        held = over_cap is None and self.quarantine.holds(name)
        if not held:
            self.totals.not_kept += 1
            st = over_cap or self._stat(path)
            if st is not None:
                self._left_in_place[path] = (st.st_size, st.st_mtime_ns)
            LOGGER.warning("watch: %s rejected (%s, rule %s), left in place; quarantine side file %s.json "
                           "only: %s", path, reason, rule, name, detail)
            return
        LOGGER.warning("watch: %s rejected (%s, rule %s), quarantined as %s: %s",
                       path, reason, rule, name, detail)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            LOGGER.warning("watch: cannot remove rejected %s from the folder: %s", path, exc.strerror or exc)

    def _after(self, c: _Copied, now: datetime) -> None:
        """The after-action, once the row is committed; a failure leaves the file for the next rescan
        (where the store answers "duplicate" and the action is tried again). A file that changed since
        it was read (a copy that resumed after a pause) is left in place and read again: what was
        admitted is not all of it."""
        st = self._stat(c.path)
        grown = st is not None and (st.st_size, st.st_mtime_ns) != (c.size, c.mtime_ns)
        if grown and self.cfg.after != "keep":
            LOGGER.warning("watch: %s changed after it was read; left in place, read again", c.path)
            self._defer(c.path)
            return
        try:
            if self.cfg.after == "delete":
                c.path.unlink(missing_ok=True)
            elif self.cfg.after == "move":
                self._move_to_archive(c.path)
            elif self.kept is not None:
                self.kept.remember(c.path, c.size, c.mtime_ns, c.sha256, now)
        except (OSError, sqlite3.Error, StoreUnavailableError) as exc:
            LOGGER.warning("watch: %s is ingested but its after-action (%s) failed: %s",
                           c.path, self.cfg.after, exc)

    def _move_to_archive(self, path: Path) -> None:
        archive = self.archive
        assert archive is not None
        name = uuid.uuid4().hex
        target = archive.path(name)  # random name, checked to stay under the archive root
        try:
            os.rename(path, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            with archive.open_writer() as writer, path.open("rb") as fh:  # another file system: copy
                while chunk := fh.read(_COPY_CHUNK):
                    writer.write(chunk)
                writer.commit()
            path.unlink()
            return
        os.chmod(target, _FILE_MODE)
        fsync_dir(archive.root)

    def close(self) -> None:
        """Release the watch database, if open, and the parsing processes."""
        if self.kept is not None:
            self.kept.close()
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


async def _watch_events(
    folder: Path, drop: DropFolder, changed: set[Path], wake: asyncio.Event, stop: asyncio.Event
) -> None:
    """Collect changed paths from watchfiles (inotify, or polling with ``poll = true``)."""
    from watchfiles import Change, awatch

    cfg = drop.cfg
    try:
        async for changes in awatch(
            folder,
            watch_filter=None,
            debounce=200,
            step=50,
            stop_event=stop,
            force_polling=cfg.poll,
            poll_delay_ms=cfg.poll_interval_ms,
            recursive=True,
            ignore_permission_denied=True,
        ):
            for change, raw in changes:
                if change is not Change.deleted:
                    changed.add(Path(raw))
            wake.set()
    except Exception as exc:  # events are an optimisation: the rescan still finds every file
        LOGGER.error("watch: file events stopped (%s); relying on the periodic rescan", exc)


def open_drop_folder(
    settings: Settings,
    store: StateStore,
    *,
    metrics: Metrics | None = None,
    wake: Callable[[], None] = lambda: None,
    clock: Callable[[], datetime] = utcnow,
    monotonic: Callable[[], float] = time.monotonic,
    budget: DiskBudget | None = None,
) -> DropFolder:
    """A :class:`DropFolder` over ``data_dir``'s spool and quarantine, with its :class:`Admission`.

    Parameters
    ----------
    settings:
        ``[watch]`` (``folder`` must be set), ``[quarantine] max_bytes``, ``[relay] stable_age_s``,
        ``data_dir`` and the listener's ``max_instance_bytes`` / ``max_inflated_bytes`` caps.
    store:
        The state store rows are committed to.
    metrics:
        Counters to increment (``source="watch"``), if any.
    wake:
        Called (from the thread ingesting a chunk) whenever instances were accepted.
    clock, monotonic:
        Wall-clock "now" (rows, due times, side files) and the clock for settle times.
    budget:
        The disk budget (its spool is then the drop folder's), if any; see :class:`DropFolder`.

    Raises
    ------
    ConfigError
        When ``[watch] folder`` is not set.
    StoreUnavailableError
        When the spool, quarantine, archive or watch database cannot be prepared.
    """
    data_dir = settings.data_dir.resolve()
    spool = budget.spool if budget is not None else Spool(data_dir / "spool")  # one running total
    quarantine = Quarantine(data_dir / "quarantine", max_bytes=settings.quarantine.max_bytes)
    admission = Admission(
        store, spool=spool, quarantine=quarantine, metrics=metrics,
        stable_age_s=settings.relay.stable_age_s, wake=wake, clock=clock, label=_SOURCE, budget=budget,
        on_conflict=settings.intake.on_conflict,
    )
    return DropFolder(
        settings.watch, admission, spool=spool, quarantine=quarantine, data_dir=data_dir,
        max_instance_bytes=settings.listener.max_instance_bytes,
        max_inflated_bytes=settings.listener.max_inflated_bytes,
        max_rejection_items=settings.listener.max_rejection_items,
        metrics=metrics, clock=clock, monotonic=monotonic, budget=budget,
        inline_max_bytes=settings.spool.inline_max_bytes,
    )


async def run_watcher(
    settings: Settings,
    store: StateStore,
    wake: Callable[[], None],
    metrics: Metrics | None,
    stop: asyncio.Event,
    *,
    rescan_s: float = DEFAULT_RESCAN_S,
    clock: Callable[[], datetime] = utcnow,
    on_step: Callable[[DropFolder, StepResult], None] | None = None,
    budget: DiskBudget | None = None,
) -> None:
    """Watch ``[watch] folder`` until ``stop`` is set, ingesting every file once it has settled.

    Parameters
    ----------
    settings:
        As for :func:`open_drop_folder`.
    store:
        The state store.
    wake:
        The relay's ``wake()``; called on the running loop whenever instances were accepted.
    metrics:
        Counters, if any.
    stop:
        Set to stop; the chunk being ingested is finished first.
    rescan_s:
        Seconds between safety-net rescans of the whole folder (there is always one at start).
    clock:
        Wall-clock "now".
    on_step:
        Called on the event loop after each step (tests and benchmarks observe progress with it).
    budget:
        As for :func:`open_drop_folder`.

    Raises
    ------
    ConfigError
        When ``[watch] folder`` is not set or cannot be created.
    StoreUnavailableError
        When the spool, quarantine, archive or watch database cannot be prepared.
    """
    loop = asyncio.get_running_loop()

    def wake_on_loop() -> None:  # the admission runs in the step's thread
        loop.call_soon_threadsafe(wake)

    drop = await asyncio.to_thread(
        open_drop_folder, settings, store, metrics=metrics, wake=wake_on_loop, clock=clock, budget=budget
    )
    LOGGER.info("watching %s (%s, settle %d ms, after %s)", drop.folder,
                "polling" if drop.cfg.poll else "inotify", drop.cfg.settle_ms, drop.cfg.after)
    changed: set[Path] = set()
    seen = asyncio.Event()  # file events arrived
    events_stop = asyncio.Event()
    events = asyncio.create_task(_watch_events(drop.folder, drop, changed, seen, events_stop))
    tick_s = max(0.05, min(drop.cfg.settle_ms / 4000.0, 0.25))
    next_rescan = 0.0  # scan at start
    step: asyncio.Future[StepResult] | None = None
    try:
        while not stop.is_set():
            now = time.monotonic()
            rescan = now >= next_rescan
            if rescan:
                next_rescan = now + rescan_s
            batch = list(changed)
            changed.clear()
            seen.clear()
            step = asyncio.ensure_future(asyncio.to_thread(drop.step, batch, rescan))
            result = await asyncio.shield(step)
            if on_step is not None:
                on_step(drop, result)
            timeout = tick_s if result.pending or changed else max(0.0, next_rescan - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_first(stop, seen), timeout=timeout)
    finally:
        drop.halt()
        events_stop.set()
        if step is not None and not step.done():  # cancelled mid-step: let the thread finish its chunk
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await step
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(events, timeout=5.0)
        drop.close()
        t = drop.totals
        LOGGER.info("watcher stopped ◆ %d accepted ◆ %d duplicate ◆ %d rejected ◆ %d deferred",
                    t.accepted, t.duplicate, sum(t.rejected.values()), t.deferred)


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
