"""One sync run over one source: ask the PACS, turn its answers into records, admit and reconcile them.

docs/architecture.md "Sync". The walk (:func:`walk`) asks study level by date windows (split while cut
short, :mod:`ingest.sources.sync.plan`), then series and image level per study, at most ``[sync]
concurrency`` studies at once, each query retried with exponential backoff; it hands each study's
records and listing to a consumer, one study at a time, on the calling thread. The consumer is either
a dry run's printer or :class:`SyncIntake`, which

1. admits each record as a metadata-only instance (no spool bytes, source ``sync:<name>``) through the
   one acceptance path (:class:`~ingest.intake.admit.Admission`): a record held already with its bytes
   stays as it is, the same answers again are identical duplicates (nothing written);
2. records what the source listed of the study (:meth:`~ingest.adapters.state.sync.SyncStore.sync_study`):
   what it listed before and no longer lists is withdrawn, what it lists again is restored;
3. after the walk, a study the source listed before, inside what this run asked, and no longer lists
   follows ``[sync] on_study_gone``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Protocol

from pydicom.dataset import Dataset

from ingest.config import SyncSettings, SyncSource
from ingest.core.records import InstanceRecord
from ingest.errors import ConfigError, HeaderError, SyncSourceError
from ingest.intake.admit import Admission, Candidate, utcnow
from ingest.logs import printable
from ingest.metrics import Metrics
from ingest.ports import Verdict
from ingest.sources.sync.answers import (
    IMAGE_KEYS,
    SERIES_KEYS,
    STUDY_KEYS,
    SeriesRecords,
    metadata_digest,
)
from ingest.sources.sync.plan import Window, cut_short, da

__all__ = [
    "Finder",
    "StudyListing",
    "SyncCounts",
    "SyncIntake",
    "SyncScope",
    "Walker",
    "endpoint_of",
    "open_finder",
    "watermark_of",
]

LOGGER = logging.getLogger(__name__)


class Finder(Protocol):
    """Asks one PACS at one level; (matches, whether the answer was complete)."""

    name: str

    def ask(self, level: str, keys: tuple[str, ...], matching: dict[str, str], limit: int | None
            ) -> tuple[list[Dataset], bool]: ...

    def where(self) -> str: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SyncScope:
    """What a run asks: ``studies`` (``--study``), else Study Dates ``since``..``until`` (open sides:
    ``None``)."""

    since: date | None = None
    until: date | None = None
    studies: frozenset[str] = frozenset()

    def window(self) -> Window:
        return Window(self.since, self.until)

    def covers(self, study_uid: str, study_date: str | None) -> bool:
        """Whether a study the source listed before (with that Study Date) was asked about by this run."""
        if self.studies:
            return study_uid in self.studies
        return self.window().contains(study_date)


@dataclass
class SyncCounts:
    queries: int = 0
    windows_split: int = 0
    studies: int = 0
    series: int = 0
    instances: int = 0
    added: int = 0
    unchanged: int = 0
    conflicts: int = 0
    bad_answers: int = 0
    withdrawn: int = 0
    restored: int = 0
    gone: int = 0
    short_listings: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if k != "errors"}
        out["errors"] = len(self.errors)
        return out


@dataclass(frozen=True)
class StudyListing:
    """One study as the source lists it now: its records and SOP Instance UID -> Series Instance UID."""

    study_uid: str
    study_date: str | None
    records: tuple[InstanceRecord, ...]
    listed: dict[str, str]
    # Number of Study Related Instances (0020,1208) as the study-level answer gave it, if it did
    announced: int | None = None

    @property
    def short(self) -> bool:
        """Fewer instances listed than the study-level answer announced: not a listing to withdraw by."""
        return self.announced is not None and len(self.listed) < self.announced


class Walker:
    """Asks a source everything a run needs (module doc)."""

    def __init__(
        self,
        finder: Finder,
        *,
        query_limit: int,
        concurrency: int,
        attempts: int,
        retry_base_s: float,
        metrics: Metrics | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.finder = finder
        self.limit = query_limit
        self.concurrency = concurrency
        self.attempts = attempts
        self.retry_base_s = retry_base_s
        self.metrics = metrics
        self.sleep = sleep
        self._lock = threading.Lock()

    def _ask(self, counts: SyncCounts, level: str, keys: tuple[str, ...], matching: dict[str, str],
             limit: int | None) -> tuple[list[Dataset], bool]:
        """One query, retried with full-jitter exponential backoff; the last failure is raised."""
        for attempt in range(1, self.attempts + 1):
            with self._lock:
                counts.queries += 1
            if self.metrics is not None:
                self.metrics.sync_queries.labels(source=self.finder.name, level=level.lower()).inc()
            try:
                return self.finder.ask(level, keys, matching, limit)
            except SyncSourceError as exc:
                if attempt >= self.attempts:
                    raise
                delay = random.uniform(0, self.retry_base_s * 2 ** (attempt - 1))
                LOGGER.warning("%s (attempt %d of %d; next in %.1f s)", exc, attempt, self.attempts, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- study level -------------------------------------------------------------------------------------

    def studies(self, scope: SyncScope, counts: SyncCounts) -> list[Dataset]:
        """The study-level answers of ``scope`` (each Study Instance UID once)."""
        found: dict[str, Dataset] = {}
        if scope.studies:
            for uid in sorted(scope.studies):
                answers, _ = self._ask(counts, "STUDY", STUDY_KEYS, {"StudyInstanceUID": uid}, self.limit)
                for ds in answers:
                    found.setdefault(str(ds.get("StudyInstanceUID", "")), ds)
        else:
            pending = [scope.window()]
            while pending:
                window = pending.pop()
                matching = {"StudyDate": window.study_date() or ""}
                if window.open:
                    matching = {}
                answers, complete = self._ask(counts, "STUDY", STUDY_KEYS, matching, self.limit)
                if cut_short(len(answers), self.limit, complete):
                    halves = window.split()
                    if halves is None:
                        raise SyncSourceError(
                            f"source {self.finder.name}: the study-level answer for {window} is still cut "
                            f"short at {len(answers)} matches at {self.finder.where()}: raise the PACS's "
                            "answer limit, or [sync] query_limit to it"
                        )
                    if window.open:
                        LOGGER.warning(
                            "source %s: more studies than one answer holds; asking by Study Date windows "
                            "(studies without a Study Date cannot be listed that way)", self.finder.name,
                        )
                    counts.windows_split += 1
                    pending += [halves[1], halves[0]]
                    continue
                for ds in answers:
                    found.setdefault(str(ds.get("StudyInstanceUID", "")), ds)
        found.pop("", None)
        return [found[uid] for uid in sorted(found)]

    # -- series and image level --------------------------------------------------------------------------

    def _complete(self, what: str, answers: list[Dataset], complete: bool) -> list[Dataset]:
        if not complete:
            raise SyncSourceError(
                f"source {self.finder.name}: the answer for {what} was cut short at {len(answers)} matches "
                f"at {self.finder.where()}: raise the PACS's answer limit"
            )
        return answers

    def study(self, study: Dataset, counts: SyncCounts) -> StudyListing:
        """Series and image level of one study; its records (answers the core refuses are counted)."""
        uid = str(study.StudyInstanceUID)
        source = f"sync:{self.finder.name}"
        series = self._complete(
            f"the series of study {uid}",
            *self._ask(counts, "SERIES", SERIES_KEYS, {"StudyInstanceUID": uid}, None),
        )
        records: list[InstanceRecord] = []
        listed: dict[str, str] = {}
        for s in series:
            series_uid = str(s.get("SeriesInstanceUID", ""))
            if not series_uid:
                continue
            images = self._complete(
                f"the instances of series {series_uid}",
                *self._ask(counts, "IMAGE", IMAGE_KEYS,
                           {"StudyInstanceUID": uid, "SeriesInstanceUID": series_uid}, None),
            )
            reader = SeriesRecords(study, s, source=source)
            for image in images:
                try:
                    record = reader.record(image)
                except HeaderError as exc:
                    with self._lock:
                        counts.bad_answers += 1
                    LOGGER.warning("source %s: an answer of series %s refused: %s", self.finder.name,
                                   printable(series_uid), exc)
                    continue
                records.append(record)
                listed[record.sop_uid] = record.series_uid
        with self._lock:
            counts.series += len(series)
        date_value = study.get("StudyDate")
        announced: int | None = None
        with contextlib.suppress(TypeError, ValueError):
            announced = int(str(study.get("NumberOfStudyRelatedInstances", "")).strip() or "x")
        return StudyListing(uid, str(date_value) if date_value else None, tuple(records), listed, announced)

    def walk(self, scope: SyncScope, counts: SyncCounts) -> Iterator[StudyListing]:
        """Every study of ``scope``, listed; a study whose queries fail is named in ``counts.errors`` and
        skipped (nothing of it is reconciled). The study level failing raises."""
        studies = self.studies(scope, counts)
        counts.studies = len(studies)
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="ingest-sync") as pool:
            futures: list[Future[StudyListing]] = []
            it = iter(studies)
            for ds in it:  # keep at most 2 x concurrency studies in flight
                futures.append(pool.submit(self.study, ds, counts))
                if len(futures) >= 2 * self.concurrency:
                    break
            while futures:
                fut = futures.pop(0)
                nxt = next(it, None)
                if nxt is not None:
                    futures.append(pool.submit(self.study, nxt, counts))
                try:
                    yield fut.result()
                except SyncSourceError as exc:
                    counts.errors.append(str(exc))
                    LOGGER.error("%s", exc)


class SyncIntake:
    """Admits and reconciles a source's listings (module doc)."""

    def __init__(
        self,
        store: Any,
        *,
        name: str,
        stable_age_s: float,
        on_study_gone: str,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = utcnow,
        wake: Callable[[], None] | None = None,
        on_touched: Callable[[str], None] | None = None,
    ) -> None:
        self.on_touched = on_touched
        self.store = store
        self.name = name
        self.on_study_gone = on_study_gone
        self.metrics = metrics
        self.clock = clock
        self.stable_age = timedelta(seconds=stable_age_s)
        self.admission = Admission(
            store, spool=None, quarantine=None, metrics=metrics, stable_age_s=stable_age_s,
            wake=wake, clock=clock, label="sync",
        )
        self.touched: set[str] = set()
        self.listed: set[str] = set()

    def _count(self, result: str, n: int = 1) -> None:
        if self.metrics is not None and n:
            self.metrics.sync_instances.labels(source=self.name, result=result).inc(n)

    def __call__(self, listing: StudyListing, counts: SyncCounts) -> None:
        source = f"sync:{self.name}"
        self.listed.add(listing.study_uid)
        counts.instances += len(listing.records)
        candidates = [Candidate(r, metadata_digest(r), source) for r in listing.records]
        for admitted, cand in zip(self.admission.admit(candidates), candidates, strict=True):
            if admitted.outcome is Verdict.ADDED:
                counts.added += 1
                self.touched.add(admitted.study_uid)
                self._count("added")
            elif admitted.outcome is Verdict.DUPLICATE:
                counts.unchanged += 1
                self._count("unchanged")
            else:
                counts.conflicts += 1
                LOGGER.warning("source %s: %s", self.name, admitted.detail or cand.record.sop_uid)
        if listing.short:  # a match went missing on the way: admit what came, withdraw nothing
            counts.short_listings += 1
            LOGGER.warning("source %s: study %s listed %d of the %d instances its study-level answer "
                           "announced; nothing of it is withdrawn this run", self.name,
                           printable(listing.study_uid), len(listing.listed), listing.announced)
            if listing.study_uid in self.touched and self.on_touched is not None:
                self.on_touched(listing.study_uid)
            return
        now = self.clock()
        withdrawn, restored = self.store.sync_study(
            self.name, listing.study_uid, study_date=listing.study_date, listed=listing.listed,
            now=now, due_at=now + self.stable_age,
        )
        counts.withdrawn += withdrawn
        counts.restored += restored
        self._count("withdrawn", withdrawn)
        self._count("restored", restored)
        if withdrawn or restored:
            self.touched.add(listing.study_uid)
        if listing.study_uid in self.touched and self.on_touched is not None:
            self.on_touched(listing.study_uid)  # it can be pushed while the walk goes on

    def reconcile_gone(self, scope: SyncScope, counts: SyncCounts) -> None:
        """Studies the source listed before, inside ``scope``, and no longer lists: ``on_study_gone``."""
        for uid, study_date in sorted(self.store.sync_known_studies(self.name).items()):
            if uid in self.listed or not scope.covers(uid, study_date):
                continue
            now = self.clock()
            counts.gone += 1
            LOGGER.info("source %s no longer lists study %s (%s)", self.name, printable(uid),
                        self.on_study_gone)
            if self.store.sync_study_gone(self.name, uid, mark=self.on_study_gone == "entered-in-error",
                                          now=now, due_at=now + self.stable_age):
                self.touched.add(uid)
                if self.on_touched is not None:
                    self.on_touched(uid)


def watermark_of(started: datetime) -> str:
    """The watermark a successful run started at ``started`` records (its UTC date, DA)."""
    return da(started.date())


def open_finder(source: SyncSource, cfg: SyncSettings) -> Finder:
    """The query side of ``source``: C-FIND for ``dimse://``, QIDO-RS for ``http(s)://``.

    Raises
    ------
    ConfigError
        For another URL scheme, a malformed ``dimse://`` URL, or a token / CA file that cannot be read.
    """
    url = source.url.strip()
    if url.startswith("dimse://"):
        from ingest.sources.sync.dimse import DimseFinder

        tls: ssl.SSLContext | None = None
        if source.tls:
            try:
                tls = ssl.create_default_context(cafile=str(source.ca) if source.ca else None)
                if source.cert is not None:
                    tls.load_cert_chain(str(source.cert), str(source.key) if source.key else None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"[[sync.sources]] {source.name}: TLS files: {exc}") from exc
        try:
            return DimseFinder(source.name, url, calling_ae=source.calling_ae or cfg.calling_ae,
                               timeout_s=cfg.timeout_s, tls=tls)
        except ValueError as exc:
            raise ConfigError(f"[[sync.sources]] {source.name}: {exc}") from exc
    if url.startswith(("http://", "https://")):
        from ingest.sources.sync.dicomweb import DicomwebFinder

        token: str | None = None
        if source.token_env:
            token = os.environ.get(source.token_env) or None
            if token is None:
                raise ConfigError(f"[[sync.sources]] {source.name}: token_env {source.token_env} is not set")
        elif source.token_file is not None:
            try:
                token = source.token_file.read_text(encoding="utf-8").strip() or None
            except OSError as exc:
                raise ConfigError(f"[[sync.sources]] {source.name}: token_file: {exc.strerror}") from exc
        if source.ca is not None and not source.ca.is_file():
            raise ConfigError(f"[[sync.sources]] {source.name}: ca {source.ca} is not a file")
        return DicomwebFinder(source.name, url, timeout_s=cfg.timeout_s, token=token, ca=source.ca)
    raise ConfigError(f"[[sync.sources]] {source.name}: url must be dimse://AE@HOST:PORT or http(s)://...")


def endpoint_of(source: SyncSource) -> str | None:
    """The WADO-RS base URL ImagingStudy resources of ``source`` point at: its ``wado_rs_url``, else a
    DICOMweb source's own root."""
    if source.wado_rs_url:
        return source.wado_rs_url
    url = source.url.strip().rstrip("/")
    return url if url.startswith(("http://", "https://")) else None
