"""Start-up sweep of the spool (``docs/reliability.md``, Durability): files no row names are re-admitted.

A spool file is acknowledged data, or was about to be. A file no instance row names has one of these
histories:

- a crash between its rename and the commit of its row (listener ``_durable`` / ``_commit_row``, watcher
  ``_copy_to_spool`` / ``_commit``): never acknowledged, so the sender still has it;
- the state store lost its row: the database was deleted, replaced by an older backup, or ``[state] url``
  now names another database. The instance was acknowledged, and the spool file is the only copy left;
- a crash after a row let go of the file (retention released its bytes, a replacement moved the old
  version aside, a duplicate's copy) and before the file was unlinked.

Nothing tells the three apart from the file alone, so :func:`sweep_orphans` never deletes an orphan on
its own say: it reads the file's header and admits it again through the one acceptance path
(:class:`ingest.intake.admit.Admission`, the study becomes due), with the file itself as the row's spool
file. The admission's answer settles it:

- **added**: the row now names the file (the second history: the data is back);
- **duplicate** (the same SOP Instance UID with the same content is stored): the file is a spare copy and
  is removed, unless the row names a spool file that is missing, in which case the orphan is the only
  copy and goes to the quarantine instead;
- **conflict** (same SOP Instance UID, other content or study): the quarantine keeps a copy with a side
  file saying why, and only then is the spool file removed;
- **not DICOM / refused by the acceptance rules**: quarantined with the rule and the detail, then removed.

A file is only ever removed once its bytes are known to be kept elsewhere (a committed row, or a
quarantine copy): when the quarantine cannot keep a copy (full) or the file cannot be read, it stays in
the spool and the next start tries again. When the state store fails, the error is raised with every
file in place.

Only orphans older than a threshold are considered unless this process holds the data dir's lock
(:class:`ingest.adapters.datadir.DataDirLock`): without it, another ``ingest`` process may be writing that
file now, its row not committed yet. Spool names are random, so logging counts leaks no patient data.

Small instances have no spool file (their bytes are committed with their row, in ``instance_bytes``): a
lost state database loses them with it, and nothing in the spool can bring them back.

Temporary files (``.tmp-*``) are different: a committed file has its final name, so a temporary one
belongs to a write in progress that was never acknowledged, and at start no write of this process is.
:func:`sweep_at_start` removes every temporary file of the spool, quarantine and archive folders
regardless of age when this process holds the data dir's lock, so a ``kill -9`` during a 30 MB receive
leaves nothing behind after the next start. Without the lock, the age rule applies to them too.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ingest.adapters.spool import Quarantine, Spool
from ingest.core.records import InstanceRecord
from ingest.errors import HeaderError, NestingTooDeepError, StoreUnavailableError
from ingest.intake.admit import Admission, Candidate, utcnow
from ingest.ports import StateStore, Verdict

__all__ = ["READMITTED_SOURCE", "Reader", "SweepResult", "sweep_at_start", "sweep_orphans"]

#: The age rule for files that may belong to a write in flight.
_IN_FLIGHT_S = 3600.0
#: Orphans admitted per transaction.
_BATCH = 200
#: The ``source`` recorded with a re-admitted instance's row (where it came from is not known any more).
READMITTED_SOURCE = "spool"
#: The quarantine reason of an orphan whose only other copy is gone (a duplicate whose row's file is missing).
_ONLY_COPY = "orphan_only_copy"

#: Reads a spool file's header: its record and content digest (``ingest.adapters.dicomfile.read_header``).
#: Raises :class:`~ingest.errors.HeaderError` when the file is refused, ``OSError`` when it cannot be read.
Reader = Callable[[Path], tuple[InstanceRecord, str]]

LOGGER = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """What one sweep did with the orphans (spool files no row named) and the temporary files.

    Attributes
    ----------
    readmitted:
        Orphans admitted again: a row names each of them now.
    duplicates:
        Orphans identical to a stored instance whose bytes are kept: removed.
    quarantined:
        Orphans not DICOM, refused by the acceptance rules, or conflicting with a stored instance, whose
        bytes the quarantine now keeps (with a side file saying why): removed from the spool.
    left:
        Orphans left in the spool (unreadable, or the quarantine could not keep a copy); the next start
        tries again.
    kept:
        Files a row names, and orphans too young to be considered.
    temps:
        Temporary files removed.
    """

    readmitted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    left: int = 0
    kept: int = 0
    temps: int = 0

    @property
    def orphans(self) -> int:
        """How many orphans were found."""
        return self.readmitted + self.duplicates + self.quarantined + self.left

    @property
    def removed(self) -> int:
        """How many files were removed from the spool (spare copies, quarantined orphans, temporary files)."""
        return self.duplicates + self.quarantined + self.temps


def _old_names(spool: Spool, cutoff: float) -> tuple[list[str], int]:
    """Committed spool names whose mtime is before ``cutoff``, oldest first (a file gone meanwhile is
    skipped), and how many younger ones there are."""
    old: list[tuple[float, str]] = []
    young = 0
    for name in spool.names():
        try:
            mtime = os.lstat(spool.path(name)).st_mtime
        except FileNotFoundError:  # removed by the relay after a push, since the listing
            continue
        except OSError as exc:
            raise StoreUnavailableError(f"cannot read spool {spool.root}: {exc.strerror or exc}") from exc
        if mtime < cutoff:
            old.append((mtime, name))
        else:
            young += 1
    return [name for _, name in sorted(old)], young


class _Readmission:
    """Settles the orphans of one sweep (module doc)."""

    def __init__(self, spool: Spool, store: StateStore, admission: Admission, quarantine: Quarantine,
                 read: Reader, result: SweepResult) -> None:
        self.spool = spool
        self.store = store
        self.admission = admission
        self.quarantine = quarantine
        self.read = read
        self.result = result

    def batch(self, names: Sequence[str]) -> None:
        items: list[Candidate] = []
        for name in names:
            path = self.spool.path(name)
            try:
                record, digest = self.read(path)
            except FileNotFoundError:  # removed since the listing (a push released it)
                continue
            except HeaderError as exc:
                self._quarantine(name, exc.reason, "dicom_header", str(exc))
                continue
            except RecursionError:
                nested = NestingTooDeepError(f"Sequences nested too deep to parse (source={path})")
                self._quarantine(name, nested.reason, "dicom_header", str(nested))
                continue
            except OSError as exc:
                LOGGER.warning("spool sweep: cannot read spool file %s, left in place: %s",
                               name, exc.strerror or exc)
                self.result.left += 1
                continue
            items.append(Candidate(record, digest, READMITTED_SOURCE, spool_name=name, body=path,
                                   origin=f"spool file {name}"))
        # a store failure is raised here with every file still in place
        for item, admitted in zip(items, self.admission.admit(items), strict=True):
            name = item.spool_name or ""  # every candidate here has its spool file
            if admitted.outcome is Verdict.ADDED:
                self.result.readmitted += 1
            elif admitted.outcome is Verdict.DUPLICATE:
                self._duplicate(name, item.record.sop_uid)
            elif admitted.quarantined is not None and self.quarantine.holds(admitted.quarantined):
                self._remove(name)
                self.result.quarantined += 1
            else:
                LOGGER.warning("spool sweep: spool file %s conflicts with a stored instance (%s) and the "
                               "quarantine could not keep a copy; left in place", name, admitted.rule)
                self.result.left += 1

    def _duplicate(self, name: str, sop_uid: str) -> None:
        """An identical instance is stored: the orphan is a spare copy, unless the row's own file is gone."""
        stored = self.store.instance_spool_name(sop_uid)
        if stored is not None and stored != name and not self.spool.path(stored).exists():
            detail = (f"SOP Instance UID {sop_uid}: identical to the stored instance, whose spool file "
                      f"{stored} is missing; this is the only copy")
            self._quarantine(name, _ONLY_COPY, "row_file_missing", detail)
            return
        self._remove(name)
        self.result.duplicates += 1

    def _quarantine(self, name: str, reason: str, rule: str, detail: str) -> None:
        """Copy a spool file to the quarantine with why; remove it from the spool once a copy is kept."""
        path = self.spool.path(name)
        try:
            qname = self.quarantine.put(path, reason, rule, detail, utcnow(), source=f"spool file {name}")
        except StoreUnavailableError as exc:
            LOGGER.warning("spool sweep: spool file %s refused (%s) but cannot be quarantined, left in "
                           "place: %s", name, reason, exc)
            self.result.left += 1
            return
        if not self.quarantine.holds(qname):  # quarantine full: only the side file was written
            LOGGER.warning("spool sweep: spool file %s refused (%s); the quarantine is full, so it stays in "
                           "the spool (side file %s.json)", name, reason, qname)
            self.result.left += 1
            return
        LOGGER.warning("spool sweep: spool file %s refused (%s, rule %s), quarantined as %s: %s",
                       name, reason, rule, qname, detail)
        self._remove(name)
        self.result.quarantined += 1

    def _remove(self, name: str) -> None:
        try:
            self.spool.remove(name)
        except StoreUnavailableError as exc:  # its bytes are kept elsewhere; the next start tries again
            LOGGER.warning("spool sweep: cannot remove spool file %s: %s", name, exc)


def sweep_orphans(
    spool: Spool,
    store: StateStore,
    *,
    admission: Admission,
    quarantine: Quarantine,
    read: Reader,
    older_than_s: float = _IN_FLIGHT_S,
    temps_older_than_s: float | None = None,
) -> SweepResult:
    """Re-admit spool files no instance row names (module doc), and remove stale temporary files.

    Parameters
    ----------
    spool:
        The spool folder (``<data_dir>/spool``).
    store:
        The state store whose ``instances.spool_name`` column says which files are named.
    admission:
        The acceptance path orphans go through; made with ``remove_spooled=False`` and ``on_conflict =
        "quarantine"`` (:func:`sweep_at_start` makes it), so the sweep alone decides what leaves the spool.
    quarantine:
        Where orphans that are refused go (the admission's quarantine).
    read:
        Reads a spool file's header (:data:`Reader`).
    older_than_s:
        Only orphans whose mtime is at least this many seconds old are considered; younger ones may belong
        to a store in flight whose row is not committed yet. ``0`` when no writer of the spool runs.
    temps_older_than_s:
        The same rule for temporary files (default: ``older_than_s``); ``0`` removes all of them, which
        is only safe when no writer of the spool runs (:func:`sweep_at_start` with the data dir's lock).

    Returns
    -------
    SweepResult
        What happened to each file.

    Raises
    ------
    ValueError
        When ``older_than_s`` is negative.
    StoreError
        When the folder cannot be listed or the state store cannot be read or written (orphans not
        settled yet stay in place).
    """
    temps_age = older_than_s if temps_older_than_s is None else temps_older_than_s
    if older_than_s < 0 or temps_age < 0:
        raise ValueError(f"older_than_s and temps_older_than_s must be >= 0, got {older_than_s} and "
                         f"{temps_age}")
    result = SweepResult()
    candidates, result.kept = _old_names(spool, time.time() - older_than_s)
    referenced = store.referenced_spool_names(candidates) if candidates else set()
    orphans = [name for name in candidates if name not in referenced]
    result.kept += len(candidates) - len(orphans)
    if orphans:
        LOGGER.warning(
            "spool sweep: %d spool file(s) named by no instance row (state store restored from an older "
            "backup, replaced, or a crash before a row's commit): admitting them again", len(orphans)
        )
        readmission = _Readmission(spool, store, admission, quarantine, read, result)
        for start in range(0, len(orphans), _BATCH):
            readmission.batch(orphans[start : start + _BATCH])
    result.temps = spool.sweep_temps(older_than_s=temps_age)
    LOGGER.log(
        logging.WARNING if result.orphans else logging.INFO,
        "spool sweep: %d orphaned file(s)%s: %d re-admitted, %d identical to a stored instance removed, "
        "%d quarantined, %d left in place; %d file(s) kept; %d temporary file(s) removed%s",
        result.orphans,
        f" older than {older_than_s:.0f} s" if older_than_s > 0 else "",
        result.readmitted,
        result.duplicates,
        result.quarantined,
        result.left,
        result.kept,
        result.temps,
        f" older than {temps_age:.0f} s" if temps_age > 0 else "",
    )
    return result


def sweep_at_start(
    data_dir: Path,
    store: StateStore,
    *,
    owns_data_dir: bool,
    read: Reader,
    stable_age_s: float,
    quarantine_max_bytes: int | None,
) -> SweepResult:
    """The start-up sweep of ``ingest serve``: spool orphans, and the temporary files of its folders.

    Parameters
    ----------
    data_dir:
        The data dir; ``spool/``, ``quarantine/`` and ``archive/`` are swept when they exist (the
        quarantine is created when the spool holds files).
    store:
        The state store (see :func:`sweep_orphans`).
    owns_data_dir:
        Whether this process holds the data dir's lock: then every orphan and every temporary file is
        settled whatever its age (no writer runs yet, and no other process writes there); else only those
        older than an hour.
    read:
        Reads a spool file's header (:data:`Reader`).
    stable_age_s:
        ``[relay] stable_age_s``: a re-admitted instance's study is due this long after the sweep.
    quarantine_max_bytes:
        ``[quarantine] max_bytes``.

    Returns
    -------
    SweepResult
        What the spool sweep did, with the temporary files of every folder counted in ``temps``.

    Raises
    ------
    StoreError
        When a folder cannot be listed or the state store cannot be read or written.
    """
    age = 0.0 if owns_data_dir else _IN_FLIGHT_S
    result = SweepResult()
    if (data_dir / "spool").is_dir():
        spool = Spool(data_dir / "spool")
        if spool.names():  # the quarantine folder is made only when there is something to settle
            quarantine = Quarantine(data_dir / "quarantine", max_bytes=quarantine_max_bytes)
            admission = Admission(
                store, spool=spool, quarantine=quarantine, metrics=None, stable_age_s=stable_age_s,
                label=READMITTED_SOURCE, on_conflict="quarantine", remove_spooled=False,
            )
            result = sweep_orphans(spool, store, admission=admission, quarantine=quarantine, read=read,
                                   older_than_s=age, temps_older_than_s=age)
        else:
            result.temps = spool.sweep_temps(older_than_s=age)
    for name in ("quarantine", "archive"):
        if (data_dir / name).is_dir():
            # a Spool (no quota) only to sweep: opening a Quarantine would apply its quota for nothing
            temps = Spool(data_dir / name).sweep_temps(older_than_s=age)
            if temps:
                LOGGER.info("%s sweep: removed %d temporary file(s)", name, temps)
            result.temps += temps
    return result

