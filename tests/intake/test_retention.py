"""Spool retention and the disk budget (ingest.intake.retention), against the real SQLite store and
real spool / quarantine folders under ``tmp_path``.

Expected behaviour from docs/architecture.md "Retention and the disk budget" and the issue it answers:
accepted bytes leave only through ``release_bytes`` (rows marked first, then in-row bytes, then files);
``retain`` counts from the study's last push; a commitment hold always wins; the budget refuses before
the bytes are written; quarantine ages out on its own clock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.data import get_testdata_file

from ingest.adapters.spool import Quarantine, Spool, read_instance
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.clock import Timekeeper
from ingest.config import (
    ListenerSettings,
    RelaySettings,
    Settings,
    SpoolSettings,
    WatchSettings,
    load_settings,
)
from ingest.core.records import InstanceRecord
from ingest.errors import ConfigError
from ingest.intake.admit import Admission
from ingest.intake.retention import (
    MAX_BYTES,
    MIN_FREE_BYTES,
    DiskBudget,
    Retention,
    open_retention,
    release_bytes,
    run_retention,
)
from ingest.intake.sweep import sweep_orphans
from ingest.metrics import Metrics
from ingest.ports import Verdict
from ingest.sources.dropfolder import open_drop_folder
from tests.test_clock import SteppedClock

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
STUDY = "1.2.826.0.1.3680043.10.7"
CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))


def rec(sop: str, study: str = STUDY) -> InstanceRecord:
    return InstanceRecord(study_uid=study, series_uid=f"{study}.1", sop_uid=sop, sop_class_uid=CT)


class Parts:
    def __init__(self, tmp_path: Path) -> None:
        self.store = SQLiteStateStore(tmp_path / "state.sqlite3", node="test")
        self.spool = Spool(tmp_path / "spool")
        self.quarantine = Quarantine(tmp_path / "quarantine")
        self.metrics = Metrics()

    def spooled(self, sop: str, data: bytes, *, now: datetime = T0, study: str = STUDY) -> str:
        kept = self.spool.write(data)
        added = self.store.add_instance(
            rec(sop, study), source="test", spool_name=kept.name, digest="d-" + sop, now=now, due_at=now
        )
        assert added.outcome is Verdict.ADDED
        return kept.name

    def in_row(self, sop: str, data: bytes, *, now: datetime = T0, study: str = STUDY) -> None:
        added = self.store.add_instance(
            rec(sop, study), source="test", spool_name=None, digest="d-" + sop, now=now, due_at=now, data=data
        )
        assert added.outcome is Verdict.ADDED

    def push(self, now: datetime) -> None:
        for claim in self.store.claim_due(now, 100, "relay", 60):
            self.store.mark_pushed(claim, backend_id="ImagingStudy/1", version_id="1", digest="x", now=now)

    def counter(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels or None) or 0.0


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    p = Parts(tmp_path)
    yield p
    p.store.close()


# -- release_bytes ------------------------------------------------------------------------------------


def test_release_bytes_unlinks_files_and_deletes_in_row_bytes_rows_stay(parts: Parts) -> None:
    name = parts.spooled("1.2.3.1", b"A" * 1000)
    parts.in_row("1.2.3.2", b"B" * 300)
    budget = DiskBudget(
        parts.spool, max_bytes=None, min_free_bytes=0, in_row_bytes=300, metrics=parts.metrics
    )
    assert budget.used == 1300

    released = release_bytes(
        parts.store, parts.spool, ["1.2.3.1", "1.2.3.2"], reason="iocm:113039", now=T0, budget=budget,
        metrics=parts.metrics,
    )

    assert released == 2
    assert not parts.spool.path(name).exists()
    assert read_instance(parts.store, parts.spool, "1.2.3.1") is None
    assert read_instance(parts.store, parts.spool, "1.2.3.2") is None
    assert budget.used == 0 and parts.spool.bytes_used() == 0
    assert [r.sop_uid for r in parts.store.instances(STUDY)] == ["1.2.3.1", "1.2.3.2"]  # rows stay
    assert parts.counter("ingest_spool_released_total", reason="iocm:113039") == 2
    assert parts.counter("ingest_spool_released_bytes_total", reason="iocm:113039") == 1300
    # a second call finds nothing left to release
    assert release_bytes(parts.store, parts.spool, ["1.2.3.1", "1.2.3.2"], reason="x", now=T0) == 0


def test_a_crash_after_marking_leaves_an_orphan_the_start_up_sweep_removes(parts: Parts) -> None:
    name = parts.spooled("1.2.3.1", b"A" * 100)
    # the first half of release_bytes only: rows marked, process killed before the unlink
    parts.store.release_instance_bytes(["1.2.3.1"], reason="retention", now=T0)
    assert parts.spool.path(name).exists()
    # the sweep admits the file again: a duplicate of the row, whose bytes were released on purpose
    admission = Admission(parts.store, spool=parts.spool, quarantine=parts.quarantine, metrics=None,
                          stable_age_s=0, wake=lambda: None, label="spool", remove_spooled=False)
    swept = sweep_orphans(parts.spool, parts.store, admission=admission, quarantine=parts.quarantine,
                          read=lambda _: (rec("1.2.3.1"), "d-1.2.3.1"), older_than_s=0)
    assert (swept.duplicates, swept.removed) == (1, 1)
    assert not parts.spool.path(name).exists()


# -- retention ----------------------------------------------------------------------------------------


def test_thirty_days_after_the_last_push(parts: Parts) -> None:
    parts.spooled("1.2.3.1", b"A" * 10)
    parts.in_row("1.2.3.2", b"B" * 10)
    retention = Retention(parts.store, parts.spool, retain=SpoolSettings(retain="30d").retain_after_push)
    assert retention.run_pass(T0 + 40 * DAY).instances == 0  # never pushed: kept
    parts.push(T0 + DAY)
    assert retention.run_pass(T0 + 30 * DAY).instances == 0  # 29 days after the push
    assert retention.run_pass(T0 + 31 * DAY - timedelta(seconds=1)).instances == 0
    assert retention.run_pass(T0 + 31 * DAY).instances == 2
    assert parts.store.instance_bytes("1.2.3.2") is None and parts.spool.names() == []


def test_a_later_push_restarts_the_clock(parts: Parts) -> None:
    parts.spooled("1.2.3.1", b"A" * 10)
    parts.push(T0)
    parts.spooled("1.2.3.2", b"B" * 10, now=T0 + 20 * DAY)  # the study changed: pushed again later
    parts.push(T0 + 20 * DAY)
    retention = Retention(parts.store, parts.spool, retain=timedelta(days=30))
    assert retention.run_pass(T0 + 31 * DAY).instances == 0
    assert retention.run_pass(T0 + 50 * DAY).instances == 2


def test_a_commitment_hold_longer_than_retain_wins(parts: Parts) -> None:
    parts.spooled("1.2.3.1", b"A" * 10)
    parts.spooled("1.2.3.2", b"B" * 10)
    parts.push(T0)
    parts.store.hold_bytes(["1.2.3.1"], until=T0 + 7 * DAY)
    retention = Retention(parts.store, parts.spool, retain=timedelta(0))  # until_pushed
    assert retention.run_pass(T0 + DAY).instances == 1
    assert parts.store.instance_spool_name("1.2.3.1") is not None
    assert retention.run_pass(T0 + 7 * DAY).instances == 1
    assert parts.spool.names() == []


def test_forever_removes_nothing(parts: Parts) -> None:
    parts.spooled("1.2.3.1", b"A" * 10)
    parts.push(T0)
    retention = Retention(parts.store, parts.spool, retain=None)
    assert not retention.active
    assert retention.run_pass(T0 + 10_000 * DAY).instances == 0
    assert len(parts.spool.names()) == 1


def test_batches_release_everything_due_in_one_pass(parts: Parts) -> None:
    for n in range(7):
        parts.spooled(f"1.2.3.{n + 1}", b"x")
    parts.push(T0)
    retention = Retention(parts.store, parts.spool, retain=timedelta(0), batch=3)
    assert retention.run_pass(T0).instances == 7
    assert parts.spool.names() == []


def test_quarantine_has_its_own_retention(parts: Parts) -> None:
    old = parts.quarantine.put(b"old bytes", "invalid_uid", "uid_grammar", "a rule", T0)
    side_only = parts.quarantine.describe(10**9, "too_large", "max_instance_bytes", "a rule", T0)
    new = parts.quarantine.put(b"new bytes", "invalid_uid", "uid_grammar", "a rule", T0)
    week_ago = (datetime.now(UTC) - timedelta(days=7)).timestamp()
    for name in (old, side_only):
        for path in parts.quarantine.root.glob(name + "*"):
            os.utime(path, (week_ago, week_ago))
    retention = Retention(
        parts.store, parts.spool, retain=None, quarantine=parts.quarantine,
        quarantine_retain=timedelta(days=3),
    )
    assert retention.active
    assert retention.run_pass(datetime.now(UTC)).quarantined == 2
    left = sorted(p.name for p in parts.quarantine.root.iterdir())
    assert left == sorted([new, new + ".json"])


async def test_run_retention_runs_passes_until_stopped(parts: Parts) -> None:
    parts.spooled("1.2.3.1", b"A" * 10)
    parts.push(T0)
    retention = Retention(parts.store, parts.spool, retain=timedelta(0))
    stop = asyncio.Event()
    keeper = Timekeeper(SteppedClock(T0 + DAY))
    task = asyncio.create_task(run_retention(retention, stop, interval_s=0.05, timekeeper=keeper))
    for _ in range(100):
        if not parts.spool.names():
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    assert parts.spool.names() == []


def test_a_clock_set_forward_releases_no_held_bytes_until_that_time_has_really_passed(
    parts: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    name = parts.spooled("1.2.3.1", b"A" * 10)
    parts.push(T0)
    parts.store.hold_bytes(["1.2.3.1"], until=T0 + 30 * DAY)  # a Storage Commitment hold
    retention = Retention(parts.store, parts.spool, retain=timedelta(0))  # until_pushed: only the hold
    clock = SteppedClock(T0)
    keeper = Timekeeper(clock)
    clock.step(31 * DAY.total_seconds())  # set forward 31 days
    with caplog.at_level(logging.WARNING):
        assert retention.run_now(keeper).instances == 0
    assert parts.spool.path(name).exists()
    assert "wall clock is" in caplog.text and "ahead" in caplog.text
    clock.advance(29 * DAY.total_seconds())  # 29 days have really passed: the hold still runs
    assert retention.run_now(keeper).instances == 0
    clock.advance(2 * DAY.total_seconds())  # 31 days have passed: the hold has ended, retention resumes
    assert retention.run_now(keeper).instances == 1
    assert not parts.spool.path(name).exists()


# -- the disk budget ----------------------------------------------------------------------------------


def test_max_bytes_counts_spool_files_and_in_row_bytes(parts: Parts) -> None:
    budget = DiskBudget(
        parts.spool, max_bytes=1000, min_free_bytes=0, in_row_bytes=300, metrics=parts.metrics
    )
    parts.spool.write(b"x" * 500)  # the shared spool's running total, no folder scan
    assert budget.used == 800
    assert budget.refusal(200) is None  # exactly at the cap is allowed
    assert budget.describe() == "ok"
    assert budget.refusal(201) == MAX_BYTES
    assert budget.describe() == (
        "full: 800 of max_bytes 1000 bytes used, an instance of 201 bytes does not fit"
    )
    budget.add_in_row(150)
    assert budget.refusal(100) == MAX_BYTES
    assert budget.describe() == (
        "full: 950 of max_bytes 1000 bytes used, an instance of 100 bytes does not fit"
    )
    assert budget.refusal(50) is None  # a smaller one fits: not full any more
    assert budget.describe() == "ok"
    budget.add_in_row(100)
    assert budget.describe() == "full: 1050 of max_bytes 1000 bytes used"
    assert parts.counter("ingest_spool_refusals_total", reason="max_bytes") == 2


def test_min_free_bytes_is_kept_free(parts: Parts) -> None:
    free = {"bytes": 10_000}

    def statvfs(path: str) -> Any:
        assert path == str(parts.spool.root)
        return SimpleNamespace(f_bavail=free["bytes"] // 100, f_frsize=100)

    budget = DiskBudget(
        parts.spool, max_bytes=None, min_free_bytes=4_000, statvfs=statvfs, metrics=parts.metrics
    )
    assert budget.refusal(6_000) is None
    assert budget.refusal(6_001) == MIN_FREE_BYTES
    free["bytes"] = 3_000
    assert budget.describe() == "full: 3000 bytes free, min_free_bytes is 4000"
    assert parts.counter("ingest_spool_refusals_total", reason="min_free_bytes") == 1


def test_open_retention_counts_what_is_already_kept(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, spool=SpoolSettings(max_bytes=10_000, retain="until_pushed"))
    store = SQLiteStateStore(tmp_path / "state.sqlite3")
    try:
        store.add_instance(rec("1.2.3.1"), source="t", spool_name=None, digest="d", now=T0, due_at=T0,
                           data=b"x" * 700)
        Spool(tmp_path / "spool").write(b"y" * 2000)
        budget, retention = open_retention(settings, store)
        assert budget.used == 2700 and retention.active and retention.node is None
    finally:
        store.close()


def test_the_watcher_leaves_files_the_budget_refuses_and_takes_them_later(tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    settings = Settings(
        data_dir=tmp_path / "data",
        watch=WatchSettings(folder=drop, settle_ms=0, after="move"),
        listener=ListenerSettings(),
        relay=RelaySettings(stable_age_s=0),
        spool=SpoolSettings(inline_max_bytes=0, max_bytes=CT_SMALL.stat().st_size + 100),
    )
    store = SQLiteStateStore(settings.data_dir / "state.sqlite3")
    metrics = Metrics()
    spool = Spool(settings.data_dir / "spool")
    budget = DiskBudget.from_settings(spool, settings.spool, metrics=metrics)
    spool.write(b"z" * 500)  # something already kept: the file no longer fits
    folder = open_drop_folder(settings, store, metrics=metrics, budget=budget)
    try:
        shutil.copy(CT_SMALL, drop / "ct.dcm")
        result = folder.step([], rescan=True)
        assert result.accepted == 0
        assert (drop / "ct.dcm").is_file()  # left where it was: not moved, not quarantined
        assert list((settings.data_dir / "quarantine").iterdir()) == []
        assert metrics.registry.get_sample_value("ingest_spool_refusals_total", {"reason": "max_bytes"}) == 1
        spool.remove(spool.names()[0])  # room again (what retention does)
        result = folder.step([], rescan=True)
        assert result.accepted == 1
        assert not (drop / "ct.dcm").exists()
    finally:
        folder.close()
        store.close()


# -- [spool] settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retain", "after_push"),
    [("forever", None), ("until_pushed", timedelta(0)), ("30d", 30 * DAY), ("12h", timedelta(hours=12)),
     ("90m", timedelta(minutes=90)), ("2w", 14 * DAY), (" 45S ", timedelta(seconds=45)), ("1.5d", 1.5 * DAY)],
)
def test_retain_values(retain: str, after_push: timedelta | None) -> None:
    assert SpoolSettings(retain=retain).retain_after_push == after_push


@pytest.mark.parametrize("bad", ["30", "30 days", "-1d", "d", "until-pushed", ""])
def test_a_bad_retain_names_the_key_and_the_forms(bad: str) -> None:
    forms = r"\[spool\] retain .* must be \"forever\", \"until_pushed\" or a duration"
    with pytest.raises(ConfigError, match=forms):
        load_settings(spool={"retain": bad})


def test_commitment_hold_and_quarantine_retain_are_durations() -> None:
    cfg = SpoolSettings(commitment_hold="7d", quarantine_retain="90d")
    assert (cfg.hold, cfg.quarantine_retain_for) == (7 * DAY, 90 * DAY)
    assert SpoolSettings().quarantine_retain_for is None
    with pytest.raises(ConfigError, match=r"\[spool\] commitment_hold 'forever' must be a duration"):
        load_settings(spool={"commitment_hold": "forever"})


def test_commitment_off_allows_a_zero_hold() -> None:
    settings = Settings(listener=ListenerSettings(commitment={"enabled": False}),
                        spool=SpoolSettings(retain="until_pushed", commitment_hold="0s"))
    assert settings.spool.hold == timedelta(0)
