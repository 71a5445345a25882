"""Tests for ingest.core.extract: acceptance, optional values, character sets, nesting."""

from __future__ import annotations

import struct
import warnings

import pydicom
import pytest
from pydicom.data import get_charset_files, get_palette_files, get_testdata_file, get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID

from ingest.core.extract import extract, valid_uid
from ingest.core.records import Code, PersonName
from ingest.core.tags import HEADER_TAGS, TAGS, tag_of
from ingest.errors import (
    HeaderError,
    InvalidUIDError,
    MissingTagError,
    NestingTooDeepError,
    NotPatientInstanceError,
)

STUDY = "1.2.826.0.1.3680043.2.1125.1"
SERIES = "1.2.826.0.1.3680043.2.1125.1.2"
SOP = "1.2.826.0.1.3680043.2.1125.1.2.3"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SECRET_NAME = "Secretperson^Patientname"


def bundled(name: str) -> str:
    """Path of one of pydicom's bundled test files."""
    path = get_testdata_file(name)
    assert isinstance(path, str)
    return path


def minimal(**extra: object) -> Dataset:
    """A synthetic dataset with the four identity UIDs and any extra keyword values."""
    ds = Dataset()
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = SERIES
    ds.SOPInstanceUID = SOP
    ds.SOPClassUID = CT_IMAGE
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def read(path: str) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


# -- UID grammar -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uid",
    ["1.2.840.10008.5.1.4.1.1.2", "0", "1.0.2", "2.25.329800735698586629295641978511506172918", "9" * 64],
)
def test_valid_uids(uid: str) -> None:
    assert valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "1..2",
        "1.2.",
        ".1.2",
        "1.02.3",
        "01.2",
        "1/2",
        "1.2.3a",
        "1.2 .3",
        "9" * 65,
        "1.2\n",
        "１.２",  # full-width digits are not [0-9]
        "1.2\\1.3",
    ],
)
def test_invalid_uids(uid: str) -> None:
    assert not valid_uid(uid)


# -- acceptance -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]
)
def test_missing_required_uid_is_rejected(keyword: str) -> None:
    ds = minimal(PatientName=SECRET_NAME)
    delattr(ds, keyword)
    with pytest.raises(MissingTagError) as info:
        extract(ds, source="unit")
    assert info.value.reason == "missing_tag"
    assert info.value.tag == keyword
    assert keyword in str(info.value) and "source=unit" in str(info.value)
    assert "Secretperson" not in str(info.value)


def test_empty_required_uid_is_missing() -> None:
    ds = minimal()
    ds.SeriesInstanceUID = ""
    with pytest.raises(MissingTagError) as info:
        extract(ds)
    assert info.value.uid == SOP
    assert SOP in str(info.value)


@pytest.mark.parametrize("bad", ["1..2", "1.2/3", "1.02.3", "1.2.", "1" * 65, "1.2.x"])
@pytest.mark.parametrize(
    "keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"]
)
def test_invalid_required_uid_is_rejected(keyword: str, bad: str) -> None:
    ds = minimal(PatientName=SECRET_NAME)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns when setting an invalid UI value
        setattr(ds, keyword, bad)
    with pytest.raises(InvalidUIDError) as info:
        extract(ds, source="unit")
    assert info.value.reason == "invalid_uid"
    assert info.value.tag == keyword
    assert "Secretperson" not in str(info.value)


def test_minimal_dataset_is_accepted_with_nothing_else() -> None:
    record = extract(minimal())
    assert (record.study_uid, record.series_uid, record.sop_uid, record.sop_class_uid) == (
        STUDY,
        SERIES,
        SOP,
        CT_IMAGE,
    )
    assert record.patient_name is None and record.modality is None and record.warnings == ()


def test_ct_small_matches_pydicom_values() -> None:
    path = bundled("CT_small.dcm")
    ds = read(path)
    reference = pydicom.dcmread(path)  # a second, independent parse for the oracle
    record = extract(ds, source=path)
    assert record.study_uid == reference.StudyInstanceUID
    assert record.series_uid == reference.SeriesInstanceUID
    assert record.sop_uid == reference.SOPInstanceUID
    assert record.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    assert record.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert record.modality == "CT"
    assert record.patient_name == PersonName(alphabetic="CompressedSamples^CT1")
    assert record.patient_id == "1CT1"
    assert record.study_date == "20040119" and record.study_time == "072730"
    assert record.timezone_offset == "-0500"
    assert record.series_number == 1 and record.instance_number == 1
    assert record.warnings == ()


def test_sr_concept_name_and_series() -> None:
    record = extract(read(bundled("test-SR.dcm")))
    assert record.modality == "SR"
    assert record.concept_name == "Diagnosis"
    assert record.series_description == "Demonstration of SR Features"


def test_dicomdir_is_not_a_patient_instance() -> None:
    path = bundled("DICOMDIR")
    with pytest.raises(NotPatientInstanceError) as info:
        extract(read(path), source=path)
    assert info.value.reason == "not_patient_instance"


def test_dicomdir_detected_without_file_meta() -> None:
    ds = Dataset()
    ds.FileSetID = ""
    with pytest.raises(NotPatientInstanceError):
        extract(ds)


@pytest.mark.parametrize("path", get_palette_files("*.dcm")[:3])
def test_color_palettes_are_not_patient_instances(path: str) -> None:
    with pytest.raises(NotPatientInstanceError):
        extract(read(path), source=path)


def test_non_patient_sop_class_in_dataset_is_rejected() -> None:
    ds = minimal()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.38.1"  # Hanging Protocol Storage
    with pytest.raises(NotPatientInstanceError):
        extract(ds)


def test_file_meta_transfer_syntax_is_recorded() -> None:
    ds = minimal()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2")
    assert extract(ds).transfer_syntax_uid == "1.2.840.10008.1.2"


def test_undecodable_required_element_is_a_header_error() -> None:
    ds = minimal()
    tag = tag_of("SOPInstanceUID")
    # a raw element whose value pydicom would never produce: decoding it fails
    ds._dict[tag] = RawDataElement(tag, "UI", 4, 1234, 0, False, True)  # type: ignore[arg-type]
    with pytest.raises(HeaderError) as info:
        extract(ds, source="unit")
    assert info.value.tag == "SOPInstanceUID"
    assert "source=unit" in str(info.value)


# -- optional values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected", "warned"),
    [
        (b"7 ", 7, False),
        (b"+12", 12, False),
        (b"-3", None, True),
        (b"", None, True),
        (b"2.5 ", None, True),
        (b"abc", None, True),
        (b"99999999999", None, True),
    ],
)
def test_instance_number_is_text(raw: bytes, expected: int | None, warned: bool) -> None:
    ds = minimal(PatientName=SECRET_NAME)
    tag = tag_of("InstanceNumber")
    ds._dict[tag] = RawDataElement(tag, "IS", len(raw), raw, 0, False, True)
    record = extract(ds)
    assert record.instance_number == expected
    assert any("InstanceNumber (0020,0013)" in w for w in record.warnings) is warned
    assert all("Secretperson" not in w for w in record.warnings)


def test_laterality_falls_back_to_image_laterality() -> None:
    assert extract(minimal(ImageLaterality="L")).laterality == "L"
    assert extract(minimal(Laterality="R", ImageLaterality="L")).laterality == "R"


def code_item(value: str | None, designator: str | None, meaning: str | None = None) -> Dataset:
    item = Dataset()
    if value is not None:
        item.CodeValue = value
    if designator is not None:
        item.CodingSchemeDesignator = designator
    if meaning is not None:
        item.CodeMeaning = meaning
    return item


def test_code_sequences_keep_good_items_and_warn_on_bad_ones() -> None:
    ds = minimal()
    ds.ProcedureCodeSequence = Sequence(
        [code_item("24627-2", "LN", "CT Chest"), code_item(None, "LN", "no code"), code_item("X", None)]
    )
    ds.ReasonForRequestedProcedureCodeSequence = Sequence([code_item("233604007", "SCT", "Pneumonia")])
    record = extract(ds)
    assert record.procedure_codes == (Code(designator="LN", value="24627-2", meaning="CT Chest"),)
    assert record.reason_codes == (Code(designator="SCT", value="233604007", meaning="Pneumonia"),)
    dropped = [w for w in record.warnings if "ProcedureCodeSequence (0008,1032)" in w]
    assert len(dropped) == 2 and "item 1" in dropped[0] and "item 2" in dropped[1]


def test_issuer_sequences() -> None:
    ds = minimal(PatientID="PID-1", IssuerOfPatientID="HOSP", AccessionNumber="A1")
    issuer = Dataset()
    issuer.UniversalEntityID = "1.2.3.4"
    issuer.UniversalEntityIDType = "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = Sequence([issuer])
    acc = Dataset()
    acc.LocalNamespaceEntityID = "RIS"
    acc.UniversalEntityID = "2.16.840.1.1"
    acc.UniversalEntityIDType = "ISO"
    ds.IssuerOfAccessionNumberSequence = Sequence([acc])
    record = extract(ds)
    assert (record.patient_id, record.patient_id_issuer) == ("PID-1", "HOSP")
    assert (record.patient_id_issuer_uid, record.patient_id_issuer_uid_type) == ("1.2.3.4", "ISO")
    assert record.accession_number == "A1"
    assert record.accession_issuer_local == "RIS"
    assert (record.accession_issuer_uid, record.accession_issuer_uid_type) == ("2.16.840.1.1", "ISO")


def test_multi_valued_person_names() -> None:
    ds = minimal()
    ds.OperatorsName = ["Smith^Ann", "Jones^Bob=ジョーンズ^ボブ"]
    ds.NameOfPhysiciansReadingStudy = "Reader^Rita"
    record = extract(ds)
    assert record.operators == (
        PersonName(alphabetic="Smith^Ann"),
        PersonName(alphabetic="Jones^Bob", ideographic="ジョーンズ^ボブ"),
    )
    assert record.reading_physicians == (PersonName(alphabetic="Reader^Rita"),)


def test_raw_text_decoded_with_specific_character_set() -> None:
    ds = minimal()
    for keyword, vr, raw in [
        ("SpecificCharacterSet", "CS", b"ISO_IR 100"),
        ("PatientName", "PN", b"Buc^J\xe9r\xf4me "),
        ("StudyDescription", "LO", b"T\xeate "),
    ]:
        tag = tag_of(keyword)
        ds._dict[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    record = extract(ds)
    assert record.patient_name == PersonName(alphabetic="Buc^Jérôme")
    assert record.study_description == "Tête"


def test_undecodable_bytes_are_replaced_with_a_warning() -> None:
    ds = minimal()
    for keyword, vr, raw in [
        ("SpecificCharacterSet", "CS", b"ISO_IR 192"),
        ("PatientName", "PN", b"A\xff^B"),
    ]:
        tag = tag_of(keyword)
        ds._dict[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    record = extract(ds)
    assert record.patient_name == PersonName(alphabetic="A\ufffd^B")
    assert any(w.startswith("PatientName") for w in record.warnings)


# Names checked by hand against each file's bytes (pydicom/data/charset_files/FileInfo.txt) and the
# examples in DICOM PS3.5 Annexes H, I, J.
CHARSET_NAMES = {
    "chrArab.dcm": PersonName(alphabetic="قباني^لنزار"),
    "chrFren.dcm": PersonName(alphabetic="Buc^Jérôme"),
    "chrGerm.dcm": PersonName(alphabetic="Äneas^Rüdiger"),
    "chrGreek.dcm": PersonName(alphabetic="Διονυσιος"),
    "chrH31.dcm": PersonName(alphabetic="Yamada^Tarou", ideographic="山田^太郎", phonetic="やまだ^たろう"),
    "chrH32.dcm": PersonName(alphabetic="ﾔﾏﾀﾞ^ﾀﾛｳ", ideographic="山田^太郎", phonetic="やまだ^たろう"),
    "chrHbrw.dcm": PersonName(alphabetic="שרון^דבורה"),
    "chrI2.dcm": PersonName(alphabetic="Hong^Gildong", ideographic="洪^吉洞", phonetic="홍^길동"),
    "chrJapMulti.dcm": PersonName(alphabetic="やまだ^たろう"),
    "chrKoreanMulti.dcm": PersonName(alphabetic="김희중"),
    "chrRuss.dcm": PersonName(alphabetic="Люкceмбypг"),
    "chrX1.dcm": PersonName(alphabetic="Wang^XiaoDong", ideographic="王^小東"),
    "chrX2.dcm": PersonName(alphabetic="Wang^XiaoDong", ideographic="王^小东"),
}


@pytest.mark.parametrize("name", sorted(CHARSET_NAMES))
def test_person_names_in_every_character_set(name: str) -> None:
    (path,) = get_charset_files(name)
    record = extract(read(path), source=path)
    assert record.patient_name == CHARSET_NAMES[name]
    assert record.warnings == ()


def test_dicomdir_tree_instances_are_all_accepted() -> None:
    paths = get_testdata_files("dicomdirtests/98892003/*/*")
    assert len(paths) >= 10
    records = [extract(read(p), source=p) for p in paths]
    assert [r.study_uid for r in records] == [pydicom.dcmread(p).StudyInstanceUID for p in paths]
    assert len({r.sop_uid for r in records}) == len(paths)
    assert {r.modality for r in records} == {"MR"}


# -- nesting ----------------------------------------------------------------------------------------


UNDEFINED = 0xFFFFFFFF
ITEM = struct.pack("<HHL", 0xFFFE, 0xE000, UNDEFINED)
ITEM_END = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
SEQ_END = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def nested_sequence_value(depth: int) -> bytes:
    """An Explicit VR LE code-sequence value nested *depth* levels deep, all of undefined length."""
    sq_head = struct.pack("<HH2sHL", 0x0040, 0xA043, b"SQ", 0, UNDEFINED)
    return ITEM + (sq_head + ITEM) * depth + (ITEM_END + SEQ_END) * depth + ITEM_END


def test_deep_nesting_in_a_raw_sequence_is_nesting_too_deep() -> None:
    value = nested_sequence_value(2000)
    ds = minimal()
    tag = tag_of("ConceptNameCodeSequence")
    ds._dict[tag] = RawDataElement(BaseTag(tag), "SQ", UNDEFINED, value, 0, False, True)
    with pytest.raises(NestingTooDeepError) as info:
        extract(ds, source="unit")
    assert info.value.reason == "nesting_too_deep"
    assert info.value.uid == SOP


def test_moderate_nesting_is_fine() -> None:
    value = nested_sequence_value(5)
    ds = minimal()
    tag = tag_of("ConceptNameCodeSequence")
    ds._dict[tag] = RawDataElement(BaseTag(tag), "SQ", UNDEFINED, value, 0, False, True)
    record = extract(ds)
    assert record.concept_name is None  # the items carry no Code Meaning
    assert record.warnings == ()


def test_header_tags_cover_the_table() -> None:
    assert tag_of("SpecificCharacterSet") in HEADER_TAGS
    assert tag_of("ProcedureCodeSequence") in HEADER_TAGS
    assert len(HEADER_TAGS) == len({spec.keyword for spec in TAGS})
    assert all(spec.required == (spec.keyword in {
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"
    }) for spec in TAGS)  # fmt: skip


def test_every_record_field_comes_from_the_table() -> None:
    from ingest.core.records import InstanceRecord

    fields = {spec.field for spec in TAGS if spec.field}
    expected = set(InstanceRecord.model_fields) - {
        "transfer_syntax_uid",  # file meta (0002,0010)
        "warnings",
        "patient_id_issuer_uid_type",  # items of the sequences in the table
        "accession_issuer_uid_type",
        "accession_issuer_local",
        "admission_issuer_uid_type",
        "admission_issuer_local",
        "concept_code",  # (0040,A043) as a code, the same sequence as concept_name
        "rejected_for",  # state the store sets on read, not a header value
    }
    assert fields == expected


# ------------------------------------------------- the order, the visit and the referrer's identifiers


def _ordered_instance() -> bytes:
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4.1", "1.2.3.4", "1.2.3.4.2"
    ds.AccessionNumber = "A-1"
    ds.AdmissionID = "V-77"  # (0038,0010)
    issuer = Dataset()
    issuer.UniversalEntityID, issuer.UniversalEntityIDType = "1.2.3.999", "ISO"
    ds.IssuerOfAdmissionIDSequence = DicomSequence([issuer])  # (0038,0014)
    first, empty, second = Dataset(), Dataset(), Dataset()
    first.AccessionNumber, first.RequestedProcedureID = "A-1", "RP-1"
    first.PlacerOrderNumberImagingServiceRequest = "PL-1"  # (0040,2016)
    second.FillerOrderNumberImagingServiceRequest = "FI-2"  # (0040,2017)
    ds.RequestAttributesSequence = DicomSequence([first, empty, second])  # (0040,0275)
    person, code = Dataset(), Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "NPI-9", "L"
    person.PersonIdentificationCodeSequence = DicomSequence([code])  # (0040,1101)
    ds.ReferringPhysicianIdentificationSequence = DicomSequence([person])  # (0008,0096)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_order_visit_and_referrer_identifiers_are_read_the_same_by_both_readers() -> None:
    import io

    import pydicom

    from ingest.adapters.dicomfile import read_header_bytes
    from ingest.core.records import Code, OrderReference

    data = _ordered_instance()
    fast = read_header_bytes(data, source="t").record
    slow = extract(pydicom.dcmread(io.BytesIO(data)))
    for record in (fast, slow):
        assert record.admission_id == "V-77"
        assert (record.admission_issuer_uid, record.admission_issuer_uid_type) == ("1.2.3.999", "ISO")
        assert record.requests == (  # the item naming nothing is left out
            OrderReference(accession_number="A-1", requested_procedure_id="RP-1", placer_order_number="PL-1"),
            OrderReference(filler_order_number="FI-2"),
        )
        assert record.referrer_ids == (Code(designator="L", value="NPI-9"),)
        assert record.warnings == ()
