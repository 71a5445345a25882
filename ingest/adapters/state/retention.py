"""Which spooled bytes the retention policy may remove, and the commitment holds that keep them
(docs/architecture.md "Retention"), on the shared SQL rules of :mod:`ingest.adapters.state.sql`.

An instance row outlives its bytes: releasing them sets ``bytes_removed_at`` / ``bytes_removed_reason``,
clears ``spool_name`` and deletes the row's ``instance_bytes`` in one transaction; the caller
(:func:`ingest.intake.retention.release_bytes`) unlinks the spool files afterwards. A crash between the
two leaves files no row names, which the start-up sweep (:mod:`ingest.intake.sweep`) removes as orphans.
The row, its digest and its header record stay, so the study's ImagingStudy and the duplicate check
are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from ingest.adapters.state.sql import SQLStateStore, in_chunks
from ingest.ports import ReleasedBytes

__all__ = ["RetentionStore"]

#: An instance whose bytes are still held: a spool file or an ``instance_bytes`` row, not yet released.
_HELD = (
    "i.bytes_removed_at IS NULL AND (i.spool_name IS NOT NULL OR EXISTS "
    "(SELECT 1 FROM instance_bytes b WHERE b.sop_uid = i.sop_uid))"
)


class RetentionStore(SQLStateStore):
    """:class:`ingest.ports.RetentionState` for any SQL dialect."""

    def release_instance_bytes(
        self,
        sop_uids: Sequence[str],
        *,
        reason: str,
        now: datetime,
        unless_held_at: datetime | None = None,
    ) -> list[ReleasedBytes]:
        """Mark the bytes of ``sop_uids`` removed, in one transaction, and say what to unlink.

        Parameters
        ----------
        sop_uids:
            SOP Instance UIDs; unknown ones and ones already released are skipped.
        reason:
            Why (``retention``, ``iocm:113039``...); recorded as ``bytes_removed_reason``.
        now:
            Timezone-aware time recorded as ``bytes_removed_at``.
        unless_held_at:
            Skip instances whose commitment hold runs past this time (retention passes ``now``). The
            rows are read and marked under a row lock (PostgreSQL ``FOR UPDATE``; SQLite's writer lock), so
            a commitment that holds an instance either commits first, and the instance is skipped, or
            finds it released, and reports it not committed.

        Returns
        -------
        list[ReleasedBytes]
            One entry per row marked, with the spool file to unlink (if any) and the in-row bytes the
            transaction deleted.

        Raises
        ------
        StoreUnavailableError, StoreError
            When the transaction cannot commit (nothing is marked).
        """
        now_v = self._time(now)
        hold: list[object] = []
        where_hold = ""
        if unless_held_at is not None:
            where_hold = " AND (i.hold_until IS NULL OR i.hold_until <= ?)"
            hold = [self._time(unless_held_at)]
        wanted = sorted(set(sop_uids))
        released: list[ReleasedBytes] = []
        with self._write("release_instance_bytes") as cur:
            for chunk, marks in in_chunks(wanted):
                rows = cur.execute(
                    self._q(
                        "SELECT i.sop_uid, i.spool_name, "
                        "(SELECT LENGTH(b.data) FROM instance_bytes b WHERE b.sop_uid = i.sop_uid) "
                        f"FROM instances i WHERE i.sop_uid IN ({marks}) AND {_HELD}{where_hold}"
                        # the claim's lock: FOR UPDATE SKIP LOCKED on PostgreSQL (a row a commitment
                        # is deciding now is left for the next pass); SQLite's writer lock is held
                        + self._CLAIM_LOCK
                    ),
                    [*chunk, *hold],
                ).fetchall()
                if not rows:
                    continue
                found = [str(row[0]) for row in rows]
                marks = ", ".join(["?"] * len(found))
                cur.execute(
                    self._q(
                        "UPDATE instances SET bytes_removed_at = ?, bytes_removed_reason = ?, "
                        f"spool_name = NULL WHERE sop_uid IN ({marks})"
                    ),
                    [now_v, reason, *found],
                )
                cur.execute(self._q(f"DELETE FROM instance_bytes WHERE sop_uid IN ({marks})"), found)
                released += [
                    ReleasedBytes(str(row[0]), None if row[1] is None else str(row[1]), int(row[2] or 0))
                    for row in rows
                ]
        return released

    def releasable(
        self, *, pushed_before: datetime, now: datetime, limit: int, node: str | None = None
    ) -> list[str]:
        """SOP Instance UIDs whose bytes retention may remove now, oldest push first.

        An instance qualifies when its bytes are held, its study is ``pushed`` and clean (nothing
        arrived since the push), the instance arrived before that push, the push was at or before
        ``pushed_before`` and its commitment hold (``hold_until``) is unset or at or before ``now``.

        Parameters
        ----------
        pushed_before:
            ``now`` for ``retain = "until_pushed"``; ``now - retain`` for a duration.
        now:
            The time holds are compared with.
        limit:
            Most UIDs returned (a batch).
        node:
            Only spool files this node received (several nodes sharing PostgreSQL each have their own
            spool); in-row bytes qualify whichever node received them. ``None``: every instance.
        """
        if limit <= 0:
            return []
        args: list[object] = [self._time(pushed_before), self._time(now)]
        where_node = ""
        if node is not None:
            where_node = " AND (i.spool_name IS NULL OR i.node = ?)"
            args.append(node)
        args.append(limit)
        with self._use("releasable") as cur:
            rows = cur.execute(
                self._q(
                    "SELECT i.sop_uid FROM studies s JOIN instances i ON i.study_uid = s.study_uid "
                    "WHERE s.state = 'pushed' AND s.dirty = false AND s.pushed_at <= ? "
                    "AND i.added_at <= s.pushed_at AND (i.hold_until IS NULL OR i.hold_until <= ?) "
                    f"AND {_HELD}{where_node} ORDER BY s.pushed_at, i.sop_uid LIMIT ?"
                ),
                args,
            ).fetchall()
        return [str(row[0]) for row in rows]

    def hold_bytes(self, sop_uids: Sequence[str], *, until: datetime) -> int:
        """Keep these instances' bytes from retention until at least ``until``.

        A hold that already reaches later stays as it is (holds only ever grow). Returns how many of the
        rows now hold until ``until`` or later (unknown UIDs are not counted).
        """
        until_v = self._time(until)
        wanted = sorted(set(sop_uids))
        held = 0
        with self._write("hold_bytes") as cur:
            for chunk, marks in in_chunks(wanted):
                cur.execute(
                    self._q(
                        "UPDATE instances SET hold_until = ? WHERE (hold_until IS NULL OR hold_until < ?) "
                        f"AND sop_uid IN ({marks})"
                    ),
                    [until_v, until_v, *chunk],
                )
                row = cur.execute(
                    self._q(f"SELECT COUNT(*) FROM instances WHERE hold_until >= ? AND sop_uid IN ({marks})"),
                    [until_v, *chunk],
                ).fetchone()
                held += int(row[0] if row else 0)
        return held
