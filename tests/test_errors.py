"""Tests for ingest.errors: the exception tree its docstring draws is the tree the module defines.

Also: every error is an :class:`IngestError`; retryable and permanent failures never overlap
(docs/reliability.md "Faults and what survives them"); each :class:`HeaderError` kind has its own reason.
"""

from __future__ import annotations

import inspect
import re

import pytest

from ingest import errors
from ingest.errors import (
    HeaderError,
    IngestError,
    MultipleMatchesError,
    PermanentSinkError,
    RetryableSinkError,
    SinkError,
    StoreError,
    StoreUnavailableError,
)


def _classes() -> dict[str, type[BaseException]]:
    return {
        name: cls
        for name, cls in vars(errors).items()
        if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == errors.__name__
    }


def _drawn_tree() -> dict[str, str | None]:
    """Class name -> parent name, as the module docstring draws it (indentation is the depth)."""
    assert errors.__doc__ is not None
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in errors.__doc__.splitlines():
        match = re.match(r"^[\s│├└─]*?(\w+Error)\b", line)
        if match is None or not line.startswith("    "):
            continue
        column = match.start(1)
        while stack and stack[-1][0] >= column:
            stack.pop()
        parents[match.group(1)] = stack[-1][1] if stack else None
        stack.append((column, match.group(1)))
    return parents


def test_the_drawn_tree_is_the_class_tree() -> None:
    drawn = _drawn_tree()
    classes = _classes()
    assert set(drawn) == set(classes)
    assert drawn["IngestError"] is None
    for name, parent in drawn.items():
        expected = Exception if parent is None else classes[parent]
        assert classes[name].__bases__ == (expected,), name


def test_every_error_is_exported_and_an_ingest_error() -> None:
    classes = _classes()
    assert set(errors.__all__) == set(classes)
    for cls in classes.values():
        assert issubclass(cls, IngestError), cls


def test_retryable_and_permanent_failures_do_not_overlap() -> None:
    retryable = (RetryableSinkError, StoreUnavailableError)
    never_retried = (PermanentSinkError, HeaderError)
    for cls in _classes().values():
        assert not (issubclass(cls, retryable) and issubclass(cls, never_retried)), cls
    # two backend resources with one study identifier: dead-lettered, never guessed (docs/reliability.md)
    assert issubclass(MultipleMatchesError, PermanentSinkError)
    assert not issubclass(MultipleMatchesError, RetryableSinkError)
    assert issubclass(RetryableSinkError, SinkError) and issubclass(PermanentSinkError, SinkError)
    assert issubclass(StoreUnavailableError, StoreError) and not issubclass(StoreUnavailableError, SinkError)
    assert not issubclass(HeaderError, SinkError | StoreError)


def test_sink_errors_carry_the_code_and_the_retry_hint() -> None:
    exc = RetryableSinkError("HTTP 429", code=429, retry_after=2.5)
    assert (str(exc), exc.code, exc.retry_after) == ("HTTP 429", 429, 2.5)
    plain = PermanentSinkError("validation failed")
    assert (plain.code, plain.retry_after) == (None, None)


def _header_errors() -> list[type[HeaderError]]:
    return [cls for cls in _classes().values() if issubclass(cls, HeaderError)]


def test_each_header_error_kind_has_its_own_reason_code() -> None:
    kinds = _header_errors()
    assert len(kinds) > 1
    for cls in kinds:
        assert "reason" in vars(cls), f"{cls.__name__} inherits its reason"
        assert re.fullmatch(r"[a-z][a-z_]*", cls.reason), cls.reason
    reasons = [cls.reason for cls in kinds]
    assert len(set(reasons)) == len(reasons), reasons


@pytest.mark.parametrize("cls", _header_errors(), ids=lambda cls: cls.__name__)
def test_header_errors_keep_tag_and_uid_and_expose_the_reason(cls: type[HeaderError]) -> None:
    exc = cls("StudyInstanceUID is missing", tag="StudyInstanceUID", uid="1.2.3")
    assert (str(exc), exc.tag, exc.uid, exc.reason) == (
        "StudyInstanceUID is missing",
        "StudyInstanceUID",
        "1.2.3",
        cls.reason,
    )
    bare = cls("not DICOM")
    assert (bare.tag, bare.uid) == (None, None)
