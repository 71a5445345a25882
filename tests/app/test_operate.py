"""Running in production (``ingest.app.operate``, README "Running in production"): ``ingest init``,
``check-config`` on what it wrote, ``ingest backup`` of a store being written, ``ingest migrate``, the
stable node id and the systemd unit, each run as a user would."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ingest.adapters.state import open_state_store
from ingest.core.records import InstanceRecord
from tests import REPO

pytestmark = pytest.mark.timeout(120)

UID = "1.2.826.0.1.3680043.8.498.77"


def _ingest(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "ingest", *args], cwd=cwd, env=base,
                          capture_output=True, text=True, timeout=100)


def test_init_writes_the_shipped_example_and_a_private_data_dir_that_check_config_accepts(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "site"
    done = _ingest(tmp_path, "init", str(folder))
    assert done.returncode == 0, done.stderr
    config = folder / "ingest.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE((folder / "data").stat().st_mode) == 0o700
    text = config.read_text()
    assert f'data_dir = "{folder.resolve() / "data"}"' in text
    # every other line is the example in the repository, as shipped in the package
    example = (REPO / "config" / "ingest.toml").read_text()
    assert [ln for ln in text.splitlines() if not ln.startswith("data_dir")] == [
        ln for ln in example.splitlines() if not ln.startswith("data_dir")
    ]
    check = _ingest(tmp_path / "site", "--config", str(config), "check-config", "--command", "backend",
                    env={"INGEST_EMBEDDED_BACKEND__PORT": "0"})
    assert check.returncode == 0, check.stderr
    assert f"settings {config.resolve()} (--config)" in check.stderr
    again = _ingest(tmp_path, "init", str(folder))
    assert again.returncode == 1 and "exists: kept" in again.stderr


def test_the_settings_file_is_found_through_INGEST_CONFIG_and_named(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    assert _ingest(tmp_path, "init", str(folder)).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _ingest(elsewhere, "check-config", "--command", "backend",
                   env={"INGEST_CONFIG": str(folder / "ingest.toml"), "INGEST_EMBEDDED_BACKEND__PORT": "0"})
    assert done.returncode == 0, done.stderr
    assert f"settings {folder / 'ingest.toml'} (INGEST_CONFIG), data dir {folder / 'data'}" in done.stderr
    assert not (elsewhere / "data").exists()


def test_status_from_another_folder_refuses_instead_of_creating_an_empty_store(tmp_path: Path) -> None:
    done = _ingest(tmp_path, "status")
    assert done.returncode == 1
    assert "no state store in data dir" in done.stderr
    assert not (tmp_path / "data").exists()


def _add(store_dir: Path, n: int, start: int = 0) -> None:
    store = open_state_store(None, store_dir)
    try:
        now = datetime.now(UTC)
        for i in range(start, start + n):
            rec = InstanceRecord(study_uid=UID, series_uid=f"{UID}.1", sop_uid=f"{UID}.1.{i + 1}",
                                 sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
            store.add_instance(rec, source="file:x", spool_name=None, digest=f"d{i}", now=now, due_at=now)
    finally:
        store.close()


def test_backup_of_a_store_being_written_is_consistent_and_restores(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _add(data, 50)
    stop = threading.Event()

    def keep_writing() -> None:
        n = 50
        while not stop.is_set() and n < 5000:
            _add(data, 10, n)
            n += 10

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        done = _ingest(tmp_path, "--data-dir", str(data), "backup", str(tmp_path / "copy.sqlite3"))
    finally:
        stop.set()
        writer.join()
    assert done.returncode == 0, done.stderr
    copy = tmp_path / "copy.sqlite3"
    conn = sqlite3.connect(copy)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        count = conn.execute("SELECT count(*) FROM instances").fetchone()[0]
    finally:
        conn.close()
    assert count >= 50
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(copy, restored / "state.sqlite3")
    status = _ingest(tmp_path, "--data-dir", str(restored), "status", "--json")
    assert status.returncode == 0, status.stderr
    assert UID in status.stdout
    assert _ingest(tmp_path, "--data-dir", str(data), "backup", str(copy)).returncode == 1  # never overwrites


def test_migrate_check_says_whether_a_migration_is_needed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _add(data, 1)
    done = _ingest(tmp_path, "--data-dir", str(data), "migrate", "--check")
    assert done.returncode == 0 and "nothing to do" in done.stdout, done.stderr
    conn = sqlite3.connect(data / "state.sqlite3")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.execute(f"PRAGMA user_version = {version - 1}")  # as an older ingest left it
    conn.close()
    done = _ingest(tmp_path, "--data-dir", str(data), "migrate", "--check")
    assert done.returncode == 1
    assert f"schema is at version {version - 1}; this version migrates it to {version}" in done.stdout


def test_the_node_id_is_kept_in_the_data_dir_across_restarts(tmp_path: Path) -> None:
    from ingest.adapters.datadir import stable_node_id

    first = stable_node_id(tmp_path / "a")
    assert first == stable_node_id(tmp_path / "a")
    assert first != stable_node_id(tmp_path / "b")  # two services on one host differ
    assert (tmp_path / "a" / "node-id").read_text().strip() == first


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (REPO / "deploy" / "ingest.service").read_text()
    # the unit names the installed command; here, this environment's
    installed = Path(sys.executable).with_name("ingest")
    (tmp_path / "ingest.service").write_text(unit.replace("/opt/ingest/bin/ingest", str(installed)))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "ingest.service")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr
