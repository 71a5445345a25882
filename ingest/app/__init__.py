"""ingest.app."""
