"""Shared fixtures. Keep them generic; each fixture that changes global state restores it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ingest.adapters.state.writer import WriterProcess
from ingest.ports import StateStore
from tests import free_ports

# -- state stores ----------------------------------------------------------------------------------------
#
# ``store_factory`` opens a (new) store object on one fresh database per test, so a test can close and
# reopen it or open two stores on the same database (two nodes/processes). It is parametrized over the
# implementations; PostgreSQL runs against a throwaway cluster started once per session and is skipped
# (with a message) only when no PostgreSQL binaries are installed.

StoreFactory = Callable[[], StateStore]

_PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def _pg_bin(name: str) -> str | None:
    for folder in _PG_BIN_DIRS:
        if (folder / name).is_file():
            return str(folder / name)
    return shutil.which(name)


def _free_port() -> int:
    return free_ports(1)[0]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (OS-chosen port); yields a superuser URL."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: PostgreSQL store tests skipped")
    pytest.importorskip("psycopg")
    base = Path(tempfile.mkdtemp(prefix="ingest-pg-"))
    data = base / "data"
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start a PostgreSQL cluster")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user: cannot start a PostgreSQL cluster")
        shutil.chown(base, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*run_as, initdb, "-D", str(data), "-U", "ingest", "--auth=trust", "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
    )
    port = _free_port()
    started = subprocess.run(
        [
            *run_as,
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(base / "log"),
            "-w",
            "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off",
            "start",
        ],
        capture_output=True,
    )
    if started.returncode != 0:
        log = (base / "log").read_text(errors="replace") if (base / "log").exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed: {started.stderr.decode(errors='replace')}\n{log}")
    pid = int((data / "postmaster.pid").read_text().splitlines()[0])
    try:
        yield f"postgresql://ingest@127.0.0.1:{port}/postgres"
    finally:
        stopped = subprocess.run(
            [*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True
        )
        if stopped.returncode != 0:  # fall back to the postmaster we started, by its PID
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores on one fresh database (SQLite file, or a fresh PostgreSQL schema); closes them all."""
    opened: list[StateStore] = []
    if request.param == "sqlite":
        from ingest.adapters.state.sqlite import SQLiteStateStore

        db = tmp_path / "state" / "state.sqlite3"

        def make() -> StateStore:
            opened.append(SQLiteStateStore(db, node="test-node"))
            return opened[-1]

    else:
        import psycopg

        from ingest.adapters.state.postgres import PostgresStateStore

        server: str = request.getfixturevalue("postgres_url")
        schema = f"t_{uuid.uuid4().hex}"
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        url = f"{server}?options=-csearch_path%3D{schema}"

        def make() -> StateStore:
            opened.append(PostgresStateStore(url, node="test-node"))
            return opened[-1]

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(store_factory: StoreFactory) -> StateStore:
    """One open state store on a fresh database, for each implementation."""
    return store_factory()


@pytest.fixture
def sqlite_writer(tmp_path: Path) -> Iterator[WriterProcess]:
    """A started state store writer process (``ingest.adapters.state.writer``) on the SQLite store of
    ``tmp_path`` (``tmp_path / "state.sqlite3"``, created if missing); closed after the test."""
    writer = WriterProcess(url=None, data_dir=tmp_path, node="test")
    writer.start()
    yield writer
    writer.close()
