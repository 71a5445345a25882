"""Raw DICOM Upper Layer PDUs (PS3.8 9.3) for the listener's pre-association tests.

Built byte by byte, so a test can send what pynetdicom's SCU refuses to encode (invalid AE titles,
even presentation context IDs, over-long UIDs).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence

APP_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = b"1.2.840.10008.1.1"
CT_IMAGE = b"1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = b"1.2.840.10008.1.2"
EXPLICIT_LE = b"1.2.840.10008.1.2.1"

Context = tuple[int, bytes, Sequence[bytes]]  # (presentation context ID, abstract syntax, transfer syntaxes)


def item(item_type: int, value: bytes) -> bytes:
    """A variable item or sub-item: type, reserved, 2-byte length, value (PS3.8 9.3.2)."""
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def pdu(pdu_type: int, body: bytes) -> bytes:
    """A PDU: type, reserved, 4-byte length, body (PS3.8 9.3.1)."""
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def associate_rq(
    calling: bytes = b"TESTSCU",
    called: bytes = b"INGEST",
    contexts: Sequence[Context] = ((1, VERIFICATION, (IMPLICIT_LE,)),),
    *,
    user_info: bytes | None = None,
    extra_items: bytes = b"",
) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2); AE titles are space-padded (not truncated) to 16 bytes."""
    fixed = struct.pack(">HH", 1, 0) + called.ljust(16, b" ") + calling.ljust(16, b" ") + b"\0" * 32
    assert len(fixed) == 68
    items = item(0x10, APP_CONTEXT)
    for cx_id, abstract, transfers in contexts:
        subs = item(0x30, abstract) + b"".join(item(0x40, ts) for ts in transfers)
        items += item(0x20, struct.pack(">BBBB", cx_id, 0, 0, 0) + subs)
    if user_info is None:
        user_info = item(0x51, struct.pack(">L", 16384)) + item(0x52, b"1.2.826.0.1.3680043.9.9999")
    items += item(0x50, user_info) + extra_items
    return pdu(0x01, fixed + items)


def read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next PDU as ``(type, body)``; ``None`` when the connection is closed first."""
    header = _read(sock, 6)
    if len(header) < 6:
        return None
    pdu_type, _, length = struct.unpack(">BBL", header)
    return pdu_type, _read(sock, length)


def _read(sock: socket.socket, size: int) -> bytes:
    buf = b""
    while len(buf) < size:
        try:
            chunk = sock.recv(size - len(buf))
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
    return buf


def closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    """Whether the peer closes ``sock`` (EOF or reset) within ``within_s``, discarding what it sends."""
    sock.settimeout(within_s)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def element(tag_element: int, value: bytes) -> bytes:
    """A command-set element (group 0000), implicit VR little endian (PS3.7 6.3.1)."""
    return struct.pack("<HHL", 0x0000, tag_element, len(value)) + value


def uid_value(uid: bytes) -> bytes:
    """A UI value padded with NUL to even length (PS3.5 9.1)."""
    return uid + b"\0" * (len(uid) % 2)


def c_store_rq(sop_class: bytes, sop_instance: bytes, message_id: int = 1, *, extra: bytes = b"") -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1) with Command Group Length."""
    rest = (
        element(0x0002, uid_value(sop_class))  # Affected SOP Class UID
        + element(0x0100, struct.pack("<H", 0x0001))  # Command Field: C-STORE-RQ
        + element(0x0110, struct.pack("<H", message_id))  # Message ID
        + element(0x0700, struct.pack("<H", 0x0000))  # Priority
        + element(0x0800, struct.pack("<H", 0x0000))  # Command Data Set Type: a data set follows
        + element(0x1000, uid_value(sop_instance))  # Affected SOP Instance UID
        + extra
    )
    return element(0x0000, struct.pack("<L", len(rest))) + rest


def p_data(*pdvs: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of ``(context ID, control header, data)`` PDVs (PS3.8 9.3.5, E.2)."""
    body = b"".join(struct.pack(">LBB", len(d) + 2, cx_id, control) + d for cx_id, control, d in pdvs)
    return pdu(0x04, body)


def parse_command(data: bytes) -> dict[int, bytes]:
    """A command set's elements by element number (group 0000, implicit VR little endian)."""
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(data):
        group, elem, length = struct.unpack_from("<HHL", data, pos)
        assert group == 0
        out[elem] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    assert pos == len(data)
    return out
