"""The C-STORE / C-ECHO listener (edge): modalities send, nothing acknowledged is lost.

The listener is the composition of the DICOM edge (docs/architecture.md, "The data flow"):

- :mod:`ingest.sources.dimse.edge`: the asyncio server (one coroutine per association on the
  listener's own event loop thread ``ingest-listener``), pending-connection caps, TLS, the PS3.8
  acceptor state machine and its timers;
- :mod:`ingest.sources.dimse.associate`: the A-ASSOCIATE-RQ checks, the AE policy and the negotiation
  through pynetdicom's public PDU codec and ``negotiate_as_acceptor``;
- :mod:`ingest.sources.dimse.framing`: P-DATA-TF and DIMSE command sets, encoded and decoded here;
- :mod:`ingest.sources.dimse.store`: C-STORE (received fragment by fragment, made durable through the
  group commit: its writer thread, or its writer process while several associations are open);
- :mod:`ingest.sources.dimse.commitment`: Storage Commitment (N-ACTION, and N-EVENT-REPORT on the
  same association when the requester negotiated the SCP role).

Association checks (A-ASSOCIATE-RJ, PS3.8 9.3.4): calling AE not allowed (or not from its pinned host)
-> (1,1,3); called AE not ours -> (1,1,7); over ``max_associations`` -> (2,3,2). Presentation
contexts: every class of :func:`storage_sop_classes` (pydicom's and pynetdicom's storage classes,
retired ones included, as ``ingest replay`` reads them; non-patient classes excluded) in
:data:`TRANSFER_SYNTAXES`, and Verification. With ``[listener] unknown_storage_classes = "accept"``,
classes known to neither library are supported for the association that requests them. Every refused
presentation context is logged in one warning per association and counted in
``ingest_presentation_contexts_refused_total{reason}``. With ``[listener.commitment] enabled``, Storage
Commitment Push Model is supported too (SCP/SCU role selection accepted). Any other command gets its
failure status (0x0211, unrecognized operation) and the association goes on.

When an association that stored instances is released, their studies become due after
``relay.release_grace_s``; otherwise ``relay.stable_age_s`` applies.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, Final

from pydicom.uid import (  # type: ignore[attr-defined]  # UID_dictionary: public, not in __all__
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
    UID_dictionary,
)
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import uid_to_service_class

from ingest.adapters.spool import Quarantine, Spool
from ingest.clock import utcnow
from ingest.config import ListenerSettings, Settings
from ingest.core.extract import valid_uid
from ingest.core.tags import NON_PATIENT_SOP_CLASSES
from ingest.errors import StoreError
from ingest.intake.admit import Admission
from ingest.intake.commit import EdgeCommit, GroupCommit
from ingest.intake.retention import DiskBudget
from ingest.metrics import Metrics
from ingest.ports import RowWriter, StateStore
from ingest.sources.dimse.associate import (
    REJECT_BUSY,
    AEPolicy,
    Negotiated,
    Negotiator,
    Refusal,
    Request,
    context,
    tls_context,
)
from ingest.sources.dimse.commitment import STORAGE_COMMITMENT_PUSH, CommitmentSCP
from ingest.sources.dimse.edge import Association, Edge, EdgeLimits, Receiver
from ingest.sources.dimse.framing import (
    C_ECHO_RQ,
    C_STORE_RQ,
    N_ACTION_RQ,
    NO_DATA_SET,
    Command,
    encode_command,
)
from ingest.sources.dimse.store import (
    LARGE_INSTANCE_BYTES,
    Intake,
    StoreReceiver,
    StoreService,
    part10_prefix,
)

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

VERIFICATION: Final = "1.2.840.10008.1.1"

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
_UNRECOGNIZED_OPERATION: Final = 0x0211  # PS3.7 C.5.7


def _has_service_class(uid: str) -> bool:
    """Whether pynetdicom knows a service class for ``uid`` (its base class means it does not)."""
    return uid_to_service_class(uid).__name__ != "ServiceClass"


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
    if "." not in uid or not valid_uid(uid):  # PS3.5 9.1, at least two components
        return "invalid_uid"
    if uid in UID_dictionary or uid == VERIFICATION or _has_service_class(uid):
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


class Listener:
    """The running listener; built by :func:`start_listener` (the edge's :class:`Handlers`).

    Attributes
    ----------
    address:
        The bound ``(host, port)``.
    spool, quarantine:
        Where accepted bytes and rejected ones go.
    server:
        The running :class:`~ingest.sources.dimse.edge.Edge` (``pending``, ``handshake_failures``).
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
        inline_max_bytes: int = 128 * 1024,
        writer: RowWriter | None = None,
        budget: DiskBudget | None = None,
        commitment: CommitmentSCP | None = None,
    ) -> None:
        self.commitment = commitment
        self.cfg = cfg
        self.store = store  # release: mark_due (rows are committed by ``admission``)
        self.metrics = metrics
        self.intake = intake
        self.admission = admission
        # instances read on the loop commit through the writer thread, or the writer process when several
        # associations are open (ingest.intake.commit); worker threads through the writer thread
        self.group = EdgeCommit(GroupCommit(admission), writer, concurrency=lambda: len(self.active))
        self.release_grace = timedelta(seconds=release_grace_s)
        self.clock = clock
        self.spool = spool
        self.quarantine = quarantine
        self.spool.sweep_temps()
        self._lock = threading.Lock()
        self._studies: dict[int, set[str]] = {}  # association id -> studies it stored into
        self._tallies: dict[int, _Tally] = {}  # association id -> what its C-STOREs came to
        # C-STOREs and N-ACTIONs are made durable here, never on the event loop
        self._workers = ThreadPoolExecutor(
            max_workers=min(64, cfg.max_associations + 4), thread_name_prefix="ingest-store"
        )
        self.stores = StoreService(
            cfg, metrics, intake, group=self.group, spool=spool, quarantine=quarantine, clock=clock,
            inline_max_bytes=inline_max_bytes, budget=budget, stored=self._stored, executor=self._workers,
        )
        allowed: dict[str, set[str | None]] = {}
        for entry in cfg.allowed_calling_aes:
            allowed.setdefault(entry.ae, set()).add(entry.host)
        self._allowed = allowed
        self.policy = AEPolicy(
            None if cfg.accept_any_calling_ae else allowed, cfg.ae_title if cfg.check_called_ae else None
        )
        self.supported_contexts = [context(uid, TRANSFER_SYNTAXES) for uid in sorted(storage_sop_classes())]
        both_le = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        self.supported_contexts.append(context(VERIFICATION, both_le))
        if commitment is not None:
            self.supported_contexts.append(context(STORAGE_COMMITMENT_PUSH, both_le, roles=True))
        self.negotiator = Negotiator(cfg.ae_title, cfg.max_pdu, self.supported_contexts)
        self.active: set[int] = set()  # ids of associations holding a slot
        self._negotiated: OrderedDict[bytes, Negotiated] = OrderedDict()  # by A-ASSOCIATE-RQ bytes
        self.server: Edge | None = None
        self.address: tuple[str, int] = (cfg.host, cfg.port)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def budget(self) -> DiskBudget | None:
        """The disk budget asked before an instance's bytes are written (``None``: none)."""
        return self.stores.budget

    @budget.setter
    def budget(self, value: DiskBudget | None) -> None:
        self.stores.budget = value

    @property
    def large_instance_bytes(self) -> int:
        """C-STORE data sets past this are received into a spool file."""
        return self.stores.large_instance_bytes

    @large_instance_bytes.setter
    def large_instance_bytes(self, value: int) -> None:
        self.stores.large_instance_bytes = value

    # -- setup ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and serve on the listener's own event loop thread; logs the address.

        Raises
        ------
        OSError
            When the address cannot be bound.
        """
        cfg = self.cfg
        tls = cfg.tls
        limits = EdgeLimits(
            max_peer_pdu=cfg.max_peer_pdu,
            rq_timeout_s=cfg.associate_rq_timeout_s,
            max_rq_bytes=cfg.max_associate_rq_bytes,
            max_pending=cfg.max_pending_connections,
            max_pending_per_host=cfg.max_pending_per_host,
            handshake_timeout_s=tls.handshake_timeout_s,
            network_timeout_s=cfg.network_timeout_s,
            dimse_timeout_s=cfg.dimse_timeout_s,
            artim_s=cfg.acse_timeout_s,
            min_rate=cfg.min_message_rate,
        )
        edge = Edge(
            self, limits, tls=tls_context(tls) if tls.enabled else None,
            on_refused=lambda why: self.metrics.connections_refused.labels(reason=why).inc(),
        )
        loop = asyncio.new_event_loop()
        started: dict[str, Any] = {}
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                started["address"] = loop.run_until_complete(edge.start(cfg.host, cfg.port))
            except BaseException as exc:
                started["error"] = exc
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="ingest-listener", daemon=True)
        self._thread.start()
        ready.wait()
        if "error" in started:
            self._thread.join()
            raise started["error"]
        self.loop = loop
        self.server = edge
        self.address = started["address"]
        if self.commitment is not None:
            self.commitment.start()
        LOGGER.info(
            "DICOM listener %s on %s:%d%s (max %d associations, calling AEs: %s)",
            cfg.ae_title, self.address[0], self.address[1],
            " with TLS" + (" (client certificates required)" if tls.require_client_cert else "")
            if tls.enabled else "",
            cfg.max_associations,
            "any" if cfg.accept_any_calling_ae else ", ".join(sorted(self._allowed)) or "none",
        )

    # -- association control (edge Handlers) -----------------------------------------------------------

    def admit(self, request: Request, host: str) -> Negotiated:
        """Calling-AE allowlist (with host), called AE, association limit, then negotiation."""
        calling, called = request.calling, request.called
        rejection = self.policy.check(calling, called, host)
        if rejection is None and len(self.active) >= self.cfg.max_associations:
            rejection = REJECT_BUSY, f"over the limit of {self.cfg.max_associations}"
        if rejection is not None:
            reason, why = rejection
            LOGGER.warning(
                "association from %s (%s) to %s rejected %s: %s",
                _esc(calling), host, _esc(called), reason, why,
            )
            self.metrics.associations.labels(outcome="rejected").inc()
            raise Refusal("rejected", why, reject=reason)
        negotiated = self._negotiated.get(request.raw) if request.raw else None
        if negotiated is None:
            negotiated = self.negotiator.accept(request, self._unknown_contexts(request))
            if request.raw:  # the same request again (a sender's next association) is answered alike
                self._negotiated[request.raw] = negotiated
                while len(self._negotiated) > 64:
                    self._negotiated.popitem(last=False)
        else:
            self._negotiated.move_to_end(request.raw)
        self.metrics.associations.labels(outcome="accepted").inc()
        LOGGER.info("association from %s (%s) to %s", _esc(calling), host, _esc(called))
        return negotiated

    def _unknown_contexts(self, request: Request) -> list[PresentationContext]:
        """With ``unknown_storage_classes = "accept"``, this association's unknown storage classes."""
        if self.cfg.unknown_storage_classes != "accept":
            return []
        unknown = [uid for uid in request.abstract_syntaxes if classify_abstract_syntax(uid) == "unknown"]
        if unknown:
            LOGGER.info(
                "association from %s: accepting unknown storage SOP classes %s",
                _esc(request.calling), ", ".join(_esc(uid) for uid in unknown),
            )
        return [context(uid, TRANSFER_SYNTAXES) for uid in unknown]

    def accepted(self, assoc: Association) -> None:
        """Hold a slot; log (one line) and count every presentation context that was refused."""
        self.active.add(assoc.id)
        if self.commitment is not None:
            self.commitment.on_accepted(_Event(assoc))
        refused = assoc.rejected_contexts
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
        LOGGER.warning(
            "association from %s (%s): %d presentation context(s) refused: %s",
            _esc(assoc.calling), _esc(assoc.host), len(refused), ", ".join(shown),
        )

    def _tally(self, assoc: Association, receiver: StoreReceiver) -> None:
        with self._lock:
            tally = self._tallies.setdefault(assoc.id, _Tally(time.monotonic()))
        tally.add(receiver.outcome, receiver.size)

    def ended(self, assoc: Association, *, released: bool) -> None:
        """Give the slot back; after a release the studies it stored into become due after the grace.
        One INFO line says what the association did (README "Metrics")."""
        self.active.discard(assoc.id)
        with self._lock:
            uids = self._studies.pop(assoc.id, set())
            tally = self._tallies.pop(assoc.id, None)
        if tally is not None:
            seconds = time.monotonic() - tally.started
            LOGGER.info(
                "association from %s (%s) %s: %d stored, %d duplicate, %d refused, %d bytes, %.1f s",
                _esc(assoc.calling), _esc(assoc.host), "released" if released else "ended", tally.stored,
                tally.duplicate, tally.refused, tally.bytes, seconds,
                extra={"ae": assoc.calling, "source": "dimse", "instances": tally.stored,
                       "seconds": round(seconds, 3), "status": "released" if released else "ended"},
            )
        if released and uids:
            try:
                self._workers.submit(self._bring_forward, uids)
            except RuntimeError:  # shutting down: stable_age still applies, the rows are durable
                LOGGER.info("studies of a released association not brought forward: shutting down")

    def _stored(self, assoc: Association, study_uid: str) -> None:
        with self._lock:
            self._studies.setdefault(assoc.id, set()).add(study_uid)

    def _bring_forward(self, uids: set[str]) -> None:
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

    # -- messages (edge Handlers) ----------------------------------------------------------------------

    def receiver(self, assoc: Association, cx: PresentationContext, command: Command) -> Receiver:
        """Where a command's data set goes: a C-STORE's to its :class:`StoreReceiver`, an N-ACTION's to
        a bounded buffer (nothing past the item cap is kept), anything else nowhere."""
        kind = self._kind(cx)
        if command.command_field == C_STORE_RQ and kind == "storage":
            ts = assoc.transfer_syntax(int(cx.context_id or 0))
            return StoreReceiver(self.stores, command.text(0x0002), command.text(0x1000), ts)
        if command.command_field == N_ACTION_RQ and kind == "commitment" and self.commitment is not None:
            return self.commitment.receiver()
        return _Discard()

    def _kind(self, cx: PresentationContext) -> str:
        uid = str(cx.abstract_syntax)
        if uid == VERIFICATION:
            return "verification"
        if uid == STORAGE_COMMITMENT_PUSH:
            return "commitment"
        return "storage"

    async def handle(
        self, assoc: Association, cx: PresentationContext, command: Command, receiver: Receiver | None
    ) -> bytes | None:
        """The response to a complete request (module doc)."""
        loop = asyncio.get_running_loop()
        field = command.command_field
        kind = self._kind(cx)
        if field == C_ECHO_RQ and kind == "verification":
            return encode_command({
                0x0002: command.text(0x0002) or VERIFICATION, 0x0100: 0x8030, 0x0120: command.message_id,
                0x0800: NO_DATA_SET, 0x0900: 0x0000,
            })
        if field == C_STORE_RQ and kind == "storage" and isinstance(receiver, StoreReceiver):
            rsp = await self.stores.store_async(assoc, assoc.calling, receiver)
            self._tally(assoc, receiver)
            return encode_command({
                0x0002: receiver.cmd_class, 0x0100: 0x8001, 0x0120: command.message_id, 0x0800: NO_DATA_SET,
                0x0900: rsp.status, 0x0902: rsp.comment,
                0x1000: receiver.cmd_sop,
            })
        if field == N_ACTION_RQ and kind == "commitment" and self.commitment is not None:
            return await loop.run_in_executor(
                self._workers, self.commitment.n_action, assoc, command, receiver
            )
        if receiver is not None:
            receiver.abandon()
        if field & 0x8000:
            return None
        LOGGER.warning(
            "association from %s (%s): command 0x%04X on %s answered 0x%04X", _esc(assoc.calling),
            _esc(assoc.host), field, _esc(str(cx.abstract_syntax)), _UNRECOGNIZED_OPERATION,
        )
        return encode_command({
            0x0002: command.text(0x0002) or command.text(0x0003) or None, 0x0100: field | 0x8000,
            0x0120: command.message_id, 0x0800: NO_DATA_SET, 0x0900: _UNRECOGNIZED_OPERATION,
        })

    # -- shutdown --------------------------------------------------------------------------------------

    def close(self, wait_s: float | None = None) -> None:
        """Stop accepting, let in-flight associations finish (bounded), then abort what remains."""
        server, loop = self.server, self.loop
        if server is None or loop is None:
            return
        self.server = None
        limit = wait_s if wait_s is not None else min(30.0, self.cfg.dimse_timeout_s)
        if self.commitment is not None:  # first: a report in flight needs the edge's loop to finish
            self.commitment.close()
        try:
            asyncio.run_coroutine_threadsafe(server.close(limit), loop).result(limit + 10)
        except Exception:
            LOGGER.exception("listener shutdown failed")
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._workers.shutdown(wait=True)
        self.group.close()
        LOGGER.info("DICOM listener on %s:%d stopped", self.address[0], self.address[1])

    async def aclose(self) -> None:
        """Stop accepting associations, let in-flight stores finish (bounded wait), shut the server down."""
        await asyncio.to_thread(self.close)


class _Tally:
    """What one association's C-STOREs came to, for its summary line."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.stored = self.duplicate = self.refused = self.bytes = 0

    def add(self, outcome: str | None, size: int) -> None:
        self.bytes += size
        if outcome == "stored":
            self.stored += 1
        elif outcome == "duplicate":
            self.duplicate += 1
        else:
            self.refused += 1


class _Discard:
    def feed(self, fragment: memoryview) -> None:
        return None

    def abandon(self) -> None:
        return None


class _Event:
    """What the Storage Commitment SCP reads of an association event."""

    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc


def _writer_process(settings: Settings) -> RowWriter | None:
    """The writer process of ``[listener] commit_process`` (``ingest.adapters.state.writer``), launched:
    it takes batches once it has opened its store (one that cannot is logged, and every commit stays in
    this process); ``None`` when it is off."""
    if not settings.listener.commit_process:
        return None
    from ingest.adapters.state.writer import WriterProcess

    writer = WriterProcess(url=settings.state.url, data_dir=settings.data_dir, node=settings.state.node_id)
    writer.launch()  # from this thread (serve's main thread): the child ends when it does
    return writer


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
        The state store; rows are committed by the group commit's writer thread, or by its writer
        process while several associations are open (``[listener] commit_process``).
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
        inline_max_bytes=settings.spool.inline_max_bytes, writer=_writer_process(settings),
        budget=budget,
        commitment=CommitmentSCP.from_settings(settings, store, metrics)
        if settings.listener.commitment.enabled else None,
    )
    try:
        await asyncio.to_thread(listener.start)
    except BaseException:
        listener.group.close()  # the writer process, if it started
        raise
    return listener
