"""``ingest status``: studies pending, pushed and dead, and the nodes holding leases, as a table or JSON.

Untrusted text (backend messages, node names) is escaped and rich markup in it shown as is
(docs/reliability.md).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ingest.app.wiring import open_store
from ingest.config import Settings
from ingest.exitcodes import ExitCode
from ingest.logs import markup_safe
from ingest.ports import CommitmentRow, StudyRow, StudyState

__all__ = ["node_summary", "run_status"]


async def run_status(settings: Settings, *, state: str | None = None, as_json: bool = False) -> int:
    """Print the studies of the state store (only those in ``state`` when given) and the nodes holding
    leases: a rich table on stdout, or with ``as_json`` one JSON document. Returns the exit code."""
    store = open_store(settings)
    try:
        rows = store.studies(StudyState(state) if state else None)
        rejected = store.rejected_counts()  # IOCM rejections per study and code (ingest.core.lifecycle)
        # Storage Commitment: requests per state, and the reports not delivered yet (README)
        commitment_counts = store.commitment_counts()
        undelivered = store.commitments("pending") + store.commitments("abandoned")
    finally:
        store.close()
    counts = Counter(r.state.value for r in rows)
    now = datetime.now(UTC)
    nodes = node_summary(rows, now)
    if as_json:
        print(json.dumps({
            "counts": {s.value: counts.get(s.value, 0) for s in StudyState},
            "nodes": nodes,
            "commitments": {
                "counts": commitment_counts,
                "undelivered": [_commitment_json(c) for c in undelivered],
            },
            "studies": [
                {
                    "study_uid": r.study_uid, "state": r.state.value, "reason": r.dead_reason,
                    "instances": r.instances,
                    "rejected": rejected.get(r.study_uid, {}),
                    "dirty": r.dirty, "attempts": r.attempts, "backend_id": r.backend_id,
                    "version_id": r.version_id, "last_error": r.last_error,
                    "next_attempt_at": r.next_attempt_at.isoformat() if r.next_attempt_at else None,
                    "pushed_at": r.pushed_at.isoformat() if r.pushed_at else None,
                    "lease_owner": r.lease_owner,
                    "lease_expires": r.lease_expires.isoformat() if r.lease_expires else None,
                    "lease_active": _lease_active(r, now),
                }
                for r in rows
            ],
        }, indent=2))
        return ExitCode.OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ingest status — {sum(counts.values())} studies "
                  + ", ".join(f"{s.value} {counts.get(s.value, 0)}" for s in StudyState))
    for col in ("Study Instance UID", "state", "instances", "rejected", "attempts", "node (lease)",
                "backend id", "last error"):
        table.add_column(col)
    for r in rows:
        holder = ""
        if r.lease_owner:
            holder = r.lease_owner + ("" if _lease_active(r, now) else " (expired)")
        # untrusted text (backend messages, node names): escaped, and rich markup in it shown as is
        table.add_row(markup_safe(r.study_uid), r.state.value + (" (dirty)" if r.dirty else ""),
                      str(r.instances), _rejected_text(rejected.get(r.study_uid, {})), str(r.attempts),
                      markup_safe(holder), markup_safe(r.backend_id or ""),
                      markup_safe((r.last_error or "")[:120]))
    console = Console()
    console.print(table)
    if nodes:
        per_node = Table(title="nodes holding leases")
        for col in ("node", "active leases", "expired leases", "lease ends"):
            per_node.add_column(col)
        for n in nodes:
            per_node.add_row(markup_safe(n["node"]), str(n["active_leases"]), str(n["expired_leases"]),
                             n["lease_ends"] or "")
        console.print(per_node)
    if commitment_counts:
        pending = Table(title="Storage Commitment — " + ", ".join(
            f"{k} {v}" for k, v in sorted(commitment_counts.items())))
        for col in ("Transaction UID", "requester", "state", "instances", "attempts", "next attempt",
                    "last error"):
            pending.add_column(col)
        for c in undelivered:
            pending.add_row(markup_safe(c.transaction_uid), markup_safe(c.calling_ae), c.state,
                            str(c.instances), str(c.attempts),
                            c.next_attempt_at.isoformat() if c.next_attempt_at else "",
                            markup_safe((c.last_error or "")[:120]))
        console.print(pending)
    return ExitCode.OK


def _commitment_json(c: CommitmentRow) -> dict[str, Any]:
    return {
        "transaction_uid": c.transaction_uid, "calling_ae": c.calling_ae, "state": c.state,
        "instances": c.instances, "committed": c.committed, "failed": c.failed, "attempts": c.attempts,
        "received_at": c.received_at.isoformat() if c.received_at else None,
        "next_attempt_at": c.next_attempt_at.isoformat() if c.next_attempt_at else None,
        "last_error": c.last_error,
    }


def _rejected_text(codes: dict[str, int]) -> str:
    """``3 (113001: 2, 113037: 1)``: rejected instances, per rejection code; ``""`` for none."""
    if not codes:
        return ""
    return f"{sum(codes.values())} (" + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())) + ")"


def _lease_active(row: StudyRow, now: datetime) -> bool:
    return row.lease_owner is not None and row.lease_expires is not None and row.lease_expires > now


def node_summary(rows: Sequence[StudyRow], now: datetime) -> list[dict[str, Any]]:
    """Per-node activity in a (shared) state store, from the lease columns of ``rows``.

    Parameters
    ----------
    rows:
        Studies as :meth:`ingest.ports.StateStore.studies` returns them.
    now:
        The time leases are judged against (timezone-aware).

    Returns
    -------
    list of dict
        One entry per lease owner, sorted by name: ``node``, ``active_leases`` (studies it is pushing
        now), ``expired_leases`` (claims it left behind, e.g. a node that died; other nodes take them
        over) and ``lease_ends`` (ISO time of its latest active lease, or ``None``).
    """
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.lease_owner is None:
            continue
        entry = out.setdefault(
            r.lease_owner,
            {"node": r.lease_owner, "active_leases": 0, "expired_leases": 0, "lease_ends": None},
        )
        if _lease_active(r, now):
            assert r.lease_expires is not None
            entry["active_leases"] += 1
            ends = r.lease_expires.isoformat()
            entry["lease_ends"] = max(entry["lease_ends"] or ends, ends)
        else:
            entry["expired_leases"] += 1
    return [out[k] for k in sorted(out)]
