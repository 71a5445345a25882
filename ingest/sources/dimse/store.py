"""The C-STORE service of the DICOM edge: nothing acknowledged is lost (docs/reliability.md).

A C-STORE's data set arrives fragment by fragment (:class:`StoreReceiver`, on the event loop): up to
:attr:`StoreService.large_instance_bytes` it is kept in memory, past that the bytes so far and every
later fragment go into a spool temporary file (random name, ``0600``, headed by the preamble and file
meta), so only the threshold plus one PDU is ever held; past ``max_instance_bytes`` the rest is dropped
and the answer is 0xA700. Once complete, :meth:`StoreService.store` runs on a worker thread (the event
loop never waits for a disk or the state store):

1. The data set's header is read (:func:`read_header_bytes`, or :func:`read_header` on the spooled
   file: one pass that checks every declared length; deflate inflated with a cap). A header error -> its
   own 0xC0xx code with an Error Comment (0000,0902); the bytes go to the quarantine with a reason file.
2. The data set's SOP Class/Instance UIDs must equal the command's (0000,0002)/(0000,1000) -> 0xA900.
3. The disk budget is asked, a slot of the bounded intake is taken (none free -> 0xA700) and the
   instance is made durable; only then 0x0000. Up to ``[spool] inline_max_bytes`` its Part 10 bytes are
   committed in the state store in the transaction of its row (one durable write); a larger one is
   written to the spool first (temp, fsync, rename, fsync dir), then its row is committed. Rows go
   through the group commit (:mod:`ingest.intake.commit`): concurrent associations share a transaction,
   each answered when its own row is durable. An identical duplicate -> 0x0000, no new row; a
   conflicting one -> 0xC010 (the first kept, the second quarantined). Anything unexpected -> 0x0110.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from pydicom.dataset import Dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from ingest.adapters.dicomfile import ParsedInstance, read_header, read_header_bytes
from ingest.adapters.spool import Quarantine, Spool, SpoolFile, SpoolWriter
from ingest.config import ListenerSettings
from ingest.errors import HeaderError, NestingTooDeepError, StoreError
from ingest.intake.admit import Admitted, Candidate
from ingest.intake.commit import EdgeCommit
from ingest.intake.retention import DiskBudget, SpoolFullError
from ingest.metrics import Metrics
from ingest.ports import Verdict
from ingest.sources.dimse.status import Reply, answer, reply

#: The outcome name of the answer a worker thread built last (``stored``, ``duplicate``, ``conflict``...):
#: :meth:`StoreService.store` hands it to its receiver for the association's summary line.
_outcome = threading.local()


def _answer(outcome: str, detail: str | None = None) -> Dataset:
    _outcome.name = outcome
    return answer(outcome, detail)

__all__ = ["LARGE_INSTANCE_BYTES", "Intake", "StoreReceiver", "StoreService", "part10_prefix"]

LOGGER = logging.getLogger(__name__)

#: The longest :func:`part10_prefix` (three 64-character UIDs and the implementation's): a data set this
#: much under ``inline_max_bytes`` goes into the state store with its row.
_PREFIX_MAX: Final = 512

#: C-STORE data sets larger than this are received into a spool file instead of memory.
LARGE_INSTANCE_BYTES: Final = 16 * 1024 * 1024


class Intake:
    """The bounded hand-off from the C-STORE workers to the asyncio loop of ``ingest serve``.

    At most ``size`` C-STOREs are being made durable at once; :meth:`enter` returns ``False`` when all
    slots are taken (the caller answers 0xA700). :meth:`notify` asks the loop to run ``on_loop`` (the
    relay's ``wake``) and coalesces: at most one callback is queued on the loop at any time.
    """

    def __init__(self, size: int, loop: Any, on_loop: Callable[[], None]) -> None:
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


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group 0002 element, Explicit VR Little Endian (PS3.5 7.1.2), ``value`` already padded even."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def part10_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information (PS3.10 7.1) of a received data set: version
    00 01, the command's SOP Class / Instance UIDs, the transfer syntax, the implementation class UID
    and version name the edge announces (pynetdicom's)."""
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


class StoreReceiver:
    """One C-STORE data set being received (on the event loop; module doc). Never raises."""

    def __init__(self, service: StoreService, cmd_class: str, cmd_sop: str, transfer_syntax: str) -> None:
        self.service = service
        self.cmd_class = cmd_class
        self.cmd_sop = cmd_sop
        self.transfer_syntax = transfer_syntax
        self.buffer: bytearray | None = bytearray()
        self.writer: SpoolWriter | None = None
        self.failed: StoreError | None = None
        self.size = 0
        self.oversized = False
        self.outcome: str | None = None  # the answer's outcome name, once answered

    def feed(self, fragment: memoryview) -> None:
        """Take one data-set fragment."""
        self.size += len(fragment)
        if self.oversized:
            return
        if self.size > self.service.cfg.max_instance_bytes:
            self.oversized = True
            self.buffer = None
            self.abandon()
            return
        if self.buffer is not None:
            if len(self.buffer) + len(fragment) <= self.service.large_instance_bytes:
                self.buffer += fragment
                return
            self._spill()
        if self.writer is not None and self.failed is None:
            try:
                self.writer.write(fragment)
            except StoreError as exc:
                self.failed = exc
                self.writer.abort()

    def _spill(self) -> None:
        """Move the bytes so far into a spool temporary file headed by the Part 10 prefix."""
        head = self.buffer or bytearray()
        self.buffer = None
        try:
            prefix = part10_prefix(self.cmd_class, self.cmd_sop, self.transfer_syntax)
            size = len(prefix) + len(head)
            budget = self.service.budget
            if budget is not None and (why := budget.refusal(size, what="a large data set")):
                raise SpoolFullError(why)
            self.writer = self.service.spool.open_writer(hashed=False)  # the header read digests
            self.writer.write(prefix)
            self.writer.write(head)
        except StoreError as exc:
            self.failed = exc
            if self.writer is not None:
                self.writer.abort()
        except Exception as exc:
            LOGGER.exception("could not move a large data set to disk")
            self.failed = StoreError(f"could not receive a large data set: {exc}")
            if self.writer is not None:
                self.writer.abort()

    def abandon(self) -> None:
        """The message will not be completed (abort, lost connection) or was refused: remove its file."""
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.abort()


class StoreService:
    """C-STORE answers (module doc); :meth:`store` runs on a worker thread."""

    def __init__(
        self,
        cfg: ListenerSettings,
        metrics: Metrics,
        intake: Intake,
        *,
        group: EdgeCommit,
        spool: Spool,
        quarantine: Quarantine,
        clock: Callable[[], datetime],
        inline_max_bytes: int,
        budget: DiskBudget | None,
        stored: Callable[[Any, str], None],
        executor: Executor | None = None,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.intake = intake
        self.group = group
        self.spool = spool
        self.quarantine = quarantine
        self.clock = clock
        self.inline_max_bytes = inline_max_bytes
        self.budget = budget
        self.large_instance_bytes = LARGE_INSTANCE_BYTES
        self.executor = executor  # where store_async runs the work that touches a disk (None: the loop's)
        self._stored = stored  # (association, study UID): the release brings it forward

    def store(self, assoc: Any, calling: str, receiver: StoreReceiver) -> Dataset:
        """Answer a received C-STORE; never raises (every outcome is a status of ``status.py``)."""
        started = time.monotonic()
        _outcome.name = None
        try:
            return self._store(assoc, calling, receiver)
        except Exception:
            LOGGER.exception("unexpected error handling a C-STORE")
            self.metrics.instances_rejected.labels(reason="internal").inc()
            receiver.abandon()
            return _answer("internal")
        finally:  # the data set received to the answer decided (durable first)
            receiver.outcome = getattr(_outcome, "name", None)
            self.metrics.cstore_seconds.observe(time.monotonic() - started)

    async def store_async(self, assoc: Any, calling: str, receiver: StoreReceiver) -> Reply:
        """Answer a received C-STORE from the event loop; never raises.

        A data set received into memory that goes into the state store with its row (up to
        ``inline_max_bytes``) is read on the loop (CPU only) and handed to the group commit
        (:meth:`EdgeCommit.commit`: its writer thread, or its writer process while several associations are
        open), awaited: the loop never waits for a disk. Every
        other case (a spooled or oversized data set, a header to refuse and quarantine, a spool file
        to write) runs :meth:`store` on a worker thread.
        """
        data = receiver.buffer
        if receiver.oversized or data is None or _PREFIX_MAX + len(data) > self.inline_max_bytes:
            return Reply.of(await self._in_thread(assoc, calling, receiver))
        started = time.monotonic()
        try:
            body = bytes(data)  # the one copy: read here, committed with its row below
            parsed = self._parsed_inline(calling, receiver, body)
            if parsed is None:  # refused: read again, answered and quarantined on a worker thread
                return Reply.of(await self._in_thread(assoc, calling, receiver))
            receiver.buffer = None
            rsp, outcome = await self._commit_inline(assoc, calling, receiver, parsed, body)
            self.metrics.cstore_seconds.observe(time.monotonic() - started)
            receiver.outcome = outcome
            return rsp
        except Exception:
            LOGGER.exception("unexpected error handling a C-STORE")
            self.metrics.instances_rejected.labels(reason="internal").inc()
            receiver.abandon()
            receiver.outcome = "internal"
            return reply("internal")

    async def _in_thread(self, assoc: Any, calling: str, receiver: StoreReceiver) -> Dataset:
        """:meth:`store` on a worker thread (:attr:`executor`)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.store, assoc, calling, receiver)

    def _parsed_inline(self, calling: str, receiver: StoreReceiver, data: bytes) -> ParsedInstance | None:
        """The header of the in-memory data set ``data`` if its SOP UIDs are the command's, or ``None``."""
        try:
            parsed = read_header_bytes(
                data, source=f"dimse:{calling}",
                transfer_syntax_uid=receiver.transfer_syntax, max_inflated_bytes=self.cfg.max_inflated_bytes,
                max_rejection_items=self.cfg.max_rejection_items,
            )
        except (HeaderError, RecursionError):
            return None
        record = parsed.record
        if record.sop_uid != receiver.cmd_sop or record.sop_class_uid != receiver.cmd_class:
            return None
        return parsed

    async def _commit_inline(
        self, assoc: Any, calling: str, receiver: StoreReceiver, parsed: ParsedInstance, data: bytes
    ) -> tuple[Reply, str]:
        """Admit the in-memory data set ``data`` with its bytes in its row, through the group commit's
        writer."""
        source = f"dimse:{calling}"
        self.metrics.instances_received.labels(source="dimse").inc()
        record = parsed.record
        if (full := self._spool_full(len(data), record.sop_uid)) is not None:
            return Reply.of(full), "out_of_resources"
        with self._intake_slot(record.sop_uid) as admitted:
            if not admitted:
                return reply("intake_full"), "intake_full"
            inline = part10_prefix(record.sop_class_uid, record.sop_uid, receiver.transfer_syntax) + data
            candidate = Candidate(
                record, parsed.digest, source, spool_name=None, body=data, data=inline, origin=source
            )
            try:
                done = await self.group.commit(candidate)
            except StoreError as exc:
                return (
                    Reply.of(self._out_of_resources("state store failed", record.sop_uid, exc)),
                    "out_of_resources",
                )
        outcome = self._settled(assoc, done, record.study_uid)
        if outcome == "stored" and self.budget is not None:  # (without one, measuring walks the spool)
            self.metrics.spool_bytes.set(self.budget.used)
        return reply(outcome), outcome

    def _settled(self, assoc: Any, admitted: Admitted, study_uid: str) -> str:
        """The outcome name of an admission (``stored``, ``duplicate``, ``conflict``); a stored
        instance's study is noted for its association (the release brings it forward)."""
        if admitted.outcome is Verdict.DUPLICATE:
            return "duplicate"
        if admitted.outcome is Verdict.CONFLICT:
            return "conflict"
        self._stored(assoc, study_uid)
        return "stored"

    def _store(self, assoc: Any, calling: str, receiver: StoreReceiver) -> Dataset:
        source = f"dimse:{calling}"
        self.metrics.instances_received.labels(source="dimse").inc()
        cmd_sop, cmd_class = receiver.cmd_sop, receiver.cmd_class
        if receiver.oversized:
            LOGGER.warning("C-STORE %s from %s exceeds max_instance_bytes: 0xA700", cmd_sop, calling)
            self.metrics.instances_rejected.labels(reason="too_large").inc()
            receiver.abandon()
            return _answer("too_large")
        if receiver.buffer is None:
            return self._store_spilled(assoc, receiver, cmd_sop, cmd_class, source)
        data = bytes(receiver.buffer)
        receiver.buffer = None
        ts = receiver.transfer_syntax
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
            return self._durable(assoc, data, outcome.digest, outcome.record, source, ts)

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

    def _store_spilled(
        self, assoc: Any, receiver: StoreReceiver, cmd_sop: str, cmd_class: str, source: str
    ) -> Dataset:
        """A C-STORE whose data set was received into a spool temporary file (see the module doc)."""
        writer = receiver.writer
        try:
            refused = receiver.failed.reason if isinstance(receiver.failed, SpoolFullError) else None
            if (full := self._spool_full(0, cmd_sop, refused=refused)) is not None:
                return full
            if receiver.failed is not None or writer is None:
                return self._out_of_resources("spool write failed", cmd_sop, receiver.failed)
            with self._intake_slot(cmd_sop) as admitted:
                if not admitted:
                    return _answer("intake_full")
                try:
                    kept = writer.commit()
                except StoreError as exc:
                    return self._out_of_resources("spool write failed", cmd_sop, exc)
                receiver.writer = None
                try:
                    return self._accept_spooled(assoc, kept, cmd_sop, cmd_class, source)
                except BaseException:
                    self._discard(kept.name)
                    raise
        finally:
            receiver.abandon()

    def _accept_spooled(
        self, assoc: Any, kept: SpoolFile, cmd_sop: str, cmd_class: str, source: str
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
        return self._commit_row(assoc, kept, outcome.digest, outcome.record, source, kept.path)

    def _durable(self, assoc: Any, data: bytes, digest: str, record: Any, source: str, ts: str) -> Dataset:
        """Make a received data set durable, then answer; success only when it is."""
        prefix = part10_prefix(record.sop_class_uid, record.sop_uid, ts)
        if len(prefix) + len(data) <= self.inline_max_bytes:
            return self._commit_row(assoc, None, digest, record, source, data, inline=prefix + data)
        try:
            with self.spool.open_writer(hashed=False) as writer:  # the header read digested it
                writer.write(prefix)
                writer.write(data)
                kept = writer.commit()
        except StoreError as exc:
            return self._out_of_resources("spool write failed", record.sop_uid, exc)
        return self._commit_row(assoc, kept, digest, record, source, data)

    def _commit_row(
        self,
        assoc: Any,
        kept: SpoolFile | None,
        digest: str,
        record: Any,
        source: str,
        data: bytes | Path,
        *,
        inline: bytes | None = None,
    ) -> Dataset:
        """Admit an instance (through the group commit); success only when its row, and its ``inline``
        bytes when it has no spool file ``kept``, are durable."""
        try:
            admitted = self.group.admit(
                Candidate(
                    record, digest, source, spool_name=None if kept is None else kept.name, body=data,
                    data=inline, origin=source,
                )
            )
        except StoreError as exc:
            return self._out_of_resources("state store failed", record.sop_uid, exc)
        outcome = self._settled(assoc, admitted, record.study_uid)
        if outcome == "stored":
            self.metrics.spool_bytes.set(self.spool.bytes_used() if self.budget is None else self.budget.used)
        return _answer(outcome)

    def _discard(self, name: str) -> None:
        try:
            self.spool.remove(name)
        except Exception as exc:
            LOGGER.warning("could not remove spool file %s: %s", name, exc)
