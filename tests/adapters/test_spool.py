"""Spool and quarantine: durable writes, private folders, random names, clean failure."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file

from ingest.adapters.spool import Quarantine, Spool, read_instance
from ingest.errors import StoreUnavailableError

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))  # type: ignore[arg-type]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _entries(root: Path) -> list[str]:
    return sorted(os.listdir(root))


def test_folder_is_private_and_files_are_0600(tmp_path: Path) -> None:
    old = os.umask(0)  # even with a permissive umask
    try:
        spool = Spool(tmp_path / "a" / "spool")
        f = spool.write(b"hello")
    finally:
        os.umask(old)
    assert _mode(spool.root) == 0o700
    assert _mode(f.path) == 0o600
    assert not os.access(f.path, os.X_OK) or os.geteuid() == 0
    assert _mode(f.path) & 0o111 == 0


def test_existing_folder_is_tightened(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    Spool(root)
    assert _mode(root) == 0o700


def test_write_is_complete_and_named_randomly(tmp_path: Path) -> None:
    data = CT_SMALL.read_bytes()
    spool = Spool(tmp_path / "spool")
    a, b = spool.write(data), spool.write(data)
    assert a.name != b.name
    for f in (a, b):
        assert len(f.name) == 32 and int(f.name, 16) >= 0
        assert f.path.read_bytes() == data
        assert f.size == len(data)
        assert f.sha256 == hashlib.sha256(data).hexdigest()
        assert spool.path(f.name) == f.path
        assert f.path.parent == spool.root
    assert _entries(spool.root) == sorted([a.name, b.name])  # no temp files left
    assert spool.bytes_used() == 2 * len(data)
    assert spool.names() == sorted([a.name, b.name])


def test_names_never_carry_dicom_values(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    data = CT_SMALL.read_bytes()
    f = spool.write(data)
    from pydicom import dcmread

    ds = dcmread(CT_SMALL, stop_before_pixels=True)
    for value in (ds.SOPInstanceUID, ds.StudyInstanceUID, str(ds.PatientName)):
        assert value not in str(f.path)


def test_chunked_writer_commits_what_was_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    chunks: list[bytes | bytearray] = [os.urandom(1000), b"", os.urandom(70_000), bytearray(b"tail")]
    with spool.open_writer() as w:
        for chunk in chunks:
            w.write(chunk)
        assert w.size == sum(len(c) for c in chunks)
        f = w.commit()
    assert f.path.read_bytes() == b"".join(chunks)
    assert f.sha256 == hashlib.sha256(b"".join(chunks)).hexdigest()


def test_an_unhashed_writer_commits_the_same_bytes_without_a_digest(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    data = os.urandom(300_000)
    with spool.open_writer(hashed=False) as w:
        w.write(data[:1000])
        w.write(data[1000:])
        f = w.commit()
    assert f.path.read_bytes() == data
    assert f.size == len(data)
    assert f.sha256 == ""  # not computed (the listener digests the content in its header read)
    assert spool.names() == [f.name]


def test_commit_fsyncs_file_and_folder_then_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def rename(src: str | Path, dst: str | Path) -> None:
        events.append("rename")
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    spool.write(b"x" * 10)
    assert events == ["fsync-file", "rename", "fsync-dir"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EDQUOT])
def test_write_error_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    spool = Spool(tmp_path / "spool")
    kept = spool.write(b"earlier")
    calls = 0
    real_write = os.write

    def failing_write(fd: int, data: bytes) -> int:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise OSError(code, os.strerror(code))
        return real_write(fd, bytes(data)[:3])  # a short write first: the rest must still be written

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(StoreUnavailableError) as info:
        spool.write(b"secret-patient-bytes")
    assert str(spool.root) in str(info.value)
    assert "secret" not in str(info.value)
    assert errno.errorcode[code] in str(info.value)
    assert _entries(spool.root) == [kept.name]
    assert spool.bytes_used() == len(b"earlier")


def test_batch_commit_syncs_the_folder_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    spool = Spool(tmp_path / "spool")
    names = []
    for i in range(3):
        with spool.open_writer() as writer:
            writer.write(b"x" * (i + 1))
            names.append(writer.commit(sync_dir=False).name)
    assert events == ["fsync-file"] * 3  # each file's data, no folder sync yet
    spool.sync()
    assert events == ["fsync-file"] * 3 + ["fsync-dir"]
    assert sorted(names) == spool.names()


def test_folder_sync_error_is_out_of_resources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(StoreUnavailableError, match="cannot sync the folder"):
        spool.sync()


def test_fsync_error_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StoreUnavailableError, match="EIO"):
        spool.write(b"data")
    assert _entries(spool.root) == []


def test_directory_fsync_error_removes_the_renamed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path / "spool")
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StoreUnavailableError):
        spool.write(b"data")
    assert _entries(spool.root) == []


def test_abort_and_uncommitted_context_leave_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    w = spool.open_writer()
    w.write(b"abc")
    w.abort()
    w.abort()
    with spool.open_writer() as w2:
        w2.write(b"never committed")
    with pytest.raises(RuntimeError), spool.open_writer() as w3:
        w3.write(b"abc")
        raise RuntimeError("sender went away")
    assert _entries(spool.root) == []
    assert spool.bytes_used() == 0
    with pytest.raises(ValueError):
        w.write(b"x")


def test_quota_refuses_and_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=100)
    first = spool.write(b"a" * 60)
    with pytest.raises(StoreUnavailableError, match="quota"):
        spool.write(b"b" * 41)
    assert _entries(spool.root) == [first.name]
    spool.remove(first.name)
    assert spool.bytes_used() == 0
    spool.write(b"c" * 100)
    assert Spool(tmp_path / "spool", max_bytes=100).bytes_used() == 100  # counted again at open


@pytest.mark.parametrize(
    "name",
    ["../escape", "/etc/passwd", "..", "", "a/b", "0" * 31, "0" * 33, "G" * 32, "1.2.840.10008"],
)
def test_path_escape_and_bad_names_refused(tmp_path: Path, name: str) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(ValueError):
        spool.path(name)
    with pytest.raises(ValueError):
        spool.remove(name)


def test_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    outside = tmp_path / "outside"
    outside.write_bytes(b"x")
    name = "ab" * 16
    (spool.root / name).symlink_to(outside)
    with pytest.raises(ValueError, match="escapes"):
        spool.path(name)


def test_remove_is_idempotent(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    f = spool.write(b"abc")
    spool.remove(f.name)
    spool.remove(f.name)
    assert not f.path.exists()


def test_unwritable_root_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StoreUnavailableError, match="spool"):
        Spool(blocker / "spool")


def test_stale_temp_files_are_swept(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    w = spool.open_writer()
    w.write(b"crash")
    tmp = [p for p in spool.root.iterdir()]
    assert len(tmp) == 1 and tmp[0].name.startswith(".tmp-")
    assert spool.sweep_temps(older_than_s=3600) == 0
    old = datetime.now(UTC).timestamp() - 7200
    os.utime(tmp[0], (old, old))
    assert spool.sweep_temps(older_than_s=3600) == 1
    w.abort()
    assert _entries(spool.root) == []


# -- quarantine ------------------------------------------------------------------------------------------


def test_quarantine_keeps_bytes_and_reason(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "quarantine")
    now = datetime(2024, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    name = q.put(b"not dicom", "not_dicom", "preamble", "no DICM prefix in watch file", now)
    assert (q.root / name).read_bytes() == b"not dicom"
    side = json.loads((q.root / f"{name}.json").read_bytes())
    assert side["reason"] == "not_dicom"
    assert side["rule"] == "preamble"
    assert side["detail"] == "no DICM prefix in watch file"
    assert datetime.fromisoformat(side["time"]) == datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    assert side["sha256"] == hashlib.sha256(b"not dicom").hexdigest()
    assert q.reason(name) == side
    assert _mode(q.root) == 0o700
    assert _mode(q.root / name) == 0o600 and _mode(q.root / f"{name}.json") == 0o600
    assert q.names() == [name]
    assert _entries(q.root) == sorted([name, f"{name}.json"])


def test_quarantine_copies_a_file(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "quarantine")
    name = q.put(CT_SMALL, "conflict", "other_content", "SOP 1.2.3 other digest", datetime.now(UTC))
    assert (q.root / name).read_bytes() == CT_SMALL.read_bytes()
    assert CT_SMALL.exists()
    q.remove(name)
    assert _entries(q.root) == []


def test_quarantine_disk_full_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    q = Quarantine(tmp_path / "quarantine")
    calls = 0
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:  # the side file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(StoreUnavailableError, match="ENOSPC"):
        q.put(b"bytes", "not_dicom", "preamble", "x", datetime.now(UTC))
    assert _entries(q.root) == []


def test_quarantine_refuses_naive_time(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "quarantine")
    with pytest.raises(ValueError):
        q.put(b"x", "r", "r", "d", datetime(2024, 1, 1))
    assert _entries(q.root) == []


def test_quarantine_quota_keeps_only_a_side_file_once_full(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "quarantine", max_bytes=4096)
    now = datetime.now(UTC)
    first = q.put(b"a" * 1000, "not_dicom", "preamble", "first", now, source="dimse:SENDER")
    assert q.holds(first) and q.reason(first)["kept"] is True and q.reason(first)["source"] == "dimse:SENDER"
    second = q.put(b"b" * 4000, "not_dicom", "preamble", "second", now)
    assert not q.holds(second) and not (q.root / second).exists()
    side = q.reason(second)
    assert side["kept"] is False and side["not_kept"] == "quarantine full"
    assert side["size"] == 4000 and side["sha256"] is None and side["detail"] == "second"
    assert _mode(q.root / f"{second}.json") == 0o600
    assert q.names() == [first] and q.not_kept == 1
    # a file path is judged by its size before anything is copied
    big = tmp_path / "big.bin"
    big.write_bytes(b"c" * 5000)
    third = q.put(big, "conflict", "other_content", "third", now)
    assert not q.holds(third) and q.names() == [first] and q.not_kept == 2
    assert big.read_bytes() == b"c" * 5000
    assert Quarantine(tmp_path / "other").max_bytes == 1024**3  # the default quota


def test_quarantine_describe_writes_a_side_file_and_never_reads_the_input(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "quarantine")
    name = q.describe(50 * 1024**2, "too_large", "max_instance_bytes", "50 MB over the cap",
                      datetime.now(UTC), source="/drop/huge.dcm")
    assert _entries(q.root) == [f"{name}.json"]
    side = q.reason(name)
    assert side["kept"] is False and side["not_kept"] == "over the size cap"
    assert side["size"] == 50 * 1024**2 and side["source"] == "/drop/huge.dcm"
    q.remove(name)
    assert _entries(q.root) == []


def test_sweep_temps_with_zero_age_removes_fresh_temporary_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    fresh = spool.root / ".tmp-0123456789abcdef0123456789abcdef"
    fresh.write_bytes(b"left by a kill -9")
    assert spool.sweep_temps() == 0 and fresh.exists()  # the default keeps young ones
    assert spool.sweep_temps(older_than_s=0) == 1 and not fresh.exists()


# -- read_instance: an accepted instance's bytes, in-row or in its spool file (both state stores) ----------

_T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def _record(sop: str) -> Any:
    from ingest.core.records import InstanceRecord

    study = "1.2.826.0.1.3680043.2.1125.11"
    return InstanceRecord(study_uid=study, series_uid=f"{study}.1", sop_uid=sop,
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.2")


def test_read_instance_finds_in_row_bytes_and_spool_files(store: Any, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    small = b"\0" * 128 + b"DICM" + b"small instance"
    large = spool.write(b"\0" * 128 + b"DICM" + b"x" * 5000)
    results = store.add_instances(
        [(_record("1.2.7.1"), "dimse:A", None, "c1:1"), (_record("1.2.7.2"), "dimse:A", large.name, "c1:2"),
         (_record("1.2.7.3"), "dimse:A", None, "c1:3")],
        now=_T0, due_at=_T0, inline=[small, None, None],
    )
    assert [r.outcome.name for r in results] == ["ADDED"] * 3
    assert read_instance(store, spool, "1.2.7.1") == small
    assert read_instance(store, spool, "1.2.7.2") == large.path.read_bytes()
    assert read_instance(store, spool, "1.2.7.3") is None  # a row without kept bytes (replay)
    assert read_instance(store, spool, "1.2.7.9") is None  # unknown
    assert store.instance_spool_name("1.2.7.2") == large.name and store.instance_spool_name("1.2.7.1") is None
    assert store.inline_bytes_total() == len(small)
    # an identical duplicate keeps the first bytes and adds none
    again = store.add_instance(_record("1.2.7.1"), source="dimse:B", spool_name=None, digest="c1:1",
                               now=_T0, due_at=_T0, data=b"other bytes")
    assert again.outcome.name == "DUPLICATE"
    assert store.instance_bytes("1.2.7.1") == small and store.inline_bytes_total() == len(small)
    spool.remove(large.name)  # released by retention since: nothing to read, not an error
    assert read_instance(store, spool, "1.2.7.2") is None


def test_add_instances_refuses_inline_of_another_length(store: Any) -> None:
    with pytest.raises(ValueError, match="inline has 2 entries for 1 items"):
        store.add_instances([(_record("1.2.7.5"), "dimse:A", None, "c1:5")], now=_T0, due_at=_T0,
                            inline=[b"a", b"b"])
    assert store.instance_bytes("1.2.7.5") is None
