"""What ``ingest sync`` remembers per source (docs/architecture.md "Sync"), on the shared SQL rules of
:mod:`ingest.adapters.state.sql` (schema version 9).

- ``sync_sources``: one row per source name: the watermark an incremental run starts from (a Study Date,
  ``YYYYMMDD``), the last run (started, finished, status, error, counts as JSON) and the lease of the node
  running it (several ``ingest serve`` nodes on one PostgreSQL sync a source once per interval).
- ``sync_studies`` / ``sync_listed``: the studies and instances (with their series) the source listed the
  last time each study was queried. The next run compares its answers with them: what the source no longer
  lists is *withdrawn* through the study lifecycle's rejections (code 113039, ``note_uid``
  ``sync:<name>``, so the relay takes it out of the ImagingStudy); what it lists again is restored.

A study whose listing, withdrawals and restorations are unchanged writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ingest.adapters.state.sql import Cursor, SQLStateStore, in_chunks
from ingest.core.lifecycle import Rejection

__all__ = ["SYNC_GONE_CODE", "SYNC_WITHDRAWN_CODE", "SyncRun", "SyncStore"]

#: The rejection code of an instance a source no longer lists (Data Retention Policy Expired: the PACS
#: no longer holds it).
SYNC_WITHDRAWN_CODE = "113039"
#: The rejection code of a whole study the PACS no longer has, with ``[sync] on_study_gone =
#: "entered-in-error"`` (113038 makes the study ``entered-in-error``).
SYNC_GONE_CODE = "113038"


@dataclass(frozen=True)
class SyncRun:
    """A source's row: its watermark and last run (``ingest status``)."""

    source: str
    watermark: str | None
    last_started: datetime | None
    last_finished: datetime | None
    last_status: str | None
    last_error: str | None
    counts: dict[str, Any]
    lease_owner: str | None
    lease_expires: datetime | None


class SyncStore(SQLStateStore):
    """The sync state of every source, for any SQL dialect."""

    # -- runs and leases ---------------------------------------------------------------------------------

    def sync_claim(self, source: str, *, owner: str, now: datetime, lease_s: float, every_s: float) -> bool:
        """Take ``source``'s run lease when it is free and its last run started ``every_s`` ago or more
        (``0``: whenever free); records the start. ``False``: another owner runs it, or not due yet."""
        now_v = self._time(now)
        due_v = self._time(now - timedelta(seconds=every_s))
        expires = self._time(now + timedelta(seconds=lease_s))
        with self._write("sync_claim") as cur:
            cur.execute(
                self._q("INSERT INTO sync_sources (source) VALUES (?) ON CONFLICT (source) DO NOTHING"),
                (source,),
            )
            cur.execute(
                self._q(
                    "UPDATE sync_sources SET lease_owner = ?, lease_expires = ?, last_started = ? "
                    "WHERE source = ? AND (lease_owner IS NULL OR lease_expires IS NULL "
                    "OR lease_expires <= ? OR lease_owner = ?) "
                    "AND (last_started IS NULL OR last_started <= ? OR ? = 0)"
                ),
                (owner, expires, now_v, source, now_v, owner, due_v, 1 if every_s > 0 else 0),
            )
            return cur.rowcount == 1

    def sync_renew(self, source: str, *, owner: str, now: datetime, lease_s: float) -> bool:
        """Extend ``owner``'s lease on ``source`` to ``now + lease_s``; ``False``: it holds it no more."""
        with self._write("sync_renew") as cur:
            cur.execute(
                self._q("UPDATE sync_sources SET lease_expires = ? WHERE source = ? AND lease_owner = ?"),
                (self._time(now + timedelta(seconds=lease_s)), source, owner),
            )
            return cur.rowcount == 1

    def sync_finish(
        self,
        source: str,
        *,
        owner: str,
        now: datetime,
        status: str,
        error: str | None,
        counts: Mapping[str, Any],
        watermark: str | None,
    ) -> None:
        """Record a run's end and release the lease; the watermark moves only when given (a success)."""
        with self._write("sync_finish") as cur:
            cur.execute(
                self._q(
                    "UPDATE sync_sources SET last_finished = ?, last_status = ?, last_error = ?, "
                    "last_counts = ?, watermark = COALESCE(?, watermark), "
                    "lease_owner = NULL, lease_expires = NULL WHERE source = ? AND lease_owner = ?"
                ),
                (self._time(now), status, error, json.dumps(dict(counts), sort_keys=True), watermark,
                 source, owner),
            )

    def sync_runs(self) -> list[SyncRun]:
        """Every source's row, by name."""
        with self._use("sync_runs") as cur:
            rows = cur.execute(
                "SELECT source, watermark, last_started, last_finished, last_status, last_error, "
                "last_counts, lease_owner, lease_expires FROM sync_sources ORDER BY source"
            ).fetchall()
        return [
            SyncRun(
                source=str(r[0]), watermark=r[1], last_started=self._from_time(r[2]),
                last_finished=self._from_time(r[3]), last_status=r[4], last_error=r[5],
                counts=json.loads(r[6]) if r[6] else {}, lease_owner=r[7],
                lease_expires=self._from_time(r[8]),
            )
            for r in rows
        ]

    def sync_watermark(self, source: str) -> str | None:
        """The Study Date (``YYYYMMDD``) the last successful run of ``source`` recorded, if any."""
        with self._use("sync_watermark") as cur:
            row = cur.execute(
                self._q("SELECT watermark FROM sync_sources WHERE source = ?"), (source,)
            ).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    # -- listings ----------------------------------------------------------------------------------------

    def sync_known_studies(self, source: str) -> dict[str, str | None]:
        """The studies ``source`` listed (Study Instance UID -> its Study Date as listed, or ``None``)."""
        with self._use("sync_known_studies") as cur:
            rows = cur.execute(
                self._q("SELECT study_uid, study_date FROM sync_studies WHERE source = ?"), (source,)
            ).fetchall()
        return {str(r[0]): (None if r[1] is None else str(r[1])) for r in rows}

    def sync_listing(self, source: str, study_uid: str) -> dict[str, str]:
        """What ``source`` listed of ``study_uid`` last time: SOP Instance UID -> Series Instance UID."""
        with self._use("sync_listing") as cur:
            rows = cur.execute(
                self._q("SELECT sop_uid, series_uid FROM sync_listed WHERE source = ? AND study_uid = ?"),
                (source, study_uid),
            ).fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    def _sync_rules(self, cur: Cursor, source: str, study_uid: str) -> list[tuple[str, str, str]]:
        rows = cur.execute(
            self._q("SELECT series_uid, sop_uid, code FROM rejections WHERE study_uid = ? AND note_uid = ?"),
            (study_uid, f"sync:{source}"),
        ).fetchall()
        return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]

    def _sync_reject(self, cur: Cursor, rules: Sequence[Rejection], now: object) -> int:
        """Insert rejection rows (already recorded ones are skipped); how many were new."""
        new = 0
        for rule in rules:
            cur.execute(
                self._q(
                    "INSERT INTO rejections (study_uid, series_uid, sop_uid, code, note_uid, added_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
                ),
                (rule.study_uid, rule.series_uid, rule.sop_uid, rule.code, rule.note_uid, now),
            )
            new += max(0, cur.rowcount)
        return new

    def _sync_touch(self, cur: Cursor, study_uid: str, now: object, due_at: object) -> bool:
        """Make a study that has a row dirty and due (its generation grows); ``False`` when it has none."""
        if cur.execute(self._q("SELECT 1 FROM studies WHERE study_uid = ?"), (study_uid,)).fetchone() is None:
            return False
        self._touch_study(cur, study_uid, 1, now, due_at)
        return True

    def sync_study(
        self,
        source: str,
        study_uid: str,
        *,
        study_date: str | None,
        listed: Mapping[str, str],
        now: datetime,
        due_at: datetime,
    ) -> tuple[int, int]:
        """Record what ``source`` lists of ``study_uid`` now (SOP Instance UID -> Series Instance UID).

        In one transaction: instances it listed before and no longer lists (and that have rows) are
        withdrawn (a 113039 rejection by ``sync:<source>``); instances it withdrew before and lists again,
        and a whole-study mark of a study it had lost, are restored; the listing is replaced. The study
        becomes dirty and due only when a withdrawal or restoration was written. Returns (withdrawn,
        restored); an unchanged study writes nothing.
        """
        note = f"sync:{source}"
        before = self.sync_listing(source, study_uid)
        with self._use("sync_study") as cur:
            known = cur.execute(
                self._q("SELECT study_date FROM sync_studies WHERE source = ? AND study_uid = ?"),
                (source, study_uid),
            ).fetchone()
            rules = self._sync_rules(cur, source, study_uid)
        withdrawn = {(series, sop) for sop, series in before.items() if sop not in listed}
        rejected = {(series, sop) for series, sop, _code in rules}
        to_reject = sorted(withdrawn - rejected)
        to_restore = sorted((series, sop) for series, sop in rejected if sop == "" or sop in listed)
        if (
            known is not None and known[0] == study_date and before == dict(listed)
            and not to_reject and not to_restore
        ):
            return 0, 0
        now_v, due_v = self._time(now), self._time(due_at)
        with self._write("sync_study") as cur:
            cur.execute(
                self._q(
                    "INSERT INTO sync_studies (source, study_uid, study_date) VALUES (?, ?, ?) "
                    "ON CONFLICT (source, study_uid) DO UPDATE SET study_date = excluded.study_date"
                ),
                (source, study_uid, study_date),
            )
            gone = [sop for sop in before if sop not in listed]
            for chunk, marks in in_chunks(gone):
                cur.execute(
                    self._q(
                        "DELETE FROM sync_listed WHERE source = ? AND study_uid = ? "
                        f"AND sop_uid IN ({marks})"
                    ),
                    (source, study_uid, *chunk),
                )
            fresh = [(sop, series) for sop, series in listed.items() if before.get(sop) != series]
            if fresh:
                cur.executemany(
                    self._q(
                        "INSERT INTO sync_listed (source, study_uid, series_uid, sop_uid) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT (source, study_uid, sop_uid) "
                        "DO UPDATE SET series_uid = excluded.series_uid"
                    ),
                    [(source, study_uid, series, sop) for sop, series in fresh],
                )
            changed = 0
            if to_reject:
                changed += self._sync_reject(
                    cur,
                    [Rejection(study_uid, series, sop, SYNC_WITHDRAWN_CODE, note)
                     for series, sop in to_reject],
                    now_v,
                )
            for series, sop in to_restore:
                cur.execute(
                    self._q(
                        "DELETE FROM rejections WHERE study_uid = ? AND series_uid = ? AND sop_uid = ? "
                        "AND note_uid = ?"
                    ),
                    (study_uid, series, sop, note),
                )
                changed += max(0, cur.rowcount)
            if changed:
                self._sync_touch(cur, study_uid, now_v, due_v)
        return len(to_reject), len(to_restore)

    def sync_study_gone(
        self, source: str, study_uid: str, *, mark: bool, now: datetime, due_at: datetime
    ) -> bool:
        """``source`` no longer lists ``study_uid``: forget its listing; with ``mark`` also reject the
        whole study (:data:`SYNC_GONE_CODE`, ``entered-in-error``). ``True`` when the study changed."""
        note = f"sync:{source}"
        now_v, due_v = self._time(now), self._time(due_at)
        with self._write("sync_study_gone") as cur:
            cur.execute(
                self._q("DELETE FROM sync_listed WHERE source = ? AND study_uid = ?"), (source, study_uid)
            )
            cur.execute(
                self._q("DELETE FROM sync_studies WHERE source = ? AND study_uid = ?"), (source, study_uid)
            )
            if not mark:
                return False
            if not self._sync_reject(cur, [Rejection(study_uid, "", "", SYNC_GONE_CODE, note)], now_v):
                return False
            return self._sync_touch(cur, study_uid, now_v, due_v)

    def sync_source_of(self, sop_uids: Sequence[str]) -> dict[str, str]:
        """The ``source`` column of the rows of ``sop_uids`` (which ones arrived with their bytes)."""
        found: dict[str, str] = {}
        wanted = sorted(set(sop_uids))
        with self._use("sync_source_of") as cur:
            for chunk, marks in in_chunks(wanted):
                rows = cur.execute(
                    self._q(f"SELECT sop_uid, source FROM instances WHERE sop_uid IN ({marks})"), chunk,
                ).fetchall()
                found.update({str(r[0]): str(r[1]) for r in rows})
        return found
