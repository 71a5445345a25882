"""ingest.sources.parse."""
