"""Fitting the documents to the backend schema (``ingest.adapters.graphql.fit``): pure, no server."""

from __future__ import annotations

import pytest
from graphql import build_schema, validate
from graphql import parse as gql_parse

from ingest.adapters.graphql.fit import fit_schema
from ingest.errors import ConfigError
from tests.adapters.graphql.test_sink import MEDPLUM_SDL, SPEC_SDL, study


def test_medplum_update_takes_imagingstudycreate_and_reads_everything() -> None:
    schema = build_schema(MEDPLUM_SDL)
    fit = fit_schema(schema)
    assert fit.update_res_type == "ImagingStudyCreate!"
    assert "$res: ImagingStudyCreate!" in fit.update
    assert "ImagingStudyUpdate(id: $id, res: $res)" in fit.update
    assert "_count: $count" in fit.search and fit.has_count
    for text in (fit.read, fit.search, fit.create, fit.update):
        assert text is not None
        assert validate(schema, gql_parse(text)) == []
        # Reference.resource (union) and reverse-lookup lists (nested resources) are never selected
        assert "resource {" not in text and "ObservationList" not in text
    # contained (a union) is read as a sentinel: which types are there, so a deeper read can fetch them
    assert fit.read is not None and "contained { __typename }" in fit.read
    # the read reaches instance level and the fields the merge must preserve
    assert fit.read is not None
    for fragment_field in ("series {", "instance {", "sopClass {", "note {", "basedOn {", "extension {"):
        assert fragment_field in fit.read


def test_spec_shaped_update_takes_the_resource_input_type() -> None:
    schema = build_schema(SPEC_SDL)
    fit = fit_schema(schema)
    assert fit.update_res_type == "ImagingStudy"
    assert "$res: ImagingStudy)" in fit.update and "ImagingStudyCreate!" not in fit.update
    assert "$id: ID," in fit.update
    assert not fit.has_count and "_count" not in fit.search
    assert "history" not in fit.search  # a field with a required argument cannot be selected
    assert validate(schema, gql_parse(fit.update)) == []


def test_schema_without_the_mutations_is_refused() -> None:
    sdl = "type Query { ImagingStudyList(identifier: String): [S] } type S { id: ID }"
    with pytest.raises(ConfigError, match="ImagingStudyCreate"):
        fit_schema(build_schema(sdl))


def test_prune_keeps_only_what_the_input_type_accepts() -> None:
    fit = fit_schema(build_schema(MEDPLUM_SDL))
    resource = study()
    resource["meta"] = {"versionId": "v1", "lastUpdated": "2026-01-01T00:00:00Z", "tag": [{"code": "x"}]}
    resource["contained"] = [{"resourceType": "Patient"}]
    resource["series"][0]["instance"][0]["bogus"] = "drop me"
    resource["note"] = [{"text": "kept", "authorString": None}]
    pruned, dropped = fit.prune(resource)
    assert dropped == ["contained", "meta.lastUpdated", "meta.versionId", "series[].instance[].bogus"]
    assert pruned["meta"] == {"tag": [{"code": "x"}]}
    assert "bogus" not in pruned["series"][0]["instance"][0]
    assert pruned["note"] == [{"text": "kept"}]
    assert pruned["series"][0]["instance"][1] == resource["series"][0]["instance"][1]

    spec = fit_schema(build_schema(SPEC_SDL))
    pruned, dropped = spec.prune(study())
    assert set(pruned) == {"resourceType", "status", "identifier"}
    assert "series" in dropped and "subject" in dropped


def test_sentinels_name_the_paths_a_read_cut_short_and_a_deeper_read_selects_only_those() -> None:
    from ingest.adapters.graphql.fit import deeper_read, graft, sentinel_paths, strip_typenames

    schema = build_schema(MEDPLUM_SDL)
    # a first answer: the third extension level and a contained resource came back as sentinels only
    first = {
        "id": "x",
        "meta": {"versionId": "1"},
        "extension": [{"url": "a", "extension": [{"url": "b", "extension": [{"__typename": "Extension"}]}]}],
        "contained": [{"__typename": "Observation"}],
        "series": [{"uid": "1.2", "modality": {"code": "CT"}}],
    }
    paths = sentinel_paths(first)
    assert paths == [("contained@Observation",), ("extension", "extension", "extension")]
    text = deeper_read(schema, paths)
    assert validate(schema, gql_parse(text)) == []
    assert "series" not in text and "... on Observation" in text and "meta { versionId }" in text
    deep = {
        "meta": {"versionId": "1"},
        "extension": [{"extension": [{"extension": [{"url": "c", "valueString": "v"}]}]}],
        "contained": [{"__typename": "Observation", "resourceType": "Observation", "id": "o1"}],
    }
    assert graft(first, deep)
    assert sentinel_paths(first) == []
    whole = strip_typenames(first)
    assert whole["extension"][0]["extension"][0]["extension"] == [{"url": "c", "valueString": "v"}]
    assert whole["contained"] == [{"resourceType": "Observation", "id": "o1"}]
    assert whole["series"] == [{"uid": "1.2", "modality": {"code": "CT"}}]


def test_answers_that_do_not_line_up_are_not_grafted() -> None:
    from ingest.adapters.graphql.fit import graft

    base = {"extension": [{"url": "a", "extension": [{"__typename": "Extension"}]}]}
    assert not graft(base, {"extension": [{"extension": [{}]}, {"extension": [{}]}]})  # another length


def test_a_contained_type_the_schema_lacks_cannot_be_read() -> None:
    from ingest.adapters.graphql.fit import deeper_read
    from ingest.errors import ForeignContentError

    with pytest.raises(ForeignContentError, match="Practitioner") as caught:
        deeper_read(build_schema(MEDPLUM_SDL), [("contained@Practitioner",)])
    assert caught.value.reason == "incomplete_read"
