"""Start-up sweep of orphaned spool files (RELIABILITY.md, Durability).

A crash between a spool file's rename and the commit of its instance row (listener ``_durable`` /
``_commit_row``, watcher ``_copy_to_spool`` / ``_commit``) leaves a complete spool file that no row points
at: it was never acknowledged, so the sender still has it, and nothing will ever read or remove it.
:func:`sweep_orphans` removes such files, and stale temporary files, once at start. Only files older than
a threshold are considered, because a younger one may belong to a C-STORE in flight on another thread
(its row not committed yet). Spool names are random, so logging counts leaks no patient data.
"""

from __future__ import annotations

import logging
import os
import time

from ingest.adapters.spool import Spool
from ingest.errors import StoreUnavailableError
from ingest.ports import StateStore

__all__ = ["sweep_orphans"]

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


def sweep_orphans(spool: Spool, store: StateStore, *, older_than_s: float = 3600) -> int:
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
    if older_than_s < 0:
        raise ValueError(f"older_than_s must be >= 0, got {older_than_s}")
    cutoff = time.time() - older_than_s
    candidates = _old_names(spool, cutoff)
    referenced = store.referenced_spool_names(candidates) if candidates else set()
    orphans = [name for name in candidates if name not in referenced]
    for name in orphans:
        spool.remove(name)  # a file already gone is not an error
    temps = spool.sweep_temps(older_than_s=older_than_s)
    LOGGER.info(
        "spool sweep: removed %d orphaned file(s) and %d temporary file(s) older than %.0f s (%d kept)",
        len(orphans),
        temps,
        older_than_s,
        len(candidates) - len(orphans),
    )
    return len(orphans) + temps
