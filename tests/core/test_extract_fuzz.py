"""Mutated bytes of real files: the reader returns a ParsedInstance or raises an IngestError, nothing else."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_charset_files, get_testdata_file

from ingest.adapters.dicomfile import ParsedInstance, read_header_bytes
from ingest.errors import IngestError


def bundled(name: str) -> str:
    """Path of one of pydicom's bundled test files."""
    path = get_testdata_file(name)
    assert isinstance(path, str)
    return path


SEEDS = [
    Path(bundled(name)).read_bytes()
    for name in (
        "CT_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "ExplVR_LitEndNoMeta.dcm",
        "image_dfl.dcm",
        "test-SR.dcm",
        "JPEG2000.dcm",
        "rtplan.dcm",
    )
] + [Path(get_charset_files(name)[0]).read_bytes() for name in ("chrH31.dcm", "chrI2.dcm", "chrX1.dcm")]

SYNTAXES = [None, "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "delete", "insert"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":  # lengths and tags: favour the values that break parsers
            value = draw(
                st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00", b"\xfe\xff\x00\xe0", b"SQ", b"\x1b$B"])
            )
            data[pos : pos + len(value)] = value
        elif kind == "cut":
            del data[pos:]
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated(), syntax=st.sampled_from(SYNTAXES))
def test_mutated_files_parse_or_raise_ingest_errors(data: bytes, syntax: str | None) -> None:
    try:
        result = read_header_bytes(
            data, source="fuzz", transfer_syntax_uid=syntax, max_inflated_bytes=1 << 22
        )
    except IngestError:
        return
    assert isinstance(result, ParsedInstance)
    assert result.size == len(data)
