"""Study-level date windows and how a window the PACS cut short is split (pure: no I/O, no clock).

A PACS answers at most so many matches per query (Orthanc's ``LimitFindResults``, a QIDO-RS ``limit``),
and some say so only by their answer count. A window whose answer count reaches the configured
``[sync] query_limit``, or whose answer ended with anything but success, is split in two halves by
Study Date, each asked again, until none is cut short; a one-day window still cut short is an error
naming it (nothing is missed silently).

The first window of a run without ``--since`` / ``--until`` has no date filter at all (it also matches
studies that have no Study Date); when that one is cut short it is split into halves of the window from
:data:`FIRST_DAY` to :data:`LAST_DAY`, which cannot match a study without a Study Date (the run logs
that).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from typing import Final

__all__ = ["FIRST_DAY", "LAST_DAY", "Window", "cut_short", "da", "parse_day"]

#: The bounds an open window is split between (DICOM DA values).
FIRST_DAY: Final = date(1800, 1, 1)
LAST_DAY: Final = date(9999, 12, 31)


def da(day: date) -> str:
    """``day`` as a DICOM DA value (``YYYYMMDD``)."""
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"


def parse_day(value: str) -> date | None:
    """A DA value (``YYYYMMDD``) as a date, or ``None`` when it is not one."""
    value = value.strip()
    if len(value) != 8 or not value.isdigit():
        return None
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None


@dataclass(frozen=True, order=True)
class Window:
    """Study Dates from ``start`` to ``end``, both included; ``None`` leaves that side open."""

    start: date | None = None
    end: date | None = None

    @property
    def open(self) -> bool:
        """No date filter at all (also matches studies without a Study Date)."""
        return self.start is None and self.end is None

    def study_date(self) -> str | None:
        """The Study Date matching key (a DA range, or one date), or ``None`` for no filter."""
        if self.open:
            return None
        if self.start is not None and self.start == self.end:
            return da(self.start)
        return f"{da(self.start) if self.start else ''}-{da(self.end) if self.end else ''}"

    def contains(self, value: str | None) -> bool:
        """Whether a study listed with Study Date ``value`` falls in this window."""
        if self.open:
            return True
        day = parse_day(value or "")
        if day is None:
            return False
        return (self.start is None or day >= self.start) and (self.end is None or day <= self.end)

    def split(self) -> tuple[Window, Window] | None:
        """Two halves covering this window, or ``None`` for a single day (it cannot be split)."""
        start = self.start or FIRST_DAY
        end = self.end or LAST_DAY
        if start >= end:
            return None
        mid = start + timedelta(days=(end - start).days // 2)
        return Window(start, mid), Window(mid + timedelta(days=1), end)

    def __str__(self) -> str:
        return f"StudyDate {self.study_date() or '(any)'}"


def cut_short(count: int, limit: int, complete: bool) -> bool:
    """Whether an answer of ``count`` matches was cut short: it reached ``limit`` or did not end with
    success (``complete`` ``False``)."""
    return not complete or count >= limit
