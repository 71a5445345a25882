"""The one acceptance path: parsed instances already in the spool become committed rows.

``docs/architecture.md`` (The data flow; Contracts, Acceptance, Durability, Identity, When a study is
pushed). Every source (the C-STORE listener, the drop folder, ``ingest replay``) hands its parsed
instances to :class:`Admission`, which:

1. commits their rows in one transaction, each study due at ``now + stable_age_s`` (the state store
   makes the decision of :mod:`ingest.core.admission`);
2. on a **duplicate**, removes the spool copy (the stored one is kept) and counts it;
3. on a **conflict**, quarantines the input with the rule and the detail (when the source gave bytes to
   keep and there is a quarantine) and removes the spool copy;
4. counts accepted and rejected instances (``source`` label: ``dimse``, ``watch``);
5. wakes the relay once when something was added that is due at once (``stable_age_s = 0``); a study
   due later is pushed when the relay next looks (it sleeps until the earliest due time its state store
   holds, at most ``[relay] poll_interval_s``), so a busy listener does not make the relay look for due
   studies, in vain, after every instance.

Who may do what (docs/architecture.md "Study lifecycle"): an IOCM rejection note is applied only when
its sender may send rejections (``reject = true`` on its ``[listener] allowed_calling_aes`` entry; the
drop folder and ``ingest replay`` are the operator's own inputs and always may, like ``ingest reject``)
and every stored study it names is of the note's patient (:func:`ingest.core.lifecycle.note_refusal`);
otherwise it is not stored but quarantined with the reason (``rejection_not_allowed``,
``rejection_patient_mismatch``), counted, and answered like a conflict. A replacement
(``[intake] on_conflict = "replace"``) follows :func:`ingest.core.admission.replace_refusal`. The bytes of
an instance under a Storage Commitment hold are never removed by a rejection or a replacement before the
hold ends: a rejection leaves them to retention, and a replacement of a held instance whose old bytes the
quarantine cannot keep is refused (``replace_held_not_kept``).

When the rows cannot be committed, every spool copy of the batch is removed and the store's error is
raised: nothing half-done remains (``docs/architecture.md``, Durability), and the source answers with a
failure (0xA700, the file waits for the next rescan...). Each source translates the per-item
:class:`Admitted` outcomes into its own answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Final

from ingest.adapters.spool import Quarantine, Spool
from ingest.clock import utcnow
from ingest.config import CallingAE
from ingest.core.admission import CONFLICT_OTHER_CONTENT
from ingest.core.lifecycle import (
    KEY_OBJECT_SELECTION,
    REFUSED_NOT_ALLOWED,
    REFUSED_PATIENT_MISMATCH,
    note_refusal,
    note_rejections,
    rejection_code,
)
from ingest.core.records import InstanceRecord, RecordRow
from ingest.intake.retention import DiskBudget, release_bytes
from ingest.logs import printable
from ingest.metrics import Metrics
from ingest.ports import HELD, Added, Replaced, StateStore, Verdict

_AT_ONCE: Final = timedelta(0)

__all__ = ["Admission", "Admitted", "Candidate", "granted", "utcnow"]

LOGGER = logging.getLogger(__name__)

#: The quarantine reason of a conflicting instance (``docs/reliability.md``).
_CONFLICT = "conflict"
#: The quarantine reason of a stored version replaced by a newer one (``[intake] on_conflict``).
_REPLACED = "replaced"
#: The rule of a refused replacement of a held instance whose old bytes the quarantine could not keep.
REPLACE_HELD_NOT_KEPT: Final = "replace_held_not_kept"
#: The ``source`` prefix of instances received over the network (``dimse:<calling AE>``); every other
#: source (``watch``, ``file:<label>``) is an input the operator controls.
_NETWORK: Final = "dimse:"
_WHY: Final = {
    REFUSED_NOT_ALLOWED: "its sender may not send rejections ([listener] allowed_calling_aes reject)",
    REFUSED_PATIENT_MISMATCH: "a study it names belongs to another patient",
}


def granted(entries: Iterable[CallingAE], flag: str) -> frozenset[str]:
    """The AE titles whose every ``[listener] allowed_calling_aes`` entry sets ``flag`` (``reject`` or
    ``replace``)."""
    by_ae: dict[str, bool] = {}
    for entry in entries:
        by_ae[entry.ae] = by_ae.get(entry.ae, True) and bool(getattr(entry, flag))
    return frozenset(ae for ae, ok in by_ae.items() if ok)


@dataclass(frozen=True)
class Candidate:
    """One parsed instance to admit.

    Attributes
    ----------
    record, digest:
        Its header record (or the :class:`~ingest.core.records.RecordRow` a parsing process made of it:
        stored as it is, read as a whole record only for a rejection note or a conflict) and content
        digest (``ingest.adapters.dicomfile``).
    source:
        Where it came from, as its row records it (``dimse:<AE>``, ``watch``, ``file:<label>``).
    spool_name:
        Its spool file (written and synced by the source), or ``None`` when it was not spooled.
    body:
        What the quarantine keeps when it conflicts (the received bytes, or a file), or ``None``.
    origin:
        The quarantine side file's ``source`` (a drop-folder path), if any.
    data:
        Its Part 10 bytes to keep in the state store, committed with its row (``spool_name`` ``None``):
        one durable write for a small instance (``[spool] inline_max_bytes``); ``None`` otherwise.
    """

    record: InstanceRecord | RecordRow
    digest: str
    source: str
    spool_name: str | None = None
    body: bytes | Path | None = None
    origin: str | None = None
    data: bytes | None = None

    @cached_property
    def full(self) -> InstanceRecord:
        """The whole header record (validated from the row's JSON when the candidate came as a row)."""
        return self.record.record() if isinstance(self.record, RecordRow) else self.record

    @property
    def may_be_note(self) -> bool:
        """Whether it may be a rejection note (a Key Object Selection Document; the title decides)."""
        return self.record.sop_class_uid == KEY_OBJECT_SELECTION

    def note_code(self) -> str | None:
        """Its rejection code when it is a rejection note (:func:`rejection_code`), else ``None``."""
        return rejection_code(self.full) if self.may_be_note else None


@dataclass(frozen=True)
class Admitted:
    """The outcome of one :class:`Candidate`.

    Attributes
    ----------
    outcome:
        ``ADDED``, ``DUPLICATE`` or ``CONFLICT``.
    study_uid:
        The instance's Study Instance UID.
    now:
        When its row was committed (or refused).
    rule:
        For a conflict: ``other_content`` / ``other_study`` (:mod:`ingest.core.admission`).
    detail:
        For a conflict: the message recorded with it (no patient data).
    quarantined:
        For a conflict: the quarantine name (see :meth:`Quarantine.holds` for whether its bytes were
        kept); ``None`` when nothing was quarantined (no body, no quarantine, or the quarantine failed).
    """

    outcome: Verdict
    study_uid: str
    now: datetime
    rule: str = ""
    detail: str = ""
    quarantined: str | None = None


class Admission:
    """The acceptance of one source (module doc).

    Thread-safe as far as its parts are (the state store, spool and quarantine are).

    Parameters
    ----------
    store:
        The state store rows are committed to.
    spool:
        Where candidates' ``spool_name`` files are (removed on duplicate, conflict or failure), if any.
    quarantine:
        Where conflicting inputs go, if anywhere.
    metrics:
        Counters to increment, if any.
    stable_age_s:
        ``[relay] stable_age_s``: a study is due this long after its latest instance.
    wake:
        Called once after a batch added something due at once (``stable_age_s`` 0; must be safe to call
        from the calling thread). ``None``: nobody to wake (replay and a one-shot sync drain what they
        touched at the end).
    clock:
        Wall-clock "now" for rows, due times and side files.
    label:
        The ``source`` label of the accepted-instances counter (``dimse``, ``watch``).
    budget:
        The disk budget that counts the in-row bytes of added instances, if any.
    on_conflict:
        ``[intake] on_conflict``: a stored SOP Instance UID received with other content is refused and
        quarantined (``quarantine``), or replaces the stored version (``replace``: the row takes the new
        version, the old bytes go to the quarantine with a side file naming what replaced them, the
        study becomes due, and the source answers success).
    remove_spooled:
        Whether the admission removes the spool copy of a duplicate, a conflict or a failed batch (the
        sources: what they wrote for a refused instance is theirs to drop). ``False`` for the start-up
        re-admission of spool files (:mod:`ingest.intake.sweep`): those files are acknowledged data, and
        the caller removes one only once its bytes are known to be kept elsewhere.
        study becomes due, and the source answers success), within :func:`replace_refusal`'s rules.
    senders:
        ``[listener] allowed_calling_aes``: which calling AEs may send rejection notes (``reject``) and
        replace others' instances (``replace``). Inputs not received over the network always may.
    """

    def __init__(
        self,
        store: StateStore,
        *,
        spool: Spool | None,
        quarantine: Quarantine | None,
        metrics: Metrics | None,
        stable_age_s: float,
        wake: Callable[[], None] | None = None,
        clock: Callable[[], datetime] = utcnow,
        label: str,
        budget: DiskBudget | None = None,
        on_conflict: str = "quarantine",
        remove_spooled: bool = True,
        senders: Iterable[CallingAE] = (),
    ) -> None:
        entries = tuple(senders)
        self.rejecters = granted(entries, "reject")
        self.replacers = granted(entries, "replace")
        self.budget = budget
        self.remove_spooled = remove_spooled
        self.on_conflict = on_conflict
        self.store = store
        self.spool = spool
        self.quarantine = quarantine
        self.metrics = metrics
        self.stable_age = timedelta(seconds=stable_age_s)
        self.wake = wake
        self.clock = clock
        self.label = label

    def admit_one(self, item: Candidate) -> Admitted:
        """Admit one instance (:meth:`~ingest.ports.StateStore.add_instance`); see :meth:`admit`."""
        now = self.clock()
        refused = self._screen([item], now)
        if refused:
            return refused[0]
        try:
            added = self.store.add_instance(
                item.record,
                source=item.source,
                spool_name=item.spool_name,
                digest=item.digest,
                now=now,
                due_at=self.due_at(now),
                data=item.data,
            )
        except BaseException:
            self._remove_spooled([item])
            raise
        return self.settle([item], [added], now)[0]

    def admit(self, items: Sequence[Candidate]) -> list[Admitted]:
        """Admit a batch in one transaction; one :class:`Admitted` per item, in order.

        Raises
        ------
        StoreError
            When the rows cannot be committed (every spool copy of the batch is removed first).
        """
        if not items:
            return []
        now = self.clock()
        try:
            refused = self._screen(items, now)
        except BaseException:
            self._remove_spooled(items)
            raise
        rest = [c for i, c in enumerate(items) if i not in refused]
        settled: list[Admitted] = []
        if rest:
            try:
                rows, inline = self.rows(rest)
                results = self.store.add_instances(rows, now=now, due_at=self.due_at(now), inline=inline)
            except BaseException:
                self._remove_spooled(rest)
                raise
            settled = self.settle(rest, results, now)
        done = iter(settled)
        return [refused[i] if i in refused else next(done) for i in range(len(items))]

    @staticmethod
    def rows(
        items: Sequence[Candidate],
    ) -> tuple[list[tuple[RecordRow, str, str | None, str]], list[bytes | None] | None]:
        """The :meth:`~ingest.ports.StateStore.add_instances` rows and ``inline`` bytes of ``items``, their
        records made rows here (strings and bytes: what a writer process is sent)."""
        rows = [(RecordRow.of(c.record), c.source, c.spool_name, c.digest) for c in items]
        return rows, [c.data for c in items] if any(c.data is not None for c in items) else None

    @staticmethod
    def settles_quietly(items: Sequence[Candidate], results: Sequence[Added]) -> bool:
        """Whether :meth:`settle` of these touches neither a disk nor the store: every instance added with
        no bytes to release, or an identical duplicate with no spool copy, and no rejection note."""
        return all(
            item.note_code() is None and (
                (added.outcome is Verdict.ADDED and not added.release)
                or (added.outcome is Verdict.DUPLICATE and item.spool_name is None)
            )
            for item, added in zip(items, results, strict=True)
        )

    def may_reject(self, source: str) -> bool:
        """Whether a rejection note from ``source`` may be applied (module doc)."""
        return not source.startswith(_NETWORK) or source.removeprefix(_NETWORK) in self.rejecters

    def may_replace(self, source: str) -> bool:
        """Whether ``source`` may replace what others sent, and move an instance to another patient."""
        return not source.startswith(_NETWORK) or source.removeprefix(_NETWORK) in self.replacers

    def _screen(self, items: Sequence[Candidate], now: datetime) -> dict[int, Admitted]:
        """The rejection notes among ``items`` that may not be applied (:func:`note_refusal`), by index,
        each quarantined and refused; the others go on to the state store.

        A note naming a study that arrives later is checked again per instance: a rejection covers only
        instances of the note's patient (:attr:`ingest.core.lifecycle.Rejection.patient`).
        """
        refused: dict[int, Admitted] = {}
        for index, item in enumerate(items):
            code = item.note_code()
            if code is None:
                continue
            allowed = self.may_reject(item.source)
            named = sorted({r.study_uid for r in note_rejections(item.full)})
            stored = self.store.study_patients(named) if allowed and named else {}
            why = note_refusal(item.full, sender_may_reject=allowed, stored_patients=stored)
            if why is not None:
                refused[index] = self._refuse_note(item, code, why, now)
        return refused

    def _refuse_note(self, item: Candidate, code: str, why: str, now: datetime) -> Admitted:
        rec = item.full
        detail = (
            f"rejection note {rec.sop_uid} ({code}) of study {rec.study_uid} is not applied: {_WHY[why]} "
            f"(source={printable(item.origin or item.source)})"
        )
        if self.metrics is not None:
            self.metrics.instances_rejected.labels(reason=why).inc()
        name: str | None = None
        if item.body is not None and self.quarantine is not None:
            try:
                name = self.quarantine.put(item.body, why, why, detail, self.clock(), source=item.origin)
            except Exception as exc:
                LOGGER.warning("could not quarantine a refused rejection note (%s): %s", why, exc)
        LOGGER.warning("rejection note refused%s: %s", " and quarantined" if name is not None else "", detail)
        self._remove_spooled([item])
        return Admitted(Verdict.CONFLICT, rec.study_uid, now, why, detail, name)

    def due_at(self, now: datetime) -> datetime:
        """When a study that got an instance at ``now`` becomes due (``[relay] stable_age_s`` later)."""
        return now + self.stable_age

    # -- outcomes ------------------------------------------------------------------------------------

    def settle(self, items: Sequence[Candidate], results: Sequence[Added], now: datetime) -> list[Admitted]:
        """What the store's ``results`` for ``items`` (none of them a refused note) come to: metrics, the
        disk budget, duplicates' spool copies removed, conflicts quarantined or replaced, an IOCM
        rejection's bytes released, the relay woken. Each :class:`Admitted` in the order of ``items``."""
        out: list[Admitted] = []
        added_any = False
        release: dict[str, list[str]] = {}  # bytes_removed_reason -> SOP Instance UIDs (IOCM)
        for item, added in zip(items, results, strict=True):
            if added.outcome is Verdict.ADDED:
                added_any = True
                if item.data is not None and self.budget is not None:
                    self.budget.add_in_row(len(item.data))
                if self.metrics is not None:
                    self.metrics.instances_accepted.labels(source=self.label).inc()
                    code = item.note_code()
                    if code is not None:
                        self.metrics.rejections.labels(code=code).inc()
                if added.release:
                    release.setdefault(added.release_reason, []).extend(added.release)
                out.append(Admitted(Verdict.ADDED, added.study_uid, now))
            elif added.outcome is Verdict.DUPLICATE:
                self._remove_spooled([item])
                if self.metrics is not None:
                    self.metrics.instances_duplicate.inc()
                LOGGER.debug("identical duplicate of %s acknowledged", item.record.sop_uid)
                out.append(Admitted(Verdict.DUPLICATE, added.study_uid, now))
            elif self.on_conflict == "replace" and added.detail == CONFLICT_OTHER_CONTENT:
                replaced = self._replace(item, added, now)
                added_any = added_any or replaced.outcome is Verdict.ADDED
                out.append(replaced)
            else:
                out.append(self._conflict(item, added, now))
        for reason, sop_uids in sorted(release.items()):
            self._release(sop_uids, reason, now)
        if added_any and self.wake is not None and self.stable_age <= _AT_ONCE:
            self.wake()
        return out

    def _release(self, sop_uids: Sequence[str], reason: str, now: datetime) -> None:
        """Remove the bytes an IOCM rejection says to remove (their rows record it first); a failure is
        logged and the bytes stay (the rejection itself is durable: the study is written without them).
        Bytes under a commitment hold stay until it ends: retention releases them then, with the
        rejection's reason (``ingest.intake.retention.Retention``)."""
        if self.spool is None:  # replay: the inputs are not ingest's to remove
            LOGGER.info("%d rejected instances (%s): bytes not in a spool of this run", len(sop_uids), reason)
            return
        wanted = sorted(set(sop_uids))
        try:
            released = release_bytes(
                self.store, self.spool, wanted, reason=reason, now=now,
                budget=self.budget, metrics=self.metrics, respect_holds=True,
            )
            if released < len(wanted):
                LOGGER.info("%d rejected instances (%s): bytes held by a commitment until it ends, or "
                            "already gone", len(wanted) - released, reason)
        except Exception as exc:
            LOGGER.warning("could not remove the bytes of %d rejected instances (%s): %s",
                           len(sop_uids), reason, exc)

    def _replace(self, item: Candidate, added: Added, now: datetime) -> Admitted:
        """``[intake] on_conflict = "replace"``: the new version takes the row, when
        :func:`~ingest.core.admission.replace_refusal` allows it; the old bytes go to the quarantine with a
        side file saying what replaced them (best effort, but required for bytes under a commitment hold),
        then leave the spool."""
        rec = item.full
        trusted = self.may_replace(item.source)
        name: str | None = None
        try:
            old = self.store.replace_instance(
                rec, source=item.source, spool_name=item.spool_name, digest=item.digest, data=item.data,
                now=now, due_at=self.due_at(now), trusted=trusted, keep_held=False,
            )
            if old is not None and old.refused == HELD:
                # the old bytes are under a commitment hold: kept in the quarantine first, or not replaced
                name = self._keep_old(item, old, "replaced_by", now)
                if name is None or self.quarantine is None or not self.quarantine.holds(name):
                    return self._conflict(item, added, now, rule=REPLACE_HELD_NOT_KEPT)
                old = self.store.replace_instance(
                    rec, source=item.source, spool_name=item.spool_name, digest=item.digest,
                    data=item.data, now=now, due_at=self.due_at(now), trusted=trusted, keep_held=True,
                )
        except BaseException:
            self._remove_spooled([item])
            raise
        if old is None:  # the stored version left its study meanwhile: an ordinary conflict
            return self._conflict(item, added, now)
        if old.refused:
            return self._conflict(item, added, now, rule=old.refused)
        detail = self._replaced_detail(item, old.old_digest)
        if old.patient_changed:  # allowed from a trusted sender only (the IDs themselves only at DEBUG)
            LOGGER.warning("replaced SOP Instance UID %s of study %s with a version of another patient "
                           "(source=%s)", rec.sop_uid, rec.study_uid, printable(item.origin or item.source))
        if self.metrics is not None:
            self.metrics.instances_accepted.labels(source=self.label).inc()
            self.metrics.instances_replaced.inc()
        if self.budget is not None:
            self.budget.add_in_row((len(item.data) if item.data is not None else 0)
                                   - (len(old.old_data) if old.old_data is not None else 0))
        if name is None:
            name = self._keep_old(item, old, "replaced_by", now)
        stale = old.old_spool_name
        if stale is not None and stale != item.spool_name and self.spool is not None:
            try:
                self.spool.remove(stale)
            except Exception as exc:  # no row names it any more: the start-up sweep quarantines it
                LOGGER.warning("could not remove spool file %s: %s", stale, exc)
        LOGGER.info("replaced%s: %s", " (old version quarantined)" if name is not None else "", detail)
        if old.release_reason:  # the instance stays rejected: its new bytes go too
            self._release([rec.sop_uid], old.release_reason, now)
        return Admitted(Verdict.ADDED, added.study_uid, now, _REPLACED, detail, name)

    def _replaced_detail(self, item: Candidate, old_digest: str) -> str:
        rec = item.record  # (its UIDs: a row's columns do)
        return (
            f"SOP Instance UID {rec.sop_uid} of study {rec.study_uid}: this version ({old_digest}) was "
            f"replaced by {item.digest} (source={printable(item.origin or item.source)})"
        )

    def _keep_old(self, item: Candidate, old: Replaced, rule: str, now: datetime) -> str | None:
        """Put the replaced version's bytes in the quarantine (best effort); its name, or ``None``."""
        body: bytes | Path | None = old.old_data
        if body is None and old.old_spool_name is not None and self.spool is not None:
            body = self.spool.path(old.old_spool_name)
        if body is None or self.quarantine is None:
            return None
        try:
            return self.quarantine.put(
                body, _REPLACED, rule, self._replaced_detail(item, old.old_digest), self.clock(),
                source=item.origin,
            )
        except Exception as exc:  # the new version is kept either way (unless the old bytes are held)
            LOGGER.warning("could not quarantine a replaced instance: %s", exc)
            return None

    def _conflict(self, item: Candidate, added: Added, now: datetime, *, rule: str = "") -> Admitted:
        """Quarantine a conflicting input (best effort), then remove its spool copy; ``rule`` says why a
        replacement was refused."""
        stored = added.detail or _CONFLICT
        rule = rule or stored
        rec = item.record  # (its UIDs: a row's columns do)
        detail = (
            f"SOP Instance UID {rec.sop_uid} of study {rec.study_uid} is already stored with "
            f"{stored.replace('_', ' ')}; the first is kept"
            + (f" (the replacement is refused: {rule.replace('_', ' ')})" if rule != stored else "")
            + f" (source={printable(item.origin or item.source)})"
        )
        if self.metrics is not None:
            self.metrics.instances_rejected.labels(reason=_CONFLICT).inc()
        name: str | None = None
        if item.body is not None and self.quarantine is not None:
            try:
                name = self.quarantine.put(
                    item.body, _CONFLICT, rule, detail, self.clock(), source=item.origin
                )
            except Exception as exc:  # the source still answers why; the quarantine is best effort
                LOGGER.warning("could not quarantine a conflicting instance (%s): %s", rule, exc)
        LOGGER.warning("conflicting duplicate%s: %s", " quarantined" if name is not None else "", detail)
        self._remove_spooled([item])
        return Admitted(Verdict.CONFLICT, added.study_uid, now, rule, detail, name)

    def _remove_spooled(self, items: Sequence[Candidate]) -> None:
        """Remove the spool copies of ``items`` (a failure is logged: the start-up sweep finds the file,
        which no row names, and settles it again)."""
        if self.spool is None or not self.remove_spooled:
            return
        for item in items:
            if item.spool_name is None:
                continue
            try:
                self.spool.remove(item.spool_name)
            except Exception as exc:
                LOGGER.warning("could not remove spool file %s: %s", item.spool_name, exc)
