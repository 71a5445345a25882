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
- **Report** (:mod:`ingest.relay.reports`, attached with :meth:`CommitmentSCP.attach`): on the
  requester's own association when it is still open and it proposed the SCP role for the Storage
  Commitment class (SCP/SCU Role Selection, PS3.7 D.3.3.4; an association on which this node may act as
  SCU) — :meth:`CommitmentSCP.send_report`, the first :class:`ingest.ports.ReportChannel` — else on a
  new association to the ``host`` / ``port`` of the requester's ``[listener] allowed_calling_aes`` entry
  (:mod:`ingest.adapters.dimse_scu`); retries, backoff and giving up are the sender's.

On the requester's association the report is sent by the edge's event loop once no request of the
peer is being handled (:meth:`ingest.sources.dimse.edge.Association.request`), so the N-ACTION's answer
always goes first. The N-ACTION's Action Information is kept only up to what ``max_instances``
Referenced SOP items can take (:meth:`CommitmentSCP.receiver`): a larger one is refused with 0x0213
without being decoded, so its size cannot cost memory.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import weakref
from collections.abc import Callable
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any, Final

from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from ingest.adapters.dimse_scu import (
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    check_status,
    event_information,
)
from ingest.clock import utcnow
from ingest.config import ListenerSettings, Settings
from ingest.core.extract import valid_uid
from ingest.errors import ReportDeliveryError, StoreError
from ingest.logs import printable
from ingest.metrics import Metrics
from ingest.ports import CommitmentAdded, CommitmentReport, ReportSender, StateStore
from ingest.sources.dimse.framing import decode_data_set

__all__ = [
    "STORAGE_COMMITMENT_INSTANCE",
    "STORAGE_COMMITMENT_PUSH",
    "CommitmentSCP",
    "event_information",
]

LOGGER = logging.getLogger(__name__)

# N-ACTION statuses (PS3.7 10.1.4.1.10)
_SUCCESS: Final = 0x0000
_PROCESSING_FAILURE: Final = 0x0110
_NO_SUCH_INSTANCE: Final = 0x0112
_INVALID_ARGUMENT: Final = 0x0115
_NO_SUCH_ACTION: Final = 0x0123
_RESOURCE_LIMITATION: Final = 0x0213


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
    """A well-formed UID (:func:`ingest.core.extract.valid_uid`) of at least two components."""
    return isinstance(value, str) and "." in value and valid_uid(value)


class _Refused(Exception):
    """An N-ACTION that is answered with a failure status and an Error Comment."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]  # (0000,0902) LO
    return ds


class CommitmentSCP:
    """Storage Commitment requests on the listener's associations, and reports on them.

    Reports are sent by the attached :class:`ingest.ports.ReportSender` (:meth:`attach`), which tries
    :meth:`send_report` (the requester's own association) first.

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
        self._lock = threading.Lock()
        # same-association channels: the requester's association per transaction, and every open one on
        # which this node may send N-EVENT-REPORT, per calling AE
        self._by_transaction: dict[str, weakref.ref[Any]] = {}
        self._channels: dict[str, weakref.WeakSet[Any]] = {}
        # one N-EVENT-REPORT at a time per association (pynetdicom's send is not re-entrant), each with
        # its own Message ID
        self._sending: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
        self._message_ids = itertools.count(1)
        self.sender: ReportSender | None = None
        self._started = False

    @classmethod
    def from_settings(cls, settings: Settings, store: StateStore, metrics: Metrics) -> CommitmentSCP:
        """The SCP of ``ingest serve``: ``[listener]``, ``[spool] commitment_hold``, ``[state] node_id``."""
        owner = settings.state.node_id or socket.gethostname()
        return cls(settings.listener, store, metrics, hold=settings.spool.hold, owner=owner)

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

    def attach(self, sender: ReportSender) -> None:
        """Use ``sender`` for the reports (started at once when the listener already is)."""
        self.sender = sender
        if self._started:
            sender.start()

    def start(self) -> None:
        """Start the attached sender (reports left pending by an earlier run are due at once)."""
        self._started = True
        if self.sender is not None:
            self.sender.start()

    def close(self, wait_s: float = 10.0) -> None:
        """Stop the attached sender; a report being delivered finishes (bounded); the rest stay pending."""
        self._started = False
        if self.sender is not None:
            self.sender.close(wait_s)

    def wake(self) -> None:
        """Look for due reports now."""
        if self.sender is not None:
            self.sender.wake()

    def send_report(self, report: CommitmentReport, *, timeout_s: float) -> str | None:
        """:class:`ingest.ports.ReportChannel`: the report on an open association of the requester (its
        own first, then its other open ones that accepted the SCP role); ``None`` when there is none.
        Each attempt waits for the answer up to ``timeout_s`` (at most ``[listener] dimse_timeout_s``)."""
        problems: list[str] = []
        for assoc in self._open_channels(report.transaction_uid, report.calling_ae):
            try:
                self._report_on(assoc, report, timeout_s)
            except ReportDeliveryError as exc:
                problems.append(f"on its association: {exc}")
                continue
            with self._lock:
                self._by_transaction.pop(report.transaction_uid, None)
            return "on the requester's association"
        if problems:
            raise ReportDeliveryError("; ".join(problems))
        return None

    def _open_channels(self, transaction_uid: str, calling_ae: str) -> list[Any]:
        """The requester's own association first, then its other open ones that accepted the SCP role."""
        with self._lock:
            ref = self._by_transaction.get(transaction_uid)
            found = [ref()] if ref is not None else []
            found += list(self._channels.get(calling_ae, ()))
        ordered: list[Any] = []
        for assoc in found:
            if assoc is not None and assoc not in ordered and assoc.is_established and _may_report_on(assoc):
                ordered.append(assoc)
        return ordered

    def _report_on(self, assoc: Any, report: CommitmentReport, timeout_s: float) -> None:
        with self._lock:
            sending = self._sending.setdefault(assoc, threading.Lock())
        with sending:
            if not assoc.is_established or assoc.is_release_requested():
                raise ReportDeliveryError("the requester is releasing it")
            try:
                status, _ = assoc.send_n_event_report(  # the answer is awaited at most timeout_s
                    event_information(report),
                    report.event_type,
                    STORAGE_COMMITMENT_PUSH,
                    STORAGE_COMMITMENT_INSTANCE,
                    msg_id=self._next_message_id(),
                    timeout_s=timeout_s,
                )
            except (RuntimeError, ValueError) as exc:
                raise ReportDeliveryError(str(exc)) from exc
        check_status(status)

    def _next_message_id(self) -> int:
        with self._lock:
            return next(self._message_ids) % 65535 + 1  # (0000,0110) US, 1-65535


def _may_report_on(assoc: Any) -> bool:
    """Whether this node may send N-EVENT-REPORT for Storage Commitment on ``assoc``: the context was
    accepted and the role negotiation left this side an SCU of it."""
    return any(
        str(cx.abstract_syntax) == STORAGE_COMMITMENT_PUSH and bool(cx.as_scu)
        for cx in assoc.accepted_contexts
    )


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
        return decode_data_set(self._data, self._ts)
