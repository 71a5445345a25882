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
