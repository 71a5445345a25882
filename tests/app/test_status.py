"""``ingest status`` rendering (``ingest.app.status``): per-node lease activity from a shared state store.

The table is also checked through the command line: untrusted text (backend errors, node names) escaped,
rich markup in it shown literally.
"""

from __future__ import annotations

from pathlib import Path

from tests.app.test_cli import STUDY, _dead_study, _ingest


def test_node_summary_counts_active_and_expired_leases() -> None:
    from datetime import UTC, datetime, timedelta

    from ingest.app.status import node_summary
    from ingest.ports import StudyRow, StudyState

    now = datetime(2026, 1, 1, tzinfo=UTC)

    def row(uid: str, owner: str | None, expires_in: float | None) -> StudyRow:
        return StudyRow(
            study_uid=uid,
            state=StudyState.PENDING,
            instances=1,
            dirty=True,
            attempts=0,
            backend_id=None,
            version_id=None,
            last_error=None,
            last_seen=None,
            due_at=None,
            next_attempt_at=None,
            pushed_at=None,
            lease_owner=owner,
            lease_expires=None if expires_in is None else now + timedelta(seconds=expires_in),
        )

    rows = [row("1", "node-b", 30), row("2", "node-a", -1), row("3", "node-b", 10), row("4", None, None)]
    assert node_summary(rows, now) == [
        {"node": "node-a", "active_leases": 0, "expired_leases": 1, "lease_ends": None},
        {
            "node": "node-b",
            "active_leases": 2,
            "expired_leases": 0,
            "lease_ends": "2026-01-01T00:00:30+00:00",
        },
    ]


def test_status_table_shows_backend_errors_escaped_and_markup_literally(tmp_path: Path) -> None:
    _dead_study(tmp_path / "data")
    proc = _ingest(tmp_path, "status")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert b"\x1b" not in out and "\u202e".encode() not in out
    row = next(line for line in out.splitlines() if STUDY.encode() in line)
    assert b"backend said: [bold red]no[/]\\n\\x1b[2Jforged \\u202eline" in row


# ---------------------------------------------------------------- filters, columns, nothing cut

LONG = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345"  # 62 characters


def _many(data: Path) -> list[str]:
    """40 studies with 62-character UIDs: 30 from AE CT1 (an hour apart, newest last), 10 replayed."""
    from datetime import UTC, datetime, timedelta

    from ingest.adapters.state import open_state_store
    from ingest.core.records import InstanceRecord

    store = open_state_store(None, data)
    uids = []
    try:
        start = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
        for n in range(40):
            uid = f"{LONG[:-2]}{n:02d}"
            uids.append(uid)
            when = start + timedelta(hours=n)
            for i in (1, 2, 3):
                rec = InstanceRecord(study_uid=uid, series_uid=f"{uid}.{i % 2}", sop_uid=f"{uid}.9.{i}",
                                     sop_class_uid="1.2.840.10008.5.1.4.1.1.2", modality="CT",
                                     accession_number=f"ACC{n:04d}")
                source = "dimse:CT1" if n < 30 else f"file:/archive/{n}/{i}.dcm"
                store.add_instance(rec, source=source, spool_name=None, digest=f"{n}.{i}", now=when,
                                   due_at=when)
    finally:
        store.close()
    return uids


def _table(tmp_path: Path, *args: str, columns: int) -> str:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env["COLUMNS"] = str(columns)
    command = [sys.executable, "-m", "ingest", "-q", "--data-dir", str(tmp_path / "data"), "status", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _rows(out: str) -> list[list[str]]:
    """The table's body rows, each a list of its cells' whole text (folded cells joined again)."""
    rows: list[list[str]] = []
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip().strip("│").split("│")]
            current = cells if current is None else [a + b for a, b in zip(current, cells, strict=True)]
        elif current is not None:  # a rule between rows, or the table's end
            rows.append(current)
            current = None
    return rows


def _cells(out: str) -> str:
    return "\n".join(" | ".join(row) for row in _rows(out))


def test_at_80_columns_uids_are_folded_not_cut_newest_first_with_a_default_limit(tmp_path: Path) -> None:
    uids = _many(tmp_path / "data")
    out = _table(tmp_path, columns=80)
    assert "…" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    rows = _rows(out)
    # the default limit is 50: all 40 shown, newest (replayed, 39) first, each UID whole
    assert [row[2] for row in rows] == list(reversed(uids))
    assert rows[0][1].replace(" ", "") == "replay(3files)" and rows[0][3] == "ACC0039"
    assert rows[-1][1] == "AE CT1" and rows[-1][4] == "CT" and rows[-1][6] == "3"


def test_filters_and_limit(tmp_path: Path) -> None:
    import json

    uids = _many(tmp_path / "data")
    out = _cells(_table(tmp_path, "--ae", "CT1", "--limit", "5", columns=200))
    assert [u for u in uids if u in out] == uids[25:30]  # the five newest of CT1's
    out = _cells(_table(tmp_path, "--since", "2026-03-02", columns=200))
    # from 2026-03-02 00:00: studies 16 and later (08:00 + n hours)
    assert [u for u in uids if u in out] == uids[16:]
    everything = json.loads(_table(tmp_path, "--json", columns=80))
    assert len(everything["studies"]) == 40  # --json lists every study unless --limit is given
    first = everything["studies"][0]
    assert first["study_uid"] == uids[-1]
    assert first["source"] == "replay (3 files)" and first["accession"] == "ACC0039"
    assert first["modalities"] == ["CT"] and first["series"] == 2 and first["calling_aes"] == []
    assert everything["studies"][-1]["calling_aes"] == ["CT1"]
    assert json.loads(_table(tmp_path, "--json", "--state", "dead", columns=80))["studies"] == []
