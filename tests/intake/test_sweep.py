"""Spool files no row names are admitted again at start (ingest.intake.sweep,
StateStore.referenced_spool_names)."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest.adapters.dicomfile import read_header
from ingest.adapters.spool import Quarantine, Spool
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.config import AdminSettings, EmbeddedBackendSettings, ListenerSettings, Settings
from ingest.core.records import InstanceRecord
from ingest.errors import StoreError
from ingest.intake.admit import Admission
from ingest.intake.sweep import SweepResult, sweep_orphans
from ingest.ports import StateStore, StudyState
from tests import iocm

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


# -- sweep_orphans: orphans are admitted again, never deleted on their own say ------------------------------


STUDY = "1.2.826.0.1.3680043.2.1125.7"
SERIES = f"{STUDY}.1"


def _image(n: int, **attrs: object) -> bytes:
    return iocm.image(STUDY, SERIES, f"{SERIES}.{n}", number=n, **attrs)


def _read(path: Path) -> tuple[InstanceRecord, str]:
    parsed = read_header(path)
    return parsed.record, parsed.digest


def _sweep(spool: Spool, store: StateStore, quarantine: Quarantine, *, older_than_s: float = 0,
           temps_older_than_s: float | None = None) -> SweepResult:
    admission = Admission(store, spool=spool, quarantine=quarantine, metrics=None, stable_age_s=30,
                          wake=lambda: None, clock=lambda: T0, label="spool", remove_spooled=False)
    return sweep_orphans(spool, store, admission=admission, quarantine=quarantine, read=_read,
                         older_than_s=older_than_s, temps_older_than_s=temps_older_than_s)


def test_an_orphan_is_admitted_again_and_its_study_becomes_due(
    store: StateStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool")
    quarantine = Quarantine(tmp_path / "quarantine")
    orphan = spool.write(_image(1))
    _age(orphan.path, TWO_HOURS)

    with caplog.at_level(logging.INFO, logger="ingest.intake.sweep"):
        result = _sweep(spool, store, quarantine, older_than_s=3600)

    assert result.readmitted == 1 and result.removed == 0
    assert orphan.path.read_bytes() == _image(1)  # the file is the row's spool file now
    assert store.instance_spool_name(f"{SERIES}.1") == orphan.name
    assert [r.sop_uid for r in store.instances(STUDY)] == [f"{SERIES}.1"]
    row = store.study(STUDY)
    assert row is not None and row.state is StudyState.PENDING
    assert [c.study_uid for c in store.claim_due(T0 + timedelta(seconds=31), 10, "relay", 60)] == [STUDY]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 spool file(s) named by no instance row" in m for m in warnings), warnings
    assert quarantine.names() == []

    # a second pass finds the file named by its row
    again = _sweep(spool, store, quarantine)
    assert (again.orphans, again.kept) == (0, 1)


def test_young_orphans_wait_for_the_age_rule_and_old_temporary_files_go(
    store: StateStore, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    quarantine = Quarantine(tmp_path / "quarantine")
    young = spool.write(_image(1))  # maybe a store in flight in another process
    temp_old = spool.root / f".tmp-{uuid.uuid4().hex}"
    temp_young = spool.root / f".tmp-{uuid.uuid4().hex}"
    temp_old.write_bytes(b"x")
    temp_young.write_bytes(b"y")
    _age(temp_old, TWO_HOURS)

    result = _sweep(spool, store, quarantine, older_than_s=3600)

    assert (result.orphans, result.kept, result.temps) == (0, 1, 1)
    assert young.path.exists() and temp_young.exists() and not temp_old.exists()
    assert store.instance_spool_name(f"{SERIES}.1") is None  # not admitted yet

    # with no writer running (the data dir's lock), every age
    result = _sweep(spool, store, quarantine, older_than_s=0)
    assert (result.readmitted, result.temps) == (1, 1)
    assert young.path.exists() and not temp_young.exists()


def test_a_file_that_is_not_dicom_is_quarantined_with_its_reason(store: StateStore, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    quarantine = Quarantine(tmp_path / "quarantine")
    junk = spool.write(b"not a DICOM file at all" * 10)
    good = spool.write(_image(1))

    result = _sweep(spool, store, quarantine)

    assert (result.readmitted, result.quarantined, result.left) == (1, 1, 0)
    assert not junk.path.exists() and good.path.exists()
    (name,) = quarantine.names()
    assert quarantine.path(name).read_bytes() == b"not a DICOM file at all" * 10
    side = quarantine.reason(name)
    assert side["reason"] == "not_dicom" and side["rule"] == "dicom_header"
    assert side["source"] == f"spool file {junk.name}"


def test_a_refused_file_stays_in_the_spool_when_the_quarantine_cannot_keep_it(
    store: StateStore, tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "spool")
    quarantine = Quarantine(tmp_path / "quarantine", max_bytes=10)  # side files only
    junk = spool.write(b"not a DICOM file at all" * 10)

    result = _sweep(spool, store, quarantine)

    assert (result.quarantined, result.left) == (0, 1)
    assert junk.path.read_bytes() == b"not a DICOM file at all" * 10


def test_a_spare_copy_of_a_stored_instance_is_removed(store: StateStore, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    quarantine = Quarantine(tmp_path / "quarantine")
    first = spool.write(_image(1))
    assert _sweep(spool, store, quarantine).readmitted == 1
    spare = spool.write(_image(1))  # e.g. a duplicate's copy whose removal failed

    result = _sweep(spool, store, quarantine)

    assert (result.duplicates, result.readmitted) == (1, 0)
    assert not spare.path.exists() and first.path.exists()
    assert store.instance_spool_name(f"{SERIES}.1") == first.name


def test_a_copy_is_kept_when_the_stored_instance_file_is_missing(store: StateStore, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    quarantine = Quarantine(tmp_path / "quarantine")
    gone = uuid.uuid4().hex  # the row names a file the spool does not hold
    record, digest = _read(iocm.write(tmp_path / "in", "i1.dcm", _image(1)))
    store.add_instance(record, source="test", spool_name=gone, digest=digest, now=T0, due_at=T0)
    copy = spool.write(_image(1))

    result = _sweep(spool, store, quarantine)

    assert (result.duplicates, result.quarantined) == (0, 1)
    assert not copy.path.exists()
    (name,) = quarantine.names()
    assert quarantine.path(name).read_bytes() == _image(1)
    assert quarantine.reason(name)["reason"] == "orphan_only_copy"


def test_a_conflicting_orphan_goes_to_the_quarantine(store: StateStore, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    quarantine = Quarantine(tmp_path / "quarantine")
    first = spool.write(_image(1))
    _age(first.path, 20)  # the older version is admitted first, as it was received first
    other = spool.write(_image(1, SeriesDescription="another version"))

    result = _sweep(spool, store, quarantine)

    assert (result.readmitted, result.quarantined) == (1, 1)
    assert first.path.exists() and not other.path.exists()
    assert store.instance_spool_name(f"{SERIES}.1") == first.name
    (name,) = quarantine.names()
    assert quarantine.reason(name)["reason"] == "conflict"
    assert quarantine.path(name).read_bytes() == _image(1, SeriesDescription="another version")


def test_a_store_failure_leaves_every_orphan_in_place(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    quarantine = Quarantine(tmp_path / "quarantine")
    orphans = [spool.write(_image(n)) for n in (1, 2)]
    db = tmp_path / "state.sqlite3"
    store = SQLiteStateStore(db, node="test-node", busy_timeout_s=0.1)
    other = sqlite3.connect(db, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock: the admission fails
        with pytest.raises(StoreError):
            _sweep(spool, store, quarantine)
        other.execute("ROLLBACK")
        assert all(o.path.exists() for o in orphans)
        assert _sweep(spool, store, quarantine).readmitted == 2  # and the next start admits them
    finally:
        other.close()
        store.close()


def test_sweep_of_an_empty_spool_does_not_query_rows(tmp_path: Path) -> None:
    class NoStore:
        def referenced_spool_names(self, names: object) -> set[str]:
            raise AssertionError("no candidates: the store must not be asked")

    spool = Spool(tmp_path / "spool")
    spool.write(b"young")  # not old enough to be a candidate
    quarantine = Quarantine(tmp_path / "quarantine")
    admission = Admission(NoStore(), spool=spool, quarantine=quarantine, metrics=None,  # type: ignore[arg-type]
                          stable_age_s=30, wake=lambda: None, label="spool", remove_spooled=False)
    result = sweep_orphans(spool, NoStore(), admission=admission, quarantine=quarantine,  # type: ignore[arg-type]
                           read=_read, older_than_s=3600)
    assert (result.orphans, result.kept) == (0, 1)
    with pytest.raises(ValueError, match="older_than_s"):
        sweep_orphans(spool, NoStore(), admission=admission, quarantine=quarantine,  # type: ignore[arg-type]
                      read=_read, older_than_s=-1)


# -- at start of ``ingest serve`` ------------------------------------------------------------------------


async def test_serve_admits_orphans_at_start(tmp_path: Path) -> None:
    from ingest.app.serve import serve

    data = tmp_path / "data"
    spool = Spool(data / "spool")
    kept = spool.write(b"referenced")
    orphan = spool.write(_image(1))
    young = spool.write(_image(2))  # young, but this process holds the data dir's lock: no writer runs
    temp = spool.root / f".tmp-{uuid.uuid4().hex}"
    temp.write_bytes(b"a killed receive")
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

    assert kept.path.exists() and orphan.path.exists() and young.path.exists() and not temp.exists()
    store = SQLiteStateStore(data / "state.sqlite3", node="test-node")
    try:
        assert store.instance_spool_name(f"{SERIES}.1") == orphan.name
        assert store.instance_spool_name(f"{SERIES}.2") == young.name
    finally:
        store.close()
