"""The durable state store: one row per accepted SOP instance, one row per study.

:class:`SQLiteStateStore` is the embedded default; ``ingest.adapters.state_pg.PostgresStateStore`` is the
same schema for several nodes sharing one store. Both implement :class:`ingest.ports.StateStore`.

SQLite runs in WAL mode with ``synchronous=FULL`` (both read back at open; the store refuses to run
otherwise), so a call that returned has been fsync'd: an acknowledged instance survives a crash. A
database created elsewhere in another journal mode (``delete``, ``truncate``...) is switched to WAL at
open; if it cannot be switched (another connection holds it), opening fails with ``StoreError``.

The schema is versioned with ``PRAGMA user_version`` and numbered migrations (:data:`MIGRATIONS`); a later
version appends a migration, never edits one. Times are stored as fixed-width UTC ISO-8601 strings
(``2024-01-02T03:04:05.000006+00:00``), which sort like the instants they name; datetimes going in and
out are timezone-aware UTC.

Thread safety: one connection guarded by a lock; every method is one short transaction. Across
processes, write transactions start with ``BEGIN IMMEDIATE`` and wait up to ``busy_timeout_s``.

Error mapping: ``sqlite3.OperationalError`` (locked too long, disk full, I/O error, cannot open) becomes
:class:`StoreUnavailableError` (transient: the listener answers 0xA700); any other ``sqlite3.Error``
becomes :class:`StoreError`.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from ingest.core.records import InstanceRecord
from ingest.errors import ConfigError, StoreError, StoreUnavailableError
from ingest.ports import Added, AddOutcome, StateStore, StudyClaim, StudyRow, StudyState

__all__ = [
    "MIGRATIONS",
    "SQLiteStateStore",
    "open_state_store",
]

LOGGER = logging.getLogger(__name__)

CONFLICT_OTHER_CONTENT: Final = "other_content"
CONFLICT_OTHER_STUDY: Final = "other_study"

#: Numbered schema migrations; ``MIGRATIONS[i]`` brings ``user_version`` from ``i`` to ``i + 1``.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """
        CREATE TABLE instances (
            sop_uid     TEXT PRIMARY KEY,         -- (0008,0018)
            study_uid   TEXT NOT NULL,            -- (0020,000D)
            series_uid  TEXT NOT NULL,            -- (0020,000E)
            digest      TEXT NOT NULL,
            source      TEXT NOT NULL,
            spool_name  TEXT,
            node        TEXT,
            record_json TEXT NOT NULL,
            added_at    TEXT NOT NULL
        )
        """,
        "CREATE INDEX instances_study ON instances (study_uid)",
        """
        CREATE TABLE studies (
            study_uid       TEXT PRIMARY KEY,     -- (0020,000D)
            generation      INTEGER NOT NULL DEFAULT 0,
            dirty           INTEGER NOT NULL DEFAULT 0,
            last_seen       TEXT,
            due_at          TEXT,
            state           TEXT NOT NULL DEFAULT 'pending',
            backend_id      TEXT,
            version_id      TEXT,
            digest          TEXT,
            attempts        INTEGER NOT NULL DEFAULT 0,
            next_attempt_at TEXT,
            last_error      TEXT,
            dead_reason     TEXT,
            pushed_at       TEXT,
            lease_owner     TEXT,
            lease_expires   TEXT
        )
        """,
        # claim_due: pending + dirty studies in due order
        "CREATE INDEX studies_due ON studies (state, dirty, due_at)",
        "CREATE INDEX studies_state ON studies (state)",
    ),
)

_STUDY_COLUMNS: Final = (
    "s.study_uid, s.state, COALESCE(n.instances, 0), s.dirty, s.attempts, s.backend_id, s.version_id, "
    "s.last_error, s.last_seen, s.due_at, s.next_attempt_at, s.pushed_at, s.lease_owner, s.lease_expires"
)
_STUDY_FROM: Final = (
    "FROM studies s LEFT JOIN (SELECT study_uid, COUNT(*) AS instances FROM instances GROUP BY study_uid) n "
    "ON n.study_uid = s.study_uid"
)


def utc(dt: datetime) -> datetime:
    """``dt`` converted to UTC; refuses naive datetimes (their zone would be a guess).

    Raises
    ------
    ValueError
        When ``dt`` has no time zone.
    """
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"datetime {dt.isoformat()} must be timezone-aware")
    return dt.astimezone(UTC)


def _ts(dt: datetime) -> str:
    return utc(dt).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).astimezone(UTC)


def study_row(values: Sequence[Any], to_dt: Any = _dt) -> StudyRow:
    """Build a :class:`StudyRow` from the columns of ``_STUDY_COLUMNS`` (shared with the PostgreSQL store)."""
    return StudyRow(
        study_uid=values[0],
        state=StudyState(values[1]),
        instances=int(values[2]),
        dirty=bool(values[3]),
        attempts=int(values[4]),
        backend_id=values[5],
        version_id=values[6],
        last_error=values[7],
        last_seen=to_dt(values[8]),
        due_at=to_dt(values[9]),
        next_attempt_at=to_dt(values[10]),
        pushed_at=to_dt(values[11]),
        lease_owner=values[12],
        lease_expires=to_dt(values[13]),
    )


class SQLiteStateStore(StateStore):
    """:class:`ingest.ports.StateStore` on one SQLite file (WAL, ``synchronous=FULL``).

    Parameters
    ----------
    path:
        The database file; its folder is created ``0700`` if missing.
    node:
        Name recorded with each instance (which node's spool holds the bytes); default: the host name.
    busy_timeout_s:
        How long a write waits for another process's lock before ``StoreUnavailableError``.

    Raises
    ------
    StoreUnavailableError
        When the file cannot be opened or is locked for longer than ``busy_timeout_s``.
    StoreError
        When WAL or ``synchronous=FULL`` cannot be set, the file is not a database, or its schema is
        newer than this program knows.
    """

    def __init__(self, path: Path, *, node: str | None = None, busy_timeout_s: float = 10.0) -> None:
        self.path = path
        self.node = node if node is not None else socket.gethostname()
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        with self._mapped("open"):
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            conn = sqlite3.connect(
                path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self._conn = conn
            try:
                self._configure(conn, busy_timeout_s)
                self._migrate(conn)
            except BaseException:
                self._conn = None
                conn.close()
                raise

    # -- connection and schema ---------------------------------------------------------------------------

    def _configure(self, conn: sqlite3.Connection, busy_timeout_s: float) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL").fetchone()
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]  # read back: WAL may be refused
        if str(mode).lower() != "wal":
            raise StoreError(
                f"state database {self.path}: journal_mode is {mode!r}, not 'wal' "
                "(the file system or another connection refuses WAL)"
            )
        conn.execute("PRAGMA synchronous = FULL")
        sync = conn.execute("PRAGMA synchronous").fetchone()[0]
        if int(sync) != 2:  # 2 = FULL
            raise StoreError(f"state database {self.path}: synchronous is {sync}, not FULL (2)")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        with self._transaction(conn):
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"state database {self.path} has schema version {version}; "
                    f"this program knows up to {len(MIGRATIONS)}"
                )
            for number in range(version, len(MIGRATIONS)):
                for statement in MIGRATIONS[number]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number + 1}")
                LOGGER.info("State database %s migrated to schema version %d", self.path, number + 1)

    @property
    def schema_version(self) -> int:
        """The schema version of the open database."""
        with self._use("schema_version") as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _mapped(self, op: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise StoreUnavailableError(f"state database {self.path}: {op} failed: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"state database {self.path}: {op} failed: {exc}") from exc
        except OSError as exc:
            raise StoreUnavailableError(f"state database {self.path}: {op} failed: {exc}") from exc

    @staticmethod
    @contextmanager
    def _transaction(conn: sqlite3.Connection, kind: str = "IMMEDIATE") -> Iterator[None]:
        conn.execute(f"BEGIN {kind}")
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _use(self, op: str) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock, with errors mapped; no transaction."""
        with self._lock, self._mapped(op):
            if self._conn is None:
                raise StoreError(f"state database {self.path}: {op} on a closed store")
            yield self._conn

    @contextmanager
    def _write(self, op: str) -> Iterator[sqlite3.Connection]:
        """The connection inside a ``BEGIN IMMEDIATE`` transaction committed on exit."""
        with self._use(op) as conn, self._transaction(conn):
            yield conn

    # -- instances ---------------------------------------------------------------------------------------

    def _add(
        self,
        conn: sqlite3.Connection,
        record: InstanceRecord,
        source: str,
        spool_name: str | None,
        digest: str,
        now: str,
        due_at: str,
    ) -> Added:
        found = conn.execute(
            "SELECT study_uid, digest FROM instances WHERE sop_uid = ?", (record.sop_uid,)
        ).fetchone()
        if found is not None:
            if found[0] != record.study_uid:
                return Added(AddOutcome.CONFLICT, record.study_uid, CONFLICT_OTHER_STUDY)
            if found[1] != digest:
                return Added(AddOutcome.CONFLICT, record.study_uid, CONFLICT_OTHER_CONTENT)
            return Added(AddOutcome.DUPLICATE, record.study_uid)
        conn.execute(
            "INSERT INTO instances (sop_uid, study_uid, series_uid, digest, source, spool_name, node, "
            "record_json, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        )
        # A new instance makes the study dirty and pending again (a dead study is revived: the new
        # content may cure it; attempts restart). A pending retry keeps its backoff.
        conn.execute(
            "INSERT INTO studies (study_uid, generation, dirty, last_seen, due_at, state) "
            "VALUES (?, 1, 1, ?, ?, 'pending') "
            "ON CONFLICT (study_uid) DO UPDATE SET generation = generation + 1, dirty = 1, "
            "last_seen = excluded.last_seen, due_at = excluded.due_at, "
            "attempts = CASE WHEN state = 'dead' THEN 0 ELSE attempts END, "
            "next_attempt_at = CASE WHEN state = 'dead' THEN NULL ELSE next_attempt_at END, "
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
        """Insert an instance row and mark its study dirty and due at ``due_at``; durable on return.

        Parameters
        ----------
        record:
            The extracted header.
        source:
            Where it came from (``dimse:<AE>``, ``watch``, ``replay``); kept for diagnostics.
        spool_name:
            The spool file holding the bytes, if spooled.
        digest:
            Content digest; identical digest for the same SOP Instance UID is a duplicate.
        now, due_at:
            Timezone-aware times: when it arrived, and when its study becomes due.

        Returns
        -------
        Added
            ``ADDED``; ``DUPLICATE`` (nothing written); or ``CONFLICT`` with ``detail``
            ``"other_content"`` / ``"other_study"`` (nothing written).

        Raises
        ------
        StoreUnavailableError
            When the row cannot be committed (locked too long, disk full, I/O error).
        """
        return self.add_instances([(record, source, spool_name, digest)], now=now, due_at=due_at)[0]

    def add_instances(
        self,
        items: Sequence[tuple[InstanceRecord, str, str | None, str]],
        *,
        now: datetime,
        due_at: datetime,
    ) -> list[Added]:
        """Batch :meth:`add_instance` of ``(record, source, spool_name, digest)`` in one transaction."""
        now_s, due_s = _ts(now), _ts(due_at)
        with self._write("add_instances") as conn:
            return [self._add(conn, rec, src, spool, dig, now_s, due_s) for rec, src, spool, dig in items]

    def instances(self, study_uid: str) -> list[InstanceRecord]:
        """The records of a study's instances, ordered by series and SOP Instance UID."""
        with self._use("instances") as conn:
            rows = conn.execute(
                "SELECT record_json FROM instances WHERE study_uid = ? ORDER BY series_uid, sop_uid",
                (study_uid,),
            ).fetchall()
        return [InstanceRecord.model_validate_json(row[0]) for row in rows]

    def spool_names(self, study_uid: str) -> list[str]:
        """Spool names recorded for a study's instances (for clean-up after a push)."""
        with self._use("spool_names") as conn:
            rows = conn.execute(
                "SELECT spool_name FROM instances WHERE study_uid = ? AND spool_name IS NOT NULL "
                "ORDER BY sop_uid",
                (study_uid,),
            ).fetchall()
        return [row[0] for row in rows]

    # -- due, claims and leases --------------------------------------------------------------------------

    def mark_due(self, study_uids: Iterable[str], due_at: datetime) -> None:
        """Bring the due time of dirty studies forward to ``due_at`` (never later)."""
        due_s = _ts(due_at)
        uids = list(study_uids)
        with self._write("mark_due") as conn:
            conn.executemany(
                "UPDATE studies SET due_at = ? WHERE study_uid = ? AND dirty = 1 "
                "AND (due_at IS NULL OR due_at > ?)",
                [(due_s, uid, due_s) for uid in uids],
            )

    def claim_due(self, now: datetime, limit: int, owner: str, lease_s: float) -> list[StudyClaim]:
        """Claim up to ``limit`` studies that are dirty, due, past their next attempt and not leased.

        The lease (``owner`` until ``now + lease_s``) is taken in the same ``BEGIN IMMEDIATE``
        transaction as the selection, so two claimers never get the same study.
        """
        if limit <= 0:
            return []
        now_s = _ts(now)
        expires = _ts(now + timedelta(seconds=lease_s))
        with self._write("claim_due") as conn:
            rows = conn.execute(
                "SELECT study_uid, generation, backend_id, version_id, digest, attempts FROM studies "
                "WHERE state = 'pending' AND dirty = 1 AND due_at <= ? "
                "AND (next_attempt_at IS NULL OR next_attempt_at <= ?) "
                "AND (lease_owner IS NULL OR lease_expires IS NULL OR lease_expires <= ?) "
                "ORDER BY due_at, study_uid LIMIT ?",
                (now_s, now_s, now_s, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE studies SET lease_owner = ?, lease_expires = ? WHERE study_uid = ?",
                [(owner, expires, row[0]) for row in rows],
            )
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
                "UPDATE studies SET lease_expires = ? WHERE study_uid = ? AND lease_owner = ?",
                (_ts(now + timedelta(seconds=lease_s)), claim.study_uid, claim.owner),
            )
            return cur.rowcount == 1

    def release(self, claim: StudyClaim) -> None:
        """Give a claim back without recording anything (shutdown)."""
        with self._write("release") as conn:
            conn.execute(
                "UPDATE studies SET lease_owner = NULL, lease_expires = NULL "
                "WHERE study_uid = ? AND lease_owner = ?",
                (claim.study_uid, claim.owner),
            )

    # -- outcomes ----------------------------------------------------------------------------------------

    def mark_pushed(
        self, claim: StudyClaim, *, backend_id: str, version_id: str | None, digest: str, now: datetime
    ) -> None:
        """Record a successful write (or an unchanged check).

        ``dirty`` is cleared and the state becomes ``pushed`` only if no instance arrived since the claim
        (generation unchanged); otherwise the study stays dirty, pending and due. The lease is released
        if ``claim.owner`` still holds it.
        """
        with self._write("mark_pushed") as conn:
            cur = conn.execute(
                "UPDATE studies SET backend_id = ?, version_id = ?, digest = ?, pushed_at = ?, "
                "attempts = 0, last_error = NULL, next_attempt_at = NULL, dead_reason = NULL, "
                "dirty = CASE WHEN generation = ? THEN 0 ELSE 1 END, "
                "state = CASE WHEN generation = ? THEN 'pushed' ELSE 'pending' END, "
                "lease_owner = CASE WHEN lease_owner = ? THEN NULL ELSE lease_owner END, "
                "lease_expires = CASE WHEN lease_owner = ? THEN NULL ELSE lease_expires END "
                "WHERE study_uid = ?",
                (
                    backend_id,
                    version_id,
                    digest,
                    _ts(now),
                    claim.generation,
                    claim.generation,
                    claim.owner,
                    claim.owner,
                    claim.study_uid,
                ),
            )
            if cur.rowcount != 1:
                raise StoreError(f"mark_pushed: study {claim.study_uid} is not in the state store")

    def _outcome(
        self, conn: sqlite3.Connection, claim: StudyClaim, op: str, sql: str, args: tuple[Any, ...]
    ) -> None:
        cur = conn.execute(
            f"{sql} WHERE study_uid = ? AND (lease_owner IS NULL OR lease_owner = ?)",
            (*args, claim.study_uid, claim.owner),
        )
        if cur.rowcount != 1:
            LOGGER.warning(
                "%s for study %s ignored: its lease is now held by another owner", op, claim.study_uid
            )

    def schedule_retry(self, claim: StudyClaim, *, error: str, next_attempt_at: datetime) -> None:
        """Count a failed attempt, keep the error, and hold the study until ``next_attempt_at``.

        Ignored (with a warning) when another owner has taken the lease since.
        """
        with self._write("schedule_retry") as conn:
            self._outcome(
                conn,
                claim,
                "schedule_retry",
                "UPDATE studies SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?, "
                "lease_owner = NULL, lease_expires = NULL",
                (_ts(next_attempt_at), error),
            )

    def dead_letter(self, claim: StudyClaim, *, reason: str, error: str, now: datetime) -> None:
        """Park the study in the ``dead`` state with ``reason`` and the backend's message.

        ``ingest retry`` (:meth:`retry_dead`) re-drives it; other studies continue.
        """
        utc(now)
        with self._write("dead_letter") as conn:
            self._outcome(
                conn,
                claim,
                "dead_letter",
                "UPDATE studies SET state = 'dead', dead_reason = ?, last_error = ?, "
                "next_attempt_at = NULL, lease_owner = NULL, lease_expires = NULL",
                (reason, error),
            )

    def retry_dead(self, study_uid: str | None, now: datetime) -> int:
        """Move dead studies (one, or all with ``None``) back to pending and due now; returns how many."""
        now_s = _ts(now)
        sql = (
            "UPDATE studies SET state = 'pending', dirty = 1, due_at = ?, attempts = 0, "
            "next_attempt_at = NULL, dead_reason = NULL WHERE state = 'dead'"
        )
        with self._write("retry_dead") as conn:
            if study_uid is None:
                cur = conn.execute(sql, (now_s,))
            else:
                cur = conn.execute(f"{sql} AND study_uid = ?", (now_s, study_uid))
            return int(cur.rowcount)

    # -- status ------------------------------------------------------------------------------------------

    def studies(self, state: StudyState | None = None) -> list[StudyRow]:
        """All studies (or those in ``state``), ordered by Study Instance UID."""
        with self._use("studies") as conn:
            if state is None:
                rows = conn.execute(f"SELECT {_STUDY_COLUMNS} {_STUDY_FROM} ORDER BY s.study_uid").fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_STUDY_COLUMNS} {_STUDY_FROM} WHERE s.state = ? ORDER BY s.study_uid",
                    (state.value,),
                ).fetchall()
        return [study_row(row) for row in rows]

    def study(self, study_uid: str) -> StudyRow | None:
        """One study, or ``None`` when unknown."""
        with self._use("study") as conn:
            row = conn.execute(
                f"SELECT {_STUDY_COLUMNS} {_STUDY_FROM} WHERE s.study_uid = ?", (study_uid,)
            ).fetchone()
        return None if row is None else study_row(row)

    def dead_reason(self, study_uid: str) -> str | None:
        """The reason code a dead study was parked with (``multiple_matches``, ``rejected``...)."""
        with self._use("dead_reason") as conn:
            row = conn.execute("SELECT dead_reason FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
        return None if row is None else row[0]

    def close(self) -> None:
        """Close the connection; idempotent. A WAL checkpoint runs as SQLite closes the last connection."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error as exc:
                    raise StoreError(f"state database {self.path}: close failed: {exc}") from exc

    def __enter__(self) -> SQLiteStateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    if url is None or url == "":
        return SQLiteStateStore(data_dir / "state.sqlite3", node=node)
    if url.startswith("sqlite:///"):
        return SQLiteStateStore(Path(url.removeprefix("sqlite:///")), node=node)
    if url.startswith(("postgresql://", "postgres://")):
        from ingest.adapters.state_pg import PostgresStateStore

        return PostgresStateStore(url, node=node)
    scheme = url.split(":", 1)[0]
    raise ConfigError(f"[state] url: unsupported scheme {scheme!r} (use postgresql://... or leave unset)")
