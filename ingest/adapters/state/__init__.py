"""The state store (docs/architecture.md "Durability"): the shared SQL rules (``sql``), SQLite (``sqlite``,
the embedded default) and PostgreSQL (``postgres``, several nodes sharing one store), and
:func:`open_state_store`, which picks one by ``[state] url``.
"""

from __future__ import annotations

from pathlib import Path

from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.errors import ConfigError
from ingest.ports import StateStore

__all__ = ["known_schema_version", "open_state_store", "sqlite_path", "stored_schema_version"]


def open_state_store(url: str | None, data_dir: Path, *, node: str | None = None) -> StateStore:
    """Open the configured state store (``[state] url``).

    Parameters
    ----------
    url:
        ``None`` (SQLite at ``data_dir/state.sqlite3``), ``sqlite:///path`` or ``postgresql://...``
        (PostgreSQL, imported lazily).
    data_dir:
        The data directory (``--data-dir``).
    node:
        Name recorded with instances this node accepted; default: the host name.

    Raises
    ------
    ConfigError
        For an unsupported URL scheme.
    StoreError, StoreUnavailableError
        When the store cannot be opened.
    """
    path = sqlite_path(url, data_dir)
    if path is not None or url is None:
        return SQLiteStateStore(path or data_dir / "state.sqlite3", node=node)
    if url.startswith(("postgresql://", "postgres://")):
        from ingest.adapters.state.postgres import PostgresStateStore

        return PostgresStateStore(url, node=node)
    scheme = url.split(":", 1)[0]
    raise ConfigError(f"[state] url: unsupported scheme {scheme!r} (use postgresql://... or leave unset)")


def known_schema_version(url: str | None) -> int:
    """The schema version this program migrates a store of ``[state] url`` to."""
    if url is not None and url.startswith(("postgresql://", "postgres://")):
        from ingest.adapters.state.postgres import PG_MIGRATIONS

        return len(PG_MIGRATIONS)
    from ingest.adapters.state.sqlite import MIGRATIONS

    return len(MIGRATIONS)


def stored_schema_version(url: str | None, data_dir: Path) -> int:
    """The schema version a store holds now, read without migrating or creating anything (0: none)."""
    if url is not None and url.startswith(("postgresql://", "postgres://")):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            exists = conn.execute("SELECT to_regclass('ingest_schema')").fetchone()
            if exists is None or exists[0] is None:
                return 0
            row = conn.execute("SELECT max(version) FROM ingest_schema").fetchone()
            return int(row[0]) if row is not None and row[0] is not None else 0
    import sqlite3

    path = Path(url.removeprefix("sqlite:///")) if url else data_dir / "state.sqlite3"
    lite = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(lite.execute("PRAGMA user_version").fetchone()[0])
    finally:
        lite.close()


def sqlite_path(url: str | None, data_dir: Path) -> Path | None:
    """The SQLite database file ``[state] url`` names (``data_dir/state.sqlite3`` when unset), or ``None``
    when the store is not SQLite."""
    if url is None or url == "":
        return data_dir / "state.sqlite3"
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    return None
