"""ingest.adapters.graphql.sink."""
