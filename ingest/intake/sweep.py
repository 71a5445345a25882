"""Start-up sweep of orphaned spool files (``docs/reliability.md``, Durability).

A crash between a spool file's rename and the commit of its instance row (listener ``_durable`` /
``_commit_row``, watcher ``_copy_to_spool`` / ``_commit``) leaves a complete spool file that no row points
at: it was never acknowledged, so the sender still has it, and nothing will ever read or remove it.
:func:`sweep_orphans` removes such files, and stale temporary files, once at start. Only files older than
a threshold are considered, because a younger one may belong to a C-STORE in flight on another thread
(its row not committed yet). Spool names are random, so logging counts leaks no patient data.

Small instances have no spool file (their bytes are committed with their row, in ``instance_bytes``): a
crash leaves both or neither, so only spooled (larger) instances can leave orphans.

Temporary files (``.tmp-*``) are different: a committed file has its final name, so a temporary one
belongs to a write in progress, and at start no write of this process is. :func:`sweep_at_start`
removes every temporary file of the spool, quarantine and archive folders regardless of age when this
process holds the data dir's lock (:class:`ingest.adapters.datadir.DataDirLock`: no other ``ingest``
process writes there), so a ``kill -9`` during a 30 MB receive leaves nothing behind after the next
start. Without the lock, the age rule applies to them too.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ingest.adapters.spool import Spool
from ingest.errors import StoreUnavailableError
from ingest.ports import StateStore

__all__ = ["sweep_at_start", "sweep_orphans"]

#: The age rule for files that may belong to a write in flight.
_IN_FLIGHT_S = 3600.0

LOGGER = logging.getLogger(__name__)


def _old_names(spool: Spool, cutoff: float) -> list[str]:
    """Committed spool names whose mtime is before ``cutoff`` (a file gone meanwhile is skipped)."""
    old: list[str] = []
    for name in spool.names():
        try:
            mtime = os.lstat(spool.path(name)).st_mtime
        except FileNotFoundError:  # removed by the relay after a push, since the listing
            continue
        except OSError as exc:
            raise StoreUnavailableError(f"cannot read spool {spool.root}: {exc.strerror or exc}") from exc
        if mtime < cutoff:
            old.append(name)
    return old


def sweep_orphans(
    spool: Spool,
    store: StateStore,
    *,
    older_than_s: float = _IN_FLIGHT_S,
    temps_older_than_s: float | None = None,
) -> int:
    """Remove spool files no instance row references, and stale temporary files.

    Parameters
    ----------
    spool:
        The spool folder (``<data_dir>/spool``).
    store:
        The state store whose ``instances.spool_name`` column says which files are still needed.
    older_than_s:
        Only files whose mtime is at least this many seconds old are removed; younger ones may belong to
        a store in flight whose row is not committed yet.
    temps_older_than_s:
        The same rule for temporary files (default: ``older_than_s``); ``0`` removes all of them, which
        is only safe when no writer of the spool runs (:func:`sweep_at_start` with the data dir's lock).

    Returns
    -------
    int
        How many files were removed (orphans plus temporary files).

    Raises
    ------
    ValueError
        When ``older_than_s`` is negative.
    StoreUnavailableError
        When the folder cannot be listed or a file removed, or the state store cannot be read.
    """
    temps_age = older_than_s if temps_older_than_s is None else temps_older_than_s
    if older_than_s < 0 or temps_age < 0:
        raise ValueError(f"older_than_s and temps_older_than_s must be >= 0, got {older_than_s} and "
                         f"{temps_age}")
    cutoff = time.time() - older_than_s
    candidates = _old_names(spool, cutoff)
    referenced = store.referenced_spool_names(candidates) if candidates else set()
    orphans = [name for name in candidates if name not in referenced]
    for name in orphans:
        spool.remove(name)  # a file already gone is not an error
    temps = spool.sweep_temps(older_than_s=temps_age)
    LOGGER.info(
        "spool sweep: removed %d orphaned file(s) older than %.0f s (%d kept) and %d temporary file(s)%s",
        len(orphans),
        older_than_s,
        len(candidates) - len(orphans),
        temps,
        f" older than {temps_age:.0f} s" if temps_age > 0 else "",
    )
    return len(orphans) + temps


def sweep_at_start(data_dir: Path, store: StateStore, *, owns_data_dir: bool) -> int:
    """The start-up sweep of ``ingest serve``: spool orphans, and the temporary files of its folders.

    Parameters
    ----------
    data_dir:
        The data dir; ``spool/``, ``quarantine/`` and ``archive/`` are swept when they exist (none is
        created here).
    store:
        The state store (see :func:`sweep_orphans`).
    owns_data_dir:
        Whether this process holds the data dir's lock: then every temporary file is removed whatever
        its age (no writer runs yet, and no other process writes there); else only those older than an
        hour.

    Returns
    -------
    int
        How many files were removed.

    Raises
    ------
    StoreUnavailableError
        When a folder cannot be listed or a file removed, or the state store cannot be read.
    """
    temps_age = 0.0 if owns_data_dir else _IN_FLIGHT_S
    removed = 0
    if (data_dir / "spool").is_dir():
        removed += sweep_orphans(Spool(data_dir / "spool"), store, temps_older_than_s=temps_age)
    for name in ("quarantine", "archive"):
        if (data_dir / name).is_dir():
            # a Spool (no quota) only to sweep: opening a Quarantine would apply its quota for nothing
            temps = Spool(data_dir / name).sweep_temps(older_than_s=temps_age)
            if temps:
                LOGGER.info("%s sweep: removed %d temporary file(s)", name, temps)
            removed += temps
    return removed
