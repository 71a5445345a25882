"""The clocks of the timers (``ingest.clock``): wall-clock time for due times, guarded by monotonic time
for destructive timers. A stepped clock stands in for the operating system's (time moves only when a
test says so)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from ingest.clock import SystemClock, Timekeeper

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DAY = 86400.0


class SteppedClock:
    """Wall-clock and monotonic time that move only when the test says so (an ``ingest.ports.Clock``)."""

    def __init__(self, wall: datetime = T0) -> None:
        self.wall = wall
        self.mono = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        """Both clocks move (time really passes)."""
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds

    def step(self, seconds: float) -> None:
        """Only the wall clock moves (it is set)."""
        self.wall += timedelta(seconds=seconds)


def test_destructive_time_follows_the_wall_clock_while_both_agree() -> None:
    clock = SteppedClock()
    keeper = Timekeeper(clock)
    clock.advance(3 * DAY)
    clock.step(30)  # within the slack (NTP-sized corrections)
    assert keeper.destructive_now() == T0 + timedelta(days=3, seconds=30)
    assert keeper.now() == T0 + timedelta(days=3, seconds=30)


def test_a_step_forward_holds_destructive_time_back_with_one_warning_until_time_has_passed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = SteppedClock()
    keeper = Timekeeper(clock, slack_s=60)
    clock.advance(100)
    clock.step(31 * DAY)
    with caplog.at_level(logging.INFO, logger="ingest.clock"):
        assert keeper.destructive_now() == T0 + timedelta(seconds=100 + 60)
        assert keeper.destructive_now() == T0 + timedelta(seconds=100 + 60)
        assert keeper.now() == T0 + timedelta(days=31, seconds=100)  # due times are still written in it
        assert keeper.stepped_forward
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "2678400 s ahead" in warnings[0].getMessage()
        clock.advance(31 * DAY)  # a timer due before the step acts once its time has really passed
        assert keeper.destructive_now() == T0 + timedelta(days=31, seconds=160)
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        clock.step(-31 * DAY)  # the wall clock comes back: destructive timers follow it again
        assert keeper.destructive_now() == clock.now()
        assert not keeper.stepped_forward
        assert "agrees with the time elapsed since start again" in caplog.text


def test_a_step_back_makes_destructive_time_the_wall_clock() -> None:
    clock = SteppedClock()
    keeper = Timekeeper(clock)
    clock.advance(10)
    clock.step(-3600)
    assert keeper.destructive_now() == T0 + timedelta(seconds=10 - 3600)
    assert keeper.ahead() == timedelta(seconds=-3600)


def test_the_system_clock_is_timezone_aware_and_monotonic_does_not_go_back() -> None:
    clock = SystemClock()
    assert clock.now().tzinfo is not None
    first = clock.monotonic()
    assert clock.monotonic() >= first
