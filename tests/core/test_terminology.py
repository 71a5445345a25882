"""Terminology tables, checked against pydicom's copy of PS3.16 (independent) and docs/mapping.md."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.sr._cid_dict import cid_concepts
from pydicom.sr._concepts_dict import concepts as _concepts

from ingest.core.terminology import (
    ACQUISITION_MODALITIES,
    BODY_PARTS,
    body_part_concept,
    coding_system,
    is_acquisition_modality,
    laterality_concept,
    sop_class_name,
)

SCT = "http://snomed.info/sct"
concepts: dict[str, dict[str, Any]] = _concepts  # scheme -> keyword -> {code: (meaning, cids)}


def _pydicom_cid(cid: int, scheme: str) -> dict[str, str]:
    """code -> meaning for one context group, as pydicom generated it from PS3.16."""
    out: dict[str, str] = {}
    for keyword in cid_concepts[cid][scheme]:
        for code, (meaning, _cids) in concepts[scheme][keyword].items():
            out[code] = meaning
    return out


def test_cid29_matches_the_standard_exactly() -> None:
    assert _pydicom_cid(29, "DCM") == ACQUISITION_MODALITIES


@pytest.mark.parametrize("modality", ["CT", "MR", "US", "PT", "NM", "XA", "DX", "CR", "MG", "IVOCT", "OPT"])
def test_acquisition_modalities(modality: str) -> None:
    assert is_acquisition_modality(modality)
    assert is_acquisition_modality(f" {modality} ")


@pytest.mark.parametrize(
    "modality", ["SR", "KO", "PR", "SEG", "REG", "RTSTRUCT", "RTPLAN", "DOC", "OT", "HC", ""]
)
def test_non_acquisition_modalities(modality: str) -> None:
    assert not is_acquisition_modality(modality)
    assert not is_acquisition_modality(None)


def test_body_part_examples_from_the_contract() -> None:
    expected = {
        "CHEST": ("51185008", "Thorax"),
        "HEAD": ("69536005", "Head"),
        "ABDOMEN": ("818981001", "Abdomen"),
        "BRAIN": ("12738006", "Brain"),
        "KNEE": ("72696002", "Knee"),
    }
    for term, (code, display) in expected.items():
        assert body_part_concept(term) == (SCT, code, display)


def test_body_part_table_is_large_enough() -> None:
    assert len(BODY_PARTS) >= 80
    for term in ["SKULL", "CSPINE", "TSPINE", "LSPINE", "PELVIS", "HIP", "SHOULDER", "ELBOW", "WRIST"]:
        assert term in BODY_PARTS
    for term in ["HAND", "FOOT", "ANKLE", "BREAST", "HEART", "LIVER", "KIDNEY", "NECK"]:
        assert term in BODY_PARTS


def test_body_part_codes_agree_with_pydicom_snomed_concepts() -> None:
    """Every code is a SNOMED CT concept pydicom knows, and its meaning is the standard's one."""
    meanings: dict[str, set[str]] = {}
    for by_code in concepts["SCT"].values():
        for code, (meaning, _cids) in by_code.items():
            meanings.setdefault(code, set()).add(meaning.lower())
    # CHEST: docs/mapping.md fixes 51185008 "Thorax"; CALF: pydicom holds only the fully specified name.
    exceptions = {"CHEST", "CALF"}
    for term, (code, display) in BODY_PARTS.items():
        assert code in meanings, term
        if term not in exceptions:
            assert display.lower() in meanings[code], term


def test_body_part_codes_of_cid_4031_terms_are_current() -> None:
    cid4031 = _pydicom_cid(4031, "SCT")
    for term in ["ABDOMEN", "PELVIS", "CSPINE", "CTSPINE", "LSSPINE", "TLSPINE", "WHOLEBODY", "KNEE"]:
        code, display = BODY_PARTS[term]
        assert cid4031[code] == display


def test_body_part_lookup_is_tolerant_of_case_and_blanks_only() -> None:
    assert body_part_concept(" chest ") == body_part_concept("CHEST")
    assert body_part_concept("CHST") is None
    assert body_part_concept("") is None
    assert body_part_concept(None) is None


@pytest.mark.parametrize(
    ("value", "code", "display"),
    [("R", "24028007", "Right"), ("L", "7771000", "Left"), ("B", "51440002", "Right and left")],
)
def test_laterality(value: str, code: str, display: str) -> None:
    assert laterality_concept(value) == (SCT, code, display)


@pytest.mark.parametrize("value", ["U", "", None, "X", "RL"])
def test_laterality_without_code(value: str | None) -> None:
    assert laterality_concept(value) is None


@pytest.mark.parametrize(
    ("designator", "uri"),
    [
        ("SCT", "http://snomed.info/sct"),
        ("SRT", "http://snomed.info/sct"),
        ("LN", "http://loinc.org"),
        ("DCM", "http://dicom.nema.org/resources/ontology/DCM"),
        ("RADLEX", "http://www.radlex.org"),
        ("UCUM", "http://unitsofmeasure.org"),
        ("I10", "http://hl7.org/fhir/sid/icd-10"),
        ("ICD10", "http://hl7.org/fhir/sid/icd-10"),
        (" LN ", "http://loinc.org"),
    ],
)
def test_coding_system(designator: str, uri: str) -> None:
    assert coding_system(designator) == uri


@pytest.mark.parametrize("designator", ["99MKC", "99LOCAL", "99 MY/CODES", "L", "ACME"])
def test_a_designator_without_a_known_uri_gives_no_system(designator: str) -> None:
    # no URI is invented for a private or local coding scheme (docs/mapping.md "Private coding schemes")
    assert coding_system(designator) is None


def test_coding_system_empty() -> None:
    assert coding_system("") is None
    assert coding_system("  ") is None
    assert coding_system(None) is None


def test_sop_class_names() -> None:
    assert sop_class_name("1.2.840.10008.5.1.4.1.1.2") == "CT Image Storage"
    assert sop_class_name("1.2.840.10008.5.1.4.1.1.4") == "MR Image Storage"
    assert sop_class_name("1.2.840.10008.5.1.4.1.1.88.11") == "Basic Text SR Storage"
    assert sop_class_name("1.2.3.4.5") is None  # unknown to pydicom
    assert sop_class_name("1.2.840.10008.1.2") is None  # a transfer syntax, not a SOP class
    assert sop_class_name(None) is None
