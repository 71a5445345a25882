"""The state of a study's life after acceptance (docs/architecture.md "Study lifecycle"): IOCM rejections
and replaced instances, on the shared SQL rules of :mod:`ingest.adapters.state.sql`."""

from __future__ import annotations

from ingest.adapters.state.sql import SQLStateStore

__all__ = ["LifecycleStore"]


class LifecycleStore(SQLStateStore):
    """:class:`ingest.ports.LifecycleState` for any SQL dialect."""
