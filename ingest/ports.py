"""The seams between the orchestrator and the edges (state store, backend sink).

Tests replace these with fakes, the way httpx uses ``MockTransport``. Concrete implementations live in
``ingest.adapters``: ``state.SQLiteStateStore`` / ``state.PostgresStateStore`` and
``graphql.GraphQLSink``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from ingest.core.admission import Verdict
from ingest.core.records import BackendStudy, InstanceRecord

__all__ = [
    "AddOutcome",
    "Added",
    "BackendStudy",
    "CommitmentState",
    "LifecycleState",
    "RetentionState",
    "SeriesGroup",
    "Sink",
    "StateStore",
    "StudyClaim",
    "StudyRow",
    "StudyState",
]


#: What adding an instance did: the admission decision of the core (ADDED: row committed; DUPLICATE and
#: CONFLICT: nothing written), one enum for the store, the dry run and the sources.
AddOutcome = Verdict


@dataclass(frozen=True)
class Added:
    outcome: AddOutcome
    study_uid: str
    detail: str = ""  # for CONFLICT: which rule (``other_content`` / ``other_study``)


class StudyState(enum.Enum):
    PENDING = "pending"  # has instances not yet pushed (dirty), or waiting for a retry
    PUSHED = "pushed"  # the backend holds everything we know
    DEAD = "dead"  # permanent failure; ``ingest retry`` re-drives it


@dataclass(frozen=True)
class StudyClaim:
    """One due study handed to one writer (per-process lock or cluster-wide lease)."""

    study_uid: str
    generation: int  # increments with every instance added; a push clears ``dirty`` only if unchanged
    backend_id: str | None
    version_id: str | None
    digest: str | None  # digest of what was last written
    attempts: int
    owner: str


@dataclass(frozen=True)
class StudyRow:
    """A study as ``ingest status`` shows it."""

    study_uid: str
    state: StudyState
    instances: int
    dirty: bool
    attempts: int
    backend_id: str | None
    version_id: str | None
    last_error: str | None
    last_seen: datetime | None
    due_at: datetime | None
    next_attempt_at: datetime | None
    pushed_at: datetime | None
    lease_owner: str | None = None
    lease_expires: datetime | None = None
    #: the reason code of a dead letter (``multiple_matches``, ``rejected``, ``retries_exhausted``...);
    #: ``None`` unless ``state`` is ``DEAD``
    dead_reason: str | None = None


class LifecycleState(Protocol):
    """Durable state of a study's life after acceptance: IOCM rejections, replaced instances
    (``ingest.adapters.state.lifecycle``)."""


class CommitmentState(Protocol):
    """Storage Commitment requests, their results and pending reports
    (``ingest.adapters.state.commitments``)."""


class RetentionState(Protocol):
    """Which spooled bytes retention may remove; commitment holds (``ingest.adapters.state.retention``)."""


class StateStore(LifecycleState, CommitmentState, RetentionState, Protocol):
    """Durable state: one row per accepted SOP instance, one row per study.

    Every method is synchronous and thread-safe; the orchestrator calls it from worker threads.
    Times are passed in (``now``), never read inside.
    """

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

        Raises ``StoreUnavailableError`` when it cannot commit (the caller answers "out of resources").
        """
        ...

    def add_instances(
        self, items: Sequence[tuple[InstanceRecord, str, str | None, str]], *, now: datetime, due_at: datetime
    ) -> list[Added]:
        """Batch form of :meth:`add_instance` for (record, source, spool_name, digest); one transaction."""
        ...

    def mark_due(self, study_uids: Iterable[str], due_at: datetime) -> None:
        """Bring the due time of dirty studies forward (end of a replay input, association released)."""
        ...

    def claim_due(self, now: datetime, limit: int, owner: str, lease_s: float) -> list[StudyClaim]:
        """Claim up to ``limit`` studies that are dirty, due, past their next attempt and not leased."""
        ...

    def renew(self, claim: StudyClaim, now: datetime, lease_s: float) -> bool: ...

    def release(self, claim: StudyClaim) -> None:
        """Give a claim back without recording anything (shutdown)."""
        ...

    def instances(self, study_uid: str) -> list[InstanceRecord]: ...

    def mark_pushed(
        self, claim: StudyClaim, *, backend_id: str, version_id: str | None, digest: str, now: datetime
    ) -> None:
        """Record a successful write (or an unchanged check); clears dirty unless instances came since."""
        ...

    def schedule_retry(self, claim: StudyClaim, *, error: str, next_attempt_at: datetime) -> None: ...

    def dead_letter(self, claim: StudyClaim, *, reason: str, error: str, now: datetime) -> None: ...

    def retry_dead(self, study_uid: str | None, now: datetime) -> int:
        """Move dead studies (one, or all with ``None``) back to pending and due now; returns how many."""
        ...

    def studies(self, state: StudyState | None = None) -> list[StudyRow]: ...

    def study(self, study_uid: str) -> StudyRow | None: ...

    def referenced_spool_names(self, names: Sequence[str]) -> set[str]:
        """Which of ``names`` some instance row records as its spool file (orphan sweep at start)."""
        ...

    def close(self) -> None: ...

    # -- the status page (ingest.app.admin) -------------------------------------------------------------

    def recent_studies(self, limit: int, offset: int = 0) -> list[StudyRow]:
        """Studies newest first (by the last instance received), ``limit`` from ``offset``."""
        ...

    def study_counts(self) -> dict[StudyState, int]:
        """How many studies are in each state (states with none are left out)."""
        ...

    def series_groups(self, study_uids: Sequence[str]) -> list[SeriesGroup]:
        """The instance rows of these studies by study, series and source (one sample record each)."""
        ...

    def minute_counts(self, since: datetime, minutes: int) -> tuple[list[int], list[int]]:
        """Per minute from ``since``: instances received, and studies whose last push fell in it."""
        ...


class Sink(Protocol):
    """A FHIR GraphQL backend holding ImagingStudy resources."""

    async def find(self, study_uid: str, backend_id: str | None) -> BackendStudy | None:
        """The backend copy: read ``backend_id`` if given (falling back to search if it is gone), else
        search by the study identifier. Raises ``MultipleMatchesError`` for two or more matches."""
        ...

    async def create(self, resource: dict[str, Any]) -> BackendStudy: ...

    async def update(self, backend_id: str, resource: dict[str, Any]) -> BackendStudy: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class SeriesGroup:
    """The instance rows of one series that came from one source (status page summaries)."""

    study_uid: str
    series_uid: str
    source: str
    instances: int
    first_added: datetime | None
    last_added: datetime | None
    sample: InstanceRecord  # one of the group's header records (the least by its JSON text)
