"""DICOM DA/TM (+ Timezone Offset From UTC) -> FHIR ``dateTime``, per docs/mapping.md "Encoding rules".

FHIR ``dateTime`` is ``YYYY[-MM[-DD[Thh:mm:ss[.ffffff](Z|+hh:mm|-hh:mm)]]]``: a time needs seconds and
a zone. The zone comes from Timezone Offset From UTC (0008,0201); without it from the configured site
time zone (IANA name, DST-aware for that date and time); without either only the date is emitted.
``Z`` is never invented. Bad values drop the element with a warning; they never reject an instance.

Warnings name the DICOM element and the rule, never the value (dates may be patient data).
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, timedelta
from typing import Final, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ingest.errors import ConfigError

__all__ = ["fhir_datetime", "format_offset", "parse_da", "parse_offset", "parse_tm"]

_DA: Final = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_DA_LEGACY: Final = re.compile(r"^(\d{4})\.(\d{2})\.(\d{2})$")  # ACR-NEMA "1997.04.24"
_TM: Final = re.compile(r"^(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?$")
_TM_LEGACY: Final = re.compile(r"^(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?$")  # "14:04:38"
_OFFSET: Final = re.compile(r"^([+-])(\d{2})(\d{2})$")


class ParsedTime(NamedTuple):
    """A TM value split into parts; ``fraction`` keeps the digits as given (1-6)."""

    hour: int
    minute: int
    second: int
    fraction: str


def parse_da(value: str) -> date | None:
    """Parse a DA value (``YYYYMMDD``, or legacy ``YYYY.MM.DD``).

    Returns
    -------
    date | None
        ``None`` when the value has another form (``2024``, ``202402``) or is not a real date
        (``20240230``).
    """
    text = value.strip()
    match = _DA.match(text) or _DA_LEGACY.match(text)
    if not match:
        return None
    try:
        return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return None


def parse_tm(value: str) -> ParsedTime | None:
    """Parse a TM value: ``HH``, ``HHMM``, ``HHMMSS``, ``HHMMSS.F{1,6}``, or legacy ``HH:MM[:SS[.F]]``.

    Missing minutes and seconds are zero. A leap second (``60``) is kept, as both DICOM TM and FHIR
    allow it.

    Returns
    -------
    ParsedTime | None
        ``None`` for any other form or an out-of-range component.
    """
    text = value.strip()
    match = _TM.match(text) or _TM_LEGACY.match(text)
    if not match:
        return None
    hour, minute, second = (int(match[i]) if match[i] else 0 for i in (1, 2, 3))
    if hour > 23 or minute > 59 or second > 60:
        return None
    return ParsedTime(hour, minute, second, match[4] or "")


def parse_offset(value: str) -> timedelta | None:
    """Parse Timezone Offset From UTC (0008,0201) ``+HHMM`` / ``-HHMM``; ``None`` if malformed.

    Accepts offsets from -12:00 to +14:00 with minutes below 60, the range of real zones.
    """
    match = _OFFSET.match(value.strip())
    if not match:
        return None
    hours, minutes = int(match[2]), int(match[3])
    if minutes > 59:
        return None
    delta = timedelta(hours=hours, minutes=minutes)
    if match[1] == "-":
        delta = -delta
    if not timedelta(hours=-12) <= delta <= timedelta(hours=14):
        return None
    return delta


def format_offset(delta: timedelta) -> str:
    """``timedelta`` -> ``+hh:mm`` / ``-hh:mm`` (zero is ``+00:00``, never ``Z``)."""
    sign = "-" if delta < timedelta(0) else "+"
    minutes = abs(int(delta.total_seconds())) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _site_offset(day: date, tm: ParsedTime, site_tz: str) -> timedelta:
    try:
        zone = ZoneInfo(site_tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(f"site_timezone {site_tz!r} is not an IANA time zone name") from exc
    # A leap second has no wall-clock instant of its own: take the zone offset one second earlier.
    local = datetime.combine(day, time(tm.hour, tm.minute, min(tm.second, 59)), tzinfo=zone)
    offset = local.utcoffset()
    if offset is None:  # pragma: no cover - ZoneInfo always answers for an aware datetime
        raise ConfigError(f"site_timezone {site_tz!r} gives no UTC offset")
    return offset


def fhir_datetime(
    da: str | None,
    tm: str | None,
    offset: str | None,
    site_tz: str | None,
    *,
    element: str = "Date/Time",
) -> tuple[str | None, list[str]]:
    """Combine DICOM DA, TM and a UTC offset into a FHIR ``dateTime``.

    Parameters
    ----------
    da:
        Raw DA value, e.g. Study Date (0008,0020).
    tm:
        Raw TM value, e.g. Study Time (0008,0030).
    offset:
        Raw Timezone Offset From UTC (0008,0201), ``+HHMM``/``-HHMM``.
    site_tz:
        IANA time zone used when ``offset`` is absent (or malformed); ``None`` for none.
    element:
        Name of the DICOM elements, used in warnings only (e.g. ``"StudyDate/StudyTime"``).

    Returns
    -------
    tuple[str | None, list[str]]
        The FHIR value (``YYYY-MM-DD`` or ``YYYY-MM-DDThh:mm:ss[.f]±hh:mm``), or ``None``; and the
        warnings for values that were dropped. A time without a date yields ``None``; a time with
        neither an offset nor a site zone yields the date only.

    Raises
    ------
    ConfigError
        When ``site_tz`` is not a known IANA zone name.
    """
    warnings: list[str] = []
    da = (da or "").strip()
    tm = (tm or "").strip()
    offset = (offset or "").strip()
    if not da:
        if tm:
            warnings.append(f"{element}: a time without a date cannot form a FHIR dateTime; dropped")
        return None, warnings
    day = parse_da(da)
    if day is None:
        warnings.append(f"{element}: the date is not a valid DA (YYYYMMDD, a real calendar date); dropped")
        return None, warnings
    day_text = day.isoformat()
    if not tm:
        return day_text, warnings
    parsed = parse_tm(tm)
    if parsed is None:
        warnings.append(f"{element}: the time is not a valid TM (HH[MM[SS[.F{{1,6}}]]]); date only")
        return day_text, warnings

    delta: timedelta | None = None
    if offset:
        delta = parse_offset(offset)
        if delta is None:
            warnings.append("TimezoneOffsetFromUTC (0008,0201) is not a valid offset (+HHMM/-HHMM); ignored")
    if delta is None and site_tz:
        delta = _site_offset(day, parsed, site_tz)
    if delta is None:
        return day_text, warnings  # FHIR requires a zone with a time; never invent one

    clock = f"{parsed.hour:02d}:{parsed.minute:02d}:{parsed.second:02d}"
    if parsed.fraction:
        clock += "." + parsed.fraction
    return f"{day_text}T{clock}{format_offset(delta)}", warnings
