"""The C-STORE / C-ECHO listener (edge): modalities send, nothing acknowledged is lost.

One pynetdicom AE is the SCP for every storage SOP class (headers only; pixel data is never decoded)
and for Verification. Connections go through :mod:`ingest.sources.dimse.netguard` (PDU-size cap, per
connection TLS handshake with a timeout, ``TCP_NODELAY`` and quick ACKs, a per-instance size cap that
drops the excess bytes instead of buffering them), which also holds every hook into pynetdicom
internals: this module uses pynetdicom's public API (AE, events, presentation contexts, SOP classes,
Dataset answers) and those hooks only.

Answering a C-STORE (``docs/reliability.md``, "C-STORE answers"; every code is in
:data:`ingest.sources.dimse.status.STATUS_TABLE`):

1. The data set's header is read from the received bytes (:func:`read_header_bytes`: one pass that
   checks every declared length; deflate inflated with a cap). A header error -> its own 0xC0xx code
   with an Error Comment (0000,0902); the bytes go to the quarantine with a reason side file.
2. The data set's SOP Class/Instance UIDs must equal the command's (0000,0002)/(0000,1000) -> 0xA900.
3. A slot of the bounded intake is taken (none free -> 0xA700) and the instance is made durable; only
   then 0x0000. Up to ``[spool] inline_max_bytes`` its Part 10 bytes are committed in the state store in
   the transaction of its row (one durable write); a larger one is written to the spool first (temp,
   fsync, rename, fsync dir), then its row is committed. Rows go through the group commit
   (:mod:`ingest.intake.commit`): concurrent associations share a transaction, each answered when
   its own row is durable. Disk, quota or store failures -> 0xA700 and nothing is kept. An identical
   duplicate -> 0x0000, no new row. A conflicting duplicate (same SOP Instance UID, other content or
   other study): the first is kept, the second goes to the quarantine, a warning is logged and the
   answer is 0xC010 ("Cannot understand" family: the sender must not retry the same bytes, and the
   distinct code says why). Anything unexpected -> 0x0110; no exception ever escapes into pynetdicom.

The durable work runs on the association's thread (the state store is thread-safe); the asyncio loop is
only told that something arrived (``relay.wake`` through ``loop.call_soon_threadsafe``, coalesced, so
the loop's queue stays bounded). When an association that stored instances is released, their studies
become due after ``relay.release_grace_s``; otherwise ``relay.stable_age_s`` applies.

Large data sets (more than :data:`LARGE_INSTANCE_BYTES`) are received to disk, not memory: once a
C-STORE's data set grows past the threshold, the bytes received so far and every later fragment go
into a spool temporary file (random name, ``0600``, already headed by the preamble and file meta), so
only the threshold plus one PDU is ever held. The handler then commits that file (fsync, rename,
fsync dir), reads its header through :func:`read_header` (bounded memory as well), checks the UIDs and
commits the row; on every failure path the temporary or committed file is removed. Smaller data sets
keep the in-memory path (pynetdicom's process-wide ``STORE_RECV_CHUNKED_DATASET`` writes every
instance to a file in the system temp folder and measured 4-23 % slower for 512 KB instances).

Association checks (A-ASSOCIATE-RJ, PS3.8 9.3.4): calling AE not allowed (or not from its pinned host)
-> (1,1,3); called AE not ours -> (1,1,7); over ``max_associations`` -> (2,3,2).

Presentation contexts: every class of :func:`storage_sop_classes` (pydicom's and pynetdicom's storage
classes, retired ones included, as ``ingest replay`` reads them; non-patient classes excluded) in
:data:`TRANSFER_SYNTAXES`, and Verification. pynetdicom has no service class for some of them (the
retired Ultrasound Image Storage, 1.2.840.10008.5.1.4.1.1.6, among others); EVT_SOP_COMMON routes
those to its Storage Service Class for each association (netguard's :func:`route_storage_classes`). With
``[listener] unknown_storage_classes = "accept"``, classes known to neither library are supported for
the association that requests them (EVT_REQUESTED, before negotiation). Every refused presentation
context is logged in one warning per association and counted in
``ingest_presentation_contexts_refused_total{reason}`` (EVT_ACCEPTED). With ``[listener.commitment]
enabled``, Storage Commitment Push Model is supported too (SCP/SCU role selection accepted); its
N-ACTION handler and report sender are :mod:`ingest.sources.dimse.commitment`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any, Final

from pydicom._uid_dict import UID_dictionary
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import SOPClassCommonExtendedNegotiation
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ingest.adapters.dicomfile import ParsedInstance, read_header, read_header_bytes
from ingest.adapters.spool import Quarantine, Spool, SpoolFile, SpoolWriter
from ingest.config import ListenerSettings, Settings
from ingest.core.tags import NON_PATIENT_SOP_CLASSES
from ingest.errors import HeaderError, NestingTooDeepError, StoreError
from ingest.intake.admit import Admission, Candidate, utcnow
from ingest.intake.commit import GroupCommit
from ingest.intake.retention import DiskBudget, SpoolFullError
from ingest.metrics import Metrics
from ingest.ports import AddOutcome, StateStore
from ingest.sources.dimse.commitment import CommitmentSCP, add_commitment_context
from ingest.sources.dimse.netguard import (
    GuardedRequestHandler,
    GuardedServer,
    divert_large_data_sets,
    message_was_oversized,
    quiet_pynetdicom_logging,
    received_data_set_file,
    register_server,
    reject_association,
    route_storage_classes,
    service_class_for,
    tls_context,
)
from ingest.sources.dimse.status import answer as _answer

__all__ = [
    "LARGE_INSTANCE_BYTES",
    "TRANSFER_SYNTAXES",
    "Intake",
    "Listener",
    "classify_abstract_syntax",
    "part10_prefix",
    "start_listener",
    "storage_sop_classes",
]

LOGGER = logging.getLogger(__name__)

#: C-STORE data sets larger than this are received into a spool file instead of memory.
LARGE_INSTANCE_BYTES: Final = 16 * 1024 * 1024

#: Transfer syntaxes offered for every storage SOP class; Deflated is safe because
#: :func:`read_header_bytes` inflates with ``max_inflated_bytes`` as a cap.
TRANSFER_SYNTAXES: Final = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

_DICOM_ROOT: Final = "1.2.840.10008."
_STORAGE_ROOT: Final = "1.2.840.10008.5.1.4.1.1."
_UID_RE: Final = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")  # PS3.5 9.1


@functools.cache
def storage_sop_classes() -> frozenset[str]:
    """Every storage SOP class the listener accepts (what ``ingest replay`` reads), retired ones too.

    pydicom's UID dictionary (PS3.6 Annex A: "SOP Class" entries named "... Storage", "... Storage -
    For Presentation", "... Storage - Trial", retired or not; Storage Commitment is a service, not a
    storage class) united with pynetdicom's storage classes, less the non-patient classes that a
    C-STORE would only answer with 0xC006. pynetdicom limits the contexts an SCU *requests* to 128,
    not those an AE *supports*.

    Returns
    -------
    frozenset of str
        The SOP Class UIDs.
    """
    named = {
        str(uid)
        for uid, (name, kind, *_rest) in UID_dictionary.items()
        if kind == "SOP Class" and "Storage" in name.split() and not name.startswith("Storage Commitment")
    }
    known = named | {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
    return frozenset(known - NON_PATIENT_SOP_CLASSES)


def classify_abstract_syntax(uid: str) -> str:
    """What a requested abstract syntax is, for negotiation and for refusal reasons.

    Returns
    -------
    str
        ``"storage"`` (in :func:`storage_sop_classes`), ``"non_patient"``, ``"invalid_uid"`` (not a
        well-formed UID, PS3.5 9.1), ``"not_storage"`` (a known UID of another kind, or an unknown UID
        under the DICOM root outside the storage root ``1.2.840.10008.5.1.4.1.1``), or ``"unknown"``
        (under the storage root or a private root, known to neither pydicom nor pynetdicom).
    """
    if uid in storage_sop_classes():
        return "storage"
    if uid in NON_PATIENT_SOP_CLASSES:
        return "non_patient"
    if len(uid) > 64 or not _UID_RE.fullmatch(uid):
        return "invalid_uid"
    if uid in UID_dictionary or uid == Verification or service_class_for(uid) is not None:
        return "not_storage"
    if uid.startswith(_DICOM_ROOT) and not uid.startswith(_STORAGE_ROOT):
        return "not_storage"
    return "unknown"


def _esc(text: str, limit: int = 80) -> str:
    """``text`` for a log line: control and non-ASCII characters escaped, at most ``limit`` characters."""
    shown = ascii(text[:limit])[1:-1]
    return shown + ("..." if len(text) > limit else "")


#: Refusal reasons by the presentation context result of the A-ASSOCIATE-AC (PS3.8 9.3.3.2).
_REFUSAL_BY_RESULT: Final = {0x01: "user_rejection", 0x02: "no_reason", 0x04: "transfer_syntax"}


class Intake:
    """The bounded hand-off from association threads to the asyncio loop.

    At most ``size`` C-STOREs are being made durable at once; :meth:`enter` returns ``False`` when all
    slots are taken (the caller answers 0xA700). :meth:`notify` asks the loop to run ``on_loop`` (the
    relay's ``wake``) and coalesces: at most one callback is queued on the loop at any time.

    Parameters
    ----------
    size:
        Number of slots.
    loop:
        The asyncio loop that ``on_loop`` must run on.
    on_loop:
        Called on the loop thread after instances were stored.
    """

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop, on_loop: Callable[[], None]) -> None:
        self.size = size
        self._slots = threading.BoundedSemaphore(size)
        self._loop = loop
        self._on_loop = on_loop
        self._lock = threading.Lock()
        self._queued = False
        self._busy = 0

    @property
    def busy(self) -> int:
        """Slots in use."""
        return self._busy

    def enter(self) -> bool:
        """Take a slot without waiting; ``False`` when the intake is full."""
        if not self._slots.acquire(blocking=False):
            return False
        with self._lock:
            self._busy += 1
        return True

    def leave(self) -> None:
        """Give a slot back."""
        with self._lock:
            self._busy -= 1
        self._slots.release()

    def notify(self) -> None:
        """Schedule ``on_loop`` on the loop unless one call is already queued; never blocks or raises."""
        with self._lock:
            if self._queued:
                return
            self._queued = True
        try:
            self._loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # loop closed: shutting down, the relay will find the rows on restart
            with self._lock:
                self._queued = False

    def _run(self) -> None:
        with self._lock:
            self._queued = False
        self._on_loop()


class _Spill:
    """A large C-STORE data set being received into a spool temporary file.

    The :class:`~ingest.sources.dimse.netguard.DataSetSink` of :func:`divert_large_data_sets`:
    pynetdicom writes each later data-set fragment with ``write()`` and then calls ``file.flush()``;
    after the C-STORE handler it closes and unlinks a truthy sink. Once the handler has taken this
    object, or it was discarded, it is falsy, so pynetdicom leaves the file alone. A
    write error (disk full, quota) is remembered, later fragments are dropped, and the handler answers
    0xA700; the association itself goes on.
    """

    def __init__(self, writer: SpoolWriter | None, failed: StoreError | None = None) -> None:
        self.writer = writer
        self.failed = failed
        self.file = self  # pynetdicom calls ``file.flush()`` (netguard.DataSetSink)
        self._lock = threading.Lock()
        self._taken = False
        self._closed = writer is None

    def __bool__(self) -> bool:
        # falsy once taken or discarded: pynetdicom then neither writes to it nor unlinks it (it has no
        # ``name``; the handler or the association removed the file already)
        return not (self._taken or self._closed)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append a fragment (errors are kept for the handler, never raised into pynetdicom)."""
        with self._lock:
            if self._closed or self.writer is None:
                return len(data)
            try:
                self.writer.write(data)
            except StoreError as exc:
                self.failed = exc
                self._closed = True
        return len(data)

    def flush(self) -> None:
        """Nothing to do: writes go straight to the file; the handler fsyncs on commit."""

    def close(self) -> None:
        """Nothing to do (see :meth:`discard`)."""

    def take(self) -> bool:
        """Hand the file to the C-STORE handler; ``False`` when the association already discarded it."""
        with self._lock:
            if self._taken or (self._closed and self.failed is None):
                return False
            self._taken = True
            return True

    def discard(self, *, force: bool = False) -> None:
        """Remove the temporary file unless the handler owns it (``force``: the handler itself)."""
        with self._lock:
            if self._taken and not force:
                return
            self._closed = True
            if self.writer is not None:
                self.writer.abort()


def _peer(event: Any) -> tuple[str, str]:
    """(calling AE title, peer address) of an event's association."""
    requestor = event.assoc.requestor
    return str(requestor.ae_title).strip(), str(requestor.address)


class Listener:
    """The running listener; built by :func:`start_listener`.

    Attributes
    ----------
    address:
        The bound ``(host, port)``.
    spool, quarantine:
        Where accepted bytes and rejected ones go.
    """

    def __init__(
        self,
        cfg: ListenerSettings,
        store: StateStore,
        metrics: Metrics,
        intake: Intake,
        *,
        admission: Admission,
        spool: Spool,
        quarantine: Quarantine,
        release_grace_s: float,
        clock: Callable[[], datetime] = utcnow,
        inline_max_bytes: int = 1024**2,
        group: GroupCommit | None = None,
        budget: DiskBudget | None = None,
        commitment: CommitmentSCP | None = None,
    ) -> None:
        # Storage Commitment (``ingest.sources.dimse.commitment``): its context, handlers and sender
        self.commitment = commitment
        self.budget = budget  # [spool] max_bytes / min_free_bytes, asked before bytes are written
        self.cfg = cfg
        self.store = store  # release: mark_due (rows are committed by ``admission``)
        self.metrics = metrics
        self.intake = intake
        self.admission = admission  # wakes the relay through ``intake.notify``
        # concurrent associations share one transaction (``ingest.intake.commit``)
        self.group = group if group is not None else GroupCommit(admission)
        self.inline_max_bytes = inline_max_bytes
        self.release_grace = timedelta(seconds=release_grace_s)
        self.clock = clock
        self.spool = spool
        self.quarantine = quarantine
        self.spool.sweep_temps()
        self._studies: dict[int, set[str]] = {}  # id(association) -> studies it stored into
        self._spills: dict[int, list[_Spill]] = {}  # id(association) -> large data sets on disk
        self.large_instance_bytes = LARGE_INSTANCE_BYTES
        self._lock = threading.Lock()
        self._allowed: dict[str, set[str | None]] = {}
        self._admitted: weakref.WeakSet[Association] = weakref.WeakSet()  # passed _on_requested
        for entry in self.cfg.allowed_calling_aes:
            self._allowed.setdefault(entry.ae, set()).add(entry.host)
        self.ae = self._make_ae()
        self.server: GuardedServer | None = None
        self.address: tuple[str, int] = (self.cfg.host, self.cfg.port)
        self._thread: threading.Thread | None = None

    # -- setup ---------------------------------------------------------------------------------------

    def _make_ae(self) -> AE:
        cfg = self.cfg
        ae = AE(ae_title=cfg.ae_title)
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.network_timeout_s
        ae.maximum_pdu_size = cfg.max_pdu
        # The limit is ours (_on_requested counts admitted associations only); pynetdicom's own count
        # also includes requests still being checked, so it gets the pending cap as headroom.
        ae.maximum_associations = cfg.max_associations + cfg.max_pending_connections
        # The calling/called AE checks are ours (EVT_REQUESTED: they need the peer's address too).
        ae.require_calling_aet = []
        ae.require_called_aet = False
        # Retired and other classes pynetdicom has no service for are routed per association
        # (_on_sop_common); [listener] unknown_storage_classes = "accept" adds unknown ones per
        # association too (_admit_unknown), so this process-wide AE stays as built here.
        for uid in sorted(storage_sop_classes()):
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        if self.commitment is not None:
            add_commitment_context(ae)
        return ae

    def start(self) -> None:
        """Bind and serve in a background thread; logs the address.

        Raises
        ------
        OSError
            When the address cannot be bound.
        """
        # pynetdicom's per-PDU/DIMSE logging handlers cost CPU on every message and are off here
        # (our own log lines cover associations and outcomes).
        quiet_pynetdicom_logging()
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_SOP_COMMON, self._on_sop_common),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_ended),
        ]
        if self.commitment is not None:
            handlers += self.commitment.handlers()
        server = self.ae.make_server(
            (self.cfg.host, self.cfg.port),
            evt_handlers=handlers,
            server_class=GuardedServer,
            request_handler=GuardedRequestHandler,
        )
        assert isinstance(server, GuardedServer)
        server.max_pdu_bytes = self.cfg.max_peer_pdu
        server.max_message_bytes = self.cfg.max_instance_bytes
        server.io_timeout_s = self.cfg.network_timeout_s
        server.rq_timeout_s = self.cfg.associate_rq_timeout_s
        server.max_rq_bytes = self.cfg.max_associate_rq_bytes
        server.max_pending = self.cfg.max_pending_connections
        server.max_pending_per_host = self.cfg.max_pending_per_host
        server.on_refused = lambda why: self.metrics.connections_refused.labels(reason=why).inc()
        server.on_association = self._receive_large_to_disk
        tls = self.cfg.tls
        if tls.enabled:
            server.tls = tls_context(tls)
            server.handshake_timeout_s = tls.handshake_timeout_s
        register_server(self.ae, server)
        self.server = server
        host, port = server.server_address[0], server.server_address[1]
        self.address = (str(host), int(port))
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="ingest-listener", daemon=True
        )
        self._thread.start()
        if self.commitment is not None:
            self.commitment.start()
        LOGGER.info(
            "DICOM listener %s on %s:%d%s (max %d associations, calling AEs: %s)",
            self.cfg.ae_title, self.address[0], self.address[1],
            " with TLS" + (" (client certificates required)" if tls.require_client_cert else "")
            if tls.enabled else "",
            self.cfg.max_associations,
            "any" if self.cfg.accept_any_calling_ae else ", ".join(sorted(self._allowed)) or "none",
        )

    # -- association control ---------------------------------------------------------------------------

    def _on_requested(self, event: Any) -> None:
        """EVT_REQUESTED: calling-AE allowlist (with host), called AE, association limit."""
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = str(rq.calling_ae_title).strip()
        called = str(rq.called_ae_title).strip()
        host = str(assoc.requestor.address)
        reason: tuple[int, int, int] | None = None
        why = ""
        if not self.cfg.accept_any_calling_ae:
            hosts = self._allowed.get(calling)
            if hosts is None:
                reason, why = (0x01, 0x01, 0x03), "calling AE not allowed"
            elif None not in hosts and host not in hosts:
                reason, why = (0x01, 0x01, 0x03), "calling AE not allowed from this host"
        if reason is None and self.cfg.check_called_ae and called != self.cfg.ae_title:
            reason, why = (0x01, 0x01, 0x07), f"called AE {called!r} is not {self.cfg.ae_title!r}"
        if reason is None and self.server is not None:
            with self._lock:  # only associations that passed these checks hold a slot
                admitted = [a for a in self.server.active_associations if a in self._admitted]
                if len(admitted) >= self.cfg.max_associations:
                    reason, why = (0x02, 0x03, 0x02), f"over the limit of {self.cfg.max_associations}"
                else:
                    self._admitted.add(assoc)
        if reason is None:
            self.metrics.associations.labels(outcome="accepted").inc()
            LOGGER.info("association from %s (%s) to %s", calling, host, called)
            self._admit_unknown(assoc)
            return
        LOGGER.warning("association from %s (%s) to %s rejected %s: %s", calling, host, called, reason, why)
        self.metrics.associations.labels(outcome="rejected").inc()
        reject_association(assoc, *reason)

    def _requested_syntaxes(self, assoc: Any) -> list[str]:
        """The abstract syntaxes of the A-ASSOCIATE-RQ's presentation contexts, in order, once each."""
        contexts = assoc.requestor.primitive.presentation_context_definition_list or []
        return list(dict.fromkeys(str(cx.abstract_syntax) for cx in contexts))

    def _admit_unknown(self, assoc: Any) -> None:
        """With ``unknown_storage_classes = "accept"``, support this association's unknown classes.

        Runs in EVT_REQUESTED, before pynetdicom negotiates the presentation contexts against
        ``assoc.acceptor.supported_contexts`` (a per-association copy of the AE's): only this
        association sees the added contexts. A class is added when :func:`classify_abstract_syntax`
        calls it ``"unknown"`` (a well-formed UID under the storage root or a private root).
        """
        if self.cfg.unknown_storage_classes != "accept":
            return
        requested = self._requested_syntaxes(assoc)
        unknown = [uid for uid in requested if classify_abstract_syntax(uid) == "unknown"]
        if not unknown:
            return
        added = []
        for uid in unknown:
            cx = PresentationContext()
            cx.abstract_syntax = uid
            cx.transfer_syntax = list(TRANSFER_SYNTAXES)
            added.append(cx)
        assoc.acceptor.supported_contexts = [*assoc.acceptor.supported_contexts, *added]
        LOGGER.info(
            "association from %s: accepting unknown storage SOP classes %s",
            _esc(str(assoc.requestor.primitive.calling_ae_title).strip()),
            ", ".join(_esc(uid) for uid in unknown),
        )

    def _on_sop_common(self, event: Any) -> dict[str, SOPClassCommonExtendedNegotiation]:
        """EVT_SOP_COMMON: route this association's storage classes pynetdicom has no service for.

        Items the requestor sent are not honoured (pynetdicom's default answer); see
        :func:`~ingest.sources.dimse.netguard.route_storage_classes`.
        """
        accept_unknown = self.cfg.unknown_storage_classes == "accept"
        ours = [
            uid
            for uid in self._requested_syntaxes(event.assoc)
            if (kind := classify_abstract_syntax(uid)) == "storage" or (accept_unknown and kind == "unknown")
        ]
        return route_storage_classes(ours)

    def _on_accepted(self, event: Any) -> None:
        """EVT_ACCEPTED: log (one line) and count every presentation context that was refused."""
        refused = event.assoc.rejected_contexts
        if not refused:
            return
        shown = []
        for cx in refused:
            uid = str(cx.abstract_syntax)
            if cx.result == 0x03:  # abstract syntax not supported
                kind = classify_abstract_syntax(uid)
                reason = "unknown_sop_class" if kind == "unknown" else kind
            else:
                reason = _REFUSAL_BY_RESULT.get(int(cx.result or 0), "no_reason")
            self.metrics.presentation_contexts_refused.labels(reason=reason).inc()
            shown.append(f"{_esc(uid)} ({reason})")
        calling, host = _peer(event)
        LOGGER.warning(
            "association from %s (%s): %d presentation context(s) refused: %s",
            _esc(calling), _esc(host), len(refused), ", ".join(shown),
        )

    def _on_echo(self, event: Any) -> int:
        return 0x0000

    def _on_released(self, event: Any) -> None:
        """EVT_RELEASED: the studies this association stored into become due after the grace period."""
        with self._lock:
            uids = self._studies.pop(id(event.assoc), set())
        if not uids:
            return
        due = self.clock() + self.release_grace
        try:
            self.store.mark_due(uids, due)
        except StoreError as exc:  # stable_age still applies: the rows are durable
            LOGGER.warning("could not bring %d studies forward after release: %s", len(uids), exc)
            return
        except Exception:
            LOGGER.exception("could not bring studies forward after release")
            return
        self.intake.notify()

    def _on_ended(self, event: Any) -> None:
        with self._lock:
            self._studies.pop(id(event.assoc), None)
            spills = self._spills.pop(id(event.assoc), [])
        for spill in spills:  # a data set cut off by an abort or a closed connection
            spill.discard()

    # -- large data sets to disk -------------------------------------------------------------------------

    def _receive_large_to_disk(self, assoc: Association) -> None:
        """A C-STORE data set of ``assoc`` past :attr:`large_instance_bytes` goes to disk (a :class:`_Spill`).

        See :func:`~ingest.sources.dimse.netguard.divert_large_data_sets` (on the DUL thread, in order
        with the decoding of each P-DATA primitive).
        """
        divert_large_data_sets(assoc, self.large_instance_bytes, functools.partial(self._start_spill, assoc))

    def _start_spill(
        self, assoc: Association, head: BytesIO, file_meta: Callable[[], FileMetaDataset]
    ) -> _Spill:
        """A spool temporary file for a C-STORE data set in progress, headed by ``file_meta`` and the
        bytes so far (``head``); never raises (a failure is kept in the returned sink)."""
        spill: _Spill
        try:
            prefix = _part10_prefix_for(file_meta())
            size = len(prefix) + head.getbuffer().nbytes
            if self.budget is not None and (why := self.budget.refusal(size, what="a large data set")):
                raise SpoolFullError(why)
            writer = self.spool.open_writer(hashed=False)  # the header read digests the content
            spill = _Spill(writer)
            spill.write(prefix)
            spill.write(head.getbuffer())
        except StoreError as exc:
            spill = _Spill(None, failed=exc)
        except Exception as exc:  # never into pynetdicom's DUL thread
            LOGGER.exception("could not move a large data set to disk")
            spill = _Spill(None, failed=StoreError(f"could not receive a large data set: {exc}"))
        with self._lock:
            self._spills.setdefault(id(assoc), []).append(spill)
        return spill

    # -- C-STORE ---------------------------------------------------------------------------------------

    def _on_store(self, event: Any) -> Dataset:
        """EVT_C_STORE: never raises; every outcome is a status from the status table (``status.py``)."""
        started = time.monotonic()
        try:
            return self._store(event)
        except Exception:
            LOGGER.exception("unexpected error handling a C-STORE")
            self.metrics.instances_rejected.labels(reason="internal").inc()
            return _answer("internal")
        finally:  # the data set received to the answer decided (durable first)
            self.metrics.cstore_seconds.observe(time.monotonic() - started)

    def _reject(
        self, outcome: str, data: bytes | Path | None, detail: str, rule: str = "", *,
        source: str | None = None,
    ) -> Dataset:
        self.metrics.instances_rejected.labels(reason=outcome).inc()
        if data:
            try:
                self.quarantine.put(data, outcome, rule or outcome, detail, self.clock(), source=source)
            except Exception as exc:  # the answer still says why; quarantine is best effort
                LOGGER.warning("could not quarantine a rejected dataset: %s", exc)
        return _answer(outcome)

    def _store(self, event: Any) -> Dataset:
        calling, _host = _peer(event)
        source = f"dimse:{calling}"
        self.metrics.instances_received.labels(source="dimse").inc()
        req = event.request
        cmd_sop = str(req.AffectedSOPInstanceUID or "").strip()  # (0000,1000)
        cmd_class = str(req.AffectedSOPClassUID or "").strip()  # (0000,0002)
        spill = received_data_set_file(req)
        if message_was_oversized(event.assoc):
            LOGGER.warning("C-STORE %s from %s exceeds max_instance_bytes: 0xA700", cmd_sop, calling)
            self.metrics.instances_rejected.labels(reason="too_large").inc()
            if isinstance(spill, _Spill):
                self._forget_spill(event.assoc, spill)
            return _answer("too_large")
        if isinstance(spill, _Spill):
            return self._store_spilled(event, spill, cmd_sop, cmd_class, source)
        stream: BytesIO = req.DataSet
        data = stream.getvalue()
        if len(data) > self.cfg.max_instance_bytes:
            self.metrics.instances_rejected.labels(reason="too_large").inc()
            return _answer("too_large")
        ts = str(event.context.transfer_syntax)
        outcome = self._accepted_header(
            lambda: read_header_bytes(
                data, source=source, transfer_syntax_uid=ts, max_inflated_bytes=self.cfg.max_inflated_bytes,
                max_rejection_items=self.cfg.max_rejection_items,
            ),
            data, cmd_sop, cmd_class, source,
        )
        if not isinstance(outcome, ParsedInstance):
            return outcome
        if (full := self._spool_full(len(data), cmd_sop)) is not None:
            return full
        with self._intake_slot(cmd_sop) as admitted:
            if not admitted:
                return _answer("intake_full")
            return self._durable(event, data, outcome.digest, outcome.record, source)

    def _accepted_header(
        self,
        read: Callable[[], ParsedInstance],
        body: bytes | Path,
        cmd_sop: str,
        cmd_class: str,
        source: str,
    ) -> ParsedInstance | Dataset:
        """Read the header with ``read``; a refused header, or a data set whose SOP UIDs differ from the
        C-STORE command's (0xA900), gets its answer here, with ``body`` quarantined."""
        calling = source.removeprefix("dimse:")
        try:
            parsed = read()
        except HeaderError as exc:
            LOGGER.warning("C-STORE %s from %s rejected (%s): %s", cmd_sop, calling, exc.reason, exc)
            return self._reject(exc.reason, body, str(exc), source=source)
        except RecursionError:
            nested = NestingTooDeepError(f"Sequences nested too deep to parse (source={source})")
            LOGGER.warning("C-STORE %s from %s rejected (%s)", cmd_sop, calling, nested.reason)
            return self._reject(nested.reason, body, str(nested), source=source)
        record = parsed.record
        if record.sop_uid != cmd_sop or record.sop_class_uid != cmd_class:
            detail = (
                f"dataset SOP Instance/Class UID {record.sop_uid}/{record.sop_class_uid} differ from "
                f"the command's {cmd_sop}/{cmd_class} (source={source})"
            )
            LOGGER.warning("C-STORE from %s rejected: %s", calling, detail)
            return self._reject("uid_mismatch", body, detail, source=source)
        return parsed

    @contextlib.contextmanager
    def _intake_slot(self, cmd_sop: str) -> Iterator[bool]:
        """An intake slot for making one C-STORE durable; ``False`` (answer 0xA700) when all are taken."""
        if not self.intake.enter():
            LOGGER.warning(
                "intake full (%d in flight): C-STORE %s answered 0xA700", self.intake.size, cmd_sop
            )
            self.metrics.instances_rejected.labels(reason="intake_full").inc()
            yield False
            return
        try:
            self.metrics.intake_depth.set(self.intake.busy)
            yield True
        finally:
            self.intake.leave()
            self.metrics.intake_depth.set(self.intake.busy)

    def _spool_full(self, nbytes: int, cmd_sop: str, *, refused: str | None = None) -> Dataset | None:
        """0xA700 when ``nbytes`` more would cross ``[spool] max_bytes`` or ``min_free_bytes`` (counted in
        ``ingest_spool_refusals_total{reason}``), or when the budget ``refused`` already; else ``None``."""
        why = refused
        if why is None and self.budget is not None:
            why = self.budget.refusal(nbytes, what=f"C-STORE {cmd_sop}")
        if why is None:
            return None
        self.metrics.instances_rejected.labels(reason="spool_full").inc()
        return _answer("out_of_resources", f"Spool full ({why}): not stored, retry later")

    def _out_of_resources(self, what: str, cmd_sop: str, cause: object) -> Dataset:
        LOGGER.error("%s, C-STORE %s answered 0xA700: %s", what, cmd_sop, cause)
        self.metrics.instances_rejected.labels(reason="out_of_resources").inc()
        return _answer("out_of_resources")

    def _forget_spill(self, assoc: Any, spill: _Spill) -> None:
        spill.discard(force=True)
        with self._lock:
            spills = self._spills.get(id(assoc), [])
            if spill in spills:
                spills.remove(spill)

    def _store_spilled(self, event: Any, spill: _Spill, cmd_sop: str, cmd_class: str, source: str) -> Dataset:
        """A C-STORE whose data set was received into a spool temporary file (see the module doc)."""
        if not spill.take():  # the association ended and removed it
            self.metrics.instances_rejected.labels(reason="out_of_resources").inc()
            return _answer("out_of_resources")
        try:
            # refused when it started, or now (its bytes so far are counted already)
            refused = spill.failed.reason if isinstance(spill.failed, SpoolFullError) else None
            if (full := self._spool_full(0, cmd_sop, refused=refused)) is not None:
                return full
            if spill.failed is not None or spill.writer is None:
                return self._out_of_resources("spool write failed", cmd_sop, spill.failed)
            with self._intake_slot(cmd_sop) as admitted:
                if not admitted:
                    return _answer("intake_full")
                try:
                    kept = spill.writer.commit()
                except StoreError as exc:
                    return self._out_of_resources("spool write failed", cmd_sop, exc)
                try:
                    return self._accept_spooled(event, kept, cmd_sop, cmd_class, source)
                except BaseException:
                    self._discard(kept.name)
                    raise
        finally:
            self._forget_spill(event.assoc, spill)

    def _accept_spooled(
        self, event: Any, kept: SpoolFile, cmd_sop: str, cmd_class: str, source: str
    ) -> Dataset:
        """Header, UID check and row for a data set already committed to the spool as ``kept``."""
        try:
            outcome = self._accepted_header(
                lambda: read_header(
                    kept.path, max_inflated_bytes=self.cfg.max_inflated_bytes, media_sop_class=False,
                    max_rejection_items=self.cfg.max_rejection_items,
                ),
                kept.path, cmd_sop, cmd_class, source,
            )
        except OSError as exc:
            outcome = self._out_of_resources("cannot read back the spooled data set", cmd_sop, exc)
        if not isinstance(outcome, ParsedInstance):
            self._discard(kept.name)
            return outcome
        return self._commit_row(event, kept, outcome.digest, outcome.record, source, kept.path)

    def _durable(self, event: Any, data: bytes, digest: str, record: Any, source: str) -> Dataset:
        """Make a received data set durable, then answer; success only when it is.

        Up to ``[spool] inline_max_bytes`` (Part 10 file size) the bytes go into the state store in the
        transaction of the row: one durable write. Larger ones are spooled first (temp, fsync, rename,
        folder fsync), then the row is committed.
        """
        # the UIDs are the command's (checked equal); read from the record, not the C-STORE primitive,
        # whose properties build and validate pydicom UIDs on every access
        prefix = part10_prefix(record.sop_class_uid, record.sop_uid, str(event.context.transfer_syntax))
        if len(prefix) + len(data) <= self.inline_max_bytes:
            return self._commit_row(event, None, digest, record, source, data, inline=prefix + data)
        try:
            with self.spool.open_writer(hashed=False) as writer:  # the header read digested it
                writer.write(prefix)
                writer.write(data)
                kept = writer.commit()
        except StoreError as exc:
            return self._out_of_resources("spool write failed", record.sop_uid, exc)
        return self._commit_row(event, kept, digest, record, source, data)

    def _commit_row(
        self,
        event: Any,
        kept: SpoolFile | None,
        digest: str,
        record: Any,
        source: str,
        data: bytes | Path,
        *,
        inline: bytes | None = None,
    ) -> Dataset:
        """Admit an instance (``ingest.intake.admit``, through the group commit); success only when its
        row, and its ``inline`` bytes when it has no spool file ``kept``, are durable.

        The admission removes the spool copy of a duplicate, a conflict (``data`` quarantined) or a
        failure; here the outcome becomes its :data:`STATUS_TABLE` answer.
        """
        try:
            admitted = self.group.admit(
                Candidate(
                    record, digest, source, spool_name=None if kept is None else kept.name, body=data,
                    origin=source, data=inline,
                )
            )
        except StoreError as exc:
            return self._out_of_resources("state store failed", record.sop_uid, exc)
        if admitted.outcome is AddOutcome.DUPLICATE:
            return _answer("duplicate")
        if admitted.outcome is AddOutcome.CONFLICT:
            return _answer("conflict")
        with self._lock:
            self._studies.setdefault(id(event.assoc), set()).add(record.study_uid)
        self.metrics.spool_bytes.set(self.spool.bytes_used() if self.budget is None else self.budget.used)
        return _answer("stored")

    def _discard(self, name: str) -> None:
        try:
            self.spool.remove(name)
        except Exception as exc:
            LOGGER.warning("could not remove spool file %s: %s", name, exc)

    # -- shutdown --------------------------------------------------------------------------------------

    def close(self, wait_s: float | None = None) -> None:
        """Stop accepting, let in-flight associations finish (bounded), then abort what remains."""
        server = self.server
        if server is None:
            return
        self.server = None
        server.closing.set()
        server.shutdown()  # stops serve_forever and closes the listening socket
        limit = wait_s if wait_s is not None else min(30.0, self.cfg.dimse_timeout_s)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            active = [a for a in server.active_associations if a.is_alive()]
            if not active:
                break
            time.sleep(0.05)
        for assoc in server.active_associations:
            if assoc.is_alive():
                LOGGER.warning("aborting an association still open at shutdown")
                assoc.abort()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.commitment is not None:
            self.commitment.close()
        LOGGER.info("DICOM listener on %s:%d stopped", self.address[0], self.address[1])

    async def aclose(self) -> None:
        """Stop accepting associations, let in-flight stores finish (bounded wait), shut the server down."""
        await asyncio.to_thread(self.close)


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, Explicit VR Little Endian (PS3.5 7.1.2), ``value`` already padded even."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def part10_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 7.1) of a received data set: version
    00 01, the command's SOP Class / Instance UIDs, the transfer syntax, pynetdicom's implementation
    class UID and version name (what pynetdicom's ``event.file_meta`` holds)."""
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),  # File Meta Information Version
        _meta_element(0x0002, b"UI", _even(sop_class_uid, b"\0")),  # Media Storage SOP Class UID
        _meta_element(0x0003, b"UI", _even(sop_instance_uid, b"\0")),  # Media Storage SOP Instance UID
        _meta_element(0x0010, b"UI", _even(transfer_syntax_uid, b"\0")),  # Transfer Syntax UID
        _meta_element(0x0012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),  # Impl. Class UID
        _meta_element(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),  # Impl. Version Name
    ))
    length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))  # File Meta Group Length
    return b"\x00" * 128 + b"DICM" + length + body


def _part10_prefix_for(file_meta: FileMetaDataset) -> bytes:
    """Preamble, ``DICM`` and ``file_meta`` encoded (PS3.10 7.1)."""
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, file_meta, enforce_standard=True)  # type: ignore[arg-type]
    return buf.getvalue()


async def start_listener(
    settings: Settings,
    store: StateStore,
    wake: Callable[[], None],
    metrics: Metrics,
    *,
    budget: DiskBudget | None = None,
) -> Listener:
    """Start the C-STORE/C-ECHO listener for ``ingest serve``.

    Parameters
    ----------
    settings:
        ``[listener]``, ``[quarantine]``, ``[relay]`` ``stable_age_s`` / ``release_grace_s`` and
        ``data_dir`` (spool at ``data_dir/spool``, quarantine at ``data_dir/quarantine``).
    store:
        The state store; rows are committed from association threads.
    wake:
        The relay's ``wake()``; called on the running loop when instances arrived.
    metrics:
        The process's metrics.
    budget:
        The disk budget asked before an instance's bytes are written (0xA700 when it refuses); its
        spool is the listener's. ``None``: no budget, a spool of its own.

    Returns
    -------
    Listener
        Call ``await listener.aclose()`` to stop it.

    Raises
    ------
    OSError
        When the address cannot be bound.
    ConfigError
        When TLS files cannot be loaded.
    StoreUnavailableError
        When the spool or quarantine folder cannot be created.
    """
    loop = asyncio.get_running_loop()
    intake = Intake(settings.listener.intake_size, loop, wake)
    # with a disk budget, its spool: one running total for every writer ([spool] max_bytes)
    spool = budget.spool if budget is not None else Spool(settings.data_dir / "spool")
    quarantine = Quarantine(settings.data_dir / "quarantine", max_bytes=settings.quarantine.max_bytes)
    admission = Admission(
        store, spool=spool, quarantine=quarantine, metrics=metrics, budget=budget,
        stable_age_s=settings.relay.stable_age_s, wake=intake.notify, clock=utcnow, label="dimse",
        on_conflict=settings.intake.on_conflict, senders=settings.listener.allowed_calling_aes,
    )
    listener = Listener(
        settings.listener, store, metrics, intake, admission=admission, spool=spool, quarantine=quarantine,
        release_grace_s=settings.relay.release_grace_s, clock=utcnow,
        inline_max_bytes=settings.spool.inline_max_bytes, group=GroupCommit(admission), budget=budget,
        commitment=CommitmentSCP.from_settings(settings, store, metrics)
        if settings.listener.commitment.enabled else None,
    )
    await asyncio.to_thread(listener.start)
    return listener
