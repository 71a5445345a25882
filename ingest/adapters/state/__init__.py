"""ingest.adapters.state.sqlite."""
