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
- :meth:`reject` is ``ingest reject``'s way in (:meth:`unreject` its undo, :meth:`rejection_rows` its
  list); :meth:`replace_instance` is ``[intake] on_conflict = "replace"``'s;
- a rejection a note made covers only instances of the note's patient: :meth:`rejections` reads the
  note's row to give each its :attr:`~ingest.core.lifecycle.Rejection.patient` (no extra column);
- bytes a rejection removes but a Storage Commitment hold kept are listed by :meth:`held_rejected` once
  the hold ends (retention releases them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from datetime import datetime

from ingest.adapters.state.sql import Cursor, SQLStateStore, in_chunks
from ingest.core.admission import replace_refusal
from ingest.core.lifecycle import (
    KEY_OBJECT_SELECTION,
    REJECTION_CODES,
    Rejection,
    covering,
    mark,
    note_rejections,
    patient_key,
    rejection_code,
    removes_bytes,
    view,
)
from ingest.core.records import InstanceRecord, RecordRow
from ingest.ports import HELD, Added, RejectionRecorded, RejectionRow, Replaced, Verdict

__all__ = ["LifecycleStore"]

# A study with more rows than this is taken to hold more than rejection notes (not read to check).
_NOTES_ALONE = 32
_COLUMNS = "study_uid, series_uid, sop_uid, code, note_uid"
_R_COLUMNS = "r.study_uid, r.series_uid, r.sop_uid, r.code, r.note_uid"
#: What a rejection ``ingest reject`` made says its source is (``ingest rejections``).
_CLI_SOURCE = "ingest reject"


def _chunks(values: Iterable[str]) -> Iterable[list[str]]:
    return (chunk for chunk, _marks in in_chunks(sorted(set(values))))


class LifecycleStore(SQLStateStore):
    """:class:`ingest.ports.LifecycleState` for any SQL dialect."""

    # -- reading ----------------------------------------------------------------------------------------

    def _rules(self, cur: Cursor, study_uids: Iterable[str]) -> list[Rejection]:
        return sorted(rule for rule, _, _ in self._rule_rows(cur, study_uids))

    def _rule_rows(
        self, cur: Cursor, study_uids: Iterable[str] | None
    ) -> list[tuple[Rejection, object, str]]:
        """(rejection with its note's patient, added_at, source) of ``study_uids`` (``None``: all)."""
        query = (
            f"SELECT {_R_COLUMNS}, r.added_at, n.record_json, n.source FROM rejections r "
            "LEFT JOIN instances n ON n.sop_uid = r.note_uid AND r.note_uid <> '' "
        )
        chunks: Iterable[list[str]] = [[]] if study_uids is None else _chunks(study_uids)
        patients: dict[str, str] = {}
        out: list[tuple[Rejection, object, str]] = []
        for chunk in chunks:
            marks = ", ".join(["?"] * len(chunk))
            where = f"WHERE r.study_uid IN ({marks})" if study_uids is not None else ""
            for row in cur.execute(self._q(query + where), chunk).fetchall():
                note_uid = str(row[4])
                patient = ""
                if note_uid and row[6] is not None:
                    if note_uid not in patients:
                        patients[note_uid] = patient_key(InstanceRecord.from_json(row[6]))
                    patient = patients[note_uid]
                rule = Rejection(str(row[0]), str(row[1]), str(row[2]), str(row[3]), note_uid, patient)
                source = _CLI_SOURCE if not note_uid else str(row[7]) if row[7] is not None else "note"
                out.append((rule, row[5], source))
        return out

    def rejection_rows(self, study_uid: str | None = None) -> list[RejectionRow]:
        """Every recorded rejection (of ``study_uid`` only, when given), oldest first, with who made it."""
        with self._use("rejection_rows") as cur:
            rows = self._rule_rows(cur, None if study_uid is None else [study_uid])
        listed = [RejectionRow(rule, self._from_time(added), source) for rule, added, source in rows]
        return sorted(listed, key=lambda r: (r.added_at is None, r.added_at or 0, r.rejection))

    def study_patients(self, study_uids: Sequence[str]) -> dict[str, set[str]]:
        """Per stored study of ``study_uids``: the patient keys of its instances (notes excluded)."""
        out: dict[str, set[str]] = {}
        with self._use("study_patients") as cur:
            for chunk in _chunks(study_uids):
                marks = ", ".join(["?"] * len(chunk))
                rows = cur.execute(
                    self._q(f"SELECT study_uid, record_json FROM instances WHERE study_uid IN ({marks})"),
                    chunk,
                ).fetchall()
                for study_uid, record_json in rows:
                    record = InstanceRecord.from_json(record_json)
                    if rejection_code(record) is None:
                        out.setdefault(str(study_uid), set()).add(patient_key(record))
        return out

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
        if all(rejection_code(InstanceRecord.from_json(row[0])) is not None for row in rows):
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
                record = InstanceRecord.from_json(row[0])
                if covering(record, exact) is not None:
                    found.add(record.sop_uid)
        wide = [r for r in rules if not r.sop_uid]
        for study_uid in sorted({r.study_uid for r in wide}):
            rows = cur.execute(
                self._q("SELECT record_json FROM instances WHERE study_uid = ?"), (study_uid,)
            ).fetchall()
            for row in rows:
                record = InstanceRecord.from_json(row[0])
                if covering(record, wide) is not None:
                    found.add(record.sop_uid)
        return sorted(found)

    def _after_add(
        self,
        cur: Cursor,
        items: Sequence[tuple[RecordRow, str, str | None, str]],
        results: list[Added],
        now: object,
        due_at: object,
    ) -> list[Added]:
        """Record the rejections of added notes; say which bytes to remove (module doc).

        Only rejection notes, and instances a recorded rejection may cover by their UIDs, are read as
        whole records; the other rows are judged by their columns.
        """
        added = [
            (index, item[0]) for index, (item, result) in enumerate(zip(items, results, strict=True))
            if result.outcome is Verdict.ADDED
        ]
        if not added:
            return results
        notes: dict[int, tuple[str, tuple[Rejection, ...]]] = {}  # index -> a note's code, what it rejects
        for index, row in added:
            if row.sop_class_uid == KEY_OBJECT_SELECTION:  # the only SOP class a note can be
                record = row.record()
                if (note_code := rejection_code(record)) is not None:
                    notes[index] = note_code, note_rejections(record)
        for index, (_, rules) in notes.items():
            row = items[index][0]
            # a note received again with other content (``replace``) says again what it rejects
            self._insert_rules(cur, rules, now)
            for study_uid in sorted({r.study_uid for r in rules} - {row.study_uid}):
                self._touch_known(cur, study_uid, now, due_at)
        for study_uid in sorted({items[index][0].study_uid for index in notes}):
            self._park_notes_only(cur, study_uid)
        held = self._rules(cur, {row.study_uid for _, row in added})
        if not held:
            return results
        out = list(results)
        code: str | None
        for index, row in added:
            if index in notes:
                code, rules = notes[index]
                release = self._stored_covered(cur, rules) if removes_bytes(code) else []
            elif any(rule.may_cover(row.study_uid, row.series_uid, row.sop_uid) for rule in held):
                record = row.record()
                code = covering(record, held)
                release = [record.sop_uid] if code is not None and removes_bytes(code) else []
            else:
                code, release = None, []
            if release:
                out[index] = dataclasses.replace(
                    out[index], release=tuple(release), release_reason=f"iocm:{code}"
                )
        return out

    def reject(self, rejection: Rejection, *, now: datetime) -> RejectionRecorded:
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
                return RejectionRecorded(new=False, study_known=known is not None)
            known = self._touch_known(cur, rejection.study_uid, now_v, now_v)
            if known:
                self._park_notes_only(cur, rejection.study_uid)
            release = self._stored_covered(cur, [rejection]) if removes_bytes(rejection.code) else []
            return RejectionRecorded(new=True, study_known=known, release=tuple(release))

    def unreject(self, rejection: Rejection, *, now: datetime) -> bool:
        """Remove a rejection ``ingest reject`` recorded (``note_uid`` ``""``); the study, when it has rows,
        becomes dirty and due at ``now`` so the instances it kept out come back (bytes already removed
        stay removed). ``False`` when no such rejection is recorded (nothing written)."""
        now_v = self._time(now)
        with self._write("unreject") as cur:
            cur.execute(
                self._q(
                    "DELETE FROM rejections WHERE study_uid = ? AND series_uid = ? AND sop_uid = ? "
                    "AND code = ? AND note_uid = ''"
                ),
                (rejection.study_uid, rejection.series_uid, rejection.sop_uid, rejection.code),
            )
            if cur.rowcount <= 0:
                return False
            self._touch_known(cur, rejection.study_uid, now_v, now_v)
            return True

    def held_rejected(self, *, now: datetime, limit: int) -> dict[str, list[str]]:
        """Instances a rejection says to remove the bytes of (113037 / 113039) whose bytes are still held
        and whose commitment hold (if any) ended at or before ``now``: ``iocm:<code>`` -> SOP Instance
        UIDs, at most ``limit`` in all (retention releases them)."""
        now_v = self._time(now)
        out: dict[str, list[str]] = {}
        found = 0
        with self._use("held_rejected") as cur:
            codes = [c for c in REJECTION_CODES if removes_bytes(c)]
            marks = ", ".join(["?"] * len(codes))
            studies = [
                str(r[0])
                for r in cur.execute(
                    self._q(f"SELECT DISTINCT study_uid FROM rejections WHERE code IN ({marks})"), codes
                ).fetchall()
            ]
            for study_uid in sorted(studies):
                rules = self._rules(cur, [study_uid])
                rows = cur.execute(
                    self._q(
                        "SELECT i.record_json FROM instances i WHERE i.study_uid = ? "
                        "AND i.bytes_removed_at IS NULL AND (i.hold_until IS NULL OR i.hold_until <= ?) "
                        "AND (i.spool_name IS NOT NULL OR EXISTS "
                        "(SELECT 1 FROM instance_bytes b WHERE b.sop_uid = i.sop_uid))"
                    ),
                    (study_uid, now_v),
                ).fetchall()
                for row in rows:
                    record = InstanceRecord.from_json(row[0])
                    code = covering(record, rules)
                    if code is not None and removes_bytes(code) and found < limit:
                        out.setdefault(f"iocm:{code}", []).append(record.sop_uid)
                        found += 1
                if found >= limit:
                    break
        return out

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
        trusted: bool = True,
        keep_held: bool = True,
    ) -> Replaced | None:
        """Replace the stored version of ``record.sop_uid`` with this one (``[intake] on_conflict =
        "replace"``), in one transaction: the row takes the new record, digest, source and bytes
        (spool file or in-row ``data``; the old in-row bytes are deleted and returned), and the study
        becomes dirty and due at ``due_at``. A replaced note records what it now rejects.

        Nothing is written, and :attr:`Replaced.refused` says why, when
        :func:`ingest.core.admission.replace_refusal` refuses it (``trusted``: the sender may replace what
        others sent and change the patient), or when the old bytes are under a commitment hold at ``now``
        and the caller has not kept them (``keep_held`` false: :data:`ingest.ports.HELD`; the old bytes
        are returned, not deleted).

        Returns
        -------
        Replaced | None
            The old version's digest and where its bytes were; ``None`` when no version of
            ``record.sop_uid`` is stored in ``record.study_uid`` (nothing written).
        """
        now_v, due_v = self._time(now), self._time(due_at)
        with self._write("replace_instance") as cur:
            row = cur.execute(
                self._q(
                    "SELECT study_uid, digest, spool_name, source, record_json, CASE WHEN bytes_removed_at "
                    "IS NULL AND hold_until IS NOT NULL AND hold_until > ? THEN 1 ELSE 0 END "
                    "FROM instances WHERE sop_uid = ?"
                ),
                (now_v, record.sop_uid),
            ).fetchone()
            if row is None or str(row[0]) != record.study_uid:
                return None
            old = cur.execute(
                self._q("SELECT data FROM instance_bytes WHERE sop_uid = ?"), (record.sop_uid,)
            ).fetchone()
            old_patient = patient_key(InstanceRecord.from_json(row[4]))
            refused = replace_refusal(
                stored_source=str(row[3]), stored_patient=old_patient, source=source,
                patient=patient_key(record), trusted=trusted,
            )
            if refused is None and int(row[5]) and not keep_held:
                refused = HELD
            if refused is not None:
                return Replaced(
                    study_uid=record.study_uid, old_digest=str(row[1]),
                    old_spool_name=None if row[2] is None else str(row[2]),
                    old_data=None if old is None else bytes(old[0]), refused=refused,
                )
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
                patient_changed=old_patient != patient_key(record),
            )

    def replaced_counts(self) -> dict[str, int]:
        """Per study: how many of its instances were replaced by a newer version."""
        with self._use("replaced_counts") as cur:
            rows = cur.execute(
                "SELECT study_uid, COUNT(*) FROM instances WHERE replaced_at IS NOT NULL GROUP BY study_uid"
            ).fetchall()
        return {str(row[0]): int(row[1]) for row in rows}
