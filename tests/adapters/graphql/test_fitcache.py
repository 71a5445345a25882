"""The fitted documents kept per schema fingerprint in the data dir (``ingest.adapters.graphql.fitcache``).

A hit must give the very documents a fresh fit gives, without validating them again; a changed schema or
depth is another entry; a damaged entry is a miss that is rewritten.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from graphql import build_schema, print_ast

from ingest.adapters.graphql import fitcache
from ingest.adapters.graphql.fit import SchemaFit, fit_schema
from tests.adapters.graphql.test_sink import MEDPLUM_SDL, SPEC_SDL


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    fitcache.use_dir(tmp_path)
    yield tmp_path
    fitcache.use_dir(None)


def _same(a: SchemaFit, b: SchemaFit) -> None:
    assert (a.read, a.search, a.create, a.update) == (b.read, b.search, b.create, b.update)
    assert a.has_count == b.has_count
    for fit in (a, b):  # each fit's input types are those of its own schema
        assert fit.input_type is fit.schema.type_map[fit.input_type.name]
        assert fit.create_input_type is fit.schema.type_map[fit.create_input_type.name]
    assert (a.input_type.name, a.create_input_type.name) == (b.input_type.name, b.create_input_type.name)
    assert a.documents.keys() == b.documents.keys()
    for key in a.documents:
        assert print_ast(a.documents[key]) == print_ast(b.documents[key])


def _entries(data_dir: Path) -> list[Path]:
    return sorted((data_dir / fitcache.CACHE_FOLDER).glob("*.json"))


def _no_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("validated again")

    monkeypatch.setattr("ingest.adapters.graphql.fit.validate", refuse)


@pytest.mark.parametrize("sdl", [MEDPLUM_SDL, SPEC_SDL], ids=["medplum", "spec"])
def test_a_second_fit_of_the_same_schema_is_read_back_without_validation(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, sdl: str
) -> None:
    schema = build_schema(sdl)
    first = fitcache.cached_fit(schema, max_depth=7)
    _same(first, fit_schema(schema, max_depth=7))
    [entry] = _entries(data_dir)
    assert entry.stat().st_mode & 0o077 == 0 or entry.parent.stat().st_mode & 0o077 == 0
    _no_validation(monkeypatch)
    second = fitcache.cached_fit(build_schema(sdl), max_depth=7)  # another process: a schema built anew
    assert second.schema is not first.schema
    _same(second, fitcache.cached_fit(build_schema(sdl), max_depth=7))
    assert (second.read, second.search, second.create, second.update) == (
        first.read, first.search, first.create, first.update,
    )


def test_another_schema_or_depth_is_another_entry(data_dir: Path) -> None:
    fitcache.cached_fit(build_schema(MEDPLUM_SDL), max_depth=7)
    fitcache.cached_fit(build_schema(MEDPLUM_SDL), max_depth=3)
    fitcache.cached_fit(build_schema(SPEC_SDL), max_depth=7)
    assert len(_entries(data_dir)) == 3
    assert fitcache.fingerprint(build_schema(MEDPLUM_SDL), 7) != fitcache.fingerprint(
        build_schema(MEDPLUM_SDL), 3
    )


@pytest.mark.parametrize(
    "damage",
    ["not json", "[]", json.dumps({"search": "query {"}), "TEXTS_WITH_A_FOREIGN_LINE"],
    ids=["garbage", "not-an-object", "missing-and-unparsable", "foreign-line"],
)
def test_a_damaged_entry_is_a_miss_and_is_rewritten(data_dir: Path, damage: str) -> None:
    schema = build_schema(MEDPLUM_SDL)
    fresh = fitcache.cached_fit(schema, max_depth=7)
    [entry] = _entries(data_dir)
    if damage == "TEXTS_WITH_A_FOREIGN_LINE":
        texts = json.loads(entry.read_text())
        texts["search"] += "\nquery Extra { __typename }"
        damage = json.dumps(texts)
    entry.write_text(damage)
    again = fitcache.cached_fit(schema, max_depth=7)
    _same(again, fresh)
    assert json.loads(entry.read_text())["search"] == fresh.search


def test_without_a_data_dir_nothing_is_written(tmp_path: Path) -> None:
    fitcache.use_dir(None)
    fit = fitcache.cached_fit(build_schema(MEDPLUM_SDL), max_depth=7)
    assert fit.search
    assert not list(tmp_path.rglob("*.json"))
