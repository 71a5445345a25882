"""pydicom ``Dataset`` → :class:`~ingest.core.records.InstanceRecord`, or a :class:`HeaderError`.

One of the three core modules that import pydicom (with :mod:`ingest.core.tags` for tag constants and
:mod:`ingest.core.terminology` for SOP Class names); the only one that decodes. pydicom decodes lazily, so
:func:`extract` reads every element the record needs up front, inside one ``try``; after it returns,
nothing can fail later on a half-read dataset.

Rules (docs/architecture.md "Acceptance", docs/mapping.md):

- Study/Series/SOP Instance/SOP Class UIDs must be present (:class:`MissingTagError`) and follow the
  DICOM UID grammar (:class:`InvalidUIDError`).
- DICOMDIR, Color Palette and other non-patient objects: :class:`NotPatientInstanceError`.
- Sequences nested deeper than pydicom can parse: :class:`NestingTooDeepError`.
- A bad *optional* value (non-integer or negative IS, a code item without code or designator, an
  undecodable character) is dropped, with a message in :attr:`InstanceRecord.warnings`.
- Anything else that fails to decode: :class:`HeaderError` naming the tag and the UID or source.

Raw (undecoded) elements are decoded here, with the dataset's Specific Character Set; this is both
faster than pydicom's generic value conversion and free of pydicom's validation warnings, which may
quote values (patient data) in log messages.

Two entry points share one implementation: :func:`extract` takes a pydicom ``Dataset``;
:func:`extract_elements` takes the plain ``{tag: RawDataElement}`` mapping the file reader builds
(no ``Dataset`` is made for it, which is most of the per-file cost pydicom would add; pydicom still
parses sequences, via a small ``Dataset`` made only for the sequence at hand). The evidence of a Key
Object Selection Document (0040,A375), which may name hundreds of thousands of instances, never goes
through pydicom on that path: the file reader walks it, counting against its cap, and hands over only
the UIDs (:class:`EvidenceUids`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, TypeVar, cast

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import TEXT_VR_DELIMS
from pydicom.valuerep import PersonName as PydicomPersonName

from ingest.core.lifecycle import KEY_OBJECT_SELECTION
from ingest.core.records import Code, InstanceRecord, OrderReference, PersonName, SopReference
from ingest.core.tags import NON_PATIENT_SOP_CLASSES, tag_of
from ingest.errors import (
    HeaderError,
    IngestError,
    InvalidUIDError,
    MissingTagError,
    NestingTooDeepError,
    NotPatientInstanceError,
)

__all__ = ["EvidenceUids", "extract", "extract_elements", "valid_uid"]

_T = TypeVar("_T")
_Element: TypeAlias = "DataElement | RawDataElement"

# DICOM UID grammar (PS3.5 9.1; docs/mapping.md "UID validity"): digits, no leading zeros, no empty component.
_UID_RE: Final = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*", re.ASCII)
_UID_MAX_LEN: Final = 64
# unsignedInt / positiveInt upper bound (FHIR R4 datatypes)
_INT_MAX: Final = 2**31 - 1
# Value representations whose bytes depend on the Specific Character Set (PS3.5 6.1.2.3)
_CHARSET_VRS: Final = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
_DEFAULT_ENCODINGS: Final = ("iso8859",)
_ESC: Final = 0x1B

_T_CHARSET: Final = int(tag_of("SpecificCharacterSet"))
_T_FILE_SET_ID: Final = int(tag_of("FileSetID"))
_T_DIRECTORY_RECORDS: Final = int(tag_of("DirectoryRecordSequence"))
_MEDIA_STORAGE_DIRECTORY: Final = "1.2.840.10008.1.3.10"

# keyword -> tag as a plain int (dict lookups with int keys never call BaseTag.__eq__)
_KEYWORD_TAGS: dict[str, int] = {}
# tag -> dictionary VR, for implicit VR and UN elements ("UN" when the dictionary has no entry)
_DICTIONARY_VRS: dict[int, str] = {}


def _tag(keyword: str) -> int:
    """The tag of a DICOM keyword, as an int (cached)."""
    tag = _KEYWORD_TAGS.get(keyword)
    if tag is None:
        tag = _KEYWORD_TAGS[keyword] = int(tag_of(keyword))
    return tag


def _dictionary_vr(tag: int) -> str:
    """The PS3.6 dictionary VR of *tag*, ``"UN"`` when unknown (cached)."""
    vr = _DICTIONARY_VRS.get(tag)
    if vr is None:
        from pydicom.datadict import dictionary_VR

        try:
            vr = str(dictionary_VR(tag))
        except KeyError:
            vr = "UN"
        _DICTIONARY_VRS[tag] = vr
    return vr


def valid_uid(value: str) -> bool:
    """Return whether *value* is a valid DICOM UID.

    Parameters
    ----------
    value:
        The candidate UID, without padding.

    Returns
    -------
    bool
        ``True`` when it has at most 64 characters and matches
        ``^(0|[1-9][0-9]*)(\\.(0|[1-9][0-9]*))*$``: components of digits, no leading zeros, no
        empty components (so no ``..``, no leading or trailing dot, no ``/``).
    """
    return len(value) <= _UID_MAX_LEN and _UID_RE.fullmatch(value) is not None


def _show(value: str) -> str:
    """Quote a (non-patient) value for an error message, bounded in length."""
    return repr(value if len(value) <= 80 else value[:77] + "...")


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _OptionalDropped(Exception):
    """An optional value is unusable; the message (no patient data) becomes a record warning."""


class _Reader:
    """Reads text, names, integers and code items from one dataset level with its character set.

    The level is a pydicom ``Dataset`` (sequence items, datasets built in memory) or the plain
    ``{int tag: element}`` mapping of the file reader.
    """

    __slots__ = ("_ds", "_get", "_source", "encodings", "warnings")

    def __init__(
        self, source: Dataset | Mapping[int, _Element], encodings: Sequence[str], warnings: list[str]
    ) -> None:
        self._source = source
        self._ds: Dataset | None
        self._get: Callable[[int], _Element | None]
        if isinstance(source, Dataset):
            self._ds = source
            self._get = cast("Callable[[int], _Element | None]", source.get_item)
        else:
            self._ds = None
            self._get = source.get
        self.warnings = warnings
        self.encodings = self._own_encodings(encodings)

    # -- low level ---------------------------------------------------------------------------------

    def element(self, tag: int) -> _Element | None:
        """The element at *tag*, raw (undecoded) if not converted yet; ``None`` if absent."""
        return self._get(tag)

    def has(self, tag: int) -> bool:
        """Whether the level holds an element at *tag*."""
        return tag in self._source

    def _own_encodings(self, parent: Sequence[str]) -> Sequence[str]:
        """The encodings of this level: its own (0008,0005), else the parent's (PS3.5 6.1.2.5)."""
        elem = self._get(_T_CHARSET)
        if elem is None:
            return parent
        if isinstance(elem, RawDataElement):
            raw = elem.value or b""
            terms: list[str] = [t.strip(" \0") for t in raw.decode("latin-1").split("\\")]
        else:
            value = elem.value
            terms = [str(v) for v in value] if isinstance(value, list | MultiValue) else [str(value or "")]
        if not any(terms):
            return parent
        try:
            return tuple(convert_encodings(terms))
        except Exception:  # an unknown term pydicom refuses (RAISE mode, or warnings as errors)
            self.warnings.append(
                "SpecificCharacterSet (0008,0005): unknown character set, using the default repertoire"
            )
            return _DEFAULT_ENCODINGS

    def decode(self, raw: bytes, keyword: str, *, charset: bool) -> str:
        """Decode raw text bytes; undecodable bytes become U+FFFD with a warning."""
        if not charset:
            return raw.decode("latin-1")  # default repertoire (PS3.5 6.1.2.1), never fails
        if _ESC not in raw:
            try:
                return raw.decode(self.encodings[0])
            except LookupError:
                self.warnings.append(f"{keyword}: unknown character set, decoded as ISO-IR 6")
                return raw.decode("latin-1")
            except UnicodeDecodeError:
                self.warnings.append(f"{keyword}: bytes invalid in the declared character set replaced")
                return raw.decode(self.encodings[0], errors="replace")
        key = (raw, tuple(self.encodings))
        text = _ESCAPED_MEMO.get(key)
        if text is not None:
            return text
        try:
            text = decode_bytes(raw, self.encodings, TEXT_VR_DELIMS)  # ISO 2022 code extensions
        except Exception:  # pydicom warns (or raises when warnings are errors) on bad escape sequences
            self.warnings.append(f"{keyword}: invalid code extension sequence, characters replaced")
            return raw.decode(self.encodings[0], errors="replace")
        if len(_ESCAPED_MEMO) >= _MEMO_MAX:
            _ESCAPED_MEMO.clear()
        _ESCAPED_MEMO[key] = text  # successes only: a failure is decoded (and reported) every time
        return text

    def strings(self, keyword: str, *, split: bool = True) -> list[str] | None:
        """All values of a string element, each stripped of padding; ``None`` when absent.

        An element that is present but empty gives ``[]``.
        """
        tag = _tag(keyword)
        elem = self._get(tag)
        if elem is None:
            return None
        if isinstance(elem, RawDataElement):
            raw = elem.value
            if not raw:
                return []
            if not isinstance(raw, bytes):  # pydicom only stores bytes raw; anything else is corrupt
                raise TypeError(f"unexpected raw value type {type(raw).__name__}")
            vr = elem.VR
            if not vr or vr == "UN":  # implicit VR, or UN: the dictionary VR
                vr = _dictionary_vr(tag)
            text = self.decode(raw.rstrip(b"\0 "), keyword, charset=vr in _CHARSET_VRS)
            parts = text.split("\\") if split else [text]
        else:
            parts = _as_strings(elem.value)
        return [p.strip(" \0") for p in parts]

    def text(self, keyword: str, *, split: bool = True) -> str | None:
        """The first non-empty value of a string element, else ``None``."""
        values = self.strings(keyword, split=split)
        if values:
            for value in values:
                if value:
                    return value
        return None

    # -- typed readers ------------------------------------------------------------------------------

    def integer(self, keyword: str) -> int | None:
        """An IS value as a non-negative int; blank, non-integer or negative → ``None`` + warning."""
        values = self.strings(keyword)
        if values is None:
            return None
        where = f"{keyword} {_tag_text(_tag(keyword))}"
        first = values[0] if values else ""
        if not first:
            raise _OptionalDropped(f"{where}: blank IS value dropped")
        try:
            number = int(first)
        except ValueError:
            raise _OptionalDropped(f"{where}: non-integer IS value dropped") from None
        if number < 0:
            raise _OptionalDropped(f"{where}: negative IS value dropped")
        if number > _INT_MAX:
            raise _OptionalDropped(f"{where}: IS value above 2^31-1 dropped")
        return number

    def names(self, keyword: str) -> tuple[PersonName, ...]:
        """All values of a PN element, split into the alphabetic/ideographic/phonetic groups."""
        tag = _tag(keyword)
        elem = self._get(tag)
        if elem is None:
            return ()
        if isinstance(elem, RawDataElement):
            raw = elem.value
            if not raw:
                return ()
            if not isinstance(raw, bytes):  # pydicom only stores bytes raw; anything else is corrupt
                raise TypeError(f"unexpected raw value type {type(raw).__name__}")
            key = (raw, tuple(self.encodings))
            memo = _NAMES_MEMO.get(key)
            if memo is not None:
                return memo
            before = len(self.warnings)
            values = self.decode(raw.rstrip(b"\0 "), keyword, charset=True).split("\\")
            result = self._split_names(keyword, tag, values)
            if len(self.warnings) == before:  # remember warning-free results only (they need no message)
                if len(_NAMES_MEMO) >= _MEMO_MAX:
                    _NAMES_MEMO.clear()
                _NAMES_MEMO[key] = result
            return result
        return self._split_names(keyword, tag, _pn_strings(elem.value))

    def _split_names(self, keyword: str, tag: int, values: list[str]) -> tuple[PersonName, ...]:
        """PN values (``alphabetic=ideographic=phonetic``) as :class:`PersonName`\\ s."""
        result: list[PersonName] = []
        for value in values:
            groups = value.split("=")
            if len(groups) > 3:
                self.warnings.append(f"{keyword} {_tag_text(tag)}: more than three component groups")
            groups = [*groups[:3], "", ""][:3]
            if not any(g.strip("^ ") for g in groups):
                continue
            result.append(_person_name(groups[0], groups[1], groups[2]))
        return tuple(result)

    def name(self, keyword: str) -> PersonName | None:
        """The first value of a PN element."""
        names = self.names(keyword)
        return names[0] if names else None

    def _sequence_value(self, tag: int) -> Any:
        """The converted value of the sequence at *tag* (pydicom parses the bytes); ``None`` if absent."""
        ds = self._ds
        if ds is None:
            elem = self._get(tag)
            if elem is None:
                return None
            if not isinstance(elem, RawDataElement):
                return elem.value
            # only this sequence, with the level's character set, goes through pydicom
            key = BaseTag(tag)
            elements: dict[BaseTag, _Element] = {key: elem._replace(tag=key)}
            charset = self._get(_T_CHARSET)
            if charset is not None:
                cs_key = BaseTag(_T_CHARSET)
                if isinstance(charset, RawDataElement):
                    charset = charset._replace(tag=cs_key)
                elements[cs_key] = charset
            ds = Dataset(elements)
            return ds[key].value
        if tag not in ds:
            return None
        return ds[tag].value

    def items(self, keyword: str) -> list[_Reader]:
        """Readers for the items of a sequence (decoded here; nested items inherit the character set)."""
        value = self._sequence_value(_tag(keyword))
        if value is None or value == "":
            return []
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise TypeError(f"{keyword} {_tag_text(_tag(keyword))} is not a sequence")
        return [_Reader(item, self.encodings, self.warnings) for item in value if isinstance(item, Dataset)]

    def codes(self, keyword: str) -> tuple[Code, ...]:
        """The code items of a code sequence (PS3.3 8.8); incomplete items dropped with a warning."""
        tag = _tag(keyword)
        result: list[Code] = []
        for index, item in enumerate(self.items(keyword)):
            value = item.text("CodeValue") or item.text("LongCodeValue") or item.text("URNCodeValue")
            designator = item.text("CodingSchemeDesignator")
            if not value or not designator:
                self.warnings.append(
                    f"{keyword} {_tag_text(tag)} item {index}: dropped, "
                    "no Code Value (0008,0100) or Coding Scheme Designator (0008,0102)"
                )
                continue
            result.append(
                Code(
                    designator=designator,
                    value=value,
                    meaning=item.text("CodeMeaning", split=False),
                    version=item.text("CodingSchemeVersion"),
                )
            )
        return tuple(result)

    # -- optional values: a failure drops the value with a warning instead of the instance ----------

    def _dropped(self, keyword: str, exc: Exception) -> None:
        if isinstance(exc, _OptionalDropped):
            self.warnings.append(str(exc))
        else:
            self.warnings.append(
                f"{keyword} {_tag_text(_tag(keyword))}: undecodable value dropped ({type(exc).__name__})"
            )

    def opt_text(self, keyword: str, *, split: bool = True) -> str | None:
        """:meth:`text`, or ``None`` with a warning when the value cannot be decoded.

        The common case (a raw value that decodes without a warning, no code extensions) is handled
        inline; everything else takes the general path, which gives the same result and warnings.
        """
        tag = _KEYWORD_TAGS.get(keyword) or _tag(keyword)
        try:
            elem = self._get(tag)
        except Exception:  # a pydicom deferred read failing: the general path reports it
            return self._opt_text(keyword, split)
        if elem is None:
            return None
        if elem.__class__ is RawDataElement:
            raw = elem.value
            if raw.__class__ is bytes:
                if not raw:
                    return None
                vr = elem.VR
                if not vr or vr == "UN":  # implicit VR, or UN: the dictionary VR
                    vr = _dictionary_vr(tag)
                raw = raw.rstrip(b"\0 ")
                text: str | None = None
                if vr not in _CHARSET_VRS:
                    text = raw.decode("latin-1")  # default repertoire (PS3.5 6.1.2.1)
                elif _ESC not in raw:
                    try:
                        text = raw.decode(self.encodings[0])
                    except (LookupError, UnicodeDecodeError):
                        text = None  # the general path decodes it again, with its warning
                if text is not None:
                    if split and "\\" in text:  # the first non-empty value of a multi-valued element
                        for part in text.split("\\"):
                            part = part.strip(" \0")
                            if part:
                                return part
                        return None
                    return text.strip(" \0") or None
        return self._opt_text(keyword, split)

    def _opt_text(self, keyword: str, split: bool) -> str | None:
        try:
            return self.text(keyword, split=split)
        except RecursionError:
            raise
        except Exception as exc:
            self._dropped(keyword, exc)
            return None

    def opt_integer(self, keyword: str) -> int | None:
        """:meth:`integer`, or ``None`` with a warning when the value is unusable."""
        try:
            return self.integer(keyword)
        except RecursionError:
            raise
        except Exception as exc:
            self._dropped(keyword, exc)
            return None

    def opt_names(self, keyword: str) -> tuple[PersonName, ...]:
        """:meth:`names`, or ``()`` with a warning when the value cannot be decoded."""
        try:
            return self.names(keyword)
        except RecursionError:
            raise
        except Exception as exc:
            self._dropped(keyword, exc)
            return ()

    def opt_name(self, keyword: str) -> PersonName | None:
        """:meth:`name`, or ``None`` with a warning when the value cannot be decoded."""
        try:
            return self.name(keyword)
        except RecursionError:
            raise
        except Exception as exc:
            self._dropped(keyword, exc)
            return None

    def opt_codes(self, keyword: str) -> tuple[Code, ...]:
        """The code items of a code sequence, decoded once per distinct encoding (see
        :func:`_memo_sequence`); ``()`` with a warning when the sequence cannot be parsed."""
        try:
            return _memo_sequence(self, keyword, lambda: self.codes(keyword))
        except RecursionError:
            raise
        except Exception as exc:
            self._dropped(keyword, exc)
            return ()

    def opt_first_item(self, keyword: str) -> _ItemTexts | None:
        """The :data:`_ITEM_FIELDS` texts of a sequence's first item (memoised like codes)."""

        def read() -> _ItemTexts | None:
            items = self.items(keyword)
            if not items:
                return None
            first = items[0]
            return {field: first.opt_text(field, split=False) for field in _ITEM_FIELDS}

        try:
            return _memo_sequence(self, keyword, read)
        except RecursionError:
            raise
        except Exception as exc:
            self._dropped(keyword, exc)
            return None


_ItemTexts = dict[str, str | None]
# The item fields read from single-item sequences (issuer qualifiers, concept name).
_ITEM_FIELDS: Final = ("UniversalEntityID", "UniversalEntityIDType", "LocalNamespaceEntityID", "CodeMeaning")
_SEQ_MEMO: dict[tuple[Any, ...], tuple[Any, tuple[str, ...]]] = {}
_SEQ_MEMO_MAX: Final = 4096
_MEMO_MAX: Final = 4096
# ISO 2022 text (code extensions) decoded by pydicom, keyed by the bytes and the encodings: names and
# descriptions repeat across the instances of a study, and pydicom's decoder is slow.
_ESCAPED_MEMO: dict[tuple[bytes, tuple[str, ...]], str] = {}
# PN values decoded and split, keyed like _ESCAPED_MEMO (a study repeats its names in every instance)
_NAMES_MEMO: dict[tuple[bytes, tuple[str, ...]], tuple[PersonName, ...]] = {}
# Decoded person names, shared between records (they are frozen): the instances of a study repeat
# the same names, and shared objects pickle once per batch when records cross processes.
_NAME_MEMO: dict[tuple[str, str, str], PersonName] = {}


def _person_name(alphabetic: str, ideographic: str, phonetic: str) -> PersonName:
    key = (alphabetic, ideographic, phonetic)
    name = _NAME_MEMO.get(key)
    if name is None:
        if len(_NAME_MEMO) >= _MEMO_MAX:
            _NAME_MEMO.clear()
        name = _NAME_MEMO[key] = PersonName(alphabetic=alphabetic, ideographic=ideographic, phonetic=phonetic)
    return name


def _memo_sequence(reader: _Reader, keyword: str, compute: Callable[[], _T]) -> _T:
    """Decode a sequence once per distinct encoding in this process.

    The instances of a study repeat the same study- and series-level sequences byte for byte; parsing a
    sequence is the costliest part of extraction, so the decoded result (and the warnings it produced) is
    remembered, keyed by the raw bytes and everything that affects their meaning. Results are immutable.
    """
    elem = reader.element(_tag(keyword))
    if not isinstance(elem, RawDataElement) or not isinstance(elem.value, bytes):
        return compute()
    key = (keyword, elem.value, elem.is_implicit_VR, elem.is_little_endian, tuple(reader.encodings))
    hit = _SEQ_MEMO.get(key)
    if hit is not None:
        reader.warnings.extend(hit[1])
        return cast("_T", hit[0])
    before = len(reader.warnings)
    result = compute()
    if len(_SEQ_MEMO) >= _SEQ_MEMO_MAX:
        _SEQ_MEMO.clear()
    _SEQ_MEMO[key] = (result, tuple(reader.warnings[before:]))
    return result


def _as_strings(value: Any) -> list[str]:
    """Values of an already converted element as strings."""
    if value is None:
        return []
    if isinstance(value, bytes):
        return value.decode("latin-1").split("\\")
    if isinstance(value, list | tuple | MultiValue):
        return [str(v) if v is not None else "" for v in value]
    return [str(value)]


def _pn_strings(value: Any) -> list[str]:
    """Values of an already converted PN element, each as ``alphabetic=ideographic=phonetic``."""
    if value is None:
        return []
    if isinstance(value, PydicomPersonName):
        return ["=".join(value.components)]
    if isinstance(value, list | tuple | MultiValue):
        return [s for v in value for s in _pn_strings(v)]
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return str(value).split("\\")


def _check_uid(reader: _Reader, keyword: str, sop_uid: str | None, source: str) -> str:
    """Return a required UID, or raise MissingTagError / InvalidUIDError."""
    tag = _tag(keyword)
    where = f"SOPInstanceUID={sop_uid!r}" if sop_uid and keyword != "SOPInstanceUID" else "instance"
    values = reader.strings(keyword)
    if not values or not values[0]:
        raise MissingTagError(
            f"Missing required tag {keyword} {_tag_text(tag)} in {where} (source={source})",
            tag=keyword,
            uid=sop_uid,
        )
    value = "\\".join(values)
    if not valid_uid(value):
        raise InvalidUIDError(
            f"Invalid UID {_show(value)} in {keyword} {_tag_text(tag)}: must be at most 64 characters "
            f"of dot-separated digit components without leading zeros ({where}, source={source})",
            tag=keyword,
            uid=sop_uid,
        )
    return value


def extract(ds: Dataset, *, source: str = "") -> InstanceRecord:
    """Read everything :class:`InstanceRecord` needs from a dataset, and check acceptance.

    Parameters
    ----------
    ds:
        A dataset as read by pydicom (raw, lazily decoded elements) or built in memory. Its
        ``file_meta`` (if any) supplies the transfer syntax and, for DICOMDIR detection, the Media
        Storage SOP Class UID.
    source:
        Where the dataset came from (a path, ``dimse:<AE>``), used in error messages only.

    Returns
    -------
    InstanceRecord
        The record; optional values that could not be used are omitted and described in
        ``warnings`` (no patient data).

    Raises
    ------
    NotPatientInstanceError
        DICOMDIR, Color Palette and other objects that are not a patient's instance.
    MissingTagError
        Study/Series/SOP Instance UID or SOP Class UID absent or empty.
    InvalidUIDError
        One of those UIDs breaks the DICOM UID grammar.
    NestingTooDeepError
        Sequences nested too deep to parse (pydicom raised ``RecursionError``).
    HeaderError
        Any other decode failure of a required element.
    """

    def meta() -> tuple[str | None, str | None]:
        file_meta = getattr(ds, "file_meta", None)
        if file_meta is None:
            return None, None
        # (0002,0010) Transfer Syntax UID, (0002,0002) Media Storage SOP Class UID
        return _meta_text(file_meta, 0x00020010), _meta_text(file_meta, 0x00020002)

    return _extract(ds, meta, source)


@dataclass(frozen=True)
class EvidenceUids:
    """A Key Object Selection Document's Current Requested Procedure Evidence (0040,A375) as the file
    reader walked it: no pydicom item is made for it.

    Attributes
    ----------
    studies:
        One entry per item: its raw (0020,000D) Study Instance UID value and, per (0008,1115) Referenced
        Series item, the raw (0020,000E) Series Instance UID value and the raw (0008,1155) Referenced SOP
        Instance UID value of each (0008,1199) Referenced SOP item. ``None``: the element is absent.
    undecodable:
        Why the sequence could not be walked (the evidence is then dropped with a warning), or ``None``.
    """

    studies: Sequence[tuple[bytes | None, Sequence[tuple[bytes | None, Sequence[bytes | None]]]]] = ()
    undecodable: str | None = None


def extract_elements(
    elements: Mapping[int, DataElement | RawDataElement],
    *,
    transfer_syntax_uid: str | None = None,
    media_sop_class_uid: str | None = None,
    source: str = "",
    evidence: EvidenceUids | None = None,
) -> InstanceRecord:
    """Like :func:`extract`, for the top-level elements of a dataset held in a plain mapping.

    This is the file reader's fast path: no pydicom ``Dataset`` is built for the instance. The
    result, warnings and errors are those :func:`extract` gives for a ``Dataset`` of the same
    elements with a file meta group holding the two UIDs.

    Parameters
    ----------
    elements:
        ``{tag: element}`` with ``int`` tags; elements are usually pydicom ``RawDataElement``\\ s
        (undecoded bytes), as the reader in :mod:`ingest.adapters.dicomfile` makes them.
    transfer_syntax_uid:
        (0002,0010) Transfer Syntax UID of the file meta group, if any.
    media_sop_class_uid:
        (0002,0002) Media Storage SOP Class UID of the file meta group, if any (DICOMDIR detection).
    source:
        Where the dataset came from (a path, ``dimse:<AE>``), used in error messages only.
    evidence:
        The (0040,A375) evidence as the reader walked it, read instead of an element in ``elements``
        for a Key Object Selection Document (same references and warnings).

    Returns
    -------
    InstanceRecord
        As :func:`extract`.

    Raises
    ------
    HeaderError
        As :func:`extract`.
    """

    def meta() -> tuple[str | None, str | None]:
        return _meta_value(transfer_syntax_uid), _meta_value(media_sop_class_uid)

    return _extract(elements, meta, source, evidence)


def _meta_value(value: str | None) -> str | None:
    return None if value is None else value.strip(" \0") or None


def _extract(
    source_ds: Dataset | Mapping[int, _Element],
    meta: Callable[[], tuple[str | None, str | None]],
    source: str,
    given_evidence: EvidenceUids | None = None,
) -> InstanceRecord:
    """The body of :func:`extract` and :func:`extract_elements` (same rules, same messages)."""
    src = source or "<dataset>"
    warnings: list[str] = []
    keyword = "SOPInstanceUID"
    sop_uid: str | None = None
    try:
        reader = _Reader(source_ds, _DEFAULT_ENCODINGS, warnings)
        transfer_syntax, meta_sop_class = meta()

        # (0008,0018) first, so every later message can name the instance
        raw_sop = reader.strings("SOPInstanceUID")
        sop_uid = raw_sop[0] if raw_sop else None
        keyword = "SOPClassUID"
        sop_class = reader.text("SOPClassUID") or meta_sop_class
        # a DICOMDIR: Media Storage Directory SOP class, or Basic Directory attributes (group 0004)
        is_directory = (
            sop_class == _MEDIA_STORAGE_DIRECTORY
            or reader.has(_T_FILE_SET_ID)
            or reader.has(_T_DIRECTORY_RECORDS)
        )
        if is_directory or (sop_class in NON_PATIENT_SOP_CLASSES):
            raise NotPatientInstanceError(
                f"Not a patient instance: SOP class {_show(sop_class or 'Media Storage Directory')} "
                f"(DICOMDIR, Color Palette and other non-patient objects are not ingested; source={src})",
                tag="SOPClassUID",
                uid=sop_uid,
            )
        keyword = "SOPInstanceUID"
        sop_uid = _check_uid(reader, "SOPInstanceUID", None, src)
        keyword = "SOPClassUID"
        sop_class_uid = _check_uid(reader, "SOPClassUID", sop_uid, src)
        keyword = "StudyInstanceUID"
        study_uid = _check_uid(reader, "StudyInstanceUID", sop_uid, src)
        keyword = "SeriesInstanceUID"
        series_uid = _check_uid(reader, "SeriesInstanceUID", sop_uid, src)
        keyword = "optional attributes"

        text = reader.opt_text
        names = reader.opt_names
        integer = reader.opt_integer
        codes = reader.opt_codes

        # (0010,0024) Issuer of Patient ID Qualifiers > (0040,0032) / (0040,0033)
        pid_issuer = reader.opt_first_item("IssuerOfPatientIDQualifiersSequence") or {}
        # (0008,0051) Issuer of Accession Number > (0040,0031) / (0040,0032) / (0040,0033)
        acc_issuer = reader.opt_first_item("IssuerOfAccessionNumberSequence") or {}
        # (0038,0014) Issuer of Admission ID > (0040,0031) / (0040,0032) / (0040,0033)
        adm_issuer = reader.opt_first_item("IssuerOfAdmissionIDSequence") or {}
        # (0040,A043) Concept Name Code Sequence > (0008,0104) Code Meaning, for SR documents
        concept = reader.opt_first_item("ConceptNameCodeSequence") or {}
        # (0020,0060) Laterality, else (0020,0062) Image Laterality
        laterality = text("Laterality") or text("ImageLaterality")
        # a Key Object Selection Document: its title as a code and the instances it names (IOCM)
        concept_code: Code | None = None
        evidence: tuple[SopReference, ...] = ()
        if sop_class_uid == KEY_OBJECT_SELECTION:
            # not opt_codes: its memo is keyed by the sequence, which opt_first_item read above
            try:
                titles = reader.codes("ConceptNameCodeSequence")
            except RecursionError:
                raise
            except Exception as exc:
                reader._dropped("ConceptNameCodeSequence", exc)
                titles = ()
            concept_code = titles[0] if titles else None
            if given_evidence is None:
                evidence = _opt_evidence(reader)
            else:
                evidence = _walked_evidence(given_evidence, reader.warnings)

        return InstanceRecord(
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=sop_uid,
            sop_class_uid=sop_class_uid,
            transfer_syntax_uid=transfer_syntax or None,
            patient_id=text("PatientID"),
            patient_id_issuer=text("IssuerOfPatientID"),
            patient_id_issuer_uid=pid_issuer.get("UniversalEntityID"),
            patient_id_issuer_uid_type=pid_issuer.get("UniversalEntityIDType"),
            patient_name=reader.opt_name("PatientName"),
            patient_sex=text("PatientSex"),
            patient_birth_date=text("PatientBirthDate"),
            study_date=text("StudyDate"),
            study_time=text("StudyTime"),
            timezone_offset=text("TimezoneOffsetFromUTC"),
            accession_number=text("AccessionNumber"),
            accession_issuer_uid=acc_issuer.get("UniversalEntityID"),
            accession_issuer_uid_type=acc_issuer.get("UniversalEntityIDType"),
            accession_issuer_local=acc_issuer.get("LocalNamespaceEntityID"),
            study_id=text("StudyID"),
            study_description=text("StudyDescription", split=False),
            referring_physician=reader.opt_name("ReferringPhysicianName"),
            reading_physicians=names("NameOfPhysiciansReadingStudy"),
            procedure_codes=codes("ProcedureCodeSequence"),
            reason_text=text("ReasonForTheRequestedProcedure", split=False),
            reason_codes=codes("ReasonForRequestedProcedureCodeSequence"),
            admission_id=text("AdmissionID"),
            admission_issuer_uid=adm_issuer.get("UniversalEntityID"),
            admission_issuer_uid_type=adm_issuer.get("UniversalEntityIDType"),
            admission_issuer_local=adm_issuer.get("LocalNamespaceEntityID"),
            referrer_ids=_opt_person_ids(reader, "ReferringPhysicianIdentificationSequence"),
            requests=_opt_requests(reader),
            modality=text("Modality"),
            series_number=integer("SeriesNumber"),
            series_description=text("SeriesDescription", split=False),
            body_part=text("BodyPartExamined"),
            laterality=laterality,
            series_date=text("SeriesDate"),
            series_time=text("SeriesTime"),
            performing_physicians=names("PerformingPhysicianName"),
            operators=names("OperatorsName"),
            instance_number=integer("InstanceNumber"),
            content_label=text("ContentLabel"),
            number_of_frames=integer("NumberOfFrames"),
            concept_name=concept.get("CodeMeaning"),
            concept_code=concept_code,
            evidence=evidence,
            warnings=tuple(dict.fromkeys(warnings)),
        )
    except IngestError:
        raise
    except RecursionError as exc:
        raise NestingTooDeepError(
            f"Sequences nested too deep to parse while reading {keyword} "
            f"(SOPInstanceUID={sop_uid!r}, source={src})",
            tag=keyword,
            uid=sop_uid,
        ) from exc
    except Exception as exc:
        raise HeaderError(
            f"Cannot decode {keyword} ({type(exc).__name__}) in SOPInstanceUID={sop_uid!r} (source={src})",
            tag=keyword,
            uid=sop_uid,
        ) from exc


def _evidence(reader: _Reader) -> tuple[SopReference, ...]:
    """The instances (0040,A375) Current Requested Procedure Evidence names: each item's Study Instance
    UID, > (0008,1115) Referenced Series items' Series Instance UID, > (0008,1199) Referenced SOP items'
    (0008,1155). A reference without a valid UID at any level is dropped with a warning."""
    where = "CurrentRequestedProcedureEvidenceSequence (0040,A375)"
    found: dict[str, SopReference] = {}
    for s_index, study in enumerate(reader.items("CurrentRequestedProcedureEvidenceSequence")):
        study_uid = study.text("StudyInstanceUID")
        if study_uid is None or not valid_uid(study_uid):
            reader.warnings.append(f"{where} item {s_index}: dropped, no valid Study Instance UID")
            continue
        for r_index, series in enumerate(study.items("ReferencedSeriesSequence")):
            series_uid = series.text("SeriesInstanceUID")
            if series_uid is None or not valid_uid(series_uid):
                reader.warnings.append(
                    f"{where} item {s_index} series {r_index}: dropped, no valid Series Instance UID"
                )
                continue
            for i_index, sop in enumerate(series.items("ReferencedSOPSequence")):
                sop_uid = sop.text("ReferencedSOPInstanceUID")
                if sop_uid is None or not valid_uid(sop_uid):
                    reader.warnings.append(
                        f"{where} item {s_index} series {r_index} instance {i_index}: dropped, "
                        "no valid Referenced SOP Instance UID"
                    )
                    continue
                found.setdefault(
                    sop_uid, SopReference(study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid)
                )
    return tuple(found[uid] for uid in sorted(found))


def _uid_text(raw: bytes | None) -> str | None:
    """A raw UI value as :meth:`_Reader.text` reads it: its first non-empty value, unpadded."""
    if raw is None:
        return None
    for part in raw.rstrip(b"\0 ").decode("latin-1").split("\\"):
        value = part.strip(" \0")
        if value:
            return value
    return None


def _walked_evidence(given: EvidenceUids, warnings: list[str]) -> tuple[SopReference, ...]:
    """:func:`_evidence` over the UIDs the file reader walked (same references, same warnings)."""
    where = "CurrentRequestedProcedureEvidenceSequence (0040,A375)"
    if given.undecodable is not None:
        warnings.append(f"{where}: undecodable value dropped ({given.undecodable})")
        return ()
    found: dict[str, SopReference] = {}
    for s_index, (raw_study, series_items) in enumerate(given.studies):
        study_uid = _uid_text(raw_study)
        if study_uid is None or not valid_uid(study_uid):
            warnings.append(f"{where} item {s_index}: dropped, no valid Study Instance UID")
            continue
        for r_index, (raw_series, sops) in enumerate(series_items):
            series_uid = _uid_text(raw_series)
            if series_uid is None or not valid_uid(series_uid):
                warnings.append(
                    f"{where} item {s_index} series {r_index}: dropped, no valid Series Instance UID"
                )
                continue
            for i_index, raw_sop in enumerate(sops):
                sop_uid = _uid_text(raw_sop)
                if sop_uid is None or not valid_uid(sop_uid):
                    warnings.append(
                        f"{where} item {s_index} series {r_index} instance {i_index}: dropped, "
                        "no valid Referenced SOP Instance UID"
                    )
                    continue
                if sop_uid not in found:
                    found[sop_uid] = SopReference(study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid)
    return tuple(found[uid] for uid in sorted(found))


def _opt_evidence(reader: _Reader) -> tuple[SopReference, ...]:
    """:func:`_evidence`, or ``()`` with a warning when the sequence cannot be parsed."""
    try:
        return _evidence(reader)
    except RecursionError:
        raise
    except Exception as exc:
        reader.warnings.append(
            "CurrentRequestedProcedureEvidenceSequence (0040,A375): undecodable value dropped "
            f"({type(exc).__name__})"
        )
        return ()


#: At most this many Request Attributes items, and identification codes per person, are kept.
_MAX_REQUEST_ITEMS: Final = 16


def _opt_requests(reader: _Reader) -> tuple[OrderReference, ...]:
    """(0040,0275) Request Attributes Sequence items as :class:`OrderReference` (those naming nothing
    are left out, duplicates once); ``()`` with a warning when the sequence cannot be parsed."""
    keyword = "RequestAttributesSequence"
    try:
        found: list[OrderReference] = []
        for item in reader.items(keyword)[:_MAX_REQUEST_ITEMS]:
            issuers = item.items("IssuerOfAccessionNumberSequence")
            issuer = issuers[0] if issuers else None
            ref = OrderReference(
                accession_number=item.opt_text("AccessionNumber"),
                accession_issuer_uid=issuer.opt_text("UniversalEntityID") if issuer else None,
                accession_issuer_uid_type=issuer.opt_text("UniversalEntityIDType") if issuer else None,
                accession_issuer_local=issuer.opt_text("LocalNamespaceEntityID") if issuer else None,
                requested_procedure_id=item.opt_text("RequestedProcedureID"),
                placer_order_number=item.opt_text("PlacerOrderNumberImagingServiceRequest"),
                filler_order_number=item.opt_text("FillerOrderNumberImagingServiceRequest"),
            )
            named = (ref.accession_number, ref.requested_procedure_id, ref.placer_order_number,
                     ref.filler_order_number)
            if any(named) and ref not in found:
                found.append(ref)
        return tuple(found)
    except RecursionError:
        raise
    except Exception as exc:
        reader._dropped(keyword, exc)
        return ()


def _opt_person_ids(reader: _Reader, keyword: str) -> tuple[Code, ...]:
    """The identifiers of the first person item of a Person Identification Macro sequence (PS3.3
    10.1): its (0040,1101) Person Identification Code Sequence codes; ``()`` (with a warning when the
    sequence cannot be parsed) otherwise."""
    try:
        people = reader.items(keyword)
        if not people:
            return ()
        return people[0].codes("PersonIdentificationCodeSequence")[:_MAX_REQUEST_ITEMS]
    except RecursionError:
        raise
    except Exception as exc:
        reader._dropped(keyword, exc)
        return ()


def _meta_text(file_meta: Dataset, tag: int) -> str | None:
    """A UI value from the file meta group, raw or converted."""
    elem = cast("_Element | None", file_meta.get_item(tag))
    if elem is None:
        return None
    value: Iterable[str] | str
    if isinstance(elem, RawDataElement):
        raw = elem.value or b""
        value = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
    else:
        values = _as_strings(elem.value)
        value = values[0] if values else ""
    return str(value).strip(" \0") or None
