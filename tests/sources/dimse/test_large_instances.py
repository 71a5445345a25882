"""Large instances with bounded memory: the windowed file reader and the listener's receive-to-disk path."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pydicom.data
import pytest

from ingest.adapters.dicomfile import ParsedInstance, read_header
from ingest.errors import HeaderError
from tests import REPO
from tests.sources.dimse.listener_helpers import (
    CT_IMAGE,
    encode,
    instance,
    make_settings,
    raw_file,
    running_listener,
    scu,
    send_raw,
)

MB = 1024 * 1024


def _outcome(path: Path, **kw: Any) -> tuple[str, object]:
    try:
        return "ok", read_header(path, **kw)
    except (HeaderError, RecursionError) as exc:
        return type(exc).__name__, str(exc)


def _large_file(folder: Path, pixel_bytes: int, *, sop_uid: str = "1.2.3.4.9.3", trailer: bytes = b"",
                declared: int | None = None) -> Path:
    """A Part 10 multi-frame CT whose zero Pixel Data (7FE0,0010) is a sparse hole (never in memory)."""
    ds = instance(sop_uid=sop_uid, study="1.2.3.4.9.1", series="1.2.3.4.9.2")
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 512, 512, 16, 12, 11
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = max(1, pixel_bytes // (512 * 512 * 2))
    length = pixel_bytes if declared is None else declared
    header = encode(ds) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length)
    path = raw_file(folder, header, sop_class=CT_IMAGE, sop_uid=sop_uid)
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size + pixel_bytes)  # zeros, sparse
        fh.seek(0, os.SEEK_END)
        fh.write(trailer)
    return path


def _body_digest(path: Path) -> str:
    """SHA-256 of the bytes after the file meta group, computed here independently of the reader."""
    with path.open("rb") as fh:
        head = fh.read(200_000)
        assert head[128:132] == b"DICM"
        group_len = struct.unpack_from("<L", head, 132 + 8)[0]  # (0002,0000) UL value
        fh.seek(132 + 12 + group_len)
        sha = hashlib.sha256()
        while chunk := fh.read(MB):
            sha.update(chunk)
    return sha.hexdigest()


# -- read_header: windowed == in memory ------------------------------------------------------------


def test_windowed_read_equals_in_memory_for_pydicom_files_and_their_truncations(tmp_path: Path) -> None:
    root = Path(pydicom.data.__file__).parent / "test_files"
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert len(files) > 50
    compared = differing = 0
    for src in files:
        data = src.read_bytes()
        variants = [src]
        for cut in {len(data) // 2, len(data) - 1, 140}:
            if 0 < cut < len(data):
                cut_path = tmp_path / f"{src.name}.{cut}"
                cut_path.write_bytes(data[:cut])
                variants.append(cut_path)
        for path in variants:
            expected = _outcome(path)  # below the threshold: the in-memory path
            for threshold in (0, 1000):
                compared += 1
                if _outcome(path, large_file_bytes=threshold) != expected:
                    differing += 1
    assert compared > 300
    assert differing == 0


def test_windowed_read_of_a_large_file_with_a_trailer_and_a_truncated_one(tmp_path: Path) -> None:
    trailer = struct.pack("<HH2sH", 0xFFFC, 0xFFFC, b"OB", 0) + struct.pack("<L", 4) + b"\0" * 4
    path = _large_file(tmp_path, 3 * MB, trailer=trailer)
    whole = read_header(path, large_file_bytes=1 << 40)
    windowed = read_header(path, large_file_bytes=0)
    assert isinstance(windowed, ParsedInstance)
    assert windowed == whole
    assert windowed.digest.startswith("c1:")  # the content digest, equal to the in-memory one above
    assert windowed.size == path.stat().st_size
    assert windowed.record.sop_uid == "1.2.3.4.9.3"

    short = _large_file(tmp_path, 3 * MB, sop_uid="1.2.3.4.9.4", declared=3 * MB + 2)
    a, b = _outcome(short, large_file_bytes=1 << 40), _outcome(short, large_file_bytes=0)
    assert a[0] == "TruncatedError"
    assert a == b


_RSS_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from ingest.adapters.dicomfile import read_header

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    read_header(Path(sys.argv[2]))  # warm up imports and caches on a small file
    before = hwm()
    parsed = read_header(Path(sys.argv[1]))
    print(hwm() - before, parsed.digest, parsed.size)
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_read_header_of_a_300_mb_file_keeps_memory_flat(tmp_path: Path) -> None:
    big = _large_file(tmp_path, 300 * MB)
    small = _large_file(tmp_path, 1 * MB, sop_uid="1.2.3.4.9.5")
    try:
        out = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, str(big), str(small)],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
        ).stdout.split()
        growth, digest, size = int(out[0]), out[1], int(out[2])
        assert size == big.stat().st_size
        assert digest.startswith("c1:") and len(digest) == 67
        assert growth < 64 * MB, f"peak RSS grew by {growth / MB:.1f} MiB"
    finally:
        big.unlink()


# -- listener: data sets past the threshold go to disk ----------------------------------------------


def _temps(spool: Path) -> list[str]:
    return [p.name for p in spool.iterdir() if p.name.startswith(".tmp-")]


def test_spilled_store_writes_the_same_spool_file_as_the_in_memory_path(tmp_path: Path) -> None:
    src = _large_file(tmp_path / "in", 2 * MB)
    spooled: list[bytes] = []
    for name, threshold in (("memory", 1 << 40), ("disk", 64 * 1024)):
        with running_listener(make_settings(tmp_path / name)) as run:
            run.listener.large_instance_bytes = threshold
            status = send_raw(run.port, src)
            assert status.Status == 0x0000
            rows = run.store.instances("1.2.3.4.9.1")
            assert len(rows) == 1
            names = run.listener.spool.names()
            assert len(names) == 1
            assert _temps(run.listener.spool.root) == []
            spooled.append(run.listener.spool.path(names[0]).read_bytes())
            parsed = read_header(run.listener.spool.path(names[0]))
            assert parsed.digest == read_header(src).digest  # the same content as the file sent
            # an identical duplicate is still success, with no new row and no file left over
            assert send_raw(run.port, src).Status == 0x0000
            assert len(run.store.instances("1.2.3.4.9.1")) == 1
            assert len(run.listener.spool.names()) == 1
            assert _temps(run.listener.spool.root) == []
    assert spooled[0] == spooled[1]


def test_spilled_store_rejections_leave_nothing_in_the_spool(tmp_path: Path) -> None:
    with running_listener(make_settings(tmp_path / "data")) as run:
        run.listener.large_instance_bytes = 64 * 1024
        # dataset SOP Instance UID differs from the command's -> 0xA900
        ds = instance(sop_uid="1.2.3.4.9.7")
        body = encode(ds) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, MB) + b"\0" * MB
        wrong = raw_file(tmp_path / "in", body, sop_class=CT_IMAGE, sop_uid="1.2.3.4.9.8")
        assert send_raw(run.port, wrong).Status == 0xA900
        # Pixel Data declares more bytes than were sent -> truncated, 0xC001
        short = encode(instance(sop_uid="1.2.3.4.9.9"))
        short += struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 2 * MB) + b"\0" * MB
        cut = raw_file(tmp_path / "in", short, sop_class=CT_IMAGE, sop_uid="1.2.3.4.9.9")
        assert send_raw(run.port, cut).Status == 0xC001
        assert run.store.instances("1.2.3.4.5.1") == []
        assert run.listener.spool.names() == []
        assert _temps(run.listener.spool.root) == []
        assert len(run.listener.quarantine.names()) == 2



def test_a_spilled_data_set_over_the_size_cap_is_answered_0xa700_and_leaves_nothing(tmp_path: Path) -> None:
    # received to disk past the threshold, then past max_instance_bytes: Out of Resources, never 0xC211
    with running_listener(make_settings(tmp_path / "data", max_instance_bytes=MB)) as run:
        run.listener.large_instance_bytes = 64 * 1024
        body = encode(instance(sop_uid="1.2.3.4.9.10"))
        body += struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 2 * MB) + b"\0" * (2 * MB)
        big = raw_file(tmp_path / "in", body, sop_class=CT_IMAGE, sop_uid="1.2.3.4.9.10")
        assert send_raw(run.port, big).Status == 0xA700
        assert run.store.instances("1.2.3.4.5.1") == []
        assert run.listener.spool.names() == []
        assert _temps(run.listener.spool.root) == []


_SENDER_SCRIPT = textwrap.dedent("""
    import sys
    from pynetdicom import AE, _config
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="INGEST")
    assoc.send_c_store(sys.argv[2])
""")


def test_sender_killed_mid_transfer_leaves_no_temp_file(tmp_path: Path) -> None:
    src = _large_file(tmp_path / "in", 256 * MB)
    with running_listener(make_settings(tmp_path / "data")) as run:
        run.listener.large_instance_bytes = 64 * 1024
        spool = run.listener.spool.root
        sender = subprocess.Popen([sys.executable, "-c", _SENDER_SCRIPT, str(run.port), str(src)], cwd=REPO)
        try:
            deadline = time.monotonic() + 20
            while not _temps(spool) and time.monotonic() < deadline and sender.poll() is None:
                time.sleep(0.01)
            assert _temps(spool), "the data set never reached the spool"
        finally:
            sender.kill()  # the modality dies mid-transfer: the connection just closes
            sender.wait(10)
        deadline = time.monotonic() + 10
        while _temps(spool) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _temps(spool) == []
        assert run.listener.spool.names() == []
        assert run.store.instances("1.2.3.4.9.1") == []
    src.unlink()


# -- `ingest serve` receiving 200 MB: peak RSS of the receiving process ------------------------------


def _hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_serve_receives_a_200_mb_instance_with_flat_memory(tmp_path: Path) -> None:
    from tests.app.test_serve_dcmtk import _free_ports

    dicom_port, backend_port, admin_port = _free_ports()
    data = tmp_path / "data"
    data.mkdir()
    env = dict(os.environ)
    env.update({
        "INGEST_LISTENER__PORT": str(dicom_port),
        "INGEST_LISTENER__ACCEPT_ANY_CALLING_AE": "true",
        "INGEST_EMBEDDED_BACKEND__PORT": str(backend_port),
        "INGEST_ADMIN__PORT": str(admin_port),
        "INGEST_RELAY__STABLE_AGE_S": "600",
        "INGEST_RELAY__RELEASE_GRACE_S": "600",
    })
    src = _large_file(tmp_path / "in", 200 * MB)
    log = (data / "serve.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "ingest", "--data-dir", str(data), "serve"],
                            cwd=REPO, env=env, stdout=log, stderr=log)
    try:
        ae = scu()
        ae.add_requested_context("1.2.840.10008.1.1")
        deadline = time.monotonic() + 30
        # wait for the log line saying it listens (a bare TCP probe would hold an idle association open)
        while f":{dicom_port} (" not in (data / "serve.log").read_text():
            assert proc.poll() is None, (data / "serve.log").read_text()
            assert time.monotonic() < deadline, "ingest serve did not start listening"
            time.sleep(0.1)
        assoc = ae.associate("127.0.0.1", dicom_port, ae_title="INGEST")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        before = _hwm(proc.pid)
        status = send_raw(dicom_port, src)
        after = _hwm(proc.pid)
        assert status is not None and status.Status == 0x0000, (data / "serve.log").read_text()[-2000:]
        spool = data / "spool"
        kept = [p for p in spool.iterdir() if not p.name.startswith(".")]
        assert len(kept) == 1
        assert _body_digest(kept[0]) == _body_digest(src)  # the data set, byte for byte
        assert _temps(spool) == []
        assert after - before < 80 * MB, f"peak RSS grew by {(after - before) / MB:.1f} MiB"
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        log.close()
        src.unlink()
        for p in (data / "spool").iterdir():
            p.unlink()
