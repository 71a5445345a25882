"""The state store on PostgreSQL, shared by several ``ingest serve`` nodes (DESIGN.md, Beyond one machine).

Same tables and semantics as :class:`ingest.adapters.state.SQLiteStateStore`; times are ``timestamptz``.
``claim_due`` selects with ``FOR UPDATE SKIP LOCKED`` and writes a lease in the same statement, so each
due study has exactly one writer across nodes; an expired lease lets another node take over.

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

import logging
import select
import socket
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ingest.adapters.state import (
    _STUDY_COLUMNS,
    _STUDY_FROM,
    CONFLICT_OTHER_CONTENT,
    CONFLICT_OTHER_STUDY,
    study_row,
    utc,
)
from ingest.core.records import InstanceRecord
from ingest.errors import StoreError, StoreUnavailableError
from ingest.ports import Added, AddOutcome, StateStore, StudyClaim, StudyRow, StudyState

__all__ = ["PG_MIGRATIONS", "PostgresStateStore"]

LOGGER = logging.getLogger(__name__)

_MIGRATION_LOCK: Final = 0x1A6E57  # pg_advisory_xact_lock key serialising migrations

#: Numbered schema migrations; ``PG_MIGRATIONS[i]`` brings ``ingest_schema.version`` from ``i`` to ``i + 1``.
PG_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE instances (
            sop_uid     text PRIMARY KEY,         -- (0008,0018)
            study_uid   text NOT NULL,            -- (0020,000D)
            series_uid  text NOT NULL,            -- (0020,000E)
            digest      text NOT NULL,
            source      text NOT NULL,
            spool_name  text,
            node        text,
            record_json text NOT NULL,
            added_at    timestamptz NOT NULL
        )
        """,
        "CREATE INDEX instances_study ON instances (study_uid)",
        """
        CREATE TABLE studies (
            study_uid       text PRIMARY KEY,     -- (0020,000D)
            generation      bigint NOT NULL DEFAULT 0,
            dirty           boolean NOT NULL DEFAULT false,
            last_seen       timestamptz,
            due_at          timestamptz,
            state           text NOT NULL DEFAULT 'pending',
            backend_id      text,
            version_id      text,
            digest          text,
            attempts        integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz,
            last_error      text,
            dead_reason     text,
            pushed_at       timestamptz,
            lease_owner     text,
            lease_expires   timestamptz
        )
        """,
        # claim_due: pending + dirty studies in due order
        "CREATE INDEX studies_due ON studies (state, dirty, due_at)",
    ),
)


def _to_dt(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


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


def _label(url: str) -> str:
    try:
        info = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://?"
    return f"postgresql://{info.get('host', '')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


class PostgresStateStore(StateStore):
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
        self.node = node if node is not None else socket.gethostname()
        self._max_idle = max_idle
        self._timeout = max(1, int(connect_timeout_s))
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._closed = False
        with self._write("migrate") as conn:
            self._migrate(conn)

    # -- connections -------------------------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self._url, autocommit=True, connect_timeout=self._timeout)
        conn.execute("SET synchronous_commit = on")  # a commit returns only once its WAL is flushed
        conn.execute("SET TIME ZONE 'UTC'")
        return conn

    @contextmanager
    def _use(self, op: str) -> Iterator[psycopg.Connection[Any]]:
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
    def _write(self, op: str) -> Iterator[psycopg.Connection[Any]]:
        with self._use(op) as conn, conn.transaction():
            yield conn

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS ingest_schema (version integer NOT NULL)")
        row = conn.execute("SELECT max(version) FROM ingest_schema").fetchone()
        version = int(row[0]) if row is not None and row[0] is not None else 0
        if version > len(PG_MIGRATIONS):
            raise StoreError(
                f"state database {self.label} has schema version {version}; "
                f"this program knows up to {len(PG_MIGRATIONS)}"
            )
        for number in range(version, len(PG_MIGRATIONS)):
            for statement in PG_MIGRATIONS[number]:
                conn.execute(statement)  # constant SQL text
            conn.execute("DELETE FROM ingest_schema")
            conn.execute("INSERT INTO ingest_schema (version) VALUES (%s)", (number + 1,))
            LOGGER.info("State database %s migrated to schema version %d", self.label, number + 1)
        fsync = conn.execute("SHOW fsync").fetchone()
        if fsync is not None and fsync[0] != "on":
            LOGGER.warning(
                "State database %s runs with fsync=%s: commits are not crash-safe", self.label, fsync[0]
            )

    @property
    def schema_version(self) -> int:
        """The schema version of the database."""
        with self._use("schema_version") as conn:
            row = conn.execute("SELECT max(version) FROM ingest_schema").fetchone()
        return int(row[0]) if row is not None and row[0] is not None else 0

    # -- instances ---------------------------------------------------------------------------------------

    def _add(
        self,
        conn: psycopg.Connection[Any],
        record: InstanceRecord,
        source: str,
        spool_name: str | None,
        digest: str,
        now: datetime,
        due_at: datetime,
    ) -> Added:
        inserted = conn.execute(
            "INSERT INTO instances (sop_uid, study_uid, series_uid, digest, source, spool_name, node, "
            "record_json, added_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (sop_uid) DO NOTHING RETURNING sop_uid",
            (
                record.sop_uid,
                record.study_uid,
                record.series_uid,
                digest,
                source,
                spool_name,
                self.node,
                record.model_dump_json(),
                now,
            ),
        ).fetchone()
        if inserted is None:
            found = conn.execute(
                "SELECT study_uid, digest FROM instances WHERE sop_uid = %s", (record.sop_uid,)
            ).fetchone()
            if found is None:  # pragma: no cover - deleted concurrently; nothing in ingest deletes rows
                raise StoreUnavailableError(f"instance {record.sop_uid} vanished during add; retry")
            if found[0] != record.study_uid:
                return Added(AddOutcome.CONFLICT, record.study_uid, CONFLICT_OTHER_STUDY)
            if found[1] != digest:
                return Added(AddOutcome.CONFLICT, record.study_uid, CONFLICT_OTHER_CONTENT)
            return Added(AddOutcome.DUPLICATE, record.study_uid)
        # Same rule as SQLite: dirty, pending, due at ``due_at``; a dead study is revived.
        conn.execute(
            "INSERT INTO studies AS s (study_uid, generation, dirty, last_seen, due_at, state) "
            "VALUES (%s, 1, true, %s, %s, 'pending') "
            "ON CONFLICT (study_uid) DO UPDATE SET generation = s.generation + 1, dirty = true, "
            "last_seen = excluded.last_seen, due_at = excluded.due_at, "
            "attempts = CASE WHEN s.state = 'dead' THEN 0 ELSE s.attempts END, "
            "next_attempt_at = CASE WHEN s.state = 'dead' THEN NULL ELSE s.next_attempt_at END, "
            "dead_reason = NULL, state = 'pending'",
            (record.study_uid, now, due_at),
        )
        return Added(AddOutcome.ADDED, record.study_uid)

    def add_instance(
        self,
        record: InstanceRecord,
        *,
        source: str,
        spool_name: str | None,
        digest: str,
        now: datetime,
        due_at: datetime,
    ) -> Added:
        """See :meth:`ingest.adapters.state.SQLiteStateStore.add_instance`; durable on return."""
        return self.add_instances([(record, source, spool_name, digest)], now=now, due_at=due_at)[0]

    def add_instances(
        self,
        items: Sequence[tuple[InstanceRecord, str, str | None, str]],
        *,
        now: datetime,
        due_at: datetime,
    ) -> list[Added]:
        """Batch :meth:`add_instance` of ``(record, source, spool_name, digest)`` in one transaction."""
        now_u, due_u = utc(now), utc(due_at)
        with self._write("add_instances") as conn:
            return [self._add(conn, rec, src, spool, dig, now_u, due_u) for rec, src, spool, dig in items]

    def instances(self, study_uid: str) -> list[InstanceRecord]:
        """The records of a study's instances, ordered by series and SOP Instance UID."""
        with self._use("instances") as conn:
            rows = conn.execute(
                "SELECT record_json FROM instances WHERE study_uid = %s ORDER BY series_uid, sop_uid",
                (study_uid,),
            ).fetchall()
        return [InstanceRecord.model_validate_json(row[0]) for row in rows]

    def spool_names(self, study_uid: str) -> list[str]:
        """Spool names recorded for a study's instances (for clean-up after a push)."""
        with self._use("spool_names") as conn:
            rows = conn.execute(
                "SELECT spool_name FROM instances WHERE study_uid = %s AND spool_name IS NOT NULL "
                "ORDER BY sop_uid",
                (study_uid,),
            ).fetchall()
        return [row[0] for row in rows]

    # -- due, claims and leases --------------------------------------------------------------------------

    def mark_due(self, study_uids: Iterable[str], due_at: datetime) -> None:
        """Bring the due time of dirty studies forward to ``due_at`` (never later)."""
        due_u = utc(due_at)
        uids = list(study_uids)
        with self._write("mark_due") as conn:
            conn.execute(
                "UPDATE studies SET due_at = %s WHERE study_uid = ANY(%s) AND dirty "
                "AND (due_at IS NULL OR due_at > %s)",
                (due_u, uids, due_u),
            )

    def claim_due(self, now: datetime, limit: int, owner: str, lease_s: float) -> list[StudyClaim]:
        """Claim up to ``limit`` due studies (``FOR UPDATE SKIP LOCKED``), leased until ``now + lease_s``."""
        if limit <= 0:
            return []
        now_u = utc(now)
        with self._write("claim_due") as conn:
            rows = conn.execute(
                "WITH picked AS ("
                " SELECT study_uid FROM studies"
                " WHERE state = 'pending' AND dirty AND due_at <= %(now)s"
                " AND (next_attempt_at IS NULL OR next_attempt_at <= %(now)s)"
                " AND (lease_owner IS NULL OR lease_expires IS NULL OR lease_expires <= %(now)s)"
                " ORDER BY due_at, study_uid LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
                "UPDATE studies s SET lease_owner = %(owner)s, lease_expires = %(expires)s "
                "FROM picked WHERE s.study_uid = picked.study_uid "
                "RETURNING s.study_uid, s.generation, s.backend_id, s.version_id, s.digest, s.attempts, "
                "s.due_at",
                {"now": now_u, "limit": limit, "owner": owner, "expires": now_u + timedelta(seconds=lease_s)},
            ).fetchall()
        rows.sort(key=lambda r: (r[6], r[0]))
        return [
            StudyClaim(
                study_uid=row[0],
                generation=int(row[1]),
                backend_id=row[2],
                version_id=row[3],
                digest=row[4],
                attempts=int(row[5]),
                owner=owner,
            )
            for row in rows
        ]

    def renew(self, claim: StudyClaim, now: datetime, lease_s: float) -> bool:
        """Extend the lease of ``claim``; ``False`` when the lease is no longer held by its owner."""
        with self._write("renew") as conn:
            cur = conn.execute(
                "UPDATE studies SET lease_expires = %s WHERE study_uid = %s AND lease_owner = %s",
                (utc(now) + timedelta(seconds=lease_s), claim.study_uid, claim.owner),
            )
            return cur.rowcount == 1

    def release(self, claim: StudyClaim) -> None:
        """Give a claim back without recording anything (shutdown)."""
        with self._write("release") as conn:
            conn.execute(
                "UPDATE studies SET lease_owner = NULL, lease_expires = NULL "
                "WHERE study_uid = %s AND lease_owner = %s",
                (claim.study_uid, claim.owner),
            )

    # -- outcomes ----------------------------------------------------------------------------------------

    def mark_pushed(
        self, claim: StudyClaim, *, backend_id: str, version_id: str | None, digest: str, now: datetime
    ) -> None:
        """Record a successful write; clears ``dirty`` only if the generation is unchanged since the claim."""
        with self._write("mark_pushed") as conn:
            cur = conn.execute(
                "UPDATE studies SET backend_id = %(bid)s, version_id = %(vid)s, digest = %(digest)s, "
                "pushed_at = %(now)s, attempts = 0, last_error = NULL, next_attempt_at = NULL, "
                "dead_reason = NULL, "
                "dirty = (generation <> %(gen)s), "
                "state = CASE WHEN generation = %(gen)s THEN 'pushed' ELSE 'pending' END, "
                "lease_owner = CASE WHEN lease_owner = %(owner)s THEN NULL ELSE lease_owner END, "
                "lease_expires = CASE WHEN lease_owner = %(owner)s THEN NULL ELSE lease_expires END "
                "WHERE study_uid = %(uid)s",
                {
                    "bid": backend_id,
                    "vid": version_id,
                    "digest": digest,
                    "now": utc(now),
                    "gen": claim.generation,
                    "owner": claim.owner,
                    "uid": claim.study_uid,
                },
            )
            if cur.rowcount != 1:
                raise StoreError(f"mark_pushed: study {claim.study_uid} is not in the state store")

    def _outcome(self, claim: StudyClaim, op: str, sql: str, args: tuple[Any, ...]) -> None:
        with self._write(op) as conn:
            cur = conn.execute(
                f"{sql} WHERE study_uid = %s AND (lease_owner IS NULL OR lease_owner = %s)",
                (*args, claim.study_uid, claim.owner),
            )
            if cur.rowcount != 1:
                LOGGER.warning(
                    "%s for study %s ignored: its lease is now held by another owner", op, claim.study_uid
                )

    def schedule_retry(self, claim: StudyClaim, *, error: str, next_attempt_at: datetime) -> None:
        """Count a failed attempt and hold the study until ``next_attempt_at``."""
        self._outcome(
            claim,
            "schedule_retry",
            "UPDATE studies SET attempts = attempts + 1, next_attempt_at = %s, last_error = %s, "
            "lease_owner = NULL, lease_expires = NULL",
            (utc(next_attempt_at), error),
        )

    def dead_letter(self, claim: StudyClaim, *, reason: str, error: str, now: datetime) -> None:
        """Park the study in the ``dead`` state with ``reason`` and the backend's message."""
        utc(now)
        self._outcome(
            claim,
            "dead_letter",
            "UPDATE studies SET state = 'dead', dead_reason = %s, last_error = %s, "
            "next_attempt_at = NULL, lease_owner = NULL, lease_expires = NULL",
            (reason, error),
        )

    def retry_dead(self, study_uid: str | None, now: datetime) -> int:
        """Move dead studies (one, or all with ``None``) back to pending and due now; returns how many."""
        with self._write("retry_dead") as conn:
            cur = conn.execute(
                "UPDATE studies SET state = 'pending', dirty = true, due_at = %s, attempts = 0, "
                "next_attempt_at = NULL, dead_reason = NULL "
                "WHERE state = 'dead' AND (%s::text IS NULL OR study_uid = %s)",
                (utc(now), study_uid, study_uid),
            )
            return int(cur.rowcount)

    # -- status ------------------------------------------------------------------------------------------

    def studies(self, state: StudyState | None = None) -> list[StudyRow]:
        """All studies (or those in ``state``), ordered by Study Instance UID."""
        with self._use("studies") as conn:
            rows = conn.execute(
                f"SELECT {_STUDY_COLUMNS} {_STUDY_FROM} "
                "WHERE (%s::text IS NULL OR s.state = %s) ORDER BY s.study_uid",
                (None if state is None else state.value,) * 2,
            ).fetchall()
        return [study_row(row, _to_dt) for row in rows]

    def study(self, study_uid: str) -> StudyRow | None:
        """One study, or ``None`` when unknown."""
        with self._use("study") as conn:
            row = conn.execute(
                f"SELECT {_STUDY_COLUMNS} {_STUDY_FROM} WHERE s.study_uid = %s",
                (study_uid,),
            ).fetchone()
        return None if row is None else study_row(row, _to_dt)

    def dead_reason(self, study_uid: str) -> str | None:
        """The reason code a dead study was parked with."""
        with self._use("dead_reason") as conn:
            row = conn.execute(
                "SELECT dead_reason FROM studies WHERE study_uid = %s", (study_uid,)
            ).fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        """Close idle connections; connections in use are closed when given back. Idempotent."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> PostgresStateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
