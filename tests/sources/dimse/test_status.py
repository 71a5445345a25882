"""The C-STORE status table (``ingest.sources.dimse.status``; docs/reliability.md, "C-STORE answers")."""

from __future__ import annotations

import pytest

from ingest import errors
from ingest.sources.dimse.status import STATUS_TABLE, Reply, answer, reply, status_for


def _header_error_reasons() -> set[str]:
    found: set[str] = set()
    todo: list[type[errors.HeaderError]] = [errors.HeaderError]
    while todo:
        cls = todo.pop()
        found.add(cls.reason)
        todo.extend(cls.__subclasses__())
    return found


def test_status_table_codes_are_distinct_per_rejection_reason() -> None:
    failures = {k: v.status for k, v in STATUS_TABLE.items() if 0xC000 <= v.status <= 0xCFFF}
    assert len(set(failures.values())) == len(failures)
    assert STATUS_TABLE["uid_mismatch"].status == 0xA900
    assert all(len(v.comment) <= 64 for v in STATUS_TABLE.values())


def test_every_header_error_reason_has_its_own_entry() -> None:
    assert _header_error_reasons() <= set(STATUS_TABLE)


def test_an_unknown_outcome_answers_as_a_malformed_dataset() -> None:
    assert status_for("something_new") == STATUS_TABLE["invalid_header"]


@pytest.mark.parametrize("outcome", ["stored", "duplicate"])
def test_success_carries_no_error_comment(outcome: str) -> None:
    rsp = answer(outcome)
    assert rsp.Status == 0x0000
    assert "ErrorComment" not in rsp


def test_a_failure_carries_its_comment_or_the_detail_cut_to_64() -> None:
    rsp = answer("too_large")
    assert (rsp.Status, rsp.ErrorComment) == (0xA700, STATUS_TABLE["too_large"].comment)
    assert answer("internal", "x" * 100).ErrorComment == "x" * 64


@pytest.mark.parametrize("outcome", [*sorted(STATUS_TABLE), "some_unknown_reason"])
def test_the_loops_reply_says_what_the_response_data_set_says(outcome: str) -> None:
    long = "x" * 100
    assert reply(outcome) == Reply.of(answer(outcome))
    assert reply(outcome, long) == Reply.of(answer(outcome, long))
    expected = STATUS_TABLE.get(outcome, STATUS_TABLE["invalid_header"])
    assert reply(outcome).status == expected.status
    assert reply(outcome, long).comment == (None if expected.status == 0 else "x" * 64)
