"""The seams between the orchestrator and the edges (state store, backend sink).

Tests replace these with fakes, the way httpx uses ``MockTransport``. Concrete implementations live in
``ingest.adapters``: ``state.SQLiteStateStore`` / ``state.PostgresStateStore`` and
``graphql.GraphQLSink``.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from ingest.core.admission import Verdict
from ingest.core.lifecycle import Rejection
from ingest.core.records import BackendStudy, InstanceRecord, RecordRow

__all__ = [
    "HELD",
    "Added",
    "BackendStudy",
    "Clock",
    "CommitmentAdded",
    "CommitmentClaim",
    "CommitmentReport",
    "CommitmentRow",
    "CommitmentState",
    "FileIdentity",
    "FileIdentityState",
    "LifecycleState",
    "RejectionRecorded",
    "RejectionRow",
    "ReleasedBytes",
    "Replaced",
    "ReportChannel",
    "ReportSender",
    "RetentionState",
    "RowWriter",
    "SeriesGroup",
    "Sink",
    "StateStore",
    "StudyClaim",
    "StudyRow",
    "StudyState",
    "Verdict",
]


@dataclass(frozen=True)
class Added:
    outcome: Verdict
    study_uid: str
    detail: str = ""  # for CONFLICT: which rule (``other_content`` / ``other_study``)
    #: SOP Instance UIDs whose bytes an IOCM rejection says to remove (113037 / 113039), now that the rows
    #: record it: the instances an added note rejects, or the added instance itself (ingest.core.lifecycle)
    release: tuple[str, ...] = ()
    release_reason: str = ""  # ``iocm:<code>``, the ``bytes_removed_reason`` of ``release``


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
    last_seen: datetime | None = None  # when its last instance was received, as claimed


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

    def reject(self, rejection: Rejection, *, now: datetime) -> RejectionRecorded:
        """Record a rejection (``ingest reject``; notes record theirs as they are added). A new one makes
        a stored study dirty and due at ``now``; one already recorded writes nothing."""
        ...

    def rejections(self, study_uid: str) -> list[Rejection]:
        """The rejections recorded for a study (of its instances, series, or the whole study)."""
        ...

    def rejected_counts(self) -> dict[str, dict[str, int]]:
        """Per study with rejected instances: how many are rejected, per rejection code."""
        ...

    def replaced_counts(self) -> dict[str, int]:
        """Per study: how many of its instances were replaced by a newer version."""
        ...

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
        """Replace the stored version of ``record.sop_uid`` (same study) with this one, and make the study
        dirty and due at ``due_at``; ``None`` when no version of it is stored in that study. Refused
        (:attr:`Replaced.refused`, nothing written) by :func:`ingest.core.admission.replace_refusal`
        (``trusted``: the sender may replace others' instances), and, unless ``keep_held`` (the caller
        has kept the old bytes), for a version whose bytes are under a commitment hold (:data:`HELD`)."""
        ...

    def study_patients(self, study_uids: Sequence[str]) -> dict[str, set[str]]:
        """Per stored study of ``study_uids``: the patient keys (:func:`ingest.core.lifecycle.patient_key`)
        of its instances, rejection notes excluded."""
        ...

    def rejection_rows(self, study_uid: str | None = None) -> list[RejectionRow]:
        """Every recorded rejection (of ``study_uid`` only, when given), oldest first."""
        ...

    def unreject(self, rejection: Rejection, *, now: datetime) -> bool:
        """Remove a rejection ``ingest reject`` recorded (``note_uid`` ``""``) and make its study dirty and
        due at ``now``; ``False`` when there is no such rejection (nothing written)."""
        ...

    def held_rejected(self, *, now: datetime, limit: int) -> dict[str, list[str]]:
        """Instances whose bytes a rejection removes (113037 / 113039) but a commitment hold kept, now that
        the hold has ended at ``now``: ``iocm:<code>`` -> SOP Instance UIDs (at most ``limit`` in all)."""
        ...


@dataclass(frozen=True)
class RejectionRow:
    """One recorded rejection as ``ingest rejections`` lists it.

    Attributes
    ----------
    rejection:
        What it rejects, and for which code.
    added_at:
        When it was recorded.
    source:
        Who made it: ``ingest reject``, or the source of the note that made it (``dimse:<AE>``,
        ``watch``, ``file:<label>``).
    """

    rejection: Rejection
    added_at: datetime | None
    source: str


class CommitmentAdded(enum.Enum):
    """What storing a Storage Commitment request did (``CommitmentState.add_commitment``)."""

    NEW = "new"  # stored, due for a report now
    REPEATED = "repeated"  # the same transaction again (same AE, same instances): its report is due again
    CONFLICT = "conflict"  # the Transaction UID is taken by another AE or other instances: nothing written


@dataclass(frozen=True)
class CommitmentClaim:
    """A pending Storage Commitment report handed to one sender (a lease in the store)."""

    transaction_uid: str  # (0008,1195)
    calling_ae: str  # the requester, whom the report goes to
    received_at: datetime
    attempts: int
    owner: str


@dataclass(frozen=True)
class CommitmentReport:
    """The decided result of a request: what is committed, and what failed with which Failure Reason.

    ``committed`` lists (SOP Class UID, SOP Instance UID) pairs; ``failed`` (SOP Class UID, SOP Instance
    UID, Failure Reason (0008,1197)), each in request order. Decided once, then kept.
    """

    transaction_uid: str
    calling_ae: str
    committed: tuple[tuple[str, str], ...]
    failed: tuple[tuple[str, str, int], ...]

    @property
    def event_type(self) -> int:
        """N-EVENT-REPORT Event Type ID: 1 when every instance is committed, 2 when some failed."""
        return 2 if self.failed else 1


@dataclass(frozen=True)
class CommitmentRow:
    """A Storage Commitment request as ``ingest status`` shows it."""

    transaction_uid: str
    calling_ae: str
    state: str  # pending / reported / abandoned
    instances: int
    committed: int | None  # None until decided
    failed: int | None
    attempts: int
    received_at: datetime | None
    next_attempt_at: datetime | None
    reported_at: datetime | None
    last_error: str | None


@dataclass(frozen=True)
class RejectionRecorded:
    """What :meth:`LifecycleState.reject` did.

    Attributes
    ----------
    new:
        ``False`` when the same rejection was already recorded (nothing written).
    study_known:
        Whether the study has instance rows (else the rejection waits for them).
    release:
        Stored instances it covers whose bytes are to be removed (113037 / 113039).
    """

    new: bool
    study_known: bool
    release: tuple[str, ...] = ()


@dataclass(frozen=True)
class Replaced:
    """The version :meth:`LifecycleState.replace_instance` replaced.

    Attributes
    ----------
    study_uid:
        The study it belongs to.
    old_digest:
        Its content digest.
    old_spool_name, old_data:
        Where its bytes were: a spool file, or the bytes kept in the state store (deleted with it).
    release_reason:
        ``iocm:<code>`` when an IOCM rejection covering the instance says its (new) bytes go; else ``""``.
    refused:
        Why the replacement was refused (nothing written): a rule of
        :func:`ingest.core.admission.replace_refusal`, or :data:`HELD`; ``""`` when it was made.
    patient_changed:
        The new version is of another patient than the old one (a trusted sender's replacement).
    """

    study_uid: str
    old_digest: str
    old_spool_name: str | None
    old_data: bytes | None
    release_reason: str = ""
    refused: str = ""
    patient_changed: bool = False


#: :attr:`Replaced.refused` of a version whose bytes are under a Storage Commitment hold: the caller keeps
#: them (the quarantine) before asking again with ``keep_held``.
HELD = "held"


class CommitmentState(Protocol):
    """Storage Commitment requests, their results and pending reports
    (``ingest.adapters.state.commitments``)."""

    def add_commitment(
        self, transaction_uid: str, calling_ae: str, items: Sequence[tuple[str, str]], *, now: datetime
    ) -> CommitmentAdded:
        """Store a request (``items``: (SOP Class UID, SOP Instance UID) pairs); durable on return."""
        ...

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
        """Claim up to ``limit`` pending reports that are due and not leased by another owner.

        A next attempt later than ``stale_after`` counts as due (it was set before the clock was stepped
        back); reports to ``exclude_aes`` are left alone (a delivery to that AE is under way).
        """
        ...

    def decide_commitment(
        self, transaction_uid: str, *, now: datetime, hold_until: datetime
    ) -> CommitmentReport:
        """The request's result, decided (and committed instances held until ``hold_until``) at the first
        call, then the same result on every later one."""
        ...

    def commitment_reported(self, claim: CommitmentClaim, *, now: datetime) -> None:
        """The report was delivered: the request is done and its lease released."""
        ...

    def commitment_retry(
        self, claim: CommitmentClaim, *, error: str, next_attempt_at: datetime | None
    ) -> None:
        """Count a failed delivery; try again at ``next_attempt_at`` (``None``: give up, ``abandoned``)."""
        ...

    def commitments(self, state: str | None = None, limit: int = 100) -> list[CommitmentRow]:
        """Requests (only those in ``state`` when given), newest first."""
        ...

    def commitment_counts(self) -> dict[str, int]:
        """How many requests are in each state (states with none are left out)."""
        ...


@dataclass(frozen=True)
class ReleasedBytes:
    """One instance whose bytes :meth:`RetentionState.release_instance_bytes` marked removed.

    Attributes
    ----------
    sop_uid:
        Its SOP Instance UID.
    spool_name:
        The spool file that held its bytes, for the caller to unlink (``None``: kept in-row, or none).
    in_row_bytes:
        How many bytes of ``instance_bytes`` the same transaction deleted (0 for a spool file).
    """

    sop_uid: str
    spool_name: str | None
    in_row_bytes: int


class RetentionState(Protocol):
    """Which spooled bytes retention may remove; commitment holds (``ingest.adapters.state.retention``).

    An instance row stays when its bytes go: ``bytes_removed_at`` / ``bytes_removed_reason`` say when
    and why, ``spool_name`` is cleared. ``hold_until`` (set by :meth:`hold_bytes`) keeps the bytes of a
    committed instance from retention until then.
    """

    def release_instance_bytes(
        self, sop_uids: Sequence[str], *, reason: str, now: datetime, unless_held_at: datetime | None = None
    ) -> list[ReleasedBytes]:
        """In one transaction: mark the rows of ``sop_uids`` whose bytes are still held as removed at
        ``now`` for ``reason``, clear their ``spool_name`` and delete their in-row bytes; returns what
        was marked (unknown or already released UIDs are skipped, and with ``unless_held_at`` those
        whose commitment hold runs past it). The caller unlinks the files."""
        ...

    def releasable(
        self, *, pushed_before: datetime, now: datetime, limit: int, node: str | None = None
    ) -> list[str]:
        """Up to ``limit`` SOP Instance UIDs whose bytes are held, whose study is pushed with nothing
        newer (clean), last pushed at or before ``pushed_before``, and with no hold past ``now``
        (``node``: only instances that node received; ``None``: any)."""
        ...

    def hold_bytes(self, sop_uids: Sequence[str], *, until: datetime) -> int:
        """Keep these instances' bytes from retention until at least ``until`` (a later hold stays);
        returns how many rows now hold until ``until`` or later."""
        ...


@dataclass(frozen=True)
class FileIdentity:
    """A file ``ingest replay`` read and whose instance the store holds (``ingest.adapters.state.files``).

    ``path`` is absolute; ``size`` and ``mtime_ns`` are what ``os.stat`` said before the file was read;
    ``digest`` is the instance's content digest (``instances.digest``) when it was admitted.
    """

    path: str
    size: int
    mtime_ns: int
    digest: str
    sop_uid: str
    study_uid: str


class FileIdentityState(Protocol):
    """What replay remembers of the files it read, so an unchanged rerun reads none of them again."""

    def unchanged_files(self, stats: Sequence[tuple[str, int, int]]) -> dict[str, str]:
        """Of ``(path, size, mtime_ns)``, those recorded with that same size and mtime whose instance is
        still held with the recorded digest: path -> Study Instance UID."""
        ...

    def remember_files(self, files: Sequence[FileIdentity]) -> None:
        """Record (or replace) the identity of each file, in one transaction."""
        ...


class StateStore(LifecycleState, CommitmentState, RetentionState, FileIdentityState, Protocol):
    """Durable state: one row per accepted SOP instance, one row per study.

    Every method is synchronous and thread-safe; the orchestrator calls it from worker threads.
    Times are passed in (``now``), never read inside.
    """

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

        ``data``: the Part 10 bytes, kept in the state store in the same transaction (no spool file).
        Raises ``StoreUnavailableError`` when it cannot commit (the caller answers "out of resources").
        """
        ...

    def add_instances(
        self,
        items: Sequence[tuple[InstanceRecord | RecordRow, str, str | None, str]],
        *,
        now: datetime,
        due_at: datetime,
        inline: Sequence[bytes | None] | None = None,
    ) -> list[Added]:
        """Batch form of :meth:`add_instance` for (record, source, spool_name, digest); one transaction.
        A record may come as the :class:`~ingest.core.records.RecordRow` a parsing process made of it.

        ``inline``: one entry per item, its bytes to keep in the state store with its row, or ``None``.
        """
        ...

    def instance_bytes(self, sop_uid: str) -> bytes | None:
        """The Part 10 bytes kept in the state store for an instance, or ``None`` (not kept in-row)."""
        ...

    def instance_spool_name(self, sop_uid: str) -> str | None:
        """The spool file an instance's row records, or ``None`` (unknown, or its bytes are in-row)."""
        ...

    def inline_bytes_total(self) -> int:
        """Bytes of instance data the state store holds (the disk budget counts them with the spool)."""
        ...

    def retry_now(self, now: datetime) -> int:
        """Pending studies waiting for a retry become due at ``now`` (the backend is back)."""
        ...

    def requeue(self, study_uids: Sequence[str], now: datetime) -> int:
        """Make pushed studies dirty and due at ``now`` (``ingest relink``); returns how many."""
        ...

    def mark_due(self, study_uids: Iterable[str], due_at: datetime) -> None:
        """Bring the due time of dirty studies forward (end of a replay input, association released)."""
        ...

    def next_due_at(self, after: datetime) -> datetime | None:
        """The earliest due time later than ``after`` among pending dirty studies (when the relay should
        look again), or ``None``."""
        ...

    def claim_due(
        self, now: datetime, limit: int, owner: str, lease_s: float, *, stale_after: datetime | None = None
    ) -> list[StudyClaim]:
        """Claim up to ``limit`` studies that are dirty, due, past their next attempt and not leased."""
        ...

    def renew(self, claim: StudyClaim, now: datetime, lease_s: float) -> bool: ...

    def release(self, claim: StudyClaim) -> None:
        """Give a claim back without recording anything (shutdown)."""
        ...

    def instances(self, study_uid: str) -> list[InstanceRecord]: ...

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
        """Record a successful write (or an unchanged check); clears dirty unless instances came since.

        ``written``: JSON of the ImagingStudy the mapping built and of the subject the written resource
        carried, kept (same transaction) for the next merge."""
        ...

    def written(self, study_uid: str) -> tuple[str | None, str | None]:
        """What :meth:`mark_pushed` kept of the last write (JSON texts), ``(None, None)`` if nothing."""
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

    def study_series(self, study_uids: Sequence[str]) -> list[SeriesGroup]:
        """Like :meth:`series_groups`, but all ``file:<path>`` sources of a series make one group (its
        ``source`` the least path, ``source_last`` the greatest): one group per series of a replay."""
        ...

    def find_studies(
        self,
        limit: int,
        offset: int = 0,
        *,
        state: StudyState | None = None,
        seen_from: datetime | None = None,
        seen_before: datetime | None = None,
    ) -> list[StudyRow]:
        """Studies newest first (as :meth:`recent_studies`), only those in ``state`` and whose last
        instance was received in [``seen_from``, ``seen_before``) when given."""
        ...

    def count_studies(
        self,
        *,
        state: StudyState | None = None,
        seen_from: datetime | None = None,
        seen_before: datetime | None = None,
    ) -> int:
        """How many studies :meth:`find_studies` would list without a limit."""
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
    #: :meth:`StateStore.study_series` only: the greatest source of a group of ``file:`` sources
    source_last: str | None = None


class Clock(Protocol):
    """The process's two clocks (``ingest.clock``): wall-clock time, stored in the state store as due
    times, and monotonic time, which no clock step moves (docs/reliability.md "Clock steps")."""

    def now(self) -> datetime:
        """The wall-clock time, timezone-aware."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary start, never going back."""
        ...


class ReportChannel(Protocol):
    """One way to deliver a Storage Commitment N-EVENT-REPORT (``ingest.relay.reports`` tries them in
    order): the requester's own association (``ingest.sources.dimse.commitment``) or a new association
    to it (``ingest.adapters.dimse_scu``)."""

    def send_report(self, report: CommitmentReport, *, timeout_s: float) -> str | None:
        """Deliver ``report`` within ``timeout_s``; returns how (for the log), or ``None`` when this
        channel has no way to the requester. Raises ``ingest.errors.ReportDeliveryError`` when it tried
        and failed."""
        ...


class ReportSender(Protocol):
    """The Storage Commitment report sender as the N-ACTION SCP sees it (``ingest.relay.reports``)."""

    def start(self) -> None:
        """Start delivering due reports."""
        ...

    def close(self, wait_s: float = 10.0) -> None:
        """Stop; deliveries under way end within their timeout, the rest stay pending."""
        ...

    def wake(self) -> None:
        """A request was stored: look for due reports now."""
        ...


class RowWriter(Protocol):
    """A process of its own that commits :meth:`StateStore.add_instances` batches, one at a time
    (``ingest.adapters.state.writer``); an event loop sends a batch and reads its outcome when
    :meth:`fileno` becomes readable."""

    @property
    def running(self) -> bool:
        """Whether it can take a batch (started, not lost, not closed)."""
        ...

    def fileno(self) -> int:
        """Readable when the outcome of the batch sent is there."""
        ...

    def send(
        self,
        rows: Sequence[tuple[RecordRow, str, str | None, str]],
        *,
        now: datetime,
        due_at: datetime,
        inline: Sequence[bytes | None] | None,
    ) -> None:
        """Hand over one batch; ``StoreUnavailableError`` when the process is gone."""
        ...

    def receive(self) -> list[Added]:
        """The committed batch's outcome, or its ``StoreError`` / ``StoreUnavailableError``."""
        ...

    def close(self) -> None:
        """Let the process finish its batch and end."""
        ...
