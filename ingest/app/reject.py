"""``ingest reject``: an administrator's IOCM rejection without a Key Object Selection Document.

``ingest reject --study UID [--series UID] [--instance UID] --code 113001`` records the same durable
rejection a rejection note would (docs/architecture.md "Study lifecycle"): of one instance, one series or
the whole study, also covering the instances of that series or study that arrive later. A stored study
becomes due now, so the running ``ingest serve`` writes it without them (``--now``: this command writes
it, like ``ingest retry --now``); the bytes of instances rejected for 113037 or 113039 leave the spool
(``ingest.intake.retention.release_bytes``; bytes under a Storage Commitment hold only once it ends).
Repeating a rejection writes nothing.

A study the state store has never seen is refused (exit 1, naming the UID: a mistyped UID would
otherwise wait forever); ``--force`` records the rejection ahead of the study's arrival.
``ingest reject --undo`` removes a rejection this command made (same study / series / instance / code):
the study becomes due again and the instances it kept out come back; bytes already removed for 113037
or 113039 stay removed (their rows say so). A rejection a note made is not undone this way.
``ingest rejections`` lists what is recorded (:func:`run_rejections`).
"""

from __future__ import annotations

import json
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

__all__ = ["run_reject", "run_rejections"]

LOGGER = logging.getLogger(__name__)


async def run_reject(
    settings: Settings,
    *,
    study: str,
    series: str | None,
    instance: str | None,
    code: str,
    push_now: bool = False,
    force: bool = False,
    undo: bool = False,
    now: datetime | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Record one rejection and remove the bytes it says to (``undo``: remove one ``ingest reject``
    recorded); with ``push_now`` write the study to the backend now. Returns the exit code.

    ``1`` (naming the value and the rule) for a UID outside the DICOM UID grammar or an unknown code,
    for a study the store has never seen (unless ``force``), for an ``undo`` of a rejection not
    recorded, and when the store cannot be opened or written (nothing is recorded then); ``3`` when the
    study could not be written with ``push_now`` (dead-lettered).
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
        if undo:
            return await _undo(settings, store, rejection, scope, when, push_now, out, err)
        if not force and store.study(study) is None:
            print(f"ingest reject: study {study} is not in the state store (no instance of it was ever "
                  "received); check the UID, or pass --force to record the rejection ahead of its arrival",
                  file=err)
            return ExitCode.FATAL
        done = store.reject(rejection, now=when)
        if done.release:
            from ingest.adapters.spool import Spool
            from ingest.intake.retention import release_bytes

            released = release_bytes(
                store, Spool(settings.data_dir / "spool"), done.release, reason=f"iocm:{code}", now=when,
                respect_holds=True,
            )
            LOGGER.info("bytes of %d rejected instances removed", released)
            if released < len(done.release):
                print(f"the bytes of {len(done.release) - released} of them are under a Storage Commitment "
                      "hold: they are removed when it ends", file=out)
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


async def _undo(
    settings: Settings, store: StateStore, rejection: Rejection, scope: str, when: datetime, push_now: bool,
    out: TextIO, err: TextIO,
) -> int:
    """``--undo``: remove one rejection ``ingest reject`` recorded."""
    if not store.unreject(rejection, now=when):
        by_note = any(
            r.rejection.note_uid and (r.rejection.series_uid, r.rejection.sop_uid, r.rejection.code)
            == (rejection.series_uid, rejection.sop_uid, rejection.code)
            for r in store.rejection_rows(rejection.study_uid)
        )
        why = " (a rejection note made it; only those `ingest reject` made are undone)" if by_note else ""
        print(f"ingest reject --undo: {scope} has no rejection for {rejection.code} made by "
              f"`ingest reject`{why}; see `ingest rejections --study {rejection.study_uid}`", file=err)
        return ExitCode.FATAL
    print(f"removed the rejection of {scope} for {rejection.code}; the study is due to be written again "
          "(bytes already removed for 113037 / 113039 stay removed)", file=out)
    if push_now and store.study(rejection.study_uid) is not None:
        return await _push(settings, store, rejection.study_uid, err)
    return ExitCode.OK


async def run_rejections(
    settings: Settings, *, study: str | None = None, as_json: bool = False, out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """``ingest rejections``: every recorded rejection (of ``study`` only, when given), oldest first: study,
    series, instance (``""``: the whole series / study), code, when, and who made it (``ingest reject``
    or the source of the note). Returns the exit code (``1`` for an invalid ``study`` UID)."""
    out = out or sys.stdout
    err = err or sys.stderr
    if study is not None and not valid_uid(study):
        print(f"ingest rejections: --study {printable(study)!s} is not a valid DICOM UID", file=err)
        return ExitCode.FATAL
    store = open_store(settings)
    try:
        rows = store.rejection_rows(study)
    finally:
        store.close()
    listed = [
        {
            "study_uid": r.rejection.study_uid,
            "series_uid": r.rejection.series_uid,
            "sop_uid": r.rejection.sop_uid,
            "code": r.rejection.code,
            "added_at": None if r.added_at is None else r.added_at.isoformat(),
            "note_uid": r.rejection.note_uid,
            "source": r.source,
        }
        for r in rows
    ]
    if as_json:
        print(json.dumps({"rejections": listed}, indent=2), file=out)
        return ExitCode.OK
    if not listed:
        print("no rejections recorded", file=out)
        return ExitCode.OK
    for item in listed:
        scope = " ".join(
            f"{k}={item[k]}" for k in ("study_uid", "series_uid", "sop_uid") if item[k]
        )
        print(f"{item['added_at']}  {item['code']}  {scope}  source={printable(str(item['source']))}",
              file=out)
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
