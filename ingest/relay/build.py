"""Records of one study -> FHIR ImagingStudy JSON: the relay's build step (docs/architecture.md, "The data
flow": lifecycle, aggregate, then the mapping of docs/mapping.md), all of it in the pure core.

The records come from the state store with their rejections marked (:mod:`ingest.core.lifecycle`);
the rejection notes among them are applied as well (a dry run's records are not the store's). Notes
and rejected instances are never listed. The ImagingStudy is built from the kept
instances; when every instance is rejected it is built from the rejected ones for its study-level
values, without series and with zero counts, and takes the lifecycle's status (``entered-in-error``
for 113037 / 113038, else ``[intake] all_rejected_status``). What the backend's copy must lose (the
rejected instances, notes and series left empty) travels under
:data:`ingest.core.lifecycle.WITHDRAWN_KEY` to the merge, which takes it out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ingest.core.aggregate import aggregate
from ingest.core.lifecycle import WITHDRAWN_KEY, apply_notes, view
from ingest.core.mapping import MappingOptions, build_imaging_study
from ingest.core.records import InstanceRecord
from ingest.errors import IngestError

__all__ = ["NothingToListError", "StudyBuilder"]

LOGGER = logging.getLogger(__name__)


class NothingToListError(IngestError):
    """A study whose every row is a rejection note: it has no instance to write yet."""


class StudyBuilder:
    """Instance records of one study -> FHIR ImagingStudy JSON (pure core, wrapped).

    Parameters
    ----------
    options:
        The mapping's options (``ingest.app.wiring.mapping_options`` builds them from the settings).
    all_rejected_status:
        ``[intake] all_rejected_status``: the status of a study whose every instance is rejected, unless
        all are rejected for 113037 / 113038 (``entered-in-error``).
    """

    def __init__(self, options: MappingOptions, *, all_rejected_status: str = "cancelled") -> None:
        self.options = options
        self.all_rejected_status = all_rejected_status

    def __call__(self, records: Sequence[InstanceRecord]) -> dict[str, Any]:
        """Build the ImagingStudy of ``records`` (module doc).

        Raises
        ------
        NothingToListError
            When every record is a rejection note.
        IngestError
            When the mapping refuses the records.
        """
        # the state store marks what its rejections cover; the notes among the records are applied here
        # too, so a dry run (records not from the store) leaves out what its own input rejects
        lifecycle = view(apply_notes(records), all_rejected_status=self.all_rejected_status)
        basis = lifecycle.kept or lifecycle.rejected
        if not basis:
            raise NothingToListError(
                f"study {records[0].study_uid if records else '?'} holds only rejection notes"
            )
        built, warnings = build_imaging_study(aggregate(basis), self.options)
        for w in warnings:
            LOGGER.debug("mapping warning for study %s: %s", basis[0].study_uid, w)
        study = built.to_fhir()
        if not lifecycle.kept:
            # every instance rejected: the study-level values stay, nothing is listed
            for key in ("series", "modality"):
                study.pop(key, None)
            study["numberOfSeries"] = 0
            study["numberOfInstances"] = 0
        if lifecycle.status is not None:
            study["status"] = lifecycle.status
        withdrawn = lifecycle.withdrawn
        if withdrawn["series"] or withdrawn["instances"]:
            study[WITHDRAWN_KEY] = withdrawn
        return study
