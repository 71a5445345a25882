"""Orphaned spool files are swept at start (ingest.intake.sweep, StateStore.referenced_spool_names)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest.adapters.spool import Spool
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.config import AdminSettings, EmbeddedBackendSettings, ListenerSettings, Settings
from ingest.core.records import InstanceRecord
from ingest.intake.sweep import sweep_orphans
from ingest.ports import StateStore

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
TWO_HOURS = 7200.0


def _row(store: StateStore, spool_name: str | None, n: int) -> None:
    """Record instance ``n`` of one synthetic study, pointing at ``spool_name``."""
    record = InstanceRecord(
        study_uid="1.2.826.0.1.3680043.2.1125.1",
        series_uid="1.2.826.0.1.3680043.2.1125.1.1",
        sop_uid=f"1.2.826.0.1.3680043.2.1125.1.1.{n}",
        sop_class_uid=CT,
    )
    store.add_instance(
        record, source="test", spool_name=spool_name, digest=f"d{n}", now=T0, due_at=T0 + timedelta(seconds=1)
    )


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


# -- the store query ---------------------------------------------------------------------------------------


def test_referenced_spool_names_returns_only_recorded_names(store: StateStore) -> None:
    recorded = [uuid.uuid4().hex for _ in range(3)]
    for n, name in enumerate(recorded):
        _row(store, name, n)
    _row(store, None, 99)  # an instance that was not spooled
    unknown = [uuid.uuid4().hex for _ in range(2)]
    assert store.referenced_spool_names([*unknown, recorded[0], recorded[2], recorded[0]]) == {
        recorded[0],
        recorded[2],
    }
    assert store.referenced_spool_names([]) == set()
    assert store.referenced_spool_names(unknown) == set()


def test_referenced_spool_names_over_many_chunks(store: StateStore) -> None:
    recorded = [uuid.uuid4().hex for _ in range(5)]
    for n, name in enumerate(recorded):
        _row(store, name, n)
    # far more names than one IN (...) list holds; the recorded ones spread across the chunks
    names = [uuid.uuid4().hex for _ in range(2100)]
    for i, name in enumerate(recorded):
        names.insert(i * 400, name)
    assert store.referenced_spool_names(names) == set(recorded)


# -- sweep_orphans -----------------------------------------------------------------------------------------


def test_sweep_removes_old_orphans_and_temps_only(
    store: StateStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool")
    kept_old = spool.write(b"referenced, old")
    kept_young = spool.write(b"referenced, young")
    orphan_old = spool.write(b"orphan, old")
    orphan_young = spool.write(b"orphan, young (a store in flight)")
    _row(store, kept_old.name, 1)
    _row(store, kept_young.name, 2)
    for f in (kept_old, orphan_old):
        _age(f.path, TWO_HOURS)
    temp_old = spool.root / f".tmp-{uuid.uuid4().hex}"
    temp_young = spool.root / f".tmp-{uuid.uuid4().hex}"
    temp_old.write_bytes(b"x")
    temp_young.write_bytes(b"y")
    _age(temp_old, TWO_HOURS)

    with caplog.at_level(logging.INFO, logger="ingest.intake.sweep"):
        removed = sweep_orphans(spool, store, older_than_s=3600)

    assert removed == 2  # the old orphan and the old temporary file
    assert not orphan_old.path.exists()
    assert not temp_old.exists()
    assert kept_old.path.read_bytes() == b"referenced, old"
    assert kept_young.path.exists() and orphan_young.path.exists() and temp_young.exists()
    assert sorted(spool.names()) == sorted([kept_old.name, kept_young.name, orphan_young.name])
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("1 orphaned" in m and "1 temporary" in m for m in messages), messages

    # a second pass finds nothing more to do
    assert sweep_orphans(spool, store, older_than_s=3600) == 0


def test_sweep_with_zero_age_removes_every_unreferenced_file(store: StateStore, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    kept = spool.write(b"a")
    orphans = [spool.write(b"b"), spool.write(b"c")]
    _row(store, kept.name, 1)
    for f in (kept, *orphans):
        _age(f.path, 1)
    assert sweep_orphans(spool, store, older_than_s=0) == 2
    assert spool.names() == [kept.name]


def test_sweep_of_an_empty_spool_does_not_query_rows(tmp_path: Path) -> None:
    class NoStore:
        def referenced_spool_names(self, names: object) -> set[str]:
            raise AssertionError("no candidates: the store must not be asked")

    spool = Spool(tmp_path / "spool")
    spool.write(b"young")  # not old enough to be a candidate
    assert sweep_orphans(spool, NoStore(), older_than_s=3600) == 0  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="older_than_s"):
        sweep_orphans(spool, NoStore(), older_than_s=-1)  # type: ignore[arg-type]


# -- at start of ``ingest serve`` ------------------------------------------------------------------------


async def test_serve_sweeps_orphans_at_start(tmp_path: Path) -> None:
    from ingest.app.serve import serve

    data = tmp_path / "data"
    spool = Spool(data / "spool")
    kept = spool.write(b"referenced")
    orphan = spool.write(b"left by a crash before the row's commit")
    young = spool.write(b"maybe in flight")
    store = SQLiteStateStore(data / "state.sqlite3", node="test-node")
    try:
        _row(store, kept.name, 1)
    finally:
        store.close()
    _age(kept.path, TWO_HOURS)
    _age(orphan.path, TWO_HOURS)

    settings = Settings(
        data_dir=data,
        listener=ListenerSettings(enabled=False),
        admin=AdminSettings(enabled=False),
        embedded_backend=EmbeddedBackendSettings(port=0, database=tmp_path / "backend.sqlite"),
    )
    stop = asyncio.Event()
    stop.set()  # serve starts every part, then stops at once
    assert await asyncio.wait_for(serve(settings, stop), timeout=30) == 0

    assert not orphan.path.exists()
    assert kept.path.exists() and young.path.exists()
