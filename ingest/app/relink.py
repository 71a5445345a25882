"""``ingest relink``: link the studies whose order, visit or referrer is still a logical reference.

A study written before its ServiceRequest (or Encounter, or Practitioner) existed keeps a logical
reference (docs/mapping.md "Order, visit, referrer"). ``relink`` finds the pushed studies whose last
write holds one (the state store keeps what ``ingest`` wrote), makes them due, and pushes them through
the relay: the link step searches again, and the merge writes only when a reference became literal
(an unchanged study is not written: no new version).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Any

from ingest.config import Settings
from ingest.exitcodes import ExitCode
from ingest.logs import printable
from ingest.ports import StateStore, StudyState

__all__ = ["logical_references", "run_relink"]


def logical_references(written: Mapping[str, Any], settings: Settings) -> list[str]:
    """The elements of a written ImagingStudy that a lookup could still make literal."""
    found = []
    if settings.links.based_on == "lookup" and any(
        isinstance(r, Mapping) and not r.get("reference") for r in written.get("basedOn") or []
    ):
        found.append("basedOn")
    encounter = written.get("encounter")
    lookup = settings.links
    if lookup.encounter == "lookup" and isinstance(encounter, Mapping) and not encounter.get("reference"):
        found.append("encounter")
    referrer = written.get("referrer")
    if lookup.referrer == "lookup" and not (isinstance(referrer, Mapping) and referrer.get("reference")):
        found.append("referrer")
    return found


def _candidates(store: StateStore, settings: Settings, since: date | None, study: str | None) -> list[str]:
    rows = [store.study(study)] if study else store.studies(StudyState.PUSHED)
    start = datetime(since.year, since.month, since.day, tzinfo=UTC) if since else None
    out = []
    for row in rows:
        if row is None or row.state is not StudyState.PUSHED:
            continue
        if start is not None and (row.last_seen is None or row.last_seen < start):
            continue
        text, _ = store.written(row.study_uid)
        if text is None:
            continue
        try:
            written = json.loads(text)
        except ValueError:
            continue
        if isinstance(written, Mapping) and logical_references(written, settings):
            out.append(row.study_uid)
    return out


async def run_relink(settings: Settings, *, since: date | None = None, study: str | None = None) -> int:
    """Requeue and push the studies with a logical reference a lookup could resolve; print a summary."""
    from ingest.app.wiring import open_sink, open_store, wired_relay

    if "lookup" not in (settings.links.based_on, settings.links.encounter, settings.links.referrer):
        print("ingest relink: no [links] mode is \"lookup\": nothing to resolve", file=sys.stderr)
        return int(ExitCode.FATAL)
    store = open_store(settings)
    try:
        if study is not None and store.study(study) is None:
            print(f"ingest relink: study {printable(study)} is not in the state store", file=sys.stderr)
            return int(ExitCode.FATAL)
        wanted = await asyncio.to_thread(_candidates, store, settings, since, study)
        if not wanted:
            print(json.dumps({"studies": 0, "updated": 0, "unchanged": 0}))
            return int(ExitCode.OK)
        await asyncio.to_thread(store.requeue, wanted, datetime.now(UTC))
        async with open_sink(settings, embedded_port=0) as sink:
            relay = await wired_relay(settings, store, sink)
            await relay.drain(wanted)
        results = relay.totals.results
        print(json.dumps({"studies": len(wanted), "updated": results.get("updated", 0),
                          "unchanged": results.get("unchanged", 0), "dead": results.get("dead", 0)}))
        return int(ExitCode.DEAD if results.get("dead") else ExitCode.OK)
    finally:
        store.close()
