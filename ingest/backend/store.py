"""SQLite persistence and FHIR search for the embedded FHIR GraphQL backend.

One table holds the current version of every resource; two index tables, rewritten on every write,
serve the search parameters::

    resources(type, id, version_id, last_updated, seq, json)   -- seq: write order, for sorting
    tokens(type, id, param, system, value)                      -- token, reference and string params
    dates(type, id, param, low, high)                           -- date params as UTC ranges [low, high)

The database runs in WAL mode with ``synchronous=FULL``: a write that returned is on disk. One
connection is shared behind a lock, so every method is thread-safe and blocking; the server calls
them through ``asyncio.to_thread``.

Search semantics follow FHIR R4 (https://hl7.org/fhir/R4/search.html):

- token ``system|value``, ``|value`` (no system), ``system|`` (any value), ``value`` (any system);
- reference ``Type/id`` (or a bare ``id``) matching ``.reference``, or ``system|value`` matching the
  logical reference's ``.identifier``;
- string: case- and accent-insensitive "starts with" on any of the indexed parts;
- date with the prefixes ``eq ne lt gt le ge sa eb``, each value a range at its own precision (a date
  without a zone is taken as UTC);
- a comma separates alternatives (OR); different parameters combine with AND.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sqlite3
import threading
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

__all__ = [
    "FHIR_ID",
    "MAX_COUNT",
    "PARAMETERS",
    "BackendRequestError",
    "ConflictError",
    "DateIndex",
    "NotFoundError",
    "ResourceStore",
    "SearchRequest",
    "StorageError",
    "TokenIndex",
    "date_range",
    "format_instant",
    "index_entries",
]

LOGGER = logging.getLogger(__name__)

#: FHIR ``id`` datatype (R4 regex ``[A-Za-z0-9\-\.]{1,64}``).
FHIR_ID: Final = re.compile(r"[A-Za-z0-9\-.]{1,64}")
#: Default and maximum ``_count`` of a search.
DEFAULT_COUNT: Final = 20
MAX_COUNT: Final = 1000

_DCM = "http://dicom.nema.org/resources/ontology/DCM"


class BackendRequestError(ValueError):
    """A request the backend refuses; the message is what the client sees as the GraphQL error."""


class NotFoundError(BackendRequestError):
    """The resource does not exist (message ``Not found``, as Medplum answers)."""

    def __init__(self) -> None:
        super().__init__("Not found")


class ConflictError(BackendRequestError):
    """A create with a client-chosen id that is already taken."""


class StorageError(Exception):
    """The database failed (disk full, locked, I/O error); the request may succeed later.

    ``full`` is true when SQLite reported ``database or disk is full`` (SQLITE_FULL) or an I/O error
    (SQLITE_IOERR, which a full disk also causes while writing the WAL).
    """

    def __init__(self, message: str, *, full: bool = False) -> None:
        super().__init__(message)
        self.full = full


_FULL_ERRORS: Final = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR})


def _storage_error(what: str, exc: sqlite3.Error) -> StorageError:
    """A :class:`StorageError` naming SQLite's own error (never a resource's content)."""
    code = getattr(exc, "sqlite_errorcode", None)
    full = isinstance(code, int) and (code & 0xFF) in _FULL_ERRORS  # an extended code's low byte
    return StorageError(f"{what} failed: {exc}", full=full)


def _rollback(conn: sqlite3.Connection) -> None:
    """End the failed transaction, if SQLite has not already done so.

    SQLite rolls a transaction back by itself after some errors (SQLITE_FULL, SQLITE_IOERR, SQLITE_NOMEM
    during a write); a ``ROLLBACK`` then fails with "cannot rollback - no transaction is active" and would
    hide the error that matters. A ``ROLLBACK`` that fails otherwise leaves the connection as SQLite left
    it; the next ``BEGIN IMMEDIATE`` reports any remaining problem.
    """
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


ParamKind = Literal["token", "reference", "string", "date"]


@dataclass(frozen=True)
class TokenIndex:
    """One row of the ``tokens`` table (token, reference and string search parameters)."""

    param: str
    system: str | None
    value: str


@dataclass(frozen=True)
class DateIndex:
    """One row of the ``dates`` table: the UTC range ``[low, high)`` a date value stands for."""

    param: str
    low: str
    high: str


#: The search parameters per resource type (GraphQL argument name -> kind). ``_id`` is always there.
PARAMETERS: Final[Mapping[str, Mapping[str, ParamKind]]] = {
    "ImagingStudy": {
        "_lastUpdated": "date",
        "identifier": "token",
        "status": "token",
        "modality": "token",
        "series": "token",
        "instance": "token",
        "dicom_class": "token",
        "bodysite": "token",
        "endpoint": "reference",
        "subject": "reference",
        "patient": "reference",
        "started": "date",
    },
    "Patient": {
        "_lastUpdated": "date",
        "identifier": "token",
        "gender": "token",
        "name": "string",
        "family": "string",
        "given": "string",
        "birthdate": "date",
    },
    "Endpoint": {
        "_lastUpdated": "date",
        "identifier": "token",
        "connection_type": "token",
        "name": "string",
        "status": "token",
    },
    "Device": {
        "_lastUpdated": "date",
        "identifier": "token",
        "device_name": "string",
        "manufacturer": "string",
        "status": "token",
        "type": "token",
    },
    "Organization": {
        "_lastUpdated": "date",
        "identifier": "token",
        "name": "string",
        "active": "token",
    },
    "Provenance": {
        "_lastUpdated": "date",
        "target": "reference",
        "agent": "reference",
        "recorded": "date",
    },
    # what ImagingStudy.basedOn / encounter / referrer are linked to (docs/mapping.md "Order, visit,
    # referrer"): found by identifier
    "ServiceRequest": {
        "_lastUpdated": "date",
        "identifier": "token",
        "status": "token",
        "subject": "reference",
        "patient": "reference",
    },
    "Encounter": {
        "_lastUpdated": "date",
        "identifier": "token",
        "status": "token",
        "subject": "reference",
        "patient": "reference",
    },
    "Practitioner": {
        "_lastUpdated": "date",
        "identifier": "token",
        "name": "string",
        "active": "token",
    },
}


@dataclass(frozen=True)
class SearchRequest:
    """A search: parameter values by name (``PARAMETERS``), paging and sort.

    Parameters
    ----------
    params:
        Search parameter -> value, e.g. ``{"identifier": "urn:dicom:uid|urn:oid:1.2.3"}``.
    count:
        ``_count``: page size, 0 to ``MAX_COUNT``.
    offset:
        ``_offset``: rows to skip.
    sort:
        ``_sort``: comma-separated ``[-]name`` with name ``_lastUpdated``, ``_id`` or a date parameter.
    """

    params: Mapping[str, str] = field(default_factory=dict)
    count: int = DEFAULT_COUNT
    offset: int = 0
    sort: str | None = None


# --------------------------------------------------------------------------------------------------
# Pure helpers: dates, strings, index extraction
# --------------------------------------------------------------------------------------------------

_DATE_VALUE = re.compile(
    r"(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d+))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?"
)
_HIGHEST: Final = "~"  # sorts after every formatted instant: the open end of year 9999


def format_instant(moment: datetime) -> str:
    """Format an aware datetime as a FHIR ``instant`` in UTC with millisecond precision.

    Parameters
    ----------
    moment:
        A timezone-aware datetime.

    Returns
    -------
    str
        ``YYYY-MM-DDThh:mm:ss.sssZ``, the shape of Medplum's ``meta.lastUpdated``.
    """
    utc = moment.astimezone(UTC)
    return f"{_format_utc(utc)[:23]}Z"


def _format_utc(moment: datetime) -> str:
    # Fixed width, so that string order is time order (strftime's %Y is not zero-padded everywhere).
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}.{moment.microsecond:06d}"
    )


def date_range(text: str) -> tuple[str, str]:
    """The UTC range ``[low, high)`` a FHIR date, dateTime or instant stands for, at its precision.

    Parameters
    ----------
    text:
        ``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD``, or a dateTime with minutes or seconds, optional
        fraction and optional zone (``Z`` / ``±hh:mm``; without one, UTC is assumed).

    Returns
    -------
    tuple[str, str]
        Fixed-width UTC timestamps, comparable as strings; ``high`` is exclusive.

    Raises
    ------
    ValueError
        The text is not such a value or names an impossible date.
    """
    match = _DATE_VALUE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a FHIR date/dateTime: {text!r}")
    parts = match.groupdict()
    year = int(parts["y"])
    month = int(parts["m"] or 1)
    day = int(parts["d"] or 1)
    hour = int(parts["H"] or 0)
    minute = int(parts["M"] or 0)
    second = int(parts["S"] or 0)
    fraction = parts["f"] or ""
    micro = int((fraction + "000000")[:6])
    try:
        low = datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)
        if parts["tz"] and parts["tz"] != "Z":
            sign = 1 if parts["tz"][0] == "+" else -1
            offset = timedelta(hours=int(parts["tz"][1:3]), minutes=int(parts["tz"][4:6]))
            low -= sign * offset
        if parts["m"] is None:
            high: datetime | None = low.replace(year=year + 1) if year < 9999 else None
        elif parts["d"] is None:
            high = (
                low.replace(year=year + month // 12, month=month % 12 + 1)
                if year < 9999 or month < 12
                else None
            )
        elif parts["H"] is None:
            high = low + timedelta(days=1)
        elif parts["S"] is None:
            high = low + timedelta(minutes=1)
        else:
            high = low + timedelta(microseconds=10 ** (6 - min(len(fraction), 6)))
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"not a valid date: {text!r}") from exc
    return _format_utc(low), _format_utc(high) if high is not None else _HIGHEST


def _fold(text: str) -> str:
    """Case- and accent-insensitive form of a string (FHIR string search)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def _dicts(value: Any) -> Iterator[Mapping[str, Any]]:
    """The objects of a FHIR JSON element that may be one object or a list of them."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, Mapping):
            yield item


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _codings(param: str, value: Any) -> Iterator[TokenIndex]:
    for coding in _dicts(value):
        if code := _str(coding.get("code")):
            yield TokenIndex(param, _str(coding.get("system")), code)


def _identifiers(param: str, value: Any) -> Iterator[TokenIndex]:
    for identifier in _dicts(value):
        if ident := _str(identifier.get("value")):
            yield TokenIndex(param, _str(identifier.get("system")), ident)


def _reference_values(reference: str) -> Iterator[str]:
    yield reference
    parts = reference.rstrip("/").split("/")
    if "://" in reference and len(parts) >= 2:  # absolute URL: also its Type/id tail
        yield "/".join(parts[-2:])


def _references(param: str, value: Any, *, only_type: str | None = None) -> Iterator[TokenIndex]:
    for ref in _dicts(value):
        literal = _str(ref.get("reference"))
        ref_type = _str(ref.get("type")) or (literal.split("/")[-2] if literal and "/" in literal else None)
        if only_type is not None and ref_type != only_type:
            continue
        if literal:
            for text in _reference_values(literal):
                yield TokenIndex(param, None, text)
        # a logical reference: search with system|value on its identifier
        yield from _identifiers(f"{param}:identifier", ref.get("identifier"))


def _strings(param: str, values: Iterator[Any]) -> Iterator[TokenIndex]:
    seen: set[str] = set()
    for value in values:
        if (text := _str(value)) and (folded := _fold(text)) not in seen:
            seen.add(folded)
            yield TokenIndex(param, None, folded)


def _status(param: str, value: Any, system: str) -> Iterator[TokenIndex]:
    if code := _str(value):
        yield TokenIndex(param, system, code)


def _dates(param: str, value: Any) -> Iterator[DateIndex]:
    if text := _str(value):
        try:
            low, high = date_range(text)
        except ValueError:  # stored resources are validated; an odd value is simply not searchable
            return
        yield DateIndex(param, low, high)


def _imaging_study_index(res: Mapping[str, Any]) -> Iterator[TokenIndex | DateIndex]:
    yield from _identifiers("identifier", res.get("identifier"))  # ImagingStudy.identifier
    yield from _status("status", res.get("status"), "http://hl7.org/fhir/imagingstudy-status")
    yield from _references("subject", res.get("subject"))  # ImagingStudy.subject
    yield from _references("patient", res.get("subject"), only_type="Patient")
    yield from _references("endpoint", res.get("endpoint"))  # ImagingStudy.endpoint
    yield from _dates("started", res.get("started"))  # ImagingStudy.started
    for series in _dicts(res.get("series")):
        if uid := _str(series.get("uid")):  # ImagingStudy.series.uid
            yield TokenIndex("series", None, uid)
        yield from _codings("modality", series.get("modality"))  # ImagingStudy.series.modality
        yield from _codings("bodysite", series.get("bodySite"))  # ImagingStudy.series.bodySite
        yield from _references("endpoint", series.get("endpoint"))  # ImagingStudy.series.endpoint
        for instance in _dicts(series.get("instance")):
            if uid := _str(instance.get("uid")):  # ImagingStudy.series.instance.uid
                yield TokenIndex("instance", None, uid)
            yield from _codings("dicom_class", instance.get("sopClass"))  # ...instance.sopClass


def _patient_index(res: Mapping[str, Any]) -> Iterator[TokenIndex | DateIndex]:
    yield from _identifiers("identifier", res.get("identifier"))  # Patient.identifier
    yield from _status("gender", res.get("gender"), "http://hl7.org/fhir/administrative-gender")
    yield from _dates("birthdate", res.get("birthDate"))  # Patient.birthDate
    names = list(_dicts(res.get("name")))  # Patient.name
    yield from _strings("family", (name.get("family") for name in names))
    yield from _strings("given", (given for name in names for given in name.get("given") or []))
    yield from _strings("name", (part for name in names for part in _name_parts(name)))


def _name_parts(name: Mapping[str, Any]) -> Iterator[Any]:
    """Every part of a HumanName the ``name`` search parameter matches."""
    yield name.get("text")
    yield name.get("family")
    for key in ("given", "prefix", "suffix"):
        yield from name.get(key) or []


def _endpoint_index(res: Mapping[str, Any]) -> Iterator[TokenIndex | DateIndex]:
    yield from _identifiers("identifier", res.get("identifier"))  # Endpoint.identifier
    yield from _status("status", res.get("status"), "http://hl7.org/fhir/endpoint-status")
    yield from _codings("connection_type", res.get("connectionType"))  # Endpoint.connectionType
    yield from _strings("name", iter([res.get("name")]))  # Endpoint.name


def _device_index(res: Mapping[str, Any]) -> Iterator[TokenIndex | DateIndex]:
    yield from _identifiers("identifier", res.get("identifier"))  # Device.identifier
    yield from _status("status", res.get("status"), "http://hl7.org/fhir/device-status")
    device_type = res.get("type")
    if isinstance(device_type, Mapping):
        yield from _codings("type", device_type.get("coding"))  # Device.type
    yield from _strings("manufacturer", iter([res.get("manufacturer")]))  # Device.manufacturer
    yield from _strings("device_name", (n.get("name") for n in _dicts(res.get("deviceName"))))


def _organization_index(res: Mapping[str, Any]) -> Iterator[TokenIndex | DateIndex]:
    yield from _identifiers("identifier", res.get("identifier"))  # Organization.identifier
    yield from _strings("name", iter([res.get("name")]))  # Organization.name
    active = res.get("active")
    if isinstance(active, bool):  # Organization.active
        yield TokenIndex("active", None, "true" if active else "false")


def _provenance_index(res: Mapping[str, Any]) -> Iterator[TokenIndex | DateIndex]:
    yield from _references("target", res.get("target"))  # Provenance.target
    for ref in _dicts(res.get("target")):  # a versioned target is found by Type/id too
        literal = _str(ref.get("reference"))
        if literal and "/_history/" in literal:
            yield TokenIndex("target", None, literal.split("/_history/")[0])
    yield from _references("agent", [a.get("who") for a in _dicts(res.get("agent"))])  # agent.who
    yield from _dates("recorded", res.get("recorded"))  # Provenance.recorded


def _request_index(res: Mapping[str, Any]) -> Iterator[TokenIndex | DateIndex]:
    # ServiceRequest / Encounter: identifier, status, subject (and patient, for a Patient subject)
    yield from _identifiers("identifier", res.get("identifier"))
    status = res.get("status")
    if isinstance(status, str) and status:
        yield TokenIndex("status", None, status)
    subject = res.get("subject")
    yield from _references("subject", [subject] if isinstance(subject, Mapping) else [])
    if isinstance(subject, Mapping) and str(subject.get("reference") or "").startswith("Patient/"):
        yield from _references("patient", [subject])


def _practitioner_index(res: Mapping[str, Any]) -> Iterator[TokenIndex | DateIndex]:
    yield from _identifiers("identifier", res.get("identifier"))  # Practitioner.identifier
    names = (part for n in _dicts(res.get("name"))
             for part in [n.get("family"), n.get("text"), *(n.get("given") or [])])
    yield from _strings("name", names)
    active = res.get("active")
    if isinstance(active, bool):
        yield TokenIndex("active", None, "true" if active else "false")


_INDEXERS: Final[Mapping[str, Callable[[Mapping[str, Any]], Iterator[TokenIndex | DateIndex]]]] = {
    "ImagingStudy": _imaging_study_index,
    "Patient": _patient_index,
    "Endpoint": _endpoint_index,
    "Device": _device_index,
    "Organization": _organization_index,
    "Provenance": _provenance_index,
    "ServiceRequest": _request_index,
    "Encounter": _request_index,
    "Practitioner": _practitioner_index,
}


def index_entries(resource: Mapping[str, Any]) -> tuple[list[TokenIndex], list[DateIndex]]:
    """The search index rows of one resource (FHIR JSON).

    Parameters
    ----------
    resource:
        An ImagingStudy, Patient or Endpoint with ``meta.lastUpdated`` set.

    Returns
    -------
    tuple[list[TokenIndex], list[DateIndex]]
        Distinct token/reference/string rows and date rows.
    """
    tokens: dict[TokenIndex, None] = {}
    dates: dict[DateIndex, None] = {}
    meta = resource.get("meta")
    if isinstance(meta, Mapping):
        dates.update(dict.fromkeys(_dates("_lastUpdated", meta.get("lastUpdated"))))
    indexer = _INDEXERS.get(str(resource.get("resourceType")))
    for entry in indexer(resource) if indexer else ():
        if isinstance(entry, TokenIndex):
            tokens[entry] = None
        else:
            dates[entry] = None
    return list(tokens), list(dates)


# --------------------------------------------------------------------------------------------------
# Search value parsing (to SQL)
# --------------------------------------------------------------------------------------------------


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` unless escaped with a backslash (FHIR search escaping); escapes are kept."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for ch in chars:
        if ch == "\\":
            current.append(ch)
            current.append(next(chars, ""))
        elif ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


_DATE_PREFIXES: Final = ("eq", "ne", "lt", "gt", "le", "ge", "sa", "eb")
_EQ = "(d.low >= ? AND d.high <= ?)"
_DATE_SQL: Final[Mapping[str, tuple[str, Callable[[str, str], list[str]]]]] = {
    "eq": (_EQ, lambda lo, hi: [lo, hi]),
    "ne": (f"NOT {_EQ}", lambda lo, hi: [lo, hi]),
    "gt": ("d.high > ?", lambda lo, hi: [hi]),
    "lt": ("d.low < ?", lambda lo, hi: [lo]),
    "ge": (f"(d.high > ? OR {_EQ})", lambda lo, hi: [hi, lo, hi]),
    "le": (f"(d.low < ? OR {_EQ})", lambda lo, hi: [lo, lo, hi]),
    "sa": ("d.low >= ?", lambda lo, hi: [hi]),
    "eb": ("d.high <= ?", lambda lo, hi: [lo]),
}


def _token_condition(param: str, value: str) -> tuple[str, list[Any]]:
    parts = _split(value, "|")
    if len(parts) == 1:
        return "(t.param = ? AND t.value = ?)", [param, _unescape(value)]
    system, code = _unescape(parts[0]), _unescape("|".join(parts[1:]))
    if not system:
        return "(t.param = ? AND t.system IS NULL AND t.value = ?)", [param, code]
    if not code:
        return "(t.param = ? AND t.system = ?)", [param, system]
    return "(t.param = ? AND t.system = ? AND t.value = ?)", [param, system, code]


def _reference_condition(param: str, value: str) -> tuple[str, list[Any]]:
    if len(_split(value, "|")) > 1:  # a token on the logical reference's identifier
        return _token_condition(f"{param}:identifier", value)
    text = _unescape(value)
    if "/" in text:
        return "(t.param = ? AND t.value = ?)", [param, text]
    if not FHIR_ID.fullmatch(text):
        raise BackendRequestError(f"Invalid reference search value for {param!r}: expected Type/id or an id")
    if param == "patient":
        return "(t.param = ? AND t.value = ?)", [param, f"Patient/{text}"]
    return "(t.param = ? AND (t.value = ? OR t.value LIKE ? ESCAPE '\\'))", [param, text, f"%/{text}"]


def _string_condition(param: str, value: str) -> tuple[str, list[Any]]:
    return "(t.param = ? AND t.value LIKE ? ESCAPE '\\')", [param, _like_prefix(_fold(_unescape(value)))]


def _date_condition(param: str, value: str) -> tuple[str, list[Any]]:
    prefix, text = ("eq", value)
    if value[:2].isalpha():
        prefix, text = value[:2], value[2:]
    if prefix not in _DATE_PREFIXES:
        raise BackendRequestError(f"Unsupported date prefix {prefix!r} for {param!r}")
    try:
        low, high = date_range(text)
    except ValueError as exc:
        raise BackendRequestError(f"Invalid date search value for {param!r}: {exc}") from exc
    sql, args = _DATE_SQL[prefix]
    return f"(d.param = ? AND {sql})", [param, *args(low, high)]


def _where(resource_type: str, params: Mapping[str, str]) -> tuple[list[str], list[Any]]:
    known = PARAMETERS.get(resource_type, {})
    clauses: list[str] = []
    args: list[Any] = []
    for name, value in params.items():
        alternatives = [part for part in _split(value, ",") if part]
        if not alternatives:
            continue
        if name == "_id":
            ids = [_unescape(part) for part in alternatives]
            clauses.append(f"r.id IN ({','.join('?' * len(ids))})")
            args.extend(ids)
            continue
        kind = known.get(name)
        if kind is None:
            raise BackendRequestError(f"Unknown search parameter {name!r} for {resource_type}")
        builder = {
            "token": _token_condition,
            "reference": _reference_condition,
            "string": _string_condition,
            "date": _date_condition,
        }[kind]
        conditions = [builder(name, part) for part in alternatives]
        table = "dates d" if kind == "date" else "tokens t"
        alias = "d" if kind == "date" else "t"
        clauses.append(
            f"EXISTS (SELECT 1 FROM {table} WHERE {alias}.type = r.type AND {alias}.id = r.id AND "
            f"({' OR '.join(sql for sql, _ in conditions)}))"
        )
        for _, cond_args in conditions:
            args.extend(cond_args)
    return clauses, args


def _order_by(resource_type: str, sort: str | None) -> tuple[str, list[Any]]:
    keys: list[str] = []
    args: list[Any] = []
    for raw in (sort or "").split(","):
        item = raw.strip()
        if not item:
            continue
        descending = item.startswith("-")
        name = item.lstrip("-")
        direction = "DESC" if descending else "ASC"
        if name == "_lastUpdated":
            keys += [f"r.last_updated {direction}", f"r.seq {direction}"]
        elif name == "_id":
            keys.append(f"r.id {direction}")
        elif PARAMETERS.get(resource_type, {}).get(name) == "date":
            expr = "(SELECT MIN(d.low) FROM dates d WHERE d.type = r.type AND d.id = r.id AND d.param = ?)"
            keys += [f"{expr} IS NULL", f"{expr} {direction}"]  # resources without a value last
            args += [name, name]
        else:
            raise BackendRequestError(f"Unsupported _sort parameter {name!r} for {resource_type}")
    keys.append("r.seq ASC")
    return ", ".join(keys), args


# --------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS resources (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    version_id TEXT NOT NULL,
    last_updated TEXT NOT NULL,
    seq INTEGER NOT NULL,
    json TEXT NOT NULL,
    PRIMARY KEY (type, id)
);
CREATE INDEX IF NOT EXISTS resources_type_seq ON resources (type, seq);
CREATE TABLE IF NOT EXISTS tokens (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    param TEXT NOT NULL,
    system TEXT,
    value TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tokens_lookup ON tokens (type, param, value, system);
CREATE INDEX IF NOT EXISTS tokens_owner ON tokens (type, id);
CREATE TABLE IF NOT EXISTS dates (
    type TEXT NOT NULL,
    id TEXT NOT NULL,
    param TEXT NOT NULL,
    low TEXT NOT NULL,
    high TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dates_lookup ON dates (type, param, low);
CREATE INDEX IF NOT EXISTS dates_owner ON dates (type, id);
"""


class ResourceStore:
    """Current versions of FHIR resources in one SQLite file, with a search index.

    Parameters
    ----------
    path:
        The database file; created (with its parent folder) if missing. Data survives restarts.
    clock:
        Returns the current aware datetime; used for ``meta.lastUpdated`` (injectable for tests).

    Raises
    ------
    StorageError
        The database cannot be opened.
    """

    def __init__(self, path: Path, *, clock: Callable[[], datetime] | None = None) -> None:
        self._path = path
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=10.0
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
            row = self._conn.execute("SELECT COALESCE(MAX(seq), 0) FROM resources").fetchone()
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"Cannot open the backend database {path}: {exc}") from exc
        self._seq = int(row[0])

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageError("The backend database is closed")
        return self._conn

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """The current version of one resource, or ``None``.

        Parameters
        ----------
        resource_type, resource_id:
            ``ImagingStudy`` / ``Patient`` / ``Endpoint`` and its logical id.

        Returns
        -------
        dict[str, Any] | None
            FHIR JSON with ``meta.versionId`` and ``meta.lastUpdated``.
        """
        try:
            with self._lock:
                row = (
                    self._connection()
                    .execute(
                        "SELECT json FROM resources WHERE type = ? AND id = ?", (resource_type, resource_id)
                    )
                    .fetchone()
                )
        except sqlite3.Error as exc:
            raise _storage_error(f"Reading {resource_type}", exc) from exc
        return None if row is None else dict(json.loads(row[0]))

    def create(self, resource: Mapping[str, Any]) -> dict[str, Any]:
        """Store a new resource under its ``id``; assign ``meta.versionId`` and ``meta.lastUpdated``.

        Parameters
        ----------
        resource:
            Validated FHIR JSON with ``resourceType`` and ``id``.

        Returns
        -------
        dict[str, Any]
            The stored resource.

        Raises
        ------
        ConflictError
            A resource of that type already has this id.
        StorageError
            The database failed; nothing was written.
        """
        stored, _ = self._write(resource, create_only=True)
        return stored

    def put(self, resource: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create or replace a resource under its ``id`` with a new version.

        Parameters
        ----------
        resource:
            Validated FHIR JSON with ``resourceType`` and ``id``.

        Returns
        -------
        tuple[dict[str, Any], bool]
            The stored resource and whether it was created (``True``) rather than replaced.

        Raises
        ------
        StorageError
            The database failed; nothing was written.
        """
        return self._write(resource, create_only=False)

    def _write(self, resource: Mapping[str, Any], *, create_only: bool) -> tuple[dict[str, Any], bool]:
        resource_type = str(resource["resourceType"])
        resource_id = str(resource["id"])
        version_id = str(uuid.uuid4())
        last_updated = format_instant(self._clock())
        meta = dict(resource.get("meta") or {})
        meta.update(versionId=version_id, lastUpdated=last_updated)  # Resource.meta
        stored = {"resourceType": resource_type, "id": resource_id, "meta": meta}
        stored.update((k, v) for k, v in resource.items() if k not in stored)
        tokens, dates = index_entries(stored)
        body = json.dumps(stored, ensure_ascii=False, separators=(",", ":"))
        key = (resource_type, resource_id)
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    exists = conn.execute("SELECT 1 FROM resources WHERE type = ? AND id = ?", key).fetchone()
                    if exists and create_only:
                        raise ConflictError(f"{resource_type}/{resource_id} already exists")
                    seq = self._seq + 1
                    conn.execute(
                        "INSERT INTO resources (type, id, version_id, last_updated, seq, json) "
                        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (type, id) DO UPDATE SET "
                        "version_id = excluded.version_id, last_updated = excluded.last_updated, "
                        "seq = excluded.seq, json = excluded.json",
                        (*key, version_id, last_updated, seq, body),
                    )
                    conn.execute("DELETE FROM tokens WHERE type = ? AND id = ?", key)
                    conn.execute("DELETE FROM dates WHERE type = ? AND id = ?", key)
                    conn.executemany(
                        "INSERT INTO tokens (type, id, param, system, value) VALUES (?, ?, ?, ?, ?)",
                        [(*key, t.param, t.system, t.value) for t in tokens],
                    )
                    conn.executemany(
                        "INSERT INTO dates (type, id, param, low, high) VALUES (?, ?, ?, ?, ?)",
                        [(*key, d.param, d.low, d.high) for d in dates],
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
            except sqlite3.Error as exc:
                raise _storage_error(f"Writing {resource_type}", exc) from exc
            self._seq = seq
        LOGGER.debug("Stored %s/%s version %s", resource_type, resource_id, version_id)
        return stored, not exists

    def delete(self, resource_type: str, resource_id: str) -> bool:
        """Delete a resource and its index rows.

        Parameters
        ----------
        resource_type, resource_id:
            The resource to delete.

        Returns
        -------
        bool
            ``True`` if it existed.

        Raises
        ------
        StorageError
            The database failed; nothing was deleted.
        """
        key = (resource_type, resource_id)
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    deleted = conn.execute("DELETE FROM resources WHERE type = ? AND id = ?", key).rowcount
                    conn.execute("DELETE FROM tokens WHERE type = ? AND id = ?", key)
                    conn.execute("DELETE FROM dates WHERE type = ? AND id = ?", key)
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
            except sqlite3.Error as exc:
                raise _storage_error(f"Deleting {resource_type}", exc) from exc
        return deleted > 0

    def search(self, resource_type: str, request: SearchRequest) -> list[dict[str, Any]]:
        """Resources of one type matching every parameter of ``request``, sorted and paged.

        Parameters
        ----------
        resource_type:
            ``ImagingStudy``, ``Patient`` or ``Endpoint``.
        request:
            Parameters, ``_count``, ``_offset``, ``_sort``.

        Returns
        -------
        list[dict[str, Any]]
            The page, possibly empty.

        Raises
        ------
        BackendRequestError
            An unknown parameter, a malformed value, or paging out of range.
        StorageError
            The database failed.
        """
        if not 0 <= request.count <= MAX_COUNT:
            raise BackendRequestError(f"Invalid _count {request.count}: must be between 0 and {MAX_COUNT}")
        if request.offset < 0:
            raise BackendRequestError(f"Invalid _offset {request.offset}: must not be negative")
        clauses, args = _where(resource_type, request.params)
        order, order_args = _order_by(resource_type, request.sort)
        sql = (
            "SELECT r.json FROM resources r WHERE "
            + " AND ".join(["r.type = ?", *clauses])
            + f" ORDER BY {order} LIMIT ? OFFSET ?"
        )
        params = [resource_type, *args, *order_args, request.count, request.offset]
        try:
            with self._lock:
                rows = self._connection().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise _storage_error(f"Searching {resource_type}", exc) from exc
        return [dict(json.loads(row[0])) for row in rows]

    def close(self) -> None:
        """Close the database (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
