"""The schema written once (ingest.adapters.state.schema): both dialects get the same tables and columns."""

from __future__ import annotations

import re
import sqlite3

from ingest.adapters.state.schema import POSTGRES, SQLITE, migrations


def _columns(steps: tuple[tuple[str, ...], ...]) -> dict[str, list[str]]:
    """Table -> column names, from every CREATE TABLE and ALTER TABLE ... ADD COLUMN of ``steps``."""
    out: dict[str, list[str]] = {}
    for step in steps:
        for sql in step:
            sql = re.sub(r"--[^\n]*", "", sql)
            if made := re.search(r"CREATE TABLE (\w+) \((.*)\)", sql, re.S):
                out[made[1]] = [line.split()[0] for line in made[2].split(",") if line.strip()
                                and not line.strip().startswith(("PRIMARY", "UNIQUE", "FOREIGN"))]
            for table, column in re.findall(r"ALTER TABLE (\w+) ADD COLUMN (\w+)", sql):
                out[table].append(column)
    return out


def test_both_dialects_have_the_same_steps_tables_and_columns() -> None:
    sqlite_steps, pg_steps = migrations(SQLITE), migrations(POSTGRES)
    assert len(sqlite_steps) == len(pg_steps) == 9
    assert _columns(sqlite_steps) == _columns(pg_steps)
    assert set(_columns(pg_steps)) == {
        "instances", "studies", "rejections", "commitments", "commitment_items", "instance_bytes",
        "replay_files", "sync_sources", "sync_studies", "sync_listed",
    }
    assert "timestamptz" in pg_steps[0][0] and "timestamptz" not in sqlite_steps[0][0]


def test_the_sqlite_steps_run_in_order() -> None:
    db = sqlite3.connect(":memory:")
    try:
        for step in migrations(SQLITE):
            for sql in step:
                db.execute(sql)
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"studies_due", "studies_state", "instances_spool", "instances_held"} <= indexes
    finally:
        db.close()
