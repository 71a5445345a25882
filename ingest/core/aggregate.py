"""Instance records -> one study aggregate (pure; docs/architecture.md).

A :class:`StudyAggregate` is the set of a study's :class:`~ingest.core.records.InstanceRecord`\\ s,
keyed by SOP Instance UID (0008,0018) and grouped into series by Series Instance UID (0020,000E).
It is frozen and canonical: the same set of records, added in any order, gives an equal aggregate.
Re-adding a record with a SOP Instance UID already present replaces the old record (idempotent).

Study- and series-level values are repeated in every instance header and may disagree (one instance
re-sent after an edit, a modality that fills a tag only sometimes). They are chosen
deterministically by :func:`pick`: the most common non-empty value, ties going to the value of the
record with the lowest SOP Instance UID.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from operator import attrgetter
from typing import TypeVar

from ingest.core.records import InstanceRecord
from ingest.errors import InstanceConflictError

__all__ = ["SeriesAggregate", "StudyAggregate", "add", "aggregate", "distinct", "pick"]

T = TypeVar("T")

_sop_uid: Callable[[InstanceRecord], str] = attrgetter("sop_uid")  # (0008,0018), the canonical order


def _present(value: object) -> bool:
    """A DICOM value counts when it is not ``None``, an empty/blank string or an empty tuple."""
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, tuple):
        return bool(value)
    return True


def pick(records: Iterable[InstanceRecord], get: Callable[[InstanceRecord], T | None]) -> T | None:
    """The value ``get`` reads from ``records``, chosen deterministically.

    The most common present value wins; a tie goes to the value seen first in SOP Instance UID order.
    Records are read in SOP Instance UID order whatever order they come in.

    Parameters
    ----------
    records:
        The records to read (any order).
    get:
        Reads one value from a record; ``None``, blank strings and empty tuples count as absent.

    Returns
    -------
    T | None
        ``None`` when no record has a value.
    """
    return _pick_ordered(sorted(records, key=_sop_uid), get)


def _pick_ordered(records: Iterable[InstanceRecord], get: Callable[[InstanceRecord], T | None]) -> T | None:
    # pick() over records already in SOP Instance UID order (an aggregate's instances always are). This
    # runs once per record and study/series-level attribute: the values are counted in C (a Counter
    # keeps them in the order first seen), and only the distinct ones are judged present or not.
    best: T | None = None
    most = 0
    for value, n in Counter(map(get, records)).items():
        # the most common present value; among equally common ones, the one seen first
        if n > most and _present(value):
            best, most = value, n
    return best


def distinct(records: Iterable[InstanceRecord], get: Callable[[InstanceRecord], object]) -> int:
    """How many different present values ``get`` reads from ``records`` (for conflict warnings)."""
    return sum(1 for value in set(map(get, records)) if _present(value))


@dataclass(frozen=True)
class SeriesAggregate:
    """The instances of one series (Series Instance UID (0020,000E)), sorted by SOP Instance UID."""

    series_uid: str
    instances: tuple[InstanceRecord, ...]

    def value(self, get: Callable[[InstanceRecord], T | None]) -> T | None:
        """A series-level value chosen by :func:`pick` over this series' instances."""
        return _pick_ordered(self.instances, get)

    @property
    def number(self) -> int | None:
        """Series Number (0020,0011), chosen by :func:`pick`."""
        return self.value(lambda r: r.series_number)


@dataclass(frozen=True)
class StudyAggregate:
    """All known instances of one study, canonical (sorted by SOP Instance UID) and frozen.

    Build it with :func:`aggregate` or :func:`add`; never with duplicate SOP Instance UIDs.
    """

    study_uid: str
    instances: tuple[InstanceRecord, ...]

    def value(self, get: Callable[[InstanceRecord], T | None]) -> T | None:
        """A study-level value chosen by :func:`pick` over all instances."""
        return _pick_ordered(self.instances, get)

    @cached_property
    def series(self) -> tuple[SeriesAggregate, ...]:
        """The series, ordered by Series Number (absent last), then Series Instance UID."""
        groups: dict[str, list[InstanceRecord]] = {}
        for record in self.instances:
            groups.setdefault(record.series_uid, []).append(record)
        built = [SeriesAggregate(uid, tuple(records)) for uid, records in groups.items()]

        def order(series: SeriesAggregate) -> tuple[bool, int, str]:
            number = series.number
            return (number is None, number or 0, series.series_uid)

        return tuple(sorted(built, key=order))

    @property
    def number_of_series(self) -> int:
        """Count of distinct Series Instance UIDs (never (0020,1206))."""
        return len({r.series_uid for r in self.instances})

    @property
    def number_of_instances(self) -> int:
        """Count of distinct SOP Instance UIDs (never (0020,1208))."""
        return len(self.instances)

    def get(self, sop_uid: str) -> InstanceRecord | None:
        """The record with this SOP Instance UID, if known."""
        return next((r for r in self.instances if r.sop_uid == sop_uid), None)


def _check_study(study_uid: str, record: InstanceRecord) -> None:
    if record.study_uid != study_uid:
        raise InstanceConflictError(
            f"SOPInstanceUID={record.sop_uid!r} belongs to StudyInstanceUID={record.study_uid!r}, "
            f"not to the aggregated study {study_uid!r}",
            tag="StudyInstanceUID",
            uid=record.sop_uid,
        )


def _build(study_uid: str, by_sop: dict[str, InstanceRecord]) -> StudyAggregate:
    return StudyAggregate(study_uid, tuple(by_sop[uid] for uid in sorted(by_sop)))


def add(agg: StudyAggregate | None, record: InstanceRecord) -> StudyAggregate:
    """Return ``agg`` with ``record`` added, or replacing the record with its SOP Instance UID.

    Parameters
    ----------
    agg:
        The aggregate so far, or ``None`` to start a new one from ``record``.
    record:
        The instance to add.

    Raises
    ------
    InstanceConflictError
        When ``record`` belongs to another study than ``agg``.
    """
    if agg is None:
        return StudyAggregate(record.study_uid, (record,))
    _check_study(agg.study_uid, record)
    by_sop = {r.sop_uid: r for r in agg.instances}
    by_sop[record.sop_uid] = record
    return _build(agg.study_uid, by_sop)


def aggregate(records: Iterable[InstanceRecord]) -> StudyAggregate:
    """Aggregate the records of one study (any order; a later record replaces an earlier one with
    the same SOP Instance UID).

    Raises
    ------
    ValueError
        When ``records`` is empty.
    InstanceConflictError
        When the records belong to more than one study.
    """
    by_sop: dict[str, InstanceRecord] = {}
    study_uid: str | None = None
    for record in records:
        if study_uid is None:
            study_uid = record.study_uid
        _check_study(study_uid, record)
        by_sop[record.sop_uid] = record
    if study_uid is None:
        raise ValueError('Argument "records" must not be empty.')
    return _build(study_uid, by_sop)
