"""ingest.intake."""
