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
5. wakes the relay once when something was added.

When the rows cannot be committed, every spool copy of the batch is removed and the store's error is
raised: nothing half-done remains (``docs/architecture.md``, Durability), and the source answers with a
failure (0xA700, the file waits for the next rescan...). Each source translates the per-item
:class:`Admitted` outcomes into its own answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ingest.adapters.spool import Quarantine, Spool
from ingest.core.admission import CONFLICT_OTHER_CONTENT
from ingest.core.lifecycle import rejection_code
from ingest.core.records import InstanceRecord
from ingest.intake.retention import DiskBudget, release_bytes
from ingest.metrics import Metrics
from ingest.ports import Added, AddOutcome, StateStore

__all__ = ["Admission", "Admitted", "Candidate", "utcnow"]

LOGGER = logging.getLogger(__name__)

#: The quarantine reason of a conflicting instance (``docs/reliability.md``).
_CONFLICT = "conflict"
#: The quarantine reason of a stored version replaced by a newer one (``[intake] on_conflict``).
_REPLACED = "replaced"


def utcnow() -> datetime:
    """The wall clock, timezone-aware UTC (the default clock of the sources)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class Candidate:
    """One parsed instance to admit.

    Attributes
    ----------
    record, digest:
        Its header record and content digest (``ingest.adapters.dicomfile``).
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

    record: InstanceRecord
    digest: str
    source: str
    spool_name: str | None = None
    body: bytes | Path | None = None
    origin: str | None = None
    data: bytes | None = None


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

    outcome: AddOutcome
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
        Called once after a batch added something (must be safe to call from the calling thread).
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
    """

    def __init__(
        self,
        store: StateStore,
        *,
        spool: Spool | None,
        quarantine: Quarantine | None,
        metrics: Metrics | None,
        stable_age_s: float,
        wake: Callable[[], None],
        clock: Callable[[], datetime] = utcnow,
        label: str,
        budget: DiskBudget | None = None,
        on_conflict: str = "quarantine",
        remove_spooled: bool = True,
    ) -> None:
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
        return self._settle([item], [added], now)[0]

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
            results = self.store.add_instances(
                [(c.record, c.source, c.spool_name, c.digest) for c in items],
                now=now,
                due_at=self.due_at(now),
                inline=[c.data for c in items] if any(c.data is not None for c in items) else None,
            )
        except BaseException:
            self._remove_spooled(items)
            raise
        return self._settle(items, results, now)

    def due_at(self, now: datetime) -> datetime:
        """When a study that got an instance at ``now`` becomes due (``[relay] stable_age_s`` later)."""
        return now + self.stable_age

    # -- outcomes ------------------------------------------------------------------------------------

    def _settle(self, items: Sequence[Candidate], results: Sequence[Added], now: datetime) -> list[Admitted]:
        out: list[Admitted] = []
        added_any = False
        release: dict[str, list[str]] = {}  # bytes_removed_reason -> SOP Instance UIDs (IOCM)
        for item, added in zip(items, results, strict=True):
            if added.outcome is AddOutcome.ADDED:
                added_any = True
                if item.data is not None and self.budget is not None:
                    self.budget.add_in_row(len(item.data))
                if self.metrics is not None:
                    self.metrics.instances_accepted.labels(source=self.label).inc()
                    code = rejection_code(item.record)
                    if code is not None:
                        self.metrics.rejections.labels(code=code).inc()
                if added.release:
                    release.setdefault(added.release_reason, []).extend(added.release)
                out.append(Admitted(AddOutcome.ADDED, added.study_uid, now))
            elif added.outcome is AddOutcome.DUPLICATE:
                self._remove_spooled([item])
                if self.metrics is not None:
                    self.metrics.instances_duplicate.inc()
                LOGGER.debug("identical duplicate of %s acknowledged", item.record.sop_uid)
                out.append(Admitted(AddOutcome.DUPLICATE, added.study_uid, now))
            elif self.on_conflict == "replace" and added.detail == CONFLICT_OTHER_CONTENT:
                replaced = self._replace(item, added, now)
                added_any = added_any or replaced.outcome is AddOutcome.ADDED
                out.append(replaced)
            else:
                out.append(self._conflict(item, added, now))
        for reason, sop_uids in sorted(release.items()):
            self._release(sop_uids, reason, now)
        if added_any:
            self.wake()
        return out

    def _release(self, sop_uids: Sequence[str], reason: str, now: datetime) -> None:
        """Remove the bytes an IOCM rejection says to remove (their rows record it first); a failure is
        logged and the bytes stay (the rejection itself is durable: the study is written without them)."""
        if self.spool is None:  # replay: the inputs are not ingest's to remove
            LOGGER.info("%d rejected instances (%s): bytes not in a spool of this run", len(sop_uids), reason)
            return
        try:
            release_bytes(
                self.store, self.spool, sorted(set(sop_uids)), reason=reason, now=now,
                budget=self.budget, metrics=self.metrics,
            )
        except Exception as exc:
            LOGGER.warning("could not remove the bytes of %d rejected instances (%s): %s",
                           len(sop_uids), reason, exc)

    def _replace(self, item: Candidate, added: Added, now: datetime) -> Admitted:
        """``[intake] on_conflict = "replace"``: the new version takes the row; the old bytes go to the
        quarantine with a side file saying what replaced them (best effort), then leave the spool."""
        rec = item.record
        try:
            old = self.store.replace_instance(
                rec, source=item.source, spool_name=item.spool_name, digest=item.digest, data=item.data,
                now=now, due_at=self.due_at(now),
            )
        except BaseException:
            self._remove_spooled([item])
            raise
        if old is None:  # the stored version left its study meanwhile: an ordinary conflict
            return self._conflict(item, added, now)
        detail = (
            f"SOP Instance UID {rec.sop_uid} of study {rec.study_uid}: this version ({old.old_digest}) was "
            f"replaced by {item.digest} (source={item.origin or item.source})"
        )
        if self.metrics is not None:
            self.metrics.instances_accepted.labels(source=self.label).inc()
            self.metrics.instances_replaced.inc()
        if self.budget is not None:
            self.budget.add_in_row((len(item.data) if item.data is not None else 0)
                                   - (len(old.old_data) if old.old_data is not None else 0))
        body: bytes | Path | None = old.old_data
        if body is None and old.old_spool_name is not None and self.spool is not None:
            body = self.spool.path(old.old_spool_name)
        name: str | None = None
        if body is not None and self.quarantine is not None:
            try:
                name = self.quarantine.put(
                    body, _REPLACED, "replaced_by", detail, self.clock(), source=item.origin
                )
            except Exception as exc:  # the new version is kept either way
                LOGGER.warning("could not quarantine a replaced instance: %s", exc)
        stale = old.old_spool_name
        if stale is not None and stale != item.spool_name and self.spool is not None:
            try:
                self.spool.remove(stale)
            except Exception as exc:  # no row names it any more: the start-up sweep quarantines it
                LOGGER.warning("could not remove spool file %s: %s", stale, exc)
        LOGGER.info("replaced%s: %s", " (old version quarantined)" if name is not None else "", detail)
        if old.release_reason:  # the instance stays rejected: its new bytes go too
            self._release([rec.sop_uid], old.release_reason, now)
        return Admitted(AddOutcome.ADDED, added.study_uid, now, _REPLACED, detail, name)

    def _conflict(self, item: Candidate, added: Added, now: datetime) -> Admitted:
        """Quarantine a conflicting input (best effort), then remove its spool copy."""
        rule = added.detail or _CONFLICT
        rec = item.record
        detail = (
            f"SOP Instance UID {rec.sop_uid} of study {rec.study_uid} is already stored with "
            f"{rule.replace('_', ' ')}; the first is kept (source={item.origin or item.source})"
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
        return Admitted(AddOutcome.CONFLICT, added.study_uid, now, rule, detail, name)

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
