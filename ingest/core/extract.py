"""pydicom ``Dataset`` → :class:`~ingest.core.records.InstanceRecord`, or a :class:`HeaderError`.

The only core module besides :mod:`ingest.core.tags` that imports pydicom. pydicom decodes lazily, so
:func:`extract` reads every element the record needs up front, inside one ``try``; after it returns,
nothing can fail later on a half-read dataset (STYLE.md R4).

Rules (DESIGN.md "Acceptance", MAPPING.md):

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
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeVar, cast

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import TEXT_VR_DELIMS
from pydicom.valuerep import PersonName as PydicomPersonName

from ingest.core.records import Code, InstanceRecord, PersonName
from ingest.core.tags import NON_PATIENT_SOP_CLASSES, tag_of
from ingest.errors import (
    HeaderError,
    IngestError,
    InvalidUIDError,
    MissingTagError,
    NestingTooDeepError,
    NotPatientInstanceError,
)

__all__ = ["extract", "valid_uid"]

_T = TypeVar("_T")

# DICOM UID grammar (PS3.5 9.1; MAPPING.md "UID validity"): digits, no leading zeros, no empty component.
_UID_RE: Final = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*", re.ASCII)
_UID_MAX_LEN: Final = 64
# unsignedInt / positiveInt upper bound (FHIR R4 datatypes)
_INT_MAX: Final = 2**31 - 1
# Value representations whose bytes depend on the Specific Character Set (PS3.5 6.1.2.3)
_CHARSET_VRS: Final = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})
_DEFAULT_ENCODINGS: Final = ("iso8859",)
_ESC: Final = 0x1B

_T_CHARSET: Final = tag_of("SpecificCharacterSet")
_T_FILE_SET_ID: Final = tag_of("FileSetID")
_T_DIRECTORY_RECORDS: Final = tag_of("DirectoryRecordSequence")


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


def _tag_text(tag: BaseTag) -> str:
    return f"({tag.group:04X},{tag.element:04X})"


class _OptionalDropped(Exception):
    """An optional value is unusable; the message (no patient data) becomes a record warning."""


class _Reader:
    """Reads text, names, integers and code items from one dataset level with its character set."""

    def __init__(self, ds: Dataset, encodings: Sequence[str], warnings: list[str]) -> None:
        self.ds = ds
        self.warnings = warnings
        self.encodings = self._own_encodings(encodings)

    # -- low level ---------------------------------------------------------------------------------

    def _own_encodings(self, parent: Sequence[str]) -> Sequence[str]:
        """The encodings of this level: its own (0008,0005), else the parent's (PS3.5 6.1.2.5)."""
        elem = _element(self.ds, _T_CHARSET)
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
        try:
            return decode_bytes(raw, self.encodings, TEXT_VR_DELIMS)  # ISO 2022 code extensions
        except Exception:  # pydicom warns (or raises when warnings are errors) on bad escape sequences
            self.warnings.append(f"{keyword}: invalid code extension sequence, characters replaced")
            return raw.decode(self.encodings[0], errors="replace")

    def strings(self, keyword: str, *, split: bool = True) -> list[str] | None:
        """All values of a string element, each stripped of padding; ``None`` when absent.

        An element that is present but empty gives ``[]``.
        """
        tag = tag_of(keyword)
        elem = _element(self.ds, tag)
        if elem is None:
            return None
        if isinstance(elem, RawDataElement):
            raw = elem.value
            if not raw:
                return []
            if not isinstance(raw, bytes):  # pragma: no cover - pydicom only stores bytes raw
                raise TypeError(f"unexpected raw value type {type(raw).__name__}")
            vr = _vr_of(elem, tag)
            text = self.decode(raw.rstrip(b"\0 "), keyword, charset=vr in _CHARSET_VRS)
            parts = text.split("\\") if split else [text]
        else:
            parts = _as_strings(elem.value)
        return [p.strip(" \0") for p in parts]

    def text(self, keyword: str, *, split: bool = True) -> str | None:
        """The first non-empty value of a string element, else ``None``."""
        values = self.strings(keyword, split=split)
        if not values:
            return None
        return next((v for v in values if v), None)

    # -- typed readers ------------------------------------------------------------------------------

    def integer(self, keyword: str) -> int | None:
        """An IS value as a non-negative int; blank, non-integer or negative → ``None`` + warning."""
        values = self.strings(keyword)
        if values is None:
            return None
        tag = tag_of(keyword)
        where = f"{keyword} {_tag_text(tag)}"
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
        tag = tag_of(keyword)
        elem = _element(self.ds, tag)
        if elem is None:
            return ()
        if isinstance(elem, RawDataElement):
            raw = elem.value
            if not raw:
                return ()
            if not isinstance(raw, bytes):  # pragma: no cover - pydicom only stores bytes raw
                raise TypeError(f"unexpected raw value type {type(raw).__name__}")
            values = self.decode(raw.rstrip(b"\0 "), keyword, charset=True).split("\\")
        else:
            values = _pn_strings(elem.value)
        result: list[PersonName] = []
        for value in values:
            groups = value.split("=")
            if len(groups) > 3:
                self.warnings.append(f"{keyword} {_tag_text(tag)}: more than three component groups")
            groups = [*groups[:3], "", ""][:3]
            if not any(g.strip("^ ") for g in groups):
                continue
            result.append(PersonName(alphabetic=groups[0], ideographic=groups[1], phonetic=groups[2]))
        return tuple(result)

    def name(self, keyword: str) -> PersonName | None:
        """The first value of a PN element."""
        names = self.names(keyword)
        return names[0] if names else None

    def items(self, keyword: str) -> list[_Reader]:
        """Readers for the items of a sequence (decoded here; nested items inherit the character set)."""
        tag = tag_of(keyword)
        if tag not in self.ds:
            return []
        value = self.ds[tag].value  # pydicom parses the sequence bytes here
        if value is None or value == "":
            return []
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise TypeError(f"{keyword} {_tag_text(tag)} is not a sequence")
        return [_Reader(item, self.encodings, self.warnings) for item in value if isinstance(item, Dataset)]

    def codes(self, keyword: str) -> tuple[Code, ...]:
        """The code items of a code sequence (PS3.3 8.8); incomplete items dropped with a warning."""
        tag = tag_of(keyword)
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


def _element(ds: Dataset, tag: int) -> DataElement | RawDataElement | None:
    """The element at *tag*, raw (undecoded) if pydicom has not converted it yet; ``None`` if absent."""
    return cast("DataElement | RawDataElement | None", ds.get_item(tag))


def _vr_of(elem: RawDataElement, tag: BaseTag) -> str:
    """The element's VR: explicit from the file, else (implicit VR, or UN) the dictionary VR."""
    vr = elem.VR
    if vr and vr != "UN":
        return str(vr)
    from pydicom.datadict import dictionary_VR

    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


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


def _optional(warnings: list[str], default: _T, read: Callable[[], _T], keyword: str) -> _T:
    """Run one optional read; a failure drops the value with a warning instead of the instance."""
    try:
        return read()
    except _OptionalDropped as exc:
        warnings.append(str(exc))
    except RecursionError:
        raise
    except Exception as exc:
        warnings.append(
            f"{keyword} {_tag_text(tag_of(keyword))}: undecodable value dropped ({type(exc).__name__})"
        )
    return default


def _check_uid(reader: _Reader, keyword: str, sop_uid: str | None, source: str) -> str:
    """Return a required UID, or raise MissingTagError / InvalidUIDError."""
    tag = tag_of(keyword)
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


def _is_directory(ds: Dataset, sop_class: str | None) -> bool:
    """A DICOMDIR: Media Storage Directory SOP class, or Basic Directory attributes (group 0004)."""
    return sop_class == "1.2.840.10008.1.3.10" or _T_FILE_SET_ID in ds or _T_DIRECTORY_RECORDS in ds


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
    src = source or "<dataset>"
    warnings: list[str] = []
    keyword = "SOPInstanceUID"
    sop_uid: str | None = None
    try:
        reader = _Reader(ds, _DEFAULT_ENCODINGS, warnings)
        file_meta = getattr(ds, "file_meta", None)
        meta_sop_class: str | None = None
        transfer_syntax: str | None = None
        if file_meta is not None:
            transfer_syntax = _meta_text(file_meta, 0x00020010)  # (0002,0010) Transfer Syntax UID
            meta_sop_class = _meta_text(file_meta, 0x00020002)  # (0002,0002) Media Storage SOP Class

        # (0008,0018) first, so every later message can name the instance
        raw_sop = reader.strings("SOPInstanceUID")
        sop_uid = raw_sop[0] if raw_sop else None
        keyword = "SOPClassUID"
        sop_class = reader.text("SOPClassUID") or meta_sop_class
        if _is_directory(ds, sop_class) or (sop_class in NON_PATIENT_SOP_CLASSES):
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

        def opt(read: Callable[[], _T], kw: str, default: _T) -> _T:
            return _optional(warnings, default, read, kw)

        def text(kw: str, *, split: bool = True) -> str | None:
            return opt(lambda: reader.text(kw, split=split), kw, None)

        def names(kw: str) -> tuple[PersonName, ...]:
            return opt(lambda: reader.names(kw), kw, ())

        def integer(kw: str) -> int | None:
            return opt(lambda: reader.integer(kw), kw, None)

        def codes(kw: str) -> tuple[Code, ...]:
            return opt(lambda: reader.codes(kw), kw, ())

        def first_item(kw: str) -> _Reader | None:
            none: list[_Reader] = []
            items = opt(lambda: reader.items(kw), kw, none)
            return items[0] if items else None

        # (0010,0024) Issuer of Patient ID Qualifiers > (0040,0032) / (0040,0033)
        pid_issuer = first_item("IssuerOfPatientIDQualifiersSequence")
        # (0008,0051) Issuer of Accession Number > (0040,0031) / (0040,0032) / (0040,0033)
        acc_issuer = first_item("IssuerOfAccessionNumberSequence")
        # (0040,A043) Concept Name Code Sequence > (0008,0104) Code Meaning, for SR documents
        concept = first_item("ConceptNameCodeSequence")
        # (0020,0060) Laterality, else (0020,0062) Image Laterality
        laterality = text("Laterality") or text("ImageLaterality")

        def item_text(item: _Reader | None, kw: str) -> str | None:
            if item is None:
                return None
            return opt(lambda: item.text(kw, split=False), kw, None)

        return InstanceRecord(
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=sop_uid,
            sop_class_uid=sop_class_uid,
            transfer_syntax_uid=transfer_syntax or None,
            patient_id=text("PatientID"),
            patient_id_issuer=text("IssuerOfPatientID"),
            patient_id_issuer_uid=item_text(pid_issuer, "UniversalEntityID"),
            patient_id_issuer_uid_type=item_text(pid_issuer, "UniversalEntityIDType"),
            patient_name=opt(lambda: reader.name("PatientName"), "PatientName", None),
            patient_sex=text("PatientSex"),
            patient_birth_date=text("PatientBirthDate"),
            study_date=text("StudyDate"),
            study_time=text("StudyTime"),
            timezone_offset=text("TimezoneOffsetFromUTC"),
            accession_number=text("AccessionNumber"),
            accession_issuer_uid=item_text(acc_issuer, "UniversalEntityID"),
            accession_issuer_uid_type=item_text(acc_issuer, "UniversalEntityIDType"),
            accession_issuer_local=item_text(acc_issuer, "LocalNamespaceEntityID"),
            study_id=text("StudyID"),
            study_description=text("StudyDescription", split=False),
            referring_physician=opt(
                lambda: reader.name("ReferringPhysicianName"), "ReferringPhysicianName", None
            ),
            reading_physicians=names("NameOfPhysiciansReadingStudy"),
            procedure_codes=codes("ProcedureCodeSequence"),
            reason_text=text("ReasonForTheRequestedProcedure", split=False),
            reason_codes=codes("ReasonForRequestedProcedureCodeSequence"),
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
            concept_name=item_text(concept, "CodeMeaning"),
            number_of_frames=integer("NumberOfFrames"),
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


def _meta_text(file_meta: Dataset, tag: int) -> str | None:
    """A UI value from the file meta group, raw or converted."""
    elem = _element(file_meta, tag)
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
