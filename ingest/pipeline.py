"""The orchestrator: sources -> state store; relay: due studies -> FHIR backend.

Listener, watcher and replay are the same pipeline with different sources. Everything that decides what
the backend sees is in ``ingest.core``; this module only moves records and results between the edges.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tenacity import RetryCallState, wait_random_exponential

from ingest.config import Settings
from ingest.core.aggregate import aggregate
from ingest.core.mapping import MappingOptions, build_imaging_study
from ingest.core.merge import Create, NoChange, Update, digest, plan
from ingest.core.records import InstanceRecord
from ingest.errors import (
    IngestError,
    MultipleMatchesError,
    PermanentSinkError,
    RetryableSinkError,
    StoreUnavailableError,
)
from ingest.metrics import Metrics
from ingest.ports import Sink, StateStore, StudyClaim, StudyState

__all__ = [
    "Relay",
    "RelayTotals",
    "StudyBuilder",
    "mapping_options",
    "utcnow",
]

LOGGER = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


def mapping_options(settings: Settings, endpoint_reference: str | None = None) -> MappingOptions:
    """The pure mapping's options, taken from the settings."""
    return MappingOptions.from_settings(settings, endpoint_reference=endpoint_reference)


class StudyBuilder:
    """Instance records of one study -> FHIR ImagingStudy JSON (pure core, wrapped)."""

    def __init__(self, options: MappingOptions) -> None:
        self.options = options

    def __call__(self, records: Sequence[InstanceRecord]) -> dict[str, Any]:
        study, warnings = build_imaging_study(aggregate(records), self.options)
        for w in warnings:
            LOGGER.debug("mapping warning for study %s: %s", records[0].study_uid if records else "?", w)
        return study.to_fhir()


@dataclass
class RelayTotals:
    """What the relay did, for summaries and tests."""

    results: Counter[str] = field(default_factory=Counter)

    def add(self, result: str) -> None:
        self.results[result] += 1


def _backoff(attempt: int, base_s: float, max_s: float) -> float:
    """Full-jitter exponential backoff for the ``attempt``-th failure (tenacity computes it)."""
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, attempt)
    return float(wait_random_exponential(multiplier=base_s, max=max_s)(state))


class Relay:
    """Pushes due studies to the backend: one writer per study, retries with backoff, dead letters.

    Parameters
    ----------
    store, sink:
        The state store and the backend.
    build:
        Records of one study -> ImagingStudy JSON.
    settings:
        ``[relay]`` settings.
    node:
        This process's id, used as the claim owner.
    clock:
        Source of "now" (tests inject one).
    """

    def __init__(
        self,
        store: StateStore,
        sink: Sink,
        build: Callable[[Sequence[InstanceRecord]], dict[str, Any]],
        settings: Settings,
        *,
        node: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.sink = sink
        self.build = build
        self.cfg = settings.relay
        self.node = node or f"node-{uuid.uuid4().hex[:12]}"
        self.clock = clock
        self.metrics = metrics
        self.totals = RelayTotals()
        self._sem = asyncio.Semaphore(self.cfg.concurrency)
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Ask the relay loop to look for due studies now (thread-safe only from the loop thread)."""
        self._wake.set()

    def _count(self, result: str) -> None:
        self.totals.add(result)
        if self.metrics is not None:
            self.metrics.studies.labels(result=result).inc()

    async def run_once(self) -> int:
        """Claim the studies due now and push them; returns how many were claimed."""
        try:
            claims = await asyncio.to_thread(
                self.store.claim_due, self.clock(), self.cfg.concurrency * 2, self.node, self.cfg.lease_s
            )
        except StoreUnavailableError as exc:
            LOGGER.warning("state store unavailable, relay waits: %s", exc)
            return 0
        if claims:
            await asyncio.gather(*(self._push_guarded(c) for c in claims))
        return len(claims)

    async def _push_guarded(self, claim: StudyClaim) -> None:
        async with self._sem:
            try:
                await self.push(claim)
            except Exception:  # the relay never dies for one study
                LOGGER.exception("unexpected error pushing study %s", claim.study_uid)
                await asyncio.to_thread(
                    self.store.schedule_retry,
                    claim,
                    error="internal error (see log)",
                    next_attempt_at=self.clock() + timedelta(seconds=self.cfg.max_backoff_s),
                )

    async def push(self, claim: StudyClaim) -> str:
        """Push one claimed study; returns the result name (created/updated/unchanged/retried/dead)."""
        uid = claim.study_uid
        records = await asyncio.to_thread(self.store.instances, uid)
        if not records:
            await asyncio.to_thread(
                self.store.dead_letter, claim, reason="no_instances", error="study has no instances",
                now=self.clock(),
            )
            self._count("dead")
            return "dead"
        try:
            ours = self.build(records)
        except IngestError as exc:
            await asyncio.to_thread(
                self.store.dead_letter, claim, reason="mapping", error=str(exc), now=self.clock()
            )
            LOGGER.error("study %s dead-lettered: mapping failed: %s", uid, exc)
            self._count("dead")
            return "dead"
        try:
            backend = await self.sink.find(uid, claim.backend_id)
            decision = plan(ours, backend)
            if isinstance(decision, NoChange):
                assert backend is not None
                result, bid, ver, dig = "unchanged", decision.backend_id, decision.version_id, digest(
                    backend.resource
                )
            elif isinstance(decision, Create):
                written = await self.sink.create(decision.resource)
                result, bid, ver, dig = "created", written.id, written.version_id, digest(decision.resource)
            else:
                assert isinstance(decision, Update)
                written = await self.sink.update(decision.backend_id, decision.resource)
                result, bid, ver, dig = "updated", written.id, written.version_id, digest(decision.resource)
        except MultipleMatchesError as exc:
            return await self._dead(claim, "multiple_matches", exc)
        except PermanentSinkError as exc:
            return await self._dead(claim, "rejected", exc)
        except RetryableSinkError as exc:
            attempts = claim.attempts + 1
            if attempts >= self.cfg.max_attempts:
                return await self._dead(claim, "retries_exhausted", exc)
            delay = _backoff(attempts, self.cfg.base_backoff_s, self.cfg.max_backoff_s)
            await asyncio.to_thread(
                self.store.schedule_retry,
                claim,
                error=str(exc),
                next_attempt_at=self.clock() + timedelta(seconds=delay),
            )
            LOGGER.warning(
                "study %s: backend unavailable (attempt %d of %d), next try in %.1f s: %s",
                uid, attempts, self.cfg.max_attempts, delay, exc,
            )
            self._count("retried")
            return "retried"
        await asyncio.to_thread(
            self.store.mark_pushed, claim, backend_id=bid, version_id=ver, digest=dig, now=self.clock()
        )
        LOGGER.info("study %s %s (ImagingStudy/%s, %d instances)", uid, result, bid, len(records))
        self._count(result)
        return result

    async def _dead(self, claim: StudyClaim, reason: str, exc: Exception) -> str:
        await asyncio.to_thread(
            self.store.dead_letter, claim, reason=reason, error=str(exc), now=self.clock()
        )
        LOGGER.error("study %s dead-lettered (%s): %s", claim.study_uid, reason, exc)
        self._count("dead")
        return "dead"

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Loop until ``stop`` is set; the current pushes finish before it returns."""
        while not stop.is_set():
            claimed = await self.run_once()
            if claimed:
                continue
            self._wake.clear()
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            try:
                await asyncio.wait(waiters, timeout=self.cfg.poll_interval_s, return_when="FIRST_COMPLETED")
            finally:
                for w in waiters:
                    w.cancel()

    async def drain(self, study_uids: Iterable[str]) -> None:
        """Push ``study_uids`` now and keep retrying until each is pushed or dead (end of a replay)."""
        wanted = set(study_uids)
        if not wanted:
            return
        await asyncio.to_thread(self.store.mark_due, wanted, self.clock())
        while True:
            await self.run_once()
            pending = [
                row
                for row in await asyncio.to_thread(self.store.studies, StudyState.PENDING)
                if row.study_uid in wanted and (row.dirty or row.next_attempt_at is not None)
            ]
            if not pending:
                return
            now = self.clock()
            waits = [
                (row.next_attempt_at - now).total_seconds()
                for row in pending
                if row.next_attempt_at is not None
            ]
            delay = min([self.cfg.poll_interval_s, *[w for w in waits if w > 0]]) if waits else 0.05
            await asyncio.sleep(max(0.02, min(delay, self.cfg.poll_interval_s)))
