"""ingest.sources.dimse."""
