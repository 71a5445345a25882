"""ImagingStudy.text: the generated narrative and who owns it in a merge (docs/mapping.md, "Narrative").

fhir.resources does not look inside ``Narrative.div`` (nor does Medplum's validator), so the XHTML rules
are checked here directly: the div parses as XML, its root is an XHTML ``div``, it uses only the simple
elements docs/mapping.md lists, no attribute but the marker class, and some text (FHIR txt-1, txt-2).
"""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET
from typing import Any

from fhir.resources.R4B.imagingstudy import ImagingStudy as R4BImagingStudy
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.core.aggregate import aggregate
from ingest.core.fhir import ImagingStudy
from ingest.core.mapping import MappingOptions, build_imaging_study
from ingest.core.merge import Create, NoChange, Update, merge, plan
from ingest.core.narrative import MARKER_CLASS, XHTML_NS, RejectedInstance, is_ingest_narrative, narrative
from ingest.core.records import BackendStudy, InstanceRecord

STUDY = "1.2.826.0.1.3680043.8.498.91"
CT = "1.2.840.10008.5.1.4.1.1.2"
NASTY = "Thorax & Abdomen \"CT\" 胸部 <script>alert(1)</script> 'x'"
ALLOWED = {"div", "p", "table", "thead", "tbody", "tr", "th", "td", "b", "span", "ul", "li", "br"}
NS = f"{{{XHTML_NS}}}"


def rec(series: str, sop: str, **fields: Any) -> InstanceRecord:
    defaults: dict[str, Any] = {
        "sop_class_uid": CT,
        "modality": "CT",
        "patient_id": "PID-1",
        "study_date": "20240115",
        "study_time": "083000",
        "accession_number": "ACC-7",
        "study_description": NASTY,
        "series_number": int(series),
        "body_part": "CHEST",
    }
    defaults.update(fields)
    return InstanceRecord(
        study_uid=STUDY, series_uid=f"{STUDY}.{series}", sop_uid=f"{STUDY}.{series}.{sop}", **defaults
    )


def ours(records: list[InstanceRecord] | None = None) -> dict[str, Any]:
    """Our ImagingStudy as the mapping builds it (two CT series by default)."""
    if records is None:
        records = [rec("2", "1"), rec("2", "2"), rec("10", "1", series_description="Lung <b>window</b>")]
    study, _ = build_imaging_study(aggregate(records), MappingOptions())
    return study.to_fhir()


def check(resource: dict[str, Any]) -> dict[str, Any]:
    """Valid for our strict model and for fhir.resources' R4B model, and a well-formed narrative."""
    ImagingStudy.from_fhir(resource)
    R4BImagingStudy.model_validate(resource)
    assert resource["text"]["status"] == "generated"
    xhtml(resource["text"]["div"])
    return resource


def xhtml(div: str) -> ET.Element:
    """Parse ``div`` and check the FHIR narrative rules docs/mapping.md names."""
    root = ET.fromstring(div)
    assert root.tag == f"{NS}div"
    assert root.attrib == {"class": MARKER_CLASS}
    for element in root.iter():
        assert element.tag.startswith(NS), element.tag
        assert element.tag.removeprefix(NS) in ALLOWED, element.tag
        if element is not root:
            assert element.attrib == {}, element.attrib  # no on*, href, src, style ...
    assert "".join(root.itertext()).strip()  # txt-2: some non-whitespace content
    return root


def study_cell(div: str, label: str) -> str:
    """The exact text of the study table's cell labelled ``label``."""
    root = xhtml(div)
    for row in root.iter(f"{NS}tr"):
        th, td = row.find(f"{NS}th"), row.find(f"{NS}td")
        if th is not None and td is not None and th.text == label:
            return "".join(td.itertext())
    raise AssertionError(f"no row {label!r}")


def series_rows(div: str) -> list[list[str]]:
    root = xhtml(div)
    tables = root.findall(f"{NS}table")
    body = tables[-1].find(f"{NS}tbody")
    assert body is not None
    return [["".join(td.itertext()) for td in tr.findall(f"{NS}td")] for tr in body.findall(f"{NS}tr")]


def stored(resource: dict[str, Any], version: str = "1") -> BackendStudy:
    """What a backend returns after storing ``resource``."""
    body = {k: v for k, v in resource.items() if k not in ("resourceType", "id")}
    copy_ = {"resourceType": "ImagingStudy", "id": "bk-1", "meta": {"versionId": version}, **body}
    return BackendStudy(id="bk-1", version_id=version, resource=copy.deepcopy(copy_))


def created(resource: dict[str, Any], *, narrative: bool) -> dict[str, Any]:
    """What ``plan`` creates for ``resource`` when the backend has no copy."""
    result = plan(resource, None, narrative=narrative)
    assert isinstance(result, Create)
    return result.resource


# ---------------------------------------------------------------------------------------------------
# The narrative itself
# ---------------------------------------------------------------------------------------------------


def test_narrative_summarises_the_study_and_validates() -> None:
    study = ours()
    text = narrative(study)
    check(study | {"text": text})
    div = text["div"]
    assert study_cell(div, "Started") == study["started"]
    assert study_cell(div, "Modality") == "CT"
    assert study_cell(div, "Accession") == "ACC-7"
    assert study_cell(div, "Series") == "2"
    assert study_cell(div, "Instances") == "3"
    # ordered by series number (2 before 10, not as strings), then UID
    assert series_rows(div) == [
        ["2", "CT", "Thorax", "", "2"],
        ["10", "CT", "Thorax", "Lung <b>window</b>", "1"],
    ]


def test_dicom_values_are_escaped_and_exact() -> None:
    div = narrative(ours())["div"]
    assert study_cell(div, "Description") == NASTY
    assert "<script>" not in div and "<b>window</b>" not in div
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in div
    assert "Thorax &amp; Abdomen &quot;CT&quot; 胸部" in div


@settings(max_examples=200, deadline=None)
# characters XML can carry: no surrogates (Cs) or controls (Cc), and not U+FFFE / U+FFFF, which the
# narrative drops (test_carriage_return_and_characters_xml_cannot_carry)
@given(st.text(st.characters(exclude_categories=("Cs", "Cc"), exclude_characters="\ufffe\uffff"),
               min_size=1, max_size=40).filter(str.strip))
def test_any_description_comes_back_exactly(description: str) -> None:
    study = {
        "resourceType": "ImagingStudy",
        "description": description,
        "series": [
            {"uid": "1.2.3", "modality": {"code": "CT"}, "description": description, "numberOfInstances": 1}
        ],
    }
    div = narrative(study)["div"]
    assert study_cell(div, "Description") == description
    assert series_rows(div)[0][3] == description


def test_carriage_return_and_characters_xml_cannot_carry() -> None:
    div = narrative({"description": "a\r\nb\tc\x01d\ufffe\ud800e"})["div"]
    assert study_cell(div, "Description") == "a\r\nb\tcde"


def test_deterministic_and_independent_of_series_order() -> None:
    study = ours()
    shuffled = copy.deepcopy(study)
    shuffled["series"].reverse()
    assert narrative(study) == narrative(copy.deepcopy(study)) == narrative(shuffled)


def test_series_without_number_come_last_by_uid() -> None:
    study = {
        "series": [
            {"uid": "1.9", "modality": {"code": "SR"}},
            {"uid": "1.5", "modality": {"code": "KO"}},
            {"uid": "1.7", "number": 3, "modality": {"code": "CT"}},
            {"uid": "1.6", "number": 3, "modality": {"code": "MR"}},
        ]
    }
    assert [row[1] for row in series_rows(narrative(study)["div"])] == ["MR", "CT", "KO", "SR"]


def test_rejected_instances_are_listed_sorted_and_escaped() -> None:
    rejected = [
        RejectedInstance("same SOP Instance UID with other content", "1.2.9", "1.2"),
        RejectedInstance("not a <patient> instance", "1.2.3"),
    ]
    text = narrative(ours(), rejected)
    root = xhtml(text["div"])
    items = ["".join(li.itertext()) for li in root.iter(f"{NS}li")]
    assert items == [
        "instance 1.2.3: not a <patient> instance",
        "series 1.2 instance 1.2.9: same SOP Instance UID with other content",
    ]
    assert narrative(ours(), list(reversed(rejected))) == text
    assert "Rejected" not in narrative(ours())["div"]


def test_marker_detection() -> None:
    assert is_ingest_narrative(narrative(ours()))
    ours_div = narrative(ours())["div"]
    assert not is_ingest_narrative({"status": "additional", "div": ours_div})
    assert not is_ingest_narrative({"status": "generated", "div": "<div>server narrative</div>"})
    assert not is_ingest_narrative(
        {"status": "generated", "div": f'<div xmlns="{XHTML_NS}"><p class="{MARKER_CLASS}">x</p></div>'}
    )
    assert is_ingest_narrative(
        {"status": "generated", "div": f"<div class='other {MARKER_CLASS}' xmlns='{XHTML_NS}'>x</div>"}
    )
    assert not is_ingest_narrative({"status": "generated"})
    assert not is_ingest_narrative("generated")


# ---------------------------------------------------------------------------------------------------
# Merge and plan (narrative=True, as [mapping] narrative = true passes it)
# ---------------------------------------------------------------------------------------------------


def test_create_carries_the_narrative_of_ours() -> None:
    mine = ours()
    result = plan(mine, None, narrative=True)
    assert isinstance(result, Create)
    check(result.resource)
    assert result.resource["text"] == narrative(mine)
    assert list(result.resource).index("text") < list(result.resource).index("identifier")  # FHIR order


def test_unchanged_repush_writes_nothing_and_the_narrative_is_equal() -> None:
    mine = ours()
    created = plan(mine, None, narrative=True)
    assert isinstance(created, Create)
    backend = stored(created.resource)
    assert merge(mine, backend.resource, narrative=True)["text"] == created.resource["text"]
    assert plan(ours(), backend, narrative=True) == NoChange("bk-1", "1")


def test_a_new_instance_regenerates_the_narrative_over_the_merged_result() -> None:
    first = plan(ours(), None, narrative=True)
    assert isinstance(first, Create)
    backend = stored(first.resource)
    # a series only the backend has is shown too
    backend.resource["series"].append(
        {
            "uid": f"{STUDY}.99",
            "number": 1,
            "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "MR"},
            "numberOfInstances": 4,
        }
    )
    more = ours([rec("2", "1"), rec("2", "2"), rec("2", "3"), rec("10", "1")])
    result = plan(more, backend, narrative=True)
    assert isinstance(result, Update)
    check(result.resource)
    assert result.resource["text"] == narrative(result.resource)
    assert [row[0] + "/" + row[4] for row in series_rows(result.resource["text"]["div"])] == [
        "1/4",
        "2/3",
        "10/1",
    ]


def test_foreign_narratives_survive_merge_unchanged() -> None:
    for foreign in (
        {"status": "additional", "div": f'<div xmlns="{XHTML_NS}"><p>Read by Dr. X</p></div>'},
        {"status": "generated", "div": f'<div xmlns="{XHTML_NS}"><p>server narrative</p></div>'},
        {"status": "extensions", "div": narrative(ours())["div"]},  # our div, another status: theirs
    ):
        backend = stored(created(ours(), narrative=False) | {"text": foreign})
        assert merge(ours(), backend.resource, narrative=True)["text"] == foreign
        changed = plan(ours([rec("2", "1"), rec("2", "2"), rec("2", "3")]), backend, narrative=True)
        assert isinstance(changed, Update)
        assert changed.resource["text"] == foreign


def test_a_backend_copy_without_narrative_gets_ours_with_the_next_write() -> None:
    old = plan(ours(), None, narrative=False)
    assert isinstance(old, Create) and "text" not in old.resource
    backend = stored(old.resource)
    # the narrative alone is not a reason to write (the digest leaves text out) ...
    assert plan(ours(), backend, narrative=True) == NoChange("bk-1", "1")
    # ... the next write carries it
    result = plan(ours([rec("2", "1"), rec("2", "2"), rec("2", "3")]), backend, narrative=True)
    assert isinstance(result, Update)
    assert is_ingest_narrative(check(result.resource)["text"])


def test_switched_off_no_narrative_and_ours_is_dropped_theirs_kept() -> None:
    plain = created(ours(), narrative=False)
    assert "text" not in plain
    with_ours = stored(created(ours(), narrative=True))
    changed = ours([rec("2", "1"), rec("2", "2"), rec("2", "3")])
    result = plan(changed, with_ours, narrative=False)
    assert isinstance(result, Update) and "text" not in result.resource  # a stale narrative of ours
    foreign = {"status": "additional", "div": f'<div xmlns="{XHTML_NS}"><p>note</p></div>'}
    theirs = stored(plain | {"text": foreign})
    assert merge(changed, theirs.resource, narrative=False)["text"] == foreign
