"""``ingest reject``: an administrator's IOCM rejection without a Key Object Selection Document.

``ingest reject --study UID [--series UID] [--instance UID] --code 113001`` records the same durable
rejection a rejection note would (docs/architecture.md "Study lifecycle"): of one instance, one series or
the whole study, also covering the instances of that series or study that arrive later. A stored study
becomes due now, so the running ``ingest serve`` writes it without them (``--now``: this command writes
it, like ``ingest retry --now``); the bytes of instances rejected for 113037 or 113039 leave the spool
(``ingest.intake.retention.release_bytes``). Repeating a rejection writes nothing.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

from ingest.app.wiring import open_store
from ingest.config import Settings
from ingest.core.extract import valid_uid
from ingest.core.lifecycle import REJECTION_CODES, Rejection
from ingest.exitcodes import ExitCode
from ingest.logs import printable
from ingest.ports import StateStore, StudyState

__all__ = ["run_reject"]

LOGGER = logging.getLogger(__name__)


async def run_reject(
    settings: Settings,
    *,
    study: str,
    series: str | None,
    instance: str | None,
    code: str,
    push_now: bool = False,
    now: datetime | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Record one rejection and remove the bytes it says to; with ``push_now`` write the study to the
    backend now. Returns the exit code.

    ``1`` (naming the value and the rule) for a UID outside the DICOM UID grammar or an unknown code,
    and when the store cannot be opened or written (nothing is recorded then); ``3`` when the study
    could not be written with ``push_now`` (dead-lettered).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    for flag, value in (("--study", study), ("--series", series), ("--instance", instance)):
        if value is not None and not valid_uid(value):
            print(f"ingest reject: {flag} {printable(value)!s} is not a valid DICOM UID "
                  "(digits and dots, no leading zeros, at most 64 characters)", file=err)
            return ExitCode.FATAL
    if code not in REJECTION_CODES:
        print(f"ingest reject: --code {printable(code)} is not a rejection code "
              f"({', '.join(REJECTION_CODES)})", file=err)
        return ExitCode.FATAL
    when = now or datetime.now(UTC)
    rejection = Rejection(study, series or "", instance or "", code)
    scope = (f"instance {instance}" if instance else f"series {series}" if series else "every instance") + (
        f" of study {study}"
    )
    store = open_store(settings)
    try:
        done = store.reject(rejection, now=when)
        if done.release:
            from ingest.adapters.spool import Spool
            from ingest.intake.retention import release_bytes

            released = release_bytes(
                store, Spool(settings.data_dir / "spool"), done.release, reason=f"iocm:{code}", now=when
            )
            LOGGER.info("bytes of %d rejected instances removed", released)
        meaning = REJECTION_CODES[code].meaning
        if not done.new:
            print(f"{scope} was already rejected for {code} ({meaning}); nothing changed", file=out)
        elif done.study_known:
            print(f"rejected {scope} for {code} ({meaning}); the study is due to be written again", file=out)
        else:
            print(f"rejected {scope} for {code} ({meaning}); no instance of it is stored yet, the "
                  "rejection applies to those that arrive", file=out)
        if push_now and done.study_known:
            return await _push(settings, store, study, err)
    finally:
        store.close()
    return ExitCode.OK


async def _push(settings: Settings, store: StateStore, study: str, err: TextIO) -> int:
    """Write ``study`` to the backend now (``--now``)."""
    from ingest.app.wiring import open_sink, wired_relay

    async with open_sink(settings) as sink:
        relay = await wired_relay(settings, store, sink)
        await relay.drain([study])
    row = store.study(study)
    if row is not None and row.state is StudyState.DEAD:
        print(f"study {study}: dead-lettered: {printable(row.last_error or '')}", file=err)
        return ExitCode.DEAD
    return ExitCode.OK
