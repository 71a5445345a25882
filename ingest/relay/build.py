"""Records of one study -> FHIR ImagingStudy JSON: the relay's build step (docs/architecture.md, "The data
flow": aggregate, then the mapping of docs/mapping.md), all of it in the pure core."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ingest.core.aggregate import aggregate
from ingest.core.mapping import MappingOptions, build_imaging_study
from ingest.core.records import InstanceRecord

__all__ = ["StudyBuilder"]

LOGGER = logging.getLogger(__name__)


class StudyBuilder:
    """Instance records of one study -> FHIR ImagingStudy JSON (pure core, wrapped).

    Parameters
    ----------
    options:
        The mapping's options (``ingest.app.wiring.mapping_options`` builds them from the settings).
    """

    def __init__(self, options: MappingOptions) -> None:
        self.options = options

    def __call__(self, records: Sequence[InstanceRecord]) -> dict[str, Any]:
        study, warnings = build_imaging_study(aggregate(records), self.options)
        for w in warnings:
            LOGGER.debug("mapping warning for study %s: %s", records[0].study_uid if records else "?", w)
        return study.to_fhir()
