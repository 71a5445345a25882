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


def test_check_schema_reports_a_new_database_and_missing_tables(postgres_url: str) -> None:
    import uuid

    import psycopg

    from ingest.adapters.state.postgres import PG_MIGRATIONS, PostgresStateStore, check_schema

    schema = f"t_{uuid.uuid4().hex}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    url = f"{postgres_url}?options=-csearch_path%3D{schema}"
    assert check_schema(url) == ["no ingest schema (a new, empty database: ingest serve creates it)"]
    PostgresStateStore(url, node="test").close()
    assert check_schema(url) == []
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'DROP TABLE "{schema}".replay_files')
    assert check_schema(url) == [f"schema version {len(PG_MIGRATIONS)} but tables missing: replay_files"]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'UPDATE "{schema}".ingest_schema SET version = {len(PG_MIGRATIONS) + 1}')
    assert check_schema(url) == [
        f"schema version {len(PG_MIGRATIONS) + 1} is newer than this program's ({len(PG_MIGRATIONS)})"
    ]
