"""``ingest status``: studies pending, pushed and dead, and the nodes holding leases, as a table or JSON.

Untrusted text (backend messages, node names) is escaped and rich markup in it shown as is
(docs/reliability.md).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from ingest.app.wiring import open_store
from ingest.config import Settings
from ingest.core.terminology import is_acquisition_modality
from ingest.exitcodes import ExitCode
from ingest.logs import markup_safe
from ingest.ports import CommitmentRow, StudyRow, StudyState

__all__ = ["node_summary", "run_status", "source_label", "source_text"]


def source_text(source: str) -> str:
    """``AE <title>`` for ``dimse:<title>``, else the source as recorded (``watch``, a path...)."""
    return f"AE {source.removeprefix('dimse:')}" if source.startswith("dimse:") else source


def source_label(sources: Counter[str]) -> str:
    """Where a study's instances came from, short: ``AE CT1``, ``watch``, ``replay (150 files)``,
    joined with ``, `` (a replayed study's rows carry one ``file:<path>`` source per file)."""
    parts: list[str] = []
    files = 0
    for source, count in sorted(sources.items()):
        if source.startswith("file:"):
            files += count
        else:
            parts.append(source_text(source))
    if files:
        parts.append(f"replay ({files} file{'s' if files != 1 else ''})")
    return ", ".join(dict.fromkeys(parts))


@dataclass
class _Listed:
    """One study of ``ingest status`` with what its instance rows say."""

    row: StudyRow
    received: datetime | None = None
    sources: Counter[str] = field(default_factory=Counter)
    accession: str | None = None
    modalities: set[str] = field(default_factory=set)
    series: set[str] = field(default_factory=set)


def _modalities(found: set[str]) -> list[str]:
    """The acquisition modalities (DICOM CID 29) of ``found``, as the ImagingStudy's modality list has
    them; the others (KO, PR, SR...) only when a study has nothing else."""
    images = sorted(m for m in found if is_acquisition_modality(m))
    return images or sorted(found)


def _listed(store: Any, rows: Sequence[StudyRow], *, ae: str | None, limit: int | None) -> list[_Listed]:
    """``rows`` (newest first) with their instance summaries, those with calling AE ``ae`` only, at most
    ``limit``; the instance rows are read a page of studies at a time."""
    out: list[_Listed] = []
    page = 200
    for start in range(0, len(rows), page):
        chunk = rows[start : start + page]
        by_uid = {r.study_uid: _Listed(r) for r in chunk}
        for g in store.series_groups([r.study_uid for r in chunk]):
            item = by_uid.get(g.study_uid)
            if item is None:
                continue
            item.sources[g.source] += g.instances
            if g.first_added is not None and (item.received is None or g.first_added < item.received):
                item.received = g.first_added
            item.series.add(g.series_uid)
            if g.sample.modality:
                item.modalities.add(g.sample.modality)
            item.accession = item.accession or g.sample.accession_number
        for r in chunk:
            item = by_uid[r.study_uid]
            if ae is not None and f"dimse:{ae}" not in item.sources:
                continue
            out.append(item)
            if limit is not None and len(out) >= limit:
                return out
    return out


async def run_status(
    settings: Settings, *, state: str | None = None, as_json: bool = False, since: date | None = None,
    ae: str | None = None, limit: int | None = None,
) -> int:
    """Print the studies of the state store, newest first (by their last instance received), and the
    nodes holding leases: a rich table on stdout (at most ``limit``, default 50), or with ``as_json``
    one JSON document (every study unless ``limit`` is given). ``state``, ``since`` (last instance
    received on or after that day, UTC) and ``ae`` (a calling AE sent some of it) filter. Returns the
    exit code."""
    store = open_store(settings)
    try:
        everything = store.studies(None)
        rows = [r for r in everything if state is None or r.state.value == state]
        if since is not None:
            start = datetime(since.year, since.month, since.day, tzinfo=UTC)
            rows = [r for r in rows if r.last_seen is not None and r.last_seen >= start]
        rows.sort(key=lambda r: (r.last_seen is None, -(r.last_seen.timestamp() if r.last_seen else 0),
                                 r.study_uid))
        shown = _listed(store, rows, ae=ae, limit=limit if (limit is not None or as_json) else 50)
        rejected = store.rejected_counts()  # IOCM rejections per study and code (ingest.core.lifecycle)
        # Storage Commitment: requests per state, and the reports not delivered yet (README)
        commitment_counts = store.commitment_counts()
        undelivered = store.commitments("pending") + store.commitments("abandoned")
        syncs = _sync_runs(store)  # ingest sync: each source's last run
    finally:
        store.close()
    counts = Counter(r.state.value for r in everything)
    now = datetime.now(UTC)
    nodes = node_summary(everything, now)
    if as_json:
        print(json.dumps({
            "counts": {s.value: counts.get(s.value, 0) for s in StudyState},
            "nodes": nodes,
            "commitments": {
                "counts": commitment_counts,
                "undelivered": [_commitment_json(c) for c in undelivered],
            },
            "sync": syncs,
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
                    "received_at": item.received.isoformat() if item.received else None,
                    "last_received_at": r.last_seen.isoformat() if r.last_seen else None,
                    "source": source_label(item.sources),
                    "calling_aes": sorted(s.removeprefix("dimse:") for s in item.sources
                                          if s.startswith("dimse:")),
                    "accession": item.accession,
                    "modalities": _modalities(item.modalities),
                    "series": len(item.series),
                }
                for item in shown
                for r in (item.row,)
            ],
        }, indent=2))
        return ExitCode.OK
    from rich.console import Console
    from rich.table import Table

    filters = ", ".join(f for f in (f"state {state}" if state else "", f"since {since}" if since else "",
                                    f"AE {markup_safe(ae)}" if ae else "") if f)
    title = (f"ingest status — {sum(counts.values())} studies "
             + ", ".join(f"{s.value} {counts.get(s.value, 0)}" for s in StudyState)
             + f"; showing {len(shown)}" + (f" ({filters})" if filters else "") + ", newest first")
    table = Table(title=title, show_lines=True)
    # every cell (UIDs and errors above all) is folded over several lines at narrow widths, never cut
    for header, justify in (("received", "left"), ("AE / source", "left"), ("Study Instance UID", "left"),
                            ("accession", "left"), ("modality", "left"), ("series", "right"),
                            ("instances", "right"), ("state", "left"), ("error", "left")):
        table.add_column(header, overflow="fold", justify=justify)  # type: ignore[arg-type]
    for item in shown:
        r = item.row
        state_text = r.state.value + (" (dirty)" if r.dirty else "")
        if r.attempts:
            state_text += f", {r.attempts} attempts"
        rej = _rejected_text(rejected.get(r.study_uid, {}))
        if rej:
            state_text += f", rejected {rej}"
        if r.lease_owner:
            state_text += f", lease {r.lease_owner}" + ("" if _lease_active(r, now) else " (expired)")
        error = (f"{r.dead_reason}: " if r.dead_reason else "") + (r.last_error or "")
        # untrusted text (backend messages, AE titles, DICOM values): escaped, rich markup shown as is
        received = item.received or r.last_seen
        table.add_row(
            received.strftime("%Y-%m-%d %H:%M") if received else "",
            markup_safe(source_label(item.sources)), markup_safe(r.study_uid),
            markup_safe(item.accession or ""), markup_safe(", ".join(_modalities(item.modalities))),
            str(len(item.series)), str(r.instances), markup_safe(state_text), markup_safe(error),
        )
    console = Console()
    console.print(table)
    if nodes:
        per_node = Table(title="nodes holding leases")
        for col in ("node", "active leases", "expired leases", "lease ends"):
            per_node.add_column(col, overflow="fold")
        for n in nodes:
            per_node.add_row(markup_safe(n["node"]), str(n["active_leases"]), str(n["expired_leases"]),
                             n["lease_ends"] or "")
        console.print(per_node)
    if commitment_counts:
        pending = Table(title="Storage Commitment — " + ", ".join(
            f"{k} {v}" for k, v in sorted(commitment_counts.items())))
        for col in ("Transaction UID", "requester", "state", "instances", "attempts", "next attempt",
                    "last error"):
            pending.add_column(col, overflow="fold")
        for c in undelivered:
            pending.add_row(markup_safe(c.transaction_uid), markup_safe(c.calling_ae), c.state,
                            str(c.instances), str(c.attempts),
                            c.next_attempt_at.isoformat() if c.next_attempt_at else "",
                            markup_safe(c.last_error or ""))
        console.print(pending)
    if syncs:
        runs = Table(title="sync sources")
        for col in ("source", "last run", "status", "instances", "added", "withdrawn", "gone", "watermark",
                    "error"):
            runs.add_column(col)
        for run in syncs:
            c = run["counts"]
            runs.add_row(markup_safe(run["source"]), run["last_finished"] or run["last_started"] or "",
                         markup_safe(run["last_status"] or ""), str(c.get("instances", "")),
                         str(c.get("added", "")), str(c.get("withdrawn", "")), str(c.get("gone", "")),
                         markup_safe(run["watermark"] or ""), markup_safe((run["last_error"] or "")[:120]))
        console.print(runs)
    return ExitCode.OK


def _sync_runs(store: Any) -> list[dict[str, Any]]:
    """Each sync source's last run (``ingest.adapters.state.sync``)."""
    return [
        {
            "source": r.source, "watermark": r.watermark, "last_status": r.last_status,
            "last_error": r.last_error, "counts": r.counts,
            "last_started": r.last_started.isoformat() if r.last_started else None,
            "last_finished": r.last_finished.isoformat() if r.last_finished else None,
            "running_on": r.lease_owner,
        }
        for r in store.sync_runs()
    ]


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
