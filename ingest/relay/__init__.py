"""ingest.relay."""
