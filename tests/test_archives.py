"""Tests for ingest.archives: member-by-member reading, containment checks and bomb caps."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from ingest.archives import MEMBER_REASON, ArchiveLimits, is_archive, iter_members
from ingest.errors import ArchiveError
from ingest.sources import Parsed, Rejected, parse_items
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
