"""The DICOM edge on asyncio: connections, the PS3.8 acceptor state machine, timers (docs/architecture.md).

One asyncio server; one coroutine per connection, no thread per association. A connection is
*pending* until it has delivered a complete A-ASSOCIATE-RQ (:func:`~ingest.sources.dimse.associate.
read_associate_rq`): at most ``max_pending_per_host`` per source address and ``max_pending`` in all
(over it the new connection is closed unread), each within
``rq_timeout_s`` from accept time (plus ``handshake_timeout_s`` for the TLS handshake). Only then do
the association checks run (:meth:`Handlers.admit`): a pending connection never holds an association
slot. At a source's cap, a new connection first evicts that source's connections that have been
pending for :data:`PENDING_GRACE_S` or more (oldest first, down to the cap), so silent connections from a
sender's own address cannot lock it out; a burst of connections that are all younger (a router opening
its associations at once) is let in up to twice the cap, past that the newest is closed unread.

On an established association (:class:`Association`, PS3.8 9.2 states Sta6-Sta13, acceptor side):

- P-DATA-TF: each PDV is checked (accepted context, command before data set, one message at a time,
  a command of at most 64 KiB) and fed to the message being received; its data-set fragments go to the
  :class:`Receiver` the handlers chose for the command as they arrive (a C-STORE's into its spool
  file past a threshold: memory stays bounded). A complete message is handled, its answer sent.
- A-RELEASE-RQ: A-RELEASE-RP, then the peer closes (ARTIM: ``artim_s``, then it is closed for it).
  When the edge asked for the release itself (shutdown) and the peer's request crosses it (release
  collision, Sta10), it waits for the peer's A-RELEASE-RP and then answers with its own.
- A-ABORT or a lost connection: the message in progress is dropped, nothing of it acknowledged.
- Anything unexpected or malformed: A-ABORT (service provider) with a log line; the association ends
  and the next sender is served.
- Timers: ``network_timeout_s`` without a PDU between messages; within a message a deadline of
  ``dimse_timeout_s`` plus one second per ``min_rate`` bytes received (a data set trickled a byte at
  a time ends at the deadline, a slow but steady one does not).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Final, Protocol

from pynetdicom.presentation import PresentationContext

from ingest.sources.dimse.associate import (
    Negotiated,
    Refusal,
    Request,
    decode_associate_rq,
    read_associate_rq,
)
from ingest.sources.dimse.framing import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    ABORT_INVALID_PARAMETER,
    ABORT_NOT_SPECIFIED,
    ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNIZED_PDU,
    MAX_COMMAND_BYTES,
    P_DATA_TF,
    PDU_HEADER,
    Command,
    FramingError,
    abort_pdu,
    decode_command,
    encode_command,
    encode_data_set,
    p_data_pdus,
    release_rp_pdu,
    release_rq_pdu,
    repair_command_set,
    split_pdvs,
)

__all__ = ["Association", "Edge", "EdgeLimits", "Handlers", "Receiver"]

LOGGER = logging.getLogger(__name__)

_TCP_QUICKACK: Final[int | None] = getattr(socket, "TCP_QUICKACK", None)
#: Decoded A-ASSOCIATE-RQs kept, by their bytes (see Edge._decode).
_CACHED_REQUESTS: Final = 64
#: Pause before an A-ASSOCIATE-RJ (see Edge._refuse).
_REJECT_PAUSE_S: Final = 0.05
#: At most one WARNING per source and kind of refusal in this many seconds.
CAP_WARNING_INTERVAL_S: Final = 60.0


class Receiver(Protocol):
    """Where a message's data-set fragments go as they arrive (on the event loop; never raises)."""

    def feed(self, fragment: memoryview) -> None: ...

    def abandon(self) -> None: ...


class Handlers(Protocol):
    """What the edge asks of the services above it (:class:`ingest.sources.dimse.listener.Listener`)."""

    def admit(self, request: Request, host: str) -> Negotiated:
        """Policy, slot and negotiation; raises :class:`Refusal` to reject or abort."""
        ...

    def accepted(self, assoc: Association) -> None: ...

    def ended(self, assoc: Association, *, released: bool) -> None: ...

    def receiver(self, assoc: Association, cx: PresentationContext, command: Command) -> Receiver: ...

    async def handle(
        self, assoc: Association, cx: PresentationContext, command: Command, receiver: Receiver | None
    ) -> bytes | None:
        """The response command set to send on ``cx`` (``None``: no response)."""
        ...


@dataclass(frozen=True)
class EdgeLimits:
    """The edge's caps and timers (``[listener]``)."""

    max_peer_pdu: int = 4 * 1024 * 1024
    rq_timeout_s: float = 5.0
    max_rq_bytes: int = 64 * 1024
    max_pending: int = 64
    max_pending_per_host: int = 8
    handshake_timeout_s: float = 10.0
    network_timeout_s: float = 60.0
    dimse_timeout_s: float = 60.0
    artim_s: float = 30.0
    min_rate: int = 1024  # bytes per second a message in progress must keep up past dimse_timeout_s


class _Discard:
    """The receiver of a data set nobody reads (an unsupported command's)."""

    def feed(self, fragment: memoryview) -> None:
        return None

    def abandon(self) -> None:
        return None


@dataclass(eq=False)
class _Message:
    cx_id: int
    started: float
    command_bytes: bytearray = field(default_factory=bytearray)
    command_pdvs: int = 0
    command: Command | None = None
    receiver: Receiver | None = None
    received: int = 0


class _Abort(Exception):
    """End the association with an A-ABORT (``reason``); ``message`` is logged."""

    def __init__(self, reason: int, message: str, *, level: int = logging.WARNING) -> None:
        super().__init__(message)
        self.reason = reason
        self.level = level


class Association:
    """One established association (acceptor side) on the event loop.

    Attributes used by the services: ``calling``, ``called``, ``host``, ``requestor`` (``ae_title`` and
    ``address``, as pynetdicom names them), ``accepted`` (contexts by ID), ``accepted_contexts``,
    ``rejected_contexts``, ``peer_max_pdu``, ``is_established``.
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        edge: Edge,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        negotiated: Negotiated,
        host: str,
    ) -> None:
        self.id = next(self._ids)
        self.edge = edge
        self.loop = asyncio.get_running_loop()
        self.reader = reader
        self.writer = writer
        self.calling = negotiated.calling
        self.called = negotiated.called
        self.host = host
        self.requestor = SimpleNamespace(ae_title=negotiated.calling, address=host)
        self.accepted = negotiated.accepted
        self.accepted_contexts = list(negotiated.accepted.values())
        self.rejected_contexts = negotiated.rejected
        self.peer_max_pdu = negotiated.peer_max_pdu
        self.is_established = False
        self.released = False
        self._release_requested = False  # by the peer
        self._release_sent = False  # by us (shutdown)
        self._message: _Message | None = None
        self._idle = asyncio.Event()  # no request being handled: a report may go out
        self._idle.set()
        self._waiting: dict[int, asyncio.Future[Command]] = {}
        self._message_ids = itertools.count(1)
        self._closed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    # -- for the services --------------------------------------------------------------------------------

    def is_release_requested(self) -> bool:
        """Whether either side asked to release it."""
        return self._release_requested or self._release_sent

    def transfer_syntax(self, cx_id: int) -> str:
        """The transfer syntax accepted for context ``cx_id``."""
        return str(self.accepted[cx_id].transfer_syntax[0])

    async def send(self, cx_id: int, command: bytes, data_set: bytes | None = None) -> None:
        """Send one message (command, then data set) as whole P-DATA-TF PDUs, never interleaved."""
        self.writer.write(b"".join(p_data_pdus(cx_id, command, data_set, self.peer_max_pdu)))
        await self.writer.drain()

    async def request(self, cx_id: int, command_fields: dict[int, Any], data_set: bytes | None) -> Command:
        """Send a request on this association once no request of the peer is being handled, and wait
        for its response (``dimse_timeout_s``); ``command_fields`` get a Message ID (0000,0110).

        Raises
        ------
        ConnectionError
            When the association is being released or has ended.
        TimeoutError
            When no response came in time.
        """
        await self._idle.wait()
        if not self.is_established or self.is_release_requested():
            raise ConnectionError("the association is being released or has ended")
        message_id = next(self._message_ids) % 65535 + 1
        fut: asyncio.Future[Command] = self.loop.create_future()
        self._waiting[message_id] = fut
        try:
            await self.send(cx_id, encode_command({**command_fields, 0x0110: message_id}), data_set)
            async with asyncio.timeout(self.edge.limits.dimse_timeout_s):
                return await fut
        finally:
            self._waiting.pop(message_id, None)

    def call(self, coro: Any, timeout: float) -> Any:
        """Run ``coro`` on the association's loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def send_n_event_report(
        self, info: Any, event_type: int, sop_class: str, sop_instance: str, msg_id: int | None = None,
        timeout_s: float | None = None,
    ) -> tuple[Any, None]:
        """An N-EVENT-REPORT on this association, from another thread (the Storage Commitment sender):
        ``(status data set, None)``, as pynetdicom's SCU returns it. The answer is awaited at most
        ``timeout_s`` (``[listener.commitment] report_timeout_s``), and never past ``dimse_timeout_s``.

        Raises
        ------
        RuntimeError
            When no accepted context lets this side send it, the association ended, or no answer came.
        """
        from pydicom.dataset import Dataset

        cx = next(
            (c for c in self.accepted_contexts if str(c.abstract_syntax) == sop_class and c.as_scu), None
        )
        if cx is None:
            raise RuntimeError("no accepted presentation context for the report")
        body = encode_data_set(info, str(cx.transfer_syntax[0]))
        fields = {0x0002: sop_class, 0x0100: 0x0100, 0x0800: 0x0001, 0x1000: sop_instance, 0x1002: event_type}
        try:
            wait_s = self.edge.limits.dimse_timeout_s
            if timeout_s is not None:
                wait_s = min(wait_s, timeout_s)
            sent = asyncio.wait_for(self.request(int(cx.context_id or 0), fields, body), wait_s)
            rsp = self.call(sent, wait_s + 5)
        except (ConnectionError, TimeoutError, OSError) as exc:
            raise RuntimeError(f"no answer to the N-EVENT-REPORT: {type(exc).__name__}") from exc
        status = Dataset()
        status.Status = rsp.us(0x0900) if rsp.us(0x0900) is not None else 0xFFFF
        return status, None

    # -- the state machine ---------------------------------------------------------------------------

    async def run(self, ac_pdu: bytes, handlers: Handlers) -> None:
        released = False
        try:
            self.writer.write(ac_pdu)
            await self.writer.drain()
            self.is_established = True
            handlers.accepted(self)
            released = await self._serve(handlers)
        except _Abort as abort:
            LOGGER.log(abort.level, "association from %s (%s) aborted: %s", self.calling, self.host, abort)
            self._send_abort(abort.reason)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError) as exc:
            LOGGER.info("association from %s (%s) lost: %s", self.calling, self.host, type(exc).__name__)
        except asyncio.CancelledError:
            self._send_abort(ABORT_NOT_SPECIFIED)
            raise
        except Exception:
            LOGGER.exception("association from %s (%s) failed", self.calling, self.host)
            self._send_abort(ABORT_NOT_SPECIFIED)
        finally:
            self.is_established = False
            self.released = released
            if self._message is not None and self._message.receiver is not None:
                self._message.receiver.abandon()
            self._message = None
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("the association ended"))
            self._idle.set()
            try:
                handlers.ended(self, released=released)
            finally:
                _close_writer(self.writer)
                self._closed.set()

    def _send_abort(self, reason: int) -> None:
        with contextlib.suppress(Exception):
            if not self.writer.is_closing():
                self.writer.write(abort_pdu(reason))

    async def _read_pdu(self) -> tuple[int, bytes]:
        limits = self.edge.limits
        msg = self._message
        if msg is None:
            timeout = limits.network_timeout_s
            what = f"no PDU for {timeout:g} s (network timeout)"
        else:  # a message in progress: its deadline grows with what it has received
            deadline = msg.started + limits.dimse_timeout_s + msg.received / max(1, limits.min_rate)
            timeout = max(0.0, deadline - self.loop.time())
            what = (
                f"message not completed in time ({msg.received} bytes in "
                f"{self.loop.time() - msg.started:.0f} s; at least {limits.min_rate} bytes/s are expected "
                f"past {limits.dimse_timeout_s:g} s)"
            )
        _quickack(self.writer)  # before each wait: the kernel leaves quick-ACK mode after sending
        try:
            async with asyncio.timeout(timeout):
                header = await self.reader.readexactly(PDU_HEADER.size)
                pdu_type, _, length = PDU_HEADER.unpack(header)
                if length > limits.max_peer_pdu:
                    LOGGER.warning(
                        "peer %s (%s) declared a PDU of %d bytes (cap %d): connection closed",
                        self.calling, self.host, length, limits.max_peer_pdu,
                    )
                    raise ConnectionAbortedError("PDU over the cap")
                _quickack(self.writer)
                body = await self.reader.readexactly(length)
        except TimeoutError:
            raise _Abort(ABORT_NOT_SPECIFIED, what) from None
        return pdu_type, body

    async def _serve(self, handlers: Handlers) -> bool:
        """Read PDUs until the association ends; ``True`` when it was released."""
        while True:
            try:
                pdu_type, body = await self._read_pdu()
            except asyncio.IncompleteReadError:
                if self._release_requested:
                    return True
                raise
            if pdu_type == P_DATA_TF and (not self._release_requested or self._waiting):
                # after the peer's A-RELEASE-RQ only the responses to our requests it crossed
                await self._on_p_data(body, handlers)
                if self._release_requested and not self._waiting and not self._release_sent:
                    return await self._answer_release()
            elif pdu_type == A_RELEASE_RQ and not self._release_requested:
                self._release_requested = True
                if self._message is not None:
                    raise _Abort(ABORT_UNEXPECTED_PDU, "A-RELEASE-RQ in the middle of a message")
                if self._release_sent or self._waiting:
                    # release collision (PS3.8 9.2.4, Sta10): wait for the peer's A-RELEASE-RP; or a
                    # response to a request of ours is still on its way: answer once it is in
                    continue
                return await self._answer_release()
            elif pdu_type == A_RELEASE_RP and self._release_sent:
                if self._release_requested:  # collision: our RP after theirs (Sta12 -> Sta13)
                    self.writer.write(release_rp_pdu())
                    await self.writer.drain()
                return True
            elif pdu_type == A_ABORT:
                LOGGER.info("association from %s (%s) aborted by the peer", self.calling, self.host)
                return False
            elif pdu_type in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ,
                              A_RELEASE_RP):
                raise _Abort(ABORT_UNEXPECTED_PDU, f"unexpected PDU of type 0x{pdu_type:02X}")
            else:
                raise _Abort(ABORT_UNRECOGNIZED_PDU, f"unrecognized PDU of type 0x{pdu_type:02X}")

    async def _answer_release(self) -> bool:
        self.writer.write(release_rp_pdu())
        await self.writer.drain()
        await self._await_close()
        return True

    async def _await_close(self) -> None:
        """ARTIM after our A-RELEASE-RP: the requestor closes the connection; we close it at expiry."""
        try:
            async with asyncio.timeout(self.edge.limits.artim_s):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            LOGGER.info(
                "association from %s (%s): connection not closed by the peer after release (ARTIM)",
                self.calling, self.host,
            )
        except (ConnectionError, OSError, ssl.SSLError):
            pass

    async def release(self) -> None:
        """Ask the peer to release (shutdown); the association ends when it answers (or at ARTIM)."""
        if not self.is_established or self.is_release_requested():
            return
        await self._idle.wait()
        if self._message is not None or not self.is_established:
            return
        self._release_sent = True
        with contextlib.suppress(Exception):
            self.writer.write(release_rq_pdu())
            await self.writer.drain()

    def abort(self) -> None:
        """A-ABORT the association now (shutdown)."""
        self._send_abort(ABORT_NOT_SPECIFIED)
        if self.task is not None:
            self.task.cancel()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def _on_p_data(self, body: bytes, handlers: Handlers) -> None:
        try:
            pdvs = list(split_pdvs(body))
        except FramingError as exc:
            raise _Abort(ABORT_INVALID_PARAMETER, f"malformed P-DATA-TF: {exc}") from None
        for cx_id, control, fragment in pdvs:
            cx = self.accepted.get(cx_id)
            if cx is None:
                raise _Abort(ABORT_INVALID_PARAMETER, f"PDV on presentation context {cx_id}, not accepted")
            msg = self._message
            if msg is None:
                msg = self._message = _Message(cx_id, self.loop.time())
            elif cx_id != msg.cx_id:
                raise _Abort(ABORT_INVALID_PARAMETER, "PDV of another context in the middle of a message")
            last = bool(control & 0x02)
            if control & 0x01:
                await self._on_command(msg, cx, fragment, last, handlers)
            else:
                if msg.command is None or msg.receiver is None:
                    raise _Abort(ABORT_INVALID_PARAMETER, "data set fragment without its command")
                msg.received += len(fragment)
                msg.receiver.feed(fragment)
                if last:
                    await self._dispatch(msg, cx, handlers)

    async def _on_command(
        self, msg: _Message, cx: PresentationContext, fragment: memoryview, last: bool, handlers: Handlers
    ) -> None:
        if msg.command is not None:
            raise _Abort(ABORT_INVALID_PARAMETER, "command fragment after a complete command")
        if len(msg.command_bytes) + len(fragment) > MAX_COMMAND_BYTES:
            raise _Abort(ABORT_INVALID_PARAMETER, f"command set over {MAX_COMMAND_BYTES} bytes")
        msg.command_bytes += fragment
        msg.command_pdvs += 1
        msg.received += len(fragment)
        if not last:
            return
        raw = bytes(msg.command_bytes)
        repaired = repair_command_set(raw)
        if repaired is not None:
            if msg.command_pdvs > 1:
                raise _Abort(
                    ABORT_INVALID_PARAMETER,
                    "fragmented DIMSE command carries an invalid UID or AE title",
                )
            LOGGER.warning(
                "DIMSE command from %s (%s) carries an invalid UID or AE title: replaced, the request "
                "is refused", self.calling, self.host,
            )
            raw = repaired
        try:
            command = decode_command(raw)
        except FramingError as exc:
            raise _Abort(ABORT_INVALID_PARAMETER, f"malformed DIMSE command: {exc}") from None
        msg.command = command
        try:
            has_data_set = command.has_data_set
        except FramingError as exc:
            raise _Abort(ABORT_INVALID_PARAMETER, f"malformed DIMSE command: {exc}") from None
        if has_data_set:
            msg.receiver = handlers.receiver(self, cx, command)
        else:
            await self._dispatch(msg, cx, handlers)

    async def _dispatch(self, msg: _Message, cx: PresentationContext, handlers: Handlers) -> None:
        command = msg.command
        assert command is not None
        self._message = None
        field_ = command.command_field
        if field_ & 0x8000:  # a response to one of our requests
            waiting = self._waiting.get(command.us(0x0120) or 0)
            if waiting is not None and not waiting.done():
                waiting.set_result(command)
            else:
                LOGGER.warning(
                    "association from %s (%s): unexpected response 0x%04X ignored", self.calling, self.host,
                    field_,
                )
            return
        self._idle.clear()
        try:
            response = await handlers.handle(self, cx, command, msg.receiver)
            if response is not None:
                await self.send(msg.cx_id, response)
        finally:
            self._idle.set()


def _quickack(writer: asyncio.StreamWriter) -> None:
    """Re-arm ``TCP_QUICKACK`` (Linux clears it): a sender with Nagle on is not stalled ~40 ms."""
    if _TCP_QUICKACK is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)


def _close_writer(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


#: Seconds a connection may wait for its A-ASSOCIATE-RQ before it counts as silent: a sender's own new
#: connection may evict it then, and only then (a real sender sends its request at once).
PENDING_GRACE_S: Final = 1.0


@dataclass(eq=False)
class _Pending:
    host: str
    writer: asyncio.StreamWriter
    since: float
    evicted: bool = False


class Edge:
    """The asyncio server: pending connections, TLS, the A-ASSOCIATE-RQ, then :class:`Association`.

    Parameters
    ----------
    handlers:
        The services (association checks, receivers, message handling).
    limits:
        Caps and timers.
    tls:
        The server TLS context, or ``None``.
    on_refused:
        Called with a reason label for each connection refused before an association.
    """

    def __init__(
        self,
        handlers: Handlers,
        limits: EdgeLimits,
        *,
        tls: ssl.SSLContext | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.handlers = handlers
        self.limits = limits
        self.tls = tls
        self.on_refused = on_refused
        self.handshake_failures = 0
        self.closing = False
        self.server: asyncio.Server | None = None
        self.associations: set[Association] = set()
        self._pending: OrderedDict[int, _Pending] = OrderedDict()  # in accept order
        self._pending_ids = itertools.count(1)
        self._warned: dict[tuple[str, str], tuple[float, int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._decoded: OrderedDict[bytes, Request] = OrderedDict()

    async def _decode(self, pdu: bytes) -> Request:
        """``pdu`` decoded by pynetdicom's codec, on a worker thread (it costs milliseconds for a request
        of many contexts); a sender repeating the same request (the usual case) gets the decoded one
        again."""
        cached = self._decoded.get(pdu)
        if cached is not None:
            self._decoded.move_to_end(pdu)
            return cached
        request = await asyncio.to_thread(decode_associate_rq, pdu)
        self._decoded[pdu] = request
        while len(self._decoded) > _CACHED_REQUESTS:
            self._decoded.popitem(last=False)
        return request

    def _stopping(self) -> bool:
        return self.closing

    @property
    def pending(self) -> int:
        """Connections accepted that have not yet delivered their A-ASSOCIATE-RQ."""
        return len(self._pending)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Bind and listen; returns the bound address."""
        self.server = await asyncio.start_server(self._connected, host, port, limit=1024 * 1024, backlog=256)
        bound = self.server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def close(self, wait_s: float) -> None:
        """Stop accepting, drop pending connections, let associations finish within ``wait_s``, then
        ask them to release and abort what remains."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        for entry in list(self._pending.values()):
            entry.evicted = True
            with contextlib.suppress(Exception):
                entry.writer.transport.abort()
        # ask each association to release once it is between messages (PS3.8 A-RELEASE from the
        # acceptor; a crossing request from the peer is a release collision, handled in _serve)
        releasing = [asyncio.create_task(assoc.release()) for assoc in list(self.associations)]
        deadline = time.monotonic() + wait_s
        while self.associations and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in releasing:
            task.cancel()
        for assoc in list(self.associations):
            LOGGER.warning("aborting an association still open at shutdown")
            assoc.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self.server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self.server.wait_closed()
        await asyncio.sleep(0.01)  # closed transports release their sockets on the next iterations

    # -- pending connections -------------------------------------------------------------------------

    def _refused(self, reason: str) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(reason)
            except Exception:
                LOGGER.debug("on_refused failed", exc_info=True)

    def _warn_limited(self, host: str, kind: str, message: str) -> None:
        """WARNING ``message`` at most once per :data:`CAP_WARNING_INTERVAL_S` per source and kind."""
        now = time.monotonic()
        key = (host, kind)
        last, count = self._warned.get(key, (float("-inf"), 0))
        count += 1
        if now - last < CAP_WARNING_INTERVAL_S:
            self._warned[key] = (last, count)
            return
        self._warned[key] = (now, 0)
        if len(self._warned) > 1024:
            for old in [k for k, (t, _) in self._warned.items() if now - t >= CAP_WARNING_INTERVAL_S]:
                self._warned.pop(old, None)
        LOGGER.warning(
            "%s (%d such from %s since the last warning; at most one warning per %.0f s)",
            message, count, host, CAP_WARNING_INTERVAL_S,
        )

    def pending_ages(self, host: str) -> list[float]:
        """Seconds each pending connection from ``host`` has waited, oldest first."""
        now = time.monotonic()
        return [now - e.since for e in self._pending.values() if e.host == host]

    def _admit_pending(self, host: str, writer: asyncio.StreamWriter) -> int | None:
        """A pending slot for a new connection (module doc: this host's silent ones evicted over its
        cap, a burst of young ones let in up to twice it), or ``None`` when it is closed unread."""
        cap = self.limits.max_pending_per_host
        same = [(key, e) for key, e in self._pending.items() if e.host == host]
        now = time.monotonic()
        evicted = 0
        while len(same) >= cap and now - same[0][1].since >= PENDING_GRACE_S:
            key, oldest = same.pop(0)
            oldest.evicted = True
            self._pending.pop(key, None)
            with contextlib.suppress(Exception):
                oldest.writer.transport.abort()
            self._refused("over_pending_per_host")
            evicted += 1
        if evicted:
            self._warn_limited(
                host, "over_pending_per_host",
                f"connection from {host} refused: too many without an A-ASSOCIATE-RQ (cap {cap} per "
                f"source): its pending connections older than {PENDING_GRACE_S:g} s are closed",
            )
        if len(same) >= 2 * cap:
            self._refused("over_pending_per_host")
            self._warn_limited(
                host, "over_pending_per_host_burst",
                f"connection from {host} refused: {len(same)} connections at once without an "
                f"A-ASSOCIATE-RQ (cap {cap} per source, twice that for a burst)",
            )
            return None
        if len(self._pending) >= self.limits.max_pending:
            self._refused("over_pending_total")
            self._warn_limited(
                host, "over_pending_total",
                f"connection from {host} refused: too many without an A-ASSOCIATE-RQ (cap "
                f"{self.limits.max_pending} in total)",
            )
            return None
        key = next(self._pending_ids)
        self._pending[key] = _Pending(host, writer, now)
        return key

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._connection(reader, writer)
            _close_writer(writer)
            with contextlib.suppress(Exception):  # the socket is closed once the loop has run it
                async with asyncio.timeout(2.0):
                    await writer.wait_closed()
        except asyncio.CancelledError:
            _close_writer(writer)
        except Exception:
            LOGGER.exception("connection failed")
            _close_writer(writer)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        host = str(peer[0])
        if self.closing:
            _close_writer(writer)
            return
        key = self._admit_pending(host, writer)
        if key is None:
            writer.transport.abort()
            return
        entry = self._pending[key]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.rq_timeout_s
        try:
            _quickack(writer)
            if self.tls is not None:
                deadline += self.limits.handshake_timeout_s
                if not await self._handshake(writer, host):
                    return
            try:
                first = await read_associate_rq(reader, deadline=deadline, max_bytes=self.limits.max_rq_bytes)
                request = await self._decode(first)
            except Refusal as refusal:
                if not entry.evicted:
                    await self._refuse(reader, writer, host, refusal)
                else:
                    _close_writer(writer)
                return
        finally:
            self._pending.pop(key, None)
        if self._stopping():
            _close_writer(writer)
            return
        try:
            negotiated = self.handlers.admit(request, host)
        except Refusal as refusal:
            await self._refuse(reader, writer, host, refusal, counted=False)
            return
        assoc = Association(self, reader, writer, negotiated, host)
        assoc.task = asyncio.current_task()
        self.associations.add(assoc)
        try:
            await assoc.run(negotiated.ac_pdu, self.handlers)
        finally:
            self.associations.discard(assoc)

    async def _handshake(self, writer: asyncio.StreamWriter, host: str) -> bool:
        """The server side of the TLS handshake within ``handshake_timeout_s``; ``False``: closed."""
        assert self.tls is not None
        try:
            async with asyncio.timeout(self.limits.handshake_timeout_s):
                await writer.start_tls(self.tls, ssl_handshake_timeout=self.limits.handshake_timeout_s)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
            self.handshake_failures += 1
            self._refused("tls_handshake")
            LOGGER.warning("TLS handshake with %s failed: %s", host, type(exc).__name__ + f": {exc}"[:200])
            writer.transport.abort()
            return False
        return True

    async def _refuse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        host: str,
        refusal: Refusal,
        *,
        counted: bool = True,
    ) -> None:
        """Answer (A-ASSOCIATE-RJ / A-ABORT) if the refusal says so, then close; counted and logged."""
        if counted:
            self._refused(refusal.reason)
        if refusal.reason == "closed":
            LOGGER.debug("connection from %s %s", host, refusal.message)
        elif not counted:
            pass  # the handlers logged their own rejection
        elif refusal.reject is not None:
            LOGGER.warning(
                "association from %s rejected %s before the AE check: %s",
                host, refusal.reject, refusal.message,
            )
        elif refusal.reason == "rq_timeout":
            self._warn_limited(host, refusal.reason, f"connection from {host} closed: {refusal.message}")
        else:
            LOGGER.warning("connection from %s closed: %s", host, refusal.message)
        answer = refusal.answer()
        if not answer or refusal.reason in ("rq_too_large", "rq_timeout", "closed"):
            writer.transport.abort()
            return
        try:
            if refusal.reject is not None:
                # A pynetdicom requestor checks that its socket is still connected only after sending
                # its request; an A-ASSOCIATE-RJ answered within that moment makes it close the socket
                # first and report an abort instead of the rejection. A short pause keeps the reason.
                await asyncio.sleep(_REJECT_PAUSE_S)
            writer.write(answer)
            async with asyncio.timeout(2.0):
                await writer.drain()
            if counted:  # before the AE check: let the peer read it and close (like ARTIM)
                async with asyncio.timeout(1.0):
                    left = 64 * 1024
                    while left > 0 and (data := await reader.read(16384)):
                        left -= len(data)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError):
            pass
        _close_writer(writer)
