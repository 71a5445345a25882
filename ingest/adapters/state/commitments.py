"""Storage Commitment requests and their reports (docs/architecture.md "Storage Commitment"), on the
shared SQL rules of :mod:`ingest.adapters.state.sql`.

A request (``commitments``, one row per Transaction UID, and ``commitment_items``, its SOP Class /
Instance pairs in request order) is committed before the N-ACTION is answered. Its result is decided
once, by :meth:`CommitmentStore.decide_commitment`, in one transaction that also holds the committed
instances' bytes against retention (``instances.hold_until``); later deliveries of the report send that
same result. An instance is committed when its row is committed, the requesting AE itself sent it (its
row's ``source`` is ``dimse:<calling AE>``: an AE learns nothing of what others sent; another AE's
instance fails with 0x0112 exactly like one never received), its SOP Class is the one asked for, its
bytes are held (a spool file, or an ``instance_bytes`` row) and not released (``bytes_removed_at`` unset),
and no rejection (IOCM note or ``ingest reject``, ``ingest.adapters.state.lifecycle``) covers it. The
others fail with their Failure Reason (0008,1197), PS3.3 C.14.1.1: 0x0112 no such object instance,
0x0119 class / instance conflict, 0x0110 processing failure.

Reports are claimed like due studies: a lease (``lease_owner`` until ``lease_expires``), taken in the
claim's transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so one sender delivers each report. An
owner may take back its own lease at once (a restarted node does not wait for the lease it held when it
was killed).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, Final

from ingest.adapters.state.sql import Cursor, SQLStateStore, in_chunks
from ingest.core.lifecycle import Rejection, patient_key
from ingest.core.records import InstanceRecord
from ingest.errors import StoreError
from ingest.ports import CommitmentAdded, CommitmentClaim, CommitmentReport, CommitmentRow

__all__ = [
    "FAILURE_CLASS_CONFLICT",
    "FAILURE_NO_SUCH_INSTANCE",
    "FAILURE_PROCESSING",
    "CommitmentStore",
]

#: Failure Reason (0008,1197) values, PS3.3 C.14.1.1.
FAILURE_PROCESSING: Final = (
    0x0110  # the bytes are not held (released, never spooled) or the instance is rejected
)
FAILURE_NO_SUCH_INSTANCE: Final = 0x0112  # no row: never received (or not accepted)
FAILURE_CLASS_CONFLICT: Final = 0x0119  # received under another SOP Class

# Rows per multi-row INSERT of items (4 parameters each).
_INSERT_ROWS: Final = 200

_ROW_COLUMNS: Final = (
    "c.transaction_uid, c.calling_ae, c.state, c.attempts, c.received_at, c.next_attempt_at, "
    "c.reported_at, c.last_error, "
    "(SELECT COUNT(*) FROM commitment_items t WHERE t.transaction_uid = c.transaction_uid), "
    "(SELECT COUNT(*) FROM commitment_items t WHERE t.transaction_uid = c.transaction_uid "
    "AND t.committed = true), "
    "(SELECT COUNT(*) FROM commitment_items t WHERE t.transaction_uid = c.transaction_uid "
    "AND t.committed = false), c.decided_at"
)


class CommitmentStore(SQLStateStore):
    """:class:`ingest.ports.CommitmentState` for any SQL dialect."""

    # -- requests ----------------------------------------------------------------------------------------

    def add_commitment(
        self, transaction_uid: str, calling_ae: str, items: Sequence[tuple[str, str]], *, now: datetime
    ) -> CommitmentAdded:
        """Store a Storage Commitment request; durable on return (the N-ACTION is answered after).

        Parameters
        ----------
        transaction_uid:
            Transaction UID (0008,1195).
        calling_ae:
            The requester's AE title (the report goes to it).
        items:
            (Referenced SOP Class UID, Referenced SOP Instance UID) pairs of the Referenced SOP Sequence
            (0008,1199), in request order.
        now:
            Timezone-aware receive time; the report is due at once.

        Returns
        -------
        CommitmentAdded
            ``NEW``; ``REPEATED`` when the same AE asked for the same instances under this Transaction UID
            before (its report, decided then, is due again); ``CONFLICT`` when the Transaction UID is
            taken by another AE or other instances (nothing written).

        Raises
        ------
        StoreUnavailableError
            When the request cannot be committed (the N-ACTION is then refused).
        """
        now_v = self._time(now)
        with self._write("add_commitment") as cur:
            inserted = cur.execute(
                self._q(
                    "INSERT INTO commitments (transaction_uid, calling_ae, node, state, received_at, "
                    "next_attempt_at) VALUES (?, ?, ?, 'pending', ?, ?) "
                    "ON CONFLICT (transaction_uid) DO NOTHING RETURNING transaction_uid"
                ),
                (transaction_uid, calling_ae, self.node, now_v, now_v),
            ).fetchall()
            if not inserted:
                return self._repeat(cur, transaction_uid, calling_ae, items, now_v)
            for start in range(0, len(items), _INSERT_ROWS):
                chunk = items[start : start + _INSERT_ROWS]
                values: list[object] = []
                for offset, (sop_class, sop_uid) in enumerate(chunk):
                    values += [transaction_uid, start + offset, sop_class, sop_uid]
                rows = ", ".join(["(?, ?, ?, ?)"] * len(chunk))
                cur.execute(
                    self._q(
                        "INSERT INTO commitment_items (transaction_uid, position, sop_class_uid, sop_uid) "
                        f"VALUES {rows}"
                    ),
                    values,
                )
        return CommitmentAdded.NEW

    def _repeat(
        self,
        cur: Cursor,
        transaction_uid: str,
        calling_ae: str,
        items: Sequence[tuple[str, str]],
        now_v: object,
    ) -> CommitmentAdded:
        """A Transaction UID seen before: the same request again makes its report due again."""
        row = cur.execute(
            self._q("SELECT calling_ae FROM commitments WHERE transaction_uid = ?"), (transaction_uid,)
        ).fetchone()
        stored = cur.execute(
            self._q(
                "SELECT sop_class_uid, sop_uid FROM commitment_items WHERE transaction_uid = ? "
                "ORDER BY position"
            ),
            (transaction_uid,),
        ).fetchall()
        if (
            row is None
            or str(row[0]) != calling_ae
            or [tuple(r) for r in stored] != [tuple(i) for i in items]
        ):
            return CommitmentAdded.CONFLICT
        cur.execute(
            self._q(
                "UPDATE commitments SET state = 'pending', attempts = 0, next_attempt_at = ?, "
                "last_error = NULL, reported_at = NULL WHERE transaction_uid = ?"
            ),
            (now_v, transaction_uid),
        )
        return CommitmentAdded.REPEATED

    # -- claims ------------------------------------------------------------------------------------------

    def claim_commitments(
        self,
        now: datetime,
        limit: int,
        owner: str,
        lease_s: float,
        *,
        stale_after: datetime | None = None,
        exclude_aes: Collection[str] = (),
    ) -> list[CommitmentClaim]:
        """Claim up to ``limit`` pending reports whose next attempt is due, oldest first.

        A report leased by another owner is skipped until that lease expires; ``owner``'s own leases are
        taken again at once. A next attempt later than ``stale_after``, and a lease running more than
        twice ``lease_s`` past ``now``, were set before the clock was stepped back: they count as due /
        expired. Reports to ``exclude_aes`` are not claimed.
        """
        if limit <= 0:
            return []
        now_v, expires, stale_v, lease_stale_v = self._claim_times(now, lease_s, stale_after)
        excluded = sorted(set(exclude_aes))
        not_in = f"AND calling_ae NOT IN ({', '.join(['?'] * len(excluded))}) " if excluded else ""
        with self._write("claim_commitments") as cur:
            rows = cur.execute(
                self._q(
                    "SELECT transaction_uid, calling_ae, received_at, attempts FROM commitments "
                    "WHERE state = 'pending' AND " + self._claimable(own_again=True) + not_in
                    + "ORDER BY next_attempt_at, received_at, transaction_uid LIMIT ?" + self._CLAIM_LOCK
                ),
                (now_v, stale_v, owner, now_v, lease_stale_v, *excluded, limit),
            ).fetchall()
            self._take_leases(cur, "commitments", "transaction_uid", [row[0] for row in rows], owner, expires)
        claims = []
        for row in rows:
            received = self._from_time(row[2])
            assert received is not None  # NOT NULL column
            claims.append(CommitmentClaim(str(row[0]), str(row[1]), received, int(row[3]), owner))
        return claims

    # -- the decision --------------------------------------------------------------------------------------

    def decide_commitment(
        self, transaction_uid: str, *, now: datetime, hold_until: datetime
    ) -> CommitmentReport:
        """The request's result: decided at the first call, the same result on every later one.

        Deciding reads the instance rows of every item, commits the instances that qualify (see the
        module doc) and sets their ``hold_until`` to at least ``hold_until``, in one transaction: an
        instance reported committed has its bytes held from the moment it is decided.

        Raises
        ------
        StoreError
            When the Transaction UID is not in the store.
        StoreUnavailableError
            When the decision cannot be committed (nothing is decided; the next attempt decides).
        """
        with self._write("decide_commitment") as cur:
            row = cur.execute(
                self._q("SELECT calling_ae, decided_at FROM commitments WHERE transaction_uid = ?"),
                (transaction_uid,),
            ).fetchone()
            if row is None:
                raise StoreError(
                    f"decide_commitment: transaction {transaction_uid} is not in the state store"
                )
            calling_ae = str(row[0])
            if row[1] is None:
                self._decide(cur, transaction_uid, self._time(now), self._time(hold_until))
            items = cur.execute(
                self._q(
                    "SELECT sop_class_uid, sop_uid, committed, failure_reason FROM commitment_items "
                    "WHERE transaction_uid = ? ORDER BY position"
                ),
                (transaction_uid,),
            ).fetchall()
        committed = tuple((str(i[0]), str(i[1])) for i in items if bool(i[2]))
        failed = tuple(
            (str(i[0]), str(i[1]), int(i[3] or FAILURE_PROCESSING)) for i in items if not bool(i[2])
        )
        return CommitmentReport(transaction_uid, calling_ae, committed, failed)

    def _decide(self, cur: Cursor, transaction_uid: str, now_v: object, hold_v: object) -> None:
        items = cur.execute(
            self._q(
                "SELECT position, sop_class_uid, sop_uid FROM commitment_items WHERE transaction_uid = ? "
                "ORDER BY position"
            ),
            (transaction_uid,),
        ).fetchall()
        wanted = sorted({str(i[2]) for i in items})
        calling = cur.execute(
            self._q("SELECT calling_ae FROM commitments WHERE transaction_uid = ?"), (transaction_uid,)
        ).fetchone()
        own = f"dimse:{calling[0]}" if calling is not None else None
        classes: dict[str, str] = {}
        for chunk, marks in in_chunks(wanted):
            # only the requester's own instances: another AE's are "no such object instance"
            for sop_uid, record_json in cur.execute(
                self._q(
                    f"SELECT sop_uid, record_json FROM instances WHERE sop_uid IN ({marks}) AND source = ?"
                ),
                [*chunk, own],
            ).fetchall():
                classes[str(sop_uid)] = _sop_class_of(record_json)
        # the instances asked for under their own class; of those, the ones whose bytes are held now get
        # their hold (an UPDATE, so a row whose bytes another transaction released is not counted)
        candidates = sorted({str(i[2]) for i in items if classes.get(str(i[2])) == str(i[1])})
        rejected = self._rejected_among(cur, candidates)
        held: set[str] = set()
        keep = [uid for uid in candidates if uid not in rejected]
        for chunk, marks in in_chunks(keep):
            held.update(
                str(r[0])
                for r in cur.execute(
                    self._q(
                        "UPDATE instances SET hold_until = CASE WHEN hold_until IS NULL OR hold_until < ? "
                        "THEN ? ELSE hold_until END "
                        f"WHERE sop_uid IN ({marks}) AND bytes_removed_at IS NULL "
                        "AND (spool_name IS NOT NULL OR EXISTS "
                        "(SELECT 1 FROM instance_bytes b WHERE b.sop_uid = instances.sop_uid)) "
                        "RETURNING sop_uid"
                    ),
                    [hold_v, hold_v, *chunk],
                ).fetchall()
            )
        results: list[tuple[bool, int | None, str, int]] = []
        for position, sop_class, sop_uid in items:
            uid, cls = str(sop_uid), str(sop_class)
            if uid in held and classes.get(uid) == cls:
                results.append((True, None, transaction_uid, int(position)))
            elif uid not in classes:
                results.append((False, FAILURE_NO_SUCH_INSTANCE, transaction_uid, int(position)))
            elif classes[uid] != cls:
                results.append((False, FAILURE_CLASS_CONFLICT, transaction_uid, int(position)))
            else:
                results.append((False, FAILURE_PROCESSING, transaction_uid, int(position)))
        cur.executemany(
            self._q(
                "UPDATE commitment_items SET committed = ?, failure_reason = ? "
                "WHERE transaction_uid = ? AND position = ?"
            ),
            results,
        )
        cur.execute(
            self._q("UPDATE commitments SET decided_at = ? WHERE transaction_uid = ?"),
            (now_v, transaction_uid),
        )

    def _rejected_among(self, cur: Cursor, sop_uids: Sequence[str]) -> set[str]:
        """Which of ``sop_uids`` a rejection covers (``rejections``, ``ingest.adapters.state.lifecycle``:
        the instance itself, its series or its study; a note's only of its own patient). They are never
        committed: ingest keeps them out of the ImagingStudy and may remove their bytes on its own."""
        found: set[str] = set()
        for chunk, marks in in_chunks(sop_uids):
            rows = cur.execute(
                self._q(
                    "SELECT i.sop_uid, i.record_json, r.study_uid, r.series_uid, r.sop_uid, r.code, "
                    "r.note_uid, n.record_json FROM instances i "
                    "JOIN rejections r ON r.study_uid = i.study_uid "
                    "AND (r.series_uid = '' OR r.series_uid = i.series_uid) "
                    "AND (r.sop_uid = '' OR r.sop_uid = i.sop_uid) "
                    "LEFT JOIN instances n ON n.sop_uid = r.note_uid AND r.note_uid <> '' "
                    f"WHERE i.sop_uid IN ({marks})"
                ),
                chunk,
            ).fetchall()
            for row in rows:
                patient = ""
                if row[7] is not None:
                    patient = patient_key(InstanceRecord.from_json(row[7]))
                rule = Rejection(str(row[2]), str(row[3]), str(row[4]), str(row[5]), str(row[6]), patient)
                if rule.covers(InstanceRecord.from_json(row[1])):
                    found.add(str(row[0]))
        return found

    # -- outcomes ----------------------------------------------------------------------------------------

    def commitment_reported(self, claim: CommitmentClaim, *, now: datetime) -> None:
        """The report was delivered: state ``reported``, lease released (ignored if another owner has the
        lease now)."""
        with self._write("commitment_reported") as cur:
            cur.execute(
                self._q(
                    "UPDATE commitments SET state = 'reported', reported_at = ?, last_error = NULL, "
                    "next_attempt_at = NULL, lease_owner = NULL, lease_expires = NULL "
                    "WHERE transaction_uid = ? AND (lease_owner IS NULL OR lease_owner = ?)"
                ),
                (self._time(now), claim.transaction_uid, claim.owner),
            )

    def commitment_retry(
        self, claim: CommitmentClaim, *, error: str, next_attempt_at: datetime | None
    ) -> None:
        """Count a failed delivery and keep ``error``; due again at ``next_attempt_at``, or ``abandoned``
        when it is ``None``. Ignored if another owner has the lease now."""
        state = "pending" if next_attempt_at is not None else "abandoned"
        when = None if next_attempt_at is None else self._time(next_attempt_at)
        with self._write("commitment_retry") as cur:
            cur.execute(
                self._q(
                    "UPDATE commitments SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?, "
                    "state = ?, lease_owner = NULL, lease_expires = NULL "
                    "WHERE transaction_uid = ? AND (lease_owner IS NULL OR lease_owner = ?)"
                ),
                (error[:500], when, state, claim.transaction_uid, claim.owner),
            )

    # -- status ------------------------------------------------------------------------------------------

    def commitments(self, state: str | None = None, limit: int = 100) -> list[CommitmentRow]:
        """Requests (only those in ``state`` when given), newest first, at most ``limit``."""
        where, args = ("WHERE c.state = ? ", [state]) if state else ("", [])
        with self._use("commitments") as cur:
            rows = cur.execute(
                self._q(
                    f"SELECT {_ROW_COLUMNS} FROM commitments c {where}"
                    "ORDER BY c.received_at DESC, c.transaction_uid LIMIT ?"
                ),
                [*args, max(0, limit)],
            ).fetchall()
        return [self._commitment_row(r) for r in rows]

    def _commitment_row(self, r: Sequence[Any]) -> CommitmentRow:
        decided = r[11] is not None
        return CommitmentRow(
            transaction_uid=str(r[0]),
            calling_ae=str(r[1]),
            state=str(r[2]),
            instances=int(r[8]),
            committed=int(r[9]) if decided else None,
            failed=int(r[10]) if decided else None,
            attempts=int(r[3]),
            received_at=self._from_time(r[4]),
            next_attempt_at=self._from_time(r[5]),
            reported_at=self._from_time(r[6]),
            last_error=None if r[7] is None else str(r[7]),
        )

    def commitment_counts(self) -> dict[str, int]:
        """How many requests are in each state (``pending``, ``reported``, ``abandoned``)."""
        with self._use("commitment_counts") as cur:
            rows = cur.execute("SELECT state, COUNT(*) FROM commitments GROUP BY state").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}


def _sop_class_of(record_json: Any) -> str:
    """The SOP Class UID (0008,0016) of a stored header record (``InstanceRecord`` JSON)."""
    try:
        value = json.loads(record_json).get("sop_class_uid")
    except (ValueError, AttributeError):
        return ""
    return str(value) if value else ""
