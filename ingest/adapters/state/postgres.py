"""The state store on PostgreSQL, shared by several ``ingest serve`` nodes (docs/architecture.md).

Same tables, queries and semantics as :class:`ingest.adapters.state.sqlite.SQLiteStateStore` (both are
:class:`ingest.adapters.state.sql.SQLStateStore`; this module holds only what is PostgreSQL's: the
connection pool, ``%s`` placeholders, ``timestamptz`` times and the schema table). ``claim_due`` selects
with ``FOR UPDATE SKIP LOCKED`` and writes the lease in the same transaction, so each due study has
exactly one writer across nodes; an expired lease lets another node take over.

Connections come from a small pool (idle connections are reused; one the server has closed or written
to while idle is dropped at checkout, and a connection failure drops every idle one, so a restarted
server costs at most the one call that was in flight), each in
autocommit mode with one explicit transaction per call, ``synchronous_commit = on`` and
``TimeZone = UTC``. The schema is versioned in ``ingest_schema`` and migrated under an advisory lock.

Error mapping: ``psycopg.OperationalError`` (cannot connect, connection lost, disk full, serialization
failure, deadlock, lock timeout) becomes :class:`StoreUnavailableError`; any other ``psycopg.Error``
becomes :class:`StoreError`. Messages name the server as ``postgresql://host:port/dbname``, never the
credentials.
"""

from __future__ import annotations

import functools
import logging
import re
import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ingest.adapters.state.commitments import CommitmentStore
from ingest.adapters.state.files import FileIdentityStore
from ingest.adapters.state.lifecycle import LifecycleStore
from ingest.adapters.state.retention import RetentionStore
from ingest.adapters.state.schema import POSTGRES, migrations
from ingest.adapters.state.sql import utc
from ingest.adapters.state.sync import SyncStore
from ingest.errors import StoreError, StoreUnavailableError

__all__ = ["PG_MIGRATIONS", "PostgresStateStore", "check_schema", "server_label"]

LOGGER = logging.getLogger(__name__)

_MIGRATION_LOCK: Final = 0x1A6E57  # pg_advisory_xact_lock key serialising migrations

#: Numbered schema migrations; ``PG_MIGRATIONS[i]`` brings ``ingest_schema.version`` from ``i`` to
#: ``i + 1`` (DDL in :mod:`ingest.adapters.state.schema`, written once for both dialects).
PG_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = migrations(POSTGRES)


def check_schema(url: str, *, connect_timeout_s: float = 10.0) -> list[str]:
    """Check the schema of a PostgreSQL state store without migrating it (``ingest check-store``).

    PostgreSQL has no integrity check of its own data files to run from a client (its checksums and WAL
    are the server's); this says whether the schema ``ingest`` needs is there: the ``ingest_schema``
    version, and every table its migrations create.

    Returns
    -------
    list[str]
        What is wrong; empty when the schema is complete.

    Raises
    ------
    StoreUnavailableError
        When the server cannot be reached.
    """
    label = _label(url)
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(connect_timeout_s))) as conn:
            present = {str(r[0]) for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
            ).fetchall()}
            version = 0
            if "ingest_schema" in present:
                row = conn.execute("SELECT max(version) FROM ingest_schema").fetchone()
                version = int(row[0]) if row is not None and row[0] is not None else 0
    except psycopg.OperationalError as exc:
        raise StoreUnavailableError(f"state database {label}: cannot check it: {exc}") from exc
    except psycopg.Error as exc:
        return [f"cannot read the schema: {exc}"]
    if version == 0:
        return ["no ingest schema (a new, empty database: ingest serve creates it)"]
    if version > len(PG_MIGRATIONS):
        return [f"schema version {version} is newer than this program's ({len(PG_MIGRATIONS)})"]
    wanted = {m.group(1) for steps in PG_MIGRATIONS[:version] for sql in steps
              for m in re.finditer(r"CREATE TABLE (\w+)", sql)}
    missing = sorted(wanted - present)
    return [f"schema version {version} but tables missing: {', '.join(missing)}"] if missing else []


@functools.lru_cache(maxsize=128)
def _format_style(sql: str) -> str:
    """``sql`` with ``?`` placeholders in psycopg's ``%s`` style (a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


def _stale(conn: psycopg.Connection[Any]) -> bool:
    """True when an idle connection cannot be reused: closed, broken, or the server wrote to it while idle.

    An idle autocommit connection (no ``LISTEN``) receives nothing unless the server is terminating it
    (restart, ``pg_terminate_backend``, crash: a FATAL message or EOF), so a readable socket means stale.
    """
    if conn.closed or conn.broken:
        return True
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


def server_label(url: str) -> str:
    """``postgresql://host:port/dbname`` of a libpq URL, without the credentials."""
    return _label(url)


def _label(url: str) -> str:
    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://?"
    return f"postgresql://{info.get('host', '')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


class PostgresStateStore(LifecycleStore, CommitmentStore, RetentionStore, FileIdentityStore, SyncStore):
    """:class:`ingest.ports.StateStore` on PostgreSQL (psycopg 3, synchronous).

    Parameters
    ----------
    url:
        A libpq URL or conninfo string (``postgresql://user@host:port/db``).
    node:
        Name recorded with each instance (which node's spool holds the bytes); default: the host name.
    max_idle:
        Idle connections kept for reuse.
    connect_timeout_s:
        Connection timeout.

    Raises
    ------
    StoreUnavailableError
        When the server cannot be reached.
    StoreError
        When its schema is newer than this program knows.
    """

    def __init__(
        self, url: str, *, node: str | None = None, max_idle: int = 4, connect_timeout_s: float = 10.0
    ) -> None:
        self._url = url
        self.label = _label(url)
        self._where = self.label
        self.node = node if node is not None else socket.gethostname()
        self._max_idle = max_idle
        self._timeout = max(1, int(connect_timeout_s))
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._closed = False
        with self._write("migrate") as cur:
            self._migrate(cur)

    # -- connections -------------------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._url, autocommit=True, connect_timeout=self._timeout)
        conn.execute("SET synchronous_commit = on")  # a commit returns only once its WAL is flushed
        conn.execute("SET TIME ZONE 'UTC'")
        return conn

    @contextmanager
    def _connection(self, op: str) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection with errors mapped; given back (or closed) on exit."""
        with self._lock:
            if self._closed:
                raise StoreError(f"state database {self.label}: {op} on a closed store")
            conn = self._idle.pop() if self._idle else None
        while conn is not None and _stale(conn):
            conn.close()
            with self._lock:
                conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                conn = self._connect()
            yield conn
        except psycopg.OperationalError as exc:
            if conn is not None and (conn.broken or conn.closed):
                self._drop_idle()  # the server went away: the other idle connections are dead too
            raise StoreUnavailableError(f"state database {self.label}: {op} failed: {exc}") from exc
        except psycopg.Error as exc:
            raise StoreError(f"state database {self.label}: {op} failed: {exc}") from exc
        finally:
            if conn is not None:
                self._give_back(conn)

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _give_back(self, conn: psycopg.Connection[Any]) -> None:
        with self._lock:
            if not self._closed and not conn.closed and not conn.broken and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    @contextmanager
    def _use(self, op: str) -> Iterator[psycopg.Cursor[Any]]:
        """A cursor on a pooled connection (autocommit), with errors mapped; no transaction."""
        with self._connection(op) as conn, conn.cursor() as cur:
            yield cur

    @contextmanager
    def _write(self, op: str) -> Iterator[psycopg.Cursor[Any]]:
        """A cursor inside one transaction, committed on exit."""
        with self._connection(op) as conn, conn.transaction(), conn.cursor() as cur:
            yield cur

    def _q(self, sql: str) -> str:
        return _format_style(sql)

    # ``claim_due``: rows another node is claiming are skipped, not waited for
    _CLAIM_LOCK: ClassVar[str] = " FOR UPDATE SKIP LOCKED"

    # -- times: timestamptz ------------------------------------------------------------------------------

    def _time(self, dt: datetime) -> datetime:
        return utc(dt)

    def _from_time(self, value: Any) -> datetime | None:
        return None if value is None else value.astimezone(UTC)

    # -- schema ------------------------------------------------------------------------------------------

    def _migrate(self, cur: psycopg.Cursor[Any]) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        cur.execute("CREATE TABLE IF NOT EXISTS ingest_schema (version integer NOT NULL)")
        row = cur.execute("SELECT max(version) FROM ingest_schema").fetchone()
        version = int(row[0]) if row is not None and row[0] is not None else 0

        def set_version(number: int) -> None:
            cur.execute("DELETE FROM ingest_schema")
            cur.execute("INSERT INTO ingest_schema (version) VALUES (%s)", (number,))

        self._apply_migrations(cur, PG_MIGRATIONS, version, set_version)
        fsync = cur.execute("SHOW fsync").fetchone()
        if fsync is not None and fsync[0] != "on":
            LOGGER.warning(
                "State database %s runs with fsync=%s: commits are not crash-safe", self.label, fsync[0]
            )

    @property
    def schema_version(self) -> int:
        """The schema version of the database."""
        with self._use("schema_version") as cur:
            row = cur.execute("SELECT max(version) FROM ingest_schema").fetchone()
        return int(row[0]) if row is not None and row[0] is not None else 0

    def close(self) -> None:
        """Close idle connections; connections in use are closed when given back. Idempotent."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
