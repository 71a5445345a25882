"""The listener's C-STORE answers: one Status (0000,0900) and Error Comment (0000,0902) per outcome.

``docs/reliability.md``, "C-STORE answers", is the table in prose; :data:`STATUS_TABLE` is the one
place the codes are written. Failure codes follow PS3.4 B.2.3: 0xA7xx out of resources, 0xA9xx data
set does not match SOP class, 0xCxxx cannot understand (each header problem its own code, so the
sender can tell them apart), 0x0110 processing failure (PS3.7 Annex C).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, NamedTuple

from pydicom.dataset import Dataset

__all__ = ["STATUS_TABLE", "Reply", "StatusEntry", "answer", "reply", "status_for"]

#: Longest Error Comment (0000,0902): VR LO (PS3.5 Table 6.2-1).
MAX_COMMENT: Final = 64


@dataclass(frozen=True)
class StatusEntry:
    """One C-STORE answer: the Status (0000,0900) and the Error Comment (0000,0902) sent with it."""

    status: int
    comment: str


#: Every C-STORE answer, by outcome (``docs/reliability.md`` table). Keys of the ``HeaderError.reason``
#: kind name header problems; the others are listener outcomes. Error Comments are at most 64 characters (LO).
STATUS_TABLE: Final[dict[str, StatusEntry]] = {
    "stored": StatusEntry(0x0000, ""),
    "duplicate": StatusEntry(0x0000, ""),
    "out_of_resources": StatusEntry(0xA700, "Out of resources: not stored, retry later"),
    "too_large": StatusEntry(0xA700, "Instance exceeds the size cap"),
    "intake_full": StatusEntry(0xA700, "Receiver busy: not stored, retry later"),
    "uid_mismatch": StatusEntry(0xA900, "Dataset SOP Class/Instance UID differs from command"),
    "not_dicom": StatusEntry(0xC000, "Cannot parse the dataset"),
    "truncated": StatusEntry(0xC001, "Dataset truncated: a value runs past the end"),
    "missing_tag": StatusEntry(0xC002, "Required UID missing"),
    "invalid_uid": StatusEntry(0xC003, "Invalid UID"),
    "nesting_too_deep": StatusEntry(0xC004, "Sequences nested too deep"),
    "inflate_cap": StatusEntry(0xC005, "Deflated dataset inflates beyond the cap"),
    "not_patient_instance": StatusEntry(0xC006, "Not a patient instance"),
    "too_many_references": StatusEntry(0xC007, "Key Object names more instances than the cap"),
    "invalid_header": StatusEntry(0xC00F, "Malformed dataset"),
    "conflict": StatusEntry(0xC010, "Conflicts with a stored instance of the same UID"),
    "internal": StatusEntry(0x0110, "Processing failure"),
}


def status_for(outcome: str) -> StatusEntry:
    """The :data:`STATUS_TABLE` entry of ``outcome``; unknown header reasons get ``invalid_header``."""
    return STATUS_TABLE.get(outcome, STATUS_TABLE["invalid_header"])


class Reply(NamedTuple):
    """A C-STORE response's Status (0000,0900) and Error Comment (0000,0902), without a data set."""

    status: int
    comment: str | None

    @classmethod
    def of(cls, rsp: Dataset) -> Reply:
        """The reply a response data set of :func:`answer` carries."""
        return cls(int(rsp.Status), str(rsp.ErrorComment) if "ErrorComment" in rsp else None)


def reply(outcome: str, detail: str | None = None) -> Reply:
    """The status and Error Comment for ``outcome`` (:func:`answer`'s parameters), without a data set
    (the event loop's path builds none)."""
    entry = status_for(outcome)
    if entry.status == 0x0000:
        return Reply(0x0000, None)
    return Reply(entry.status, (detail or entry.comment)[:MAX_COMMENT])


def answer(outcome: str, detail: str | None = None) -> Dataset:
    """The C-STORE response data set for ``outcome`` (what an EVT_C_STORE handler returns).

    Parameters
    ----------
    outcome:
        A :data:`STATUS_TABLE` key (unknown ones answer as ``invalid_header``).
    detail:
        An Error Comment to send instead of the table's, cut to 64 characters.
    """
    status, comment = reply(outcome, detail)
    rsp = Dataset()
    rsp.Status = status  # (0000,0900)
    if comment is not None:
        rsp.ErrorComment = comment  # (0000,0902) LO
    return rsp
