"""The whole exception tree of ``ingest``.

Every edge maps the errors of the foreign system it wraps (pydicom, pynetdicom, sqlite3/psycopg,
gql/aiohttp, the file system) into this tree, so the orchestrator only ever handles these::

    IngestError
    ├── ConfigError                  bad or missing settings; the process refuses to start
    ├── HeaderError                  an instance is rejected (never retried); ``reason`` is a stable code
    │   ├── NotDicomError            not DICOM at all, empty, or no readable dataset
    │   ├── TruncatedError           a value or the dataset is cut short
    │   ├── InflateCapError          a deflated dataset inflates beyond the configured cap
    │   ├── MissingTagError          a required tag is absent or empty
    │   ├── InvalidUIDError          a UID breaks the DICOM UID grammar
    │   ├── NestingTooDeepError      sequences nested deeper than pydicom can parse
    │   ├── NotPatientInstanceError  DICOMDIR, Color Palette and other non-patient objects
    │   ├── InstanceConflictError    same SOP Instance UID with other content or in another study
    │   └── TooManyReferencesError   a Key Object Selection names more instances than the cap
    ├── ArchiveError                 an archive or member refused (escape, link, bomb, unreadable)
    ├── SyncSourceError              a PACS ``ingest sync`` queries refused, timed out or failed
    ├── StoreError                   the state store failed
    │   └── StoreUnavailableError    the store cannot be reached or written now (transient)
    ├── ReportDeliveryError          a Storage Commitment report was not delivered (retried with backoff)
    └── SinkError                    the backend failed
        ├── RetryableSinkError       connection refused, timeout, HTTP 5xx/429, 401 after token reload
        │   └── BackendStorageError  HTTP 503 no-store: the backend's disk is full (no attempt limit)
        └── PermanentSinkError       GraphQL validation/execution errors, other 4xx
            ├── MultipleMatchesError two or more backend resources carry the study identifier
            └── ForeignContentError  the backend copy cannot be read or written back whole

Messages name the rule, the tag and the UID or path; they never contain patient data.
"""

from __future__ import annotations

__all__ = [
    "ArchiveError",
    "BackendStorageError",
    "ConfigError",
    "ForeignContentError",
    "HeaderError",
    "InflateCapError",
    "IngestError",
    "InstanceConflictError",
    "InvalidUIDError",
    "MissingTagError",
    "MultipleMatchesError",
    "NestingTooDeepError",
    "NotDicomError",
    "NotPatientInstanceError",
    "PermanentSinkError",
    "ReportDeliveryError",
    "RetryableSinkError",
    "SinkError",
    "StoreError",
    "StoreUnavailableError",
    "SyncSourceError",
    "TooManyReferencesError",
    "TruncatedError",
]


class IngestError(Exception):
    """Base of every error ``ingest`` raises on purpose."""


class ConfigError(IngestError):
    """Settings are invalid or incomplete."""


class HeaderError(IngestError):
    """An instance is rejected.

    Parameters
    ----------
    message:
        What is wrong, naming the rule, the tag and the UID or path; no patient data.
    reason:
        Stable machine-readable code (used in quarantine side files, metrics and DICOM status).
    tag:
        The DICOM keyword concerned, if any.
    uid:
        The SOP Instance UID when known.
    """

    reason = "invalid_header"

    def __init__(self, message: str, *, tag: str | None = None, uid: str | None = None) -> None:
        super().__init__(message)
        self.tag = tag
        self.uid = uid


class NotDicomError(HeaderError):
    reason = "not_dicom"


class TruncatedError(HeaderError):
    reason = "truncated"


class InflateCapError(HeaderError):
    reason = "inflate_cap"


class MissingTagError(HeaderError):
    reason = "missing_tag"


class InvalidUIDError(HeaderError):
    reason = "invalid_uid"


class NestingTooDeepError(HeaderError):
    reason = "nesting_too_deep"


class NotPatientInstanceError(HeaderError):
    reason = "not_patient_instance"


class InstanceConflictError(HeaderError):
    reason = "conflict"


class TooManyReferencesError(HeaderError):
    """A Key Object Selection Document (an IOCM rejection note) whose Current Requested Procedure
    Evidence (0040,A375) names more instances than ``[listener] max_rejection_items``."""

    reason = "too_many_references"


class ArchiveError(IngestError):
    """An archive, or one of its members, is refused."""


class SyncSourceError(IngestError):
    """A PACS ``ingest sync`` queries could not be asked, or answered with a failure; the message names
    the source and the query."""


class StoreError(IngestError):
    """The state store failed."""


class StoreUnavailableError(StoreError):
    """The state store cannot be reached or written right now; the caller may retry later."""


class SinkError(IngestError):
    """Writing to or reading from the FHIR backend failed."""

    def __init__(self, message: str, *, code: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after  # seconds the backend asked us to wait (HTTP Retry-After), a hint


class RetryableSinkError(SinkError):
    """Transient backend failure: retry with backoff."""


class BackendStorageError(RetryableSinkError):
    """The backend cannot store anything right now (HTTP 503 with an OperationOutcome issue ``no-store``:
    its database or disk is full): retried without an attempt limit, never dead-lettered."""


class PermanentSinkError(SinkError):
    """The backend refused the request; retrying the same request cannot succeed."""


class MultipleMatchesError(PermanentSinkError):
    """Two or more backend resources carry the same study identifier; never guess."""


class ForeignContentError(PermanentSinkError):
    """The backend copy holds content the sink cannot read whole (``reason`` ``incomplete_read``) or
    cannot send back whole (``unwritable_content``); writing would lose what another writer put there."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ReportDeliveryError(IngestError):
    """A Storage Commitment report was not delivered (the requester is unreachable, refused the
    association, answered a failure or did not answer in time); it is retried later."""
