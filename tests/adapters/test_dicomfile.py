"""Tests for ingest.adapters.dicomfile: the fast header reader and the file finder."""

from __future__ import annotations

import hashlib
import os
import random
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_palette_files, get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import UID, ExplicitVRLittleEndian

from ingest.adapters.dicomfile import (
    ParsedInstance,
    iter_dicom_files,
    read_header,
    read_header_bytes,
)
from ingest.core.extract import extract
from ingest.errors import (
    InflateCapError,
    NestingTooDeepError,
    NotDicomError,
    NotPatientInstanceError,
    TruncatedError,
)

DEFLATED = "1.2.840.10008.1.2.1.99"
UNDEFINED = 0xFFFFFFFF


def bundled(name: str) -> str:
    """Path of one of pydicom's bundled test files."""
    path = get_testdata_file(name)
    assert isinstance(path, str)
    return path


def data_of(name: str) -> bytes:
    return Path(bundled(name)).read_bytes()


def dataset_offset(data: bytes) -> int:
    """Where the dataset starts after preamble and file meta, from the meta group length (0002,0000)."""
    assert data[128:132] == b"DICM"
    assert data[132:136] == b"\x02\x00\x00\x00"
    (group_length,) = struct.unpack_from("<L", data, 140)
    return 144 + int(group_length)


# -- reading real files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "ExplVR_BigEndNoMeta.dcm",
        "ExplVR_LitEndNoMeta.dcm",
        "image_dfl.dcm",
        "JPEG-lossy.dcm",
        "JPEG2000.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEG2000-embedded-sequence-delimiter.dcm",
        "test-SR.dcm",
        "rtplan.dcm",
        "rtstruct.dcm",
        "waveform_ecg.dcm",
        "liver_1frame.dcm",
        "reportsi.dcm",
    ],
)
def test_fast_reader_agrees_with_pydicom(name: str) -> None:
    path = Path(bundled(name))
    parsed = read_header(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = extract(pydicom.dcmread(path, stop_before_pixels=True, force=True), source=str(path))
    assert parsed.record == reference
    assert parsed.size == path.stat().st_size


def test_same_study_in_four_encodings() -> None:
    records = [
        read_header(Path(bundled(n))).record
        for n in ("MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm")
    ]
    assert len({(r.study_uid, r.series_uid, r.sop_uid, r.modality) for r in records}) == 1
    assert [r.transfer_syntax_uid for r in records] == [
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2",
        "1.2.840.10008.1.2.2",
        "1.2.840.10008.1.2.2",
    ]


def test_dicomdir_tree() -> None:
    paths = sorted(Path(p) for p in get_testdata_files("dicomdirtests/98892003/*/*"))
    parsed = [read_header(p) for p in paths]
    assert [p.record.sop_uid for p in parsed] == [pydicom.dcmread(p).SOPInstanceUID for p in paths]
    assert len({p.digest for p in parsed}) == len(paths)


def test_digest_is_a_content_digest_not_of_the_encoded_bytes() -> None:
    data = data_of("CT_small.dcm")
    start = dataset_offset(data)
    parsed = read_header_bytes(data, source="file")
    assert parsed.digest.startswith("c1:") and len(parsed.digest) == 3 + 64
    assert parsed.digest[3:] != hashlib.sha256(data[start:]).hexdigest()
    assert parsed.size == len(data)


def test_dimse_dataset_matches_the_file() -> None:
    data = data_of("CT_small.dcm")
    body = data[dataset_offset(data) :]
    from_file = read_header_bytes(data, source="file")
    over_dimse = read_header_bytes(body, source="dimse:MODALITY", transfer_syntax_uid=ExplicitVRLittleEndian)
    assert over_dimse.digest == from_file.digest
    assert over_dimse.record == from_file.record
    # bytes with file meta given with an association's transfer syntax: the meta is detected
    assert read_header_bytes(data, source="m", transfer_syntax_uid="1.2.840.10008.1.2").record == (
        from_file.record
    )


@pytest.mark.parametrize(
    ("name", "syntax"),
    [("MR_small_implicit.dcm", "1.2.840.10008.1.2"), ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2")],
)
def test_dimse_dataset_in_other_transfer_syntaxes(name: str, syntax: str) -> None:
    data = data_of(name)
    from_file = read_header_bytes(data, source="file")
    over_dimse = read_header_bytes(data[dataset_offset(data) :], source="dimse", transfer_syntax_uid=syntax)
    assert over_dimse.record == from_file.record
    assert over_dimse.digest == from_file.digest


def test_file_meta_without_preamble() -> None:
    data = data_of("CT_small.dcm")
    parsed = read_header_bytes(data[132:], source="nopreamble")
    assert parsed.record == read_header_bytes(data, source="full").record


@pytest.mark.parametrize("path", [bundled("DICOMDIR"), *get_palette_files("*.dcm")[:2]])
def test_non_patient_files_are_rejected(path: str) -> None:
    with pytest.raises(NotPatientInstanceError) as info:
        read_header(Path(path))
    assert info.value.reason == "not_patient_instance"


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is a text file and not DICOM at all\n" * 10,
        b"\x00" * 128 + b"DICM",
        b"%PDF-1.7\n" + bytes(200),
        random.Random(7).randbytes(4096),
    ],
    ids=["empty", "text", "preamble-only", "pdf", "random"],
)
def test_not_dicom(data: bytes) -> None:
    with pytest.raises(NotDicomError) as info:
        read_header_bytes(data, source="bad")
    assert info.value.reason == "not_dicom"


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    with pytest.raises(NotDicomError):
        read_header(path)


@pytest.mark.parametrize("name", ["rtplan_truncated.dcm", "MR_truncated.dcm"])
def test_truncated_test_files(name: str) -> None:
    with pytest.raises(TruncatedError) as info:
        read_header(Path(bundled(name)))
    assert info.value.reason == "truncated"


def cut_points(name: str) -> list[int]:
    """Offsets inside element values (file meta, header elements, pixel data), found with pydicom."""
    path = bundled(name)
    ds = pydicom.dcmread(path)
    points = [150]  # inside the file meta group
    for elem in ds:  # top level: items of parsed sequences carry offsets relative to the sequence
        tell = getattr(elem, "file_tell", None)
        if (
            tell is not None
            and elem.VR != "SQ"
            and isinstance(elem.value, str | bytes)
            and len(elem.value) > 2
        ):
            points.append(tell + len(elem.value) // 2)  # file_tell: where the value starts
    return sorted(set(points))


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"])
def test_cut_short_anywhere_is_truncated(name: str) -> None:
    data = data_of(name)
    points = [*cut_points(name), len(data) - 1, len(data) - 100]
    assert len(points) > 10
    for point in points:
        with pytest.raises(TruncatedError):
            read_header_bytes(data[:point], source=f"cut@{point}")


def test_cut_points_come_from_element_values() -> None:
    # the oracle above depends on pydicom's file_tell; make sure it points into the file
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    elem = ds["PatientName"]
    raw = data_of("CT_small.dcm")
    assert elem.file_tell is not None
    assert raw[elem.file_tell : elem.file_tell + 21] == b"CompressedSamples^CT1"


def deflated_file(payload_chunks: int, chunk: bytes) -> bytes:
    """A Part 10 file in Deflated Explicit VR LE whose dataset is *payload_chunks* x *chunk*."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
    meta.MediaStorageSOPInstanceUID = UID("1.2.3.4")
    meta.TransferSyntaxUID = UID(DEFLATED)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    pydicom.filewriter.write_file_meta_info(buffer, meta, enforce_standard=True)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = b"".join(compressor.compress(chunk) for _ in range(payload_chunks)) + compressor.flush()
    return b"\0" * 128 + b"DICM" + buffer.getvalue() + body


def test_deflated_file_round_trip() -> None:
    ds = pydicom.dcmread(bundled("image_dfl.dcm"))
    parsed = read_header(Path(bundled("image_dfl.dcm")))
    assert parsed.record.sop_uid == ds.SOPInstanceUID
    assert parsed.record.transfer_syntax_uid == DEFLATED


def test_deflate_bomb_is_refused_with_bounded_memory() -> None:
    chunk = bytes(1 << 20)
    bomb = deflated_file(80, chunk)  # 80 MiB of zeros in well under 1 MiB of file
    assert len(bomb) < 1 << 20
    cap = 4 << 20
    tracemalloc.start()
    try:
        with pytest.raises(InflateCapError) as info:
            read_header_bytes(bomb, source="bomb", max_inflated_bytes=cap)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.reason == "inflate_cap"
    assert peak < 3 * cap
    with pytest.raises(InflateCapError):  # the default cap (64 MiB) refuses it too
        read_header_bytes(bomb, source="bomb")


def test_truncated_deflate_stream() -> None:
    data = data_of("image_dfl.dcm")
    with pytest.raises(TruncatedError):
        read_header_bytes(data[: len(data) - 40], source="cut")


def nested_bytes(depth: int, tag: tuple[int, int]) -> bytes:
    """An Explicit VR LE dataset: identity UIDs then *tag* as sequences nested *depth* deep."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.5"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buffer, ds)
    head = struct.pack("<HH2sHL", tag[0], tag[1], b"SQ", 0, UNDEFINED)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, UNDEFINED)
    item_end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    nested = (head + item) * depth + (item_end + seq_end) * depth
    return buffer.getvalue() + nested  # (0040,A043)/(0040,A730) sort after the UIDs


@pytest.mark.parametrize("tag", [(0x0040, 0xA043), (0x0040, 0xA730)], ids=["read", "skipped"])
def test_deep_nesting_is_refused(tag: tuple[int, int]) -> None:
    data = nested_bytes(2000, tag)
    with pytest.raises(NestingTooDeepError) as info:
        read_header_bytes(data, source="deep", transfer_syntax_uid=ExplicitVRLittleEndian)
    assert info.value.reason == "nesting_too_deep"


def test_shallow_nesting_is_read() -> None:
    data = nested_bytes(10, (0x0040, 0xA730))
    parsed = read_header_bytes(data, source="ok", transfer_syntax_uid=ExplicitVRLittleEndian)
    assert isinstance(parsed, ParsedInstance)
    assert parsed.record.sop_uid == "1.2.3.4"


def test_unterminated_undefined_length_sequence_is_truncated() -> None:
    data = nested_bytes(3, (0x0040, 0xA730))
    with pytest.raises(TruncatedError):
        read_header_bytes(data[:-8], source="cut", transfer_syntax_uid=ExplicitVRLittleEndian)


# -- finding files -------------------------------------------------------------------------------------


def test_iter_dicom_files(tmp_path: Path) -> None:
    root = tmp_path / "in"
    (root / "b" / "c").mkdir(parents=True)
    (root / ".hidden").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    for rel in [
        "a.dcm",
        "b/2.dcm",
        "b/10.dcm",
        "b/c/x",
        ".dot.dcm",
        "b/new.dcm.part",
        "b/x.tmp",
        ".hidden/h",
    ]:
        (root / rel).write_bytes(b"x")
    (outside / "secret.dcm").write_bytes(b"x")
    os.symlink(outside / "secret.dcm", root / "b" / "link_out.dcm")
    os.symlink(outside, root / "dir_out")
    os.symlink(root / "a.dcm", root / "b" / "link_in.dcm")
    os.symlink(root, root / "b" / "c" / "loop")  # a loop back to the root is not walked twice
    found = [p.relative_to(root).as_posix() for p in iter_dicom_files(root)]
    assert found == ["a.dcm", "b/10.dcm", "b/2.dcm", "b/c/x", "b/link_in.dcm"]
    assert list(iter_dicom_files(root / "b" / "2.dcm")) == [root / "b" / "2.dcm"]
    assert list(iter_dicom_files(tmp_path / "missing")) == []
