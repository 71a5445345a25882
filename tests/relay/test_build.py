"""``ingest.relay.build.StudyBuilder``: records of one study -> the core's ImagingStudy JSON, unchanged."""

from __future__ import annotations

import logging

import pytest

from ingest.core.aggregate import aggregate
from ingest.core.mapping import MappingOptions, build_imaging_study
from ingest.relay.build import StudyBuilder
from tests.relay.test_relay import STUDY_A, record


def test_builder_returns_the_pure_mappings_resource() -> None:
    records = [record(STUDY_A, 1, 1), record(STUDY_A, 1, 2), record(STUDY_A, 2, 1)]
    options = MappingOptions(include_instances=False, endpoint_reference="Endpoint/e1")
    study, _ = build_imaging_study(aggregate(records), options)
    built = StudyBuilder(options)(records)
    assert built == study.to_fhir()
    assert built["endpoint"] == [{"reference": "Endpoint/e1"}]
    assert built["numberOfInstances"] == 3 and "instance" not in built["series"][0]


def test_mapping_warnings_are_logged_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    bad = record(STUDY_A, 1, 1).model_copy(update={"study_date": "20241399"})  # not a calendar date
    with caplog.at_level(logging.DEBUG, logger="ingest.relay.build"):
        built = StudyBuilder(MappingOptions())([bad])
    assert "started" not in built
    warnings = [r for r in caplog.records if r.name == "ingest.relay.build"]
    assert warnings and all(r.levelno == logging.DEBUG for r in warnings)
    assert all(STUDY_A in r.getMessage() for r in warnings)
