"""What only the PostgreSQL state store does; the shared rules are in test_state.py, run on both stores."""

from __future__ import annotations

from pathlib import Path

from ingest.adapters.state import open_state_store


def test_open_state_store_postgresql(postgres_url: str) -> None:
    from ingest.adapters.state.postgres import PG_MIGRATIONS, PostgresStateStore

    store = open_state_store(postgres_url, Path("/nonexistent-data-dir"))
    try:
        assert isinstance(store, PostgresStateStore)
        assert store.schema_version == len(PG_MIGRATIONS)
        assert "ingest@" not in store.label  # no credentials in messages
    finally:
        store.close()
