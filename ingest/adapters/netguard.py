"""Socket-level guards for the pynetdicom listener (RELIABILITY.md "Known traps", DESIGN.md "Performance").

pynetdicom 3.0.4 reads a PDU as ``recv(6)`` (type, reserved, 4-byte length; PS3.8 9.3) and then
``recv(length)``, buffering whatever length the peer declares, 4 KiB at a time, before any
calling-AE check. With TLS on it performs the handshake in the accepting thread without a timeout,
and it sets neither ``TCP_NODELAY`` nor ``TCP_QUICKACK``. This module fixes those at the socket:

- :class:`GuardedSocket` refuses a declared PDU length above a cap before allocating anything for it
  (the connection is closed), reads each PDU into one buffer of the declared size, re-arms
  ``TCP_QUICKACK`` before every read (Linux), and counts the data-set bytes of each P-DATA message:
  past ``max_message_bytes`` the rest of the message's fragments are dropped (their PDV headers are
  kept, so the DIMSE message still ends) and :meth:`GuardedSocket.take_oversized` tells the C-STORE
  handler to answer 0xA700.
- :class:`GuardedServer` accepts without wrapping, then performs the TLS handshake in the
  per-connection thread with a timeout, so a silent client cannot stall other associations.
- :func:`tls_context` builds the server context: TLS 1.2 or newer, optional client certificates.
- :attr:`GuardedServer.on_association` lets the listener adapt each new acceptor association before
  it starts (the listener uses it to receive large data sets to disk).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from copy import deepcopy
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from ingest.config import TLSSettings
from ingest.errors import ConfigError

__all__ = [
    "GuardedRequestHandler",
    "GuardedServer",
    "GuardedSocket",
    "tls_context",
    "tune_socket",
]

LOGGER = logging.getLogger(__name__)

_PDU_HEADER: Final = struct.Struct(">BBL")  # PDU type, reserved, PDU length (PS3.8 9.3.1)
_PDV_HEADER: Final = struct.Struct(">LBB")  # PDV item length, presentation context ID, control header
_P_DATA_TF: Final = 0x04
_TCP_QUICKACK: Final[int | None] = getattr(socket, "TCP_QUICKACK", None)


def tune_socket(sock: socket.socket) -> None:
    """Set ``TCP_NODELAY`` and arm ``TCP_QUICKACK`` (where the platform has it) on a connected socket.

    Without them a sender with Nagle's algorithm on stalls ~40 ms per small C-STORE against delayed
    ACKs (DESIGN.md, Performance facts). Errors are ignored: a socket that refuses is still usable.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _TCP_QUICKACK is not None:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
    except OSError:
        LOGGER.debug("could not tune socket options", exc_info=True)


def tls_context(tls: TLSSettings) -> ssl.SSLContext:
    """The server-side TLS context for ``[listener.tls]`` (DICOM TLS, PS3.15 B.1).

    Parameters
    ----------
    tls:
        The TLS settings; ``cert`` and ``key`` are required, ``ca`` when client certificates are.

    Returns
    -------
    ssl.SSLContext
        TLS 1.2 minimum; ``CERT_REQUIRED`` when ``require_client_cert``, else ``CERT_OPTIONAL`` when a
        ``ca`` is given (a presented certificate is verified), else no client certificate.

    Raises
    ------
    ConfigError
        When the certificate, key or CA bundle cannot be loaded.
    """
    if tls.cert is None or tls.key is None:
        raise ConfigError("[listener.tls] needs cert and key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=Path(tls.cert), keyfile=Path(tls.key))
        if tls.ca is not None:
            ctx.load_verify_locations(cafile=Path(tls.ca))
            ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
        else:
            ctx.verify_mode = ssl.CERT_NONE
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[listener.tls]: cannot load certificate, key or CA bundle: {exc}") from exc
    return ctx


class GuardedSocket(AssociationSocket):
    """An :class:`~pynetdicom.transport.AssociationSocket` with a PDU cap, quick ACKs and a message cap.

    Parameters
    ----------
    assoc, client_socket:
        As for :class:`~pynetdicom.transport.AssociationSocket` (acceptor side only).
    max_pdu_bytes:
        Largest PDU length a peer may declare; above it the connection is closed unread.
    max_message_bytes:
        Largest data set of one DIMSE message kept; the excess is dropped and flagged.
    """

    def __init__(
        self,
        assoc: Any,
        client_socket: socket.socket,
        *,
        max_pdu_bytes: int,
        max_message_bytes: int,
    ) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self.max_pdu_bytes = max_pdu_bytes
        self.max_message_bytes = max_message_bytes
        self._body: bytearray | None = None  # the PDU body read along with its header
        self._message_bytes = 0  # data-set bytes of the DIMSE message being received
        self._oversized = False
        self.refused_pdu_length: int | None = None  # set when a declared length was refused

    def _shutdown_socket(self) -> None:
        """Shut down and close the socket; close it even when the peer already went away.

        pynetdicom closes only if ``shutdown()`` succeeds, so a socket whose peer closed first (ENOTCONN)
        stays open until the garbage collector finds it.
        """
        sock = self.socket
        if sock is not None:
            _close(sock)

    def take_oversized(self) -> bool:
        """Whether the last received message's data set exceeded the cap; resets the flag."""
        flagged, self._oversized = self._oversized, False
        return flagged

    def _read_exactly(self, sock: socket.socket, view: memoryview) -> int:
        """Fill ``view`` from the socket; returns the bytes read (short when the peer closed)."""
        got = 0
        total = len(view)
        while got < total:
            if _TCP_QUICKACK is not None:  # re-armed before each read: the kernel clears it
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            n = sock.recv_into(view[got:], total - got)
            if n == 0:
                break
            got += n
        return got

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` as pynetdicom's DUL asks: a 6-byte PDU header, then the PDU body.

        A header whose declared length exceeds ``max_pdu_bytes`` closes the connection: the DUL then
        gets an empty body, sees a short PDU and ends the association (Evt17) without buffering it.
        """
        sock = self.socket
        if sock is None:
            return bytearray()
        body = self._body
        if body is not None:
            self._body = None
            if len(body) == nr_bytes:
                return body
            LOGGER.error("PDU reader out of step (%d bytes asked, %d held)", nr_bytes, len(body))
            return bytearray()
        if nr_bytes != _PDU_HEADER.size:
            buf = bytearray(nr_bytes)
            return buf[: self._read_exactly(sock, memoryview(buf))]
        header = bytearray(_PDU_HEADER.size)
        if self._read_exactly(sock, memoryview(header)) < len(header):
            return header[:0]
        pdu_type, _, length = _PDU_HEADER.unpack(header)
        if length > self.max_pdu_bytes:
            self.refused_pdu_length = length
            LOGGER.warning(
                "peer declared a PDU of %d bytes (cap %d): connection closed", length, self.max_pdu_bytes
            )
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            self._body = bytearray()  # the DUL's recv(length) gets nothing: short PDU -> Evt17
            return header
        buf = bytearray(length)
        got = self._read_exactly(sock, memoryview(buf))
        if got < length:
            self._body = buf[:got]  # short: pynetdicom reports it and closes
            return header
        if pdu_type == _P_DATA_TF:
            buf = self._account(buf)
            if len(buf) != length:
                header = bytearray(_PDU_HEADER.pack(pdu_type, 0, len(buf)))
        self._body = buf
        return header

    def _account(self, body: bytearray) -> bytearray:
        """Count the data-set bytes of a P-DATA-TF body (PS3.8 9.3.5); drop those past the cap."""
        pos = 0
        end = len(body)
        kept: list[bytes] | None = None
        while pos + _PDV_HEADER.size <= end:
            item_len, cx_id, control = _PDV_HEADER.unpack_from(body, pos)
            item_end = pos + 4 + item_len
            if item_len < 2 or item_end > end:
                return body  # malformed: let pynetdicom report it
            data_len = item_len - 2
            if not control & 0x01:  # a data-set fragment (bit 0 clear, PS3.8 E.2)
                self._message_bytes += data_len
                if self._message_bytes > self.max_message_bytes:
                    self._oversized = True
                    if kept is None:
                        kept = [bytes(body[:pos])]
                    kept.append(_PDV_HEADER.pack(2, cx_id, control))  # the PDV header, data dropped
                    if control & 0x02:
                        self._message_bytes = 0
                    pos = item_end
                    continue
                if control & 0x02:  # last fragment: the next message starts from zero
                    self._message_bytes = 0
            if kept is not None:
                kept.append(bytes(body[pos:item_end]))
            pos = item_end
        if kept is None:
            return body
        return bytearray(b"".join(kept))


class GuardedRequestHandler(RequestHandler):
    """Creates each acceptor :class:`~pynetdicom.association.Association` on a :class:`GuardedSocket`."""

    server: GuardedServer

    def handle(self) -> None:
        """Set up the association on a guarded socket and start its thread (as pynetdicom does)."""
        server = self.server
        assoc = Association(self.ae, "acceptor")
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        sock = GuardedSocket(
            assoc,
            self.request,
            max_pdu_bytes=server.max_pdu_bytes,
            max_message_bytes=server.max_message_bytes,
        )
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = AddressInformation.from_tuple(server.server_address)
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(server.contexts)
        assoc.requestor.address_info = AddressInformation.from_tuple(self.client_address)
        if server.on_association is not None:
            server.on_association(assoc)
        for event, bound in server._handlers.items():
            if event.is_intervention and bound:
                assoc.bind(event, *bound)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in bound:  # type: ignore[misc]
                    assoc.bind(event, handler, args)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()


class GuardedServer(ThreadedAssociationServer):
    """A threaded association server: no TLS work in the accept loop, a handshake timeout per connection.

    Set these after construction (:func:`ingest.adapters.listener.start_listener` does):
    ``max_pdu_bytes``, ``max_message_bytes``, ``tls`` (an :class:`ssl.SSLContext` or ``None``),
    ``handshake_timeout_s``, ``io_timeout_s`` (socket timeout for reads after the handshake) and
    ``on_association`` (called with each new acceptor association before its thread starts).
    """

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.max_pdu_bytes = 4 * 1024 * 1024
        self.max_message_bytes = 2 * 1024**3
        self.tls: ssl.SSLContext | None = None
        self.handshake_timeout_s = 10.0
        self.io_timeout_s: float | None = None
        self.closing = threading.Event()
        self.handshake_failures = 0
        self.on_association: Callable[[Association], None] | None = None
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; TLS (if any) is done later, in the connection's own thread."""
        assert self.socket is not None
        client, address = self.socket.accept()
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Per-connection thread: tune the socket, handshake with a timeout, then start the association."""
        sock: socket.socket = request
        try:
            tune_socket(sock)
            if self.tls is not None:
                sock.settimeout(self.handshake_timeout_s)
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                try:
                    sock.do_handshake()
                except (OSError, ssl.SSLError) as exc:
                    self.handshake_failures += 1
                    LOGGER.warning("TLS handshake with %s failed: %s", client_address[0], exc)
                    _close(sock)
                    return
            sock.settimeout(self.io_timeout_s)
            if self.closing.is_set():
                _close(sock)
                return
            self.finish_request(sock, client_address)
        except Exception:
            LOGGER.exception("could not start an association with %s", client_address[0])
            _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
