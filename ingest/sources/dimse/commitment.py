"""The Storage Commitment Push Model SCP (PS3.4 Annex J; docs/architecture.md "Storage Commitment").

A sender that wants to delete its copy asks, with an N-ACTION (Action Type 1) naming a Transaction UID
and the SOP Class / Instance pairs it sent, whether ``ingest`` takes responsibility for them; the answer
comes later, in an N-EVENT-REPORT (Event Type 1: every instance committed; 2: some failed).

- **Request** (:meth:`CommitmentSCP.on_n_action`, on the association's thread): the request is checked
  (Requested SOP Instance, Action Type, Transaction UID and every Referenced SOP item well-formed, at most
  ``[listener.commitment] max_instances``), committed to the state store, and only then answered
  ``0x0000``; a restart never forgets it. The association has passed the listener's AE, allowlist and
  TLS checks like any C-STORE one.
- **Decision** (:meth:`ingest.ports.CommitmentState.decide_commitment`): made once, in one transaction
  that also holds the committed instances' bytes against retention until ``now + [spool]
  commitment_hold``; see :mod:`ingest.adapters.state.commitments` for which instances qualify.
- **Report** (the sender thread, :meth:`CommitmentSCP.run_once`): on the requester's own association
  when it is still open and it proposed the SCP role for the Storage Commitment class (SCP/SCU Role
  Selection, PS3.7 D.3.3.4; an association on which this node may act as SCU), else on a new association
  to the ``host`` / ``port`` of the requester's ``[listener] allowed_calling_aes`` entry, proposing the
  SCP role there; a failed delivery is retried with exponential backoff and full jitter (tenacity),
  persisted as the request's next attempt, and given up after ``give_up_after_s`` (``abandoned``).

On the requester's association the report is sent by the edge's event loop once no request of the
peer is being handled (:meth:`ingest.sources.dimse.edge.Association.request`), so the N-ACTION's answer
always goes first. The N-ACTION's Action Information is kept only up to what ``max_instances``
Referenced SOP items can take (:meth:`CommitmentSCP.receiver`): a larger one is refused with 0x0213
without being decoded, so its size cannot cost memory.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import socket
import ssl
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any, Final

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt

from ingest.config import ListenerSettings, Settings, TLSSettings
from ingest.errors import StoreError
from ingest.intake.admit import utcnow
from ingest.logs import printable
from ingest.metrics import Metrics
from ingest.ports import CommitmentAdded, CommitmentClaim, CommitmentReport, StateStore

__all__ = [
    "STORAGE_COMMITMENT_INSTANCE",
    "STORAGE_COMMITMENT_PUSH",
    "CommitmentSCP",
    "add_commitment_context",
    "event_information",
]

LOGGER = logging.getLogger(__name__)

#: Storage Commitment Push Model SOP Class and its well-known SOP Instance (PS3.4 J.3.4, PS3.6 Annex A).
STORAGE_COMMITMENT_PUSH: Final = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE: Final = "1.2.840.10008.1.20.1.1"

_TRANSFER_SYNTAXES: Final = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
_UID_RE: Final = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")  # PS3.5 9.1

# N-ACTION statuses (PS3.7 10.1.4.1.10)
_SUCCESS: Final = 0x0000
_PROCESSING_FAILURE: Final = 0x0110
_NO_SUCH_INSTANCE: Final = 0x0112
_INVALID_ARGUMENT: Final = 0x0115
_NO_SUCH_ACTION: Final = 0x0123
_RESOURCE_LIMITATION: Final = 0x0213

#: Reports delivered at once (each may wait for a peer's timeouts).
_SENDERS: Final = 4
#: Reports claimed per round.
_CLAIM_BATCH: Final = 16


def add_commitment_context(ae: AE) -> None:
    """Support Storage Commitment Push Model on ``ae``, accepting a requester's proposal to take the SCP
    role too (so the report can come back on its association)."""
    ae.add_supported_context(STORAGE_COMMITMENT_PUSH, _TRANSFER_SYNTAXES, scu_role=True, scp_role=True)


def event_information(report: CommitmentReport) -> Dataset:
    """The N-EVENT-REPORT Event Information of ``report`` (PS3.4 J.3.3, Table J.3-2).

    Transaction UID (0008,1195); Referenced SOP Sequence (0008,1199) of the committed instances (present
    when there is one); Failed SOP Sequence (0008,1198) with each Failure Reason (0008,1197) (Event Type
    2 only).
    """
    ds = Dataset()
    ds.TransactionUID = report.transaction_uid
    if report.committed:
        ds.ReferencedSOPSequence = DicomSequence([_item(cls, uid) for cls, uid in report.committed])
    if report.failed:
        failed = []
        for cls, uid, reason in report.failed:
            item = _item(cls, uid)
            item.FailureReason = reason
            failed.append(item)
        ds.FailedSOPSequence = DicomSequence(failed)
    return ds


def _item(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item


def _raw_text(ds: Dataset, tag: int) -> str:
    """A UI value as sent, without pydicom's conversion (which warns about the invalid UIDs this module
    refuses with its own status)."""
    if tag not in ds:
        return ""
    value = ds.get_item(tag).value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").rstrip("\0 ").strip()
    return "" if value is None else str(value).strip()


def _valid_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID_RE.fullmatch(value) is not None


class _Refused(Exception):
    """An N-ACTION that is answered with a failure status and an Error Comment."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status


class DeliveryError(Exception):
    """A report could not be delivered (the peer is unreachable, refused, or answered a failure)."""


@dataclass(frozen=True)
class _Route:
    """Where reports for one AE go on a new association."""

    host: str
    port: int


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]  # (0000,0902) LO
    return ds


def tls_client_context(tls: TLSSettings) -> ssl.SSLContext:
    """The client side of ``[listener.tls]`` for report associations: TLS 1.2+, this node's certificate
    and key, and the peer verified against ``ca`` when it is set (the system store otherwise). Peers are
    addressed by configured host, which is not checked against their certificate's names."""
    ctx = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert is not None and tls.key is not None:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


class CommitmentSCP:
    """Storage Commitment requests on the listener's associations and the thread that reports them.

    Parameters
    ----------
    cfg:
        ``[listener]``: our AE title, timeouts, TLS, ``allowed_calling_aes`` (report routes) and
        ``[listener.commitment]``.
    store:
        The state store (requests, decisions, holds).
    metrics:
        ``ingest_commitments_total{result}`` and ``ingest_commitments_pending``.
    hold:
        ``[spool] commitment_hold``: how long a committed instance's bytes are kept at least.
    owner:
        This node's name on report leases (a restarted node takes its own leases back at once).
    clock:
        The current time (timezone-aware).
    """

    def __init__(
        self,
        cfg: ListenerSettings,
        store: StateStore,
        metrics: Metrics,
        *,
        hold: timedelta,
        owner: str,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.cfg = cfg
        self.settings = cfg.commitment
        self.store = store
        self.metrics = metrics
        self.hold = hold
        self.owner = owner
        self.clock = clock
        self.lease_s = max(60.0, 3 * (cfg.acse_timeout_s + cfg.dimse_timeout_s))
        self._routes: dict[str, _Route] = {
            e.ae: _Route(e.host, e.port) for e in cfg.allowed_calling_aes if e.host is not None and e.port
        }
        self._lock = threading.Lock()
        # same-association channels: the requester's association per transaction, and every open one on
        # which this node may send N-EVENT-REPORT, per calling AE
        self._by_transaction: dict[str, weakref.ref[Any]] = {}
        self._channels: dict[str, weakref.WeakSet[Any]] = {}
        self._in_flight: set[str] = set()
        # one N-EVENT-REPORT at a time per association (pynetdicom's send is not re-entrant), each with
        # its own Message ID
        self._sending: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
        self._message_ids = itertools.count(1)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._tls = tls_client_context(cfg.tls) if cfg.tls.enabled else None

    @classmethod
    def from_settings(cls, settings: Settings, store: StateStore, metrics: Metrics) -> CommitmentSCP:
        """The SCP of ``ingest serve``: ``[listener]``, ``[spool] commitment_hold``, ``[state] node_id``."""
        owner = settings.state.node_id or socket.gethostname()
        return cls(settings.listener, store, metrics, hold=settings.spool.hold, owner=owner)

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        """The pynetdicom event handlers to bind on the listener's server."""
        return [
            (evt.EVT_N_ACTION, self.on_n_action),
            (evt.EVT_ACCEPTED, self.on_accepted),
        ]

    # -- requests (association threads) -----------------------------------------------------------------

    def on_accepted(self, event: Any) -> None:
        """EVT_ACCEPTED: remember an association on which a report may go back (the requester proposed
        the SCP role for Storage Commitment and it was accepted)."""
        assoc = event.assoc
        try:
            if not _may_report_on(assoc):
                return
            calling = str(assoc.requestor.ae_title).strip()
            with self._lock:
                self._channels.setdefault(calling, weakref.WeakSet()).add(assoc)
        except Exception:  # never into pynetdicom
            LOGGER.exception("could not inspect an accepted association for Storage Commitment")

    def on_n_action(self, event: Any) -> tuple[Dataset, None]:
        """EVT_N_ACTION: store the request durably, then answer; never raises."""
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            transaction_uid, items = self._parse(event)
            added = self.store.add_commitment(transaction_uid, calling, items, now=self.clock())
        except _Refused as exc:
            LOGGER.warning(
                "Storage Commitment request from %s refused (0x%04X): %s", printable(calling), exc.status, exc
            )
            self.metrics.commitments.labels(result="refused").inc()
            return _status(exc.status, str(exc)), None
        except StoreError as exc:
            LOGGER.error(
                "Storage Commitment request from %s not stored, answered 0x0213: %s", printable(calling), exc
            )
            self.metrics.commitments.labels(result="refused").inc()
            return _status(_RESOURCE_LIMITATION, "state store unavailable; retry later"), None
        except Exception:
            LOGGER.exception("unexpected error handling a Storage Commitment request")
            self.metrics.commitments.labels(result="refused").inc()
            return _status(_PROCESSING_FAILURE, "internal error"), None
        if added is CommitmentAdded.CONFLICT:
            LOGGER.warning(
                "Storage Commitment request from %s refused: Transaction UID %s is taken by another request",
                printable(calling),
                transaction_uid,
            )
            self.metrics.commitments.labels(result="refused").inc()
            return _status(_PROCESSING_FAILURE, "Transaction UID already used for other instances"), None
        result = "requested" if added is CommitmentAdded.NEW else "repeated"
        self.metrics.commitments.labels(result=result).inc()
        LOGGER.info(
            "Storage Commitment request %s from %s for %d instances stored (%s)",
            transaction_uid,
            printable(calling),
            len(items),
            result,
        )
        with self._lock:
            self._by_transaction[transaction_uid] = weakref.ref(event.assoc)
        self.wake()
        return _status(_SUCCESS), None

    def receiver(self) -> _Bounded:
        """The receiver of an N-ACTION's Action Information, bounded by ``max_instances``: each
        Referenced SOP item takes at most :data:`_ITEM_BYTES` (two UIDs of 64 characters with their
        headers and item delimiters)."""
        return _Bounded(_ACTION_FIXED_BYTES + self.settings.max_instances * _ITEM_BYTES)

    def n_action(self, assoc: Any, command: Any, receiver: Any) -> bytes:
        """An N-ACTION-RQ on ``assoc`` (edge command and receiver): its N-ACTION-RSP command set."""
        from ingest.sources.dimse.framing import NO_DATA_SET, encode_command

        sop_class = command.text(0x0003) or STORAGE_COMMITMENT_PUSH
        requested = command.text(0x1001)
        action = command.us(0x1008)
        if isinstance(receiver, _Bounded) and receiver.overflow:
            calling = str(assoc.requestor.ae_title)
            LOGGER.warning(
                "Storage Commitment request from %s refused (0x0213): Action Information over %d bytes "
                "(more than %d instances), not decoded",
                printable(calling), receiver.cap, self.settings.max_instances,
            )
            self.metrics.commitments.labels(result="refused").inc()
            rsp = _status(_RESOURCE_LIMITATION, f"more than {self.settings.max_instances} instances")
        else:
            data = receiver.data() if isinstance(receiver, _Bounded) else b""
            event = _ActionEvent(assoc, requested, action, data, _cx_syntax(assoc, sop_class))
            rsp, _ = self.on_n_action(event)
        return encode_command({
            0x0002: sop_class, 0x0100: 0x8130, 0x0120: command.message_id, 0x0800: NO_DATA_SET,
            0x0900: int(rsp.Status), 0x0902: str(rsp.ErrorComment) if "ErrorComment" in rsp else None,
            0x1000: requested or None, 0x1008: action,
        })

    def _parse(self, event: Any) -> tuple[str, list[tuple[str, str]]]:
        """Transaction UID and (SOP Class, SOP Instance) pairs of an N-ACTION, or :class:`_Refused`."""
        req = event.request
        if str(req.RequestedSOPInstanceUID or "").strip() != STORAGE_COMMITMENT_INSTANCE:
            raise _Refused(_NO_SUCH_INSTANCE, f"Requested SOP Instance must be {STORAGE_COMMITMENT_INSTANCE}")
        if req.ActionTypeID != 1:
            raise _Refused(_NO_SUCH_ACTION, "Action Type ID must be 1 (Request Storage Commitment)")
        try:
            info = event.action_information
        except Exception as exc:
            raise _Refused(_INVALID_ARGUMENT, "Action Information cannot be decoded") from exc
        transaction_uid = _raw_text(info, 0x00081195)  # Transaction UID
        if not _valid_uid(transaction_uid):
            raise _Refused(_INVALID_ARGUMENT, "Transaction UID (0008,1195) missing or not a valid UID")
        seq = info.get("ReferencedSOPSequence")
        if not seq:
            raise _Refused(_INVALID_ARGUMENT, "Referenced SOP Sequence (0008,1199) missing or empty")
        if len(seq) > self.settings.max_instances:
            raise _Refused(_RESOURCE_LIMITATION, f"more than {self.settings.max_instances} instances")
        items: list[tuple[str, str]] = []
        for number, item in enumerate(seq, start=1):
            cls = _raw_text(item, 0x00081150)  # Referenced SOP Class UID
            uid = _raw_text(item, 0x00081155)  # Referenced SOP Instance UID
            if not (_valid_uid(cls) and _valid_uid(uid)):
                raise _Refused(_INVALID_ARGUMENT, f"Referenced SOP item {number}: missing or invalid UID")
            items.append((cls, uid))
        return transaction_uid, items

    # -- the sender ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender thread (reports left pending by an earlier run are due at once)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._pool = ThreadPoolExecutor(max_workers=_SENDERS, thread_name_prefix="ingest-commitment-send")
        self._thread = threading.Thread(target=self._run, name="ingest-commitment", daemon=True)
        self._thread.start()
        self.wake()

    def close(self, wait_s: float = 10.0) -> None:
        """Stop the sender; a report being delivered finishes (bounded); the rest stay pending."""
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
        """Claim the due reports and deliver them (in parallel, waiting for all); returns how many were
        claimed. Used by the sender thread and by tests."""
        try:
            pending = self.store.commitment_counts().get("pending", 0)
            self.metrics.commitments_pending.set(pending)
            if not pending:
                return 0
            claims = self.store.claim_commitments(self.clock(), _CLAIM_BATCH, self.owner, self.lease_s)
        except StoreError as exc:
            LOGGER.warning("Storage Commitment reports not claimed: %s", exc)
            return 0
        with self._lock:
            claims = [c for c in claims if c.transaction_uid not in self._in_flight]
            self._in_flight.update(c.transaction_uid for c in claims)
        if not claims:
            return 0
        try:
            if self._pool is None or len(claims) == 1:
                for claim in claims:
                    self._deliver(claim)
            else:
                for future in [self._pool.submit(self._deliver, c) for c in claims]:
                    future.result()
        finally:
            with self._lock:
                self._in_flight.difference_update(c.transaction_uid for c in claims)
        return len(claims)

    def _deliver(self, claim: CommitmentClaim) -> None:
        """Decide (once) and send one report; record the outcome. Never raises."""
        try:
            now = self.clock()
            report = self.store.decide_commitment(claim.transaction_uid, now=now, hold_until=now + self.hold)
        except StoreError as exc:
            LOGGER.warning("Storage Commitment %s not decided yet: %s", claim.transaction_uid, exc)
            self._retry(claim, f"state store: {exc}")
            return
        try:
            via = self._send(claim, report)
        except DeliveryError as exc:
            LOGGER.warning(
                "Storage Commitment report %s to %s not delivered (attempt %d): %s",
                claim.transaction_uid,
                printable(claim.calling_ae),
                claim.attempts + 1,
                exc,
            )
            self._retry(claim, str(exc))
            return
        except Exception as exc:
            LOGGER.exception("Storage Commitment report %s failed unexpectedly", claim.transaction_uid)
            self._retry(claim, f"internal error: {type(exc).__name__}")
            return
        try:
            self.store.commitment_reported(claim, now=self.clock())
        except StoreError as exc:  # delivered: a repeat after a restart is harmless (same result)
            LOGGER.warning(
                "Storage Commitment report %s delivered but not recorded: %s", claim.transaction_uid, exc
            )
        with self._lock:
            self._by_transaction.pop(claim.transaction_uid, None)
        self.metrics.commitments.labels(result="partial" if report.failed else "committed").inc()
        LOGGER.info(
            "Storage Commitment report %s to %s sent %s: %d committed, %d failed",
            claim.transaction_uid,
            printable(claim.calling_ae),
            via,
            len(report.committed),
            len(report.failed),
        )

    def _retry(self, claim: CommitmentClaim, error: str) -> None:
        now = self.clock()
        give_up_at = claim.received_at + timedelta(seconds=self.settings.give_up_after_s)
        delay = _backoff(claim.attempts + 1, self.settings.retry_base_s, self.settings.retry_max_s)
        next_at: datetime | None = now + timedelta(seconds=delay)
        if next_at is not None and next_at > give_up_at:
            next_at = None
        try:
            self.store.commitment_retry(claim, error=error, next_attempt_at=next_at)
        except StoreError as exc:  # the lease expires and the report is tried again
            LOGGER.warning("Storage Commitment %s: retry not recorded: %s", claim.transaction_uid, exc)
            return
        if next_at is None:
            LOGGER.error(
                "Storage Commitment report %s to %s abandoned after %d attempts: %s",
                claim.transaction_uid,
                printable(claim.calling_ae),
                claim.attempts + 1,
                error,
            )
            self.metrics.commitments.labels(result="abandoned").inc()
        else:
            self.metrics.commitments.labels(result="retried").inc()

    # -- delivery --------------------------------------------------------------------------------------

    def _send(self, claim: CommitmentClaim, report: CommitmentReport) -> str:
        """Send the report on an open association of the requester, else on a new one; returns which."""
        problems: list[str] = []
        for assoc in self._open_channels(claim):
            try:
                self._report_on(assoc, report)
                return "on the requester's association"
            except DeliveryError as exc:
                problems.append(f"on its association: {exc}")
        route = self._routes.get(claim.calling_ae)
        if route is None:
            problems.append(
                "no open association that accepted the report, and no host/port configured "
                f"for {claim.calling_ae!r} in [listener] allowed_calling_aes"
            )
            raise DeliveryError("; ".join(problems))
        try:
            self._report_to(route, claim.calling_ae, report)
        except DeliveryError as exc:
            problems.append(f"to {route.host}:{route.port}: {exc}")
            raise DeliveryError("; ".join(problems)) from exc
        return f"to {route.host}:{route.port}"

    def _open_channels(self, claim: CommitmentClaim) -> list[Any]:
        """The requester's own association first, then its other open ones that accepted the SCP role."""
        with self._lock:
            ref = self._by_transaction.get(claim.transaction_uid)
            found = [ref()] if ref is not None else []
            found += list(self._channels.get(claim.calling_ae, ()))
        ordered: list[Any] = []
        for assoc in found:
            if assoc is not None and assoc not in ordered and assoc.is_established and _may_report_on(assoc):
                ordered.append(assoc)
        return ordered

    def _report_on(self, assoc: Any, report: CommitmentReport) -> None:
        with self._lock:
            sending = self._sending.setdefault(assoc, threading.Lock())
        with sending:
            if not assoc.is_established or assoc.is_release_requested():
                raise DeliveryError("the requester is releasing it")
            try:
                status, _ = assoc.send_n_event_report(
                    event_information(report),
                    report.event_type,
                    STORAGE_COMMITMENT_PUSH,
                    STORAGE_COMMITMENT_INSTANCE,
                    msg_id=self._next_message_id(),
                )
            except (RuntimeError, ValueError) as exc:
                raise DeliveryError(str(exc)) from exc
        _check_status(status)

    def _next_message_id(self) -> int:
        with self._lock:
            return next(self._message_ids) % 65535 + 1  # (0000,0110) US, 1-65535

    def _report_to(self, route: _Route, calling_ae: str, report: CommitmentReport) -> None:
        """A new association to the requester (we propose the SCP role), one N-EVENT-REPORT, release."""
        timeout = self.cfg.acse_timeout_s
        try:  # a refused connection is found here: pynetdicom would leave its socket open
            with socket.create_connection((route.host, route.port), timeout=timeout):
                pass
        except OSError as exc:
            raise DeliveryError(f"cannot connect: {exc.strerror or exc}") from exc
        ae = AE(ae_title=self.cfg.ae_title)
        ae.acse_timeout = timeout
        ae.dimse_timeout = self.cfg.dimse_timeout_s
        ae.network_timeout = self.cfg.network_timeout_s
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH, _TRANSFER_SYNTAXES)
        role = build_role(STORAGE_COMMITMENT_PUSH, scp_role=True)
        tls_args = (self._tls, route.host) if self._tls is not None else None
        assoc = ae.associate(route.host, route.port, ae_title=calling_ae, ext_neg=[role], tls_args=tls_args)
        if not assoc.is_established:
            raise DeliveryError(
                "association rejected or aborted"
                if assoc.is_rejected or assoc.is_aborted
                else "association not established"
            )
        try:
            try:
                status, _ = assoc.send_n_event_report(
                    event_information(report),
                    report.event_type,
                    STORAGE_COMMITMENT_PUSH,
                    STORAGE_COMMITMENT_INSTANCE,
                )
            except (RuntimeError, ValueError) as exc:
                raise DeliveryError(str(exc)) from exc
            _check_status(status)
        finally:
            with contextlib.suppress(Exception):
                if assoc.is_established:
                    assoc.release()


def _may_report_on(assoc: Any) -> bool:
    """Whether this node may send N-EVENT-REPORT for Storage Commitment on ``assoc``: the context was
    accepted and the role negotiation left this side an SCU of it."""
    return any(
        str(cx.abstract_syntax) == STORAGE_COMMITMENT_PUSH and bool(cx.as_scu)
        for cx in assoc.accepted_contexts
    )


def _check_status(status: Dataset) -> None:
    code = getattr(status, "Status", None)
    if code is None:
        raise DeliveryError("no answer to the N-EVENT-REPORT (timeout or abort)")
    if int(code) != 0x0000:
        raise DeliveryError(f"the requester answered the N-EVENT-REPORT with 0x{int(code):04X}")


def _backoff(attempt: int, base_s: float, max_s: float) -> float:
    """Full-jitter exponential backoff for the ``attempt``-th failure (tenacity computes it)."""
    from tenacity import RetryCallState, wait_random_exponential

    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = max(1, attempt)
    return float(wait_random_exponential(multiplier=base_s, max=max_s)(state))


#: Bytes of Action Information beyond the Referenced SOP items (Transaction UID and sequence headers).
_ACTION_FIXED_BYTES: Final = 1024
#: Most bytes one Referenced SOP item takes: item header and delimiter, two UI elements of 64 characters
#: (explicit VR headers).
_ITEM_BYTES: Final = 8 + 8 + 2 * (8 + 64)


class _Bounded:
    """A data set kept up to ``cap`` bytes; past it nothing more is kept (``overflow``)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.overflow = False
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, fragment: memoryview) -> None:
        self._size += len(fragment)
        if self._size > self.cap:
            self.overflow = True
            self._parts = []
            return
        self._parts.append(bytes(fragment))

    def abandon(self) -> None:
        self._parts = []

    def data(self) -> bytes:
        return b"".join(self._parts)


def _cx_syntax(assoc: Any, sop_class: str) -> str:
    for cx in assoc.accepted_contexts:
        if str(cx.abstract_syntax) == sop_class:
            return str(cx.transfer_syntax[0])
    return str(ImplicitVRLittleEndian)


class _ActionEvent:
    """An N-ACTION as :meth:`CommitmentSCP.on_n_action` reads it; the Action Information is decoded
    only when asked for."""

    def __init__(self, assoc: Any, requested: str, action: int | None, data: bytes, ts: str) -> None:
        self.assoc = assoc
        self.request = SimpleNamespace(RequestedSOPInstanceUID=requested, ActionTypeID=action)
        self._data = data
        self._ts = ts

    @property
    def action_information(self) -> Dataset:
        from io import BytesIO

        from pydicom.filereader import read_dataset

        implicit = self._ts == ImplicitVRLittleEndian
        big = self._ts == "1.2.840.10008.1.2.2"
        return read_dataset(BytesIO(self._data), implicit, not big)
