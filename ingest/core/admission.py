"""The admission decision: is an instance new, an identical duplicate, or a conflict (pure).

``docs/architecture.md`` (Contracts, Acceptance and Identity): the decision is made here once, and used
by the state store (``ingest.adapters.state.sql``) and by the dry run of ``ingest replay``.

- No instance with the SOP Instance UID: **added**.
- One in another study: **conflict** (``other_study``; the same SOP Instance UID under another study is
  refused).
- One in the same study with the same content digest: **duplicate** (re-receiving identical content is a
  no-op that answers success).
- One with another digest: **conflict** (``other_content``; the first is kept), except when the stored
  digest is of another scheme (a store written before the content digest ``c1:`` of
  ``ingest.adapters.dicomfile``): digests of different schemes never match, so the stored record
  decides, and a record equal but for the transfer syntax is a **duplicate** ("identical" means the
  same content whatever transfer syntax carried it).

``[intake] on_conflict = "replace"`` lets a conflict of other content replace the stored version, but
only as :func:`replace_refusal` allows: from the sender of the stored version, or from a sender trusted
to replace (``replace = true`` on its ``[listener] allowed_calling_aes`` entry; the drop folder and
``ingest replay``); a new version of another patient only from a trusted sender. Otherwise the
replacement is refused like any conflict (its rule says why).

A **metadata-only** instance (``ingest sync``: a PACS's query answers, no bytes; its digest has the
scheme :data:`METADATA_SCHEME`, ``m1:``) never replaces a row that arrived with its bytes: against one,
it is a **duplicate** (the stored record, read from the whole header, is richer). Against another
metadata-only row of the same study with another digest (the PACS's answers changed) it is **added**
with :data:`SUPERSEDES` in ``detail``: the store replaces that row. An instance that arrives with its
bytes takes over a metadata-only row of the same study the same way (identical-or-richer arrival).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from ingest.core.records import InstanceRecord

__all__ = [
    "CONFLICT_OTHER_CONTENT",
    "CONFLICT_OTHER_STUDY",
    "METADATA_SCHEME",
    "REPLACE_OTHER_PATIENT",
    "REPLACE_OTHER_SENDER",
    "SUPERSEDES",
    "Decision",
    "Existing",
    "Verdict",
    "decide",
    "replace_refusal",
]

#: The rule of a conflict: the SOP Instance UID is stored with other content.
CONFLICT_OTHER_CONTENT: Final = "other_content"
#: The rule of a conflict: the SOP Instance UID is stored in another study.
CONFLICT_OTHER_STUDY: Final = "other_study"
#: The digest scheme of a metadata-only instance (query answers, no bytes): ``m1:<hex>``.
METADATA_SCHEME: Final = "m1"
#: The ``detail`` of an ``ADDED`` decision whose instance replaces a metadata-only row.
SUPERSEDES: Final = "supersedes_metadata"

#: The rule of a refused replacement: the stored version came from another sender.
REPLACE_OTHER_SENDER: Final = "replace_other_sender"
#: The rule of a refused replacement: the new version is of another patient.
REPLACE_OTHER_PATIENT: Final = "replace_other_patient"


class Verdict(enum.Enum):
    ADDED = "added"  # no instance with this SOP Instance UID yet
    DUPLICATE = "duplicate"  # the same instance again: nothing to write
    CONFLICT = "conflict"  # the same SOP Instance UID, other content or other study: the first is kept


@dataclass(frozen=True)
class Existing:
    """The instance already held under a SOP Instance UID.

    Attributes
    ----------
    study_uid:
        Its Study Instance UID (0020,000D).
    digest:
        Its content digest as stored.
    record:
        Its header record, or that record's JSON as stored (parsed only when the digests are of
        different schemes).
    """

    study_uid: str
    digest: str
    record: InstanceRecord | str


@dataclass(frozen=True)
class Decision:
    """The verdict; for a conflict, its rule in ``detail`` (``other_study`` / ``other_content``)."""

    verdict: Verdict
    detail: str = ""


_ADDED: Final = Decision(Verdict.ADDED)
_DUPLICATE: Final = Decision(Verdict.DUPLICATE)


def _digest_scheme(digest: str) -> str:
    """The scheme prefix of a digest (``"c1"``), or ``""`` for an older digest without one."""
    scheme, sep, _ = digest.partition(":")
    return scheme if sep else ""


def _same_record(stored: InstanceRecord | str, record: InstanceRecord) -> bool:
    """Whether the stored record equals ``record`` but for the transfer syntax; an unparsable one does not."""
    if isinstance(stored, str):
        try:
            stored = InstanceRecord.from_json(stored)
        except ValueError:
            return False
    return stored.model_copy(update={"transfer_syntax_uid": None}) == record.model_copy(
        update={"transfer_syntax_uid": None}
    )


def decide(found: Existing | None, record: InstanceRecord, digest: str) -> Decision:
    """Decide the admission of ``record`` (content digest ``digest``) against what is held (module doc).

    Parameters
    ----------
    found:
        The instance already held under ``record.sop_uid``, or ``None``.
    record:
        The header record of the instance being admitted.
    digest:
        Its content digest.

    Returns
    -------
    Decision
        ``ADDED`` (with :data:`SUPERSEDES` when a metadata-only row is replaced), ``DUPLICATE``, or
        ``CONFLICT`` with its rule in ``detail``.
    """
    if found is None:
        return _ADDED
    if found.study_uid != record.study_uid:
        return Decision(Verdict.CONFLICT, CONFLICT_OTHER_STUDY)
    if found.digest == digest:
        return _DUPLICATE
    if _digest_scheme(digest) == METADATA_SCHEME and _digest_scheme(found.digest) != METADATA_SCHEME:
        return _DUPLICATE  # the stored record came with its bytes: never replaced by query answers
    if _digest_scheme(found.digest) == METADATA_SCHEME:
        return Decision(Verdict.ADDED, SUPERSEDES)
    if _digest_scheme(found.digest) != _digest_scheme(digest) and _same_record(found.record, record):
        return _DUPLICATE
    return Decision(Verdict.CONFLICT, CONFLICT_OTHER_CONTENT)


def replace_refusal(
    *, stored_source: str, stored_patient: str, source: str, patient: str, trusted: bool
) -> str | None:
    """Why a new version may not replace the stored one (``[intake] on_conflict = "replace"``), or ``None``.

    Parameters
    ----------
    stored_source, source:
        The sources (``dimse:<AE>``, ``watch``, ``file:<label>``) of the stored and the new version.
    stored_patient, patient:
        Their patient keys (:func:`ingest.core.lifecycle.patient_key`).
    trusted:
        Whether the new version's sender may replace what others sent and move an instance to another
        patient.

    Returns
    -------
    str | None
        :data:`REPLACE_OTHER_SENDER`, :data:`REPLACE_OTHER_PATIENT`, or ``None`` (allowed).
    """
    if trusted:
        return None
    if stored_source != source:
        return REPLACE_OTHER_SENDER
    if stored_patient != patient:
        return REPLACE_OTHER_PATIENT
    return None
