"""The C-STORE / C-ECHO listener (edge): modalities send, nothing acknowledged is lost.

One pynetdicom AE is the SCP for every storage SOP class (headers only; pixel data is never decoded)
and for Verification. Connections go through :mod:`ingest.adapters.netguard` (PDU-size cap, per
connection TLS handshake with a timeout, ``TCP_NODELAY`` and quick ACKs, a per-instance size cap that
drops the excess bytes instead of buffering them).

Answering a C-STORE (RELIABILITY.md, "C-STORE answers"; every code is in :data:`STATUS_TABLE`):

1. The data set's header is read from the received bytes (:func:`read_header_bytes`: one pass that
   checks every declared length; deflate inflated with a cap). A header error -> its own 0xC0xx code
   with an Error Comment (0000,0902); the bytes go to the quarantine with a reason side file.
2. The data set's SOP Class/Instance UIDs must equal the command's (0000,0002)/(0000,1000) -> 0xA900.
3. A slot of the bounded intake is taken (none free -> 0xA700), the bytes are written durably to the
   spool (temp, fsync, rename, fsync dir) and the instance row is committed; only then 0x0000.
   Disk, quota or store failures -> 0xA700 and nothing is kept. An identical duplicate -> 0x0000,
   no new row. A conflicting duplicate (same SOP Instance UID, other content or other study): the
   first is kept, the second goes to the quarantine, a warning is logged and the answer is 0xC010
   ("Cannot understand" family: the sender must not retry the same bytes, and the distinct code says
   why). Anything unexpected -> 0x0110; no exception ever escapes into pynetdicom.

The durable work runs on the association's thread (the state store is thread-safe); the asyncio loop is
only told that something arrived (``relay.wake`` through ``loop.call_soon_threadsafe``, coalesced, so
the loop's queue stays bounded). When an association that stored instances is released, their studies
become due after ``relay.release_grace_s``; otherwise ``relay.stable_age_s`` applies.

Association checks (A-ASSOCIATE-RJ, PS3.8 9.3.4): calling AE not allowed (or not from its pinned host)
-> (1,1,3); called AE not ours -> (1,1,7); over ``max_associations`` -> (2,3,2).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any, Final

from pydicom.dataset import Dataset
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
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ingest.adapters.dicomfile import read_header_bytes
from ingest.adapters.netguard import GuardedRequestHandler, GuardedServer, GuardedSocket, tls_context
from ingest.adapters.spool import Quarantine, Spool
from ingest.config import ListenerSettings, Settings
from ingest.errors import HeaderError, NestingTooDeepError, StoreError
from ingest.metrics import Metrics
from ingest.ports import AddOutcome, StateStore

__all__ = [
    "STATUS_TABLE",
    "TRANSFER_SYNTAXES",
    "Intake",
    "Listener",
    "StatusEntry",
    "start_listener",
    "status_for",
]

LOGGER = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class StatusEntry:
    """One C-STORE answer: the Status (0000,0900) and the Error Comment (0000,0902) sent with it."""

    status: int
    comment: str


#: Every C-STORE answer, by outcome (RELIABILITY.md table). Keys of the ``HeaderError.reason`` kind name
#: header problems; the others are listener outcomes. Error Comments are at most 64 characters (LO).
STATUS_TABLE: Final[dict[str, StatusEntry]] = {
    "stored": StatusEntry(0x0000, ""),
    "duplicate": StatusEntry(0x0000, ""),
    "out_of_resources": StatusEntry(0xA700, "Out of resources: not stored, retry later"),
    "too_large": StatusEntry(0xA700, "Instance exceeds the size cap"),
    "intake_full": StatusEntry(0xA700, "Receiver busy: not stored, retry later"),
    "uid_mismatch": StatusEntry(0xA900, "Dataset SOP Class/Instance UID differs from command"),
    "not_dicom": StatusEntry(0xC000, "Cannot parse the dataset"),
    "truncated": StatusEntry(0xC001, "Dataset truncated: a value runs past the end"),
    "missing_tag": StatusEntry(0xC002, "Required UID missing"),
    "invalid_uid": StatusEntry(0xC003, "Invalid UID"),
    "nesting_too_deep": StatusEntry(0xC004, "Sequences nested too deep"),
    "inflate_cap": StatusEntry(0xC005, "Deflated dataset inflates beyond the cap"),
    "not_patient_instance": StatusEntry(0xC006, "Not a patient instance"),
    "invalid_header": StatusEntry(0xC00F, "Malformed dataset"),
    "conflict": StatusEntry(0xC010, "Conflicts with a stored instance of the same UID"),
    "internal": StatusEntry(0x0110, "Processing failure"),
}


def status_for(outcome: str) -> StatusEntry:
    """The :data:`STATUS_TABLE` entry of ``outcome``; unknown header reasons get ``invalid_header``."""
    return STATUS_TABLE.get(outcome, STATUS_TABLE["invalid_header"])


def _answer(outcome: str, detail: str | None = None) -> Dataset:
    entry = status_for(outcome)
    rsp = Dataset()
    rsp.Status = entry.status  # (0000,0900)
    if entry.status != 0x0000:
        rsp.ErrorComment = (detail or entry.comment)[:64]  # (0000,0902) LO
    return rsp


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
        settings: Settings,
        store: StateStore,
        metrics: Metrics,
        intake: Intake,
        *,
        wake: Callable[[], None],
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.settings = settings
        self.cfg: ListenerSettings = settings.listener
        self.store = store
        self.metrics = metrics
        self.intake = intake
        self._wake = wake
        self.clock = clock or (lambda: datetime.now(UTC))
        self.spool = Spool(settings.data_dir / "spool")
        self.quarantine = Quarantine(settings.data_dir / "quarantine")
        self.spool.sweep_temps()
        self._studies: dict[int, set[str]] = {}  # id(association) -> studies it stored into
        self._lock = threading.Lock()
        self._allowed: dict[str, set[str | None]] = {}
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
        ae.maximum_associations = cfg.max_associations
        # The calling/called AE checks are ours (EVT_REQUESTED: they need the peer's address too).
        ae.require_calling_aet = []
        ae.require_called_aet = False
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
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
        pynetdicom_config.LOG_HANDLER_LEVEL = "none"
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_ended),
        ]
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
        tls = self.cfg.tls
        if tls.enabled:
            server.tls = tls_context(tls)
            server.handshake_timeout_s = tls.handshake_timeout_s
        self.ae._servers.append(server)
        self.server = server
        host, port = server.server_address[0], server.server_address[1]
        self.address = (str(host), int(port))
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="ingest-listener", daemon=True
        )
        self._thread.start()
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
            active = [a for a in self.server.active_associations if a.is_acceptor]
            if len(active) > self.cfg.max_associations:
                reason, why = (0x02, 0x03, 0x02), f"over the limit of {self.cfg.max_associations}"
        if reason is None:
            self.metrics.associations.labels(outcome="accepted").inc()
            LOGGER.info("association from %s (%s) to %s", calling, host, called)
            return
        LOGGER.warning("association from %s (%s) to %s rejected %s: %s", calling, host, called, reason, why)
        self.metrics.associations.labels(outcome="rejected").inc()
        assoc.acse.send_reject(*reason)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _on_echo(self, event: Any) -> int:
        return 0x0000

    def _on_released(self, event: Any) -> None:
        """EVT_RELEASED: the studies this association stored into become due after the grace period."""
        with self._lock:
            uids = self._studies.pop(id(event.assoc), set())
        if not uids:
            return
        due = self.clock() + timedelta(seconds=self.settings.relay.release_grace_s)
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

    # -- C-STORE ---------------------------------------------------------------------------------------

    def _on_store(self, event: Any) -> Dataset:
        """EVT_C_STORE: never raises; every outcome is a status from :data:`STATUS_TABLE`."""
        try:
            return self._store(event)
        except Exception:
            LOGGER.exception("unexpected error handling a C-STORE")
            self.metrics.instances_rejected.labels(reason="internal").inc()
            return _answer("internal")

    def _reject(self, outcome: str, data: bytes | None, detail: str, rule: str = "") -> Dataset:
        self.metrics.instances_rejected.labels(reason=outcome).inc()
        if data:
            try:
                self.quarantine.put(data, outcome, rule or outcome, detail, self.clock())
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
        sock = event.assoc.dul.socket
        if isinstance(sock, GuardedSocket) and sock.take_oversized():
            LOGGER.warning("C-STORE %s from %s exceeds max_instance_bytes: 0xA700", cmd_sop, calling)
            self.metrics.instances_rejected.labels(reason="too_large").inc()
            return _answer("too_large")
        stream: BytesIO = req.DataSet
        data = stream.getvalue()
        if len(data) > self.cfg.max_instance_bytes:
            self.metrics.instances_rejected.labels(reason="too_large").inc()
            return _answer("too_large")
        ts = str(event.context.transfer_syntax)
        try:
            parsed = read_header_bytes(
                data, source=source, transfer_syntax_uid=ts, max_inflated_bytes=self.cfg.max_inflated_bytes
            )
        except HeaderError as exc:
            LOGGER.warning("C-STORE %s from %s rejected (%s): %s", cmd_sop, calling, exc.reason, exc)
            return self._reject(exc.reason, data, str(exc))
        except RecursionError:
            exc2 = NestingTooDeepError(f"Sequences nested too deep to parse (source={source})")
            LOGGER.warning("C-STORE %s from %s rejected (%s)", cmd_sop, calling, exc2.reason)
            return self._reject(exc2.reason, data, str(exc2))
        record = parsed.record
        if record.sop_uid != cmd_sop or record.sop_class_uid != cmd_class:
            detail = (
                f"dataset SOP Instance/Class UID {record.sop_uid}/{record.sop_class_uid} differ from "
                f"the command's {cmd_sop}/{cmd_class} (source={source})"
            )
            LOGGER.warning("C-STORE from %s rejected: %s", calling, detail)
            return self._reject("uid_mismatch", data, detail)
        if not self.intake.enter():
            LOGGER.warning(
                "intake full (%d in flight): C-STORE %s answered 0xA700", self.intake.size, cmd_sop
            )
            self.metrics.instances_rejected.labels(reason="intake_full").inc()
            return _answer("intake_full")
        try:
            self.metrics.intake_depth.set(self.intake.busy)
            return self._durable(event, data, parsed.digest, record, source)
        finally:
            self.intake.leave()

    def _durable(self, event: Any, data: bytes, digest: str, record: Any, source: str) -> Dataset:
        """Spool (fsync'd) then commit the row; success only when both are durable."""
        try:
            with self.spool.open_writer() as writer:
                writer.write(_part10_prefix(event))
                writer.write(data)
                kept = writer.commit()
        except StoreError as exc:
            LOGGER.error("spool write failed, C-STORE %s answered 0xA700: %s", record.sop_uid, exc)
            self.metrics.instances_rejected.labels(reason="out_of_resources").inc()
            return _answer("out_of_resources")
        now = self.clock()
        try:
            added = self.store.add_instance(
                record,
                source=source,
                spool_name=kept.name,
                digest=digest,
                now=now,
                due_at=now + timedelta(seconds=self.settings.relay.stable_age_s),
            )
        except StoreError as exc:
            self._discard(kept.name)
            LOGGER.error("state store failed, C-STORE %s answered 0xA700: %s", record.sop_uid, exc)
            self.metrics.instances_rejected.labels(reason="out_of_resources").inc()
            return _answer("out_of_resources")
        except BaseException:
            self._discard(kept.name)
            raise
        if added.outcome is AddOutcome.DUPLICATE:
            self._discard(kept.name)
            self.metrics.instances_duplicate.inc()
            LOGGER.debug("identical duplicate of %s acknowledged", record.sop_uid)
            return _answer("duplicate")
        if added.outcome is AddOutcome.CONFLICT:
            self._discard(kept.name)
            detail = (
                f"SOP Instance UID {record.sop_uid} already stored with {added.detail.replace('_', ' ')}; "
                f"the first is kept (source={source})"
            )
            LOGGER.warning("conflicting duplicate quarantined: %s", detail)
            return self._reject("conflict", data, detail, rule=added.detail)
        with self._lock:
            self._studies.setdefault(id(event.assoc), set()).add(record.study_uid)
        self.metrics.instances_accepted.labels(source="dimse").inc()
        self.metrics.spool_bytes.set(self.spool.bytes_used())
        self.intake.notify()
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
        LOGGER.info("DICOM listener on %s:%d stopped", self.address[0], self.address[1])

    async def aclose(self) -> None:
        """Stop accepting associations, let in-flight stores finish (bounded wait), shut the server down."""
        await asyncio.to_thread(self.close)


def _part10_prefix(event: Any) -> bytes:
    """Preamble, ``DICM`` and the File Meta group (PS3.10 7.1) for the received data set."""
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, event.file_meta, enforce_standard=True)  # type: ignore[arg-type]
    return buf.getvalue()


async def start_listener(settings: Settings, store: StateStore, relay: Any, metrics: Metrics) -> Listener:
    """Start the C-STORE/C-ECHO listener for ``ingest serve``.

    Parameters
    ----------
    settings:
        ``[listener]`` and ``[relay]`` settings and ``data_dir`` (spool at ``data_dir/spool``,
        quarantine at ``data_dir/quarantine``).
    store:
        The state store; rows are committed from association threads.
    relay:
        The relay; its ``wake()`` is called on the running loop when instances arrived.
    metrics:
        The process's metrics.

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
    intake = Intake(settings.listener.intake_size, loop, relay.wake)
    listener = Listener(settings, store, metrics, intake, wake=relay.wake)
    await asyncio.to_thread(listener.start)
    return listener


def spool_root(settings: Settings) -> Path:
    """Where the listener spools accepted bytes."""
    return settings.data_dir / "spool"
