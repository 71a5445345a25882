"""A study's life after acceptance: IOCM rejection notes and what a study looks like with them (pure).

``docs/architecture.md`` "Study lifecycle". A **rejection note** is a Key Object Selection Document
(SOP Class 1.2.840.10008.5.1.4.1.1.88.59) whose document title, Concept Name Code Sequence (0040,A043),
is one of the rejection codes of :data:`REJECTION_CODES` (DCM, PS3.16 CID 7011). The instances its
Current Requested Procedure Evidence Sequence (0040,A375) names are *rejected*: they stay stored (the
state store keeps their rows), but the study is written as if they were not there. ``ingest reject``
records the same state without a note, for an instance, a whole series or a whole study.

Rules (all here, used by the state store, the relay's build step and ``ingest status``):

- :func:`rejection_code`: a KOS with a rejection title is a note; a KOS with any other title (113000
  "Of Interest"...) is an ordinary instance.
- :func:`note_rejections`: the :class:`Rejection` s a note makes, one per instance it names.
- :func:`covering`: the code a set of rejections gives one instance: a rejection of that instance, of
  its series or of its study counts; when several do, the strongest by :data:`_PRECEDENCE` (patient
  safety, then worklist, then retention, then quality).
- :func:`view`: a study's records split into *kept* instances (what the ImagingStudy lists), *rejected*
  instances and *notes* (never listed), with the rejected count per code and the status a study whose
  every instance is rejected gets: ``entered-in-error`` when every one is rejected for 113037 or 113038
  (the study should never have existed), else the configured ``[intake] all_rejected_status``
  (113001 quality, 113039 retention: the study did happen).
- :func:`removes_bytes`: the bytes of instances rejected for 113037 or 113039 are removed from the spool;
  others follow the retention policy (never before a Storage Commitment hold ends).
- :func:`patient_key`: a note rejects only instances of its own patient (Patient ID with its issuer): a
  rejection made by a note carries the note's key (:attr:`Rejection.patient`) and covers no instance of
  another patient, whenever that instance arrives. ``ingest reject`` has no patient: it covers all.
- :func:`note_refusal`: whether a note may be applied at all (its sender may send rejections, and every
  study it names that is stored is of its patient); a refused note is quarantined, not stored.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ingest.core.records import InstanceRecord

__all__ = [
    "ALL_REJECTED_STATUSES",
    "ENTERED_IN_ERROR",
    "KEY_OBJECT_SELECTION",
    "REFUSED_NOT_ALLOWED",
    "REFUSED_PATIENT_MISMATCH",
    "REJECTION_CODES",
    "WITHDRAWN_KEY",
    "Rejection",
    "RejectionCode",
    "StudyView",
    "apply_notes",
    "covering",
    "mark",
    "note_refusal",
    "note_rejections",
    "patient_key",
    "rejection_code",
    "removes_bytes",
    "view",
    "withdraw",
]

#: Key Object Selection Document Storage (PS3.4 B.5).
KEY_OBJECT_SELECTION: Final = "1.2.840.10008.5.1.4.1.1.88.59"
#: The coding scheme of the rejection codes (DICOM Controlled Terminology, PS3.16).
_DCM: Final = "DCM"
#: ImagingStudy.status of a study that should never have existed.
ENTERED_IN_ERROR: Final = "entered-in-error"
#: The statuses ``[intake] all_rejected_status`` may choose for a study whose every instance is rejected
#: for quality (113001) or retention (113039) reasons (FHIR R4 ImagingStudyStatus).
ALL_REJECTED_STATUSES: Final = ("cancelled", "entered-in-error", "unknown", "available")
#: The key of the built ImagingStudy JSON that names what ingest withdraws from the backend copy
#: (``{"series": [...], "instances": [...]}``); :func:`ingest.core.merge.merge` takes it out, so it never
#: reaches the backend. Not a FHIR element name (a backend refusing it shows a merge that missed it).
WITHDRAWN_KEY: Final = "ingest:withdrawn"


@dataclass(frozen=True)
class RejectionCode:
    """One rejection code (PS3.16 CID 7011 "Rejected for ..." codes in DCM).

    Attributes
    ----------
    value, meaning:
        Code Value and Code Meaning.
    entered_in_error:
        A study whose every instance is rejected for it gets ``entered-in-error`` whatever the setting.
    removes_bytes:
        The bytes of the instances it rejects are removed from the spool.
    """

    value: str
    meaning: str
    entered_in_error: bool
    removes_bytes: bool


#: The IOCM rejection codes ``ingest`` acts on, by Code Value (Coding Scheme Designator ``DCM``).
REJECTION_CODES: Final[Mapping[str, RejectionCode]] = {
    c.value: c
    for c in (
        RejectionCode("113001", "Rejected for Quality Reasons", entered_in_error=False, removes_bytes=False),
        RejectionCode(
            "113037", "Rejected for Patient Safety Reasons", entered_in_error=True, removes_bytes=True
        ),
        RejectionCode(
            "113038", "Incorrect Modality Worklist Entry", entered_in_error=True, removes_bytes=False
        ),
        RejectionCode("113039", "Data Retention Policy Expired", entered_in_error=False, removes_bytes=True),
    )
}
#: The quarantine reasons of a refused rejection note (:func:`note_refusal`).
REFUSED_NOT_ALLOWED: Final = "rejection_not_allowed"
REFUSED_PATIENT_MISMATCH: Final = "rejection_patient_mismatch"
# Which code an instance rejected several times counts under (the strongest first).
_PRECEDENCE: Final = ("113037", "113038", "113039", "113001")


@dataclass(frozen=True, order=True)
class Rejection:
    """One durable rejection: of an instance, a whole series (``sop_uid`` ``""``) or a whole study
    (``series_uid`` and ``sop_uid`` ``""``).

    Attributes
    ----------
    study_uid, series_uid, sop_uid:
        What is rejected (Study / Series / SOP Instance UID); ``""`` widens the scope.
    code:
        The rejection code value (a key of :data:`REJECTION_CODES`).
    note_uid:
        The SOP Instance UID of the note that made it; ``""`` for ``ingest reject``.
    patient:
        The note's :func:`patient_key`: only instances of that patient are covered; ``""`` (``ingest
        reject``) covers every patient's.
    """

    study_uid: str
    series_uid: str
    sop_uid: str
    code: str
    note_uid: str = ""
    patient: str = ""

    def covers(self, record: InstanceRecord) -> bool:
        """Whether this rejection applies to ``record`` (of its patient, when it has one)."""
        if not self.may_cover(record.study_uid, record.series_uid, record.sop_uid):
            return False  # (the UIDs first: the patient key is built only for an instance they name)
        return not self.patient or patient_key(record) == self.patient

    def may_cover(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        """Whether this rejection applies to the instance with these UIDs, its patient not considered
        (:meth:`covers` checks the patient too)."""
        if study_uid != self.study_uid:
            return False
        if self.sop_uid:
            return sop_uid == self.sop_uid
        return not self.series_uid or series_uid == self.series_uid


def patient_key(record: InstanceRecord) -> str:
    """The patient an instance belongs to, as one comparable string: Patient ID (0010,0020) with its
    Issuer of Patient ID (0010,0021) and Issuer of Patient ID Qualifiers' Universal Entity ID (PHI: never
    logged above DEBUG)."""
    return json.dumps(
        [record.patient_id or "", record.patient_id_issuer or "", record.patient_id_issuer_uid or ""]
    )


def note_refusal(
    note: InstanceRecord, *, sender_may_reject: bool, stored_patients: Mapping[str, Iterable[str]]
) -> str | None:
    """Why a rejection note may not be applied, or ``None`` when it may.

    Parameters
    ----------
    note:
        The note (a record :func:`rejection_code` says is one).
    sender_may_reject:
        Whether its sender may send rejections (``reject = true`` on its ``[listener]
        allowed_calling_aes`` entry; the drop folder and ``ingest replay`` always may).
    stored_patients:
        Per study the note names: the :func:`patient_key` s of its stored instances (notes excluded).

    Returns
    -------
    str | None
        :data:`REFUSED_NOT_ALLOWED`, :data:`REFUSED_PATIENT_MISMATCH` (a named study holds an instance
        of another patient), or ``None``.
    """
    if not sender_may_reject:
        return REFUSED_NOT_ALLOWED
    mine = patient_key(note)
    named = {r.study_uid for r in note_rejections(note)}
    for study_uid in sorted(named):
        if any(key != mine for key in stored_patients.get(study_uid, ())):
            return REFUSED_PATIENT_MISMATCH
    return None


def rejection_code(record: InstanceRecord) -> str | None:
    """The rejection code of a rejection note, or ``None`` when ``record`` is not one.

    A note is a Key Object Selection Document whose document title (0040,A043) is ``(1130xx, DCM)`` of
    :data:`REJECTION_CODES`; any other title, or another SOP class, is an ordinary instance.
    """
    if record.sop_class_uid != KEY_OBJECT_SELECTION:
        return None
    title = record.concept_code
    if title is None or title.designator != _DCM or title.value not in REJECTION_CODES:
        return None
    return title.value


def note_rejections(record: InstanceRecord) -> tuple[Rejection, ...]:
    """The rejections a note makes: one per instance its evidence (0040,A375) names, of the note's
    patient only; ``()`` for a record that is not a note. A note never rejects itself."""
    code = rejection_code(record)
    if code is None:
        return ()
    patient = patient_key(record)
    return tuple(
        sorted(
            {
                Rejection(ref.study_uid, ref.series_uid, ref.sop_uid, code, record.sop_uid, patient)
                for ref in record.evidence
                if ref.sop_uid != record.sop_uid
            }
        )
    )


def covering(record: InstanceRecord, rejections: Iterable[Rejection]) -> str | None:
    """The code under which ``rejections`` reject ``record`` (the strongest of those that cover it), or
    ``None``. A note is never rejected (it is left out as a note)."""
    if rejection_code(record) is not None:
        return None
    codes = {r.code for r in rejections if r.covers(record)}
    return next((code for code in _PRECEDENCE if code in codes), None)


def mark(records: Iterable[InstanceRecord], rejections: Sequence[Rejection]) -> list[InstanceRecord]:
    """``records`` with :attr:`~InstanceRecord.rejected_for` set from ``rejections`` (what the state store
    hands the relay)."""
    out: list[InstanceRecord] = []
    for record in records:
        code = covering(record, rejections) if rejections else None
        if code != record.rejected_for:
            record = record.model_copy(update={"rejected_for": code})
        out.append(record)
    return out


def apply_notes(records: Sequence[InstanceRecord]) -> list[InstanceRecord]:
    """``records`` with the rejections of the notes among them applied to those not marked yet: what a
    dry run (records not read back from the state store) needs before :func:`view`."""
    rules = [rule for record in records for rule in note_rejections(record)]
    if not rules:
        return list(records)
    return [r if r.rejected_for is not None else mark([r], rules)[0] for r in records]


def removes_bytes(code: str) -> bool:
    """Whether the bytes of instances rejected for ``code`` are removed from the spool (113037, 113039)."""
    known = REJECTION_CODES.get(code)
    return known is not None and known.removes_bytes


@dataclass(frozen=True)
class StudyView:
    """A study's records with its rejections applied (:func:`view`).

    Attributes
    ----------
    kept:
        The instances the ImagingStudy lists.
    rejected:
        Rejected instances (never listed).
    notes:
        Rejection notes (never listed).
    rejected_counts:
        Rejected instances per rejection code.
    status:
        The ImagingStudy.status when every instance is rejected; ``None`` otherwise (the mapping's).
    """

    kept: tuple[InstanceRecord, ...]
    rejected: tuple[InstanceRecord, ...]
    notes: tuple[InstanceRecord, ...]
    rejected_counts: Mapping[str, int] = field(default_factory=dict)
    status: str | None = None

    @property
    def withdrawn(self) -> dict[str, list[str]]:
        """What to take out of the backend's copy: the rejected instances and notes, and the series that
        hold no kept instance (:data:`WITHDRAWN_KEY`); empty lists when nothing is."""
        gone = [*self.rejected, *self.notes]
        kept_series = {r.series_uid for r in self.kept}
        return {
            "series": sorted({r.series_uid for r in gone} - kept_series),
            "instances": sorted({r.sop_uid for r in gone}),
        }


def view(records: Iterable[InstanceRecord], *, all_rejected_status: str = "cancelled") -> StudyView:
    """Split a study's records (marked by the state store, :func:`mark`) into kept, rejected and notes.

    Parameters
    ----------
    records:
        The study's records, :attr:`~InstanceRecord.rejected_for` set.
    all_rejected_status:
        ``[intake] all_rejected_status``: the status of a study whose every instance is rejected when not
        all of them are rejected for 113037 / 113038 (which always give ``entered-in-error``).

    Raises
    ------
    ValueError
        For an ``all_rejected_status`` outside :data:`ALL_REJECTED_STATUSES`.
    """
    if all_rejected_status not in ALL_REJECTED_STATUSES:
        raise ValueError(
            f"all_rejected_status {all_rejected_status!r} is not one of {', '.join(ALL_REJECTED_STATUSES)}"
        )
    kept: list[InstanceRecord] = []
    rejected: list[InstanceRecord] = []
    notes: list[InstanceRecord] = []
    for record in records:
        if rejection_code(record) is not None:
            notes.append(record)
        elif record.rejected_for is not None:
            rejected.append(record)
        else:
            kept.append(record)
    counts = Counter(r.rejected_for for r in rejected if r.rejected_for is not None)
    status: str | None = None
    if rejected and not kept:
        every_error = all(
            (code := REJECTION_CODES.get(r.rejected_for or "")) is not None and code.entered_in_error
            for r in rejected
        )
        status = ENTERED_IN_ERROR if every_error else all_rejected_status
    return StudyView(tuple(kept), tuple(rejected), tuple(notes), dict(sorted(counts.items())), status)


def withdraw(resource: Mapping[str, Any], withdrawn: Any) -> dict[str, Any]:
    """The backend's ImagingStudy JSON without what ``withdrawn`` (:data:`WITHDRAWN_KEY`'s value) names:
    those instances leave their series, and those series, and any series left without instances, leave
    the study (:func:`ingest.core.merge.merge` calls it before merging).

    Parameters
    ----------
    resource:
        The backend's copy (not modified).
    withdrawn:
        ``{"series": [uid...], "instances": [uid...]}``; anything else withdraws nothing.
    """
    out = dict(resource)
    if not isinstance(withdrawn, Mapping):
        return out
    gone_series = {u for u in withdrawn.get("series", ()) if isinstance(u, str)}
    gone = {u for u in withdrawn.get("instances", ()) if isinstance(u, str)}
    series = out.get("series")
    if not isinstance(series, list):
        return out
    kept: list[Any] = []
    for item in series:
        if not isinstance(item, Mapping):
            kept.append(item)
            continue
        if item.get("uid") in gone_series:
            continue
        instances = item.get("instance")
        if isinstance(instances, list):
            left = [i for i in instances if not (isinstance(i, Mapping) and i.get("uid") in gone)]
            if instances and not left:
                continue  # a series left empty is removed
            if len(left) != len(instances):
                item = {**item, "instance": left, "numberOfInstances": len(left)}
        kept.append(item)
    if kept:
        out["series"] = kept
    else:
        out.pop("series", None)
        out["numberOfSeries"] = 0
        out["numberOfInstances"] = 0
    return out
