"""Tests for ingest.sources.dropfolder: settle detection, durability, after-actions, quarantine, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import sqlite3
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

from ingest.adapters.dicomfile import read_header
from ingest.adapters.spool import Quarantine
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.config import (
    ListenerSettings,
    QuarantineSettings,
    RelaySettings,
    Settings,
    SpoolSettings,
    WatchSettings,
)
from ingest.metrics import Metrics
from ingest.relay.relay import utcnow
from ingest.sources.dropfolder import DropFolder, StepResult, open_drop_folder, run_watcher
from samples.generate import generate
from tests import iocm

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))
MR_SMALL = Path(str(get_testdata_file("MR_small.dcm")))
HEX_NAME = re.compile(r"^[0-9a-f]{32}$")


class FakeRelay:
    """Stands in for ``Relay``: the watcher only wakes it."""

    def __init__(self) -> None:
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1


class Running:
    """A watcher running as a task, with what a test needs to observe it."""

    def __init__(self, settings: Settings, store: SQLiteStateStore) -> None:
        self.settings = settings
        self.store = store
        self.relay = FakeRelay()
        self.stop = asyncio.Event()
        self.steps = 0
        self.drop: DropFolder | None = None
        self.metrics = Metrics()

    def on_step(self, drop: DropFolder, result: StepResult) -> None:
        self.drop = drop
        self.steps += 1

    @property
    def folder(self) -> Path:
        assert self.settings.watch.folder is not None
        return self.settings.watch.folder

    @property
    def data(self) -> Path:
        return self.settings.data_dir

    def instances(self) -> int:
        return sum(row.instances for row in self.store.studies())

    def quarantined(self) -> list[str]:
        q = self.data / "quarantine"
        return sorted(p.name for p in q.iterdir() if HEX_NAME.match(p.name)) if q.exists() else []

    def archived(self) -> list[Path]:
        a = self.data / "archive"
        return sorted(a.iterdir()) if a.exists() else []

    def spooled(self) -> list[bytes]:
        """The accepted bytes ingest keeps: spool files, and small files' bytes committed with their row."""
        s = self.data / "spool"
        files = sorted(p for p in s.iterdir() if HEX_NAME.match(p.name)) if s.exists() else []
        with contextlib.closing(sqlite3.connect(self.data / "state.sqlite3")) as db:
            rows = [bytes(r[0]) for r in db.execute("SELECT data FROM instance_bytes")]
        return [p.read_bytes() for p in files] + rows

    async def until(self, cond: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"condition not met within {timeout} s")
            await asyncio.sleep(0.05)

    async def quiet(self) -> None:
        """Give the watcher time to do something it should not do (well past ``settle_ms``)."""
        await asyncio.sleep(3 * self.settings.watch.settle_ms / 1000 + 0.3)


def make_settings(tmp_path: Path, **watch: Any) -> Settings:
    opts: dict[str, Any] = {"folder": tmp_path / "drop", "settle_ms": 200, "jobs": 2}
    opts.update(watch)
    return Settings(
        data_dir=tmp_path / "data",
        watch=WatchSettings(**opts),
        relay=RelaySettings(stable_age_s=5.0),
    )


@contextlib.asynccontextmanager
async def watching(settings: Settings, rescan_s: float = 30.0) -> AsyncIterator[Running]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = SQLiteStateStore(settings.data_dir / "state.sqlite3", node="test")
    run = Running(settings, store)
    task = asyncio.create_task(run_watcher(settings, store, run.relay.wake, run.metrics, run.stop,
                                           rescan_s=rescan_s, on_step=run.on_step))
    try:
        await run.until(lambda: run.steps >= 1 or task.done())
        if task.done():
            task.result()
        yield run
    finally:
        run.stop.set()
        await asyncio.wait_for(task, timeout=10)
        store.close()


def tiny_corpus(tmp_path: Path, files: int, studies: int = 2) -> list[Path]:
    return generate(tmp_path / "corpus", studies=studies, files=files, tiny=True, seed=7).paths()


# -- settle ------------------------------------------------------------------------------------------------

_SLOW_WRITER = """
import sys, time
src, dst, parts, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
data = open(src, "rb").read()
step = len(data) // parts + 1
with open(dst, "wb") as fh:
    for i in range(0, len(data), step):
        fh.write(data[i:i + step])
        fh.flush()
        time.sleep(pause)
"""


async def test_file_written_slowly_by_another_process_is_ingested_once_after_it_completes(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, settle_ms=400)
    async with watching(settings) as run:
        target = run.folder / "slow.dcm"
        writer = subprocess.Popen(
            [sys.executable, "-c", _SLOW_WRITER, str(CT_SMALL), str(target), "10", "0.12"]
        )
        try:
            # while the writer runs (~1.2 s), nothing may be ingested or quarantined
            while writer.poll() is None:
                assert run.instances() == 0
                assert run.quarantined() == []
                await asyncio.sleep(0.05)
        finally:
            if writer.poll() is None:
                writer.kill()
            writer.wait()
        assert writer.returncode == 0
        await run.until(lambda: run.instances() == 1 and not target.exists())
        await run.quiet()
        assert run.instances() == 1
        assert run.quarantined() == []
        assert run.drop is not None and run.drop.totals.accepted == 1
        # ingest keeps the complete bytes, the archive holds the original under a random 0600 name
        spooled = run.spooled()
        assert len(spooled) == 1 and spooled[0] == CT_SMALL.read_bytes()
        archived = run.archived()
        assert len(archived) == 1 and HEX_NAME.match(archived[0].name)
        assert archived[0].stat().st_mode & 0o777 == 0o600
        assert run.relay.wakes == 0  # due in stable_age_s (5 s): the relay's own poll finds it


def _read_as_incomplete(run: Running) -> int:
    """How many times the watcher read a file, found it incomplete and left it in place."""
    return getattr(run.drop.totals, "incomplete", 0) if run.drop is not None else 0


@pytest.mark.parametrize("cuts", [(1 / 3, 2 / 3), (100 / 39_000, 1 / 2)], ids=["thirds", "short-first"])
async def test_file_copied_in_chunks_with_pauses_longer_than_settle_is_ingested_once_complete(
    tmp_path: Path, cuts: tuple[float, float]
) -> None:
    # a slow network copy: each chunk settles (the pause is far longer than settle_ms) and reads as
    # truncated (or, under 132 bytes, as not DICOM); the next chunk is written once the watcher has read
    # the partial file, so every partial state is seen
    settings = make_settings(tmp_path, settle_ms=100)
    data = CT_SMALL.read_bytes()
    bounds = [0, *(int(len(data) * c) for c in cuts), len(data)]
    async with watching(settings) as run:
        target = run.folder / "copied.dcm"
        with target.open("wb") as fh:
            for n, (lo, hi) in enumerate(itertools.pairwise(bounds)):
                fh.write(data[lo:hi])
                fh.flush()
                if hi == len(data):
                    break
                await run.until(lambda n=n: _read_as_incomplete(run) > n or bool(run.quarantined()))
                assert run.quarantined() == [], "a partial copy was quarantined"
                assert target.exists() and target.stat().st_size == hi, "a partial copy left the folder"
                assert run.instances() == 0
        await run.until(lambda: run.instances() == 1 and not target.exists())
        await run.quiet()
        assert run.quarantined() == []
        assert run.drop is not None and run.drop.totals.accepted == 1 and not run.drop.totals.rejected
        assert run.spooled() == [data]


_CHUNKED_COPY = """
import sys, time
src, dst, parts, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
data = open(src, "rb").read()
step = len(data) // parts + 1
with open(dst, "wb") as fh:
    for i in range(0, len(data), step):
        if i:
            time.sleep(pause)
        fh.write(data[i:i + step])
        fh.flush()
"""


async def test_file_copied_by_another_process_in_three_chunks_with_1_5_s_pauses_is_ingested(
    tmp_path: Path,
) -> None:
    # the copy's own behaviour: three chunks, 1.5 s apart (the watcher settles after 1 s, its default)
    settings = make_settings(tmp_path, settle_ms=1000)
    async with watching(settings) as run:
        target = run.folder / "network-copy.dcm"
        writer = subprocess.Popen(
            [sys.executable, "-c", _CHUNKED_COPY, str(CT_SMALL), str(target), "3", "1.5"]
        )
        try:
            while writer.poll() is None:
                assert run.quarantined() == [] and run.instances() == 0
                await asyncio.sleep(0.05)
        finally:
            if writer.poll() is None:
                writer.kill()
            writer.wait()
        assert writer.returncode == 0
        await run.until(lambda: run.instances() == 1 and not target.exists())
        assert run.quarantined() == []
        assert run.spooled() == [CT_SMALL.read_bytes()]


async def test_file_left_truncated_past_incomplete_timeout_is_quarantined_as_truncated(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, settle_ms=100, incomplete_timeout="2s")
    data = CT_SMALL.read_bytes()
    async with watching(settings) as run:
        target = run.folder / "abandoned.dcm"
        target.write_bytes(data[: len(data) // 2])  # a copy that never finishes
        written = asyncio.get_running_loop().time()
        await run.until(lambda: _read_as_incomplete(run) >= 1 or bool(run.quarantined()))
        assert run.quarantined() == [] and target.exists()  # read, found incomplete, left in place
        q = settings.data_dir / "quarantine"
        await run.until(
            lambda: len(run.quarantined()) == 1 and (q / f"{run.quarantined()[0]}.json").exists()
            and not target.exists()
        )
        assert asyncio.get_running_loop().time() - written >= 2.0
        side = Quarantine(q).reason(run.quarantined()[0])
        assert side["reason"] == "truncated" and side["rule"] == "incomplete_timeout"
        assert (q / run.quarantined()[0]).read_bytes() == data[: len(data) // 2]
        assert run.instances() == 0
        assert run.drop is not None and run.drop.totals.rejected == {"truncated": 1}


def test_incomplete_timeout_must_be_a_duration() -> None:
    with pytest.raises(ValueError, match=r"\[watch\] incomplete_timeout"):
        WatchSettings(incomplete_timeout="soon")
    assert WatchSettings().incomplete_timeout == "5m"


async def test_file_renamed_into_the_folder_is_ingested_once(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    async with watching(settings) as run:
        part = run.folder / "x.part"
        part.write_bytes(MR_SMALL.read_bytes())
        await run.quiet()  # well past settle_ms: a .part file is never read
        assert run.instances() == 0 and part.exists()
        os.rename(part, run.folder / "x.dcm")
        await run.until(lambda: run.instances() == 1 and not (run.folder / "x.dcm").exists())
        await run.quiet()
        assert run.drop is not None
        assert (run.drop.totals.accepted, run.drop.totals.duplicate) == (1, 0)
        assert run.quarantined() == []


async def test_ignored_names_are_left_alone(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    async with watching(settings) as run:
        for name in (".hidden.dcm", "copying.tmp", "x.part"):
            (run.folder / name).write_bytes(CT_SMALL.read_bytes())
        (run.folder / ".staging").mkdir()
        (run.folder / ".staging" / "a.dcm").write_bytes(CT_SMALL.read_bytes())
        await run.quiet()
        assert run.instances() == 0 and run.quarantined() == []
        assert (run.folder / ".staging" / "a.dcm").exists() and (run.folder / "copying.tmp").exists()


# -- rejections --------------------------------------------------------------------------------------------


async def test_bad_files_end_in_quarantine_with_their_reason_and_the_watcher_keeps_going(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, incomplete_timeout="1s")
    data = CT_SMALL.read_bytes()
    async with watching(settings) as run:
        (run.folder / "empty.dcm").write_bytes(b"")
        (run.folder / "notes.txt").write_bytes(b"this is not a DICOM file, only some text\n" * 20)
        sub = run.folder / "sub"
        sub.mkdir()
        (sub / "cut.dcm").write_bytes(data[: len(data) // 2])  # cut inside pixel data
        q = settings.data_dir / "quarantine"  # each copy is followed by its side file: wait for both
        await run.until(
            lambda: len(run.quarantined()) == 3
            and all((q / f"{name}.json").exists() for name in run.quarantined())
        )
        quarantine = Quarantine(settings.data_dir / "quarantine")
        sides = [quarantine.reason(name) for name in run.quarantined()]
        reasons = sorted(str(side["reason"]) for side in sides)
        assert reasons == ["not_dicom", "not_dicom", "truncated"]
        for side in sides:
            assert side["rule"] and side["time"] and side["detail"]
        # no patient data in side files: CT_small's patient name and ID never appear
        ds = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
        for side in sides:
            text = json.dumps(side)
            assert str(ds.PatientName) not in text and str(ds.PatientID) not in text
        # rejected files are gone from the folder
        assert not (run.folder / "empty.dcm").exists() and not (sub / "cut.dcm").exists()
        # ... and the watcher still ingests good files
        (run.folder / "good.dcm").write_bytes(data)
        await run.until(lambda: run.instances() == 1)
        assert run.drop is not None and sum(run.drop.totals.rejected.values()) == 3
        assert run.metrics.instances_rejected.labels(reason="truncated")._value.get() == 1


async def test_conflicting_duplicate_is_quarantined_and_the_first_is_kept(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    ds = pydicom.dcmread(CT_SMALL)
    ds.SeriesDescription = "changed content, same SOP Instance UID"
    other = tmp_path / "other.dcm"
    ds.save_as(other)
    async with watching(settings) as run:
        (run.folder / "first.dcm").write_bytes(CT_SMALL.read_bytes())
        await run.until(lambda: run.instances() == 1 and not (run.folder / "first.dcm").exists())
        (run.folder / "second.dcm").write_bytes(other.read_bytes())
        await run.until(lambda: len(run.quarantined()) == 1 and not (run.folder / "second.dcm").exists())
        side = Quarantine(settings.data_dir / "quarantine").reason(run.quarantined()[0])
        assert side["reason"] == "conflict" and side["rule"] == "other_content"
        assert run.instances() == 1
        assert len(run.spooled()) == 1 and run.spooled()[0] == CT_SMALL.read_bytes()


# -- restarts and after-actions ----------------------------------------------------------------------------


async def test_restart_with_files_left_in_the_folder_ingests_each_once(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, after="keep")
    files = tiny_corpus(tmp_path, files=6)
    drop = settings.watch.folder
    assert drop is not None
    drop.mkdir(parents=True)
    for i, src in enumerate(files):
        (drop / f"f{i}.dcm").write_bytes(src.read_bytes())
    async with watching(settings) as run:  # files present at start are ingested
        await run.until(lambda: run.instances() == 6)
        await run.quiet()
    async with watching(settings, rescan_s=0.2) as run:  # a restart: kept files are not read again
        await run.quiet()
        await run.quiet()
        assert run.drop is not None
        assert (run.drop.totals.accepted, run.drop.totals.duplicate) == (0, 0)
        assert run.instances() == 6
        assert sorted(p.name for p in drop.iterdir()) == [f"f{i}.dcm" for i in range(6)]
        # a kept file that changes is read again; same content -> duplicate, no new row
        os.utime(drop / "f0.dcm", ns=(1_000_000_000, 1_000_000_000))
        await run.until(lambda: run.drop is not None and run.drop.totals.duplicate == 1)
        assert run.instances() == 6


async def test_crash_between_commit_and_move_is_answered_by_the_digest_check(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, after="move")
    files = tiny_corpus(tmp_path, files=5)
    drop = settings.watch.folder
    assert drop is not None
    drop.mkdir(parents=True)
    for i, src in enumerate(files):
        (drop / f"f{i}.dcm").write_bytes(src.read_bytes())
    # the previous run committed the first three rows, then died before moving the files
    settings.data_dir.mkdir(parents=True)
    with SQLiteStateStore(settings.data_dir / "state.sqlite3", node="before-crash") as store:
        now = utcnow()
        for i in range(3):
            parsed = read_header(drop / f"f{i}.dcm")
            store.add_instance(parsed.record, source="watch", spool_name=None, digest=parsed.digest,
                               now=now, due_at=now)
    async with watching(settings) as run:
        await run.until(lambda: not any(drop.iterdir()))
        assert run.drop is not None
        assert (run.drop.totals.accepted, run.drop.totals.duplicate) == (2, 3)
        assert run.instances() == 5
        assert len(run.archived()) == 5
        assert len(run.spooled()) == 2  # duplicates leave no copy behind


@pytest.mark.parametrize(("inline_max_bytes", "in_row"), [(1024**2, True), (0, False)])
async def test_small_files_bytes_are_committed_with_their_row_larger_ones_spooled(
    tmp_path: Path, inline_max_bytes: int, in_row: bool
) -> None:
    # [spool] inline_max_bytes: at or under it the file's bytes go into the row's transaction, no spool file
    settings = make_settings(tmp_path).model_copy(
        update={"spool": SpoolSettings(inline_max_bytes=inline_max_bytes)}
    )
    async with watching(settings) as run:
        (run.folder / "a.dcm").write_bytes(CT_SMALL.read_bytes())
        await run.until(lambda: run.instances() == 1 and not (run.folder / "a.dcm").exists())
        sop = pydicom.dcmread(CT_SMALL, stop_before_pixels=True).SOPInstanceUID
        files = [p for p in (run.data / "spool").iterdir() if HEX_NAME.match(p.name)]
        assert (run.store.instance_bytes(sop) == CT_SMALL.read_bytes()) is in_row
        assert len(files) == (0 if in_row else 1)
        assert run.spooled() == [CT_SMALL.read_bytes()]


async def test_after_delete_removes_the_file_once_durable(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, after="delete")
    async with watching(settings) as run:
        (run.folder / "a.dcm").write_bytes(CT_SMALL.read_bytes())
        await run.until(lambda: not (run.folder / "a.dcm").exists())
        assert run.instances() == 1 and run.archived() == [] and len(run.spooled()) == 1
        row = run.store.studies()[0]
        assert row.dirty and row.due_at is not None and row.last_seen is not None
        # due after stable_age (5 s in these settings)
        assert 4.0 <= (row.due_at - row.last_seen).total_seconds() <= 6.0


async def test_polling_mode_sees_new_files(tmp_path: Path) -> None:
    # polling only (as on a network share where inotify events never arrive); no rescan to help it
    settings = make_settings(tmp_path, poll=True, poll_interval_ms=100)
    async with watching(settings, rescan_s=3600) as run:
        await run.quiet()
        nested = run.folder / "a" / "b"
        nested.mkdir(parents=True)
        (nested / "img.dcm").write_bytes(CT_SMALL.read_bytes())
        await run.until(lambda: run.instances() == 1, timeout=10)


async def test_burst_is_parsed_in_parallel_and_all_ingested(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, jobs=2, settle_ms=100)
    files = tiny_corpus(tmp_path, files=300, studies=3)
    async with watching(settings) as run:
        for i, src in enumerate(files):
            (run.folder / f"b{i:04d}.dcm").write_bytes(src.read_bytes())
        await run.until(lambda: run.instances() == 300, timeout=30)
        assert len(run.store.studies()) == 3
        await run.until(lambda: not any(p.is_file() for p in run.folder.rglob("*")))


def test_watch_folder_must_be_set(tmp_path: Path) -> None:
    from ingest.errors import ConfigError

    with SQLiteStateStore(tmp_path / "s.sqlite3") as store, pytest.raises(ConfigError, match="folder"):
        open_drop_folder(Settings(data_dir=tmp_path), store)


async def test_ingest_watch_command_pushes_dropped_files_to_the_backend(tmp_path: Path) -> None:
    """``ingest watch DIR``: watcher + relay + embedded backend in one process, stopped by SIGTERM."""
    import signal

    from ingest.ports import StudyState

    drop, data = tmp_path / "drop", tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update({"INGEST_ADMIN__ENABLED": "false", "INGEST_EMBEDDED_BACKEND__PORT": "0",
                "INGEST_RELAY__STABLE_AGE_S": "0.2", "INGEST_WATCH__SETTLE_MS": "200"})
    (tmp_path / "work").mkdir()
    log = tmp_path / "stderr.txt"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ingest", "-q", "--data-dir", str(data), "watch", str(drop),
             "--after", "delete"],
            cwd=tmp_path / "work", env=env, stdout=subprocess.DEVNULL, stderr=err,
        )
    try:
        deadline = asyncio.get_running_loop().time() + 30
        dropped = False
        while True:
            assert proc.poll() is None, log.read_text()
            assert asyncio.get_running_loop().time() < deadline, "study not pushed within 30 s"
            if not dropped and drop.is_dir():
                (drop / "ct.dcm.part").write_bytes(CT_SMALL.read_bytes())
                os.rename(drop / "ct.dcm.part", drop / "ct.dcm")
                dropped = True
            if dropped and (data / "state.sqlite3").exists():
                with SQLiteStateStore(data / "state.sqlite3", node="probe") as store:
                    if store.studies(StudyState.PUSHED):
                        break
            await asyncio.sleep(0.2)
        assert not (drop / "ct.dcm").exists()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, log.read_text()


# -- bounded quarantine ------------------------------------------------------------------------------------


def _drop_folder(tmp_path: Path, **sections: Any) -> tuple[DropFolder, SQLiteStateStore, list[float]]:
    """A synchronous DropFolder with a hand-driven settle clock (``clock[0]``)."""
    settings = make_settings(tmp_path).model_copy(update=sections)
    assert settings.watch.folder is not None
    settings.watch.folder.mkdir(parents=True)
    settings.data_dir.mkdir(parents=True)
    store = SQLiteStateStore(settings.data_dir / "state.sqlite3", node="test")
    clock = [0.0]
    return open_drop_folder(settings, store, monotonic=lambda: clock[0]), store, clock


def _settle(drop: DropFolder, clock: list[float]) -> None:
    drop.step([], rescan=True)
    clock[0] += 10.0
    drop.step([], rescan=True)


def _quarantine_entries(drop: DropFolder) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in drop.quarantine.root.iterdir()}


def test_an_over_cap_sparse_file_is_described_not_copied_and_stays_in_the_folder(tmp_path: Path) -> None:
    listener = ListenerSettings(max_instance_bytes=10 * 1024**2)
    drop, store, clock = _drop_folder(tmp_path, listener=listener)
    try:
        big = drop.folder / "huge.dcm"
        with big.open("wb") as fh:
            fh.truncate(50 * 1024**2)  # sparse: 50 MB that take no disk
        _settle(drop, clock)
        entries = _quarantine_entries(drop)
        assert len(entries) == 1
        (side_name, side_size), = entries.items()
        assert side_name.endswith(".json") and side_size < 4096
        side = drop.quarantine.reason(side_name.removesuffix(".json"))
        assert side["kept"] is False and side["not_kept"] == "over the size cap"
        assert side["size"] == 50 * 1024**2 and side["source"] == str(big)
        assert side["reason"] == "too_large" and side["sha256"] is None
        assert big.stat().st_size == 50 * 1024**2  # the only copy is left where it was
        assert drop.totals.rejected["too_large"] == 1 and drop.totals.not_kept == 1
        # not reported again while unchanged
        _settle(drop, clock)
        assert len(_quarantine_entries(drop)) == 1 and drop.totals.rejected["too_large"] == 1
    finally:
        store.close()


def test_past_the_quarantine_quota_only_a_side_file_is_written(tmp_path: Path) -> None:
    drop, store, clock = _drop_folder(tmp_path, quarantine=QuarantineSettings(max_bytes=1000))
    try:
        small = drop.folder / "small.txt.dcm"
        small.write_bytes(b"not dicom " * 20)  # 200 bytes: kept
        _settle(drop, clock)
        (kept,) = [n for n in _quarantine_entries(drop) if HEX_NAME.match(n)]
        assert (drop.quarantine.root / kept).read_bytes() == b"not dicom " * 20
        assert not small.exists()
        large = drop.folder / "large.txt.dcm"
        large.write_bytes(b"not dicom " * 200)  # 2000 bytes: over the quota
        _settle(drop, clock)
        entries = _quarantine_entries(drop)
        assert [n for n in entries if HEX_NAME.match(n)] == [kept]  # no second copy
        assert len(entries) == 3
        (side_name,) = [n for n in entries if n.endswith(".json") and n != f"{kept}.json"]
        side = drop.quarantine.reason(side_name.removesuffix(".json"))
        assert side["kept"] is False and side["not_kept"] == "quarantine full"
        assert side["size"] == 2000 and side["reason"] == "not_dicom"
        assert large.exists()  # its bytes were not kept, so it is not removed
        assert drop.totals.not_kept == 1 and drop.quarantine.not_kept == 1
    finally:
        store.close()


def test_a_rejection_note_past_the_cap_is_quarantined_naming_the_rule(tmp_path: Path) -> None:
    drop, store, clock = _drop_folder(tmp_path, listener=ListenerSettings(max_rejection_items=5))
    try:
        study = "1.2.3.4.8.1"
        over = drop.folder / "over.dcm"
        over.write_bytes(iocm.large_note(study, f"{study}.2", 6, sop=f"{study}.99"))
        within = drop.folder / "within.dcm"
        within.write_bytes(iocm.large_note(study, f"{study}.2", 5, sop=f"{study}.98"))
        _settle(drop, clock)
        assert drop.totals.rejected == {"too_many_references": 1} and drop.totals.accepted == 1
        (name,) = [n for n in _quarantine_entries(drop) if HEX_NAME.match(n)]
        side = drop.quarantine.reason(name)
        assert side["reason"] == "too_many_references"
        assert "max_rejection_items" in str(side["detail"]) and "more than 5 instances" in str(side["detail"])
        assert not over.exists() and not within.exists()
        assert [r.sop_uid for r in store.instances(study)] == [f"{study}.98"]
    finally:
        drop.close()
        store.close()


def test_a_file_that_grows_while_its_row_is_committed_is_not_deleted_but_read_again(tmp_path: Path) -> None:
    # a copy that resumes after a pause long enough for the first part to read as a whole instance: the
    # part is admitted, but the file is not deleted under the writer; read again, the grown file is other
    # content for the same SOP Instance UID and is quarantined whole
    drop, store, clock = _drop_folder(tmp_path, watch=WatchSettings(
        folder=tmp_path / "drop", settle_ms=200, after="delete"))
    try:
        target = drop.folder / "copied.dcm"
        first = CT_SMALL.read_bytes()
        rest = struct.pack("<HH2sH", 0x7FE1, 0x0010, b"LO", 4) + b"ACME"  # a private creator after Pixel Data
        target.write_bytes(first)
        admit = drop.admission.admit

        def admit_while_the_copy_resumes(candidates: Any) -> Any:
            with target.open("ab") as fh:
                fh.write(rest)
            return admit(candidates)

        drop.admission.admit = admit_while_the_copy_resumes  # type: ignore[method-assign]
        _settle(drop, clock)
        drop.admission.admit = admit  # type: ignore[method-assign]
        assert drop.totals.accepted == 1
        assert target.read_bytes() == first + rest  # not deleted under the writer
        _settle(drop, clock)
        assert not target.exists()
        (name,) = [n for n in _quarantine_entries(drop) if HEX_NAME.match(n)]
        assert (drop.quarantine.root / name).read_bytes() == first + rest
        assert drop.quarantine.reason(name)["reason"] == "conflict"
    finally:
        drop.close()
        store.close()
