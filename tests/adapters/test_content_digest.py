"""The content digest of ingest.adapters.dicomfile: the same instance in any transfer syntax digests alike."""

from __future__ import annotations

import copy
import io
import shutil
import struct
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from ingest.adapters.dicomfile import read_header, read_header_bytes
from tests.sources.dimse.listener_helpers import make_settings, running_listener

IMPLICIT, EXPLICIT, BIG, DEFLATED = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
)


def ct() -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    for _ in ds.iterall():  # decode every raw element, so a re-encoding writes values, not bytes
        pass
    return ds


def encoded(ds: Dataset, syntax: str) -> bytes:
    """*ds* written by pydicom in *syntax* (Big Endian: 16-bit Pixel Data swapped as the syntax wants)."""
    ds = copy.deepcopy(ds)  # a shallow copy shares its data elements
    ds.file_meta = FileMetaDataset(ds.file_meta)
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax == BIG:
        words = ds.PixelData
        ds.PixelData = b"".join(words[i + 1 : i + 2] + words[i : i + 1] for i in range(0, len(words), 2))
        ds["PixelData"].VR = "OW"
    out = io.BytesIO()
    pydicom.dcmwrite(
        out, ds, implicit_vr=syntax == IMPLICIT, little_endian=syntax != BIG, enforce_file_format=True
    )
    return out.getvalue()


def digest(data: bytes) -> str:
    return read_header_bytes(data, source="test").digest


@pytest.fixture(scope="module")
def four() -> dict[str, bytes]:
    ds = ct()
    return {ts: encoded(ds, ts) for ts in (IMPLICIT, EXPLICIT, BIG, DEFLATED)}


def test_ct_small_in_four_transfer_syntaxes_has_one_digest(four: dict[str, bytes]) -> None:
    assert len(set(four.values())) == 4  # really four encodings
    digests = {ts: digest(data) for ts, data in four.items()}
    assert len(set(digests.values())) == 1, digests
    assert digest(four[EXPLICIT]) == digest(Path(get_testdata_file("CT_small.dcm")).read_bytes())  # type: ignore[arg-type]


def test_pydicom_mr_small_encodings_have_one_digest() -> None:
    names = ("MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm")
    assert len({read_header(Path(get_testdata_file(n))).digest for n in names}) == 1  # type: ignore[arg-type]


@pytest.mark.parametrize("syntax", [IMPLICIT, EXPLICIT, BIG, DEFLATED])
def test_a_changed_attribute_changes_the_digest(syntax: str, four: dict[str, bytes]) -> None:
    ds = ct()
    ds.SeriesDescription = "other"
    assert digest(encoded(ds, syntax)) != digest(four[syntax])
    ds = ct()
    ds[0x00431028].value = ds[0x00431028].value[:-1] + b"\x07"  # a private value's last byte
    assert digest(encoded(ds, syntax)) != digest(four[syntax])


@pytest.mark.parametrize("syntax", [IMPLICIT, EXPLICIT, BIG, DEFLATED])
@pytest.mark.parametrize("where", [0, 4000, -1])
def test_one_changed_pixel_byte_changes_the_digest(syntax: str, where: int, four: dict[str, bytes]) -> None:
    ds = ct()
    pixels = bytearray(ds.PixelData)
    pixels[where] ^= 0x20
    ds.PixelData = bytes(pixels)
    assert digest(encoded(ds, syntax)) != digest(four[syntax])


def _with_sequence(sequence: bytes) -> bytes:
    """CT_small (Explicit VR Little Endian) with (0008,1140) Referenced Image Sequence encoded as given."""
    ds = ct()
    ds.ReferencedImageSequence = Sequence([Dataset()])
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = "1.2.3.4"
    base = encoded(ds, EXPLICIT)
    head = struct.pack("<HH2sH", 0x0008, 0x1140, b"SQ", 0)
    at = base.index(head)
    length = struct.unpack_from("<L", base, at + 8)[0]
    assert length != 0xFFFFFFFF  # pydicom wrote a defined length
    return base[:at] + sequence + base[at + 12 + length :]


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def test_text_padding_and_sequence_lengths_do_not_matter() -> None:
    item = _element(0x0008, 0x1155, b"UI", b"1.2.3.4\x00")
    defined = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 8 + len(item))
    defined += struct.pack("<HHL", 0xFFFE, 0xE000, len(item)) + item
    undefined = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    undefined += (
        struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + item + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    )
    undefined += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    space_padded = defined.replace(b"1.2.3.4\x00", b"1.2.3.4 ")
    changed = defined.replace(b"1.2.3.4\x00", b"1.2.3.5\x00")
    base = digest(_with_sequence(defined))
    assert digest(_with_sequence(undefined)) == base
    assert digest(_with_sequence(space_padded)) == base
    assert digest(_with_sequence(changed)) != base
    # an empty sequence is an empty value, with a defined or an undefined length
    empty_defined = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0)
    empty_undefined = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    empty_undefined += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    assert digest(_with_sequence(empty_defined)) == digest(_with_sequence(empty_undefined)) != base


@pytest.mark.parametrize("syntax", [IMPLICIT, EXPLICIT, BIG, DEFLATED])
def test_windowed_large_file_path_equals_the_in_memory_path(
    syntax: str, four: dict[str, bytes], tmp_path: Path
) -> None:
    path = tmp_path / "ct.dcm"
    path.write_bytes(four[syntax])
    assert read_header(path, large_file_bytes=0).digest == read_header(path).digest == digest(four[syntax])


def test_big_pixel_data_windowed_equals_in_memory(tmp_path: Path) -> None:
    ds = ct()
    ds.Rows, ds.Columns = 512, 512  # 512 KiB of Pixel Data: hashed on its own, in chunks when windowed
    ds.PixelData = bytes(range(256)) * 2048
    results = set()
    for syntax in (EXPLICIT, BIG):
        path = tmp_path / f"{syntax}.dcm"
        path.write_bytes(encoded(ds, syntax))
        results |= {read_header(path, large_file_bytes=0).digest, read_header(path).digest}
    assert len(results) == 1


# -- end to end: dcmtk storescu renegotiating its transfer syntax against a running listener -----------------


def _storescu(port: int, path: Path, *options: str) -> str:
    sent = subprocess.run(
        ["storescu", "-v", *options, "-aet", "TESTSCU", "-aec", "INGEST", "127.0.0.1", str(port), str(path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return sent.stdout + sent.stderr


@pytest.mark.dcmtk
@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed")
@pytest.mark.parametrize(("first", "ts_first"), [("-xd", DEFLATED), ("-xi", IMPLICIT)])
def test_storescu_in_another_transfer_syntax_is_a_duplicate(
    first: str, ts_first: str, tmp_path: Path
) -> None:
    ct_small = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]
    ds = ct()
    ds.SeriesDescription = "modified"
    modified = tmp_path / "modified.dcm"
    modified.write_bytes(encoded(ds, EXPLICIT))
    with running_listener(make_settings(tmp_path / "data")) as run:
        out = _storescu(run.port, ct_small, first)
        assert "Received Store Response (Success)" in out, out
        out = _storescu(run.port, ct_small)  # storescu's default: the file's own Explicit VR Little Endian
        assert "Received Store Response (Success)" in out, out
        rows = run.store.instances(ds.StudyInstanceUID)
        assert [(r.sop_uid, r.transfer_syntax_uid) for r in rows] == [(ds.SOPInstanceUID, ts_first)]
        assert run.listener.quarantine.names() == []
        out = _storescu(run.port, modified, first, "-d")  # -d shows the status code
        assert "DIMSE Status                  : 0xc010" in out, out
        assert len(run.store.instances(ds.StudyInstanceUID)) == 1
        (name,) = run.listener.quarantine.names()
        assert run.listener.quarantine.reason(name)["reason"] == "conflict"


# -- long sequences: the canonical form is hashed as it grows, with the same digest -------------------------


def _items(count: int, *, undefined: bool) -> bytes:
    """(0008,1140) with ``count`` items, each a Referenced SOP Instance UID and an empty (0008,1199)."""
    out = []
    for n in range(count):
        uid = f"1.2.3.{n}".encode()
        uid += b"\0" * (len(uid) % 2)
        empty = struct.pack("<HH2sHL", 0x0008, 0x1199, b"SQ", 0, 0xFFFFFFFF if undefined else 0)
        if undefined:
            empty += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        item = _element(0x0008, 0x1155, b"UI", uid) + empty
        if undefined:
            out.append(struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + item
                       + struct.pack("<HHL", 0xFFFE, 0xE00D, 0))
        else:
            out.append(struct.pack("<HHL", 0xFFFE, 0xE000, len(item)) + item)
    body = b"".join(out)
    if undefined:
        return (struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF) + body
                + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    return struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, len(body)) + body


def test_a_sequence_of_thousands_of_items_digests_alike_in_defined_and_undefined_lengths(
    tmp_path: Path,
) -> None:
    # 5,000 items are ~30,000 parts of the canonical form: hashed in pieces while the sequence is open
    defined = _with_sequence(_items(5000, undefined=False))
    undefined = _with_sequence(_items(5000, undefined=True))
    path = tmp_path / "defined.dcm"
    path.write_bytes(defined)
    base = digest(defined)
    assert digest(undefined) == base == read_header(path, large_file_bytes=0).digest
    assert digest(_with_sequence(_items(5001, undefined=False))) != base
    changed = defined.replace(b"1.2.3.432\0", b"1.2.3.999\0")
    assert len(changed) == len(defined) and digest(changed) != base


def test_a_long_value_that_stops_parsing_as_items_late_is_hashed_as_its_bytes() -> None:
    # a private UN value that starts as 5,000 items and then is not one (rolled back after pieces of its
    # items were hashed) digests as the same bytes sent as OB, which are never parsed as items
    item = struct.pack("<HHL", 0x0008, 0x1155, 8) + b"1.2.3.4\0"  # Implicit VR Little Endian, inside UN
    value = struct.pack("<HHL", 0xFFFE, 0xE000, len(item)) + item
    value = value * 5000 + b"\x01\x02\x03\x04\x05\x06\x07\x08"

    def with_private(vr: bytes) -> bytes:
        base = encoded(ct(), EXPLICIT)  # Pixel Data (7FE0,0010) is last: (7FE1,1010) goes after it
        return base + struct.pack("<HH2sHL", 0x7FE1, 0x1010, vr, 0, len(value)) + value

    assert digest(with_private(b"UN")) == digest(with_private(b"OB"))
    shorter = value[:-8]  # all items: parsed, so digested as a sequence, not as bytes
    base = encoded(ct(), EXPLICIT)
    as_items = base + struct.pack("<HH2sHL", 0x7FE1, 0x1010, b"UN", 0, len(shorter)) + shorter
    as_bytes = base + struct.pack("<HH2sHL", 0x7FE1, 0x1010, b"OB", 0, len(shorter)) + shorter
    assert digest(as_items) != digest(as_bytes)
