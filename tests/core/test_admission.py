"""The admission decision (ingest.core.admission): new, identical duplicate, or conflict.

The same expectations as the state store's contract tests (tests/adapters/state/test_state.py), decided
without a store.
"""

from __future__ import annotations

from ingest.core.admission import (
    CONFLICT_OTHER_CONTENT,
    CONFLICT_OTHER_STUDY,
    SUPERSEDES,
    Decision,
    Existing,
    Verdict,
    decide,
)
from ingest.core.records import InstanceRecord

CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
LEGACY = "ab" * 32  # a byte digest as stores before the content digest hold it (64 hex digits, no prefix)
CONTENT = "c1:" + "cd" * 32


def rec(study: str, series: str, sop: str, **extra: object) -> InstanceRecord:
    return InstanceRecord(study_uid=study, series_uid=series, sop_uid=sop, sop_class_uid=CT, **extra)  # type: ignore[arg-type]


def held(record: InstanceRecord, digest: str, *, as_json: bool = False) -> Existing:
    return Existing(record.study_uid, digest, record.model_dump_json() if as_json else record)


def test_nothing_held_is_added() -> None:
    assert decide(None, rec("1.2.3", "1.2.3.1", "1.2.3.1.1"), "d1") == Decision(Verdict.ADDED)


def test_identical_digest_is_a_duplicate() -> None:
    first = rec("1.2.3", "1.2.3.1", "1.2.3.1.1")
    assert decide(held(first, "d1"), first, "d1") == Decision(Verdict.DUPLICATE)


def test_same_sop_other_content_is_a_conflict() -> None:
    first = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", series_description="first")
    second = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", series_description="second")
    assert decide(held(first, "d1"), second, "d2") == Decision(Verdict.CONFLICT, CONFLICT_OTHER_CONTENT)
    assert CONFLICT_OTHER_CONTENT == "other_content"


def test_same_sop_in_another_study_is_a_conflict_whatever_the_digest() -> None:
    first = rec("1.2.3", "1.2.3.1", "9.9.9")
    other = rec("1.2.4", "1.2.4.1", "9.9.9")
    assert decide(held(first, "d1"), other, "d1") == Decision(Verdict.CONFLICT, CONFLICT_OTHER_STUDY)
    assert CONFLICT_OTHER_STUDY == "other_study"


def test_legacy_digest_and_equal_record_is_a_duplicate() -> None:
    first = rec(
        "1.2.3", "1.2.3.1", "1.2.3.1.1", series_description="s", transfer_syntax_uid="1.2.840.10008.1.2"
    )
    # the same instance re-sent in another transfer syntax, now with a content digest
    again = first.model_copy(update={"transfer_syntax_uid": "1.2.840.10008.1.2.1"})
    for as_json in (False, True):  # the stored record, or its JSON as a store holds it
        assert decide(held(first, LEGACY, as_json=as_json), again, CONTENT).verdict is Verdict.DUPLICATE


def test_legacy_digest_and_other_record_is_a_conflict() -> None:
    first = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", series_description="first")
    second = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", series_description="second")
    for as_json in (False, True):
        decision = decide(held(first, LEGACY, as_json=as_json), second, CONTENT)
        assert decision == Decision(Verdict.CONFLICT, CONFLICT_OTHER_CONTENT)


def test_same_scheme_other_digest_stays_a_conflict_with_an_equal_record() -> None:
    first = rec("1.2.3", "1.2.3.1", "1.2.3.1.1")
    # equal header record, other content (pixel data): only another scheme makes the record decide
    assert decide(held(first, "c1:" + "ab" * 32), first, CONTENT).verdict is Verdict.CONFLICT
    assert decide(held(first, "c1:" + "ab" * 32), first, LEGACY).verdict is Verdict.DUPLICATE


def test_a_stored_record_that_does_not_parse_is_not_the_same_instance() -> None:
    first = rec("1.2.3", "1.2.3.1", "1.2.3.1.1")
    broken = Existing("1.2.3", LEGACY, "{not json")
    assert decide(broken, first, CONTENT) == Decision(Verdict.CONFLICT, CONFLICT_OTHER_CONTENT)


# -- metadata-only instances (ingest sync: query answers, no bytes) ---------------------------------------

METADATA = "m1:" + "ef" * 32
METADATA_2 = "m1:" + "01" * 32


def test_metadata_only_never_replaces_a_record_that_came_with_its_bytes() -> None:
    full = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", study_description="from the header", instance_number=4)
    answers = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", instance_number=4)
    for stored in (CONTENT, LEGACY):
        assert decide(held(full, stored), answers, METADATA) == Decision(Verdict.DUPLICATE)


def test_the_same_answers_again_are_a_duplicate_and_other_answers_supersede() -> None:
    answers = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", instance_number=4)
    assert decide(held(answers, METADATA), answers, METADATA) == Decision(Verdict.DUPLICATE)
    changed = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", instance_number=5)
    assert decide(held(answers, METADATA), changed, METADATA_2) == Decision(Verdict.ADDED, SUPERSEDES)


def test_an_instance_with_its_bytes_takes_over_a_metadata_only_row() -> None:
    answers = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", instance_number=4)
    full = rec("1.2.3", "1.2.3.1", "1.2.3.1.1", study_description="from the header", instance_number=4)
    assert decide(held(answers, METADATA), full, CONTENT) == Decision(Verdict.ADDED, SUPERSEDES)
    # never across studies
    other = rec("9.9.9", "1.2.3.1", "1.2.3.1.1")
    assert decide(held(answers, METADATA), other, CONTENT) == Decision(Verdict.CONFLICT, CONFLICT_OTHER_STUDY)
