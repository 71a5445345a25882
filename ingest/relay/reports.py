"""The Storage Commitment report sender (docs/architecture.md "Storage Commitment").

The N-ACTION SCP (``ingest.sources.dimse.commitment``) stores each request and wakes this sender. The
sender claims due reports from the state store (a lease per report), decides each one once
(:meth:`ingest.ports.CommitmentState.decide_commitment`, which also holds the committed instances'
bytes until ``now + [spool] commitment_hold``) and delivers it through its channels in order: the
requester's own association when it is still open, else a new association to it
(:class:`ingest.ports.ReportChannel`).

- **Slots**: ``[listener.commitment] senders`` deliveries run at once, at most one per requester AE; a
  requester with a delivery under way is left out of the next claims. A requester that accepts the
  connection and never answers holds one slot, for at most ``report_timeout_s`` per attempt; the other
  requesters' reports go out meanwhile.
- **Retries**: a failed delivery is retried with the relay's backoff
  (:func:`ingest.relay.relay.backoff_delay`, ``retry_base_s`` .. ``retry_max_s``), persisted as the
  request's next attempt, and given up (``abandoned``) once the next attempt would come later than
  ``give_up_after_s`` after the request arrived.
- **Clock steps** (:class:`ingest.clock.Timekeeper`): a next attempt more than ``retry_max_s`` (plus
  the step slack) away was set before a step back and counts as due; giving up is a destructive timer
  and waits while the wall clock has stepped forward past the monotonic time elapsed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from ingest.clock import Timekeeper
from ingest.config import CommitmentSettings
from ingest.errors import ReportDeliveryError, StoreError
from ingest.logs import printable
from ingest.ports import CommitmentClaim, CommitmentReport, CommitmentState, ReportChannel
from ingest.relay.relay import backoff_delay

if TYPE_CHECKING:
    from ingest.metrics import Metrics

__all__ = ["CommitmentReports"]

LOGGER = logging.getLogger(__name__)


class CommitmentReports:
    """Claims, decides and delivers Storage Commitment reports (module doc); implements
    :class:`ingest.ports.ReportSender`.

    Parameters
    ----------
    store:
        The state store (requests, decisions, holds, report leases).
    channels:
        Tried in order for each report; the first that has a way to the requester delivers it.
    settings:
        ``[listener.commitment]``.
    hold:
        ``[spool] commitment_hold``: how long a committed instance's bytes are kept at least.
    owner:
        This node's name on report leases (a restarted node takes its own leases back at once).
    lease_s:
        How long a claimed report stays leased (longer than one delivery may take).
    metrics:
        ``ingest_commitments_total{result}`` and ``ingest_commitments_pending``, if any.
    timekeeper:
        The clocks (tests step an injected one).
    """

    def __init__(
        self,
        store: CommitmentState,
        channels: Sequence[ReportChannel],
        settings: CommitmentSettings,
        *,
        hold: timedelta,
        owner: str,
        lease_s: float | None = None,
        metrics: Metrics | None = None,
        timekeeper: Timekeeper | None = None,
    ) -> None:
        self.store = store
        self.channels = list(channels)
        self.settings = settings
        self.hold = hold
        self.owner = owner
        self.lease_s = lease_s if lease_s is not None else max(60.0, 3 * settings.report_timeout_s)
        self.metrics = metrics
        self.time = timekeeper if timekeeper is not None else Timekeeper()
        self._lock = threading.Lock()
        self._busy: dict[str, Future[None]] = {}  # requester AE -> its delivery under way
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    # -- the loop -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender thread (reports left pending by an earlier run are due at once)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._pool = ThreadPoolExecutor(
            max_workers=self.settings.senders, thread_name_prefix="ingest-commitment-send"
        )
        self._thread = threading.Thread(target=self._run, name="ingest-commitment", daemon=True)
        self._thread.start()
        self.wake()

    def close(self, wait_s: float = 10.0) -> None:
        """Stop claiming; deliveries under way end within ``report_timeout_s``; the rest stay pending."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=wait_s)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def wake(self) -> None:
        """Look for due reports now."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # the thread must survive a bad round (the store is retried next round)
                LOGGER.exception("Storage Commitment sender round failed")
            self._wake.wait(timeout=self.settings.poll_interval_s)
            self._wake.clear()

    def run_once(self) -> int:
        """Claim due reports for the free slots and start their deliveries (without waiting for them);
        returns how many were started. Without :meth:`start`, delivers them in this thread."""
        with self._lock:
            for ae in [ae for ae, f in self._busy.items() if f.done()]:
                del self._busy[ae]
            busy = set(self._busy)
        free = self.settings.senders - len(busy)
        if free <= 0:
            return 0
        now = self.time.now()
        try:
            pending = self.store.commitment_counts().get("pending", 0)
            if self.metrics is not None:
                self.metrics.commitments_pending.set(pending)
            if not pending:
                return 0
            claims = self.store.claim_commitments(
                now, free, self.owner, self.lease_s, stale_after=self._stale_after(now), exclude_aes=busy
            )
        except StoreError as exc:
            LOGGER.warning("Storage Commitment reports not claimed: %s", exc)
            return 0
        started = skipped = 0
        for claim in claims:
            with self._lock:
                if claim.calling_ae in self._busy:
                    skipped += 1  # its next report waits (leased to this node, claimed again next round)
                    continue
                if self._pool is None:
                    future: Future[None] = Future()
                    self._busy[claim.calling_ae] = future
                else:
                    future = self._pool.submit(self._deliver_and_wake, claim)
                    self._busy[claim.calling_ae] = future
            started += 1
            if self._pool is None:
                try:
                    self.deliver(claim)
                finally:
                    future.set_result(None)
        if skipped and started < free:
            self.wake()  # other requesters' reports may be due behind the skipped ones: claim again now
        return started

    def _stale_after(self, now: datetime) -> datetime:
        """A next attempt later than this was set before the clock was stepped back (a retry is never
        scheduled further away than ``retry_max_s``)."""
        return now + timedelta(seconds=self.settings.retry_max_s) + self.time.slack

    def _deliver_and_wake(self, claim: CommitmentClaim) -> None:
        try:
            self.deliver(claim)
        finally:
            self.wake()  # the slot is free: the requester's next report may go

    # -- one report ----------------------------------------------------------------------------------------

    def deliver(self, claim: CommitmentClaim) -> None:
        """Decide (once) and send one report; record the outcome. Never raises."""
        try:
            now = self.time.now()
            report = self.store.decide_commitment(claim.transaction_uid, now=now, hold_until=now + self.hold)
        except StoreError as exc:
            LOGGER.warning("Storage Commitment %s not decided yet: %s", claim.transaction_uid, exc)
            self._retry(claim, f"state store: {exc}")
            return
        try:
            via = self._send(report)
        except ReportDeliveryError as exc:
            LOGGER.warning(
                "Storage Commitment report %s to %s not delivered (attempt %d): %s",
                claim.transaction_uid, printable(claim.calling_ae), claim.attempts + 1, exc,
            )
            self._retry(claim, str(exc))
            return
        except Exception as exc:
            LOGGER.exception("Storage Commitment report %s failed unexpectedly", claim.transaction_uid)
            self._retry(claim, f"internal error: {type(exc).__name__}")
            return
        try:
            self.store.commitment_reported(claim, now=self.time.now())
        except StoreError as exc:  # delivered: a repeat after a restart is harmless (same result)
            LOGGER.warning(
                "Storage Commitment report %s delivered but not recorded: %s", claim.transaction_uid, exc
            )
        self._count("partial" if report.failed else "committed")
        LOGGER.info(
            "Storage Commitment report %s to %s sent %s: %d committed, %d failed",
            claim.transaction_uid, printable(claim.calling_ae), via,
            len(report.committed), len(report.failed),
        )

    def _send(self, report: CommitmentReport) -> str:
        """Through the first channel that has a way to the requester; a channel that tried and failed
        passes it on to the next."""
        problems: list[str] = []
        for channel in self.channels:
            try:
                via = channel.send_report(report, timeout_s=self.settings.report_timeout_s)
            except ReportDeliveryError as exc:
                problems.append(str(exc))
                continue
            if via is not None:
                return via
        if not problems:
            problems.append(
                "no open association that accepted the report, and no host/port configured "
                f"for {report.calling_ae!r} in [listener] allowed_calling_aes"
            )
        raise ReportDeliveryError("; ".join(problems))

    def _retry(self, claim: CommitmentClaim, error: str) -> None:
        now = self.time.now()
        give_up_at = claim.received_at + timedelta(seconds=self.settings.give_up_after_s)
        delay = backoff_delay(claim.attempts + 1, self.settings.retry_base_s, self.settings.retry_max_s)
        next_at: datetime | None = now + timedelta(seconds=delay)
        # giving up is destructive: it waits while the wall clock has stepped forward
        if self.time.destructive_now() + timedelta(seconds=delay) > give_up_at:
            next_at = None
        try:
            self.store.commitment_retry(claim, error=error, next_attempt_at=next_at)
        except StoreError as exc:  # the lease expires and the report is tried again
            LOGGER.warning("Storage Commitment %s: retry not recorded: %s", claim.transaction_uid, exc)
            return
        if next_at is None:
            LOGGER.error(
                "Storage Commitment report %s to %s abandoned after %d attempts: %s",
                claim.transaction_uid, printable(claim.calling_ae), claim.attempts + 1, error,
            )
            self._count("abandoned")
        else:
            self._count("retried")

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.commitments.labels(result=result).inc()
