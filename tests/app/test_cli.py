"""The command line (``ingest.app.cli``): ``ingest retry`` echoes untrusted text escaped, and leaves
re-queued studies pending when the backend cannot be reached.

The helpers build a dead-lettered study in a data dir and run ``python -m ingest`` on it (also used by
tests/app/test_status.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ingest.adapters.state import open_state_store
from ingest.core.records import InstanceRecord
from tests import free_ports

STUDY = "1.2.826.0.1.3680043.8.498.4242"
ERROR = "backend said: [bold red]no[/]\n\x1b[2Jforged \u202eline"


def _dead_study(data: Path) -> None:
    store = open_state_store(None, data, node="node-[blink]x[/]")
    try:
        record = InstanceRecord(study_uid=STUDY, series_uid=f"{STUDY}.1", sop_uid=f"{STUDY}.1.1",
                                sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
        now = datetime.now(UTC)
        store.add_instance(record, source="file:x", spool_name=None, digest="d", now=now, due_at=now)
        (claim,) = store.claim_due(now + timedelta(seconds=1), 1, "node-[blink]x[/]", 60.0)
        store.dead_letter(claim, reason="rejected", error=ERROR, now=now)
    finally:
        store.close()


def _ingest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env["COLUMNS"] = "300"  # one table row per line
    return subprocess.run([sys.executable, "-m", "ingest", "-q", "--data-dir", str(tmp_path / "data"), *args],
                          cwd=work, env=env, capture_output=True, timeout=60)


def test_retry_of_an_unknown_study_echoes_it_escaped(tmp_path: Path) -> None:
    _dead_study(tmp_path / "data")
    proc = _ingest(tmp_path, "retry", "--study", "1.2.3\n\x1b[31mforged")
    assert proc.returncode == 1
    assert b"\x1b" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == b"ingest: study 1.2.3\\n\\x1b[31mforged is not dead-lettered"


def test_retry_now_with_the_backend_unreachable_leaves_the_studies_re_queued(tmp_path: Path) -> None:
    _dead_study(tmp_path / "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update({
        "INGEST_BACKEND__URL": f"http://127.0.0.1:{free_ports(1)[0]}/fhir/R4/$graphql",  # nothing listens
        "INGEST_RELAY__MAX_ATTEMPTS": "2", "INGEST_RELAY__BASE_BACKOFF_S": "0.05",
        "INGEST_RELAY__MAX_BACKOFF_S": "0.1", "INGEST_BACKEND__TIMEOUT_S": "2",
    })
    proc = subprocess.run([sys.executable, "-m", "ingest", "--data-dir", str(tmp_path / "data"),
                           "retry", "--all", "--now"], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert b"1 dead-lettered studies re-queued" in proc.stdout
    assert b"the re-queued studies stay pending" in proc.stderr
    store = open_state_store(None, tmp_path / "data", node="check")
    try:
        row = store.study(STUDY)
    finally:
        store.close()
    assert row is not None and row.state.value == "pending"


def test_the_start_up_line_names_the_kind_of_state_store_its_url_gives(tmp_path: Path) -> None:
    from ingest.app.cli import startup_summary
    from ingest.config import Settings

    own = startup_summary(Settings(data_dir=tmp_path))
    assert f"state store SQLite {tmp_path / 'state.sqlite3'}" in own
    named = startup_summary(Settings(data_dir=tmp_path, state={"url": f"sqlite:///{tmp_path}/other.db"}))
    assert f"state store SQLite {tmp_path}/other.db" in named and "PostgreSQL" not in named
    pg = startup_summary(Settings(data_dir=tmp_path, state={"url": "postgresql://ingest@127.0.0.1/ingest"}))
    assert "state store PostgreSQL" in pg and "ingest@" not in pg
