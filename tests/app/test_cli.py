"""The command line (``ingest.app.cli``): ``ingest retry`` echoes untrusted text escaped.

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
