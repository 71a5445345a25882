"""The state store at start, through a real ``ingest serve`` child process and dcmtk ``storescu``
(ingest.app.startup, ingest.intake.sweep): a lost, older, damaged or zero-length state database with
acknowledged instances in the spool, ``--adopt-spool`` and ``ingest check-store``. Every instance is
spooled (``[spool] inline_max_bytes = 0``), so the spool holds each one's bytes."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests import REPO, iocm, wait_until
from tests.app.test_serve_dcmtk import Serve, _free_ports
from tests.app.test_serve_lifecycle import _images, _listed, _resource, _store

pytestmark = [
    pytest.mark.dcmtk,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed"),
]

TWO_HOURS = 7200.0


class Service(Serve):
    """``ingest serve`` with every instance spooled, and optional extra arguments."""

    def __init__(self, data: Path, *, args: tuple[str, ...] = ()) -> None:
        super().__init__(data, *_free_ports())
        self.args = args

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "INGEST_LISTENER__PORT": str(self.dicom_port),
            "INGEST_LISTENER__ACCEPT_ANY_CALLING_AE": "true",
            "INGEST_EMBEDDED_BACKEND__PORT": str(self.backend_port),
            "INGEST_ADMIN__PORT": str(self.admin_port),
            "INGEST_RELAY__RELEASE_GRACE_S": "0.5",
            "INGEST_RELAY__STABLE_AGE_S": "1",
            "INGEST_RELAY__POLL_INTERVAL_S": "0.2",
            "INGEST_SPOOL__INLINE_MAX_BYTES": "0",
        })
        return env

    def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        with (self.data / "serve.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [*_ingest(self.data), "serve", *self.args], cwd=REPO, env=self.env(), stdout=log, stderr=log,
            )

        def listening() -> bool:
            assert self.proc is not None and self.proc.poll() is None, _log(self)
            return subprocess.run(["echoscu", "-aec", "INGEST", "127.0.0.1", str(self.dicom_port)],
                                  capture_output=True).returncode == 0

        wait_until(listening, 60, "ingest serve listening", every=0.2)

    def refused(self) -> subprocess.CompletedProcess[str]:
        """Run ``ingest serve`` expecting it to refuse the start (it would run until the timeout)."""
        return subprocess.run([*_ingest(self.data), "serve", *self.args], cwd=REPO, env=self.env(),
                              capture_output=True, text=True, timeout=60)


def _ingest(data: Path) -> list[str]:
    return [sys.executable, "-m", "ingest", "--data-dir", str(data)]


def _log(s: Serve) -> str:
    return (s.data / "serve.log").read_text()[-4000:]


def _spool(data: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (data / "spool").iterdir() if not p.name.startswith(".")}


def _database(data: Path) -> list[Path]:
    return [data / f"state.sqlite3{suffix}" for suffix in ("", "-wal", "-shm")]


def _remove_database(data: Path) -> None:
    for f in _database(data):
        f.unlink(missing_ok=True)


def _rows(data: Path) -> dict[str, str]:
    with sqlite3.connect(data / "state.sqlite3") as db:
        return dict(db.execute("SELECT sop_uid, spool_name FROM instances").fetchall())


def _populated(tmp_path: Path, n: int = 4) -> tuple[Path, str, str, dict[str, bytes]]:
    """A data dir whose service accepted ``n`` spooled instances of one study and pushed it; stopped."""
    data = tmp_path / "data"
    study = iocm.uid()
    series = f"{study}.1"
    s = Service(data)
    s.start()
    try:
        sent = _store(s.dicom_port, *_images(tmp_path / "images", study, series, n))
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: len(_listed(_resource(s, study)).get(series, [])) == n, 60,
                   f"{n} instances pushed")
    finally:
        s.stop()
    files = _spool(data)
    assert len(files) == n
    return data, study, series, files


def _age_spool(data: Path) -> None:
    """Make every spool file two hours old (past the age rule a sweep without the lock applies)."""
    past = time.time() - TWO_HOURS
    for p in (data / "spool").iterdir():
        os.utime(p, (past, past))


def test_a_lost_state_database_refuses_the_start_and_adopt_spool_admits_the_spool_again(
    tmp_path: Path,
) -> None:
    data, study, series, files = _populated(tmp_path)
    _age_spool(data)
    _remove_database(data)
    (data / "backend.sqlite3").unlink()  # a fresh backend: the study must be pushed again from the spool

    out = Service(data).refused()

    assert out.returncode == 1, out.stderr[-3000:]
    assert "the state store is new" in out.stderr
    assert f"spool holds {len(files)} instance files" in out.stderr
    assert "--adopt-spool" in out.stderr
    assert _spool(data) == files  # nothing lost
    assert not (data / "state.sqlite3").exists()  # and nothing created
    check = subprocess.run([*_ingest(data), "check-store"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and "does not exist" in check.stderr

    s = Service(data, args=("--adopt-spool",))
    s.start()
    try:
        wait_until(lambda: len(_listed(_resource(s, study)).get(series, [])) == len(files), 60,
                   "the adopted instances pushed")
    finally:
        s.stop()
    assert _spool(data) == files
    assert sorted(_rows(data).values()) == sorted(files)  # each row names its file again
    check = subprocess.run([*_ingest(data), "check-store"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == f"state store {data / 'state.sqlite3'}: ok"


def test_an_older_backup_starts_and_the_instances_it_lacks_are_admitted_again(tmp_path: Path) -> None:
    data, study, series, first = _populated(tmp_path, 3)
    assert len(first) == 3
    backup = tmp_path / "backup"
    backup.mkdir()
    for f in _database(data):
        if f.exists():
            shutil.copy2(f, backup / f.name)
    s = Service(data)
    s.start()
    try:
        more = [iocm.write(tmp_path / "more", f"i{i}.dcm",
                           iocm.image(study, series, f"{series}.{i}", number=i)) for i in (4, 5, 6)]
        sent = _store(s.dicom_port, *more)
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: len(_listed(_resource(s, study)).get(series, [])) == 6, 60, "6 instances pushed")
    finally:
        s.stop()
    files = _spool(data)
    assert len(files) == 6
    _age_spool(data)
    _remove_database(data)
    for f in backup.iterdir():  # the older backup: 3 of the 6 instances
        shutil.copy2(f, data / f.name)
    assert len(_rows(data)) == 3

    s = Service(data)
    s.start()
    try:
        wait_until(lambda: len(_rows(data)) == 6, 60, "the 3 missing rows admitted again")
        instances = [f"{series}.{i}" for i in range(1, 7)]
        wait_until(lambda: _listed(_resource(s, study)) == {series: sorted(instances)}, 60,
                   "the ImagingStudy complete")
    finally:
        s.stop()
    assert _spool(data) == files
    assert sorted(_rows(data).values()) == sorted(files)
    assert "3 spool file(s) named by no instance row" in (data / "serve.log").read_text()


def test_a_damaged_database_refuses_the_start_and_check_store_reports_it(tmp_path: Path) -> None:
    data, _study, _series, files = _populated(tmp_path)
    db = data / "state.sqlite3"
    assert not (data / "state.sqlite3-wal").exists() or (data / "state.sqlite3-wal").stat().st_size == 0
    size = db.stat().st_size
    assert size >= 64 * 1024, size
    with db.open("r+b") as f:  # 8 KiB of garbage over two pages in the middle
        f.seek(size // 2 // 4096 * 4096)
        f.write(bytes([0xA5]) * 8192)

    out = Service(data).refused()

    assert out.returncode == 1, out.stderr[-3000:]
    assert f"state database {db} is damaged" in out.stderr
    assert "check-store" in out.stderr and "backup" in out.stderr
    assert _spool(data) == files
    check = subprocess.run([*_ingest(data), "check-store"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 1
    assert "problem(s)" in check.stderr, check.stderr


def test_a_zero_length_database_with_a_populated_spool_refuses_the_start(tmp_path: Path) -> None:
    data, _study, _series, files = _populated(tmp_path, 2)
    _remove_database(data)
    (data / "state.sqlite3").write_bytes(b"")

    out = Service(data).refused()

    assert out.returncode == 1, out.stderr[-3000:]
    assert "is empty (0 bytes)" in out.stderr and "spool holds 2 instance files" in out.stderr
    assert _spool(data) == files
    assert (data / "state.sqlite3").stat().st_size == 0


def test_a_new_postgresql_store_with_a_populated_spool_refuses_the_start(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    def new_schema() -> str:
        schema = f"t_{uuid.uuid4().hex}"
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        return f"{postgres_url}?options=-csearch_path%3D{schema}"

    monkeypatch.setenv("INGEST_STATE__URL", new_schema())
    data, study, series, files = _populated(tmp_path, 2)
    check = subprocess.run([*_ingest(data), "check-store"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    monkeypatch.setenv("INGEST_STATE__URL", new_schema())  # [state] url now names a new, empty database
    check = subprocess.run([*_ingest(data), "check-store"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and "no ingest schema" in check.stderr

    out = Service(data).refused()

    assert out.returncode == 1, out.stderr[-3000:]
    assert "has no studies at all" in out.stderr and "spool holds 2 instance files" in out.stderr
    assert _spool(data) == files

    (data / "backend.sqlite3").unlink()
    s = Service(data, args=("--adopt-spool",))
    s.start()
    try:
        wait_until(lambda: len(_listed(_resource(s, study)).get(series, [])) == 2, 60,
                   "the adopted instances pushed")
    finally:
        s.stop()
    assert _spool(data) == files


def test_ingest_watch_refuses_a_new_store_too_and_starts_with_adopt_spool(tmp_path: Path) -> None:
    from ingest.adapters.spool import Spool

    data = tmp_path / "data"
    kept = Spool(data / "spool").write(iocm.image(iocm.uid(), iocm.uid(), iocm.uid()))
    drop = tmp_path / "drop"
    drop.mkdir()
    env = Service(data).env()
    out = subprocess.run([*_ingest(data), "watch", str(drop)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "the state store is new" in out.stderr and "spool holds 1 instance files" in out.stderr
    assert kept.path.exists() and not (data / "state.sqlite3").exists()

    proc = subprocess.Popen([*_ingest(data), "watch", str(drop), "--adopt-spool"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def admitted() -> dict[str, str]:
            try:
                return _rows(data) if (data / "state.sqlite3").exists() else {}
            except sqlite3.OperationalError:  # the schema is being created
                return {}

        wait_until(admitted, 60, "the spool file admitted")
        assert list(_rows(data).values()) == [kept.name]
    finally:
        proc.terminate()
        proc.wait(30)
