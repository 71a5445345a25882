"""The state store (docs/architecture.md "Durability"): the shared SQL rules (``sql``), SQLite (``sqlite``,
the embedded default) and PostgreSQL (``postgres``, several nodes sharing one store), and
:func:`open_state_store`, which picks one by ``[state] url``.
"""

from __future__ import annotations

from pathlib import Path

from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.errors import ConfigError
from ingest.ports import StateStore

__all__ = ["open_state_store", "sqlite_path"]


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


def sqlite_path(url: str | None, data_dir: Path) -> Path | None:
    """The SQLite database file ``[state] url`` names (``data_dir/state.sqlite3`` when unset), or ``None``
    when the store is not SQLite."""
    if url is None or url == "":
        return data_dir / "state.sqlite3"
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    return None
