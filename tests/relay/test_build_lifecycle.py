"""``StudyBuilder`` with rejections applied: notes and rejected instances are never listed, counts follow,
a wholly rejected study gets its status (ingest.relay.build, rules of ingest.core.lifecycle)."""

from __future__ import annotations

import pytest

from ingest.core.lifecycle import KEY_OBJECT_SELECTION, WITHDRAWN_KEY
from ingest.core.mapping import MappingOptions
from ingest.core.records import Code, InstanceRecord, SopReference
from ingest.relay.build import NothingToListError, StudyBuilder

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY = "1.2.826.0.1.3680043.2.1125.95"
S1, S2, S9 = f"{STUDY}.1", f"{STUDY}.2", f"{STUDY}.9"


def img(sop: str, series: str = S1, rejected: str | None = None) -> InstanceRecord:
    return InstanceRecord(
        study_uid=STUDY, series_uid=series, sop_uid=sop, sop_class_uid=CT, modality="CT",
        study_description="Chest", series_number=int(series.rsplit(".", 1)[1]), rejected_for=rejected,
    )


NOTE = InstanceRecord(
    study_uid=STUDY, series_uid=S9, sop_uid=f"{S9}.1", sop_class_uid=KEY_OBJECT_SELECTION, modality="KO",
    concept_code=Code(designator="DCM", value="113001", meaning="Rejected for Quality Reasons"),
    evidence=(SopReference(study_uid=STUDY, series_uid=S1, sop_uid=f"{S1}.1"),),
)


def test_rejected_instances_and_notes_are_not_listed() -> None:
    built = StudyBuilder(MappingOptions())(
        [img(f"{S1}.1", rejected="113001"), img(f"{S1}.2"), img(f"{S2}.1", S2, rejected="113001"), NOTE]
    )
    assert [s["uid"] for s in built["series"]] == [S1]
    assert [i["uid"] for i in built["series"][0]["instance"]] == [f"{S1}.2"]
    assert (built["numberOfSeries"], built["numberOfInstances"]) == (1, 1)
    assert [m["code"] for m in built["modality"]] == ["CT"]  # the note's KO is not a modality of the study
    assert built["status"] == "available"
    assert built[WITHDRAWN_KEY] == {"series": [S2, S9], "instances": [f"{S1}.1", f"{S2}.1", f"{S9}.1"]}


def test_a_study_rejected_for_a_worklist_error_is_entered_in_error_without_series() -> None:
    records = [img(f"{S1}.1", rejected="113038"), img(f"{S2}.1", S2, rejected="113038")]
    built = StudyBuilder(MappingOptions())(records)
    assert built["status"] == "entered-in-error"
    assert "series" not in built and "modality" not in built
    assert (built["numberOfSeries"], built["numberOfInstances"]) == (0, 0)
    assert built["description"] == "Chest"  # the study itself is still described
    assert built[WITHDRAWN_KEY]["series"] == [S1, S2]


@pytest.mark.parametrize("setting", ["cancelled", "unknown"])
def test_a_study_rejected_for_quality_takes_the_configured_status(setting: str) -> None:
    builder = StudyBuilder(MappingOptions(), all_rejected_status=setting)
    built = builder([img(f"{S1}.1", rejected="113001"), NOTE])
    assert built["status"] == setting


def test_a_study_without_rejections_is_the_plain_mapping() -> None:
    built = StudyBuilder(MappingOptions())([img(f"{S1}.1")])
    assert WITHDRAWN_KEY not in built and built["numberOfInstances"] == 1


def test_notes_alone_have_nothing_to_list() -> None:
    with pytest.raises(NothingToListError, match="only rejection notes"):
        StudyBuilder(MappingOptions())([NOTE])


def test_notes_among_unmarked_records_are_applied_as_a_dry_run_needs() -> None:
    built = StudyBuilder(MappingOptions())([img(f"{S1}.1"), img(f"{S1}.2"), NOTE])  # NOTE rejects S1.1
    assert [i["uid"] for i in built["series"][0]["instance"]] == [f"{S1}.2"]
