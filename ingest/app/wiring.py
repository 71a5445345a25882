"""The composition root's wiring: the one place that turns :class:`ingest.config.Settings` into running parts.

It opens the state store, starts the embedded backend or builds the configured sink, and wires the relay
(``[relay]`` for the relay itself, ``[mapping]`` / ``[patient]`` for the mapping's options, ``[endpoint]`` /
``[patient]`` for the linked resources). Every component receives its own section or ready-made values from
here; none of them reads the whole settings (docs/architecture.md, "Which way imports go").

The commands (``ingest.app.cli``, ``ingest.app.serve``, ``ingest.app.replay``) use these functions; nothing
outside ``ingest.app`` imports this module. gql, aiohttp and the backend server are imported only by the
functions that need them, so that ``ingest replay --dry-run`` and ``ingest status`` stay light.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ingest.config import Settings
from ingest.errors import ConfigError
from ingest.logs import printable
from ingest.ports import Sink, StateStore

if TYPE_CHECKING:  # gql, aiohttp, the mapping and the relay are imported by the functions that need them
    from graphql import GraphQLSchema

    from ingest.adapters.graphql.sink import GraphQLSink
    from ingest.clock import Timekeeper
    from ingest.core.mapping import MappingOptions
    from ingest.metrics import Metrics
    from ingest.relay.links import LinkedBackend
    from ingest.relay.relay import Build, Link, Relay
    from ingest.relay.reports import CommitmentReports
    from ingest.sources.dimse.commitment import CommitmentSCP

    class LinkedSink(Sink, LinkedBackend, Protocol):
        """A sink that can also find and create Patient and Endpoint resources (the GraphQL sink)."""


__all__ = [
    "attach_commitment_reports",
    "connect_with_backoff",
    "embedded_backend",
    "mapping_options",
    "open_sink",
    "open_store",
    "relay_before_backend",
    "start_sink",
    "store_missing",
    "token_configured",
    "wire_links",
    "wired_relay",
    "with_provenance",
]

LOGGER = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- state store


def open_store(settings: Settings) -> StateStore:
    """The state store of ``[state] url`` (SQLite in the data dir when unset), as node ``[state] node_id``."""
    from ingest.adapters.state import open_state_store

    return open_state_store(settings.state.url, settings.data_dir, node=settings.state.node_id)


def store_missing(settings: Settings) -> bool:
    """Whether the state store is the data dir's SQLite file and it does not exist: a command that only
    reads the store refuses then, instead of creating an empty one (a command run from another folder)."""
    return settings.state.url is None and not (settings.data_dir / "state.sqlite3").is_file()


# --------------------------------------------------------------------------------------- the backend


@contextlib.asynccontextmanager
async def open_sink(settings: Settings, *, embedded_port: int | None = None) -> AsyncIterator[Any]:
    """The configured backend, or the embedded one (started in-process) when no URL is configured."""
    async with contextlib.AsyncExitStack() as stack:
        sink = await start_sink(settings, stack, embedded_port=embedded_port)
        await connect_with_backoff(sink, settings)
        yield sink


async def start_sink(
    settings: Settings, stack: contextlib.AsyncExitStack, *, embedded_port: int | None = None
) -> GraphQLSink:
    """The sink of the configured backend, not connected yet; the embedded backend is started when no URL
    is configured. ``stack`` closes both (the sink first).

    Parameters
    ----------
    settings:
        ``[backend]`` and ``[embedded_backend]``.
    stack:
        Where the backend and the sink are registered to be closed.
    embedded_port:
        Port of the embedded backend (``0``: chosen by the OS); default ``[embedded_backend] port``.

    Returns
    -------
    GraphQLSink
        Connect it with :func:`connect_with_backoff`.
    """
    from ingest.adapters.graphql.fit import load_schema_file
    from ingest.adapters.graphql.fitcache import use_dir
    from ingest.adapters.graphql.sink import GraphQLSink
    from ingest.adapters.graphql.token import TokenSource

    use_dir(settings.data_dir)  # fitted documents kept per backend schema (docs/architecture.md "Replay")

    url = settings.backend.url
    schema: str | GraphQLSchema | None = None
    ca: Path | None = None
    if url is None:
        from ingest.backend.schema import build_backend_schema

        url = await stack.enter_async_context(embedded_backend(settings, port=embedded_port))
        # the schema object the embedded backend serves (built once per process): the sink takes it and
        # probes once, instead of the backend answering a full introspection and the sink building the
        # schema again from the answer
        schema = build_backend_schema()
        token_source = (
            TokenSource(env=settings.embedded_backend.token_env, file=None)
            if settings.embedded_backend.token_env
            else None
        )
    else:
        token_source = TokenSource(env=settings.backend.token_env, file=settings.backend.token_file)
        # [backend] ca / schema apply to the configured backend; both files are checked here, at start
        ca = settings.backend.ca
        if settings.backend.schema_file is not None:
            schema = load_schema_file(settings.backend.schema_file)
    oauth = None
    if settings.backend.url is not None and settings.backend.token_url is not None:
        from ingest.adapters.graphql.client import load_ca_bundle
        from ingest.adapters.graphql.token import ClientCredentialsToken

        b = settings.backend
        assert b.client_id is not None and b.token_url is not None  # (Settings validation)
        oauth = ClientCredentialsToken(
            b.token_url, b.client_id, TokenSource(env=b.client_secret_env, file=b.client_secret_file),
            scope=b.scope, ssl_context=load_ca_bundle(ca) if ca is not None else True, timeout_s=b.timeout_s,
        )
    sink = GraphQLSink(
        url, token_source=token_source, timeout_s=settings.backend.timeout_s, schema=schema, ca=ca,
        oauth=oauth,
    )
    stack.push_async_callback(sink.aclose)  # idempotent; a failed connect has closed it already
    return sink


def token_configured(settings: Settings) -> bool:
    """Whether a bearer token is configured for the backend the relay talks to."""
    if settings.backend.url is None:
        env = settings.embedded_backend.token_env
        return bool(env and os.environ.get(env))
    env = settings.backend.token_env
    return bool((env and os.environ.get(env)) or settings.backend.token_file or settings.backend.token_url)


async def connect_with_backoff(sink: Any, settings: Settings, *, forever: bool = False) -> None:
    """Connect the sink; a backend that is down at start is retried like a push (``[relay]`` backoff).

    Returns at once when ``sink`` is connected already. With ``forever`` there is no attempt limit (the
    caller bounds the wait, ``ingest replay --wait-backend``).

    Raises
    ------
    RetryableSinkError
        Still unreachable after ``[relay] max_attempts`` attempts (not with ``forever``).
    """
    from ingest.errors import RetryableSinkError
    from ingest.relay.relay import backoff_delay

    cfg = settings.relay
    attempt = 0
    while True:
        try:
            await sink.connect()
            return
        except RetryableSinkError as exc:
            attempt += 1
            if attempt >= cfg.max_attempts and not forever:
                raise
            delay = backoff_delay(attempt, cfg.base_backoff_s, cfg.max_backoff_s)
            LOGGER.warning(
                "backend unreachable at start (attempt %d%s), next try in %.1f s: %s",
                attempt, "" if forever else f" of {cfg.max_attempts}", delay, exc,
            )
            await asyncio.sleep(delay)


@contextlib.asynccontextmanager
async def embedded_backend(settings: Settings, *, port: int | None) -> AsyncIterator[str]:
    """Start the embedded FHIR GraphQL backend; yields its GraphQL URL."""
    from ingest.backend.server import QueryLimits, start_backend

    eb = settings.embedded_backend
    db = eb.database or (settings.data_dir / "backend.sqlite3")
    token = os.environ.get(eb.token_env) if eb.token_env else None
    if eb.token_env and not (token or "").strip():  # asked for a token: never start open instead
        raise ConfigError(f"[embedded_backend] token_env names {eb.token_env}, which is not set or empty")
    limits = QueryLimits(
        max_body_bytes=eb.max_body_bytes,
        max_depth=eb.max_query_depth,
        max_fields=eb.max_query_fields,
        max_aliases=eb.max_query_aliases,
        max_concurrent_requests=eb.max_concurrent_requests,
    )
    runner, bound = await start_backend(
        db, host=eb.host, port=eb.port if port is None else port, token=token, limits=limits
    )
    try:
        yield f"http://{eb.host}:{bound}/fhir/R4/$graphql"
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------------------- the relay


@functools.cache
def machine_timezone() -> str | None:
    """The IANA name of the time zone of the machine running ``ingest`` (``TZ``, else the system's
    configuration, read by ``tzlocal``), or ``None`` (logged) when it has none a zone database knows.

    Read once per process: the default of ``[mapping] site_timezone``.
    """
    import tzlocal

    try:
        name = tzlocal.get_localzone_name()
        if name:
            ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        LOGGER.warning(
            "the machine's time zone cannot be determined (%s); times without Timezone Offset From UTC "
            "(0008,0201) are written as dates only: set [mapping] site_timezone", printable(exc),
        )
        return None
    if not name:
        LOGGER.warning(
            "the machine has no time zone configured; times without Timezone Offset From UTC (0008,0201) "
            "are written as dates only: set [mapping] site_timezone"
        )
        return None
    LOGGER.info(
        "[mapping] site_timezone is not set: times without Timezone Offset From UTC (0008,0201) are in "
        "the machine's time zone, %s", printable(name),
    )
    return name


def mapping_options(
    settings: Settings, endpoint_reference: str | None = None, *, profile: str | None = None
) -> MappingOptions:
    """The pure mapping's options, from ``[mapping]``, ``[patient]`` and ``[profile]``.

    ``endpoint_reference`` is the id of the Endpoint resource, known only once it exists in the backend,
    hence passed separately. ``profile``: the profile the study is written for when it is not
    ``[profile] name`` (``ingest replay --dry-run --bundle mado``). ``[mapping] site_timezone`` unset:
    the machine's time zone (:func:`machine_timezone`).
    """
    from ingest.core.mapping import MappingOptions

    return MappingOptions(
        site_timezone=settings.mapping.site_timezone or machine_timezone(),
        include_instances=settings.mapping.include_instances,
        include_study_id=settings.mapping.include_study_id,
        operator_function=settings.mapping.operator_function or None,
        patient_default_system=settings.patient.default_system or None,
        endpoint_reference=endpoint_reference,
        narrative=settings.mapping.narrative,
        issuer_systems=dict(settings.profile.issuer_systems),
        mado_extensions=(profile or settings.profile.name) == "mado",
        based_on=settings.links.based_on,
        encounter=settings.links.encounter,
    )


async def wire_links(
    settings: Settings, sink: LinkedSink, *, metrics: Metrics | None = None, store: StateStore | None = None
) -> tuple[Build, Link | None]:
    """Resolve ``[endpoint]`` and build the ``[patient]`` resolver over the connected ``sink``.

    ``[profile]``: checked against ``[endpoint]`` / ``[mapping]`` (``ConfigError``), applied by the link
    step; ``store`` gives the calling AE titles of each series for ``[endpoint] series_wado_rs_urls``.

    Returns
    -------
    tuple
        The build step (mapping options with the Endpoint reference) and the link step (``None`` in
        ``[patient] mode = "logical"``), for ``Relay(build, link=...)`` or :meth:`Relay.use_links`.
    """
    from ingest.relay.build import StudyBuilder
    from ingest.relay.links import check_profile, prepare_links
    from ingest.relay.orders import OrderLinks, chain_links

    check_profile(settings.profile, settings.endpoint, include_instances=settings.mapping.include_instances)
    if settings.profile.write_linked:  # the backend must hold Device / Organization / Provenance
        from ingest import __version__
        from ingest.relay.links import Creator
        from ingest.relay.relay import utcnow

        Creator(sink, settings.profile, __version__, clock=utcnow).check()
    sources = None
    if store is not None and settings.endpoint.series_wado_rs_urls:
        from ingest.core.profiles import series_sources

        async def sources(study_uid: str) -> dict[str, set[str]]:
            groups = await asyncio.to_thread(store.series_groups, [study_uid])
            return series_sources([(g.series_uid, g.source) for g in groups])

    links = await prepare_links(
        settings.patient, settings.endpoint, sink, metrics=metrics, profile=settings.profile, sources=sources
    )
    link: Link | None = links.link
    orders = OrderLinks(sink, based_on=settings.links.based_on, encounter=settings.links.encounter,
                        referrer=settings.links.referrer)
    if orders.active:  # [links] lookups: basedOn / encounter / referrer made literal before the merge
        orders.check()
        link = chain_links(link, orders)
    return StudyBuilder(
        mapping_options(settings, endpoint_reference=links.endpoint_reference),
        all_rejected_status=settings.intake.all_rejected_status,
    ), link


def with_provenance(settings: Settings, sink: Sink, *, clock: Callable[[], datetime]) -> Sink:
    """``sink``, or with ``[profile] write_linked`` the sink that follows every ImagingStudy write with its
    Provenance (``ingest.relay.links.ProvenanceSink``; the Device and Organization are found or created on
    first use)."""
    if not settings.profile.write_linked:
        return sink
    from ingest import __version__
    from ingest.relay.links import Creator, ProvenanceSink

    backend = cast("LinkedSink", sink)  # the GraphQL sink is both
    return ProvenanceSink(sink, Creator(backend, settings.profile, __version__, clock=clock))


def relay_before_backend(
    settings: Settings,
    store: StateStore,
    sink: Sink,
    *,
    metrics: Metrics | None = None,
    clock: Callable[[], datetime] | None = None,
) -> Relay:
    """The relay before the backend can be reached (``ingest serve``: intake never waits for it).

    It maps without an Endpoint and links nothing until ``run_relay`` has wired it (:func:`wire_links`).
    ``clock``: source of "now" (default :func:`ingest.relay.relay.utcnow`).
    """
    from ingest.relay.build import StudyBuilder
    from ingest.relay.relay import Relay, utcnow

    sink = with_provenance(settings, sink, clock=clock or utcnow)
    return Relay(store, sink, StudyBuilder(mapping_options(settings),
                                           all_rejected_status=settings.intake.all_rejected_status),
                 settings.relay,
                 node=settings.state.node_id, clock=clock or utcnow, metrics=metrics,
                 narrative=settings.mapping.narrative)


async def wired_relay(
    settings: Settings,
    store: StateStore,
    sink: LinkedSink,
    *,
    metrics: Metrics | None = None,
    clock: Callable[[], datetime] | None = None,
) -> Relay:
    """The relay as every one-shot command wires it, over a connected sink.

    ``[endpoint]``: the Endpoint is found or created now and referenced from every ImagingStudy;
    ``[patient]``: subjects are resolved per study by the link hook. ``clock``: source of "now" (default
    :func:`ingest.relay.relay.utcnow`).
    """
    from ingest.relay.relay import Relay, utcnow

    build, link = await wire_links(settings, sink, metrics=metrics, store=store)
    relay_sink = with_provenance(settings, sink, clock=clock or utcnow)
    return Relay(store, relay_sink, build, settings.relay, node=settings.state.node_id, clock=clock or utcnow,
                 metrics=metrics, link=link, narrative=settings.mapping.narrative)


# --------------------------------------------------------------------------------------- commitment reports


def attach_commitment_reports(
    settings: Settings,
    store: StateStore,
    scp: CommitmentSCP,
    *,
    metrics: Metrics | None = None,
    timekeeper: Timekeeper | None = None,
) -> CommitmentReports:
    """The Storage Commitment report sender of ``scp`` (``[listener.commitment]``), attached to it: its
    reports go on the requester's association (the SCP's channel) or on a new association
    (:class:`ingest.adapters.dimse_scu.DimseReportSCU`). Started with the listener."""
    from ingest.adapters.dimse_scu import DimseReportSCU
    from ingest.relay.reports import CommitmentReports

    sender = CommitmentReports(
        store, [scp, DimseReportSCU.from_settings(settings.listener)], settings.listener.commitment,
        hold=scp.hold, owner=scp.owner, metrics=metrics, timekeeper=timekeeper,
    )
    scp.attach(sender)
    return sender
