"""The relay: claims due studies from the state store and pushes them to the FHIR backend.

Listener, watcher and replay feed the same state store; the relay is the one writer per study
(docs/architecture.md, "Writing the backend"). Everything that decides what the backend sees is in
``ingest.core`` (built by :mod:`ingest.relay.build`); this module only moves records and results between
the ports. It receives its own ``[relay]`` section and ready-made build / link steps; the composition
root (``ingest.app.wiring``) builds those from the settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeAlias

from ingest.clock import STEP_SLACK_S, utcnow
from ingest.config import RelaySettings
from ingest.core.merge import Create, NoChange, Refuse, Update, Written, digest, plan
from ingest.core.records import InstanceRecord
from ingest.errors import (
    BackendStorageError,
    ConfigError,
    ForeignContentError,
    IngestError,
    MultipleMatchesError,
    PermanentSinkError,
    RetryableSinkError,
    SinkError,
    StoreError,
    StoreUnavailableError,
)
from ingest.ports import Sink, StateStore, StudyClaim, StudyState

if TYPE_CHECKING:  # prometheus_client stays unimported in replay --dry-run
    from ingest.metrics import Metrics

#: Records of one study -> ImagingStudy JSON (:class:`ingest.relay.build.StudyBuilder`).
Build: TypeAlias = Callable[[Sequence[InstanceRecord]], dict[str, Any]]
#: Optional async step between build and the backend lookup (:class:`ingest.relay.links.PatientResolver`).
Link: TypeAlias = Callable[[dict[str, Any], Sequence[InstanceRecord]], Awaitable[dict[str, Any]]]

__all__ = [
    "BackendHealth",
    "Build",
    "LeaseKeeper",
    "Link",
    "Relay",
    "RelayTotals",
    "backoff_delay",
    "record_delay",
    "run_relay",
    "short_reason",
    "utcnow",
    "wait_for_backend",
]

LOGGER = logging.getLogger(__name__)

# A drain (end of a replay) claims up to this many times ``[relay] concurrency`` studies per round: the
# claims wait for a free push slot (their leases renewed meanwhile), so the slots never idle while a
# round's slowest push finishes; still at most ``concurrency`` pushes run at once.
_DRAIN_CLAIMS_PER_SLOT = 16
#: How often the relay asks a failing backend whether it answers again (at most; never above max_backoff_s).
_PROBE_EVERY_S = 2.0
#: The shortest sleep until a due time (a study due a moment from now is not waited for in a busy loop).
_MIN_SLEEP_S = 0.005


@dataclass
class RelayTotals:
    """What the relay did, for summaries and tests."""

    results: Counter[str] = field(default_factory=Counter)

    def add(self, result: str) -> None:
        self.results[result] += 1


def backoff_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Full-jitter exponential backoff for the ``attempt``-th failure (tenacity computes it).

    Parameters
    ----------
    attempt:
        How many attempts have failed so far (1 for the first failure).
    base_s, max_s:
        ``[relay] base_backoff_s`` and ``max_backoff_s`` (``[listener.commitment] retry_base_s`` and
        ``retry_max_s`` for Storage Commitment reports).

    Returns
    -------
    float
        Seconds, uniformly drawn from ``[0, min(max_s, base_s * 2 ** (attempt - 1))]``.
    """
    from tenacity import RetryCallState, wait_random_exponential  # lazily: not needed by replay --dry-run

    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, attempt)
    return float(wait_random_exponential(multiplier=base_s, max=max_s)(state))


def record_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Delay before the next try to record a result in the state store (no jitter).

    Recording a push that the backend already holds is retried on this short schedule, in place, instead
    of the push's own backoff: ``base_s * 2 ** (attempt - 1)`` capped at ``max_s`` (with the defaults
    0.5, 1, 2, 4, 8, 10, 10 ... seconds).

    Parameters
    ----------
    attempt:
        How many attempts to record have failed so far (1 for the first failure).
    base_s, max_s:
        ``[relay] record_retry_base_s`` and ``record_retry_max_s``.

    Returns
    -------
    float
        Seconds.
    """
    return float(min(max_s, base_s * 2 ** (max(1, attempt) - 1)))


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """A one-line reason for ``/healthz`` and log lines: no response bodies, no control characters.

    A backend error that carries an HTTP status is shown as ``HTTP <status>`` only (its body may echo
    what was sent); other errors by their message, which names the operation and the address but never
    patient data (see :mod:`ingest.errors`).
    """
    code = getattr(exc, "code", None)
    text = f"HTTP {code}" if isinstance(code, int) else (str(exc).strip() or type(exc).__name__)
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class BackendHealth:
    """What ``ingest`` last learnt about the backend, for ``/healthz`` (see ``docs/reliability.md``).

    States: ``connecting`` (no attempt finished yet), ``unavailable`` (the connection at start keeps
    failing; studies wait as pending), ``ok`` (connected, and the last request got an answer),
    ``failing`` (connected, but the last pushes failed transiently; ``failures`` counts them) and
    ``fatal`` (the backend cannot be used as configured: schema unusable, a token is required and none is
    configured; retried at ``[relay] max_backoff_s`` until fixed).
    """

    def __init__(self) -> None:
        self.state = "connecting"
        self.reason = ""
        self.failures = 0

    def _set(self, state: str, reason: str = "") -> None:
        self.state, self.reason = state, reason

    def connect_failed(self, reason: str) -> None:
        """A connection attempt at start failed transiently."""
        self.failures += 1
        self._set("unavailable", reason)

    def unusable(self, reason: str) -> None:
        """The backend answered, but cannot be used as configured."""
        self.failures += 1
        self._set("fatal", reason)

    def answered(self) -> None:
        """The backend answered a request (connected, or a push got its answer)."""
        self.failures = 0
        self._set("ok")

    def push_failed(self, reason: str) -> None:
        """A push failed transiently (connection, timeout, HTTP 5xx/429...)."""
        self.failures += 1
        self._set("failing", reason)

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    def describe(self) -> str:
        """``ok``, or ``<state>: <reason>`` (never patient data)."""
        if self.state == "ok":
            return "ok"
        if self.state == "connecting":
            return "unavailable: not connected yet"
        if self.state == "unavailable":
            return f"unavailable: {self.reason} ({self.failures} failed attempts)"
        if self.state == "failing":
            return f"failing: {self.failures} consecutive failures, last: {self.reason}"
        return f"fatal: {self.reason}"


class LeaseKeeper:
    """Keeps the lease of one claimed study alive while it is pushed ("one writer per study",
    ``docs/architecture.md``).

    A background task calls ``store.renew(claim, now, lease_s)`` every ``lease_s / 3`` seconds. The lease
    counts as *lost* once a renewal answers ``False`` (another owner took it, or it is gone), or once its
    last known expiry has passed without a successful renewal (the store was unreachable meanwhile).
    A push checks :meth:`held` before it writes and before it records anything as the owner.

    Parameters
    ----------
    store:
        The state store that granted the claim.
    claim:
        The claimed study.
    lease_s:
        ``[relay] lease_s``: the length of the lease and of every renewal.
    clock:
        Source of "now".
    claimed_at:
        The ``now`` the claim was made with (its lease runs until ``claimed_at + lease_s``); default:
        the clock's "now".
    """

    def __init__(
        self,
        store: StateStore,
        claim: StudyClaim,
        lease_s: float,
        clock: Callable[[], datetime],
        claimed_at: datetime | None = None,
    ) -> None:
        self.store = store
        self.claim = claim
        self.lease_s = lease_s
        self.clock = clock
        self.expires = (claimed_at or clock()) + timedelta(seconds=lease_s)
        self.lost = False
        self.renewals = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start renewing (on the running loop); idempotent."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"lease-{self.claim.study_uid}")

    async def stop(self) -> None:
        """Stop renewing; the lease itself is released or kept by what the push recorded."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def held(self) -> bool:
        """True while the lease is ours: never refused by the store and not past its known expiry."""
        return not self.lost and self.clock() < self.expires

    async def _run(self) -> None:
        interval = self.lease_s / 3
        uid = self.claim.study_uid
        while not self.lost:
            await asyncio.sleep(interval)
            now = self.clock()
            try:
                ok = await asyncio.to_thread(self.store.renew, self.claim, now, self.lease_s)
            except Exception as exc:  # StoreError is transient: the lease still runs until ``expires``
                if not isinstance(exc, StoreError):
                    LOGGER.exception("study %s: unexpected error renewing its lease", uid)
                if self.clock() >= self.expires:
                    self.lost = True
                    LOGGER.warning("study %s: lease expired while the store was unreachable: %s", uid, exc)
                    return
                LOGGER.warning("study %s: lease renewal failed, retrying: %s", uid, exc)
                continue
            if not ok:
                self.lost = True
                LOGGER.warning("study %s: lease lost (now held by another node or released)", uid)
                return
            self.renewals += 1
            self.expires = now + timedelta(seconds=self.lease_s)


class Relay:
    """Pushes due studies to the backend: one writer per study, retries with backoff, dead letters.

    Parameters
    ----------
    store, sink:
        The state store and the backend.
    build:
        Records of one study -> ImagingStudy JSON (:class:`ingest.relay.build.StudyBuilder`).
    link:
        Optional async step after ``build`` and before the backend lookup (``ingest.relay.links``: resolves
        ``ImagingStudy.subject`` to a Patient); its ``SinkError`` s are retried / dead-lettered like the
        sink's own.
    settings:
        ``[relay]``.
    node:
        This process's id, used as the claim owner (``[state] node_id`` when set); default
        ``<host>-<random>``, unique per process.
    clock:
        Source of "now" (tests inject one).
    narrative:
        ``[mapping] narrative``: write the generated narrative of docs/mapping.md "Narrative".
    """

    def __init__(
        self,
        store: StateStore,
        sink: Sink,
        build: Build,
        settings: RelaySettings,
        *,
        node: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        metrics: Metrics | None = None,
        link: Link | None = None,
        narrative: bool = False,
    ) -> None:
        self.store = store
        self.sink = sink
        self.build = build
        self.link = link
        self.cfg = settings
        self.narrative = narrative  # [mapping] narrative: the merged resource carries ingest's text
        # the lease owner: ``[state] node_id`` if set (unique per running node), else unique per process
        self.node = node or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.clock = clock
        self.metrics = metrics
        self.totals = RelayTotals()
        self.backend = BackendHealth()
        self._sem = asyncio.Semaphore(self.cfg.concurrency)
        self._wake = asyncio.Event()
        # [relay] max_attempts dead-letters a study after that many transient failures; ``ingest serve``
        # and a replay with --wait-backend turn this off: a backend outage never dead-letters (the study
        # waits, the probe below resumes the pushes as soon as the backend answers again)
        self.transient_dead_letters = True
        self._probed_at = 0.0  # monotonic time of the last probe while failing
        # studies this relay is pushing: a claim of one again (its lease looked stale after the clock
        # was set back, before its next renewal) is dropped, the push under way goes on
        self._pushing: set[str] = set()

    def use_links(self, build: Build, link: Link | None) -> None:
        """Replace ``build`` and ``link`` once the backend is known (``ingest serve`` builds the relay
        before the backend can be reached, so that intake never waits for it); call before pushing."""
        self.build = build
        self.link = link

    def wake(self) -> None:
        """Ask the relay loop to look for due studies now (thread-safe only from the loop thread)."""
        self._wake.set()

    def _request(self, operation: str) -> None:
        if self.metrics is not None:
            self.metrics.backend_requests.labels(operation=operation).inc()

    def _count(self, result: str) -> None:
        self.totals.add(result)
        if self.metrics is not None:
            self.metrics.studies.labels(result=result).inc()

    async def run_once(self, limit: int | None = None) -> int:
        """Claim the studies due now and push them; returns how many were claimed.

        Parameters
        ----------
        limit:
            Claim at most this many studies; default twice ``[relay] concurrency``. At most
            ``concurrency`` of them are pushed at once either way.
        """
        claims, now = await self._claim(self.cfg.concurrency * 2 if limit is None else limit)
        if claims:
            await asyncio.gather(*(self._push_guarded(c, now) for c in claims))
        return len(claims)

    async def _claim(self, limit: int) -> tuple[list[StudyClaim], datetime]:
        """Claim up to ``limit`` due studies (none while the state store is unavailable), and when."""
        now = self.clock()
        try:
            claims = await asyncio.to_thread(
                self.store.claim_due, now, limit, self.node, self.cfg.lease_s,
                stale_after=self.stale_after(now),
            )
        except StoreUnavailableError as exc:
            LOGGER.warning("state store unavailable, relay waits: %s", exc)
            return [], now
        return [c for c in claims if c.study_uid not in self._pushing], now

    def stale_after(self, now: datetime) -> datetime:
        """A due time or next attempt later than this was written before the clock was stepped back, so
        it counts as due (docs/reliability.md "Clock steps"): intake makes a study due ``stable_age_s``
        (or ``release_grace_s``) ahead and a retry waits at most ``max_backoff_s``, plus the step slack."""
        horizon = max(self.cfg.stable_age_s, self.cfg.release_grace_s, self.cfg.max_backoff_s) + STEP_SLACK_S
        return now + timedelta(seconds=horizon)

    async def _push_guarded(self, claim: StudyClaim, claimed_at: datetime) -> None:
        # renewal starts at once: a claim waiting for a free slot must not expire meanwhile
        lease = LeaseKeeper(self.store, claim, self.cfg.lease_s, self.clock, claimed_at)
        lease.start()
        self._pushing.add(claim.study_uid)
        try:
            async with self._sem:
                try:
                    started = time.monotonic()
                    result = await self.push(claim, lease=lease)
                    self._observe(claim, result, time.monotonic() - started)
                except Exception:  # the relay never dies for one study
                    LOGGER.exception("unexpected error pushing study %s", claim.study_uid)
                    if not self._lease_lost(lease, "its retry"):
                        try:
                            await asyncio.to_thread(
                                self.store.schedule_retry,
                                claim,
                                error="internal error (see log)",
                                next_attempt_at=self.clock() + timedelta(seconds=self.cfg.max_backoff_s),
                            )
                        except StoreError as exc:  # the claim's lease expires; the study stays due
                            LOGGER.warning(
                                "study %s: could not schedule its retry, the lease runs out instead: %s",
                                claim.study_uid, exc,
                            )
        finally:
            self._pushing.discard(claim.study_uid)
            await lease.stop()

    def _lease_lost(self, lease: LeaseKeeper, what: str) -> bool:
        """True (logged and counted) when the lease is no longer ours: ``what`` is not done/recorded."""
        if lease.held():
            return False
        LOGGER.warning(
            "study %s: lease of %s lost; %s is left to the node that holds it now",
            lease.claim.study_uid, self.node, what,
        )
        self._count("lease_lost")
        return True

    async def push(self, claim: StudyClaim, *, lease: LeaseKeeper | None = None) -> str:
        """Push one claimed study; returns the result name.

        Parameters
        ----------
        claim:
            The claimed study.
        lease:
            The keeper renewing the claim's lease; default: one is started for this push.

        Returns
        -------
        str
            ``created``, ``updated``, ``unchanged``, ``retried``, ``dead``, or ``lease_lost`` when the
            lease was lost before the write or before the result could be recorded (nothing recorded;
            the study stays due and its next owner re-checks the backend), or ``unrecorded`` when the
            backend holds the result but the state store refused to record it ``[relay]
            record_attempts`` times (the study stays claimed until its lease runs out, then due; the
            next push finds the backend's copy and writes nothing new).
        """
        if lease is not None:
            return await self._push(claim, lease)
        own = LeaseKeeper(self.store, claim, self.cfg.lease_s, self.clock)
        own.start()
        try:
            return await self._push(claim, own)
        finally:
            await own.stop()

    async def _push(self, claim: StudyClaim, lease: LeaseKeeper) -> str:
        uid = claim.study_uid
        records = await asyncio.to_thread(self.store.instances, uid)
        if not records:
            if self._lease_lost(lease, "the dead letter"):
                return "lease_lost"
            await asyncio.to_thread(
                self.store.dead_letter, claim, reason="no_instances", error="study has no instances",
                now=self.clock(),
            )
            self._count("dead")
            return "dead"
        try:
            ours = self.build(records)
        except IngestError as exc:
            if self._lease_lost(lease, "the dead letter"):
                return "lease_lost"
            await asyncio.to_thread(
                self.store.dead_letter, claim, reason="mapping", error=str(exc), now=self.clock()
            )
            LOGGER.error("study %s dead-lettered: mapping failed: %s", uid, exc)
            self._count("dead")
            return "dead"
        try:
            if self.link is not None:
                ours = await self.link(ours, records)
            before = _written(await asyncio.to_thread(self.store.written, uid))
            self._request("find")
            backend = await self.sink.find(uid, claim.backend_id)
            decision = plan(ours, backend, narrative=self.narrative, before=before)
            if isinstance(decision, Refuse):
                self.backend.answered()
                return await self._dead(claim, decision.reason, ValueError(decision.message), lease)
            written_subject = ours.get("subject")
            if isinstance(decision, NoChange):
                assert backend is not None
                written_subject = backend.resource.get("subject")
                result, bid, ver, dig = "unchanged", decision.backend_id, decision.version_id, digest(
                    backend.resource
                )
            elif self._lease_lost(lease, "the write"):
                return "lease_lost"
            elif isinstance(decision, Create):
                self._request("create")
                written = await self.sink.create(decision.resource)
                result, bid, ver, dig = "created", written.id, written.version_id, digest(decision.resource)
            else:
                assert isinstance(decision, Update)
                self._request("update")
                written = await self.sink.update(decision.backend_id, decision.resource)
                result, bid, ver, dig = "updated", written.id, written.version_id, digest(decision.resource)
            if isinstance(decision, Create | Update):
                written_subject = decision.resource.get("subject")
            self.backend.answered()
        except MultipleMatchesError as exc:
            self.backend.answered()
            return await self._dead(claim, "multiple_matches", exc, lease)
        except ForeignContentError as exc:  # the copy cannot be read or sent back whole: never written
            self.backend.answered()
            return await self._dead(claim, exc.reason, exc, lease)
        except PermanentSinkError as exc:
            self.backend.answered()
            return await self._dead(claim, "rejected", exc, lease)
        except RetryableSinkError as exc:
            self.backend.push_failed(short_reason(exc))
            attempts = claim.attempts + 1
            if (
                self.transient_dead_letters
                and attempts >= self.cfg.max_attempts
                and not isinstance(exc, BackendStorageError)
            ):
                return await self._dead(claim, "retries_exhausted", exc, lease)
            if self._lease_lost(lease, "the retry"):
                return "lease_lost"
            delay = backoff_delay(attempts, self.cfg.base_backoff_s, self.cfg.max_backoff_s)
            if exc.retry_after is not None:  # HTTP Retry-After (429/503): the backend's hint, capped
                delay = max(delay, min(exc.retry_after, self.cfg.max_backoff_s))
            await asyncio.to_thread(
                self.store.schedule_retry,
                claim,
                error=str(exc),
                next_attempt_at=self.clock() + timedelta(seconds=delay),
            )
            limit = f" of {self.cfg.max_attempts}" if self.transient_dead_letters else ""
            LOGGER.warning(
                "study %s: backend unavailable (attempt %d%s), next try in %.1f s: %s",
                uid, attempts, limit, delay, exc, extra={"study_uid": uid, "status": "retried"},
            )
            self._count("retried")
            return "retried"
        kept = (json.dumps(ours, ensure_ascii=False), _json_or_none(written_subject))
        recorded = await self._record_pushed(claim, lease, result, bid, ver, dig, kept)
        if recorded != "recorded":
            return recorded
        LOGGER.info("study %s %s (ImagingStudy/%s, %d instances)", uid, result, bid, len(records),
                    extra={"study_uid": uid, "status": result, "instances": len(records)})
        self._count(result)
        return result

    async def _record_pushed(
        self,
        claim: StudyClaim,
        lease: LeaseKeeper,
        result: str,
        bid: str,
        ver: str | None,
        dig: str,
        written: tuple[str, str | None] | None = None,
    ) -> str:
        """Record what the backend now holds; a state-store error is retried here, on the short
        :func:`record_delay` schedule, without writing to the backend again.

        Returns ``recorded``, ``lease_lost`` (counted) or ``unrecorded`` (counted; logged as an error).
        """
        what = f"recording the {result} result"
        failures = 0
        while True:
            if self._lease_lost(lease, what):
                return "lease_lost"
            try:
                await asyncio.to_thread(
                    self.store.mark_pushed, claim, backend_id=bid, version_id=ver, digest=dig,
                    now=self.clock(), written=written,
                )
                return "recorded"
            except StoreError as exc:
                failures += 1
                if failures >= self.cfg.record_attempts:
                    LOGGER.error(
                        "study %s: %s (ImagingStudy/%s) failed %d times, left for the next push "
                        "(its lease runs out; the backend's copy is found then): %s",
                        claim.study_uid, what, bid, failures, exc,
                    )
                    self._count("unrecorded")
                    return "unrecorded"
                delay = record_delay(failures, self.cfg.record_retry_base_s, self.cfg.record_retry_max_s)
                LOGGER.warning(
                    "study %s: %s failed (attempt %d of %d), again in %.1f s: %s",
                    claim.study_uid, what, failures, self.cfg.record_attempts, delay, exc,
                )
                await asyncio.sleep(delay)

    async def _dead(self, claim: StudyClaim, reason: str, exc: Exception, lease: LeaseKeeper) -> str:
        if self._lease_lost(lease, "the dead letter"):
            return "lease_lost"
        await asyncio.to_thread(
            self.store.dead_letter, claim, reason=reason, error=str(exc), now=self.clock()
        )
        LOGGER.error("study %s dead-lettered (%s): %s", claim.study_uid, reason, exc,
                     extra={"study_uid": claim.study_uid, "status": f"dead:{reason}"})
        self._count("dead")
        return "dead"

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Loop until ``stop`` is set; the current pushes finish before it returns.

        It claims whenever fewer than twice ``[relay] concurrency`` claims are in flight (at most
        ``concurrency`` pushing at once), so a push that hangs until the backend timeout holds one slot,
        not the relay: studies that become due meanwhile are claimed and pushed by the others.
        """
        cap = self.cfg.concurrency * 2
        running: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                await self._probe_if_failing()
                if len(running) < cap:
                    claims, now = await self._claim(cap - len(running))
                    running.update(asyncio.create_task(self._push_guarded(c, now)) for c in claims)
                    if claims and len(running) < cap:
                        continue  # more may be due
                self._wake.clear()
                timeout = await self._until_due() if len(running) < cap else self.cfg.poll_interval_s
                waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())}
                try:
                    await asyncio.wait(waiters | running, timeout=timeout, return_when="FIRST_COMPLETED")
                finally:
                    for w in waiters:
                        w.cancel()
                for task in [t for t in running if t.done()]:  # a finished push frees its claim slot
                    running.discard(task)
                    if not task.cancelled() and (exc := task.exception()) is not None:
                        LOGGER.error("a relay push ended with an error", exc_info=exc)
        finally:
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _until_due(self) -> float:
        """How long the loop sleeps when it has claimed what was due: until the next study this node's
        state store knows of becomes due (pushed on time, not up to a poll interval late), and at most
        ``[relay] poll_interval_s`` (what another node or a retry's backoff brings is found by the poll)."""
        now = self.clock()
        try:
            due = await asyncio.to_thread(self.store.next_due_at, now)
        except StoreError:  # the claim says so; the poll tries again
            return self.cfg.poll_interval_s
        if due is None:
            return self.cfg.poll_interval_s
        return min(self.cfg.poll_interval_s, max(_MIN_SLEEP_S, (due - now).total_seconds()))

    def _observe(self, claim: StudyClaim, result: str, seconds: float) -> None:
        """The push histograms: its duration, and for a write the time from the study's last instance
        received (as claimed) to now (``ingest_pushed_latency_seconds``)."""
        if self.metrics is None:
            return
        self.metrics.push_seconds.observe(seconds)
        if result in ("created", "updated") and claim.last_seen is not None:
            latency = (self.clock() - claim.last_seen).total_seconds()
            self.metrics.pushed_latency_seconds.observe(max(0.0, latency))

    async def _probe_if_failing(self) -> None:
        """While pushes fail transiently, ask the backend a cheap question every ``_PROBE_EVERY_S``; when
        it answers, every study waiting for its retry becomes due now and the relay resumes at once
        (instead of each study waiting out its own backoff, up to ``max_backoff_s``)."""
        if self.backend.state != "failing":
            return
        probe = getattr(self.sink, "probe", None)
        now = time.monotonic()
        if probe is None or now - self._probed_at < min(_PROBE_EVERY_S, self.cfg.max_backoff_s):
            return
        self._probed_at = now
        try:
            await probe()
        except SinkError as exc:
            self.backend.push_failed(short_reason(exc))
            return
        except Exception:  # a probe never takes the relay down
            LOGGER.debug("backend probe failed", exc_info=True)
            return
        self.backend.answered()
        resumed = await asyncio.to_thread(self.store.retry_now, self.clock())
        LOGGER.info("the backend answers again: %d waiting stud%s due now", resumed,
                    "y" if resumed == 1 else "ies")

    async def drain(self, study_uids: Iterable[str], *, deadline: float | None = None) -> bool:
        """Push ``study_uids`` now and keep retrying until each is pushed or dead (end of a replay).

        With ``deadline`` (a ``time.monotonic()`` value) it stops there and returns ``False`` when some
        studies are still waiting for the backend (they stay pending for a later push); ``True`` when
        every one was pushed or dead-lettered.
        """
        wanted = set(study_uids)
        if not wanted:
            return True
        await asyncio.to_thread(self.store.mark_due, wanted, self.clock())
        while True:
            await self._probe_if_failing()
            await self.run_once(limit=self.cfg.concurrency * _DRAIN_CLAIMS_PER_SLOT)
            pending = [
                row
                for row in await asyncio.to_thread(self.store.studies, StudyState.PENDING)
                if row.study_uid in wanted and (row.dirty or row.next_attempt_at is not None)
            ]
            if not pending:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            now = self.clock()
            waits = [
                (row.next_attempt_at - now).total_seconds()
                for row in pending
                if row.next_attempt_at is not None
            ]
            delay = min([self.cfg.poll_interval_s, *[w for w in waits if w > 0]]) if waits else 0.05
            await asyncio.sleep(max(0.02, min(delay, self.cfg.poll_interval_s)))


def _written(kept: tuple[str | None, str | None]) -> Written | None:
    """The merge's "ours before" from what the state store kept of the last write (``None``: unknown)."""
    ours_text, subject_text = kept
    if ours_text is None:
        return None
    try:
        ours = json.loads(ours_text)
        subject = json.loads(subject_text) if subject_text is not None else None
    except ValueError:
        LOGGER.warning("the record of the last write is not JSON; merging without it")
        return None
    if not isinstance(ours, dict):
        return None
    return Written(ours=ours, subject=subject if isinstance(subject, dict) else None)


def _json_or_none(value: Any) -> str | None:
    return json.dumps(value, ensure_ascii=False) if value is not None else None


async def _unless_stopped(step: Callable[[], Awaitable[None]], stop: asyncio.Event) -> bool:
    """Run ``step``; ``False`` (``step`` cancelled) when ``stop`` is set first, e.g. during a connect
    that waits for its timeout."""
    running = asyncio.ensure_future(step())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the waiting task itself was cancelled
        running.cancel()
        raise
    finally:
        stopping.cancel()
    if not running.done():
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await running
        return False
    running.result()  # raises what the step raised
    return True


async def wait_for_backend(
    step: Callable[[], Awaitable[None]],
    settings: RelaySettings,
    stop: asyncio.Event,
    health: BackendHealth,
    *,
    what: str,
    token_configured: bool,
) -> bool:
    """Run ``step`` (connect, or wire the links) until it succeeds or ``stop`` is set; never gives up.

    ``ingest serve`` only: intake runs meanwhile and studies wait as pending (``docs/reliability.md``).
    A transient failure is retried with the ``[relay]`` backoff (capped at ``max_backoff_s``, with no
    attempt limit); a backend that cannot be used as configured (schema unusable, HTTP 401 while no
    token is configured, Patient/Endpoint operations missing) is logged as an ERROR, reported as
    ``fatal`` and retried every ``max_backoff_s``. ``ingest replay`` keeps its bounded
    ``connect_with_backoff``.

    Parameters
    ----------
    step:
        The coroutine function to run.
    settings:
        ``[relay]``: ``base_backoff_s`` and ``max_backoff_s``.
    stop:
        Set to stop waiting.
    health:
        Updated after every attempt.
    what:
        What ``step`` does, for log lines.
    token_configured:
        Whether a bearer token is configured (an HTTP 401 without one cannot heal by itself).

    Returns
    -------
    bool
        ``True`` once ``step`` succeeded, ``False`` when ``stop`` was set first.
    """
    cfg = settings
    attempt = 0
    while not stop.is_set():
        attempt += 1
        try:
            if not await _unless_stopped(step, stop):
                return False
        except RetryableSinkError as exc:
            if exc.code == 401 and not token_configured:
                delay = cfg.max_backoff_s
                health.unusable("the backend requires a token (HTTP 401) and none is configured")
                LOGGER.error("%s: %s; intake continues, studies wait; next try in %.0f s",
                             what, health.reason, delay)
            else:
                delay = backoff_delay(attempt, cfg.base_backoff_s, cfg.max_backoff_s)
                health.connect_failed(short_reason(exc))
                LOGGER.warning(
                    "%s: backend unavailable (attempt %d), intake continues, studies wait; "
                    "next try in %.1f s: %s", what, attempt, delay, short_reason(exc, 400),
                )
        except (ConfigError, PermanentSinkError) as exc:
            delay = cfg.max_backoff_s
            health.unusable(short_reason(exc))
            LOGGER.error("%s: the backend cannot be used as configured; intake continues, studies wait; "
                         "next try in %.0f s: %s", what, delay, short_reason(exc, 400))
        except Exception:
            delay = cfg.max_backoff_s
            health.unusable("internal error (see log)")
            LOGGER.exception("%s: unexpected error; next try in %.0f s", what, delay)
        else:
            health.answered()
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
    return False


async def run_relay(
    relay: Relay,
    connect: Callable[[], Awaitable[None]],
    wire: Callable[[], Awaitable[tuple[Build, Link | None]]],
    stop: asyncio.Event,
    *,
    token_configured: bool = False,
) -> None:
    """``ingest serve``'s relay task: wait for the backend, wire the links, then push until ``stop``.

    Nothing is claimed before the backend is connected and ``[endpoint]`` / ``[patient]`` are wired, so
    studies received meanwhile stay pending (no attempts counted) and are pushed once it is up.

    Parameters
    ----------
    relay:
        Built over the sink (not connected yet); its ``backend`` health is kept up to date, and its
        ``[relay]`` backoff is used for both waits.
    connect:
        Connects the sink (e.g. ``sink.connect``); returns at once when it is connected.
    wire:
        Resolves ``[endpoint]`` / ``[patient]`` over the connected sink and returns the build and link
        steps to use from then on (``ingest.app.wiring.wire_links``).
    stop:
        Set to stop.
    token_configured:
        Whether a bearer token is configured (see :func:`wait_for_backend`).
    """
    if not await wait_for_backend(connect, relay.cfg, stop, relay.backend, what="backend connection",
                                  token_configured=token_configured):
        return
    wired: list[tuple[Build, Link | None]] = []

    async def prepare() -> None:
        wired.append(await wire())

    if not await wait_for_backend(prepare, relay.cfg, stop, relay.backend, what="Endpoint/Patient wiring",
                                  token_configured=token_configured):
        return
    relay.use_links(*wired[-1])
    relay.transient_dead_letters = False  # while serving, an outage never dead-letters (README)
    LOGGER.info("relay connected to the backend; pushing pending studies")
    await relay.run_forever(stop)
