"""Storage Commitment requests and their reports (docs/architecture.md "Storage Commitment"), on the
shared SQL rules of :mod:`ingest.adapters.state.sql`."""

from __future__ import annotations

from ingest.adapters.state.sql import SQLStateStore

__all__ = ["CommitmentStore"]


class CommitmentStore(SQLStateStore):
    """:class:`ingest.ports.CommitmentState` for any SQL dialect."""
