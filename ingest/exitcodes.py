"""Process exit codes of every ``ingest`` command (documented in ``ingest --help`` and the README)."""

from __future__ import annotations

import enum

__all__ = ["ExitCode"]


class ExitCode(enum.IntEnum):
    OK = 0  # success
    FATAL = 1  # bad configuration, unusable data dir or store, backend schema unusable
    REJECTED = 2  # some inputs were rejected (each named on stderr); everything else was processed
    DEAD = 3  # some studies could not be written (dead-lettered; see ``ingest status``)
    INTERRUPTED = 130
