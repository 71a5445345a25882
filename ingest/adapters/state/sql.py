"""The state store logic shared by the SQLite and PostgreSQL stores; each dialect fills in a few hooks.

:class:`SQLStateStore` holds every query and rule of :class:`ingest.ports.StateStore` once: the instance
insert with its duplicate and conflict checks, the study upsert (dirty, due, a dead study revived), due
claims and leases, push / retry / dead-letter outcomes, and the status queries. A dialect subclass
(``state.sqlite.SQLiteStateStore``, ``state.postgres.PostgresStateStore``) supplies:

- :meth:`~SQLStateStore._use` / :meth:`~SQLStateStore._write`: a cursor, with the driver's errors mapped
  to :class:`ingest.errors.StoreError` / :class:`ingest.errors.StoreUnavailableError`; ``_write`` inside one
  transaction committed on exit (SQLite ``BEGIN IMMEDIATE``, PostgreSQL ``conn.transaction()``);
- :meth:`~SQLStateStore._q`: the shared SQL is written with ``?`` placeholders; a dialect rewrites them;
- :meth:`~SQLStateStore._time` / :meth:`~SQLStateStore._from_time`: how an instant is stored (SQLite
  fixed-width UTC ISO strings, PostgreSQL ``timestamptz``);
- :attr:`~SQLStateStore._CLAIM_LOCK`: appended to the claim ``SELECT`` (``FOR UPDATE SKIP LOCKED`` on
  PostgreSQL; nothing on SQLite, whose ``BEGIN IMMEDIATE`` already serialises writers);
- :meth:`~SQLStateStore.close` and the schema (migrations, :attr:`schema_version`).

Booleans are written as ``true`` / ``false``: a ``boolean`` on PostgreSQL, the integers 1 / 0 on SQLite.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Final, Protocol, Self, TypeVar

from ingest.core.admission import (
    CONFLICT_OTHER_CONTENT,
    CONFLICT_OTHER_STUDY,
    SUPERSEDES,
    Existing,
    decide,
)
from ingest.core.records import InstanceRecord, RecordRow
from ingest.errors import StoreError, StoreUnavailableError
from ingest.ports import (
    Added,
    SeriesGroup,
    StateStore,
    StudyClaim,
    StudyRow,
    StudyState,
    Verdict,
)

__all__ = [
    "CONFLICT_OTHER_CONTENT",
    "CONFLICT_OTHER_STUDY",
    "Cursor",
    "SQLStateStore",
    "study_row",
    "utc",
]

_STUDY_COLUMNS: Final = (
    "s.study_uid, s.state, COALESCE(n.instances, 0), s.dirty, s.attempts, s.backend_id, s.version_id, "
    "s.last_error, s.last_seen, s.due_at, s.next_attempt_at, s.pushed_at, s.lease_owner, s.lease_expires, "
    "s.dead_reason"
)
_STUDY_FROM: Final = (
    "FROM studies s LEFT JOIN (SELECT study_uid, COUNT(*) AS instances FROM instances GROUP BY study_uid) n "
    "ON n.study_uid = s.study_uid"
)

#: A study pushed (``requeue``) or dead (``retry_dead``) pending again, dirty and due at the bound time,
#: with a fresh attempt count.
_DUE_AGAIN: Final = "state = 'pending', dirty = true, due_at = ?, attempts = 0, next_attempt_at = NULL"


class Cursor(Protocol):
    """The part of a DB-API cursor the shared queries use (``sqlite3.Cursor``, ``psycopg.Cursor``)."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Self: ...

    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> object: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


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


def study_row(values: Sequence[Any], to_dt: Callable[[Any], datetime | None]) -> StudyRow:
    """Build a :class:`StudyRow` from the columns of ``_STUDY_COLUMNS``, reading times with ``to_dt``."""
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
        dead_reason=values[14],
    )


# Rows per multi-row INSERT (9 parameters each: well under SQLite's and PostgreSQL's limits).
_INSERT_ROWS = 256
T = TypeVar("T")

#: Values per ``IN (...)`` lookup, the one chunk size of every such query of the state store (under
#: SQLite's 999-variable floor on old builds, with room for the statement's other parameters).
IN_CHUNK: Final = 400


def in_chunks(values: Sequence[T]) -> Iterator[tuple[list[T], str]]:
    """``values`` in order, in lists of at most :data:`IN_CHUNK`, each with its ``?, ?, ...``
    placeholders for an ``IN (...)`` clause."""
    for start in range(0, len(values), IN_CHUNK):
        chunk = list(values[start : start + IN_CHUNK])
        yield chunk, ", ".join(["?"] * len(chunk))


class SQLStateStore(StateStore):
    """:class:`ingest.ports.StateStore` on the ``instances`` / ``studies`` schema, for any SQL dialect.

    Subclasses set :attr:`node` (recorded with each instance) and :attr:`_where` (how error messages
    name the database, never with credentials), and implement the hooks below.
    """

    node: str
    _where: str

    #: Appended to the claim ``SELECT`` to lock the picked rows against other claimers.
    _CLAIM_LOCK: ClassVar[str] = ""

    # -- dialect hooks -----------------------------------------------------------------------------------

    @abstractmethod
    def _use(self, op: str) -> AbstractContextManager[Cursor]:
        """A cursor with errors mapped (``op`` names the operation in messages); no transaction."""

    @abstractmethod
    def _write(self, op: str) -> AbstractContextManager[Cursor]:
        """A cursor inside one write transaction, committed on a normal exit, rolled back otherwise."""

    def _q(self, sql: str) -> str:
        """``sql`` (written with ``?`` placeholders) in the driver's parameter style."""
        return sql

    @abstractmethod
    def _time(self, dt: datetime) -> object:
        """The stored form of the timezone-aware instant ``dt``; raises ``ValueError`` when naive."""

    @abstractmethod
    def _from_time(self, value: Any) -> datetime | None:
        """A stored instant (or NULL) back as a UTC datetime."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection(s); idempotent."""

    # -- leases: the one claim rule of due studies and commitment reports ------------------------------------

    def _claim_times(
        self, now: datetime, lease_s: float, stale_after: datetime | None
    ) -> tuple[object, object, object, object]:
        """The stored forms of ``now``, the lease's end (``now + lease_s``), the time past which a due time
        or next attempt counts as set before a step back of the clock (``stale_after``), and the end past
        which a lease does (more than twice ``lease_s`` ahead); without ``stale_after``, 1000 years ahead
        (never)."""
        far = now + timedelta(days=365_000)
        return (
            self._time(now),
            self._time(now + timedelta(seconds=lease_s)),
            self._time(stale_after if stale_after is not None else far),
            self._time(now + timedelta(seconds=2 * lease_s) if stale_after is not None else far),
        )

    @staticmethod
    def _claimable(*, own_again: bool) -> str:
        """The claim predicate on ``next_attempt_at`` and the lease, with its parameters in order:
        now, stale, [owner, when ``own_again``: the owner's own leases are taken again at once], now,
        lease stale."""
        own = "OR lease_owner = ? " if own_again else ""
        return (
            "(next_attempt_at IS NULL OR next_attempt_at <= ? OR next_attempt_at > ?) "
            f"AND (lease_owner IS NULL {own}OR lease_expires IS NULL OR lease_expires <= ? "
            "OR lease_expires > ?) "
        )

    def _take_leases(
        self, cur: Cursor, table: str, key: str, keys: Sequence[object], owner: str, expires: object
    ) -> None:
        """Lease the claimed rows ``keys`` of ``table`` to ``owner`` until ``expires`` (the claim's
        transaction)."""
        if keys:
            cur.executemany(
                self._q(f"UPDATE {table} SET lease_owner = ?, lease_expires = ? WHERE {key} = ?"),
                [(owner, expires, k) for k in keys],
            )

    @property
    def _log(self) -> logging.Logger:
        """The logger of the dialect's module (``state.sqlite``, ``state.postgres``)."""
        return logging.getLogger(type(self).__module__)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema ------------------------------------------------------------------------------------------

    def _apply_migrations(
        self,
        cur: Cursor,
        migrations: Sequence[Sequence[str]],
        version: int,
        set_version: Callable[[int], object],
    ) -> None:
        """Run ``migrations[version:]`` in order, recording each new version with ``set_version``.

        Raises
        ------
        StoreError
            When the database's schema ``version`` is newer than ``migrations`` know.
        """
        if version > len(migrations):
            raise StoreError(
                f"state database {self._where} has schema version {version}; "
                f"this program knows up to {len(migrations)}"
            )
        for number in range(version, len(migrations)):
            for statement in migrations[number]:
                cur.execute(statement)  # constant SQL text
            set_version(number + 1)
        if version < len(migrations):  # one line per upgrade, with both versions (a new store: from 0)
            from ingest import __version__

            self._log.info("State database %s migrated from schema version %d to %d (ingest %s)",
                           self._where, version, len(migrations), __version__)

    # -- instances ---------------------------------------------------------------------------------------

    def _insert_batch(
        self, cur: Cursor, items: Sequence[tuple[RecordRow, str, str | None, str]], now: object
    ) -> list[Added]:
        """Insert instance rows in one statement; rows whose SOP Instance UID exists are checked after.

        A row that exists is judged by :func:`ingest.core.admission.decide` (duplicate or conflict, the
        rule for a digest of another scheme included). The same SOP Instance UID twice in one batch: the
        first is added, the second compared with it.
        """
        inserted: set[str] = set()
        for start in range(0, len(items), _INSERT_ROWS):
            chunk = items[start : start + _INSERT_ROWS]
            values: list[object] = []
            for row, source, spool_name, digest in chunk:
                values += [
                    row.sop_uid,  # (0008,0018) SOP Instance UID
                    row.study_uid,  # (0020,000D) Study Instance UID
                    row.series_uid,  # (0020,000E) Series Instance UID
                    digest,
                    source,
                    spool_name,
                    self.node,
                    row.json,
                    now,
                ]
            rows = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
            inserted.update(
                str(row[0])
                for row in cur.execute(
                    self._q(
                        "INSERT INTO instances (sop_uid, study_uid, series_uid, digest, source, spool_name, "
                        f"node, record_json, added_at) VALUES {rows} "
                        "ON CONFLICT (sop_uid) DO NOTHING RETURNING sop_uid"
                    ),
                    values,
                ).fetchall()
            )
        results: list[Added] = []
        for row, source, spool_name, digest in items:
            if row.sop_uid in inserted:
                inserted.discard(row.sop_uid)  # a second copy in this batch is compared below
                results.append(Added(Verdict.ADDED, row.study_uid))
                continue
            found = cur.execute(
                self._q("SELECT study_uid, digest, record_json FROM instances WHERE sop_uid = ?"),
                (row.sop_uid,),
            ).fetchone()
            if found is None:  # pragma: no cover - deleted concurrently; nothing in ingest deletes rows
                raise StoreUnavailableError(f"instance {row.sop_uid} vanished during add; retry")
            record = row.record()  # a duplicate or a conflict: judged on the whole record
            decision = decide(Existing(str(found[0]), str(found[1]), str(found[2])), record, digest)
            if decision.detail == SUPERSEDES:  # a metadata-only row (ingest sync) gives way: same study
                cur.execute(
                    self._q(
                        "UPDATE instances SET series_uid = ?, digest = ?, source = ?, spool_name = ?, "
                        "node = ?, record_json = ?, added_at = ?, bytes_removed_at = NULL, "
                        "bytes_removed_reason = NULL WHERE sop_uid = ?"
                    ),
                    (row.series_uid, digest, source, spool_name, self.node, row.json, now, row.sop_uid),
                )
                results.append(Added(Verdict.ADDED, record.study_uid))
                continue
            results.append(Added(decision.verdict, record.study_uid, decision.detail))
        return results

    def _after_add(
        self,
        cur: Cursor,
        items: Sequence[tuple[RecordRow, str, str | None, str]],
        results: list[Added],
        now: object,
        due_at: object,
    ) -> list[Added]:
        """A hook in the transaction of :meth:`add_instances`, after the rows and study updates: the study
        lifecycle (``state.lifecycle``: rejection notes, rejected arrivals) completes ``results``."""
        return results

    def _touch_study(self, cur: Cursor, study_uid: str, added: int, now: object, due_at: object) -> None:
        """``added`` new instances make the study dirty and pending again, due at ``due_at``.

        A dead study is revived (the new content may cure it; attempts restart); a pending retry keeps its
        backoff. The generation grows by ``added``, so a push that started before sees the change.
        """
        cur.execute(
            self._q(
                "INSERT INTO studies AS s (study_uid, generation, dirty, last_seen, due_at, state) "
                "VALUES (?, ?, true, ?, ?, 'pending') "
                "ON CONFLICT (study_uid) DO UPDATE SET generation = s.generation + excluded.generation, "
                "dirty = true, last_seen = excluded.last_seen, due_at = excluded.due_at, "
                "attempts = CASE WHEN s.state = 'dead' THEN 0 ELSE s.attempts END, "
                "next_attempt_at = CASE WHEN s.state = 'dead' THEN NULL ELSE s.next_attempt_at END, "
                "dead_reason = NULL, state = 'pending'"
            ),
            (study_uid, added, now, due_at),
        )

    def add_instance(
        self,
        record: InstanceRecord | RecordRow,
        *,
        source: str,
        spool_name: str | None,
        digest: str,
        now: datetime,
        due_at: datetime,
        data: bytes | None = None,
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
            Content digest; identical digest for the same SOP Instance UID is a duplicate. Against a
            row holding a digest of another scheme (``c1:...`` versus an older prefix-less one), an
            equal record (but for the transfer syntax) is a duplicate.
        now, due_at:
            Timezone-aware times: when it arrived, and when its study becomes due.
        data:
            The instance's Part 10 bytes, kept in ``instance_bytes`` in the same transaction as the row
            when it is added (an unspooled small instance: one durable write; ``spool_name`` ``None``).

        Returns
        -------
        Added
            ``ADDED``; ``DUPLICATE`` (nothing written); or ``CONFLICT`` with ``detail``
            ``"other_content"`` / ``"other_study"`` (nothing written).

        Raises
        ------
        StoreUnavailableError
            When the row cannot be committed (locked too long, disk full, I/O error, connection lost).
        """
        return self.add_instances(
            [(record, source, spool_name, digest)], now=now, due_at=due_at,
            inline=None if data is None else [data],
        )[0]

    def add_instances(
        self,
        items: Sequence[tuple[InstanceRecord | RecordRow, str, str | None, str]],
        *,
        now: datetime,
        due_at: datetime,
        inline: Sequence[bytes | None] | None = None,
    ) -> list[Added]:
        """Batch :meth:`add_instance` of ``(record, source, spool_name, digest)`` in one transaction; a
        record given as a :class:`~ingest.core.records.RecordRow` is stored as it is (its JSON).

        ``inline``, when given, holds one entry per item: its Part 10 bytes to keep in ``instance_bytes``
        (committed with the row, for items that are added), or ``None``.

        Raises
        ------
        ValueError
            When ``inline`` does not have one entry per item.
        """
        if inline is not None and len(inline) != len(items):
            raise ValueError(f"inline has {len(inline)} entries for {len(items)} items")
        now_v, due_v = self._time(now), self._time(due_at)
        rows = [
            (RecordRow.of(record), source, spool_name, digest)
            for record, source, spool_name, digest in items
        ]
        with self._write("add_instances") as cur:
            results = self._insert_batch(cur, rows, now_v)
            if inline is not None:
                self._insert_bytes(cur, rows, results, inline)
            added = Counter(r.study_uid for r in results if r.outcome is Verdict.ADDED)
            for study_uid in sorted(added):  # one update per study; a fixed order avoids lock cycles
                self._touch_study(cur, study_uid, added[study_uid], now_v, due_v)
            return self._after_add(cur, rows, results, now_v, due_v)

    def _insert_bytes(
        self,
        cur: Cursor,
        items: Sequence[tuple[RecordRow, str, str | None, str]],
        results: Sequence[Added],
        inline: Sequence[bytes | None],
    ) -> None:
        """The ``instance_bytes`` rows of the added items that carry bytes (same transaction)."""
        rows = [
            (item[0].sop_uid, data)
            for item, added, data in zip(items, results, inline, strict=True)
            if data is not None and added.outcome is Verdict.ADDED
        ]
        if rows:
            cur.executemany(
                self._q(
                    "INSERT INTO instance_bytes (sop_uid, data) VALUES (?, ?) "
                    "ON CONFLICT (sop_uid) DO UPDATE SET data = excluded.data"
                ),
                rows,
            )

    def instance_bytes(self, sop_uid: str) -> bytes | None:
        """The Part 10 bytes kept in the state store for ``sop_uid`` (``instance_bytes``), or ``None``
        when the instance is unknown, its bytes are in a spool file, or they were released."""
        with self._use("instance_bytes") as cur:
            row = cur.execute(
                self._q("SELECT data FROM instance_bytes WHERE sop_uid = ?"), (sop_uid,)
            ).fetchone()
        return None if row is None else bytes(row[0])

    def instance_spool_name(self, sop_uid: str) -> str | None:
        """The spool file name ``sop_uid``'s row records, or ``None`` (unknown, or bytes kept in-row)."""
        with self._use("instance_spool_name") as cur:
            row = cur.execute(
                self._q("SELECT spool_name FROM instances WHERE sop_uid = ?"), (sop_uid,)
            ).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def inline_bytes_total(self) -> int:
        """Bytes of instance data held in the state store (``instance_bytes``), for the disk budget."""
        with self._use("inline_bytes_total") as cur:
            row = cur.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM instance_bytes").fetchone()
        return int(row[0] or 0)

    def instances(self, study_uid: str) -> list[InstanceRecord]:
        """The records of a study's instances, ordered by series and SOP Instance UID."""
        with self._use("instances") as cur:
            rows = cur.execute(
                self._q("SELECT record_json FROM instances WHERE study_uid = ? ORDER BY series_uid, sop_uid"),
                (study_uid,),
            ).fetchall()
        return [InstanceRecord.from_json(row[0]) for row in rows]

    def referenced_spool_names(self, names: Sequence[str]) -> set[str]:
        """Which of ``names`` some instance row records as its spool file.

        Parameters
        ----------
        names:
            Spool file names (random, 32 hex digits); duplicates are harmless.

        Returns
        -------
        set[str]
            The subset of ``names`` that an ``instances.spool_name`` holds; files not in it are orphans
            (a crash between the spool rename and the row's commit).

        Raises
        ------
        StoreUnavailableError
            When the database cannot be read.
        """
        wanted = sorted(set(names))
        found: set[str] = set()
        with self._use("referenced_spool_names") as cur:
            for chunk, marks in in_chunks(wanted):
                rows = cur.execute(
                    self._q(f"SELECT DISTINCT spool_name FROM instances WHERE spool_name IN ({marks})"),
                    chunk,
                ).fetchall()
                found.update(str(row[0]) for row in rows)
        return found

    # -- due, claims and leases --------------------------------------------------------------------------

    def mark_due(self, study_uids: Iterable[str], due_at: datetime) -> None:
        """Bring the due time of dirty studies forward to ``due_at`` (never later)."""
        due_v = self._time(due_at)
        uids = list(study_uids)
        with self._write("mark_due") as cur:
            if uids:
                cur.executemany(
                    self._q(
                        "UPDATE studies SET due_at = ? WHERE study_uid = ? AND dirty = true "
                        "AND (due_at IS NULL OR due_at > ?)"
                    ),
                    [(due_v, uid, due_v) for uid in uids],
                )

    def next_due_at(self, after: datetime) -> datetime | None:
        """The earliest ``due_at`` later than ``after`` of a pending dirty study (index ``studies_due``),
        or ``None``; leases and retries' next attempts are not considered (the relay's poll finds those)."""
        with self._use("next_due_at") as cur:
            row = cur.execute(
                self._q(
                    "SELECT MIN(due_at) FROM studies WHERE state = 'pending' AND dirty = true AND due_at > ?"
                ),
                (self._time(after),),
            ).fetchone()
        return None if row is None or row[0] is None else self._from_time(row[0])

    def claim_due(
        self, now: datetime, limit: int, owner: str, lease_s: float, *, stale_after: datetime | None = None
    ) -> list[StudyClaim]:
        """Claim up to ``limit`` studies that are dirty, due, past their next attempt and not leased.

        The lease (``owner`` until ``now + lease_s``) is taken in the same transaction as the selection,
        whose rows are locked against other claimers (:attr:`_CLAIM_LOCK`), so two claimers never get the
        same study. Claims come in due order.

        A due time or next attempt later than ``stale_after``, and a lease running more than twice
        ``lease_s`` past ``now``, were set before the clock was stepped back: they count as due / expired
        (docs/reliability.md "Clock steps").
        """
        if limit <= 0:
            return []
        now_v, expires, stale_v, lease_stale_v = self._claim_times(now, lease_s, stale_after)
        with self._write("claim_due") as cur:
            rows = cur.execute(
                self._q(
                    "SELECT study_uid, generation, backend_id, version_id, digest, attempts, last_seen "
                    "FROM studies WHERE state = 'pending' AND dirty = true "
                    "AND (due_at <= ? OR due_at > ?) AND "
                    + self._claimable(own_again=False)
                    + "ORDER BY due_at, study_uid LIMIT ?" + self._CLAIM_LOCK
                ),
                (now_v, stale_v, now_v, stale_v, now_v, lease_stale_v, limit),
            ).fetchall()
            self._take_leases(cur, "studies", "study_uid", [row[0] for row in rows], owner, expires)
        return [
            StudyClaim(
                study_uid=row[0],
                generation=int(row[1]),
                backend_id=row[2],
                version_id=row[3],
                digest=row[4],
                attempts=int(row[5]),
                owner=owner,
                last_seen=self._from_time(row[6]),
            )
            for row in rows
        ]

    def renew(self, claim: StudyClaim, now: datetime, lease_s: float) -> bool:
        """Extend the lease of ``claim``; ``False`` when the lease is no longer held by its owner."""
        expires = self._time(now + timedelta(seconds=lease_s))
        with self._write("renew") as cur:
            cur.execute(
                self._q("UPDATE studies SET lease_expires = ? WHERE study_uid = ? AND lease_owner = ?"),
                (expires, claim.study_uid, claim.owner),
            )
            return cur.rowcount == 1

    def release(self, claim: StudyClaim) -> None:
        """Give a claim back without recording anything (shutdown)."""
        with self._write("release") as cur:
            cur.execute(
                self._q(
                    "UPDATE studies SET lease_owner = NULL, lease_expires = NULL "
                    "WHERE study_uid = ? AND lease_owner = ?"
                ),
                (claim.study_uid, claim.owner),
            )

    # -- outcomes ----------------------------------------------------------------------------------------

    def mark_pushed(
        self,
        claim: StudyClaim,
        *,
        backend_id: str,
        version_id: str | None,
        digest: str,
        now: datetime,
        written: tuple[str, str | None] | None = None,
    ) -> None:
        """Record a successful write (or an unchanged check).

        ``written`` (JSON texts: the ImagingStudy the mapping built, the subject the written resource
        carried) is kept in the same transaction for the next merge (:meth:`written`).

        ``dirty`` is cleared and the state becomes ``pushed`` only if no instance arrived since the claim
        (generation unchanged); otherwise the study stays dirty, pending and due. The lease is released
        if ``claim.owner`` still holds it.

        Raises
        ------
        StoreError
            When the study is not in the store.
        """
        now_v = self._time(now)
        with self._write("mark_pushed") as cur:
            cur.execute(
                self._q(
                    "UPDATE studies SET backend_id = ?, version_id = ?, digest = ?, pushed_at = ?, "
                    "attempts = 0, last_error = NULL, next_attempt_at = NULL, dead_reason = NULL, "
                    "dirty = CASE WHEN generation = ? THEN false ELSE true END, "
                    "state = CASE WHEN generation = ? THEN 'pushed' ELSE 'pending' END, "
                    "lease_owner = CASE WHEN lease_owner = ? THEN NULL ELSE lease_owner END, "
                    "lease_expires = CASE WHEN lease_owner = ? THEN NULL ELSE lease_expires END "
                    "WHERE study_uid = ?"
                ),
                (
                    backend_id,
                    version_id,
                    digest,
                    now_v,
                    claim.generation,
                    claim.generation,
                    claim.owner,
                    claim.owner,
                    claim.study_uid,
                ),
            )
            if cur.rowcount != 1:
                raise StoreError(f"mark_pushed: study {claim.study_uid} is not in the state store")
            if written is not None:
                cur.execute(
                    self._q("UPDATE studies SET written_ours = ?, written_subject = ? WHERE study_uid = ?"),
                    (written[0], written[1], claim.study_uid),
                )

    def _outcome(self, claim: StudyClaim, op: str, sql: str, args: tuple[Any, ...]) -> None:
        """Run ``sql`` (an ``UPDATE ... SET ...``) on the claimed study unless another owner leases it."""
        with self._write(op) as cur:
            cur.execute(
                self._q(f"{sql} WHERE study_uid = ? AND (lease_owner IS NULL OR lease_owner = ?)"),
                (*args, claim.study_uid, claim.owner),
            )
            if cur.rowcount != 1:
                self._log.warning(
                    "%s for study %s ignored: its lease is now held by another owner", op, claim.study_uid
                )

    def schedule_retry(self, claim: StudyClaim, *, error: str, next_attempt_at: datetime) -> None:
        """Count a failed attempt, keep the error, and hold the study until ``next_attempt_at``.

        Ignored (with a warning) when another owner has taken the lease since.
        """
        self._outcome(
            claim,
            "schedule_retry",
            "UPDATE studies SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?, "
            "lease_owner = NULL, lease_expires = NULL",
            (self._time(next_attempt_at), error),
        )

    def dead_letter(self, claim: StudyClaim, *, reason: str, error: str, now: datetime) -> None:
        """Park the study in the ``dead`` state with ``reason`` and the backend's message.

        ``ingest retry`` (:meth:`retry_dead`) re-drives it; other studies continue. Ignored (with a
        warning) when another owner has taken the lease since.
        """
        utc(now)  # refuses a naive time, like every other method
        self._outcome(
            claim,
            "dead_letter",
            "UPDATE studies SET state = 'dead', dead_reason = ?, last_error = ?, "
            "next_attempt_at = NULL, lease_owner = NULL, lease_expires = NULL",
            (reason, error),
        )

    def retry_now(self, now: datetime) -> int:
        """Pending studies waiting for a retry (``next_attempt_at`` later than ``now``) become due now: the
        backend is back (the relay's probe answered). Returns how many."""
        now_v = self._time(now)
        with self._write("retry_now") as cur:
            cur.execute(
                self._q(
                    "UPDATE studies SET next_attempt_at = ? WHERE state = 'pending' "
                    "AND next_attempt_at IS NOT NULL AND next_attempt_at > ?"
                ),
                (now_v, now_v),
            )
            return int(cur.rowcount)

    def requeue(self, study_uids: Sequence[str], now: datetime) -> int:
        """Make pushed studies dirty and due at ``now`` (``ingest relink``: their references are resolved
        and written again when something changed); pending and dead ones are left as they are. The
        generation grows, so a push under way sees the change. Returns how many were requeued."""
        now_v = self._time(now)
        count = 0
        with self._write("requeue") as cur:
            for chunk, marks in in_chunks(sorted(set(study_uids))):  # a fixed order avoids lock cycles
                cur.execute(
                    self._q(
                        f"UPDATE studies SET generation = generation + 1, {_DUE_AGAIN} "
                        f"WHERE study_uid IN ({marks}) AND state = 'pushed'"
                    ),
                    (now_v, *chunk),
                )
                count += int(cur.rowcount)
        return count

    def retry_dead(self, study_uid: str | None, now: datetime) -> int:
        """Move dead studies (one, or all with ``None``) back to pending and due now; returns how many."""
        now_v = self._time(now)
        sql = f"UPDATE studies SET {_DUE_AGAIN}, dead_reason = NULL WHERE state = 'dead'"
        with self._write("retry_dead") as cur:
            if study_uid is None:
                cur.execute(self._q(sql), (now_v,))
            else:
                cur.execute(self._q(f"{sql} AND study_uid = ?"), (now_v, study_uid))
            return int(cur.rowcount)

    # -- status ------------------------------------------------------------------------------------------

    def studies(self, state: StudyState | None = None) -> list[StudyRow]:
        """All studies (or those in ``state``), ordered by Study Instance UID."""
        with self._use("studies") as cur:
            if state is None:
                rows = cur.execute(f"SELECT {_STUDY_COLUMNS} {_STUDY_FROM} ORDER BY s.study_uid").fetchall()
            else:
                rows = cur.execute(
                    self._q(f"SELECT {_STUDY_COLUMNS} {_STUDY_FROM} WHERE s.state = ? ORDER BY s.study_uid"),
                    (state.value,),
                ).fetchall()
        return [study_row(row, self._from_time) for row in rows]

    def study(self, study_uid: str) -> StudyRow | None:
        """One study, or ``None`` when unknown."""
        with self._use("study") as cur:
            row = cur.execute(
                self._q(f"SELECT {_STUDY_COLUMNS} {_STUDY_FROM} WHERE s.study_uid = ?"), (study_uid,)
            ).fetchone()
        return None if row is None else study_row(row, self._from_time)

    def dead_reason(self, study_uid: str) -> str | None:
        """The reason code a dead study was parked with (``multiple_matches``, ``rejected``...): its
        :attr:`ingest.ports.StudyRow.dead_reason`."""
        row = self.study(study_uid)
        return None if row is None else row.dead_reason

    # -- what ingest last wrote (the merge's "ours before", the subject guard) ---------------------------

    def written(self, study_uid: str) -> tuple[str | None, str | None]:
        """What :meth:`mark_pushed` kept of the last write: (the ImagingStudy the mapping built, the
        written subject), JSON texts; ``(None, None)`` for a study written before schema version 5 or
        never written."""
        with self._use("written") as cur:
            row = cur.execute(
                self._q("SELECT written_ours, written_subject FROM studies WHERE study_uid = ?"),
                (study_uid,),
            ).fetchone()
        return (None, None) if row is None else (row[0], row[1])

    # -- the status page (ingest.app.admin) --------------------------------------------------------------

    def recent_studies(self, limit: int, offset: int = 0) -> list[StudyRow]:
        """Studies newest first by their last instance received (``last_seen``), ``limit`` from ``offset``.

        The instance count is a correlated count over ``instances_study``, so only the page's studies are
        counted.
        """
        with self._use("recent_studies") as cur:
            rows = cur.execute(
                self._q(
                    "SELECT s.study_uid, s.state, "
                    "(SELECT COUNT(*) FROM instances i WHERE i.study_uid = s.study_uid), s.dirty, "
                    "s.attempts, s.backend_id, s.version_id, s.last_error, s.last_seen, s.due_at, "
                    "s.next_attempt_at, s.pushed_at, s.lease_owner, s.lease_expires, s.dead_reason "
                    "FROM studies s ORDER BY (CASE WHEN s.last_seen IS NULL THEN 1 ELSE 0 END), "
                    "s.last_seen DESC, s.study_uid LIMIT ? OFFSET ?"
                ),
                (max(0, limit), max(0, offset)),
            ).fetchall()
        return [study_row(row, self._from_time) for row in rows]

    def study_counts(self) -> dict[StudyState, int]:
        """How many studies are in each state (states with none are left out)."""
        with self._use("study_counts") as cur:
            rows = cur.execute("SELECT state, COUNT(*) FROM studies GROUP BY state").fetchall()
        return {StudyState(row[0]): int(row[1]) for row in rows}

    def series_groups(self, study_uids: Sequence[str]) -> list[SeriesGroup]:
        """The instance rows of ``study_uids`` grouped by study, series and source.

        Each group carries its count, first and last ``added_at`` and one sample header record (the least
        ``record_json``), from which the page takes accession, modality and descriptions.
        """
        return self._series_groups(
            "series_groups",
            study_uids,
            "SELECT study_uid, series_uid, source, NULL, COUNT(*), MIN(added_at), MAX(added_at), "
            "MIN(record_json) FROM instances WHERE study_uid IN ({marks}) "
            "GROUP BY study_uid, series_uid, source ORDER BY study_uid, series_uid, source",
        )

    def _series_groups(self, op: str, study_uids: Sequence[str], sql: str) -> list[SeriesGroup]:
        """Run ``sql`` (``{marks}`` stands for a chunk's placeholders) over ``study_uids`` in chunks; its
        columns are study, series, source, last source, count, first and last ``added_at``, sample record."""
        groups: list[SeriesGroup] = []
        with self._use(op) as cur:
            for chunk, marks in in_chunks(sorted(set(study_uids))):
                rows = cur.execute(self._q(sql.format(marks=marks)), chunk).fetchall()
                groups += [
                    SeriesGroup(
                        study_uid=row[0],
                        series_uid=row[1],
                        source=row[2],
                        source_last=row[3],
                        instances=int(row[4]),
                        first_added=self._from_time(row[5]),
                        last_added=self._from_time(row[6]),
                        sample=InstanceRecord.from_json(row[7]),
                    )
                    for row in rows
                ]
        return groups

    def minute_counts(self, since: datetime, minutes: int) -> tuple[list[int], list[int]]:
        """Per minute from ``since`` (``minutes`` buckets, at most 240): instances received (``added_at``)
        and studies whose last push (``pushed_at``) fell in it; one query each, portable SQL.

        ``instances.added_at`` has no index: the instance query scans the table (the page caches it).
        """
        minutes = max(1, min(240, minutes))
        edges = [self._time(since + timedelta(minutes=m)) for m in range(minutes + 1)]
        bounds: list[object] = []
        for m in range(minutes):
            bounds += [edges[m], edges[m + 1]]
        counts: list[list[int]] = []
        with self._use("minute_counts") as cur:
            for table, column in (("instances", "added_at"), ("studies", "pushed_at")):
                sums = ", ".join(
                    [f"SUM(CASE WHEN {column} >= ? AND {column} < ? THEN 1 ELSE 0 END)"] * minutes
                )
                row = cur.execute(
                    self._q(f"SELECT {sums} FROM {table} WHERE {column} >= ? AND {column} < ?"),
                    [*bounds, edges[0], edges[-1]],
                ).fetchone()
                counts.append([int(v or 0) for v in (row or [0] * minutes)])
        return counts[0], counts[1]

    # -- the status page's search (ingest.app.admin) -----------------------------------------------------

    def study_series(self, study_uids: Sequence[str]) -> list[SeriesGroup]:
        """The instance rows of ``study_uids`` by study, series and source, every ``file:<path>`` source
        of a series in one group: its ``source`` is the least path and ``source_last`` the greatest (a
        replayed series is one group, not one per file)."""
        kind = "CASE WHEN source LIKE 'file:%' THEN 'file:' ELSE source END"
        return self._series_groups(
            "study_series",
            study_uids,
            "SELECT study_uid, series_uid, MIN(source), MAX(source), COUNT(*), MIN(added_at), "
            "MAX(added_at), MIN(record_json) FROM instances WHERE study_uid IN ({marks}) "
            f"GROUP BY study_uid, series_uid, {kind} ORDER BY study_uid, series_uid, MIN(source)",
        )

    def _study_filter(
        self, state: StudyState | None, seen_from: datetime | None, seen_before: datetime | None
    ) -> tuple[str, list[object]]:
        where: list[str] = []
        args: list[object] = []
        if state is not None:
            where.append("s.state = ?")
            args.append(state.value)
        if seen_from is not None:
            where.append("s.last_seen >= ?")
            args.append(self._time(seen_from))
        if seen_before is not None:
            where.append("s.last_seen < ?")
            args.append(self._time(seen_before))
        return ("WHERE " + " AND ".join(where) + " " if where else ""), args

    def find_studies(
        self,
        limit: int,
        offset: int = 0,
        *,
        state: StudyState | None = None,
        seen_from: datetime | None = None,
        seen_before: datetime | None = None,
    ) -> list[StudyRow]:
        """Studies newest first by ``last_seen`` (as :meth:`recent_studies`), only those in ``state`` and
        last received in [``seen_from``, ``seen_before``) when given; ``limit`` from ``offset``."""
        where, args = self._study_filter(state, seen_from, seen_before)
        with self._use("find_studies") as cur:
            rows = cur.execute(
                self._q(
                    "SELECT s.study_uid, s.state, "
                    "(SELECT COUNT(*) FROM instances i WHERE i.study_uid = s.study_uid), s.dirty, "
                    "s.attempts, s.backend_id, s.version_id, s.last_error, s.last_seen, s.due_at, "
                    "s.next_attempt_at, s.pushed_at, s.lease_owner, s.lease_expires, s.dead_reason "
                    f"FROM studies s {where}ORDER BY (CASE WHEN s.last_seen IS NULL THEN 1 ELSE 0 END), "
                    "s.last_seen DESC, s.study_uid LIMIT ? OFFSET ?"
                ),
                [*args, max(0, limit), max(0, offset)],
            ).fetchall()
        return [study_row(row, self._from_time) for row in rows]

    def count_studies(
        self,
        *,
        state: StudyState | None = None,
        seen_from: datetime | None = None,
        seen_before: datetime | None = None,
    ) -> int:
        """How many studies :meth:`find_studies` would list without a limit."""
        where, args = self._study_filter(state, seen_from, seen_before)
        with self._use("count_studies") as cur:
            row = cur.execute(self._q(f"SELECT COUNT(*) FROM studies s {where}"), args).fetchone()
        return int(row[0]) if row else 0
