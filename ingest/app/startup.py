"""The state store checks of ``ingest serve`` / ``ingest watch`` at start, and ``ingest check-store``.

``docs/reliability.md`` (Durability, "The state store at start"):

- **Integrity.** A SQLite database is checked with ``PRAGMA quick_check`` before it is opened (before
  any migration writes to it); a damaged one refuses the start, naming the file and what to do.
  ``ingest check-store`` runs the full ``PRAGMA integrity_check`` (PostgreSQL: the schema is there).
- **A new or empty store while the spool holds files.** The spool's files are acknowledged instances
  whose rows the store should hold. A SQLite file that is missing or zero bytes long, or any store
  without a single study (a new PostgreSQL database, a fresh schema), means those rows are gone: the
  start is refused, saying what was found and how to proceed (restore the backup, or ``--adopt-spool``
  to admit every spool file again). A store that has rows but misses some (an older backup) starts,
  and the start-up sweep (:mod:`ingest.intake.sweep`) admits the files it does not name again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ingest.adapters.spool import Spool
from ingest.adapters.state import sqlite_path
from ingest.app.wiring import open_store
from ingest.config import Settings
from ingest.errors import ConfigError, StoreError
from ingest.logs import printable
from ingest.ports import StateStore

__all__ = ["StoreRefusedError", "check_store", "open_checked_store", "spool_files"]

LOGGER = logging.getLogger(__name__)


class StoreRefusedError(StoreError):
    """The state store does not match the data dir: the service does not start (exit code 1)."""


def spool_files(data_dir: Path) -> int:
    """How many committed files ``data_dir/spool`` holds (0 when there is no spool; none is created)."""
    folder = data_dir / "spool"
    return len(Spool(folder).names()) if folder.is_dir() else 0


def _how_to_proceed(kind: str) -> str:
    restore = (
        "restore the state database from its backup while ingest is stopped (the .sqlite3 file with its "
        "-wal file)" if kind == "sqlite" else "point [state] url at the database that holds this node's rows"
    )
    return (
        f"To proceed: {restore}; or start once with --adopt-spool to admit every spool file again (each "
        "instance's study is pushed again; instances small enough to be kept in the state store itself, "
        "[spool] inline_max_bytes, have no spool file and cannot be recovered this way)."
    )


def open_checked_store(settings: Settings, *, adopt_spool: bool) -> StateStore:
    """Open the state store of a service, refusing a damaged one, or a new/empty one with a full spool.

    Parameters
    ----------
    settings:
        ``data_dir`` (the spool) and ``[state]``.
    adopt_spool:
        ``--adopt-spool``: a new or empty store with a full spool starts, and the start-up sweep admits
        every spool file again.

    Raises
    ------
    StoreRefusedError
        What was found and what to do (``ingest`` exits with code 1).
    StoreError
        When the store cannot be opened.
    """
    from ingest.adapters.state.sqlite import check_database, database_file

    files = spool_files(settings.data_dir)
    spool = settings.data_dir / "spool"
    adopting = False  # logged once
    path = sqlite_path(settings.state.url, settings.data_dir)
    if path is not None:
        found = database_file(path)
        if found != "present" and files:
            what = "does not exist" if found == "missing" else "is empty (0 bytes)"
            if not adopt_spool:
                raise StoreRefusedError(
                    f"the state store is new ({path} {what}) but {spool} holds {files} instance files: "
                    f"acknowledged instances whose rows are missing. {_how_to_proceed('sqlite')}"
                )
            adopting = True
            LOGGER.warning("--adopt-spool: the state store is new (%s %s); the %d files of %s are admitted "
                           "again", path, what, files, spool)
        elif found == "empty":
            LOGGER.warning("state database %s is empty (0 bytes): starting as a new store", path)
        elif found == "present":
            problems = check_database(path, full=False)
            if problems:
                raise StoreRefusedError(
                    f"state database {path} is damaged (PRAGMA quick_check: {len(problems)} problem(s); "
                    f"first: {printable(problems[0])}). Nothing was started. Stop every ingest process on "
                    f"it and restore the database from a backup; `ingest check-store` prints every "
                    "problem. The spool files of instances the backup lacks are admitted again at the next "
                    "start."
                )
    store = open_store(settings)
    try:
        if files and not store.study_counts():
            if not adopt_spool:
                kind = "sqlite" if path is not None else "postgresql"
                where = str(path) if path is not None else _server(settings.state.url or "")
                raise StoreRefusedError(
                    f"the state store ({where}) has no studies at all but {spool} holds {files} instance "
                    f"files: acknowledged instances whose rows are missing. {_how_to_proceed(kind)}"
                )
            if not adopting:
                LOGGER.warning("--adopt-spool: the state store has no studies; the %d files of %s are "
                               "admitted again", files, spool)
    except BaseException:
        store.close()
        raise
    return store


def _server(url: str) -> str:
    from ingest.adapters.state.postgres import server_label

    return server_label(url)


def check_store(settings: Settings) -> tuple[str, list[str]]:
    """``ingest check-store``: the full check of the configured state store, without changing it.

    Returns
    -------
    tuple of (str, list[str])
        What was checked (the database file, or the PostgreSQL server and database) and the problems
        found (untrusted text: escape before printing); no problems means the store is sound.

    Raises
    ------
    StoreError
        When the store cannot be reached (not a verdict on its content).
    """
    path = sqlite_path(settings.state.url, settings.data_dir)
    if path is not None:
        from ingest.adapters.state.sqlite import check_database, database_file

        found = database_file(path)
        if found == "missing":
            return str(path), ["the file does not exist"]
        if found == "empty":
            return str(path), ["the file is empty (0 bytes): SQLite would start a new database in it"]
        return str(path), check_database(path, full=True)
    url = settings.state.url or ""
    if not url.startswith(("postgresql://", "postgres://")):
        scheme = url.split(":", 1)[0]
        raise ConfigError(f"[state] url: unsupported scheme {scheme!r} (use postgresql://... or leave unset)")
    from ingest.adapters.state.postgres import check_schema, server_label

    return server_label(url), check_schema(url)
