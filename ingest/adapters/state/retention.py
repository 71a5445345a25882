"""Which spooled bytes the retention policy may remove, and the commitment holds that keep them
(docs/architecture.md "Retention"), on the shared SQL rules of :mod:`ingest.adapters.state.sql`."""

from __future__ import annotations

from ingest.adapters.state.sql import SQLStateStore

__all__ = ["RetentionStore"]


class RetentionStore(SQLStateStore):
    """:class:`ingest.ports.RetentionState` for any SQL dialect."""
