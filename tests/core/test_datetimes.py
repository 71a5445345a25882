"""DA/TM/offset -> FHIR dateTime (docs/mapping.md "Encoding rules", dateTime row)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingest.core.datetimes import fhir_datetime, parse_da, parse_offset, parse_tm
from ingest.errors import ConfigError

# FHIR R4 dateTime regex, from the R4 datatypes page.
FHIR_DATETIME = re.compile(
    r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
    r"(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?"
)


@pytest.mark.parametrize("da", ["2024", "202401", "2024011", "20240115X", "2024-01-15", "abcdefgh"])
def test_malformed_date_is_dropped_with_warning(da: str) -> None:
    value, warnings = fhir_datetime(da, "101500", "+0100", None, element="StudyDate")
    assert value is None
    assert len(warnings) == 1 and "StudyDate" in warnings[0]


@pytest.mark.parametrize("da", ["20240230", "20230229", "20241301", "20240100", "20240431"])
def test_impossible_calendar_date_is_dropped_with_warning(da: str) -> None:
    value, warnings = fhir_datetime(da, None, None, None)
    assert value is None
    assert warnings


def test_warnings_do_not_echo_the_value() -> None:
    _, warnings = fhir_datetime("19991399", None, None, None)
    assert "19991399" not in warnings[0]


def test_leap_day_is_valid() -> None:
    assert fhir_datetime("20240229", None, None, None) == ("2024-02-29", [])


def test_legacy_acr_nema_date_form() -> None:
    assert fhir_datetime("1997.04.24", None, None, None) == ("1997-04-24", [])
    assert parse_da("1997.04.24") is not None


def test_legacy_time_with_colons() -> None:
    assert fhir_datetime("19970424", "14:04:38", "+0000", None) == ("1997-04-24T14:04:38+00:00", [])


def test_date_only_when_time_missing() -> None:
    assert fhir_datetime("20240115", None, "+0100", "Europe/Berlin") == ("2024-01-15", [])
    assert fhir_datetime("20240115", "  ", None, None) == ("2024-01-15", [])


@pytest.mark.parametrize(
    ("tm", "clock"),
    [
        ("10", "10:00:00"),
        ("1015", "10:15:00"),
        ("101530", "10:15:30"),
        ("101530.1", "10:15:30.1"),
        ("101530.123456", "10:15:30.123456"),
        ("000000", "00:00:00"),
        ("235959.999999", "23:59:59.999999"),
    ],
)
def test_time_forms_are_zero_filled(tm: str, clock: str) -> None:
    assert fhir_datetime("20240115", tm, "+0100", None) == (f"2024-01-15T{clock}+01:00", [])


@pytest.mark.parametrize("tm", ["2400", "1260", "101561", "1", "101530.", "101530.1234567", "10:1"])
def test_invalid_time_keeps_the_date_with_warning(tm: str) -> None:
    value, warnings = fhir_datetime("20240115", tm, "+0100", None)
    assert value == "2024-01-15"
    assert len(warnings) == 1


def test_negative_offset() -> None:
    assert fhir_datetime("20240115", "0930", "-0500", None) == ("2024-01-15T09:30:00-05:00", [])


def test_zero_offset_is_never_z() -> None:
    value, _ = fhir_datetime("20240115", "0930", "+0000", None)
    assert value == "2024-01-15T09:30:00+00:00"
    value, _ = fhir_datetime("20240115", "0930", None, "UTC")
    assert value is not None and not value.endswith("Z") and value.endswith("+00:00")


def test_no_offset_and_no_site_zone_gives_date_only() -> None:
    assert fhir_datetime("20240115", "093000", None, None) == ("2024-01-15", [])


@pytest.mark.parametrize(
    ("zone", "da", "expected"),
    [
        ("America/New_York", "20240115", "-05:00"),  # EST
        ("America/New_York", "20240715", "-04:00"),  # EDT
        ("Europe/Berlin", "20240115", "+01:00"),  # CET
        ("Europe/Berlin", "20240715", "+02:00"),  # CEST
        ("Asia/Kolkata", "20240715", "+05:30"),
    ],
)
def test_site_zone_is_dst_aware_for_that_date(zone: str, da: str, expected: str) -> None:
    value, warnings = fhir_datetime(da, "120000", None, zone)
    assert value == f"{da[:4]}-{da[4:6]}-{da[6:]}T12:00:00{expected}"
    assert warnings == []


def test_site_zone_switches_on_the_day_of_the_dst_change() -> None:
    # America/New_York moved to EDT at 2024-03-10 02:00 local time.
    assert fhir_datetime("20240310", "0100", None, "America/New_York")[0] == "2024-03-10T01:00:00-05:00"
    assert fhir_datetime("20240310", "0300", None, "America/New_York")[0] == "2024-03-10T03:00:00-04:00"


def test_explicit_offset_wins_over_site_zone() -> None:
    assert fhir_datetime("20240715", "1200", "+0900", "Europe/Berlin")[0] == "2024-07-15T12:00:00+09:00"


def test_malformed_offset_falls_back_to_site_zone_with_warning() -> None:
    value, warnings = fhir_datetime("20240715", "1200", "+2500", "Europe/Berlin")
    assert value == "2024-07-15T12:00:00+02:00"
    assert len(warnings) == 1 and "0008,0201" in warnings[0]


def test_malformed_offset_without_site_zone_gives_date_only() -> None:
    value, warnings = fhir_datetime("20240715", "1200", "0100", None)
    assert value == "2024-07-15"
    assert len(warnings) == 1


def test_time_without_date_is_dropped_with_warning() -> None:
    value, warnings = fhir_datetime(None, "101500", "+0100", "Europe/Berlin")
    assert value is None
    assert len(warnings) == 1


def test_nothing_gives_nothing() -> None:
    assert fhir_datetime(None, None, None, None) == (None, [])
    assert fhir_datetime("", "", "", None) == (None, [])


def test_unknown_site_zone_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="Mars/Olympus"):
        fhir_datetime("20240115", "1200", None, "Mars/Olympus")


def test_parsers() -> None:
    assert parse_tm("1015") == (10, 15, 0, "")
    assert parse_tm("235960") is not None  # leap second is a valid TM
    assert parse_offset("-0330") == -timedelta(hours=3, minutes=30)
    assert parse_offset("+1400") == timedelta(hours=14)
    assert parse_offset("+1401") is None
    assert parse_offset("-1300") is None
    assert parse_offset("+0560") is None


@given(
    moment=st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2100, 12, 31)),
    offset_minutes=st.integers(min_value=-12 * 60, max_value=14 * 60),
)
def test_roundtrip_against_python_isoformat(moment: datetime, offset_minutes: int) -> None:
    """Any valid DA/TM/offset gives the ISO text Python builds for the same aware datetime."""
    sign = "-" if offset_minutes < 0 else "+"
    offset = f"{sign}{abs(offset_minutes) // 60:02d}{abs(offset_minutes) % 60:02d}"
    da = moment.strftime("%Y%m%d")
    tm = moment.strftime("%H%M%S.%f")
    value, warnings = fhir_datetime(da, tm, offset, "Europe/Berlin")
    aware = moment.replace(tzinfo=timezone(timedelta(minutes=offset_minutes)))
    assert warnings == []
    assert value == aware.isoformat(timespec="microseconds")
    assert value is not None and FHIR_DATETIME.fullmatch(value)
