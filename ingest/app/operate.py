"""Commands for running ``ingest`` in production: ``init``, ``backup``, ``migrate``.

README "Running in production" is the walk-through; each command prints what it did and exits 0, or
names what stopped it and exits 1.
"""

from __future__ import annotations

import os
import re
import sqlite3
import sys
from importlib import resources
from pathlib import Path

from ingest.adapters.datadir import private_umask
from ingest.config import Settings
from ingest.exitcodes import ExitCode
from ingest.logs import printable

__all__ = ["example_config", "run_backup", "run_init", "run_migrate"]


def example_config() -> str:
    """The example settings file shipped with the package (every key, each with a comment)."""
    return (resources.files("ingest") / "ingest.toml").read_text(encoding="utf-8")


def run_init(folder: Path, *, force: bool = False) -> int:
    """Write ``folder/ingest.toml`` (the example, its ``data_dir`` set to ``folder/data``) and create
    the data dir ``0700``; an existing settings file is kept unless ``force``."""
    private_umask()
    folder = folder.resolve()
    config = folder / "ingest.toml"
    data = folder / "data"
    if config.exists() and not force:
        print(f"ingest init: {printable(str(config))} exists: kept (--force writes it anew)", file=sys.stderr)
        return int(ExitCode.FATAL)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    text, count = re.subn(r'(?m)^data_dir = ".*"$', f"data_dir = {_toml_string(str(data))}", example_config())
    if count != 1:  # the shipped example always sets data_dir once
        raise AssertionError("the example settings file has no data_dir line")
    temporary = folder / f".tmp-{os.getpid()}-ingest.toml"
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, config)
    data.mkdir(mode=0o700, exist_ok=True)
    os.chmod(data, 0o700)
    print(f"ingest init: wrote {printable(str(config))} and created {printable(str(data))} (0700)\n"
          f"next: edit it, then `ingest --config {printable(str(config))} check-config` and "
          f"`ingest --config {printable(str(config))} serve`")
    return int(ExitCode.OK)


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_backup(settings: Settings, destination: Path) -> int:
    """Copy the SQLite state store to ``destination`` while the service runs (SQLite's online backup:
    a consistent copy of committed transactions, the WAL included). PostgreSQL is backed up with its
    own tools (``pg_dump``); in-row instance bytes are part of the copy, spool files are not."""
    from ingest.adapters.state import sqlite_path

    source = sqlite_path(settings.state.url, settings.data_dir)
    if source is None:
        print("ingest backup: the state store is PostgreSQL: back it up with pg_dump (README \"Running in "
              "production\")", file=sys.stderr)
        return int(ExitCode.FATAL)
    if not source.is_file():
        print(f"ingest backup: no state store at {printable(str(source))}", file=sys.stderr)
        return int(ExitCode.FATAL)
    if destination.exists():
        print(f"ingest backup: {printable(str(destination))} exists: give a new file name", file=sys.stderr)
        return int(ExitCode.FATAL)
    private_umask()
    temporary = destination.with_name(f".tmp-{os.getpid()}-{destination.name}")
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(temporary)
        try:
            src.backup(dst, pages=4096)  # in steps: the service's writers go on between them
            check = dst.execute("PRAGMA quick_check").fetchone()[0]
            dst.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
        finally:
            dst.close()
    except sqlite3.Error as exc:
        temporary.unlink(missing_ok=True)
        print(f"ingest backup: {printable(str(source))}: {printable(exc)}", file=sys.stderr)
        return int(ExitCode.FATAL)
    finally:
        src.close()
    if check != "ok":
        temporary.unlink(missing_ok=True)
        print(f"ingest backup: the copy failed its check ({printable(check)}); nothing written",
              file=sys.stderr)
        return int(ExitCode.FATAL)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, destination)
    print(f"ingest backup: {printable(str(source))} -> {printable(str(destination))} "
          f"({destination.stat().st_size} bytes); restore: stop the service, put it at "
          f"{printable(str(source))} (removing any -wal/-shm files beside it), start the service")
    return int(ExitCode.OK)


def run_migrate(settings: Settings, *, check: bool) -> int:
    """``--check``: say whether the state store's schema is this version's (exit 0) or needs a
    migration (exit 1, with the versions), without changing it; otherwise migrate it (the service does
    the same at start) and say from which version to which."""
    from ingest.adapters.state import known_schema_version, stored_schema_version
    from ingest.app.wiring import store_missing

    if store_missing(settings):
        print(f"ingest migrate: no state store in data dir {printable(str(settings.data_dir))}",
              file=sys.stderr)
        return int(ExitCode.FATAL)
    current = stored_schema_version(settings.state.url, settings.data_dir)
    wanted = known_schema_version(settings.state.url)
    if current == wanted:
        print(f"ingest migrate: the state store's schema is at version {current}, this version's: "
              "nothing to do")
        return int(ExitCode.OK)
    if current > wanted:
        print(f"ingest migrate: the state store's schema is at version {current}, newer than this version "
              f"knows ({wanted}): run a newer ingest", file=sys.stderr)
        return int(ExitCode.FATAL)
    if check:
        print(f"ingest migrate: the state store's schema is at version {current}; this version migrates "
              f"it to {wanted} when it opens it (ingest migrate, or at the service's start)")
        return int(ExitCode.FATAL)
    from ingest.adapters.state import open_state_store

    open_state_store(settings.state.url, settings.data_dir, node=settings.state.node_id).close()
    print(f"ingest migrate: schema version {current} -> {wanted}")
    return int(ExitCode.OK)
