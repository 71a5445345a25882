"""Time for timers that must survive clock steps (docs/reliability.md "Clock steps").

Due times are kept in the state store as wall-clock instants (they outlive the process and are shared
by nodes); everything measured inside the process is measured on the monotonic clock, which no step of
the wall clock moves. :class:`Timekeeper` compares the two:

- :meth:`Timekeeper.now` is the wall clock, for what is written (received, pushed, next attempt, hold).
- :meth:`Timekeeper.destructive_now` is the time a destructive timer (retention's release of bytes,
  the end of a commitment hold, giving up on a report) may act on: the wall clock, but never more than
  ``slack_s`` ahead of the wall-clock time at start plus the monotonic time elapsed since. A step
  forward (wall clock ahead of that by more than ``slack_s``) is logged as a WARNING once; from then on
  destructive timers act on the monotonic-derived time: a hold or a give-up time written before the
  step ends only once as much time has really passed as it was meant to last (the step is "confirmed"
  by elapsed monotonic time, timer by timer), and one written after it lasts longer by the step, never
  shorter. This lasts until the wall clock comes back (INFO) or the process restarts, which takes the
  wall clock as it is then. A step back needs no guard here: destructive timers then act later, and the
  stores treat a due time further away than its rule allows as due (``stale_after`` of the claims).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Final

from ingest.ports import Clock

__all__ = ["SystemClock", "Timekeeper", "utcnow"]

LOGGER = logging.getLogger(__name__)

#: How far the wall clock may run ahead of start + monotonic elapsed time before it counts as a step.
#: NTP slews both clocks alike, so only a step (or a suspend, which monotonic time skips) gets past it.
STEP_SLACK_S: Final = 60.0


def utcnow() -> datetime:
    """The wall clock, timezone-aware UTC: the default clock of the sources, intake, the relay and the
    status page (the pure core is given "now")."""
    return datetime.now(UTC)


class SystemClock:
    """The operating system's clocks: ``datetime.now(UTC)`` and ``time.monotonic()``."""

    def now(self) -> datetime:
        return utcnow()

    def monotonic(self) -> float:
        return time.monotonic()


class Timekeeper:
    """Wall-clock time for persisted due times, guarded by monotonic time for destructive timers.

    Thread-safe. Keeps the wall-clock and monotonic times at construction and compares elapsed times.

    Parameters
    ----------
    clock:
        The clocks (tests step an injected one).
    slack_s:
        How far the wall clock may run ahead of the monotonic-derived time before it counts as a step.
    """

    def __init__(self, clock: Clock | None = None, *, slack_s: float = STEP_SLACK_S) -> None:
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.slack = timedelta(seconds=slack_s)
        self._wall0 = self.clock.now()
        self._mono0 = self.clock.monotonic()
        self._lock = threading.Lock()
        self._warned = False

    def now(self) -> datetime:
        """The wall-clock time (what due times are written in)."""
        return self.clock.now()

    def elapsed(self) -> datetime:
        """Wall-clock time at start plus the monotonic time elapsed since."""
        return self._wall0 + timedelta(seconds=self.clock.monotonic() - self._mono0)

    def ahead(self) -> timedelta:
        """How far the wall clock runs ahead of :meth:`elapsed` (negative after a step back)."""
        return self.clock.now() - self.elapsed()

    def destructive_now(self, what: str = "destructive timers") -> datetime:
        """The time a destructive timer may act on: the wall clock, held back to :meth:`elapsed` (plus
        the slack) while the wall clock has stepped forward past it; logs the step once (WARNING) and
        its end (INFO)."""
        wall = self.clock.now()
        bound = self.elapsed() + self.slack
        stepped = wall > bound
        with self._lock:
            changed, self._warned = self._warned != stepped, stepped
        if changed and stepped:
            LOGGER.warning(
                "the wall clock is %.0f s ahead of the time elapsed since start (set forward?): %s "
                "follow the time really elapsed until a restart (no bytes released, no hold ended, "
                "no report given up before its time has really passed)",
                (wall - bound + self.slack).total_seconds(), what,
            )
        elif changed:
            LOGGER.info("the wall clock agrees with the time elapsed since start again: %s resume", what)
        return min(wall, bound)

    @property
    def stepped_forward(self) -> bool:
        """Whether the last :meth:`destructive_now` found the wall clock stepped forward."""
        with self._lock:
            return self._warned
