"""The state of a study's life after acceptance (docs/architecture.md "Study lifecycle"): IOCM rejections
and replaced instances, on the shared SQL rules of :mod:`ingest.adapters.state.sql`.

Rejections are state, in the ``rejections`` table (schema version 3), one row per rejected instance,
series or study (``""`` widens the scope), per code and per note. The rules are the core's
(:mod:`ingest.core.lifecycle`); this module stores and reads them:

- a rejection note added by :meth:`add_instances` records its rejections in the same transaction as its
  row, and makes the other studies it names (those with rows) dirty; a note received again is a
  duplicate and writes nothing;
- an instance added after a rejection that covers it is stored like any other; it is left out when the
  study is read back (:meth:`instances` marks :attr:`~ingest.core.records.InstanceRecord.rejected_for`);
- :attr:`~ingest.ports.Added.release` names the instances whose bytes the caller removes
  (``ingest.intake.retention.release_bytes``) once this transaction committed: 113037 / 113039;
- :meth:`reject` is ``ingest reject``'s way in; :meth:`replace_instance` is ``[intake] on_conflict =
  "replace"``'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from datetime import datetime

from ingest.adapters.state.sql import Cursor, SQLStateStore
from ingest.core.lifecycle import (
    REJECTION_CODES,
    Rejection,
    covering,
    mark,
    note_rejections,
    rejection_code,
    removes_bytes,
    view,
)
from ingest.core.records import InstanceRecord
from ingest.ports import Added, AddOutcome, Rejected, Replaced

__all__ = ["LifecycleStore"]

# Study UIDs / SOP Instance UIDs per IN (...) lookup (under SQLite's 999-variable floor on old builds).
_CHUNK = 400
# A study with more rows than this is taken to hold more than rejection notes (not read to check).
_NOTES_ALONE = 32
_COLUMNS = "study_uid, series_uid, sop_uid, code, note_uid"


def _chunks(values: Iterable[str]) -> Iterable[list[str]]:
    wanted = sorted(set(values))
    for start in range(0, len(wanted), _CHUNK):
        yield wanted[start : start + _CHUNK]


class LifecycleStore(SQLStateStore):
    """:class:`ingest.ports.LifecycleState` for any SQL dialect."""

    # -- reading ----------------------------------------------------------------------------------------

    def _rules(self, cur: Cursor, study_uids: Iterable[str]) -> list[Rejection]:
        rules: list[Rejection] = []
        for chunk in _chunks(study_uids):
            marks = ", ".join(["?"] * len(chunk))
            rows = cur.execute(
                self._q(f"SELECT {_COLUMNS} FROM rejections WHERE study_uid IN ({marks})"), chunk
            ).fetchall()
            rules += [Rejection(*(str(v) for v in row)) for row in rows]
        return sorted(rules)

    def rejections(self, study_uid: str) -> list[Rejection]:
        """The rejections recorded for ``study_uid`` (of its instances, series, or the whole study)."""
        with self._use("rejections") as cur:
            return self._rules(cur, [study_uid])

    def instances(self, study_uid: str) -> list[InstanceRecord]:
        """The records of a study's instances (notes and rejected ones included), ordered by series and
        SOP Instance UID, each rejected one with :attr:`~InstanceRecord.rejected_for` set."""
        records = super().instances(study_uid)
        rules = self.rejections(study_uid)
        return mark(records, rules) if rules else records

    def rejected_counts(self) -> dict[str, dict[str, int]]:
        """Per study with rejected instances: how many are rejected, per rejection code."""
        with self._use("rejected_counts") as cur:
            rows = cur.execute("SELECT DISTINCT study_uid FROM rejections").fetchall()
        uids = [str(row[0]) for row in rows]
        counts: dict[str, dict[str, int]] = {}
        for uid in sorted(uids):
            rejected = view(self.instances(uid)).rejected_counts
            if rejected:
                counts[uid] = dict(rejected)
        return counts

    # -- writing ----------------------------------------------------------------------------------------

    def _insert_rules(self, cur: Cursor, rules: Sequence[Rejection], now: object) -> int:
        """Insert ``rules`` (already recorded ones are skipped); how many were new."""
        new = 0
        for rule in rules:
            cur.execute(
                self._q(
                    f"INSERT INTO rejections ({_COLUMNS}, added_at) VALUES (?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT DO NOTHING"
                ),
                (rule.study_uid, rule.series_uid, rule.sop_uid, rule.code, rule.note_uid, now),
            )
            new += max(0, cur.rowcount)
        return new

    def _touch_known(self, cur: Cursor, study_uid: str, now: object, due_at: object) -> bool:
        """Make a study that has a row dirty and due at ``due_at`` (its generation grows); ``False`` when
        it has none yet (rejections wait for its instances, which make it due themselves)."""
        if cur.execute(self._q("SELECT 1 FROM studies WHERE study_uid = ?"), (study_uid,)).fetchone() is None:
            return False
        self._touch_study(cur, study_uid, 1, now, due_at)
        return True

    def _park_notes_only(self, cur: Cursor, study_uid: str) -> None:
        """A study whose every row is a rejection note has nothing to write yet: it is not left due (its
        instances make it due when they come)."""
        count = cur.execute(
            self._q("SELECT COUNT(*) FROM instances WHERE study_uid = ?"), (study_uid,)
        ).fetchone()
        if count is None or int(count[0]) > _NOTES_ALONE:
            return
        rows = cur.execute(
            self._q("SELECT record_json FROM instances WHERE study_uid = ?"), (study_uid,)
        ).fetchall()
        if all(rejection_code(InstanceRecord.model_validate_json(row[0])) is not None for row in rows):
            cur.execute(self._q("UPDATE studies SET dirty = false WHERE study_uid = ?"), (study_uid,))

    def _stored_covered(self, cur: Cursor, rules: Sequence[Rejection]) -> list[str]:
        """SOP Instance UIDs of stored instances (not notes) that ``rules`` cover."""
        found: set[str] = set()
        exact = [r for r in rules if r.sop_uid]
        for chunk in _chunks(r.sop_uid for r in exact):
            marks = ", ".join(["?"] * len(chunk))
            rows = cur.execute(
                self._q(f"SELECT record_json FROM instances WHERE sop_uid IN ({marks})"), chunk
            ).fetchall()
            for row in rows:
                record = InstanceRecord.model_validate_json(row[0])
                if covering(record, exact) is not None:
                    found.add(record.sop_uid)
        wide = [r for r in rules if not r.sop_uid]
        for study_uid in sorted({r.study_uid for r in wide}):
            rows = cur.execute(
                self._q("SELECT record_json FROM instances WHERE study_uid = ?"), (study_uid,)
            ).fetchall()
            for row in rows:
                record = InstanceRecord.model_validate_json(row[0])
                if covering(record, wide) is not None:
                    found.add(record.sop_uid)
        return sorted(found)

    def _after_add(
        self,
        cur: Cursor,
        items: Sequence[tuple[InstanceRecord, str, str | None, str]],
        results: list[Added],
        now: object,
        due_at: object,
    ) -> list[Added]:
        """Record the rejections of added notes; say which bytes to remove (module doc)."""
        added = [
            (index, item[0]) for index, (item, result) in enumerate(zip(items, results, strict=True))
            if result.outcome is AddOutcome.ADDED
        ]
        if not added:
            return results
        made = {index: note_rejections(record) for index, record in added if rejection_code(record)}
        for index, rules in made.items():
            record = items[index][0]
            # a note received again with other content (``replace``) says again what it rejects
            self._insert_rules(cur, rules, now)
            for study_uid in sorted({r.study_uid for r in rules} - {record.study_uid}):
                self._touch_known(cur, study_uid, now, due_at)
        for study_uid in sorted({items[index][0].study_uid for index in made}):
            self._park_notes_only(cur, study_uid)
        held = self._rules(cur, {record.study_uid for _, record in added})
        if not held:
            return results
        out = list(results)
        for index, record in added:
            code = rejection_code(record)
            if code is not None:
                release = self._stored_covered(cur, made[index]) if removes_bytes(code) else []
            else:
                code = covering(record, held)
                release = [record.sop_uid] if code is not None and removes_bytes(code) else []
            if release:
                out[index] = dataclasses.replace(
                    out[index], release=tuple(release), release_reason=f"iocm:{code}"
                )
        return out

    def reject(self, rejection: Rejection, *, now: datetime) -> Rejected:
        """Record ``rejection`` (``ingest reject``): a new one makes the study, when it has rows, dirty and
        due at ``now``; one already recorded writes nothing.

        Raises
        ------
        ValueError
            For a code outside :data:`ingest.core.lifecycle.REJECTION_CODES`.
        StoreUnavailableError, StoreError
            When it cannot be committed.
        """
        if rejection.code not in REJECTION_CODES:
            raise ValueError(f"rejection code {rejection.code!r} is not one of {', '.join(REJECTION_CODES)}")
        now_v = self._time(now)
        with self._write("reject") as cur:
            if not self._insert_rules(cur, [rejection], now_v):
                known = cur.execute(
                    self._q("SELECT 1 FROM studies WHERE study_uid = ?"), (rejection.study_uid,)
                ).fetchone()
                return Rejected(new=False, study_known=known is not None)
            known = self._touch_known(cur, rejection.study_uid, now_v, now_v)
            if known:
                self._park_notes_only(cur, rejection.study_uid)
            release = self._stored_covered(cur, [rejection]) if removes_bytes(rejection.code) else []
            return Rejected(new=True, study_known=known, release=tuple(release))

    def replace_instance(
        self,
        record: InstanceRecord,
        *,
        source: str,
        spool_name: str | None,
        digest: str,
        data: bytes | None,
        now: datetime,
        due_at: datetime,
    ) -> Replaced | None:
        """Replace the stored version of ``record.sop_uid`` with this one (``[intake] on_conflict =
        "replace"``), in one transaction: the row takes the new record, digest, source and bytes
        (spool file or in-row ``data``; the old in-row bytes are deleted and returned), and the study
        becomes dirty and due at ``due_at``. A replaced note records what it now rejects.

        Returns
        -------
        Replaced | None
            The old version's digest and where its bytes were; ``None`` when no version of
            ``record.sop_uid`` is stored in ``record.study_uid`` (nothing written).
        """
        now_v, due_v = self._time(now), self._time(due_at)
        with self._write("replace_instance") as cur:
            row = cur.execute(
                self._q("SELECT study_uid, digest, spool_name FROM instances WHERE sop_uid = ?"),
                (record.sop_uid,),
            ).fetchone()
            if row is None or str(row[0]) != record.study_uid:
                return None
            old = cur.execute(
                self._q("SELECT data FROM instance_bytes WHERE sop_uid = ?"), (record.sop_uid,)
            ).fetchone()
            cur.execute(
                self._q(
                    "UPDATE instances SET series_uid = ?, digest = ?, source = ?, spool_name = ?, node = ?, "
                    "record_json = ?, added_at = ?, replaced_at = ?, bytes_removed_at = NULL, "
                    "bytes_removed_reason = NULL WHERE sop_uid = ?"
                ),
                (
                    record.series_uid,
                    digest,
                    source,
                    spool_name,
                    self.node,
                    record.model_dump_json(),
                    now_v,
                    now_v,
                    record.sop_uid,
                ),
            )
            cur.execute(self._q("DELETE FROM instance_bytes WHERE sop_uid = ?"), (record.sop_uid,))
            if data is not None:
                cur.execute(
                    self._q("INSERT INTO instance_bytes (sop_uid, data) VALUES (?, ?)"),
                    (record.sop_uid, data),
                )
            if rejection_code(record) is not None:
                cur.execute(self._q("DELETE FROM rejections WHERE note_uid = ?"), (record.sop_uid,))
                self._insert_rules(cur, note_rejections(record), now_v)
            self._touch_study(cur, record.study_uid, 1, now_v, due_v)
            code = covering(record, self._rules(cur, [record.study_uid]))
            return Replaced(
                study_uid=record.study_uid,
                old_digest=str(row[1]),
                old_spool_name=None if row[2] is None else str(row[2]),
                old_data=None if old is None else bytes(old[0]),
                release_reason=f"iocm:{code}" if code is not None and removes_bytes(code) else "",
            )

    def replaced_counts(self) -> dict[str, int]:
        """Per study: how many of its instances were replaced by a newer version."""
        with self._use("replaced_counts") as cur:
            rows = cur.execute(
                "SELECT study_uid, COUNT(*) FROM instances WHERE replaced_at IS NOT NULL GROUP BY study_uid"
            ).fetchall()
        return {str(row[0]): int(row[1]) for row in rows}
