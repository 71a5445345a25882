"""The DICOM file reader (edge): bytes → :class:`ParsedInstance`, and finding files under a folder.

Reading a header costs one read of the bytes and one pass over them:

1. Locate the dataset: after the 128-byte preamble and ``DICM``, after a file meta group without a
   preamble, or at offset 0 (no file meta; the transfer syntax comes from the association, or is
   guessed only when the first element looks like one).
2. Inflate Deflated Explicit VR Little Endian with a cap (docs/reliability.md; a 0.5 MiB file can inflate
   to 1 GiB).
3. Walk every element, including the skipped ones, pixel data and undefined-length sequences, and
   check each declared length against the bytes there (pydicom reads truncated files silently).
   Only the elements in :data:`ingest.core.tags.HEADER_TAGS` are kept, as pydicom
   ``RawDataElement``\\ s in a plain ``{tag: element}`` dict (no pydicom ``Dataset``), so pydicom
   decodes nothing else; pixel data is never read.
4. :func:`ingest.core.extract.extract_elements` turns those elements into an ``InstanceRecord``.

The digest is of the dataset's content, not of its encoding, and is computed in the same walk (see
:func:`read_header_bytes`): the same instance read from a file or received over DIMSE, in Implicit or
Explicit VR Little Endian, Explicit VR Big Endian or Deflated, has the same digest, so a sender that
changes its transfer syntax on a retry sends a duplicate, not a conflict. Every data element outside
group 0002, except group lengths (gggg,0000) and Data Set Trailing Padding (FFFC,FFFC), enters it as
Implicit VR Little Endian would encode it (tag, 4-byte length, value, PS3.5 7.1.3):

- values of binary VRs read from Big Endian are byte-swapped to little endian (PS3.5 7.3);
- values of standard text attributes lose trailing spaces and NULs (PS3.5 6.2), decided by the tag
  from the data dictionary, so an Implicit VR copy (no VRs) is treated the same. Private attributes
  (odd groups) are compared byte for byte: their VR is unknown in an Implicit VR copy;
- sequences and items are hashed structurally, as undefined lengths with delimiters, so defined and
  undefined lengths agree; a sequence without items is hashed as an empty value. A defined-length
  value of unknown VR (Implicit VR private, UN) is hashed as a sequence when it parses as one;
  anything in a defined-length sequence or item that does not parse is hashed as its bytes;
- encapsulated pixel data is hashed fragment by fragment (PS3.5 A.4), so it identifies the
  compressed stream: the same pixels native and compressed, or compressed twice, stay different;
- values of :data:`_BIG_VALUE` bytes or more (pixel data) enter as their own SHA-256; text values of
  that size are not stripped. Pixel data is hashed, never decoded.

The canonical form is hashed as it grows (:class:`_Digest`, between sequence items), so a data set
of hundreds of thousands of sequence items does not hold them all in memory.

The digest is prefixed with its scheme, :data:`CONTENT_DIGEST_SCHEME` (``c1:``), so it never equals
the older 64-hex-digit digest of the encoded bytes; the state store compares records when the schemes
differ (see :mod:`ingest.adapters.state.sql`).

The evidence of a Key Object Selection Document (0040,A375; an IOCM rejection note names every
instance it rejects there, and one note may name hundreds of thousands) is not kept as an element:
when the walk reaches it, a dedicated walk (:class:`_EvidenceWalk`) reads only the Study, Series and
Referenced SOP Instance UIDs of its items, counting Referenced SOP items as it goes, and stops with
:class:`~ingest.errors.TooManyReferencesError` at the first one past ``max_rejection_items``
(``[listener] max_rejection_items``), before anything else of the note is decoded. No pydicom item is
made for it; the UIDs go to :func:`~ingest.core.extract.extract_elements` as
:class:`~ingest.core.extract.EvidenceUids`.

Files larger than :data:`LARGE_FILE_BYTES` are not read into memory: the same walk runs over a small
read window that moves through the file (element and item headers, wanted values), values it skips
(pixel data) are read only for the digest, in 1 MiB reads. Record, digest and errors are
those of the in-memory path; memory stays bounded by the header, not the file.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

# the data dictionaries through their public front (pydicom.datadict imports them without an __all__)
from pydicom.datadict import DicomDictionary, RepeatersDictionary, dictionary_VR  # type: ignore[attr-defined]
from pydicom.dataelem import RawDataElement

from ingest.adapters.folders import ignored_name, iter_dicom_files  # (the folder walk, re-exported)
from ingest.core.extract import EvidenceUids, extract_elements
from ingest.core.lifecycle import KEY_OBJECT_SELECTION
from ingest.core.records import InstanceRecord
from ingest.core.tags import HEADER_TAGS
from ingest.errors import (
    HeaderError,
    InflateCapError,
    NestingTooDeepError,
    NotDicomError,
    TooManyReferencesError,
    TruncatedError,
)

__all__ = [
    "CONTENT_DIGEST_SCHEME",
    "DEFAULT_MAX_INFLATED_BYTES",
    "DEFAULT_MAX_REJECTION_ITEMS",
    "LARGE_FILE_BYTES",
    "MAX_NESTING_DEPTH",
    "ParsedInstance",
    "ignored_name",
    "iter_dicom_files",
    "read_header",
    "read_header_bytes",
]

#: Default cap on the inflated size of a Deflated Explicit VR Little Endian dataset.
DEFAULT_MAX_INFLATED_BYTES: Final = 64 * 1024 * 1024
#: Default cap on the instances a Key Object Selection Document's evidence (0040,A375) may name
#: (``[listener] max_rejection_items``).
DEFAULT_MAX_REJECTION_ITEMS: Final = 100_000
#: Files larger than this are read through a moving window, never whole (bounded memory).
LARGE_FILE_BYTES: Final = 32 * 1024 * 1024
#: Size of the digest reads of a large file.
_HASH_CHUNK: Final = 1024 * 1024
#: Smallest read of the moving window (a header region is read in pieces of this size).
_WINDOW_READ: Final = 64 * 1024
#: Deepest nesting of undefined-length sequence items accepted (real objects stay below ~10).
MAX_NESTING_DEPTH: Final = 64
#: Prefix of a content digest (:attr:`ParsedInstance.digest`); older digests have no prefix.
CONTENT_DIGEST_SCHEME: Final = "c1:"
#: Values at least this long enter the content digest as their own SHA-256 (no copy of pixel data).
_BIG_VALUE: Final = 64 * 1024

_DEFLATED: Final = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
_IMPLICIT_LE: Final = "1.2.840.10008.1.2"
_EXPLICIT_BE: Final = "1.2.840.10008.1.2.2"
_UNDEFINED: Final = 0xFFFFFFFF
_ITEM: Final = 0xFFFEE000  # (FFFE,E000) Item
_ITEM_END: Final = 0xFFFEE00D  # (FFFE,E00D) Item Delimitation Item
_SEQ_END: Final = 0xFFFEE0DD  # (FFFE,E0DD) Sequence Delimitation Item
_T_TRANSFER_SYNTAX: Final = 0x00020010  # (0002,0010)
_T_MEDIA_SOP_CLASS: Final = 0x00020002  # (0002,0002)
_T_PADDING: Final = 0xFFFCFFFC  # (FFFC,FFFC) Data Set Trailing Padding
_ITEM_LE: Final = b"\xfe\xff\x00\xe0"  # (FFFE,E000) Item in little endian
_PADS: Final = frozenset({b" ", b"\0"})  # trailing padding of text values (PS3.5 6.2)
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2, Table 7.1-1)
_LONG_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_ALL_VRS: Final = _LONG_VRS | frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
_T_SOP_CLASS: Final = 0x00080016  # (0008,0016) SOP Class UID
_T_SOP_INSTANCE: Final = 0x00080018  # (0008,0018) SOP Instance UID
_T_EVIDENCE: Final = 0x0040A375  # (0040,A375) Current Requested Procedure Evidence Sequence
_KEY_OBJECT_SELECTION: Final = KEY_OBJECT_SELECTION.encode("ascii")
# The evidence's levels: (the UID read, the sequence of the next level) per item
_EVIDENCE_LEVELS: Final = (
    (0x0020000D, 0x00081115),  # Study Instance UID, Referenced Series Sequence
    (0x0020000E, 0x00081199),  # Series Instance UID, Referenced SOP Sequence
    (0x00081155, None),  # Referenced SOP Instance UID
    (None, None),  # anything else: walked over
)
#: Longest UID value read from the evidence; a longer one is invalid whatever it holds (64 + padding).
_MAX_UID_VALUE: Final = 1024
# the evidence is walked by _EvidenceWalk, never kept as an element
_WANTED: Final = frozenset(int(t) for t in HEADER_TAGS) - {_T_EVIDENCE}
# Byte-swap width of the binary VRs, for Explicit VR Big Endian values (PS3.5 7.3); OB/UN/text: none
_SWAP_WIDTH: Final = {
    b"AT": 2, b"OW": 2, b"SS": 2, b"US": 2, b"FL": 4, b"OF": 4, b"OL": 4, b"SL": 4, b"UL": 4,
    b"FD": 8, b"OD": 8, b"OV": 8, b"SV": 8, b"UV": 8,
}  # fmt: skip
_TEXT_VR_NAMES: Final = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)


def _text_tags() -> frozenset[int]:
    """The standard attributes with a text VR, repeating groups expanded (50xx, 60xx: even groups)."""
    tags = {tag for tag, entry in DicomDictionary.items() if entry[0] in _TEXT_VR_NAMES}
    for mask, entry in RepeatersDictionary.items():
        if entry[0] not in _TEXT_VR_NAMES:
            continue
        slots = [i for i, c in enumerate(mask) if c == "x"]
        for digits in itertools.product("0123456789ABCDEF", repeat=len(slots)):
            chars = list(mask)
            for i, d in zip(slots, digits, strict=True):
                chars[i] = d
            tag = int("".join(chars), 16)
            if not tag >> 16 & 1:  # odd groups are private
                tags.add(tag)
    return frozenset(tags)


_TEXT_TAGS: Final = _text_tags()
# Canonical item, item end and sequence end of the content digest
_C_ITEM: Final = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
_C_ITEM_END: Final = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
_C_SEQ_END: Final = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
_VR_TEXT: Final = {vr: vr.decode() for vr in _ALL_VRS}
_new_tuple = tuple.__new__  # builds a RawDataElement without its Python-level __new__ (hot path)

_LE_HEAD = struct.Struct("<HH2sH")
_BE_HEAD = struct.Struct(">HH2sH")
_LE_HH = struct.Struct("<HH")
_BE_HH = struct.Struct(">HH")
_LE_L = struct.Struct("<L")
_BE_L = struct.Struct(">L")
_LE_H = struct.Struct("<H")
_BE_H = struct.Struct(">H")
_LE_ITEM = struct.Struct("<HHL")  # item tag group, element, 4-byte length
_BE_ITEM = struct.Struct(">HHL")


@dataclass(frozen=True)
class ParsedInstance:
    """One instance's header as read from bytes.

    Attributes
    ----------
    record:
        What the mapping needs, see :class:`~ingest.core.records.InstanceRecord`.
    digest:
        Content digest of the dataset, independent of its transfer syntax: :data:`CONTENT_DIGEST_SCHEME`
        and a SHA-256 in hex (see the module docstring).
    size:
        Size in bytes of the input (file or received dataset).
    """

    record: InstanceRecord
    digest: str
    size: int


def read_header(
    path: str | Path,
    *,
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
    media_sop_class: bool = True,
    large_file_bytes: int | None = None,
    max_rejection_items: int = DEFAULT_MAX_REJECTION_ITEMS,
) -> ParsedInstance:
    """Read a DICOM file's header (never its pixel data).

    Parameters
    ----------
    path:
        A DICOM file: Part 10 with preamble and file meta, file meta without preamble, or a bare
        dataset whose first element shows its encoding.
    max_inflated_bytes:
        Cap on the inflated size of a Deflated Explicit VR Little Endian dataset.
    media_sop_class:
        Whether (0002,0002) Media Storage SOP Class UID stands in for a missing (0008,0016) SOP Class
        UID. ``False`` for a file whose meta group the receiver wrote from a C-STORE command (the
        dataset must then carry its own SOP Class UID, as :func:`read_header_bytes` requires).
    large_file_bytes:
        Files larger than this are read through a moving window with a chunked digest (bounded
        memory); default :data:`LARGE_FILE_BYTES`. Both ways give the same result.
    max_rejection_items:
        Most instances a Key Object Selection Document's evidence (0040,A375) may name.

    Returns
    -------
    ParsedInstance
        The record, the dataset digest and the file size.

    Raises
    ------
    HeaderError
        The file is refused: :class:`NotDicomError`, :class:`TruncatedError`,
        :class:`InflateCapError`, :class:`NestingTooDeepError`, :class:`TooManyReferencesError`, or
        one of the acceptance errors of
        :func:`~ingest.core.extract.extract`.
    OSError
        The file cannot be read.
    """
    threshold = LARGE_FILE_BYTES if large_file_bytes is None else large_file_bytes
    with open(path, "rb", buffering=0) as file:  # unbuffered: one read of the whole file
        size = os.fstat(file.fileno()).st_size
        if size > threshold and size > 0:
            return _read_large(
                file.fileno(), size, str(path), max_inflated_bytes, media_sop_class, max_rejection_items
            )
        data = file.readall()
    return _read_parts(
        data, str(path), None, max_inflated_bytes, media_sop_class=media_sop_class,
        max_rejection_items=max_rejection_items,
    )


def read_header_bytes(
    data: bytes,
    *,
    source: str,
    transfer_syntax_uid: str | None = None,
    max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
    max_rejection_items: int = DEFAULT_MAX_REJECTION_ITEMS,
) -> ParsedInstance:
    """Read a header from bytes: a Part 10 file's content, or a dataset received over DIMSE.

    Parameters
    ----------
    data:
        The bytes. Whether they start with a preamble or file meta group is detected.
    source:
        Where they came from (a path, ``dimse:<AE>``, ``archive.zip!member``), for error messages.
    transfer_syntax_uid:
        The transfer syntax of a dataset without file meta (the presentation context's, for
        C-STORE). Ignored when the bytes carry a file meta group with a Transfer Syntax UID.
    max_inflated_bytes:
        Cap on the inflated size of a Deflated Explicit VR Little Endian dataset.
    max_rejection_items:
        Most instances a Key Object Selection Document's evidence (0040,A375) may name.

    Returns
    -------
    ParsedInstance
        The record, the dataset digest and ``len(data)``.

    Raises
    ------
    NotDicomError
        Empty, or the bytes do not hold a DICOM dataset.
    TruncatedError
        A declared length runs past the end of the data (an element, item or the deflate stream).
    InflateCapError
        The deflated dataset inflates to more than ``max_inflated_bytes``.
    NestingTooDeepError
        Sequence items nested deeper than :data:`MAX_NESTING_DEPTH`, or than pydicom can parse.
    TooManyReferencesError
        A Key Object Selection Document names more than ``max_rejection_items`` instances.
    HeaderError
        A malformed structure, or an acceptance error from :func:`~ingest.core.extract.extract`.
    """
    return _read_parts(
        data, source, transfer_syntax_uid, max_inflated_bytes, media_sop_class=True,
        max_rejection_items=max_rejection_items,
    )


def _read_parts(
    data: bytes,
    source: str,
    transfer_syntax_uid: str | None,
    max_inflated_bytes: int,
    *,
    media_sop_class: bool,
    max_rejection_items: int = DEFAULT_MAX_REJECTION_ITEMS,
) -> ParsedInstance:
    """The body of :func:`read_header_bytes` (in memory)."""
    if not data:
        raise NotDicomError(f"Empty input is not DICOM (source={source})")
    meta_end, meta = _read_file_meta(data, source)
    ts = meta.get(_T_TRANSFER_SYNTAX) or transfer_syntax_uid
    body = data[meta_end:] if meta_end else data  # a copy is cheaper than slicing a memoryview per element

    guessed = ts is None
    if ts is None:
        implicit, little = _guess_encoding(memoryview(body), source)
    elif ts == _DEFLATED:
        body = _inflate(memoryview(body), max_inflated_bytes, source)
        implicit, little = False, True
    else:
        implicit, little = ts == _IMPLICIT_LE, ts != _EXPLICIT_BE

    record, digest = _scan_extract(
        _Scanner(body, implicit, little, source, max_rejection_items), guessed, meta, ts, source,
        media_sop_class,
    )
    return ParsedInstance(record=record, digest=digest, size=len(data))


def _scan_extract(
    scanner: _Scanner,
    guessed: bool,
    meta: dict[int, str],
    ts: str | None,
    source: str,
    media_sop_class: bool,
) -> tuple[InstanceRecord, str]:
    """Walk the dataset; the record and the content digest (shared by the in-memory and windowed reads)."""
    try:
        elements = scanner.top_level()
    except HeaderError as exc:
        if guessed and not scanner.found and not isinstance(exc, NestingTooDeepError):
            raise NotDicomError(
                f"No DICOM dataset found: no file meta and no readable element (source={source})"
            ) from exc
        raise
    if guessed and not elements:
        raise NotDicomError(
            f"No DICOM dataset found: none of the header attributes present (source={source})"
        )

    if meta:  # the file's own meta group
        meta_ts, meta_sop_class = meta.get(_T_TRANSFER_SYNTAX), meta.get(_T_MEDIA_SOP_CLASS)
    else:  # a bare dataset: the transfer syntax it was read with
        meta_ts, meta_sop_class = ts, None
    record = extract_elements(
        elements,
        transfer_syntax_uid=meta_ts,
        media_sop_class_uid=meta_sop_class if media_sop_class else None,
        source=source,
        evidence=scanner.evidence,
    )
    return record, CONTENT_DIGEST_SCHEME + scanner.parts.hexdigest()


def _read_file_meta(data: bytes, source: str) -> tuple[int, dict[int, str]]:
    """Find the file meta group (PS3.10 7.1); return where the dataset starts and the UIDs read.

    Returns ``(0, {})`` when there is no file meta group.
    """
    if len(data) >= 132 and data[128:132] == b"DICM":
        pos = 132
    elif len(data) >= 8 and data[0:2] == b"\x02\x00" and data[4:6] in _ALL_VRS:
        pos = 0  # file meta without the preamble
    else:
        return 0, {}
    meta: dict[int, str] = {}
    end = len(data)
    while pos < end:
        if pos + 8 > end:
            raise TruncatedError(f"File meta element header cut short at byte {pos} (source={source})")
        group, elem = _LE_HH.unpack_from(data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > end:
                raise TruncatedError(f"File meta element header cut short at byte {pos} (source={source})")
            length = _LE_L.unpack_from(data, pos + 8)[0]
            start = pos + 12
        elif vr in _ALL_VRS:
            length = _LE_H.unpack_from(data, pos + 6)[0]
            start = pos + 8
        else:  # non-conformant implicit VR file meta
            length = _LE_L.unpack_from(data, pos + 4)[0]
            start = pos + 8
        if length == _UNDEFINED or start + length > end:
            raise TruncatedError(
                f"File meta element (0002,{elem:04X}) declares {length} bytes past the end of the data "
                f"(source={source})",
                tag=f"(0002,{elem:04X})",
            )
        tag = 0x00020000 | elem
        if tag in (_T_TRANSFER_SYNTAX, _T_MEDIA_SOP_CLASS):
            value = data[start : start + length].decode("latin-1").strip(" \0")
            if value:
                meta[tag] = value
        pos = start + length
    if pos >= len(data):
        raise NotDicomError(f"File meta information but no dataset (source={source})")
    return pos, meta


def _guess_encoding(body: memoryview, source: str, total: int | None = None) -> tuple[bool, bool]:
    """(implicit VR, little endian) of a dataset without file meta, from its first element.

    Only bytes that look like a DICOM element get this far (then ``force``-style reading is safe).
    *total* is the dataset's length when *body* holds only its start (a large file).
    """
    size = len(body) if total is None else total
    if size < 8:
        raise NotDicomError(f"No file meta and fewer than 8 bytes of dataset (source={source})")
    vr = bytes(body[4:6])
    group_le = _LE_H.unpack_from(body, 0)[0]
    group_be = _BE_H.unpack_from(body, 0)[0]
    if vr in _ALL_VRS:
        if 0x0002 < group_le <= 0x00FF:  # small groups come first in a dataset
            return False, True
        if 0x0002 < group_be <= 0x00FF:
            return False, False
    length = _LE_L.unpack_from(body, 4)[0]
    if 0x0002 < group_le <= 0x00FF and (length == _UNDEFINED or length <= size - 8):
        return True, True
    raise NotDicomError(f"No file meta and the first bytes are not a DICOM element (source={source})")


def _inflate(body: memoryview, cap: int, source: str) -> bytes:
    """Inflate a deflated dataset (PS3.5 A.5, raw deflate) without ever holding more than *cap* bytes."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, cap + 1)
    except zlib.error as exc:
        raise HeaderError(
            f"Invalid deflate stream in a Deflated Explicit VR Little Endian dataset (source={source})"
        ) from exc
    if len(out) > cap or inflater.unconsumed_tail:
        raise InflateCapError(
            f"Deflated dataset inflates to more than the cap of {cap} bytes (source={source})"
        )
    if not inflater.eof:
        raise TruncatedError(f"Deflate stream of the dataset is cut short (source={source})")
    return out


#: Parts of the canonical form held before they are hashed (a note naming 100,000 instances has ~600,000)
_FLUSH_PARTS: Final = 4096


class _Digest(list[bytes]):
    """The content digest's canonical form (see the module docstring), hashed as it grows.

    Parts are appended as to a list; :meth:`flush` (called between sequence items) hashes all but the
    last once there are :data:`_FLUSH_PARTS`, so memory does not grow with the number of items. Positions
    (:meth:`pos`) count every part ever appended. A defined-length sequence or item that fails to parse
    is hashed as a plain value instead, so its parts are rolled back to a :meth:`mark`; a flush that
    passes an open mark keeps the hash state at it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sha = hashlib.sha256()
        self.base = 0  # parts hashed so far
        self.marks: list[list[Any]] = []  # open marks, innermost last: [position, hash state at it or None]

    def pos(self) -> int:
        """The position of the next part."""
        return self.base + len(self)

    def mark(self) -> list[Any]:
        """Open a mark at :meth:`pos` (closed by :meth:`release` or :meth:`rollback`, innermost first)."""
        opened = [self.pos(), None]
        self.marks.append(opened)
        return opened

    def release(self, opened: list[Any]) -> None:
        """Close the innermost mark, keeping what was appended since."""
        assert self.marks.pop() is opened

    def rollback(self, opened: list[Any]) -> None:
        """Close the innermost mark, dropping what was appended since."""
        assert self.marks.pop() is opened
        position, state = opened
        if state is None:  # no flush passed it
            del self[position - self.base :]
        else:
            self.sha = state
            self.clear()
            self.base = position

    def flush(self) -> None:
        """Hash all parts but the last (which :func:`_close_sequence` may still replace)."""
        keep = len(self) - 1
        if keep <= 0:
            return
        done = 0
        for opened in self.marks:
            upto = opened[0] - self.base
            if upto > keep:
                break
            if opened[1] is None and upto >= 0:
                self.sha.update(b"".join(self[done:upto]))
                done = upto
                opened[1] = self.sha.copy()
        self.sha.update(b"".join(self[done:keep]))
        del self[:keep]
        self.base += keep

    def hexdigest(self) -> str:
        """The SHA-256 of every part, in hex (the walk is over)."""
        self.sha.update(b"".join(self))
        self.base += len(self)
        self.clear()
        return self.sha.hexdigest()


def _close_sequence(dig: _Digest, mark: int, group: int, elem: int) -> None:
    """End a sequence opened at position *mark*: a delimiter, or an empty value if it had no items."""
    if dig.pos() == mark + 1:  # the opening part is the last one (never flushed)
        dig[-1] = _LE_ITEM.pack(group, elem, 0)
    else:
        dig.append(_C_SEQ_END)


def _swapped(value: bytes, width: int) -> bytes:
    """*value* with each *width*-byte unit byte-swapped (Big Endian to Little Endian); a remainder kept."""
    n = len(value) - len(value) % width
    out = bytearray(value)
    for i in range(width):
        out[i:n:width] = value[width - 1 - i : n : width]
    return bytes(out)


class _Scanner:
    """One pass over an encoded dataset: checks every declared length, keeps the wanted elements.

    It also collects the content digest's canonical form in :attr:`parts` (see the module docstring).
    """

    def __init__(
        self, buf: bytes, implicit: bool, little: bool, source: str,
        max_rejection_items: int = DEFAULT_MAX_REJECTION_ITEMS,
    ) -> None:
        self.buf = buf
        self.max_rejection_items = max_rejection_items
        self.evidence: EvidenceUids | None = None  # a Key Object Selection's (0040,A375), once walked
        self.implicit = implicit
        self.little = little
        self.source = source
        self.found = 0  # elements read so far (tells garbage from a truncated dataset)
        self.hh = _LE_HH if little else _BE_HH
        self.head = _LE_HEAD if little else _BE_HEAD
        self.u32 = _LE_L if little else _BE_L
        self.parts = _Digest()  # the canonical form, hashed as it grows

    def _truncated(self, what: str, tag: int | None, pos: int) -> TruncatedError:
        where = f"({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else "element header"
        return TruncatedError(
            f"Truncated: {what} {where} at byte {pos} runs past the end of the data "
            f"({len(self.buf)} bytes; source={self.source})",
            tag=where if tag is not None else None,
        )

    def top_level(self) -> dict[int, RawDataElement]:
        """Walk the whole dataset; return the wanted top-level elements as raw elements."""
        wanted: dict[int, RawDataElement] = {}
        buf = self.buf
        if self.implicit and len(buf) >= 8 and buf[4:6] in _ALL_VRS:
            # labelled implicit but encoded explicit (pydicom's _is_implicit_vr check does the same)
            group = self.hh.unpack_from(buf, 0)[0]
            if 0x0002 < group <= 0x00FF:
                self.implicit = False
        self._dataset(0, len(buf), self.implicit, 0, wanted, self.parts)
        return wanted

    def _dataset(
        self,
        pos: int,
        end: int,
        implicit: bool,
        depth: int,
        wanted: dict[int, RawDataElement] | None,
        dig: _Digest | None,
    ) -> tuple[int, bool]:
        """Walk elements from *pos* to *end*, or to an Item Delimitation Item.

        Returns the next offset and whether an Item Delimitation Item ended the walk. Appends the
        elements' canonical form to *dig* (``None``: not digested).
        """
        buf = self.buf
        head = self.head.unpack_from  # tag group, tag element, explicit VR, 2-byte length
        u32 = self.u32.unpack_from
        pack = _LE_ITEM.pack  # canonical element header: tag and 4-byte length, little endian
        little = self.little
        found = 0
        try:
            while pos < end:
                # the element header (PS3.5 7.1): tag, then VR and length (explicit) or length (implicit)
                if pos + 8 > end:
                    raise self._truncated("element header", None, pos)
                group, elem, vr, length = head(buf, pos)
                tag = group << 16 | elem
                if group == 0xFFFE or implicit:  # items and delimiters have no VR in any transfer syntax
                    vr = None
                    length = u32(buf, pos + 4)[0]
                    start = pos + 8
                elif vr in _LONG_VRS:
                    if pos + 12 > end:
                        raise self._truncated("element header", tag, pos)
                    length = u32(buf, pos + 8)[0]
                    start = pos + 12
                elif vr in _ALL_VRS:
                    start = pos + 8
                else:  # not a VR: an implicit VR element in explicit VR data (assume_implicit_vr_switch)
                    vr = None
                    length = u32(buf, pos + 4)[0]
                    start = pos + 8
                if tag == _ITEM_END:
                    return start, True
                if tag == _T_EVIDENCE and wanted is not None:
                    self._walk_evidence(wanted, vr, start, length, implicit)
                # the content digest leaves out file meta, group lengths and trailing padding
                out = dig if (elem and group != 0x0002 and tag != _T_PADDING) else None
                if length == _UNDEFINED:
                    inner_implicit = implicit or vr == b"UN"  # PS3.5 6.2.2: UN of undefined length
                    if out is None:
                        value_end, next_pos = self._items(start, end, inner_implicit, depth + 1, tag, None)
                    else:
                        mark = out.pos()
                        out.append(pack(group, elem, _UNDEFINED))
                        frag = vr is not None and vr != b"SQ" and vr != b"UN"  # encapsulated pixel data
                        value_end, next_pos = self._items(
                            start, end, inner_implicit, depth + 1, tag, out, frag=frag
                        )
                        _close_sequence(out, mark, group, elem)
                else:
                    value_end = next_pos = start + length
                    if value_end > end:
                        raise self._truncated("value of", tag, pos)
                    if out is None:
                        pass
                    elif vr == b"SQ" or (
                        (vr is None or vr == b"UN") and length >= 8 and buf[start : start + 4] == _ITEM_LE
                    ):
                        self._defined_sequence(out, tag, vr, start, value_end, implicit, depth)
                    elif length < _BIG_VALUE and (little or vr not in _SWAP_WIDTH):
                        value = buf[start:value_end]
                        if value[-1:] in _PADS and tag in _TEXT_TAGS:  # text: trailing padding dropped
                            value = value.rstrip(b" \0")
                        out += (pack(group, elem, len(value)), value)
                    else:
                        self._value(out, tag, vr, start, value_end)
                found += 1
                if wanted is not None and tag in _WANTED:
                    if vr is None or vr == b"UN" or length == _UNDEFINED:
                        wanted[tag] = self._raw(tag, vr, length, start, value_end, implicit)
                    else:  # the common case, inline: RawDataElement(tag, VR, length, value, value_tell,
                        # is_implicit_VR, is_little_endian, is_raw, is_buffered) built as the tuple it is
                        wanted[tag] = _new_tuple(
                            RawDataElement,
                            (tag, _VR_TEXT[vr], length, buf[start:value_end], start, implicit, little,
                             True, False),
                        )  # fmt: skip
                pos = next_pos
            return pos, False
        finally:
            self.found += found

    def _items(
        self,
        pos: int,
        end: int,
        implicit: bool,
        depth: int,
        owner: int,
        dig: _Digest | None,
        *,
        frag: bool = False,
        defined: bool = False,
    ) -> tuple[int, int]:
        """Walk the items of an undefined-length value (sequence or encapsulated pixel data).

        Returns the offset of the Sequence Delimitation Item and the offset after it. *dig* gets the
        items' canonical form: *frag* for fragments of encapsulated pixel data (hashed as values).
        *defined*: the items of a defined-length value ending at *end* (no delimitation item).
        """
        if depth > MAX_NESTING_DEPTH:
            raise NestingTooDeepError(
                f"Sequences nested deeper than {MAX_NESTING_DEPTH} levels in "
                f"({owner >> 16:04X},{owner & 0xFFFF:04X}) (source={self.source})",
                tag=f"({owner >> 16:04X},{owner & 0xFFFF:04X})",
            )
        while True:
            if dig is not None and len(dig) > _FLUSH_PARTS:
                dig.flush()
            if defined and pos == end:
                return pos, pos
            if pos + 8 > end:
                raise self._truncated("sequence of", owner, pos)
            group, elem = self.hh.unpack_from(self.buf, pos)
            tag = group << 16 | elem
            length = self.u32.unpack_from(self.buf, pos + 4)[0]
            if tag == _SEQ_END and not defined:
                return pos, pos + 8
            if tag != _ITEM:
                raise HeaderError(
                    f"Malformed sequence: expected an item or a sequence delimiter in "
                    f"({owner >> 16:04X},{owner & 0xFFFF:04X}) at byte {pos} (source={self.source})",
                    tag=f"({owner >> 16:04X},{owner & 0xFFFF:04X})",
                )
            if length == _UNDEFINED:
                if dig is not None:
                    dig.append(_C_ITEM)
                pos, delimited = self._dataset(pos + 8, end, implicit, depth, None, dig)
                if not delimited:  # the data ended before the item's delimiter
                    raise self._truncated("item of", owner, pos)
                if dig is not None:
                    dig.append(_C_ITEM_END)
            else:
                start, pos = pos + 8, pos + 8 + length
                if pos > end:
                    raise self._truncated("item of", owner, pos)
                if dig is None:
                    pass
                elif frag:
                    self._value(dig, _ITEM, None, start, pos)
                else:
                    self._defined_item(dig, start, pos, implicit, depth)

    def _defined_sequence(
        self, dig: _Digest, tag: int, vr: bytes | None, start: int, end: int, implicit: bool, depth: int
    ) -> None:
        """Digest a defined-length sequence item by item; as a plain value if it does not parse."""
        mark = dig.mark()
        group, elem = tag >> 16, tag & 0xFFFF
        dig.append(_LE_ITEM.pack(group, elem, _UNDEFINED))
        try:
            self._items(start, end, implicit or vr != b"SQ", depth + 1, tag, dig, defined=True)
        except HeaderError:
            dig.rollback(mark)
            self._value(dig, tag, None, start, end)
            return
        dig.release(mark)
        _close_sequence(dig, mark[0], group, elem)

    def _defined_item(self, dig: _Digest, start: int, end: int, implicit: bool, depth: int) -> None:
        """Digest a defined-length item's elements; as a plain value if they do not parse."""
        mark = dig.mark()
        dig.append(_C_ITEM)
        try:
            pos, _ = self._dataset(start, end, implicit, depth, None, dig)
            if pos != end:
                raise HeaderError("an item delimiter inside a defined-length item")
        except HeaderError:
            dig.rollback(mark)
            self._value(dig, _ITEM, None, start, end)
            return
        dig.release(mark)
        dig.append(_C_ITEM_END)

    def _value(self, dig: _Digest, tag: int, vr: bytes | None, start: int, end: int) -> None:
        """Digest a value that is not the common case: text, Big Endian binary, or big."""
        width = None if self.little or vr is None else _SWAP_WIDTH.get(vr)
        if end - start >= _BIG_VALUE:
            dig.append(_LE_ITEM.pack(tag >> 16, tag & 0xFFFF, end - start))
            dig.append(self._big_digest(start, end, width))
            return
        value = self._bytes(start, end)
        if tag in _TEXT_TAGS:
            value = value.rstrip(b" \0")
        elif width:
            value = _swapped(value, width)
        dig.append(_LE_ITEM.pack(tag >> 16, tag & 0xFFFF, len(value)))
        dig.append(value)

    def _bytes(self, start: int, end: int) -> bytes:
        """The bytes ``[start, end)`` of the dataset (checked to be there)."""
        return self.buf[start:end]

    def _big_digest(self, start: int, end: int, width: int | None) -> bytes:
        """SHA-256 of a big value ``[start, end)``, byte-swapped by *width* first if given."""
        if width:
            return hashlib.sha256(_swapped(self.buf[start:end], width)).digest()
        return hashlib.sha256(memoryview(self.buf)[start:end]).digest()

    def _get(self, pos: int, n: int) -> bytes:
        """``n`` bytes at *pos* (the caller checked they are there)."""
        return self.buf[pos : pos + n]

    def _walk_evidence(
        self, wanted: dict[int, RawDataElement], vr: bytes | None, start: int, length: int, implicit: bool
    ) -> None:
        """Walk a Key Object Selection Document's (0040,A375) for its UIDs (see the module docstring).

        Runs when the main walk reaches the element, before it walks the value: a note past the cap is
        refused before anything else of it is read. (0008,0016) and (0008,0018) come first in a dataset.

        Raises
        ------
        TooManyReferencesError
            At the first Referenced SOP item past :attr:`max_rejection_items`.
        """
        if _first_value(wanted.get(_T_SOP_CLASS)) != _KEY_OBJECT_SELECTION:
            return
        size = len(self.buf)
        undefined = length == _UNDEFINED
        end = size if undefined else min(start + length, size)
        if vr == b"UN":  # PS3.5 6.2.2: a sequence sent as UN is Implicit VR Little Endian
            implicit, little = True, True
        elif vr is None or vr == b"SQ":
            little = self.little
        else:
            self.evidence = EvidenceUids(undecodable=f"VR {vr.decode('latin-1')}, not a sequence")
            return
        sop = _first_value(wanted.get(_T_SOP_INSTANCE))
        walk = _EvidenceWalk(self._get, self.max_rejection_items, self.source,
                             sop.decode("latin-1") if sop is not None else None)
        try:
            studies = walk.sequence(start, end, undefined, implicit, little, 0, 1)[0]
        except _Unwalkable as exc:
            self.evidence = EvidenceUids(undecodable=str(exc))
            return
        self.evidence = EvidenceUids(studies)

    def _raw(
        self, tag: int, vr: bytes | None, length: int, start: int, value_end: int, implicit: bool
    ) -> RawDataElement:
        """A pydicom raw element for a wanted tag (its value bytes, not yet decoded; ``int`` tag)."""
        value = self.buf[start:value_end]
        vr_text = _VR_TEXT[vr] if vr is not None else None
        little = self.little
        if vr_text == "UN":
            try:
                if dictionary_VR(tag) == "SQ":
                    # a sequence sent as UN is encoded Implicit VR Little Endian (PS3.5 6.2.2)
                    vr_text, implicit, little = "SQ", True, True
            except KeyError:
                pass
        if length == _UNDEFINED and vr_text is None:
            vr_text = "SQ"
        # RawDataElement(tag, VR, length, value, value_tell, is_implicit_VR, is_little_endian,
        # is_raw=True, is_buffered=False), built as the tuple it is
        return _new_tuple(RawDataElement, (tag, vr_text, length, value, start, implicit, little, True, False))


def _read_large(
    fd: int, size: int, source: str, max_inflated_bytes: int, media_sop_class: bool,
    max_rejection_items: int = DEFAULT_MAX_REJECTION_ITEMS,
) -> ParsedInstance:
    """:func:`read_header` for a large file: a moving read window, chunked hashing, bounded memory."""
    prefix = os.pread(fd, min(size, _WINDOW_READ), 0)
    while True:  # the file meta group: grow the prefix until it holds the whole group
        try:
            meta_end, meta = _read_file_meta(prefix, source)
            break
        except (TruncatedError, NotDicomError):
            if len(prefix) >= size:
                raise
            prefix = os.pread(fd, min(size, len(prefix) * 4), 0)
    if len(prefix) < min(size, _WINDOW_READ):
        raise TruncatedError(f"The file changed while it was read (source={source})")
    ts = meta.get(_T_TRANSFER_SYNTAX)  # a file carries no transfer syntax but its own
    body_len = size - meta_end

    guessed = ts is None
    scanner: _Scanner
    if ts is None:
        implicit, little = _guess_encoding(memoryview(prefix)[meta_end:], source, total=body_len)
    elif ts == _DEFLATED:
        inflated = _inflate_file(fd, meta_end, size, max_inflated_bytes, source)
        record, digest = _scan_extract(
            _Scanner(inflated, False, True, source, max_rejection_items), guessed, meta, ts, source,
            media_sop_class,
        )
        return ParsedInstance(record=record, digest=digest, size=size)
    else:
        implicit, little = ts == _IMPLICIT_LE, ts != _EXPLICIT_BE
    scanner = _WindowScanner(
        _Window(fd, meta_end, body_len, source), implicit, little, source, max_rejection_items
    )
    record, digest = _scan_extract(scanner, guessed, meta, ts, source, media_sop_class)
    return ParsedInstance(record=record, digest=digest, size=size)


def _inflate_file(fd: int, start: int, size: int, cap: int, source: str) -> bytes:
    """:func:`_inflate` over a file's bytes from *start*, read in chunks (same results and errors)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pieces: list[bytes] = []
    total = 0
    pos = start
    while pos < size and not inflater.eof:
        chunk = os.pread(fd, min(_HASH_CHUNK, size - pos), pos)
        if not chunk:
            raise TruncatedError(f"The file changed while it was read (source={source})")
        pos += len(chunk)
        try:
            piece = inflater.decompress(chunk, cap + 1 - total)
        except zlib.error as exc:
            raise HeaderError(
                f"Invalid deflate stream in a Deflated Explicit VR Little Endian dataset (source={source})"
            ) from exc
        pieces.append(piece)
        total += len(piece)
        if total > cap or inflater.unconsumed_tail:
            raise InflateCapError(
                f"Deflated dataset inflates to more than the cap of {cap} bytes (source={source})"
            )
    if not inflater.eof:
        raise TruncatedError(f"Deflate stream of the dataset is cut short (source={source})")
    return b"".join(pieces)


class _Window:
    """Read-only access to a file's dataset bytes ``[base, base + length)`` through one small cached block.

    Offsets are relative to *base* (the start of the dataset), as in the in-memory walk; slicing
    returns ``bytes``. Only the bytes asked for (element and item headers, kept values) are read.
    """

    def __init__(self, fd: int, base: int, length: int, source: str) -> None:
        self.fd = fd
        self.base = base
        self.length = length
        self.source = source
        self.lo = 0
        self.block = b""

    def __len__(self) -> int:
        return self.length

    def get(self, pos: int, n: int) -> bytes:
        """``n`` bytes at *pos* (the caller checked ``pos + n <= len(self)``)."""
        off = pos - self.lo
        if off >= 0 and off + n <= len(self.block):
            return self.block[off : off + n]
        want = min(max(n, _WINDOW_READ), self.length - pos)
        self.block = os.pread(self.fd, want, self.base + pos)
        self.lo = pos
        if len(self.block) < n:
            raise TruncatedError(f"The file changed while it was read (source={self.source})")
        return self.block[:n]

    def __getitem__(self, key: slice) -> bytes:
        start, stop = key.start or 0, min(key.stop, self.length)
        return self.get(start, max(0, stop - start))


class _WindowScanner(_Scanner):
    """:class:`_Scanner` over a :class:`_Window`: the same walk, checks and messages, file-backed.

    ``_dataset`` and ``_items`` repeat the in-memory walk with window reads instead of direct buffer
    access on purpose: routing the in-memory walk through an accessor call per element (one shared
    walk) measured about 4 % slower on ``replay --dry-run --jobs 1`` (0.99x -> 0.95x of dcmread, same
    minute). A change to one walk must be made to both; ``tests/adapters/test_large_instances.py``
    checks they agree on every pydicom test file and cut-short copies.
    """

    def __init__(
        self, window: _Window, implicit: bool, little: bool, source: str,
        max_rejection_items: int = DEFAULT_MAX_REJECTION_ITEMS,
    ) -> None:
        super().__init__(b"", implicit, little, source, max_rejection_items)
        self.win = window
        self.buf = window  # type: ignore[assignment]  # sliced by _raw and measured by _truncated

    def top_level(self) -> dict[int, RawDataElement]:
        """Walk the whole dataset; return the wanted top-level elements as raw elements."""
        wanted: dict[int, RawDataElement] = {}
        win = self.win
        if self.implicit and len(win) >= 8 and win.get(4, 2) in _ALL_VRS:
            group = self.hh.unpack(win.get(0, 4))[0]
            if 0x0002 < group <= 0x00FF:
                self.implicit = False
        self._dataset(0, len(win), self.implicit, 0, wanted, self.parts)
        return wanted

    def _dataset(
        self,
        pos: int,
        end: int,
        implicit: bool,
        depth: int,
        wanted: dict[int, RawDataElement] | None,
        dig: _Digest | None,
    ) -> tuple[int, bool]:
        win = self.win
        pack = _LE_ITEM.pack
        little = self.little
        found = 0
        try:
            while pos < end:
                if pos + 8 > end:
                    raise self._truncated("element header", None, pos)
                head = win.get(pos, min(12, end - pos))
                group, elem, vr, length = self.head.unpack_from(head, 0)
                tag = group << 16 | elem
                if group == 0xFFFE or implicit:
                    vr = None
                    length = self.u32.unpack_from(head, 4)[0]
                    start = pos + 8
                elif vr in _LONG_VRS:
                    if pos + 12 > end:
                        raise self._truncated("element header", tag, pos)
                    length = self.u32.unpack_from(head, 8)[0]
                    start = pos + 12
                elif vr in _ALL_VRS:
                    start = pos + 8
                else:
                    vr = None
                    length = self.u32.unpack_from(head, 4)[0]
                    start = pos + 8
                if tag == _ITEM_END:
                    return start, True
                if tag == _T_EVIDENCE and wanted is not None:
                    self._walk_evidence(wanted, vr, start, length, implicit)
                out = dig if (elem and group != 0x0002 and tag != _T_PADDING) else None
                if length == _UNDEFINED:
                    inner_implicit = implicit or vr == b"UN"
                    if out is None:
                        value_end, next_pos = self._items(start, end, inner_implicit, depth + 1, tag, None)
                    else:
                        mark = out.pos()
                        out.append(pack(group, elem, _UNDEFINED))
                        frag = vr is not None and vr != b"SQ" and vr != b"UN"
                        value_end, next_pos = self._items(
                            start, end, inner_implicit, depth + 1, tag, out, frag=frag
                        )
                        _close_sequence(out, mark, group, elem)
                else:
                    value_end = next_pos = start + length
                    if value_end > end:
                        raise self._truncated("value of", tag, pos)
                    if out is None:
                        pass
                    elif vr == b"SQ" or (
                        (vr is None or vr == b"UN") and length >= 8 and win.get(start, 4) == _ITEM_LE
                    ):
                        self._defined_sequence(out, tag, vr, start, value_end, implicit, depth)
                    elif length < _BIG_VALUE and (little or vr not in _SWAP_WIDTH):
                        value = win.get(start, length)
                        if value[-1:] in _PADS and tag in _TEXT_TAGS:  # text: trailing padding dropped
                            value = value.rstrip(b" \0")
                        out += (pack(group, elem, len(value)), value)
                    else:
                        self._value(out, tag, vr, start, value_end)
                found += 1
                if wanted is not None and tag in _WANTED:
                    if vr is None or vr == b"UN" or length == _UNDEFINED:
                        wanted[tag] = self._raw(tag, vr, length, start, value_end, implicit)
                    else:
                        wanted[tag] = _new_tuple(
                            RawDataElement,
                            (tag, _VR_TEXT[vr], length, win.get(start, value_end - start), start,
                             implicit, little, True, False),
                        )  # fmt: skip
                pos = next_pos
            return pos, False
        finally:
            self.found += found

    def _items(
        self,
        pos: int,
        end: int,
        implicit: bool,
        depth: int,
        owner: int,
        dig: _Digest | None,
        *,
        frag: bool = False,
        defined: bool = False,
    ) -> tuple[int, int]:
        if depth > MAX_NESTING_DEPTH:
            raise NestingTooDeepError(
                f"Sequences nested deeper than {MAX_NESTING_DEPTH} levels in "
                f"({owner >> 16:04X},{owner & 0xFFFF:04X}) (source={self.source})",
                tag=f"({owner >> 16:04X},{owner & 0xFFFF:04X})",
            )
        win = self.win
        while True:
            if dig is not None and len(dig) > _FLUSH_PARTS:
                dig.flush()
            if defined and pos == end:
                return pos, pos
            if pos + 8 > end:
                raise self._truncated("sequence of", owner, pos)
            group, elem, length = self._item_head.unpack(win.get(pos, 8))
            tag = group << 16 | elem
            if tag == _SEQ_END and not defined:
                return pos, pos + 8
            if tag != _ITEM:
                raise HeaderError(
                    f"Malformed sequence: expected an item or a sequence delimiter in "
                    f"({owner >> 16:04X},{owner & 0xFFFF:04X}) at byte {pos} (source={self.source})",
                    tag=f"({owner >> 16:04X},{owner & 0xFFFF:04X})",
                )
            if length == _UNDEFINED:
                if dig is not None:
                    dig.append(_C_ITEM)
                pos, delimited = self._dataset(pos + 8, end, implicit, depth, None, dig)
                if not delimited:
                    raise self._truncated("item of", owner, pos)
                if dig is not None:
                    dig.append(_C_ITEM_END)
            else:
                start, pos = pos + 8, pos + 8 + length
                if pos > end:
                    raise self._truncated("item of", owner, pos)
                if dig is None:
                    pass
                elif frag:
                    self._value(dig, _ITEM, None, start, pos)
                else:
                    self._defined_item(dig, start, pos, implicit, depth)

    def _bytes(self, start: int, end: int) -> bytes:
        return self.win.get(start, end - start)

    def _get(self, pos: int, n: int) -> bytes:
        return self.win.get(pos, n)

    def _big_digest(self, start: int, end: int, width: int | None) -> bytes:
        """SHA-256 of a big value read from the file in :data:`_HASH_CHUNK` pieces (a multiple of 8)."""
        sha = hashlib.sha256()
        win = self.win
        pos = start
        while pos < end:
            n = min(_HASH_CHUNK, end - pos)
            chunk = os.pread(win.fd, n, win.base + pos)
            if len(chunk) < n:
                raise TruncatedError(f"The file changed while it was read (source={self.source})")
            sha.update(_swapped(chunk, width) if width else chunk)
            pos += n
        return sha.digest()

    @property
    def _item_head(self) -> struct.Struct:
        return _LE_ITEM if self.little else _BE_ITEM


def _first_value(elem: RawDataElement | None) -> bytes | None:
    """The first non-empty value of a raw UI element, unpadded; ``None`` if absent or empty."""
    raw = elem.value if elem is not None else None
    if not isinstance(raw, bytes):
        return None
    for part in raw.split(b"\\"):
        value = part.strip(b" \0")
        if value:
            return value
    return None


class _Unwalkable(Exception):
    """The evidence is not a well-formed sequence (it is dropped with a warning, as pydicom's would be)."""


class _EvidenceWalk:
    """Walks a Key Object Selection Document's (0040,A375) value for the UIDs of its items, counting
    Referenced SOP items against the cap; nothing else of the value is kept or decoded.

    Every length is checked against the value's end (the main walk that follows checks the dataset
    again and reports truncation); nesting is bounded by :data:`MAX_NESTING_DEPTH`.
    """

    def __init__(self, get: Callable[[int, int], bytes], cap: int, source: str, sop: str | None) -> None:
        self.get = get
        self.cap = cap
        self.source = source
        self.sop = sop
        self.count = 0  # Referenced SOP items so far

    def sequence(
        self, pos: int, end: int, undefined: bool, implicit: bool, little: bool, level: int, depth: int
    ) -> tuple[list[Any], int]:
        """The items of a sequence value from *pos* (to *end*, or to its delimiter when *undefined*): per
        item, at level 0 ``(study UID, series)``, 1 ``(series UID, SOP UIDs)``, 2 the SOP UID; none at
        level 3. Returns them and the offset after the value."""
        if depth > MAX_NESTING_DEPTH:
            raise _Unwalkable(f"sequences nested deeper than {MAX_NESTING_DEPTH} levels")
        item_head = _LE_ITEM if little else _BE_ITEM
        out: list[Any] = []
        while True:
            if not undefined and pos == end:
                return out, pos
            if pos + 8 > end:
                raise _Unwalkable("a sequence runs past the end of its value")
            group, elem, length = item_head.unpack(self.get(pos, 8))
            tag = group << 16 | elem
            if undefined and tag == _SEQ_END:
                return out, pos + 8
            if tag != _ITEM:
                raise _Unwalkable("expected an item or a sequence delimiter")
            if level == 2:
                self.count += 1
                if self.count > self.cap:
                    raise TooManyReferencesError(
                        f"Key Object Selection Document names more than {self.cap} instances in "
                        f"CurrentRequestedProcedureEvidenceSequence (0040,A375) ([listener] "
                        f"max_rejection_items; SOPInstanceUID={self.sop!r}, source={self.source})",
                        tag="CurrentRequestedProcedureEvidenceSequence",
                        uid=self.sop,
                    )
            item_undefined = length == _UNDEFINED
            item_end = end if item_undefined else pos + 8 + length
            if item_end > end:
                raise _Unwalkable("an item runs past the end of its sequence")
            uid, children, pos = self.item(pos + 8, item_end, item_undefined, implicit, little, level, depth)
            if level < 2:
                out.append((uid, children))
            elif level == 2:
                out.append(uid)

    def item(
        self, pos: int, end: int, undefined: bool, implicit: bool, little: bool, level: int, depth: int
    ) -> tuple[bytes | None, list[Any], int]:
        """One item's UID (raw value) and next-level items; the offset after the item."""
        uid_tag, child_tag = _EVIDENCE_LEVELS[level]
        head = _LE_HEAD if little else _BE_HEAD
        u32 = _LE_L if little else _BE_L
        uid: bytes | None = None
        children: list[Any] = []
        while pos < end:
            if pos + 8 > end:
                raise _Unwalkable("an element header runs past the end of its item")
            header = self.get(pos, min(12, end - pos))
            group, elem, vr, length = head.unpack_from(header, 0)
            tag = group << 16 | elem
            if group == 0xFFFE or implicit:
                vr = None
                length = u32.unpack_from(header, 4)[0]
                start = pos + 8
            elif vr in _LONG_VRS:
                if pos + 12 > end:
                    raise _Unwalkable("an element header runs past the end of its item")
                length = u32.unpack_from(header, 8)[0]
                start = pos + 12
            elif vr in _ALL_VRS:
                start = pos + 8
            else:
                vr = None
                length = u32.unpack_from(header, 4)[0]
                start = pos + 8
            if tag == _ITEM_END:
                if not undefined:
                    raise _Unwalkable("an item delimiter in a defined-length item")
                return uid, children, start
            inner_implicit, inner_little = (True, True) if vr == b"UN" else (implicit, little)
            is_child = tag == child_tag and vr in (None, b"SQ", b"UN")
            if length == _UNDEFINED:
                found, pos = self.sequence(
                    start, end, True, inner_implicit, inner_little, level + 1 if is_child else 3, depth + 1
                )
                if is_child:
                    children = found
                continue
            value_end = start + length
            if value_end > end:
                raise _Unwalkable("a value runs past the end of its item")
            if tag == uid_tag:
                uid = self.get(start, length) if length <= _MAX_UID_VALUE else b"-"
            elif is_child:
                children = self.sequence(
                    start, value_end, False, inner_implicit, inner_little, level + 1, depth + 1
                )[0]
            pos = value_end
        if undefined:
            raise _Unwalkable("an item without its delimiter")
        return uid, children, pos
