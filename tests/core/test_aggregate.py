"""Instance records -> study aggregate: order independence, idempotence, conflicts."""

from __future__ import annotations

from functools import reduce
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.core.aggregate import StudyAggregate, add, aggregate, distinct, pick
from ingest.core.records import InstanceRecord
from ingest.errors import HeaderError, InstanceConflictError

STUDY = "1.2.826.0.1.3680043.8.498.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def rec(sop: str, series: str = "1", **fields: Any) -> InstanceRecord:
    return InstanceRecord(
        study_uid=fields.pop("study_uid", STUDY),
        series_uid=f"{STUDY}.{series}",
        sop_uid=f"{STUDY}.{series}.{sop}",
        sop_class_uid=CT,
        **fields,
    )


RECORDS = [
    rec("1", "1", series_number=2, study_description="Chest", instance_number=1),
    rec("2", "1", series_number=2, study_description="Chest", instance_number=2),
    rec("3", "1", series_number=2, study_description="CHEST CT", instance_number=3),
    rec("1", "2", series_number=1, study_description="Chest", modality="SR"),
    rec("1", "3", modality="KO"),
    rec("9", "4", series_number=1, modality="MR"),
]


@settings(max_examples=60, deadline=None)
@given(st.permutations(RECORDS))
def test_order_independent(order: list[InstanceRecord]) -> None:
    expected = aggregate(RECORDS)
    assert aggregate(order) == expected
    assert reduce(add, order, None) == expected
    assert aggregate(order).series == expected.series


@settings(max_examples=30, deadline=None)
@given(st.permutations(RECORDS), st.lists(st.sampled_from(RECORDS), max_size=6))
def test_readding_the_same_records_changes_nothing(
    order: list[InstanceRecord], again: list[InstanceRecord]
) -> None:
    expected = aggregate(RECORDS)
    assert reduce(add, again, aggregate(order)) == expected


def test_readding_a_sop_instance_replaces_it() -> None:
    agg = aggregate(RECORDS)
    changed = RECORDS[0].model_copy(update={"instance_number": 42})
    after = add(agg, changed)
    assert after.number_of_instances == agg.number_of_instances
    assert after.get(changed.sop_uid) == changed
    assert after != agg


def test_add_starts_a_new_aggregate() -> None:
    agg = add(None, RECORDS[0])
    assert agg == StudyAggregate(STUDY, (RECORDS[0],))


def test_record_of_another_study_is_rejected() -> None:
    stranger = rec("1", "1", study_uid="1.2.3.4")
    with pytest.raises(InstanceConflictError) as excinfo:
        add(aggregate(RECORDS), stranger)
    assert isinstance(excinfo.value, HeaderError)
    assert excinfo.value.uid == stranger.sop_uid
    with pytest.raises(InstanceConflictError):
        aggregate([*RECORDS, stranger])


def test_empty_input_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        aggregate([])


def test_counts() -> None:
    agg = aggregate(RECORDS)
    assert agg.number_of_series == 4
    assert agg.number_of_instances == 6


def test_series_ordered_by_number_then_uid_without_number_last() -> None:
    agg = aggregate(RECORDS)
    assert [s.series_uid[-1] for s in agg.series] == ["2", "4", "1", "3"]
    assert [s.number for s in agg.series] == [1, 1, 2, None]
    assert [len(s.instances) for s in agg.series] == [1, 1, 3, 1]


def test_study_value_is_the_most_common() -> None:
    agg = aggregate(RECORDS)
    assert agg.value(lambda r: r.study_description) == "Chest"
    assert distinct(agg.instances, lambda r: r.study_description) == 2


def test_the_most_common_value_beats_the_lowest_sop_instance_uid() -> None:
    records = [
        rec("1", study_description="Odd"),
        rec("2", study_description="Usual"),
        rec("3", study_description="Usual"),
    ]
    assert pick(records, lambda r: r.study_description) == "Usual"


def test_ties_go_to_the_lowest_sop_instance_uid() -> None:
    records = [rec("2", study_description="B"), rec("1", study_description="A")]
    assert pick(records, lambda r: r.study_description) == "A"
    assert pick(reversed(records), lambda r: r.study_description) == "A"


def test_blank_values_do_not_count() -> None:
    records = [rec("1", study_description="  "), rec("2", study_description="X"), rec("3")]
    assert pick(records, lambda r: r.study_description) == "X"
    assert pick(records, lambda r: r.accession_number) is None
    assert pick(records, lambda r: r.reading_physicians) is None
