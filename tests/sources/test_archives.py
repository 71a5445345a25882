"""Tests for ingest.sources.archives: member-by-member reading, containment checks and bomb caps."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from ingest.errors import ArchiveError
from ingest.sources.archives import MEMBER_REASON, ArchiveLimits, is_archive, iter_members
from ingest.sources.parse import Parsed, Rejected, parse_items
from samples.generate import generate

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return generate(tmp_path / "corpus", studies=2, files=6, tiny=True, seed=3).root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.dcm"))}


def _tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def test_is_archive_by_name(tmp_path: Path) -> None:
    for name, expected in (("a.zip", True), ("a.TAR", True), ("a.tar.gz", True), ("a.tgz", True),
                           ("a.dcm", False), ("a.gz", False)):
        (tmp_path / name).write_bytes(b"x")
        assert is_archive(tmp_path / name) is expected, name
    (tmp_path / "folder.zip").mkdir()
    assert not is_archive(tmp_path / "folder.zip")


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz", "tgz"])
def test_members_come_back_with_their_bytes_and_labels(tmp_path: Path, corpus: Path, kind: str) -> None:
    expected = _files(corpus)
    archive = tmp_path / f"corpus.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("study-000/", b"")  # a folder entry is skipped
            for name, data in expected.items():
                zf.writestr(name, data)
    else:
        with tarfile.open(archive, "w" if kind == "tar" else "w:gz") as tf:
            tf.add(corpus, arcname=".")
    items = list(iter_members(archive))
    got = {it.label.split("!", 1)[1].removeprefix("./"): it.data for it in items}
    assert got == expected
    assert all(it.label.startswith(f"{archive}!") and it.rejection is None for it in items)


def _zip_with_bad_members(path: Path) -> None:
    data = CT_SMALL.read_bytes()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("../evil.dcm", data)
        zf.writestr("/tmp/abs-evil.dcm", data)
        zf.writestr("sub\\..\\..\\win-evil.dcm", data)
        link = zipfile.ZipInfo("link.dcm")
        link.create_system = 3  # Unix: external_attr carries st_mode (APPNOTE 4.4.15)
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
        fifo = zipfile.ZipInfo("fifo.dcm")
        fifo.create_system = 3
        fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
        zf.writestr(fifo, b"")
        zf.writestr("good/ct.dcm", data)


def test_zip_members_escaping_the_root_or_links_are_refused_by_rule(tmp_path: Path) -> None:
    archive = tmp_path / "bad.zip"
    _zip_with_bad_members(archive)
    before = _tree(tmp_path.parent)
    items = list(iter_members(archive))
    assert _tree(tmp_path.parent) == before  # nothing written anywhere
    refused = {it.label.split("!", 1)[1]: it.rejection for it in items if it.rejection}
    assert set(refused) == {"../evil.dcm", "/tmp/abs-evil.dcm", "sub\\..\\..\\win-evil.dcm", "link.dcm",
                            "fifo.dcm"}
    rules = {name: why[1].split("(rule ", 1)[1].split(")", 1)[0] for name, why in refused.items()}
    assert rules == {"../evil.dcm": "unsafe_path", "/tmp/abs-evil.dcm": "unsafe_path",
                     "sub\\..\\..\\win-evil.dcm": "unsafe_path", "link.dcm": "link",
                     "fifo.dcm": "special_file"}
    for name, (reason, message) in refused.items():
        assert reason == MEMBER_REASON
        assert str(archive) in message and repr(name) in message
    good = [it for it in items if it.rejection is None]
    assert [it.label for it in good] == [f"{archive}!good/ct.dcm"]
    assert good[0].data == CT_SMALL.read_bytes()
    # parse_items reports the refusals as rejections, in order, without reading them
    results = list(parse_items(items))
    assert [type(r) for r in results].count(Rejected) == 5
    assert isinstance(results[-1], Parsed)


def test_tar_links_devices_and_escapes_are_refused(tmp_path: Path) -> None:
    data = CT_SMALL.read_bytes()
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:

        def add(name: str, kind: bytes = tarfile.REGTYPE, payload: bytes = b"", link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = link
            info.size = len(payload) if kind == tarfile.REGTYPE else 0
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)

        add("../evil.dcm", payload=data)
        add("/abs/evil.dcm", payload=data)
        add("sym.dcm", tarfile.SYMTYPE, link="../../etc/passwd")
        add("hard.dcm", tarfile.LNKTYPE, link="ok.dcm")
        add("dev.dcm", tarfile.CHRTYPE)
        add("ok.dcm", payload=data)
    before = _tree(tmp_path.parent)
    items = list(iter_members(archive))
    assert _tree(tmp_path.parent) == before
    refused = {it.label.split("!", 1)[1]: it.rejection[1] for it in items if it.rejection}
    assert set(refused) == {"../evil.dcm", "/abs/evil.dcm", "sym.dcm", "hard.dcm", "dev.dcm"}
    assert "rule link" in refused["sym.dcm"] and "rule link" in refused["hard.dcm"]
    assert "rule special_file" in refused["dev.dcm"]
    assert "rule unsafe_path" in refused["../evil.dcm"] and "rule unsafe_path" in refused["/abs/evil.dcm"]
    assert [it.data for it in items if it.rejection is None] == [data]


def test_zip_member_count_and_total_size_caps_refuse_the_whole_archive(tmp_path: Path) -> None:
    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(11):
            zf.writestr(f"m{i}.dcm", b"x" * 100)
    with pytest.raises(ArchiveError, match=r"many\.zip refused \(rule max_members\)"):
        next(iter_members(archive, ArchiveLimits(max_members=10)))
    with pytest.raises(ArchiveError, match=r"rule max_total_bytes"):
        next(iter_members(archive, ArchiveLimits(max_total_bytes=1000)))
    assert len(list(iter_members(archive, ArchiveLimits(max_members=11, max_total_bytes=1100)))) == 11


def test_zip_compression_ratio_and_member_size_caps_refuse_the_member(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.dcm", bytes(8 * 1024 * 1024))  # deflates ~1000:1
        zf.writestr("ct.dcm", CT_SMALL.read_bytes())
    items = list(iter_members(archive))
    assert items[0].rejection is not None and "rule compression_ratio" in items[0].rejection[1]
    assert items[1].rejection is None and items[1].data == CT_SMALL.read_bytes()
    capped = list(iter_members(archive, ArchiveLimits(max_member_bytes=1024)))
    assert all(it.rejection is not None and "rule member_size" in it.rejection[1] for it in capped)


def test_tar_gz_bomb_is_refused_while_streaming(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("zeros.dcm")
        info.size = 16 * 1024 * 1024
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    with pytest.raises(ArchiveError, match=r"rule compression_ratio"):
        list(iter_members(archive))
    with pytest.raises(ArchiveError, match=r"rule max_total_bytes"):
        list(iter_members(archive, ArchiveLimits(max_total_bytes=1024 * 1024, max_ratio=10**6)))
    with pytest.raises(ArchiveError, match=r"rule max_members"):
        list(iter_members(archive, ArchiveLimits(max_members=0)))


@pytest.mark.parametrize("name", ["broken.zip", "broken.tar", "broken.tar.gz"])
def test_unreadable_archive_is_refused(tmp_path: Path, name: str) -> None:
    archive = tmp_path / name
    archive.write_bytes(b"this is not an archive at all" * 50)
    with pytest.raises(ArchiveError, match="refused"):
        list(iter_members(archive))


def test_truncated_tar_gz_is_refused(tmp_path: Path, corpus: Path) -> None:
    archive = tmp_path / "cut.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(corpus, arcname=".")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError, match="refused"):
        list(iter_members(archive))


# -- archive bombs, with the peak memory of a real `ingest replay` measured in the child -------------------

_BOMB_BYTES = 512 * 1024**2
_MAX_PEAK_RSS = 200 * 1024**2
_ZERO_CHUNK = bytes(1024 * 1024)


class _Zeros(io.RawIOBase):
    """``size`` zero bytes as a readable stream (the fixture is built without holding them)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = _ZERO_CHUNK[:n] if n <= len(_ZERO_CHUNK) else bytes(n)
        self.left -= n
        return n


# Runs ``python -m ingest`` and, at exit, writes the process's own VmHWM (peak resident set of its
# memory map, which starts afresh at exec) to the file named by argv[1]. ``ru_maxrss`` from wait4 would
# not do: Linux carries the forking parent's peak over exec, so under a large pytest worker it measures
# the worker.
_MEASURED_MAIN = """
import atexit, runpy, sys
out = sys.argv.pop(1)
def _peak():
    with open("/proc/self/status") as status, open(out, "w") as fh:
        fh.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
atexit.register(_peak)
sys.argv[0] = "ingest"
runpy.run_module("ingest", run_name="__main__")
"""


def _replay_peak_rss(tmp_path: Path, archive: Path) -> tuple[int, str, int]:
    """Run ``ingest replay --dry-run --jobs 1`` on ``archive`` in a child (every byte read and parsed in
    that one process); (exit code, stderr, peak RSS bytes)."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    peak_path = tmp_path / "peak_kib.txt"
    child = subprocess.run(
        [sys.executable, "-c", _MEASURED_MAIN, str(peak_path), "-q", "--data-dir", str(tmp_path / "data"),
         "replay", "--dry-run", "--jobs", "1", str(archive)],
        cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=50, check=False,
    )
    return child.returncode, child.stderr.decode(), int(peak_path.read_text()) * 1024  # VmHWM is in kB


@pytest.mark.timeout(60)
def test_replay_refuses_a_tar_gz_bomb_in_bounded_memory(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=6) as tf:  # zeros deflate ~1000:1
        info = tarfile.TarInfo("zeros.dcm")
        info.size = _BOMB_BYTES  # under max_member_bytes: only the ratio refuses it
        tf.addfile(info, io.BufferedReader(_Zeros(info.size), 1024 * 1024))
    assert archive.stat().st_size < 2 * 1024 * 1024
    code, stderr, peak = _replay_peak_rss(tmp_path, archive)
    assert code == 2, stderr
    assert "rule compression_ratio" in stderr and "'zeros.dcm'" in stderr and str(archive) in stderr
    assert peak < _MAX_PEAK_RSS, f"peak RSS {peak / 2**20:.0f} MiB"


def _lie_about_size(archive: Path, claimed: int) -> None:
    """Patch the uncompressed size of the single member in both its local and central headers."""
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        (info,) = zf.infolist()
        central = zf.start_dir
    local = info.header_offset
    assert data[local : local + 4] == b"PK\x03\x04" and data[central : central + 4] == b"PK\x01\x02"
    data[local + 22 : local + 26] = claimed.to_bytes(4, "little")  # APPNOTE 4.3.7: uncompressed size
    data[central + 24 : central + 28] = claimed.to_bytes(4, "little")  # APPNOTE 4.3.12
    archive.write_bytes(bytes(data))


@pytest.mark.timeout(60)
def test_replay_refuses_a_zip_whose_headers_lie_about_the_size_in_bounded_memory(tmp_path: Path) -> None:
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("zeros.dcm", "w") as fh:
        for _ in range(256):  # 256 MiB inflated, ~256 KiB on disk
            fh.write(_ZERO_CHUNK)
    _lie_about_size(archive, 1000)
    with zipfile.ZipFile(archive) as zf:
        assert zf.getinfo("zeros.dcm").file_size == 1000
    code, stderr, peak = _replay_peak_rss(tmp_path, archive)
    assert code == 2, stderr
    assert "'zeros.dcm' refused" in stderr and str(archive) in stderr and "rule readable" in stderr
    assert peak < _MAX_PEAK_RSS, f"peak RSS {peak / 2**20:.0f} MiB"
