"""Study-date windows and their splitting (``ingest.sources.sync.plan``, pure)."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from ingest.sources.sync.plan import FIRST_DAY, LAST_DAY, Window, cut_short, da, parse_day


def test_matching_keys() -> None:
    assert Window().study_date() is None and Window().open
    assert Window(date(2024, 1, 2), date(2024, 1, 2)).study_date() == "20240102"
    assert Window(date(2024, 1, 2), date(2024, 3, 4)).study_date() == "20240102-20240304"
    assert Window(date(2024, 1, 2), None).study_date() == "20240102-"
    assert Window(None, date(2024, 1, 2)).study_date() == "-20240102"


def test_halves_cover_the_window_without_overlap_down_to_one_day() -> None:
    window = Window(date(2024, 1, 1), date(2024, 1, 10))
    days: list[date] = []
    pending = [window]
    while pending:
        w = pending.pop()
        halves = w.split()
        if halves is None:
            assert w.start == w.end
            assert w.start is not None
            days.append(w.start)
            continue
        first, second = halves
        assert first.end is not None and second.start == first.end + timedelta(days=1)
        assert (first.start, second.end) == (w.start, w.end)
        pending += halves
    assert sorted(days) == [date(2024, 1, d) for d in range(1, 11)]


def test_an_open_window_splits_between_the_bounds() -> None:
    halves = Window().split()
    assert halves is not None
    assert halves[0].start == FIRST_DAY and halves[1].end == LAST_DAY
    assert Window(date(2024, 1, 1), None).split() is not None


def test_contains_and_day_values() -> None:
    w = Window(date(2024, 1, 1), date(2024, 1, 31))
    assert w.contains("20240115") and not w.contains("20240201") and not w.contains(None)
    assert not w.contains("2024-01-15") and Window().contains(None)
    assert da(date(812, 3, 4)) == "08120304"
    assert parse_day("20240230") is None and parse_day("20240229") == date(2024, 2, 29)


@pytest.mark.parametrize(("count", "limit", "complete", "short"), [
    (3, 3, True, True), (2, 3, True, False), (2, 3, False, True), (0, 3, False, True),
])
def test_cut_short(count: int, limit: int, complete: bool, short: bool) -> None:
    assert cut_short(count, limit, complete) is short
