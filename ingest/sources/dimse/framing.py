"""PDU and DIMSE framing of the DICOM edge: P-DATA-TF, PDVs and command sets (PS3.8 9.3, PS3.7 6.3, E).

The association PDUs (A-ASSOCIATE-RQ/AC/RJ) are pynetdicom's public codec (:mod:`ingest.sources.dimse.
associate`); what flows on an established association is framed here, in plain code:

- :func:`split_pdvs` cuts a P-DATA-TF body into its presentation data values (context ID, message
  control header, fragment), checking every length;
- :func:`decode_command` reads a command set (group 0000, Implicit VR Little Endian) into
  :class:`Command`, refusing anything malformed with :class:`FramingError`;
- :func:`encode_command` writes one (the group length first, elements in tag order, UIDs padded with
  NUL, text with a space: what pynetdicom encodes for the same message, byte for byte, as the tests
  check), and :func:`p_data_pdus` cuts a command and its data set into P-DATA-TF PDUs no larger than
  the peer's maximum;
- :func:`repair_command_set` replaces an over-long or unprintable command UID with a fresh ``2.25`` UID
  no data set carries, so the C-STORE is refused with a clean status instead of an abort;
- :func:`encode_data_set` and :func:`decode_data_set` write and read the data set of a message other
  than a C-STORE's (an N-ACTION's Action Information, an N-EVENT-REPORT's, a C-FIND identifier) in its
  presentation context's transfer syntax, with pydicom (imported when first needed).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "A_ABORT",
    "A_ASSOCIATE_AC",
    "A_ASSOCIATE_RJ",
    "A_ASSOCIATE_RQ",
    "A_RELEASE_RP",
    "A_RELEASE_RQ",
    "P_DATA_TF",
    "Command",
    "FramingError",
    "abort_pdu",
    "decodable_uid",
    "decode_command",
    "decode_data_set",
    "encode_command",
    "encode_data_set",
    "p_data_pdus",
    "release_rp_pdu",
    "release_rq_pdu",
    "repair_command_set",
    "split_pdvs",
    "valid_ae",
]

# PDU types (PS3.8 9.3.1)
A_ASSOCIATE_RQ: Final = 0x01
A_ASSOCIATE_AC: Final = 0x02
A_ASSOCIATE_RJ: Final = 0x03
P_DATA_TF: Final = 0x04
A_RELEASE_RQ: Final = 0x05
A_RELEASE_RP: Final = 0x06
A_ABORT: Final = 0x07

PDU_HEADER: Final = struct.Struct(">BBL")  # PDU type, reserved, PDU length
PDV_HEADER: Final = struct.Struct(">LBB")  # PDV item length, presentation context ID, control header
_ELEMENT: Final = struct.Struct("<HHL")  # implicit VR little endian element header (PS3.5 7.1.3)
_US: Final = struct.Struct("<H")

#: Largest command set accepted (a command is a few hundred bytes; PS3.7 6.3.1).
MAX_COMMAND_BYTES: Final = 64 * 1024

# A-ABORT reasons, source 2 (PS3.8 Table 9-26)
ABORT_NOT_SPECIFIED: Final = 0x00
ABORT_UNRECOGNIZED_PDU: Final = 0x01
ABORT_UNEXPECTED_PDU: Final = 0x02
ABORT_UNRECOGNIZED_PARAMETER: Final = 0x04
ABORT_UNEXPECTED_PARAMETER: Final = 0x05
ABORT_INVALID_PARAMETER: Final = 0x06

# Command Field values (PS3.7 E.1)
C_STORE_RQ: Final = 0x0001
C_ECHO_RQ: Final = 0x0030
N_EVENT_REPORT_RQ: Final = 0x0100
N_EVENT_REPORT_RSP: Final = 0x8100
N_ACTION_RQ: Final = 0x0130
NO_DATA_SET: Final = 0x0101  # Command Data Set Type (0000,0800) when no data set follows

# element number -> VR of the command elements ingest reads or writes (PS3.7 E.1-1)
_UI: Final = frozenset({0x0002, 0x0003, 0x1000, 0x1001})
_US_ELEMENTS: Final = frozenset({0x0100, 0x0110, 0x0120, 0x0700, 0x0800, 0x0900, 0x1002, 0x1008, 0x1031})
_TEXT: Final = frozenset({0x0902, 0x1030})  # LO, AE: space padded
_MOVE_ORIGINATOR_AE: Final = 0x1030
_MAX_UID: Final = 64  # UI VR (PS3.5 Table 6.2-1)
_MAX_AE: Final = 16  # AE VR


class FramingError(Exception):
    """A P-DATA-TF body or a command set that cannot be read (the association is aborted)."""


def abort_pdu(reason: int, source: int = 0x02) -> bytes:
    """An A-ABORT PDU (PS3.8 9.3.8): ``source`` 0 service user, 2 service provider."""
    return struct.pack(">BBLBBBB", A_ABORT, 0, 4, 0, 0, source, reason)


def release_rq_pdu() -> bytes:
    """An A-RELEASE-RQ PDU (PS3.8 9.3.6)."""
    return struct.pack(">BBLL", A_RELEASE_RQ, 0, 4, 0)


def release_rp_pdu() -> bytes:
    """An A-RELEASE-RP PDU (PS3.8 9.3.7)."""
    return struct.pack(">BBLL", A_RELEASE_RP, 0, 4, 0)


def split_pdvs(body: bytes | memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """The PDVs of a P-DATA-TF body: ``(context ID, control header, fragment)`` (PS3.8 9.3.5.1).

    Raises
    ------
    FramingError
        When a PDV's length is below 2 or runs past the body, or the body holds no PDV.
    """
    view = memoryview(body)
    end = len(view)
    pos = 0
    if end == 0:
        raise FramingError("P-DATA-TF without a presentation data value")
    while pos < end:
        if pos + PDV_HEADER.size > end:
            raise FramingError("truncated PDV header")
        length, cx_id, control = PDV_HEADER.unpack_from(view, pos)
        stop = pos + 4 + length
        if length < 2 or stop > end:
            raise FramingError(f"PDV length {length} does not fit its P-DATA-TF")
        if control & 0xFC:
            raise FramingError(f"PDV message control header 0x{control:02X} has reserved bits set")
        yield cx_id, control, view[pos + PDV_HEADER.size : stop]
        pos = stop


@dataclass
class Command:
    """A decoded command set: every element's raw value by element number (group 0000)."""

    elements: dict[int, bytes] = field(default_factory=dict)

    def us(self, element: int) -> int | None:
        """An US value, or ``None`` when absent."""
        raw = self.elements.get(element)
        if raw is None:
            return None
        if len(raw) != 2:
            raise FramingError(f"(0000,{element:04X}) is not 2 bytes long")
        return int(_US.unpack(raw)[0])

    def text(self, element: int) -> str:
        """A UI/AE/LO value as text, padding removed (``""`` when absent); undecodable bytes escaped."""
        raw = self.elements.get(element, b"")
        return raw.rstrip(b"\0 ").strip(b" ").decode("ascii", "backslashreplace")

    @property
    def command_field(self) -> int:
        """Command Field (0000,0100)."""
        value = self.us(0x0100)
        if value is None:
            raise FramingError("command without a Command Field (0000,0100)")
        return value

    @property
    def message_id(self) -> int:
        """Message ID (0000,0110) of a request, 0 when absent."""
        return self.us(0x0110) or 0

    @property
    def has_data_set(self) -> bool:
        """Command Data Set Type (0000,0800): anything but 0x0101 announces a data set."""
        return self.us(0x0800) not in (None, NO_DATA_SET)


def decode_command(data: bytes | bytearray | memoryview) -> Command:
    """Read a command set, Implicit VR Little Endian (PS3.7 6.3.1).

    Raises
    ------
    FramingError
        An element outside group 0000, a length running past the end, a Command Group Length
        that disagrees, or no Command Field.
    """
    raw = bytes(data)
    elements: dict[int, bytes] = {}
    pos = 0
    end = len(raw)
    while pos < end:
        if pos + _ELEMENT.size > end:
            raise FramingError("truncated command element header")
        group, element, length = _ELEMENT.unpack_from(raw, pos)
        pos += _ELEMENT.size
        if group != 0x0000:
            raise FramingError(f"command element ({group:04X},{element:04X}) outside group 0000")
        if length > end - pos:
            raise FramingError(f"command element (0000,{element:04X}) runs past the command set")
        elements[element] = raw[pos : pos + length]
        pos += length
    command = Command(elements)
    group_length = elements.get(0x0000)
    if group_length is not None:
        if len(group_length) != 4:
            raise FramingError("Command Group Length is not 4 bytes")
        first = _ELEMENT.size + 4
        if struct.unpack("<L", group_length)[0] != end - first:
            raise FramingError("Command Group Length disagrees with the command set")
    _ = command.command_field
    return command


def _value(element: int, value: int | str | bytes) -> bytes:
    if isinstance(value, bytes):
        return value + (b"\0" if len(value) % 2 else b"")
    if element in _US_ELEMENTS:
        assert isinstance(value, int)
        return _US.pack(value)
    text = str(value).encode("ascii")
    if len(text) % 2:
        text += b"\0" if element in _UI else b" "
    return text


def encode_command(fields: dict[int, int | str | bytes | None]) -> bytes:
    """A command set, Implicit VR Little Endian, with its Command Group Length (PS3.7 6.3.1).

    ``fields`` maps element numbers to values: an int (US), a str (UI padded with NUL, AE/LO with a
    space), bytes (as given, padded even) or ``None`` (left out). Elements are written in tag order.
    """
    body = b"".join(
        _ELEMENT.pack(0, element, len(raw)) + raw
        for element in sorted(fields)
        if element != 0 and (value := fields[element]) is not None
        for raw in (_value(element, value),)
    )
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<L", len(body)) + body


def p_data_pdus(cx_id: int, command: bytes, data_set: bytes | None, max_pdu: int) -> list[bytes]:
    """P-DATA-TF PDUs carrying ``command`` and then ``data_set``, one PDV per PDU (PS3.8 9.3.5, E.2).

    ``max_pdu`` is the peer's Maximum Length (0: unlimited); each fragment is at most ``max_pdu - 6``.
    """
    step = max_pdu - PDV_HEADER.size if max_pdu else max(len(command), len(data_set or b""), 1)
    out: list[bytes] = []
    for payload, kind in ((command, 0x01), (data_set, 0x00)):
        if payload is None:
            continue
        view = memoryview(payload)
        pos = 0
        while True:
            piece = view[pos : pos + step]
            pos += len(piece)
            control = kind | (0x02 if pos >= len(view) else 0x00)
            pdv = PDV_HEADER.pack(len(piece) + 2, cx_id, control)
            out.append(PDU_HEADER.pack(P_DATA_TF, 0, len(pdv) + len(piece)) + pdv + bytes(piece))
            if pos >= len(view):
                break
    return out


def decodable_uid(raw: bytes, *, allow_empty: bool = True) -> bool:
    """A UID value pynetdicom can decode without raising: at most 64 printable ASCII characters.

    Trailing NUL and space padding (PS3.5 9.1, PS3.8 Annex F) is not part of the value.
    """
    value = raw.rstrip(b"\0 ")
    if not value:
        return allow_empty
    return len(value) <= _MAX_UID and all(0x21 <= b <= 0x7E for b in value)


def valid_ae(raw: bytes) -> bool:
    """PS3.5 AE VR: default repertoire without backslash or control characters, not all spaces."""
    value = raw.strip(b" ")
    return 0 < len(value) <= _MAX_AE and all(0x20 <= b <= 0x7E and b != 0x5C for b in value)


def repair_command_set(command: bytes) -> bytes | None:
    """``command`` with invalid UIDs replaced and an invalid Move Originator AE dropped, or ``None``.

    An Affected/Requested SOP Class/Instance UID longer than 64 characters or not printable becomes a
    fresh ``2.25`` UUID-derived UID (PS3.5 B.2) that no data set carries, so the C-STORE is refused
    cleanly (0xA900, or 0xC003 when the data set's own UID is invalid). An invalid Move Originator AE
    title (0000,1030) is dropped. ``None`` when nothing needed repair or the set cannot be parsed.
    """
    elements: list[tuple[int, bytes]] = []
    changed = False
    pos = 0
    end = len(command)
    while pos < end:
        if pos + _ELEMENT.size > end:
            return None
        group, element, length = _ELEMENT.unpack_from(command, pos)
        pos += _ELEMENT.size
        if group != 0x0000 or pos + length > end:
            return None
        value = command[pos : pos + length]
        pos += length
        if element in _UI and not decodable_uid(value):
            uid = f"2.25.{uuid.uuid4().int}".encode("ascii")
            value = uid + b"\0" * (len(uid) % 2)
            changed = True
        elif element == _MOVE_ORIGINATOR_AE and value.strip(b" \0") and not valid_ae(value.rstrip(b"\0")):
            changed = True
            continue
        elements.append((element, value))
    if not changed:
        return None
    rest = b"".join(_ELEMENT.pack(0, element, len(value)) + value for element, value in elements if element)
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<L", len(rest)) + rest


_IMPLICIT_LE: Final = "1.2.840.10008.1.2"
_EXPLICIT_BE: Final = "1.2.840.10008.1.2.2"


def encode_data_set(ds: Dataset, transfer_syntax: str) -> bytes:
    """``ds`` encoded in ``transfer_syntax`` (Implicit VR Little Endian, or Explicit VR Little or Big
    Endian; the others this edge accepts for such messages encode as Explicit VR Little Endian)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    out = DicomBytesIO()
    out.is_little_endian = transfer_syntax != _EXPLICIT_BE
    out.is_implicit_VR = transfer_syntax == _IMPLICIT_LE
    write_dataset(out, ds)
    return out.getvalue()


def decode_data_set(data: bytes, transfer_syntax: str) -> Dataset:
    """The data set ``data`` encoded in ``transfer_syntax`` (:func:`encode_data_set`'s encodings)."""
    from io import BytesIO

    from pydicom.filereader import read_dataset

    implicit, little = transfer_syntax == _IMPLICIT_LE, transfer_syntax != _EXPLICIT_BE
    ds: Dataset = read_dataset(BytesIO(data), implicit, little)
    return ds
