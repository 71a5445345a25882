"""The data dir is private: umask at start, tightening of what was left loose, and its one-owner lock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.adapters.datadir import LOCK_NAME, DataDirLock, tighten
from ingest.adapters.spool import Spool
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app import cli
from ingest.config import AdminSettings, EmbeddedBackendSettings, ListenerSettings, Settings
from samples.generate import generate

pytestmark = pytest.mark.timeout(120)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _loose(root: Path) -> dict[str, str]:
    """Every file not 0600 and folder not 0700 under ``root`` (itself included), with its mode."""
    found: dict[str, str] = {}
    for path in [root, *root.rglob("*")]:
        want = 0o700 if path.is_dir() else 0o600
        if _mode(path) != want:
            found[str(path.relative_to(root))] = f"{_mode(path):04o}"
    return found


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    """Run with ``mask`` and restore the test process's umask afterwards (the CLI changes it)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _ingest(tmp_path: Path, data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m ingest`` in a clean folder under a permissive umask (022), as a user's shell has."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env["INGEST_EMBEDDED_BACKEND__PORT"] = "0"
    return subprocess.run(
        [sys.executable, "-m", "ingest", "--data-dir", str(data), *args],
        cwd=work, env=env, capture_output=True, text=True, timeout=100, umask=0o022,
    )


def _loose_data_dir(data: Path) -> None:
    """A data dir as an earlier version left it: 0755 folders, 0644 databases and spool files."""
    with _umask(0o022):
        data.mkdir()
        SQLiteStateStore(data / "state.sqlite3", node="old").close()
        (data / "backend.sqlite3").write_bytes(b"")
        spool = data / "spool"
        spool.mkdir()
        (spool / ("a" * 32)).write_bytes(b"received")
    os.chmod(data, 0o755)
    os.chmod(data / "state.sqlite3", 0o644)
    os.chmod(spool, 0o755)
    os.chmod(spool / ("a" * 32), 0o644)


# -- tighten ---------------------------------------------------------------------------------------------


def test_tighten_fixes_a_loose_data_dir_and_names_what_it_changed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    _loose_data_dir(data)
    assert _loose(data)  # the fixture is loose
    with caplog.at_level(logging.WARNING, logger="ingest.adapters.datadir"):
        changed = tighten(data)
    assert _loose(data) == {}
    assert ". (0755 -> 0700)" in changed and "state.sqlite3 (0644 -> 0600)" in changed
    assert "spool (0755 -> 0700)" in changed and f"spool/{'a' * 32} (0644 -> 0600)" in changed
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "state.sqlite3 (0644 -> 0600)" in record.getMessage()
    assert f"spool/{'a' * 32}" in record.getMessage()  # relative to the data dir
    assert tighten(data) == []  # nothing left to do, nothing logged


def test_tighten_does_not_walk_a_folder_that_already_is_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    spool = Spool(data / "spool")
    os.chmod(data, 0o700)
    inside = spool.root / ("b" * 32)
    inside.write_bytes(b"x")
    os.chmod(inside, 0o644)  # unreachable for others: the spool folder is 0700
    assert tighten(data) == []
    assert _mode(inside) == 0o644


def test_tighten_leaves_symlinks_and_a_missing_data_dir_alone(tmp_path: Path) -> None:
    assert tighten(tmp_path / "nothing") == []
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    os.chmod(outside, 0o644)
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.chmod(data, 0o700)
    (data / "link").symlink_to(outside)
    assert tighten(data) == []
    assert _mode(outside) == 0o644


# -- the CLI: a real `ingest replay`, `ingest status`, and in-process serve / backend --------------------


def test_a_real_replay_creates_only_private_files(tmp_path: Path) -> None:
    corpus = generate(tmp_path / "corpus", studies=1, files=3, tiny=True, seed=5)
    data = tmp_path / "data"
    run = _ingest(tmp_path, data, "-q", "replay", str(corpus.root))
    assert run.returncode == 0, run.stderr
    assert (data / "state.sqlite3").exists() and (data / "backend.sqlite3").exists()
    assert _loose(data) == {}


def test_status_tightens_an_existing_loose_data_dir_with_a_warning(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _loose_data_dir(data)
    run = _ingest(tmp_path, data, "status")
    assert run.returncode == 0, run.stderr
    assert _loose(data) == {}
    assert "state.sqlite3 (0644 -> 0600)" in run.stderr and "spool (0755 -> 0700)" in run.stderr
    assert str(data / "state.sqlite3") not in run.stderr  # named relative to the data dir


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "ingest.toml"
    path.write_text(
        "[listener]\nport = 0\n[admin]\nenabled = false\n[embedded_backend]\nport = 0\n"
        f"[watch]\nfolder = \"{tmp_path / 'drop'}\"\nsettle_ms = 0\n"
    )
    return path


@pytest.mark.parametrize("command", ["serve", "backend"])
async def test_in_process_serve_and_backend_create_only_private_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    data = tmp_path / "data"
    stop = asyncio.Event()
    monkeypatch.setattr(cli, "_stop_event", lambda: stop)
    args = cli.build_parser().parse_args(["--config", str(_config(tmp_path)), "--data-dir", str(data),
                                          command])
    expected = ["backend.sqlite3"] + (["state.sqlite3", "spool", "quarantine", "archive"]
                                      if command == "serve" else [])
    with _umask(0o022):
        task = asyncio.create_task(cli.run(args))
        try:
            for _ in range(300):
                if all((data / name).exists() for name in expected) or task.done():
                    break
                await asyncio.sleep(0.05)
            assert all((data / name).exists() for name in expected), sorted(os.listdir(data))
            assert _loose(data) == {}
        finally:
            stop.set()
            assert await asyncio.wait_for(task, timeout=30) == 0
    assert _loose(data) == {}


# -- the lock and temporary files left by a kill -9 ----------------------------------------------------------


def _serve_settings(data: Path) -> Settings:
    return Settings(
        data_dir=data,
        listener=ListenerSettings(enabled=False),
        admin=AdminSettings(enabled=False),
        embedded_backend=EmbeddedBackendSettings(port=0, database=data.parent / "backend.sqlite3"),
    )


async def _serve_once(data: Path) -> None:
    from ingest.app.serve import serve

    stop = asyncio.Event()
    stop.set()  # serve starts every part, then stops at once
    assert await asyncio.wait_for(serve(_serve_settings(data), stop), timeout=30) == 0


def _fresh_temps(data: Path) -> list[Path]:
    temps = []
    for folder in ("spool", "quarantine", "archive"):
        (data / folder).mkdir(parents=True, exist_ok=True)
        temp = data / folder / ".tmp-0123456789abcdef0123456789abcdef"
        temp.write_bytes(b"30 MB receive cut short by kill -9")  # mtime: now
        temps.append(temp)
    return temps


async def test_serve_removes_fresh_temporary_files_of_a_killed_process_at_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    temps = _fresh_temps(data)
    await _serve_once(data)
    assert [t for t in temps if t.exists()] == []
    assert (data / LOCK_NAME).exists() and _mode(data / LOCK_NAME) == 0o600


async def test_a_second_service_on_the_data_dir_refuses_to_start_and_touches_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ingest.app.serve import serve

    data = tmp_path / "data"
    temps = _fresh_temps(data)
    with DataDirLock(data) as first, caplog.at_level(logging.WARNING):
        assert first.held
        stop = asyncio.Event()
        stop.set()
        # a second owner: its own flock on the lock file is refused, and so is the start (exit 1)
        assert await asyncio.wait_for(serve(_serve_settings(data), stop), timeout=30) == 1
    assert all(t.exists() for t in temps)
    assert any("is in use by a running ingest: refusing to start" in r.getMessage() for r in caplog.records)
    with DataDirLock(data) as again:  # released by both
        assert again.held
