"""The GraphQL sink package: the outbound edge to a FHIR GraphQL backend (docs/architecture.md).

One job per module, imports one way (``sink`` → ``client``, ``fit``, ``errors``, ``token``; ``client`` →
``errors``; ``fit``, ``errors`` and ``token`` import no sibling):

- ``token``: where the bearer token comes from, and a holder that never shows it;
- ``fit``: the documents fitted to the backend's introspected or configured schema (pure);
- ``errors``: foreign errors mapped to :mod:`ingest.errors`, backend messages redacted;
- ``client``: the gql session and transport, TLS, and every change to gql's behaviour;
- ``sink``: :class:`GraphQLSink` itself (the :class:`ingest.ports.Sink` port, and linked resources).

Only this package imports gql and aiohttp's client among the adapters. Callers import from the module that
holds a name; the names below are re-exported for convenience.
"""

from ingest.adapters.graphql.client import load_ca_bundle
from ingest.adapters.graphql.errors import redact_backend_message, schema_names
from ingest.adapters.graphql.fit import ResourceFit, SchemaFit, fit_resource, fit_schema, load_schema_file
from ingest.adapters.graphql.sink import GraphQLSink, study_identifier
from ingest.adapters.graphql.token import TokenSource

__all__ = [
    "GraphQLSink",
    "ResourceFit",
    "SchemaFit",
    "TokenSource",
    "fit_resource",
    "fit_schema",
    "load_ca_bundle",
    "load_schema_file",
    "redact_backend_message",
    "schema_names",
    "study_identifier",
]
