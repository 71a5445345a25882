"""IOCM rejection notes and a study with its rejections applied (ingest.core.lifecycle), pure.

Expected values come from the issue's rules and PS3.16 CID 7011: (113001, DCM) quality, (113037, DCM)
patient safety, (113038, DCM) worklist entry, (113039, DCM) retention; 113037/113038 everywhere give
``entered-in-error``; 113037/113039 remove bytes.
"""

from __future__ import annotations

from typing import Any

import pytest

from ingest.core.lifecycle import (
    ENTERED_IN_ERROR,
    KEY_OBJECT_SELECTION,
    WITHDRAWN_KEY,
    Rejection,
    covering,
    mark,
    note_rejections,
    rejection_code,
    removes_bytes,
    view,
    withdraw,
)
from ingest.core.merge import merge, plan
from ingest.core.records import BackendStudy, Code, InstanceRecord, SopReference

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY = "1.2.826.0.1.3680043.2.1125.70"
S1, S2 = f"{STUDY}.1", f"{STUDY}.2"


def img(sop: str, series: str = S1, study: str = STUDY, **extra: Any) -> InstanceRecord:
    return InstanceRecord(study_uid=study, series_uid=series, sop_uid=sop, sop_class_uid=CT, **extra)


def kos(sop: str, code: str, refs: list[tuple[str, str]], designator: str = "DCM",
        sop_class: str = KEY_OBJECT_SELECTION) -> InstanceRecord:
    return InstanceRecord(
        study_uid=STUDY, series_uid=f"{STUDY}.99", sop_uid=sop, sop_class_uid=sop_class,
        concept_code=Code(designator=designator, value=code, meaning="title"),
        evidence=tuple(SopReference(study_uid=STUDY, series_uid=s, sop_uid=i) for s, i in refs),
    )


@pytest.mark.parametrize("code", ["113001", "113037", "113038", "113039"])
def test_a_kos_titled_with_a_rejection_code_is_a_note(code: str) -> None:
    assert rejection_code(kos("9.1", code, [])) == code


@pytest.mark.parametrize(
    "record",
    [
        kos("9.1", "113000", [(S1, "1.1")]),  # "Of Interest": an ordinary key object selection
        kos("9.1", "113001", [(S1, "1.1")], designator="99LOCAL"),  # a local code is no rejection
        kos("9.1", "113001", [(S1, "1.1")], sop_class="1.2.840.10008.5.1.4.1.1.88.11"),  # Basic Text SR
        img("1.1"),
    ],
    ids=["of-interest", "other-scheme", "other-sop-class", "image"],
)
def test_anything_else_is_an_ordinary_instance(record: InstanceRecord) -> None:
    assert rejection_code(record) is None
    assert note_rejections(record) == ()


def test_a_note_rejects_each_instance_its_evidence_names_but_never_itself() -> None:
    record = kos("9.1", "113001", [(S1, "1.1"), (S2, "2.1"), (f"{STUDY}.99", "9.1")])
    # the note has no Patient ID: its rejections cover only instances without one either
    no_patient = '["", "", ""]'
    assert note_rejections(record) == (
        Rejection(STUDY, S1, "1.1", "113001", "9.1", no_patient),
        Rejection(STUDY, S2, "2.1", "113001", "9.1", no_patient),
    )


def test_covering_by_instance_series_and_study_scope() -> None:
    one = Rejection(STUDY, S1, "1.1", "113001")
    series = Rejection(STUDY, S2, "", "113039")
    whole = Rejection(STUDY, "", "", "113038")
    assert covering(img("1.1"), [one]) == "113001"
    assert covering(img("1.2"), [one]) is None
    assert covering(img("2.7", S2), [series]) == "113039"
    assert covering(img("1.7", S1), [series]) is None
    assert covering(img("3.3", f"{STUDY}.3"), [whole]) == "113038"
    assert covering(img("1.1", study="1.2.3.4"), [whole, one]) is None  # another study


def test_the_strongest_code_counts_when_several_cover_an_instance() -> None:
    rules = [Rejection(STUDY, S1, "1.1", "113001"), Rejection(STUDY, "", "", "113037")]
    assert covering(img("1.1"), rules) == "113037"
    rules = [Rejection(STUDY, S1, "1.1", "113001"), Rejection(STUDY, S1, "", "113039")]
    assert covering(img("1.1"), rules) == "113039"


def test_a_note_is_never_covered_by_a_rejection_of_its_study() -> None:
    assert covering(kos("9.1", "113001", []), [Rejection(STUDY, "", "", "113001")]) is None


def test_view_of_a_partly_rejected_study() -> None:
    records = mark(
        [img("1.1"), img("1.2"), img("2.1", S2), kos("9.1", "113001", [(S1, "1.1"), (S2, "2.1")])],
        note_rejections(kos("9.1", "113001", [(S1, "1.1"), (S2, "2.1")])),
    )
    v = view(records)
    assert [r.sop_uid for r in v.kept] == ["1.2"]
    assert [r.sop_uid for r in v.rejected] == ["1.1", "2.1"]
    assert [r.sop_uid for r in v.notes] == ["9.1"]
    assert v.rejected_counts == {"113001": 2}
    assert v.status is None  # something is left: the mapping's status stands
    # series 2 is left empty (removed), series 1 keeps an instance; the note's series never shows
    assert v.withdrawn == {"series": sorted([S2, f"{STUDY}.99"]), "instances": ["1.1", "2.1", "9.1"]}


@pytest.mark.parametrize(
    ("codes", "setting", "status"),
    [
        (["113037", "113038"], "cancelled", ENTERED_IN_ERROR),  # never existed, whatever the setting
        (["113038", "113038"], "available", ENTERED_IN_ERROR),
        (["113001", "113001"], "cancelled", "cancelled"),  # the study did happen: the setting decides
        (["113039", "113039"], "unknown", "unknown"),
        (["113037", "113001"], "cancelled", "cancelled"),  # mixed: not all "never existed"
    ],
)
def test_status_when_every_instance_is_rejected(codes: list[str], setting: str, status: str) -> None:
    records = [img("1.1", rejected_for=codes[0]), img("1.2", rejected_for=codes[1])]
    v = view(records, all_rejected_status=setting)
    assert v.kept == () and v.status == status


def test_an_unknown_all_rejected_status_is_refused() -> None:
    with pytest.raises(ValueError, match="all_rejected_status 'final'"):
        view([img("1.1")], all_rejected_status="final")


def test_mark_leaves_unrejected_records_as_they_are() -> None:
    plain = img("1.2")
    out = mark([img("1.1"), plain], [Rejection(STUDY, S1, "1.1", "113001")])
    assert out[0].rejected_for == "113001" and out[1] is plain
    assert "rejected_for" not in out[0].model_dump_json()  # state, never stored with the header


def test_bytes_are_removed_for_patient_safety_and_retention_only() -> None:
    assert [c for c in ("113001", "113037", "113038", "113039", "999") if removes_bytes(c)] == [
        "113037",
        "113039",
    ]


def _theirs() -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": "abc",
        "status": "available",
        "numberOfSeries": 2,
        "numberOfInstances": 3,
        "series": [
            {"uid": S1, "numberOfInstances": 2, "instance": [{"uid": "1.1"}, {"uid": "1.2"}]},
            {"uid": S2, "numberOfInstances": 1, "instance": [{"uid": "2.1"}]},
        ],
    }


def test_withdraw_removes_instances_and_series_left_empty() -> None:
    out = withdraw(_theirs(), {"series": [], "instances": ["1.1", "2.1"]})
    assert out["series"] == [{"uid": S1, "numberOfInstances": 1, "instance": [{"uid": "1.2"}]}]
    assert _theirs()["series"][0]["numberOfInstances"] == 2  # the input is not modified


def test_withdraw_everything_leaves_no_series_and_zero_counts() -> None:
    out = withdraw(_theirs(), {"series": [S1], "instances": ["2.1"]})
    assert "series" not in out and out["numberOfSeries"] == 0 and out["numberOfInstances"] == 0


def test_withdraw_ignores_what_is_not_a_withdrawal() -> None:
    assert withdraw(_theirs(), ["1.1"]) == _theirs()
    bare = {"resourceType": "ImagingStudy"}
    assert withdraw(bare, {"instances": ["1.1"]}) == bare


def test_merge_takes_the_withdrawn_out_of_the_backend_copy_and_never_sends_the_key() -> None:
    ours = {
        "resourceType": "ImagingStudy",
        "status": "available",
        "numberOfSeries": 1,
        "numberOfInstances": 1,
        "series": [{"uid": S1, "numberOfInstances": 1, "instance": [{"uid": "1.2"}]}],
        WITHDRAWN_KEY: {"series": [S2], "instances": ["1.1", "2.1"]},
    }
    merged = merge(ours, _theirs())
    assert WITHDRAWN_KEY not in merged
    assert [s["uid"] for s in merged["series"]] == [S1]
    assert [i["uid"] for i in merged["series"][0]["instance"]] == ["1.2"]
    assert (merged["numberOfSeries"], merged["numberOfInstances"]) == (1, 1)
    # the same build again against what was written: nothing to write
    written = BackendStudy(id="abc", version_id="2", resource={**merged, "id": "abc"})
    assert type(plan(ours, written)).__name__ == "NoChange"


def test_merge_of_a_wholly_rejected_study_writes_entered_in_error_without_series() -> None:
    ours = {
        "resourceType": "ImagingStudy",
        "status": ENTERED_IN_ERROR,
        "numberOfSeries": 0,
        "numberOfInstances": 0,
        WITHDRAWN_KEY: {"series": [S1, S2], "instances": ["1.1", "1.2", "2.1"]},
    }
    merged = merge(ours, _theirs())
    assert merged["status"] == ENTERED_IN_ERROR
    assert "series" not in merged and (merged["numberOfSeries"], merged["numberOfInstances"]) == (0, 0)
