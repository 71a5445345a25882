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
from ingest.core.records import InstanceRecord
from ingest.metrics import Metrics
from ingest.ports import Added, AddOutcome, StateStore

__all__ = ["Admission", "Admitted", "Candidate", "utcnow"]

LOGGER = logging.getLogger(__name__)

#: The quarantine reason of a conflicting instance (``docs/reliability.md``).
_CONFLICT = "conflict"


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
    """

    record: InstanceRecord
    digest: str
    source: str
    spool_name: str | None = None
    body: bytes | Path | None = None
    origin: str | None = None


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
    ) -> None:
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
        for item, added in zip(items, results, strict=True):
            if added.outcome is AddOutcome.ADDED:
                added_any = True
                if self.metrics is not None:
                    self.metrics.instances_accepted.labels(source=self.label).inc()
                out.append(Admitted(AddOutcome.ADDED, added.study_uid, now))
            elif added.outcome is AddOutcome.DUPLICATE:
                self._remove_spooled([item])
                if self.metrics is not None:
                    self.metrics.instances_duplicate.inc()
                LOGGER.debug("identical duplicate of %s acknowledged", item.record.sop_uid)
                out.append(Admitted(AddOutcome.DUPLICATE, added.study_uid, now))
            else:
                out.append(self._conflict(item, added, now))
        if added_any:
            self.wake()
        return out

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
        """Remove the spool copies of ``items`` (a failure is logged: the start-up sweep removes orphans)."""
        if self.spool is None:
            return
        for item in items:
            if item.spool_name is None:
                continue
            try:
                self.spool.remove(item.spool_name)
            except Exception as exc:
                LOGGER.warning("could not remove spool file %s: %s", item.spool_name, exc)
