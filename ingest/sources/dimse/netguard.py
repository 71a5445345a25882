"""Socket-level guards for the pynetdicom listener, and every hook into pynetdicom internals.

This is the one module of ``ingest`` that touches pynetdicom internals (names outside its public API
of AE, events, presentation contexts, SOP classes and Dataset answers); docs/architecture.md, "The
tree". Each hook names the pynetdicom function or attribute it stands in for or relies on, and every
such name is listed in :data:`PYNETDICOM_HOOKS`, which the tests check against the installed
pynetdicom (a pynetdicom upgrade means re-checking this module only). The hooks:

- :class:`GuardedRequestHandler` is a copy of ``pynetdicom.transport.RequestHandler.handle`` /
  ``_create_association`` that puts each acceptor association on a :class:`GuardedSocket`.
- :class:`GuardedServer` overrides ``ThreadedAssociationServer.get_request`` / ``process_request`` /
  ``process_request_thread`` / ``server_close``; :class:`GuardedSocket` overrides
  ``AssociationSocket.recv`` / ``ready`` / ``_shutdown_socket`` and relies on the DUL reading a PDU
  as ``recv(6)`` then ``recv(length)``.
- :func:`check_associate_rq` and :func:`repair_command_set` stand in for checks that make
  pynetdicom's decoders raise (see below).
- :func:`divert_large_data_sets` wraps ``DIMSEServiceProvider.receive_primitive`` and sets
  ``DIMSEMessage._data_set_file`` / ``_data_set_path`` (a :class:`DataSetSink`);
  :func:`received_data_set_file` reads it back from the C-STORE primitive (``_dataset_file``);
  :func:`accepted_transfer_syntax` reads ``Association._accepted_cx``.
- :func:`message_was_oversized` reads ``Association.dul.socket`` (a :class:`GuardedSocket`).
- :func:`register_server` appends to ``ApplicationEntity._servers``.
- :func:`reject_association` replays ``ACSE._negotiate_as_acceptor``'s reject sequence
  (``acse.send_reject``, ``evt.trigger(EVT_REJECTED)``, ``Association.kill``).
- :func:`service_class_for` and :func:`route_storage_classes` rely on ``uid_to_service_class``
  returning the base ``ServiceClass`` and on ``Association._serve_request`` reading
  ``accepted_common_extended`` first (EVT_SOP_COMMON routing).
- :func:`quiet_pynetdicom_logging` sets ``pynetdicom._config.LOG_HANDLER_LEVEL``.
- :class:`_Acceptor` stands in for ``Association._run_reactor`` (acceptor side: the same steps, waiting
  on ``dimse.msg_queue`` instead of sleeping 1 ms per pass); :meth:`GuardedSocket.wake_dul_on_send` sets
  the DUL's ``_run_loop_delay`` to 0 and replaces its ``to_provider_queue``, relying on its loop
  reading the socket through ``ready`` (docs/architecture.md, "Performance facts").
- :func:`fast_store_responses` replaces an association's ``DIMSEServiceProvider.send_msg`` for C-STORE
  responses, which :func:`encode_store_response` encodes by hand (byte for byte pynetdicom's encoding).

Socket-level guards (docs/reliability.md, "Security rules"). pynetdicom 3.0.4 reads a PDU as ``recv(6)``
(type, reserved, 4-byte length; PS3.8 9.3) and then ``recv(length)``, buffering whatever length the peer
declares, 4 KiB at a time, before any calling-AE check. It starts an acceptor thread, which counts
toward the association limit, as soon as a TCP connection is accepted, and waits ``acse_timeout`` for
the A-ASSOCIATE-RQ however slowly it trickles in. With TLS on it performs the handshake in the accepting
thread without a timeout, and it sets neither ``TCP_NODELAY`` nor ``TCP_QUICKACK``. Some malformed
fields make its decoder raise in the reader thread (an abort and a logged traceback, with the raw value
in the log). This module fixes those at the socket:

- :class:`GuardedServer` keeps a connection *pending* until its A-ASSOCIATE-RQ has been read: pending
  connections are capped per source address and in total (over the cap: closed at once, counted, and
  logged at most once a minute per source), and each must deliver its complete A-ASSOCIATE-RQ, at most
  ``max_rq_bytes`` long, before an absolute deadline from accept time (a trickle does not extend it).
  Only then is the pynetdicom association (and its thread) created, so pending connections never hold
  an association slot. The TLS handshake runs in the per-connection thread against a deadline too.
- :func:`check_associate_rq` validates the A-ASSOCIATE-RQ (PS3.8 9.3.2) before pynetdicom decodes it:
  an invalid calling / called AE title gets A-ASSOCIATE-RJ (1,1,3) / (1,1,7), an even presentation
  context ID or an invalid UID (1,2,1), broken item framing an A-ABORT; the log shows escaped values.
- :class:`GuardedSocket` refuses a declared PDU length above a cap before allocating anything for it
  (the connection is closed), reads each PDU into one buffer of the declared size, re-arms
  ``TCP_QUICKACK`` before every read (Linux), and counts the data-set bytes of each P-DATA message:
  past ``max_message_bytes`` the rest of the message's fragments are dropped (their PDV headers are
  kept, so the DIMSE message still ends) and :meth:`GuardedSocket.take_oversized` tells the C-STORE
  handler to answer 0xA700. A DIMSE command set with an over-long or non-printable UID, or an invalid
  Move Originator AE title, is repaired by :func:`repair_command_set` (the UID becomes a fresh
  ``2.25`` UID that no data set carries, so the C-STORE is refused cleanly with 0xA900, or 0xC003 when
  the data set's own UID is invalid); a command split over several fragments is aborted instead.
- :func:`tls_context` builds the server context: TLS 1.2 or newer, optional client certificates.
- :attr:`GuardedServer.on_association` lets the listener adapt each new acceptor association before
  it starts (the listener uses it with :func:`divert_large_data_sets` to receive large data sets to
  disk).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any, Final, Protocol, cast

from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID
from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu_primitives import P_DATA, SOPClassCommonExtendedNegotiation
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from ingest.config import TLSSettings
from ingest.errors import ConfigError

__all__ = [
    "PYNETDICOM_HOOKS",
    "STORAGE_SERVICE_CLASS",
    "DataSetSink",
    "GuardedRequestHandler",
    "GuardedServer",
    "GuardedSocket",
    "Hook",
    "Refusal",
    "accepted_transfer_syntax",
    "check_associate_rq",
    "divert_large_data_sets",
    "message_was_oversized",
    "quiet_pynetdicom_logging",
    "read_associate_rq",
    "received_data_set_file",
    "register_server",
    "reject_association",
    "repair_command_set",
    "route_storage_classes",
    "service_class_for",
    "tls_context",
    "tune_socket",
]

LOGGER = logging.getLogger(__name__)

_PDU_HEADER: Final = struct.Struct(">BBL")  # PDU type, reserved, PDU length (PS3.8 9.3.1)
_PDV_HEADER: Final = struct.Struct(">LBB")  # PDV item length, presentation context ID, control header
_P_DATA_TF: Final = 0x04
_TCP_QUICKACK: Final[int | None] = getattr(socket, "TCP_QUICKACK", None)
#: Longest an idle association's DUL thread waits in ``select`` before it looks at its timers and its
#: stop flag again (it wakes at once for data from the peer or a PDU to send).
_IDLE_WAIT_S: Final = 0.005
#: Longest the association thread waits for a DIMSE message before it looks for a release, an abort or
#: the idle timeout again (it wakes at once for a message and for an abort; see _Acceptor).
_REACTOR_WAIT_S: Final = 0.005

_A_ASSOCIATE_RQ: Final = 0x01
_A_ASSOCIATE_RJ: Final = 0x03
_A_ABORT: Final = 0x07
_PDU_TYPES: Final = frozenset(range(0x01, 0x08))  # A-ASSOCIATE-RQ .. A-ABORT (PS3.8 9.3.1)
_RQ_FIXED: Final = 68  # A-ASSOCIATE-RQ body bytes before the variable items (PS3.8 Table 9-11)
_ITEM_HEADER: Final = struct.Struct(">BBH")  # item type, reserved, item length (PS3.8 9.3.2)
# A-ABORT reasons (PS3.8 Table 9-26), source 2 = service provider
ABORT_UNRECOGNIZED_PDU: Final = 0x01
ABORT_UNEXPECTED_PDU: Final = 0x02
ABORT_UNRECOGNIZED_PARAMETER: Final = 0x04
ABORT_INVALID_PARAMETER: Final = 0x06
# A-ASSOCIATE-RJ (result, source, reason) (PS3.8 Table 9-21)
REJECT_CALLING_AE: Final = (0x01, 0x01, 0x03)
REJECT_CALLED_AE: Final = (0x01, 0x01, 0x07)
REJECT_NO_REASON: Final = (0x01, 0x02, 0x01)

# Sub-items pynetdicom decodes in a presentation context (abstract / transfer syntax) and in the user
# information item (0x51-0x58, PS3.7 D.3.3); any other type makes its decoder raise (KeyError).
_CONTEXT_SUB_ITEMS: Final = frozenset({0x30, 0x40})
_USER_SUB_ITEMS: Final = frozenset(range(0x51, 0x59))
_MAX_UID: Final = 64  # UI VR (PS3.5 Table 6.2-1)
_MAX_AE: Final = 16  # AE VR

# Command set elements (PS3.7 E.1) whose UI / AE values pynetdicom validates while decoding.
_COMMAND_UIDS: Final = frozenset({0x0002, 0x0003, 0x1000, 0x1001})  # (0000,xxxx) UI
_MOVE_ORIGINATOR_AE: Final = 0x1030  # (0000,1030) AE
_COMMAND_ELEMENT: Final = struct.Struct("<HHL")  # implicit VR little endian (PS3.7 6.3.1)
_MAX_COMMAND_BYTES: Final = 64 * 1024  # a fragmented command set is checked up to this size

#: Seconds between two WARNING lines about the same source address being over the pending cap.
CAP_WARNING_INTERVAL_S: Final = 60.0


class Refusal(Exception):
    """Why a connection is refused before pynetdicom sees its A-ASSOCIATE-RQ.

    Parameters
    ----------
    reason:
        A short metric label (``rq_timeout``, ``rq_too_large``, ``invalid_calling_ae``, ...).
    message:
        What happened, for the log (untrusted values already escaped).
    reject:
        ``(result, source, reason)`` of an A-ASSOCIATE-RJ to send, or ``None``.
    abort:
        The reason of an A-ABORT (source 2) to send, or ``None``; neither: the connection is closed.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        reject: tuple[int, int, int] | None = None,
        abort: int | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.reject = reject
        self.abort = abort

    def answer(self) -> bytes:
        """The PDU to send before closing: A-ASSOCIATE-RJ (PS3.8 9.3.4), A-ABORT (9.3.8) or nothing."""
        if self.reject is not None:
            return struct.pack(">BBLBBBB", _A_ASSOCIATE_RJ, 0, 4, 0, *self.reject)
        if self.abort is not None:
            return abort_pdu(self.abort)
        return b""


def abort_pdu(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider (source 2) with ``reason`` (PS3.8 9.3.8)."""
    return struct.pack(">BBLBBBB", _A_ABORT, 0, 4, 0, 0, 0x02, reason)


def escaped(raw: bytes | bytearray) -> str:
    """``raw`` as a quoted, escaped string for a log line: control characters never appear raw."""
    return ascii(bytes(raw).decode("latin-1"))


def _valid_ae(raw: bytes) -> bool:
    """PS3.5 AE VR: default repertoire without backslash or control characters, not all spaces."""
    value = raw.strip(b" ")
    return 0 < len(value) <= _MAX_AE and all(0x20 <= b <= 0x7E and b != 0x5C for b in value)


def _valid_uid(raw: bytes, *, allow_empty: bool = True) -> bool:
    """A UID value pynetdicom can decode without raising: at most 64 printable ASCII characters.

    Trailing NUL and space padding (PS3.5 9.1, PS3.8 Annex F) is not part of the value.
    """
    value = raw.rstrip(b"\0 ")
    if not value:
        return allow_empty
    return len(value) <= _MAX_UID and all(0x21 <= b <= 0x7E for b in value)


def _items(data: bytes, start: int, where: str) -> list[tuple[int, bytes]]:
    """Split ``data[start:]`` into ``(item type, item value)`` pairs; broken framing is refused."""
    items: list[tuple[int, bytes]] = []
    pos = start
    end = len(data)
    while pos < end:
        if pos + _ITEM_HEADER.size > end:
            raise Refusal("malformed_rq", f"{where}: truncated item header", abort=ABORT_INVALID_PARAMETER)
        item_type, _, length = _ITEM_HEADER.unpack_from(data, pos)
        pos += _ITEM_HEADER.size
        if pos + length > end:
            raise Refusal(
                "malformed_rq", f"{where}: item 0x{item_type:02X} runs past its parent",
                abort=ABORT_INVALID_PARAMETER,
            )
        items.append((item_type, data[pos : pos + length]))
        pos += length
    return items


def _uid_or_refuse(raw: bytes, what: str, *, allow_empty: bool = True) -> None:
    if not _valid_uid(raw, allow_empty=allow_empty):
        raise Refusal(
            "invalid_uid", f"{what} {escaped(raw[:80])} is not a valid UID", reject=REJECT_NO_REASON
        )


def _check_context(value: bytes) -> None:
    """A presentation context item (PS3.8 9.3.2.2): odd ID (PS3.8 9.3.2.2 note), one abstract syntax."""
    if len(value) < 4:
        raise Refusal("malformed_rq", "presentation context item too short", abort=ABORT_INVALID_PARAMETER)
    cx_id = value[0]
    if cx_id % 2 == 0:
        # stands in for pynetdicom.presentation.PresentationContext.context_id (its setter raises)
        raise Refusal(
            "even_context_id", f"presentation context ID {cx_id} is even (must be odd, PS3.8 9.3.2.2)",
            reject=REJECT_NO_REASON,
        )
    abstract = 0
    for sub_type, sub in _items(value, 4, f"presentation context {cx_id}"):
        if sub_type not in _CONTEXT_SUB_ITEMS:
            raise Refusal(
                "malformed_rq", f"presentation context {cx_id}: unknown sub-item 0x{sub_type:02X}",
                abort=ABORT_UNRECOGNIZED_PARAMETER,
            )
        abstract += sub_type == 0x30
        _uid_or_refuse(sub, "abstract syntax" if sub_type == 0x30 else "transfer syntax")
    if abstract != 1:
        raise Refusal(
            "malformed_rq", f"presentation context {cx_id} has {abstract} abstract syntaxes",
            reject=REJECT_NO_REASON,
        )


def _uid_field(value: bytes, pos: int, what: str) -> int:
    """Check a 2-byte-length-prefixed UID at ``pos`` (user information sub-items); returns its end."""
    if pos + 2 > len(value):
        raise Refusal("malformed_rq", f"{what}: truncated", abort=ABORT_INVALID_PARAMETER)
    (length,) = struct.unpack_from(">H", value, pos)
    end = pos + 2 + int(length)
    if end > len(value):
        raise Refusal("malformed_rq", f"{what}: UID runs past the sub-item", abort=ABORT_INVALID_PARAMETER)
    _uid_or_refuse(value[pos + 2 : end], what)
    return end


def _check_user_info(value: bytes) -> None:
    """The user information item (PS3.8 9.3.2.3, PS3.7 D.3.3): known sub-items, valid UIDs and names."""
    for sub_type, sub in _items(value, 0, "user information"):
        if sub_type not in _USER_SUB_ITEMS:
            raise Refusal(
                "malformed_rq", f"user information: unknown sub-item 0x{sub_type:02X}",
                abort=ABORT_UNRECOGNIZED_PARAMETER,
            )
        if sub_type in (0x51, 0x53) and len(sub) != 4:  # maximum length, asynchronous operations window
            raise Refusal(
                "malformed_rq", f"user information: sub-item 0x{sub_type:02X} is not 4 bytes",
                abort=ABORT_INVALID_PARAMETER,
            )
        if sub_type == 0x52:  # implementation class UID
            _uid_or_refuse(sub, "implementation class UID")
        elif sub_type == 0x55 and not _valid_ae(sub):  # implementation version name: AE-like (1-16)
            raise Refusal(
                "invalid_rq", f"implementation version name {escaped(sub[:80])} is invalid",
                reject=REJECT_NO_REASON,
            )
        elif sub_type in (0x54, 0x56, 0x57):  # role selection, SOP class (common) extended negotiation
            end = _uid_field(sub, 0, "SOP class UID of a negotiation sub-item")
            if sub_type == 0x54 and (len(sub) != end + 2 or sub[end] > 1 or sub[end + 1] > 1):
                raise Refusal(
                    "malformed_rq", "role selection sub-item: SCU/SCP roles must be 0 or 1",
                    abort=ABORT_INVALID_PARAMETER,
                )
            if sub_type == 0x57:
                end = _uid_field(sub, end, "service class UID")
                if end + 2 > len(sub):
                    raise Refusal(
                        "malformed_rq", "common extended negotiation sub-item truncated",
                        abort=ABORT_INVALID_PARAMETER,
                    )
                (related,) = struct.unpack_from(">H", sub, end)
                pos, stop = end + 2, end + 2 + related
                if stop > len(sub):
                    raise Refusal(
                        "malformed_rq", "related general SOP classes run past the sub-item",
                        abort=ABORT_INVALID_PARAMETER,
                    )
                while pos < stop:
                    pos = _uid_field(sub[:stop], pos, "related general SOP class UID")


def check_associate_rq(pdu: bytes) -> None:
    """Validate an A-ASSOCIATE-RQ PDU (header included) before pynetdicom decodes it.

    Checks what pynetdicom 3.0.x would otherwise raise on in its reader thread (an abort with a
    logged traceback and the raw value): the calling and called AE titles (PS3.5 AE VR; checked here
    even when any calling AE is accepted), the item framing (PS3.8 9.3.2), odd presentation context
    IDs, UIDs of at most 64 printable characters, and the user information sub-items.

    Parameters
    ----------
    pdu:
        The whole PDU: the 6-byte header and the body it declares.

    Raises
    ------
    Refusal
        With the A-ASSOCIATE-RJ or A-ABORT to answer: calling AE invalid (1,1,3), called AE invalid
        (1,1,7), an even presentation context ID or an invalid UID (1,2,1), broken framing A-ABORT.
    """
    body = pdu[_PDU_HEADER.size :]
    if len(body) < _RQ_FIXED:
        raise Refusal(
            "malformed_rq", "A-ASSOCIATE-RQ shorter than its fixed fields", abort=ABORT_INVALID_PARAMETER
        )
    called, calling = body[4:20], body[20:36]
    if not _valid_ae(calling):
        # stands in for pynetdicom.pdu.A_ASSOCIATE_RQ.calling_ae_title (pynetdicom.utils.set_ae raises)
        raise Refusal(
            "invalid_calling_ae", f"calling AE title {escaped(calling.rstrip(b' '))} is not a valid AE title",
            reject=REJECT_CALLING_AE,
        )
    if not _valid_ae(called):
        raise Refusal(
            "invalid_called_ae", f"called AE title {escaped(called.rstrip(b' '))} is not a valid AE title",
            reject=REJECT_CALLED_AE,
        )
    contexts = 0
    for item_type, value in _items(body, _RQ_FIXED, "A-ASSOCIATE-RQ"):
        if item_type == 0x10:  # application context name (PS3.8 9.3.2.1)
            _uid_or_refuse(value, "application context name", allow_empty=False)
        elif item_type == 0x20:
            contexts += 1
            _check_context(value)
        elif item_type == 0x50:
            _check_user_info(value)
        else:  # stands in for pynetdicom.pdu.PDU._wrap_generate_items (KeyError on an unknown type)
            raise Refusal(
                "malformed_rq", f"A-ASSOCIATE-RQ: unknown item 0x{item_type:02X}",
                abort=ABORT_UNRECOGNIZED_PARAMETER,
            )
    if contexts == 0:
        raise Refusal("malformed_rq", "A-ASSOCIATE-RQ without presentation contexts", reject=REJECT_NO_REASON)


def _read_before(sock: socket.socket, size: int, deadline: float) -> bytes:
    """Read ``size`` bytes before the monotonic ``deadline`` (short when the peer closed).

    Each ``recv`` gets only the time left, so a peer trickling bytes cannot extend the deadline.

    Raises
    ------
    TimeoutError
        When the deadline passes first.
    """
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        sock.settimeout(left)
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            break
        got += n
    return bytes(buf[:got])


def read_associate_rq(sock: socket.socket, *, deadline: float, max_bytes: int) -> bytes:
    """Read and check the first PDU of a connection: a complete A-ASSOCIATE-RQ before ``deadline``.

    Parameters
    ----------
    sock:
        The accepted (and, with TLS, handshaken) connection.
    deadline:
        ``time.monotonic()`` value by which the whole PDU must have arrived.
    max_bytes:
        Largest A-ASSOCIATE-RQ body accepted; a longer declared length is refused unread.

    Returns
    -------
    bytes
        The whole PDU (header and body), checked by :func:`check_associate_rq`.

    Raises
    ------
    Refusal
        When the connection must be answered (A-ASSOCIATE-RJ / A-ABORT) or closed instead.
    """
    try:
        header = _read_before(sock, _PDU_HEADER.size, deadline)
        if len(header) < _PDU_HEADER.size:
            raise Refusal("closed", "closed before sending an A-ASSOCIATE-RQ")
        pdu_type, _, length = _PDU_HEADER.unpack(header)
        if pdu_type == _A_ABORT:
            raise Refusal("not_associate_rq", "aborted before associating")
        if pdu_type != _A_ASSOCIATE_RQ:  # PS3.8 9.2 state Sta2: anything else -> AA-1
            known = pdu_type in _PDU_TYPES
            raise Refusal(
                "not_associate_rq",
                f"first PDU is of type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ",
                abort=ABORT_UNEXPECTED_PDU if known else ABORT_UNRECOGNIZED_PDU,
            )
        if length > max_bytes:
            raise Refusal("rq_too_large", f"A-ASSOCIATE-RQ of {length} bytes declared (cap {max_bytes})")
        body = _read_before(sock, length, deadline)
    except TimeoutError:
        raise Refusal("rq_timeout", "no complete A-ASSOCIATE-RQ before the deadline") from None
    except OSError as exc:
        raise Refusal("closed", f"connection failed before the A-ASSOCIATE-RQ: {exc}") from None
    if len(body) < length:
        raise Refusal("closed", "closed in the middle of its A-ASSOCIATE-RQ")
    pdu = header + body
    check_associate_rq(pdu)
    return pdu


def repair_command_set(command: bytes) -> bytes | None:
    """A DIMSE command set (implicit VR little endian, PS3.7 6.3.1) fixed so pynetdicom can decode it.

    An Affected/Requested SOP Class/Instance UID longer than 64 characters or not printable makes
    pynetdicom's decoder raise (a logged traceback and an abort); such a UID is replaced by a fresh
    ``2.25`` UUID-derived UID (PS3.5 B.2) that no data set carries, so the C-STORE handler answers a
    clean failure. An invalid Move Originator AE title (0000,1030) is dropped. Command Group Length
    (0000,0000) is recomputed.

    Parameters
    ----------
    command:
        The command set's bytes.

    Returns
    -------
    bytes or None
        The repaired command set, or ``None`` when nothing needed repair (or it cannot be parsed:
        pynetdicom then reports it as it does today).
    """
    elements: list[tuple[int, bytes]] = []
    changed = False
    pos = 0
    end = len(command)
    while pos < end:
        if pos + _COMMAND_ELEMENT.size > end:
            return None
        group, element, length = _COMMAND_ELEMENT.unpack_from(command, pos)
        pos += _COMMAND_ELEMENT.size
        if group != 0x0000 or pos + length > end:
            return None
        value = command[pos : pos + length]
        pos += length
        if element in _COMMAND_UIDS and not _valid_uid(value):
            # stands in for pynetdicom.utils.set_uid (raises), called from
            # pynetdicom.dimse_messages.DIMSEMessage.message_to_primitive
            uid = f"2.25.{uuid.uuid4().int}".encode("ascii")
            value = uid + b"\0" * (len(uid) % 2)
            changed = True
        elif element == _MOVE_ORIGINATOR_AE and value.strip(b" \0") and not _valid_ae(value.rstrip(b"\0")):
            changed = True  # stands in for pynetdicom.utils.set_ae (raises on control characters)
            continue
        elements.append((element, value))
    if not changed:
        return None
    rest = b"".join(
        _COMMAND_ELEMENT.pack(0, element, len(value)) + value for element, value in elements if element != 0
    )
    return _COMMAND_ELEMENT.pack(0, 0, 4) + struct.pack("<L", len(rest)) + rest


def tune_socket(sock: socket.socket) -> None:
    """Set ``TCP_NODELAY`` and arm ``TCP_QUICKACK`` (where the platform has it) on a connected socket.

    Without them a sender with Nagle's algorithm on stalls ~40 ms per small C-STORE against delayed
    ACKs. Errors are ignored: a socket that refuses is still usable.
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


class _WakingQueue(queue.Queue[Any]):
    """A queue that calls ``wake`` after each ``put`` (a DUL's ``to_provider_queue``)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


def _wait_for_item(q: queue.Queue[Any], timeout: float) -> bool:
    """Wait up to ``timeout`` until ``q`` holds an item, without taking it; whether it does."""
    # relies on queue.Queue's not_empty condition and _qsize (CPython's queue module)
    with q.not_empty:
        if not q._qsize():
            q.not_empty.wait(timeout)
        return bool(q._qsize())


class _Acceptor(Association):
    """An acceptor association whose thread waits for the next DIMSE message instead of polling for it.

    pynetdicom's acceptor loop sleeps 1 ms before each look at its message queue, so every request waits
    up to 1 ms before its handler runs and an idle association wakes 1,000 times a second. This loop
    takes the same steps in the same order, but waits on the queue (up to ``_REACTOR_WAIT_S``, then it
    looks for a release, an abort, a dead DUL and the idle timeout, as pynetdicom does). pynetdicom puts
    an empty item on the queue when the association is aborted, which wakes the wait at once. It takes
    a message only while no handler has paused it (``send_n_event_report`` on this association waits
    for its own response on the same queue).
    """

    def _run_reactor(self) -> None:
        # stands in for pynetdicom.association.Association._run_reactor (pynetdicom 3.0), acceptor side
        self._is_paused = False
        while not self._kill:
            # the pause that lets a handler send on this association (send_n_event_report) comes first
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = None, None
            # wait for a message without taking it, then take it only if no handler paused the loop
            # meanwhile (a response to what that handler sends is the handler's: pynetdicom takes it
            # off the queue itself); the window left is pynetdicom's own, between its pause check and get
            if _wait_for_item(self.dimse.msg_queue, _REACTOR_WAIT_S) and self._reactor_checkpoint.is_set():
                context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOGGER.debug("association released by the peer")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires for the abort
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


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
    first_pdu:
        The A-ASSOCIATE-RQ already read and checked by :class:`GuardedServer`; handed to the DUL as
        the first PDU it reads.
    """

    def __init__(
        self,
        assoc: Any,
        client_socket: socket.socket,
        *,
        max_pdu_bytes: int,
        max_message_bytes: int,
        first_pdu: bytes | None = None,
    ) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self.max_pdu_bytes = max_pdu_bytes
        self.max_message_bytes = max_message_bytes
        self._first = first_pdu
        self._body: bytearray | None = None  # the PDU body read along with its header
        self._message_bytes = 0  # data-set bytes of the DIMSE message being received
        self._oversized = False
        self._command: bytearray | None = None  # fragments of a command set split over several PDVs
        self._aborting = False  # set when the peer must be aborted after this PDU
        self.refused_pdu_length: int | None = None  # set when a declared length was refused
        self._wake_r: socket.socket | None = None  # see wake_dul_on_send
        self._wake_w: socket.socket | None = None

    def wake_dul_on_send(self, dul: Any) -> None:
        """Make the association's DUL thread wait for work instead of polling for it.

        pynetdicom's DUL loop polls: ``select`` with no timeout, then ``time.sleep(_run_loop_delay)``
        (1 ms) whenever a pass found nothing, so each answer waits up to 1 ms to be sent and each request
        up to 1 ms to be read. Here the loop does not sleep; :attr:`ready` waits in ``select`` on the
        socket and on a wake-up socket pair that every PDU queued for sending (``to_provider_queue``)
        writes to, for at most ``_IDLE_WAIT_S``. Call before the association starts.
        """
        # relies on pynetdicom.dul.DULServiceProvider.run_reactor sleeping _run_loop_delay between idle
        # passes and reading the socket through .ready, and send_pdu putting on to_provider_queue
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        dul.to_provider_queue = _WakingQueue(self._wake)
        dul._run_loop_delay = 0.0

    def _wake(self) -> None:
        wake = self._wake_w
        if wake is not None:
            with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
                wake.send(b"\0")

    @property
    def ready(self) -> bool:
        """Whether a PDU can be read: the held A-ASSOCIATE-RQ, or data on the socket.

        Stands in for ``pynetdicom.transport.AssociationSocket.ready`` (a ``select`` on the socket,
        which cannot see a PDU already read); after :meth:`wake_dul_on_send`, one ``select`` that waits
        on the socket and the wake-up pair, and pynetdicom's check only for a closed socket.
        """
        if self._first is not None:
            return True
        wake, sock = self._wake_r, self.socket
        if wake is None or sock is None or not self._is_connected:
            return bool(super().ready)
        if isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted data select cannot see (#528)
            return True
        try:
            woken, _, _ = select.select([sock, wake], [], [], _IDLE_WAIT_S)
        except (OSError, ValueError):  # closed meanwhile: pynetdicom's own check reports Evt17
            return bool(super().ready)
        if wake in woken:
            with contextlib.suppress(OSError):
                wake.recv(4096)
        return sock in woken

    def _shutdown_socket(self) -> None:
        """Shut down and close the socket; close it even when the peer already went away.

        pynetdicom closes only if ``shutdown()`` succeeds, so a socket whose peer closed first (ENOTCONN)
        stays open until the garbage collector finds it.
        """
        # stands in for pynetdicom.transport.AssociationSocket._shutdown_socket (called by .close)
        sock = self.socket
        if sock is not None:
            _close(sock)
        for pair in (self._wake_r, self._wake_w):
            if pair is not None:
                pair.close()  # a later wake-up fails quietly on the closed socket object

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
        # Stands in for pynetdicom.transport.AssociationSocket.recv; relies on
        # pynetdicom.dul.DULServiceProvider._read_pdu_data calling recv(6), then recv(pdu_length).
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
        first = self._first
        if first is not None and nr_bytes == _PDU_HEADER.size:
            self._first = None
            self._body = bytearray(first[_PDU_HEADER.size :])
            return bytearray(first[: _PDU_HEADER.size])
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
            if self._aborting:
                return self._abort(sock)
            if len(buf) != length:
                header = bytearray(_PDU_HEADER.pack(pdu_type, 0, len(buf)))
        self._body = buf
        return header

    def _abort(self, sock: socket.socket) -> bytearray:
        """A-ABORT the peer and hand the DUL an A-ABORT PDU in place of the one just read.

        The DUL then ends the association as for a peer's abort (PS3.8 9.2, AA-3): no exception in
        pynetdicom's reader thread.
        """
        self._aborting = False
        with contextlib.suppress(OSError):
            sock.sendall(abort_pdu(ABORT_INVALID_PARAMETER))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        pdu = abort_pdu(ABORT_INVALID_PARAMETER)
        self._body = bytearray(pdu[_PDU_HEADER.size :])
        return bytearray(pdu[: _PDU_HEADER.size])

    def _check_command(self, fragment: bytes, cx_id: int, control: int) -> bytes | None:
        """Check a command-set fragment (PS3.8 E.2); returns a replacement PDV, or ``None`` to keep it.

        A command set in one PDV (the usual case) is repaired in place (:func:`repair_command_set`);
        one split over several PDVs, whose first fragments pynetdicom already holds, is aborted.
        """
        last = bool(control & 0x02)
        if self._command is None and last:
            repaired = repair_command_set(fragment)
            if repaired is None:
                return None
            LOGGER.warning(
                "DIMSE command from %s carries an invalid UID or AE title: replaced, the request is refused",
                self._peer(),
            )
            return _PDV_HEADER.pack(len(repaired) + 2, cx_id, control) + repaired
        held = self._command if self._command is not None else bytearray()
        if len(held) + len(fragment) <= _MAX_COMMAND_BYTES:
            held += fragment
        self._command = None if last else held
        if last and len(held) <= _MAX_COMMAND_BYTES and repair_command_set(bytes(held)) is not None:
            LOGGER.warning(
                "fragmented DIMSE command from %s carries an invalid UID or AE title: association aborted",
                self._peer(),
            )
            self._aborting = True
        return None

    def _peer(self) -> str:
        with contextlib.suppress(Exception):
            return str(self.assoc.requestor.address)
        return "?"

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
            if control & 0x01:  # a command fragment (bit 0 set, PS3.8 E.2)
                replacement = self._check_command(bytes(body[pos + 6 : item_end]), cx_id, control)
                if replacement is not None:
                    if kept is None:
                        kept = [bytes(body[:pos])]
                    kept.append(replacement)
                    pos = item_end
                    continue
            else:  # a data-set fragment
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
        # Stands in for pynetdicom.transport.RequestHandler.handle and ._create_association (pynetdicom
        # 3.0); relies on Association._server and AssociationServer._handlers.
        server = self.server
        assoc = _Acceptor(self.ae, "acceptor")
        fast_store_responses(assoc)
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        sock = GuardedSocket(
            assoc,
            self.request,
            max_pdu_bytes=server.max_pdu_bytes,
            max_message_bytes=server.max_message_bytes,
            first_pdu=server.take_first_pdu(self.request),
        )
        assoc.set_socket(sock)
        sock.wake_dul_on_send(assoc.dul)
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
    """A threaded association server that admits a connection only once its A-ASSOCIATE-RQ is in.

    Each accepted connection is *pending* until it has delivered a complete, valid A-ASSOCIATE-RQ:
    at most ``max_pending_per_host`` per source address and ``max_pending`` in all (over either cap
    the connection is closed at once), each with ``rq_timeout_s`` from accept time (plus
    ``handshake_timeout_s`` with TLS) to deliver it, at most ``max_rq_bytes`` long. The TLS handshake
    and the A-ASSOCIATE-RQ are read in the connection's own thread; the pynetdicom association (an
    ``AcceptorThread``, counted by ``active_associations``) is created only afterwards, with the PDU
    handed to its :class:`GuardedSocket`.

    Set these after construction (:meth:`ingest.sources.dimse.listener.Listener.start` does):
    ``max_pdu_bytes``, ``max_message_bytes``, ``tls`` (an :class:`ssl.SSLContext` or ``None``),
    ``handshake_timeout_s``, ``io_timeout_s`` (socket timeout for reads after the A-ASSOCIATE-RQ),
    ``rq_timeout_s``, ``max_rq_bytes``, ``max_pending``, ``max_pending_per_host``, ``on_refused``
    (called with a reason label for each connection refused before pynetdicom sees it) and
    ``on_association`` (called with each new acceptor association before its thread starts).
    """

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.max_pdu_bytes = 4 * 1024 * 1024
        self.max_message_bytes = 2 * 1024**3
        self.tls: ssl.SSLContext | None = None
        self.handshake_timeout_s = 10.0
        self.io_timeout_s: float | None = None
        self.rq_timeout_s = 5.0
        self.max_rq_bytes = 64 * 1024
        self.max_pending = 64
        self.max_pending_per_host = 8
        self.closing = threading.Event()
        self.handshake_failures = 0
        self.on_association: Callable[[Association], None] | None = None
        self.on_refused: Callable[[str], None] | None = None
        self._pending_lock = threading.Lock()
        self._pending: dict[int, tuple[str, socket.socket]] = {}  # id(accepted socket) -> (host, socket)
        self._pending_per_host: dict[str, int] = {}
        self._first_pdus: dict[int, bytes] = {}  # id(socket) -> its A-ASSOCIATE-RQ, until handed over
        self._warned: dict[tuple[str, str], tuple[float, int]] = {}  # -> (last warning, refused since)
        super().__init__(*args, **kwargs)

    # -- pending connections --------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Connections accepted that have not yet delivered their A-ASSOCIATE-RQ."""
        with self._pending_lock:
            return len(self._pending)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; TLS (if any) is done later, in the connection's own thread."""
        # stands in for pynetdicom.transport.AssociationServer.get_request (TLS in the accept loop)
        assert self.socket is not None
        client, address = self.socket.accept()
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """In the accept loop: take a pending slot, or refuse the connection (closed unread) over a cap."""
        host = str(client_address[0])
        with self._pending_lock:
            per_host = self._pending_per_host.get(host, 0)
            if per_host >= self.max_pending_per_host:
                reason = "over_pending_per_host"
            elif len(self._pending) >= self.max_pending:
                reason = "over_pending_total"
            else:
                self._pending[id(request)] = (host, request)
                self._pending_per_host[host] = per_host + 1
                return True
        self._refused(reason)
        cap = (
            f"{self.max_pending_per_host} per source"
            if reason == "over_pending_per_host" else f"{self.max_pending} in total"
        )
        self._warn_limited(
            host, reason, f"connection from {host} refused: too many without an A-ASSOCIATE-RQ (cap {cap})"
        )
        return False  # socketserver closes it (shutdown_request)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the connection's thread; its pending slot is given back if that fails."""
        # relies on pynetdicom.transport.ThreadedAssociationServer.process_request (a thread per request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def _release(self, request: Any) -> None:
        with self._pending_lock:
            entry = self._pending.pop(id(request), None)
            if entry is None:
                return
            host = entry[0]
            left = self._pending_per_host.get(host, 1) - 1
            if left > 0:
                self._pending_per_host[host] = left
            else:
                self._pending_per_host.pop(host, None)

    def _refused(self, reason: str) -> None:
        if self.on_refused is not None:
            try:
                self.on_refused(reason)
            except Exception:
                LOGGER.debug("on_refused failed", exc_info=True)

    def _warn_limited(self, host: str, kind: str, message: str) -> None:
        """WARNING ``message`` at most once per :data:`CAP_WARNING_INTERVAL_S` per source and kind.

        The line says how many such connections were refused since the previous one; the others are
        only counted (``on_refused``), so a flood of connections cannot flood the log.
        """
        now = time.monotonic()
        key = (host, kind)
        with self._pending_lock:
            last, count = self._warned.get(key, (float("-inf"), 0))
            count += 1
            if now - last < CAP_WARNING_INTERVAL_S:
                self._warned[key] = (last, count)
                return
            self._warned[key] = (now, 0)
            if len(self._warned) > 1024:  # forget sources not warned about for a while
                for old in [k for k, (t, _) in self._warned.items() if now - t >= CAP_WARNING_INTERVAL_S]:
                    self._warned.pop(old, None)
        LOGGER.warning(
            "%s (%d such from %s since the last warning; at most one warning per %.0f s)",
            message, count, host, CAP_WARNING_INTERVAL_S,
        )

    def take_first_pdu(self, request: Any) -> bytes | None:
        """The A-ASSOCIATE-RQ read for ``request`` (for its :class:`GuardedSocket`), once."""
        with self._pending_lock:
            return self._first_pdus.pop(id(request), None)

    def server_close(self) -> None:
        """Close the listening socket and every pending connection (their threads then end)."""
        # extends pynetdicom.transport.AssociationServer.server_close
        super().server_close()
        with self._pending_lock:
            pending = [sock for _, sock in self._pending.values()]
        for sock in pending:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # -- the connection's thread ----------------------------------------------------------------------

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Per-connection thread: TLS handshake, then the A-ASSOCIATE-RQ, then the association."""
        # stands in for pynetdicom.transport.ThreadedAssociationServer.process_request_thread
        sock: socket.socket = request
        host = str(client_address[0])
        accepted = time.monotonic()
        try:
            tune_socket(sock)
            deadline = accepted + self.rq_timeout_s
            if self.tls is not None:
                handshaken = self._handshake(request, host, self.handshake_timeout_s)
                if handshaken is None:
                    return
                sock = handshaken
                deadline += self.handshake_timeout_s
            try:
                first = read_associate_rq(sock, deadline=deadline, max_bytes=self.max_rq_bytes)
            except Refusal as refusal:
                self._refuse(sock, host, refusal)
                return
            finally:
                self._release(request)
            sock.settimeout(self.io_timeout_s)
            if self.closing.is_set():
                _close(sock)
                return
            with self._pending_lock:
                self._first_pdus[id(sock)] = first
            try:
                self.finish_request(sock, client_address)
            finally:
                with self._pending_lock:
                    self._first_pdus.pop(id(sock), None)
        except Exception:
            LOGGER.exception("could not start an association with %s", host)
            _close(sock)
        finally:
            self._release(request)

    def _handshake(self, raw: socket.socket, host: str, timeout_s: float) -> ssl.SSLSocket | None:
        """The server side of the TLS handshake within ``timeout_s``, or the socket is closed.

        CPython applies a socket timeout to the whole ``do_handshake()`` call, not to each read, so a
        client sending its handshake a byte at a time cannot hold the thread longer either.
        """
        assert self.tls is not None
        sock: socket.socket = raw
        try:
            raw.settimeout(timeout_s)
            sock = self.tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            with self._pending_lock:
                if id(raw) in self._pending:
                    self._pending[id(raw)] = (host, sock)  # server_close shuts the wrapped socket down
            sock.do_handshake()
        except (OSError, ssl.SSLError) as exc:
            self.handshake_failures += 1
            self._refused("tls_handshake")
            LOGGER.warning("TLS handshake with %s failed: %s", host, exc)
            _close(sock)
            return None
        return sock

    def _refuse(self, sock: socket.socket, host: str, refusal: Refusal) -> None:
        """Answer (A-ASSOCIATE-RJ / A-ABORT) if the refusal says so, then close; counted and logged."""
        self._refused(refusal.reason)
        if refusal.reason == "closed":
            LOGGER.debug("connection from %s %s", host, refusal.message)
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
        if answer:
            with contextlib.suppress(OSError):
                sock.settimeout(2.0)
                sock.sendall(answer)
                sock.shutdown(socket.SHUT_WR)
                _drain(sock, time.monotonic() + 1.0)  # like ARTIM: let the peer read it and close
        _close(sock)


def _drain(sock: socket.socket, deadline: float) -> None:
    """Read and discard until EOF, 64 KiB or ``deadline``, so closing does not reset a queued answer."""
    left = 64 * 1024
    while left > 0:
        wait = deadline - time.monotonic()
        if wait <= 0:
            return
        sock.settimeout(wait)
        data = sock.recv(min(left, 16384))
        if not data:
            return
        left -= len(data)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


# -- hooks into pynetdicom internals ------------------------------------------------------------------
#
# Everything below (and GuardedRequestHandler, GuardedServer, GuardedSocket above) relies on names that
# are not pynetdicom's public API. Each is listed in PYNETDICOM_HOOKS, which
# tests/sources/dimse/test_netguard.py checks against the installed pynetdicom: adding a hook means
# adding its names there.

#: The Storage Service Class (PS3.4 B.5; PS3.6 Annex A).
STORAGE_SERVICE_CLASS: Final = "1.2.840.10008.4.2"


@dataclass(frozen=True)
class Hook:
    """One pynetdicom internal relied on here, checked against the installed pynetdicom by the tests.

    Attributes
    ----------
    owner:
        Dotted path of the module or class holding it (``pynetdicom.dimse.DIMSEServiceProvider``).
    name:
        The function, method, class or attribute.
    params:
        For a callable: its parameter names, in order, ``self`` left out; ``None``: not checked.
    uses:
        Source text that ``name`` (or, for an instance attribute, the owner class) must still contain:
        what the hook counts on pynetdicom doing.
    instance:
        ``name`` is set on instances (``self.<name>`` in the owner's source), not on the class.
    by:
        What in this module relies on it.
    """

    owner: str
    name: str
    params: tuple[str, ...] | None = None
    uses: tuple[str, ...] = ()
    instance: bool = False
    by: str = ""


_DIMSE: Final = "pynetdicom.dimse.DIMSEServiceProvider"
_MESSAGE: Final = "pynetdicom.dimse_messages.DIMSEMessage"
_ASSOC: Final = "pynetdicom.association.Association"
_TRANSPORT: Final = "pynetdicom.transport"
_DUL: Final = "pynetdicom.dul.DULServiceProvider"

#: Every pynetdicom internal this module hooks into (pynetdicom 3.0).
PYNETDICOM_HOOKS: Final[tuple[Hook, ...]] = (
    # divert_large_data_sets
    Hook(
        _DIMSE, "receive_primitive", ("primitive",), ("self.message.decode_msg(",),
        by="divert_large_data_sets",
    ),
    Hook(_DIMSE, "message", instance=True, by="divert_large_data_sets"),
    Hook(_ASSOC, "dimse", instance=True, by="divert_large_data_sets"),
    Hook("pynetdicom.dimse_messages", "C_STORE_RQ", by="divert_large_data_sets"),
    Hook(_MESSAGE, "data_set", instance=True, by="divert_large_data_sets"),
    Hook(_MESSAGE, "command_set", instance=True, by="divert_large_data_sets"),
    Hook(_MESSAGE, "context_id", instance=True, by="divert_large_data_sets"),
    Hook(_MESSAGE, "_data_set_file", instance=True, by="divert_large_data_sets"),
    Hook(_MESSAGE, "_data_set_path", instance=True, by="divert_large_data_sets"),
    Hook(
        _MESSAGE, "decode_msg", ("primitive", "assoc"),
        (
            "if self._data_set_file:",
            "self._data_set_file.write(data[1:])",
            "self._data_set_file.file.flush()",
        ),
        by="divert_large_data_sets (DataSetSink)",
    ),
    Hook(
        "pynetdicom.dsutils", "create_file_meta",
        (
            "sop_class_uid", "sop_instance_uid", "transfer_syntax", "implementation_uid",
            "implementation_version",
        ),
        by="divert_large_data_sets",
    ),
    # accepted_transfer_syntax
    Hook(_ASSOC, "_accepted_cx", instance=True, by="accepted_transfer_syntax"),
    # received_data_set_file
    Hook(
        _MESSAGE, "message_to_primitive", (), ("primitive._dataset_file = self._data_set_file",),
        by="received_data_set_file",
    ),
    Hook(
        "pynetdicom.service_class.StorageServiceClass", "SCP", ("req", "context"),
        ("if req._dataset_file:", "req._dataset_file.close()", "self.dimse.send_msg(rsp, cx_id)"),
        by="received_data_set_file (DataSetSink), fast_store_responses",
    ),
    # message_was_oversized
    Hook(_ASSOC, "dul", instance=True, by="message_was_oversized"),
    Hook("pynetdicom.dul.DULServiceProvider", "socket", instance=True, by="message_was_oversized"),
    # register_server
    Hook("pynetdicom.ae.ApplicationEntity", "_servers", instance=True, by="register_server"),
    Hook("pynetdicom.ae.ApplicationEntity", "shutdown", (), ("self._servers",), by="register_server"),
    # reject_association: the sequence of pynetdicom.acse.ACSE._negotiate_as_acceptor
    Hook(
        "pynetdicom.acse.ACSE", "_negotiate_as_acceptor", (),
        ("self.send_reject(", "evt.trigger(self.assoc, evt.EVT_REJECTED, {})", "self.assoc.kill()"),
        by="reject_association",
    ),
    Hook(_ASSOC, "acse", instance=True, by="reject_association"),
    Hook("pynetdicom.acse.ACSE", "send_reject", ("result", "source", "diagnostic"), by="reject_association"),
    Hook("pynetdicom.events", "trigger", ("assoc", "event", "attrs"), by="reject_association"),
    Hook("pynetdicom.events", "EVT_REJECTED", by="reject_association"),
    Hook(_ASSOC, "kill", (), by="reject_association"),
    # route_storage_classes, service_class_for
    Hook(
        "pynetdicom.sop_class", "uid_to_service_class", ("uid",), ("return ServiceClass",),
        by="service_class_for",
    ),
    Hook("pynetdicom.service_class", "ServiceClass", by="service_class_for"),
    Hook("pynetdicom.service_class", "StorageServiceClass", by="route_storage_classes"),
    Hook(
        _ASSOC, "_serve_request", ("msg", "context_id"), ("self.acceptor.accepted_common_extended",),
        by="route_storage_classes",
    ),
    Hook(
        "pynetdicom.pdu_primitives.SOPClassCommonExtendedNegotiation", "sop_class_uid",
        by="route_storage_classes",
    ),
    Hook(
        "pynetdicom.pdu_primitives.SOPClassCommonExtendedNegotiation", "service_class_uid",
        by="route_storage_classes",
    ),
    # quiet_pynetdicom_logging
    Hook("pynetdicom._config", "LOG_HANDLER_LEVEL", by="quiet_pynetdicom_logging"),
    # GuardedRequestHandler: a copy of RequestHandler.handle / _create_association on a GuardedSocket
    Hook(
        f"{_TRANSPORT}.RequestHandler", "handle", (), ("self._create_association()",),
        by="GuardedRequestHandler",
    ),
    Hook(
        f"{_TRANSPORT}.RequestHandler", "_create_association", (),
        (
            "assoc._server = self.server",
            "assoc.set_socket(sock)",
            "assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)",
            "self.server._handlers",
        ),
        by="GuardedRequestHandler",
    ),
    Hook(_ASSOC, "_server", instance=True, by="GuardedRequestHandler"),
    Hook(f"{_TRANSPORT}.AssociationServer", "_handlers", instance=True, by="GuardedRequestHandler"),
    # GuardedServer
    Hook(
        f"{_TRANSPORT}.AssociationServer", "__init__",
        ("ae", "address", "ae_title", "contexts", "ssl_context", "evt_handlers", "request_handler"),
        by="GuardedServer",
    ),
    Hook(f"{_TRANSPORT}.AssociationServer", "get_request", (), ("self.ssl_context",), by="GuardedServer"),
    Hook(
        f"{_TRANSPORT}.ThreadedAssociationServer", "process_request", ("request", "client_address"),
        by="GuardedServer",
    ),
    Hook(
        f"{_TRANSPORT}.ThreadedAssociationServer", "process_request_thread", ("request", "client_address"),
        by="GuardedServer",
    ),
    Hook(f"{_TRANSPORT}.AssociationServer", "server_close", (), by="GuardedServer"),
    # GuardedSocket: the DUL reads a PDU as recv(6), then recv(length)
    Hook(
        f"{_TRANSPORT}.AssociationSocket", "__init__", ("assoc", "client_socket", "address"),
        by="GuardedSocket",
    ),
    Hook(f"{_TRANSPORT}.AssociationSocket", "recv", ("nr_bytes",), by="GuardedSocket"),
    Hook(f"{_TRANSPORT}.AssociationSocket", "ready", by="GuardedSocket"),
    Hook(f"{_TRANSPORT}.AssociationSocket", "_is_connected", instance=True, by="GuardedSocket.ready"),
    Hook(f"{_TRANSPORT}.AssociationSocket", "close", (), ("self._shutdown_socket()",), by="GuardedSocket"),
    Hook(f"{_TRANSPORT}.AssociationSocket", "_shutdown_socket", (), by="GuardedSocket"),
    # GuardedSocket.wake_dul_on_send: the DUL loop's idle sleep, its socket check, its send queue
    Hook(
        _DUL, "run_reactor", (),
        ("time.sleep(self._run_loop_delay)", "self._process_recv_primitive()", "self._is_transport_event()"),
        by="GuardedSocket.wake_dul_on_send",
    ),
    Hook(_DUL, "_is_transport_event", (), ("self.socket.ready",), by="GuardedSocket.wake_dul_on_send"),
    Hook(
        _DUL, "send_pdu", ("primitive",), ("self.to_provider_queue.put(primitive)",),
        by="GuardedSocket.wake_dul_on_send",
    ),
    Hook(_DUL, "_run_loop_delay", instance=True, by="GuardedSocket.wake_dul_on_send"),
    # _Acceptor: the steps of the acceptor loop it stands in for, and what they use
    Hook(
        _ASSOC, "_run_reactor", (),
        (
            "time.sleep(0.001)", "self._reactor_checkpoint.wait()", "self.dimse.get_msg(block=False)",
            "self._serve_request(msg, cast(int, context_id))", "self.acse.is_release_requested()",
            "self.acse.send_release(is_response=True)", "self.acse.is_aborted()",
            "self.dul.receive_pdu(wait=False)", "evt.trigger(self, evt.EVT_RELEASED, {})",
            "evt.trigger(self, evt.EVT_ABORTED, {})", "self.dul.is_alive()", "self.dul.idle_timer_expired()",
            'self.network_timeout_response == "A-RELEASE"',
        ),
        by="_Acceptor",
    ),
    Hook(
        _DIMSE, "get_msg", ("block",), ("self.msg_queue.get(block=block, timeout=self.dimse_timeout)",),
        by="_Acceptor",
    ),
    Hook(_DIMSE, "msg_queue", instance=True, by="_Acceptor"),
    # fast_store_responses
    Hook(
        _DIMSE, "send_msg", ("primitive", "context_id"),
        ("dimse_msg.primitive_to_message(primitive)", "evt.EVT_DIMSE_SENT", "self.dul.send_pdu(pdata)"),
        by="fast_store_responses",
    ),
    Hook(_DIMSE, "maximum_pdu_size", by="fast_store_responses"),
    Hook(
        _MESSAGE, "encode_msg", ("context_id", "max_pdu_length"), ('b"\\x03" + next(cmd_fragments)',),
        by="fast_store_responses",
    ),
    Hook(_ASSOC, "_reactor_checkpoint", instance=True, by="_Acceptor"),
    Hook(_ASSOC, "_is_paused", instance=True, by="_Acceptor"),
    Hook(_ASSOC, "_kill", instance=True, by="_Acceptor"),
    Hook(_DUL, "to_provider_queue", instance=True, by="GuardedSocket.wake_dul_on_send"),
    Hook(
        "pynetdicom.dul.DULServiceProvider", "_read_pdu_data", (),
        ("self.socket.recv(6)", "self.socket.recv(pdu_length)"), by="GuardedSocket",
    ),
)


class DataSetSink(Protocol):
    """Where :func:`divert_large_data_sets` sends the rest of a C-STORE data set.

    pynetdicom's ``DIMSEMessage.decode_msg`` writes each later data-set fragment with ``write()`` and
    calls ``file.flush()``; after the C-STORE handler, ``StorageServiceClass.SCP`` calls ``close()`` on
    a truthy sink and unlinks its ``name``, so a sink the handler has taken must be falsy.
    """

    @property
    def file(self) -> Any:
        """The object whose ``flush()`` pynetdicom calls after each fragment."""

    def __bool__(self) -> bool: ...

    def write(self, data: bytes | bytearray | memoryview) -> int: ...

    def close(self) -> None: ...


def _implicit(group: int, elem: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element (PS3.5 7.1.3): tag, 4-byte length, value."""
    return _COMMAND_ELEMENT.pack(group, elem, len(value)) + value


def encode_store_response(rsp: Any) -> bytes | None:
    """The command set of a C-STORE response primitive, Implicit VR Little Endian (PS3.7 9.3.1.2, 6.3.1).

    Gives exactly what pynetdicom's ``C_STORE_RSP.primitive_to_message`` + ``encode_msg`` encode (the
    tests compare the two), in a few microseconds instead of ~0.5 ms of pydicom data-set work.
    ``None`` when ``rsp`` holds anything not covered here (a data set, a non-ASCII comment, a value
    pydicom would refuse): the caller then lets pynetdicom encode it.
    """
    try:
        if getattr(rsp, "DataSet", None) or getattr(rsp, "_dataset_path", None):
            return None
        body: list[bytes] = []

        def uid(elem: int, value: Any) -> None:
            if value is not None:
                raw = str(value).encode("ascii")
                body.append(_implicit(0x0000, elem, raw + b"\0" * (len(raw) % 2)))

        def us(elem: int, value: int) -> None:
            body.append(_implicit(0x0000, elem, struct.pack("<H", value)))

        uid(0x0002, rsp.AffectedSOPClassUID)
        us(0x0100, 0x8001)  # Command Field: C-STORE-RSP
        us(0x0120, int(rsp.MessageIDBeingRespondedTo))
        us(0x0800, 0x0101)  # Command Data Set Type: no data set
        us(0x0900, int(rsp.Status))
        offending = rsp.OffendingElement
        if offending is not None:
            tags = b"".join(struct.pack("<HH", int(t) >> 16, int(t) & 0xFFFF) for t in offending)
            body.append(_implicit(0x0000, 0x0901, tags))
        comment = rsp.ErrorComment
        if comment is not None:
            raw = str(comment).encode("ascii")
            if len(raw) > 64 or any(c < 0x20 and c != 0x1B for c in raw) or b"\\" in raw:
                return None  # LO: at most 64 characters, one value (pydicom's own rules apply instead)
            body.append(_implicit(0x0000, 0x0902, raw + b" " * (len(raw) % 2)))
        uid(0x1000, rsp.AffectedSOPInstanceUID)
    except (AttributeError, TypeError, ValueError, UnicodeEncodeError, struct.error):
        return None
    rest = b"".join(body)
    return _implicit(0x0000, 0x0000, struct.pack("<L", len(rest))) + rest


def fast_store_responses(assoc: Association) -> None:
    """Send ``assoc``'s C-STORE responses with :func:`encode_store_response` (one P-DATA, one PDV).

    Anything else, a response it cannot encode, a command set larger than the peer's maximum PDU, or an
    association with ``EVT_DIMSE_SENT`` handlers (which need pynetdicom's message object) goes through
    pynetdicom's ``DIMSEServiceProvider.send_msg`` unchanged.
    """
    # Relies on pynetdicom.dimse.DIMSEServiceProvider.send_msg(primitive, context_id), called by the
    # storage service class for its response, sending P_DATA primitives with dul.send_pdu (pynetdicom 3.0)
    dimse = assoc.dimse
    send = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        if (
            isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is not None
            and not assoc.get_handlers(evt.EVT_DIMSE_SENT)
            and (command := encode_store_response(primitive)) is not None
            and (dimse.maximum_pdu_size == 0 or len(command) <= dimse.maximum_pdu_size - 6)
        ):
            pdata = P_DATA()
            # one PDV: message control header 0x03, the last (only) fragment of a command (PS3.8 E.2)
            pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
            dimse.dul.send_pdu(pdata)
            return
        send(primitive, context_id)

    dimse.send_msg = send_msg  # type: ignore[method-assign]


def divert_large_data_sets(
    assoc: Association,
    threshold: int,
    start_spill: Callable[[BytesIO, Callable[[], FileMetaDataset]], DataSetSink],
) -> None:
    """Once a C-STORE data set being received on ``assoc`` grows past ``threshold`` bytes, divert it.

    ``start_spill(head, file_meta)`` gets the bytes received so far and a function building the File
    Meta (PS3.10 7.1) of the instance (it may raise; call it inside your own error handling); every
    later fragment goes to the sink it returns instead of memory. Runs on the association's DUL
    thread, in order with the decoding of each P-DATA primitive, so ``head`` is exactly the bytes so
    far. ``start_spill`` must not raise.
    """
    # Relies on pynetdicom.dimse.DIMSEServiceProvider.receive_primitive and .message (the message
    # still being received, None once complete) and on DIMSEMessage.data_set / _data_set_file /
    # _data_set_path, which DIMSEMessage.decode_msg writes later fragments to (pynetdicom 3.0).
    dimse = assoc.dimse
    receive = dimse.receive_primitive

    def receive_primitive(primitive: Any) -> None:
        receive(primitive)
        msg = dimse.message
        if (
            msg is not None
            and msg._data_set_file is None
            and isinstance(msg, C_STORE_RQ)
            and isinstance(msg.data_set, BytesIO)
            and msg.data_set.tell() > threshold
        ):
            _divert(assoc, msg, start_spill)

    dimse.receive_primitive = receive_primitive  # type: ignore[method-assign]


def _divert(
    assoc: Association,
    msg: Any,
    start_spill: Callable[[BytesIO, Callable[[], FileMetaDataset]], DataSetSink],
) -> None:
    """Hand ``msg``'s data set so far to ``start_spill``; later fragments go to the sink it returns."""

    def file_meta() -> FileMetaDataset:
        # As pynetdicom's DIMSEMessage.decode_msg heads its STORE_RECV_CHUNKED_DATASET file
        # (pynetdicom.dsutils.create_file_meta, the accepted context's transfer syntax).
        cs = msg.command_set
        return create_file_meta(
            sop_class_uid=cs.AffectedSOPClassUID,  # (0000,0002) -> (0002,0002)
            sop_instance_uid=cs.AffectedSOPInstanceUID,  # (0000,1000) -> (0002,0003)
            transfer_syntax=accepted_transfer_syntax(assoc, msg.context_id),  # (0002,0010)
        )

    sink = start_spill(msg.data_set, file_meta)
    msg.data_set = BytesIO()  # the memory of the bytes so far is released
    msg._data_set_file = sink  # relies on pynetdicom.dimse_messages.DIMSEMessage._data_set_file
    msg._data_set_path = None  # relies on DIMSEMessage._data_set_path (no file for event.dataset)


def accepted_transfer_syntax(assoc: Association, context_id: int) -> UID:
    """The transfer syntax of the accepted presentation context ``context_id`` of ``assoc``.

    Raises
    ------
    KeyError
        When no such context was accepted.
    """
    # relies on pynetdicom.association.Association._accepted_cx (context ID -> PresentationContext)
    return assoc._accepted_cx[context_id].transfer_syntax[0]


def received_data_set_file(request: Any) -> object | None:
    """The sink a C-STORE request's data set was diverted to (:func:`divert_large_data_sets`), if any."""
    # relies on pynetdicom.dimse_primitives.C_STORE._dataset_file, copied from
    # DIMSEMessage._data_set_file by DIMSEMessage.message_to_primitive (pynetdicom 3.0)
    return getattr(request, "_dataset_file", None)


def message_was_oversized(assoc: Association) -> bool:
    """Whether the last message received on ``assoc`` exceeded the data-set cap; resets the flag.

    See :meth:`GuardedSocket.take_oversized`; ``False`` when the association is not on a guarded socket.
    """
    # relies on pynetdicom.association.Association.dul and DULServiceProvider.socket (our GuardedSocket)
    sock = assoc.dul.socket
    return isinstance(sock, GuardedSocket) and sock.take_oversized()


def register_server(ae: ApplicationEntity, server: ThreadedAssociationServer) -> None:
    """Register a server made with ``ae.make_server`` as ``ae.start_server`` does, for ``ae.shutdown``."""
    # relies on pynetdicom.ae.ApplicationEntity._servers (read by ApplicationEntity.shutdown)
    ae._servers.append(server)


def reject_association(assoc: Association, result: int, source: int, reason: int) -> None:
    """Send A-ASSOCIATE-RJ ``(result, source, reason)`` (PS3.8 9.3.4) from EVT_REQUESTED and end ``assoc``."""
    # Replays the reject sequence of pynetdicom.acse.ACSE._negotiate_as_acceptor: ACSE.send_reject,
    # then pynetdicom.events.trigger(EVT_REJECTED), then Association.kill (pynetdicom 3.0).
    assoc.acse.send_reject(result, source, reason)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def service_class_for(uid: str) -> type[ServiceClass] | None:
    """The pynetdicom service class serving SOP class ``uid``; ``None`` when pynetdicom has none for it."""
    # relies on pynetdicom.sop_class.uid_to_service_class returning the base ServiceClass for a UID
    # it has no service class for
    service = uid_to_service_class(uid)
    return None if service is ServiceClass else service


def route_storage_classes(uids: Iterable[str]) -> dict[str, SOPClassCommonExtendedNegotiation]:
    """The EVT_SOP_COMMON answer routing ``uids`` to the Storage Service Class for one association.

    Stands in for ``pynetdicom.sop_class.uid_to_service_class``, which maps retired and unknown SOP
    classes to its base ``ServiceClass`` (no SCP: the association would be aborted on the first
    C-STORE). pynetdicom's ``Association._serve_request`` looks the SOP class up in
    ``acceptor.accepted_common_extended`` first, so answering EVT_SOP_COMMON with an item naming
    1.2.840.10008.4.2 (what a requestor may declare itself, PS3.7 D.3.3.6; no item goes back in the
    A-ASSOCIATE-AC) routes the class to ``StorageServiceClass`` for this association only; the
    process-wide pynetdicom registry is not changed. Classes pynetdicom already serves with
    ``StorageServiceClass`` get no item.
    """
    routes: dict[str, SOPClassCommonExtendedNegotiation] = {}
    for uid in uids:
        service = service_class_for(uid)
        if service is not None and issubclass(service, StorageServiceClass):
            continue
        item = SOPClassCommonExtendedNegotiation()
        item.sop_class_uid = uid
        item.service_class_uid = STORAGE_SERVICE_CLASS
        routes[uid] = item
    return routes


def quiet_pynetdicom_logging() -> None:
    """Turn pynetdicom's per-PDU / per-DIMSE logging handlers off (process-wide; CPU on every message)."""
    # relies on pynetdicom._config.LOG_HANDLER_LEVEL
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
