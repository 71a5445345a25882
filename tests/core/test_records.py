"""Tests for ingest.core.records: the record's stored JSON and its row (RecordRow)."""

from __future__ import annotations

import pickle

from ingest.core.records import InstanceRecord, PersonName, RecordRow


def _record() -> InstanceRecord:
    return InstanceRecord(
        study_uid="1.2.3", series_uid="1.2.3.1", sop_uid="1.2.3.1.1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_date="20240301",
        patient_name=PersonName(alphabetic="Yamada^Tarou", ideographic="山田^太郎"),
    )


def test_the_stored_json_reads_back_equal_from_text_and_from_bytes() -> None:
    record = _record()
    text = record.model_dump_json()
    assert InstanceRecord.from_json(text) == record == InstanceRecord.from_json(text.encode("utf-8"))


def test_a_row_carries_the_columns_and_the_json_of_its_record() -> None:
    record = _record()
    row = RecordRow.of(record)
    assert (row.study_uid, row.series_uid, row.sop_uid, row.sop_class_uid, row.study_date) == (
        "1.2.3", "1.2.3.1", "1.2.3.1.1", "1.2.840.10008.5.1.4.1.1.2", "20240301"
    )
    assert InstanceRecord.model_validate_json(row.json) == record
    assert row.record() is record  # made here: the record it was made from, not a copy


def test_a_pickled_row_is_its_strings_only_and_validates_its_json() -> None:
    record = _record()
    row = RecordRow.of(record)
    shipped = pickle.loads(pickle.dumps(row))  # what crosses from a parsing process
    assert shipped == row and shipped.made_from is None
    assert b"Yamada" not in pickle.dumps(row).replace(row.json.encode(), b"")  # no model pickled
    got = shipped.record()
    assert got == record and got is not record
