"""Tests for ingest.core.merge: merge with the backend copy, digest, plan."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fhir.resources.R4B.imagingstudy import ImagingStudy as R4BImagingStudy

from ingest.core.fhir import (
    Coding,
    Identifier,
    ImagingStudy,
    ImagingStudySeries,
    ImagingStudySeriesInstance,
    Reference,
)
from ingest.core.merge import Create, NoChange, Update, digest, merge, plan
from ingest.ports import BackendStudy

DCM = "http://dicom.nema.org/resources/ontology/DCM"
STUDY = "1.2.826.0.1.3680043.8.498.7"
MR_STORAGE = "urn:oid:1.2.840.10008.5.1.4.1.1.4"
UID_IDENTIFIER = {"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY}"}
ACSN_TYPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}


def check(resource: dict[str, Any]) -> dict[str, Any]:
    """Every ImagingStudy here must pass our strict model and the independent R4B model."""
    ImagingStudy.from_fhir(resource)
    R4BImagingStudy.model_validate(resource)
    return resource


def ours(series: dict[str, list[int]], *, modality: str = "MR", **extra: Any) -> dict[str, Any]:
    """Our ImagingStudy built with the models: ``series`` maps series suffix -> instance numbers."""
    built = ImagingStudy(
        identifier=[
            Identifier.model_validate(UID_IDENTIFIER),
            Identifier.model_validate({"type": ACSN_TYPE, "value": "ACC-1"}),
        ],
        status="available",
        modality=[Coding(system=DCM, code=modality)],
        subject=Reference(
            type="Patient", identifier=Identifier(system="urn:oid:1.2.3", value="PID-1"), display="Jane Doe"
        ),
        started="2024-05-01T10:15:00+02:00",
        description="MR HEAD",
        number_of_series=len(series),
        number_of_instances=sum(len(v) for v in series.values()),
        series=[
            ImagingStudySeries(
                uid=f"{STUDY}.{suffix}",
                number=int(suffix),
                modality=Coding(system=DCM, code=modality),
                number_of_instances=len(numbers),
                instance=[
                    ImagingStudySeriesInstance(
                        uid=f"{STUDY}.{suffix}.{n}", sop_class=Coding(code=MR_STORAGE), number=n
                    )
                    for n in numbers
                ],
            )
            for suffix, numbers in series.items()
        ],
    )
    return check(built.to_fhir() | extra)


def stored(resource: dict[str, Any], backend_id: str = "bk-1", version: str = "1") -> dict[str, Any]:
    """What a backend returns after storing ``resource``: id and meta added."""
    return {
        "resourceType": "ImagingStudy",
        "id": backend_id,
        "meta": {"versionId": version, "lastUpdated": "2024-05-01T10:20:00.000Z"},
        **{k: v for k, v in resource.items() if k != "resourceType"},
    }


def series_uids(resource: dict[str, Any]) -> list[str]:
    return [s["uid"] for s in resource["series"]]


def instance_uids(resource: dict[str, Any], series_uid: str) -> list[str]:
    series = next(s for s in resource["series"] if s["uid"] == series_uid)
    return [i["uid"] for i in series.get("instance", [])]


# ---------------------------------------------------------------------------------------------------


def test_no_backend_copy_creates_ours() -> None:
    mine = ours({"1": [1, 2]})
    result = plan(mine, None)
    assert isinstance(result, Create)
    assert result.resource == mine
    assert "meta" not in result.resource


def test_partial_study_pushed_twice_is_a_union() -> None:
    first = ours({"1": [1, 2]})
    backend = stored(first)
    second = ours({"2": [1, 2, 3]})  # e.g. another node saw only the second series
    merged = check(merge(second, backend))
    assert sorted(series_uids(merged)) == [f"{STUDY}.1", f"{STUDY}.2"]
    assert merged["numberOfSeries"] == 2
    assert merged["numberOfInstances"] == 5
    assert [s["numberOfInstances"] for s in merged["series"]] == [3, 2]
    assert merged["id"] == "bk-1"
    assert "meta" not in merged


def test_instances_of_a_series_are_a_union_and_ours_win_field_by_field() -> None:
    backend = stored(ours({"1": [1, 2]}))
    their_series = backend["series"][0]
    their_series["instance"][0]["title"] = "kept: a field we never set"
    their_series["instance"][0]["number"] = 99  # ours says 1
    their_series["instance"].append({"uid": f"{STUDY}.1.77", "sopClass": {"code": MR_STORAGE}})
    their_series["bodySite"] = {"system": "http://snomed.info/sct", "code": "69536005"}  # foreign field
    their_series["description"] = "old description"
    mine = ours({"1": [1, 3]})
    mine["series"][0]["description"] = "new description"

    merged = check(merge(mine, backend))
    series = merged["series"][0]
    assert sorted(instance_uids(merged, f"{STUDY}.1")) == sorted(
        [f"{STUDY}.1.1", f"{STUDY}.1.2", f"{STUDY}.1.3", f"{STUDY}.1.77"]
    )
    first = next(i for i in series["instance"] if i["uid"] == f"{STUDY}.1.1")
    assert first["number"] == 1
    assert first["title"] == "kept: a field we never set"
    assert series["bodySite"]["code"] == "69536005"
    assert series["description"] == "new description"
    assert series["numberOfInstances"] == 4
    assert merged["numberOfInstances"] == 4


def test_foreign_elements_are_kept() -> None:
    backend = stored(ours({"1": [1]}))
    backend["note"] = [{"text": "patient moved"}]
    backend["basedOn"] = [{"reference": "ServiceRequest/sr-1"}]
    backend["encounter"] = {"reference": "Encounter/e-1"}
    backend["extension"] = [{"url": "http://example.org/x", "valueString": "y"}]
    backend["identifier"].append({"system": "http://ris.example.org/id", "value": "R-9"})
    backend["description"] = "edited on the backend"  # owned: ours wins

    merged = check(merge(ours({"1": [1]}), backend))
    assert merged["note"] == [{"text": "patient moved"}]
    assert merged["basedOn"] == [{"reference": "ServiceRequest/sr-1"}]
    assert merged["encounter"] == {"reference": "Encounter/e-1"}
    assert merged["extension"] == [{"url": "http://example.org/x", "valueString": "y"}]
    assert {"system": "http://ris.example.org/id", "value": "R-9"} in merged["identifier"]
    assert UID_IDENTIFIER in merged["identifier"]
    assert len(merged["identifier"]) == 3
    assert merged["description"] == "MR HEAD"


def test_owned_identifiers_come_from_ours() -> None:
    backend = stored(ours({"1": [1]}))
    backend["identifier"] = [
        {"system": "urn:dicom:uid", "value": "urn:oid:9.9"},
        {"type": ACSN_TYPE, "value": "OLD-ACC"},
        {"system": "http://other", "value": "o"},
    ]
    merged = merge(ours({"1": [1]}), backend)
    assert merged["identifier"] == [
        UID_IDENTIFIER,
        {"type": ACSN_TYPE, "value": "ACC-1"},
        {"system": "http://other", "value": "o"},
    ]


@pytest.mark.parametrize("kept", ["cancelled", "entered-in-error"])
def test_terminal_backend_status_is_kept(kept: str) -> None:
    backend = stored(ours({"1": [1]}))
    backend["status"] = kept
    merged = merge(ours({"1": [1, 2]}), backend)
    assert merged["status"] == kept


@pytest.mark.parametrize("overwritten", ["registered", "available", "unknown", None])
def test_other_backend_status_is_overwritten(overwritten: str | None) -> None:
    backend = stored(ours({"1": [1]}))
    backend["status"] = overwritten
    assert merge(ours({"1": [1]}), backend)["status"] == "available"


def test_literal_subject_reference_is_never_replaced_by_a_logical_one() -> None:
    backend = stored(ours({"1": [1]}))
    backend["subject"] = {"reference": "Patient/p-42"}
    merged = check(merge(ours({"1": [1]}), backend))
    assert merged["subject"] == {"reference": "Patient/p-42"}

    # a logical reference on the backend is replaced by ours; a literal one of ours wins too
    backend["subject"] = {"identifier": {"system": "urn:x", "value": "old"}}
    assert merge(ours({"1": [1]}), backend)["subject"]["identifier"]["value"] == "PID-1"
    backend["subject"] = {"reference": "Patient/p-42"}
    mine = ours({"1": [1]}, subject={"reference": "Patient/p-43"})
    assert merge(mine, backend)["subject"] == {"reference": "Patient/p-43"}


def test_series_seen_only_by_the_backend_is_kept_with_its_modality() -> None:
    backend = stored(ours({"9": [1, 2, 3]}, modality="CT"))
    merged = check(merge(ours({"1": [1]}), backend))
    assert series_uids(merged) == [f"{STUDY}.1", f"{STUDY}.9"]
    assert instance_uids(merged, f"{STUDY}.9") == [f"{STUDY}.9.1", f"{STUDY}.9.2", f"{STUDY}.9.3"]
    assert merged["numberOfInstances"] == 4
    assert merged["numberOfSeries"] == 2
    assert [c["code"] for c in merged["modality"]] == ["MR", "CT"]


def test_without_instance_lists_our_counts_are_kept() -> None:
    mine = ours({"1": [1, 2, 3], "2": [1]})
    for series in mine["series"]:
        del series["instance"]  # include_instances = false
    backend = stored(ours({"1": [1]}))  # an older push with an instance list
    merged = check(merge(mine, backend))
    counts = {s["uid"]: s["numberOfInstances"] for s in merged["series"]}
    assert counts == {f"{STUDY}.1": 3, f"{STUDY}.2": 1}
    assert merged["numberOfInstances"] == 4
    assert "instance" not in next(s for s in merged["series"] if s["uid"] == f"{STUDY}.2")


def test_endpoint_only_replaced_when_ours_has_one() -> None:
    from ingest.core.merge import Written

    backend = stored(ours({"1": [1]}), backend_id="b")
    backend["endpoint"] = [{"reference": "Endpoint/theirs"}]
    assert merge(ours({"1": [1]}), backend)["endpoint"] == [{"reference": "Endpoint/theirs"}]
    mine = ours({"1": [1]}, endpoint=[{"reference": "Endpoint/ours"}])
    # without a record of the last write, nothing says Endpoint/theirs was ingest's: it stays beside ours
    both = [{"reference": "Endpoint/ours"}, {"reference": "Endpoint/theirs"}]
    assert merge(mine, backend)["endpoint"] == both
    # ingest wrote Endpoint/theirs last time (the configured URL changed since): replaced
    was = Written(ours=backend, subject=backend["subject"])
    assert merge(mine, backend, before=was)["endpoint"] == [{"reference": "Endpoint/ours"}]


def test_merge_does_not_modify_its_inputs() -> None:
    mine = ours({"1": [1, 2]})
    backend = stored(ours({"1": [3], "2": [1]}))
    backend["series"][0]["instance"].append(None)  # garbage and nulls from a GraphQL read
    before_mine, before_backend = copy.deepcopy(mine), copy.deepcopy(backend)
    merge(mine, backend)
    assert mine == before_mine
    assert backend == before_backend


def test_unchanged_study_is_no_change() -> None:
    mine = ours({"1": [1, 2], "2": [1]})
    backend = BackendStudy(id="bk-1", version_id="3", resource=stored(mine, version="3"))
    assert plan(mine, backend) == NoChange(backend_id="bk-1", version_id="3")


def _reverse_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reverse_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reverse_keys(v) for v in value]
    return value


def test_key_order_series_order_and_nulls_from_the_backend_are_no_change() -> None:
    mine = ours({"1": [1, 2], "2": [1, 2]})
    copy_ = _reverse_keys(stored(mine))
    copy_["series"].reverse()
    for series in copy_["series"]:
        series["instance"].reverse()
        series["laterality"] = None  # GraphQL returns null for absent elements
    copy_["note"] = None
    copy_["text"] = {"status": "generated", "div": "<div>narrative from the server</div>"}
    assert next(iter(copy_)) != "resourceType"
    assert plan(mine, BackendStudy(id="bk-1", version_id="1", resource=copy_)) == NoChange("bk-1", "1")


def test_a_new_instance_is_an_update_with_counts_recomputed() -> None:
    backend = BackendStudy(id="bk-1", version_id="1", resource=stored(ours({"1": [1, 2]})))
    result = plan(ours({"1": [1, 2, 3]}), backend)
    assert isinstance(result, Update)
    assert result.backend_id == "bk-1"
    resource = check(result.resource)
    assert list(resource)[:2] == ["resourceType", "id"]
    assert resource["id"] == "bk-1"
    assert "meta" not in resource
    assert resource["numberOfInstances"] == 3
    assert resource["series"][0]["numberOfInstances"] == 3
    # applying the update makes the next plan a no-op
    after = BackendStudy(id="bk-1", version_id="2", resource=stored(resource, version="2"))
    assert plan(ours({"1": [1, 2, 3]}), after) == NoChange("bk-1", "2")


def test_update_when_backend_changed_an_owned_element() -> None:
    backend = stored(ours({"1": [1]}))
    backend["started"] = "2020-01-01"
    result = plan(ours({"1": [1]}), BackendStudy(id="bk-1", version_id="1", resource=backend))
    assert isinstance(result, Update)
    assert result.resource["started"] == "2024-05-01T10:15:00+02:00"


def test_digest_ignores_id_meta_text_and_series_order_but_not_content() -> None:
    base = ours({"1": [1, 2], "2": [1]})
    assert len(digest(base)) == 64
    assert digest(base) == digest(stored(base, backend_id="other", version="9") | {"text": {"div": "x"}})
    shuffled = copy.deepcopy(base)
    shuffled["series"].reverse()
    assert digest(shuffled) == digest(base)
    changed = copy.deepcopy(base)
    changed["series"][0]["instance"][0]["number"] = 5
    assert digest(changed) != digest(base)
    reordered_identifiers = copy.deepcopy(base)
    reordered_identifiers["identifier"].reverse()  # order of other arrays is content
    assert digest(reordered_identifiers) != digest(base)


# -- corrections and other writers, with what ingest wrote before (docs/mapping.md, "The lifecycle") -------


def _with(resource: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(resource)
    out.update(changes)
    return out


def test_corrected_single_values_replace_what_ingest_wrote_and_foreign_additions_stay() -> None:
    from ingest.core.merge import Written

    before = ours({"1": [1, 2]})
    # another writer added a note, an identifier, an interpreter pointing at a contained resource, a
    # series extension and an instance title; the backend copy is what ingest wrote plus those
    theirs = stored(copy.deepcopy(before))
    theirs["note"] = [{"text": "reviewed"}]
    theirs["identifier"].append({"system": "urn:example:ris", "value": "R-9"})
    theirs["contained"] = [{"resourceType": "Practitioner", "id": "p1", "name": [{"family": "Reader"}]}]
    theirs["interpreter"] = [{"reference": "#p1"}]
    theirs["series"][0]["extension"] = [{"url": "urn:example:qa", "valueString": "ok"}]
    theirs["series"][0]["instance"][0]["title"] = "their title"
    # the corrected instance replaced the old one: new description, accession, start, body site
    now = ours({"1": [1, 2]}, description="MR HEAD corrected", started="2024-05-02T08:00:00+02:00")
    now["identifier"][1]["value"] = "ACC-2"
    now["series"][0]["bodySite"] = {"system": "http://snomed.info/sct", "code": "69536005"}

    merged = check(merge(now, theirs, before=Written(ours=before, subject=before["subject"])))

    # the new single values, never old and new side by side
    assert merged["description"] == "MR HEAD corrected"
    assert merged["started"] == "2024-05-02T08:00:00+02:00"
    accessions = [i["value"] for i in merged["identifier"] if "type" in i]
    assert accessions == ["ACC-2"]
    assert merged["series"][0]["bodySite"]["code"] == "69536005"
    # what the other writer added is kept as it was
    assert merged["note"] == [{"text": "reviewed"}]
    assert {"system": "urn:example:ris", "value": "R-9"} in merged["identifier"]
    assert merged["contained"] == theirs["contained"] and merged["interpreter"] == [{"reference": "#p1"}]
    assert merged["series"][0]["extension"] == [{"url": "urn:example:qa", "valueString": "ok"}]
    assert merged["series"][0]["instance"][0]["title"] == "their title"


def test_a_value_ingest_wrote_and_no_longer_has_is_removed_but_another_writers_stays() -> None:
    from ingest.core.merge import Written

    before = ours({"1": [1], "2": [1]}, description="OLD")
    theirs = stored(copy.deepcopy(before))
    theirs["series"][0]["description"] = "set by another writer"  # differs from what ingest wrote (none)
    # the correction moved series 2's only instance away: series 2 was ours and is gone now;
    # the description is no longer in the data
    now = ours({"1": [1]})
    now.pop("description")
    merged = check(merge(now, theirs, before=Written(ours=before, subject=before["subject"])))
    assert "description" not in merged
    assert [s["uid"] for s in merged["series"]] == [f"{STUDY}.1"]
    assert merged["numberOfSeries"] == 1 and merged["numberOfInstances"] == 1
    assert merged["series"][0]["description"] == "set by another writer"


def test_without_a_record_of_the_last_write_a_series_only_the_backend_has_stays() -> None:
    theirs = stored(ours({"1": [1], "2": [1]}))
    merged = merge(ours({"1": [1]}), theirs)
    assert len(merged["series"]) == 2  # nobody knows series 2 was ours: kept, as before this rule


def _subjects(pid: str) -> dict[str, Any]:
    return {"type": "Patient", "identifier": {"system": "urn:oid:1.2.3", "value": pid}, "display": "Jane Doe"}


def test_a_subject_without_a_patient_id_never_replaces_one_that_names_the_patient() -> None:
    from ingest.core.merge import Written

    absent = {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}
    unknown = {"type": "Patient", "extension": [absent]}
    theirs = stored(ours({"1": [1]}, subject=_subjects("PID-7")))  # another writer named the patient
    named_only = {"type": "Patient", "display": "J"}
    for mine in (ours({"1": [1]}, subject=unknown), ours({"1": [1]}, subject=named_only)):
        assert check(merge(mine, theirs))["subject"] == _subjects("PID-7")
        was = Written(ours=ours({"1": [1]}), subject=ours({"1": [1]})["subject"])  # PID-1 written before
        decision = plan(mine, BackendStudy(id="bk-1", version_id="2", resource=theirs), before=was)
        assert isinstance(decision, NoChange)  # neither refused nor overwritten
    # with nothing on the backend copy, ours is written as it is
    assert merge(ours({"1": [1]}, subject=unknown), None)["subject"] == unknown


def test_a_changed_patient_id_moves_the_subject() -> None:
    from ingest.core.merge import Written

    before = ours({"1": [1]}, subject=_subjects("PID-1"))
    theirs = BackendStudy(id="bk-1", version_id="1", resource=stored(before))
    now = ours({"1": [1]}, subject=_subjects("PID-2"))
    decision = plan(now, theirs, before=Written(ours=before, subject=before["subject"]))
    assert isinstance(decision, Update)
    assert decision.resource["subject"]["identifier"]["value"] == "PID-2"


def test_a_changed_patient_id_after_another_writer_changed_the_subject_is_refused() -> None:
    from ingest.core.merge import Refuse, Written

    before = ours({"1": [1]}, subject=_subjects("PID-1"))
    resource = stored(before)
    resource["subject"] = {"reference": "Patient/merged-elsewhere"}  # another writer re-linked it
    now = ours({"1": [1]}, subject=_subjects("PID-2"))
    decision = plan(
        now, BackendStudy(id="bk-1", version_id="2", resource=resource),
        before=Written(ours=before, subject=before["subject"]),
    )
    assert isinstance(decision, Refuse) and decision.reason == "subject_changed"
    # the same other writer's change with an unchanged Patient ID is kept, not overwritten
    same = plan(
        ours({"1": [1]}, subject=_subjects("PID-1")),
        BackendStudy(id="bk-1", version_id="2", resource=resource),
        before=Written(ours=before, subject=before["subject"]),
    )
    assert isinstance(same, NoChange)


# -- no record of the last write (fresh data dir, another node, lost state) ----------------------------------


def test_without_a_record_another_writers_interpreter_stays_when_ours_has_none() -> None:
    # another writer linked the reader to a contained Practitioner; the DICOM names no reading physician
    theirs = stored(ours({"1": [1]}))
    theirs["contained"] = [{"resourceType": "Practitioner", "id": "p1", "name": [{"family": "Reader"}]}]
    theirs["interpreter"] = [{"reference": "#p1"}]
    now = ours({"1": [1]})
    assert "interpreter" not in now
    merged = check(merge(now, theirs))
    assert merged["interpreter"] == [{"reference": "#p1"}]
    assert merged["contained"] == theirs["contained"]
    decision = plan(now, BackendStudy(id="bk-1", version_id="1", resource=theirs))
    assert isinstance(decision, NoChange)  # nothing of ours differs: nothing to write


def test_without_a_record_every_owned_value_ours_does_not_produce_is_kept() -> None:
    theirs = stored(ours({"1": [1, 2], "7": [1]}))
    theirs["referrer"] = {"display": "Dr Referrer"}
    theirs["interpreter"] = [{"display": "Dr Other"}]
    theirs["reasonCode"] = [{"text": "follow-up"}]
    theirs["procedureCode"] = [{"coding": [{"system": "http://loinc.org", "code": "24590-2"}]}]
    theirs["note"] = [{"text": "reviewed"}]
    theirs["basedOn"] = [{"reference": "ServiceRequest/sr-1"}]
    theirs["modality"].append({"system": DCM, "code": "PT"})
    theirs["series"][0]["bodySite"] = {"system": "http://snomed.info/sct", "code": "69536005"}
    theirs["series"][0]["performer"] = [{"actor": {"display": "Tech T"}}]
    theirs["series"][0]["instance"][0]["title"] = "their title"
    theirs["series"][0]["instance"].append(
        {"uid": f"{STUDY}.1.99", "sopClass": {"code": MR_STORAGE}, "number": 99}
    )
    now = ours({"1": [1, 2]}, interpreter=[{"display": "Dr Ours"}])
    now.pop("description")

    merged = check(merge(now, theirs))

    assert merged["description"] == "MR HEAD"  # ingest may have written it, but nothing says so: kept
    assert merged["referrer"] == {"display": "Dr Referrer"}
    assert merged["interpreter"] == [{"display": "Dr Ours"}, {"display": "Dr Other"}]
    assert merged["reasonCode"] == theirs["reasonCode"]
    assert merged["procedureCode"] == theirs["procedureCode"]
    assert merged["note"] == [{"text": "reviewed"}]
    assert merged["basedOn"] == [{"reference": "ServiceRequest/sr-1"}]
    assert [c["code"] for c in merged["modality"]] == ["MR", "PT"]
    assert series_uids(merged) == [f"{STUDY}.1", f"{STUDY}.7"]  # a series ingest does not know
    first = merged["series"][0]
    assert first["bodySite"]["code"] == "69536005"
    assert first["performer"] == [{"actor": {"display": "Tech T"}}]
    assert first["instance"][0]["title"] == "their title"
    assert instance_uids(merged, f"{STUDY}.1") == [f"{STUDY}.1.1", f"{STUDY}.1.2", f"{STUDY}.1.99"]
    assert first["numberOfInstances"] == 3
    assert merged["numberOfInstances"] == 4


def test_with_a_record_an_item_added_to_a_list_ingest_never_wrote_stays() -> None:
    from ingest.core.merge import Written

    # ingest wrote no interpreter last time; since then another writer added one, and today's DICOM names
    # a reading physician: both are kept
    before = ours({"1": [1]})
    theirs = stored(copy.deepcopy(before))
    theirs["interpreter"] = [{"display": "Dr Other"}]
    now = ours({"1": [1]}, interpreter=[{"display": "Dr Ours"}])
    merged = check(merge(now, theirs, before=Written(ours=before, subject=before["subject"])))
    assert merged["interpreter"] == [{"display": "Dr Ours"}, {"display": "Dr Other"}]


# ----------------------------------------------------------- basedOn / encounter (references)

def _logical(value: str) -> dict[str, Any]:
    return {"type": "ServiceRequest", "identifier": {"type": {"coding": [{"code": "ACSN"}]}, "value": value}}


def test_our_logical_order_becomes_literal_and_another_writers_order_stays() -> None:
    from ingest.core.merge import Written

    before = ours({"1": [1]}, basedOn=[_logical("A-1")])
    theirs = stored({**before, "basedOn": [_logical("A-1"), {"reference": "ServiceRequest/foreign"}]})
    now = ours({"1": [1]}, basedOn=[{**_logical("A-1"), "reference": "ServiceRequest/sr-1"}])
    merged = merge(now, theirs, before=Written(ours=before, subject=before.get("subject")))
    assert merged["basedOn"] == [{**_logical("A-1"), "reference": "ServiceRequest/sr-1"},
                                 {"reference": "ServiceRequest/foreign"}]
    # without a record: our earlier logical reference names the same order as today's literal one
    merged = merge(now, theirs)
    assert merged["basedOn"] == [{**_logical("A-1"), "reference": "ServiceRequest/sr-1"},
                                 {"reference": "ServiceRequest/foreign"}]


def test_a_literal_order_someone_linked_is_never_downgraded_to_our_logical_one() -> None:
    theirs = stored(ours({"1": [1]}, basedOn=[{**_logical("A-1"), "reference": "ServiceRequest/x"}]))
    merged = merge(ours({"1": [1]}, basedOn=[_logical("A-1")]), theirs)
    assert merged["basedOn"] == [{**_logical("A-1"), "reference": "ServiceRequest/x"}]


def test_another_writers_encounter_is_kept_ours_replaces_our_own() -> None:
    from ingest.core.merge import Written

    ours_visit = {"type": "Encounter", "identifier": {"value": "V-1"}}
    theirs = stored(ours({"1": [1]}, encounter={"reference": "Encounter/other"}))
    assert merge(ours({"1": [1]}, encounter=ours_visit), theirs)["encounter"] == {
        "reference": "Encounter/other"}
    before = ours({"1": [1]}, encounter=ours_visit)
    linked = {**ours_visit, "reference": "Encounter/e-1"}
    merged = merge(ours({"1": [1]}, encounter=linked), stored(before),
                   before=Written(ours=before, subject=before.get("subject")))
    assert merged["encounter"] == linked
