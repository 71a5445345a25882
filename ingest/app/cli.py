"""Command line: ``ingest serve | replay | status | retry | backend``.

Exit codes (all commands):

  0  success
  1  fatal error (bad configuration, unusable data dir or store, backend schema unusable)
  2  some inputs were rejected (each named on stderr with its reason); everything else was processed
  3  some studies could not be written (dead-lettered; see ``ingest status``)
  130 interrupted
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ingest import __version__
from ingest.config import Settings, load_settings
from ingest.errors import ConfigError, IngestError
from ingest.exitcodes import ExitCode
from ingest.logs import markup_safe, printable, setup_logging
from ingest.ports import StudyRow

if TYPE_CHECKING:  # gql and aiohttp are imported only by the commands that talk to a backend
    from ingest.adapters.graphql.sink import GraphQLSink

__all__ = ["build_parser", "main", "node_summary", "run"]

LOGGER = logging.getLogger("ingest.app.cli")

_DEFAULT_CONFIG = Path("config/ingest.toml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ingest",
        description="DICOM in (C-STORE listener, drop folder, archive replay), FHIR R4 ImagingStudy out.",
        epilog=__doc__.split("Exit codes", 1)[1].join(["Exit codes", ""]) if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ingest {__version__}")
    parser.add_argument(
        "--config", type=Path, default=None,
        help=f"settings file (default: {_DEFAULT_CONFIG} if it exists, else built-in defaults)",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None,
        help="state database, spool, archive and quarantine (default ./data; env INGEST_DATA_DIR)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the service: listener, watcher, relay, admin, embedded backend")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "replay", help="ingest files, folders and archives, push their studies, print a summary",
        description="Read DICOM files, folders (recursively) and .zip/.tar/.tar.gz archives; push every "
        "study to the backend once its input has been read. Exit 0: all accepted and written; 2: some inputs "
        "rejected; 3: some studies dead-lettered; 1: fatal error.",
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument(
        "--dry-run", action="store_true", help="print the ImagingStudy JSON (NDJSON) instead of writing"
    )
    p.add_argument("--pretty", action="store_true", help="with --dry-run: indented JSON")
    p.add_argument(
        "--jobs", "-j", type=int, default=os.cpu_count() or 1, help="header-parsing processes"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--study", action="append", default=[], metavar="UID", help="only this Study Instance UID")
    p.add_argument("--since", type=date.fromisoformat, default=None, metavar="YYYY-MM-DD",
                   help="only studies with a Study Date on or after this date")
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser(
        "watch", help="watch a drop folder and push its studies (relay and backend as serve, no listener)",
        description="Ingest every file dropped into DIR once it has settled (see [watch] in the config), "
        "then move, delete or keep it; rejected files go to <data-dir>/quarantine with a side file. "
        "Runs until SIGTERM or Ctrl-C.",
    )
    p.add_argument("folder", type=Path, metavar="DIR")
    p.add_argument("--poll", action="store_true", default=None,
                   help="poll instead of inotify (network shares where events do not arrive)")
    p.add_argument("--after", choices=["move", "delete", "keep"], default=None,
                   help="what to do with an ingested file (default: [watch] after)")
    p.set_defaults(func=_cmd_watch)

    p = sub.add_parser("status", help="studies pending, pushed and dead (with the last error)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--state", choices=["pending", "pushed", "dead"], default=None)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("retry", help="re-drive dead-lettered studies")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--study", metavar="UID")
    g.add_argument("--all", action="store_true")
    p.add_argument("--now", action="store_true", help="push them now instead of leaving it to `ingest serve`")
    p.set_defaults(func=_cmd_retry)

    p = sub.add_parser("backend", help="run the embedded FHIR GraphQL backend alone")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=_cmd_backend)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    config = args.config
    if config is None and _DEFAULT_CONFIG.is_file():
        config = _DEFAULT_CONFIG
    overrides: dict[str, Any] = {}
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    return load_settings(config, **overrides)


def _log_effective(settings: Settings, command: str) -> None:
    # The service logs its effective settings at INFO; one-shot commands at DEBUG (stderr stays readable).
    level = logging.INFO if command in ("serve", "backend") else logging.DEBUG
    LOGGER.log(level, "effective settings: %s", json.dumps(settings.masked(), sort_keys=True))


async def run(args: argparse.Namespace) -> int:
    from ingest.adapters.datadir import private_umask, tighten

    # Before anything is created: the data dir holds patient data (state store, backend, spool), so
    # every file this process creates is 0600 and every folder 0700 from the start, SQLite's -wal/-shm
    # included, with no window where a chmod has not happened yet.
    private_umask()
    settings = _settings(args)
    setup_logging(settings.log.level, settings.log.format, args.verbose - args.quiet)
    _log_effective(settings, args.command)
    try:
        tighten(settings.data_dir)  # what an earlier version or a restore left readable by others
    except OSError as exc:
        raise ConfigError(
            f"data dir {settings.data_dir}: cannot make it private: {exc.strerror or exc}"
        ) from exc
    result: int = await args.func(args, settings)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args))
    except ConfigError as exc:
        print(f"ingest: configuration error: {printable(exc)}", file=sys.stderr)
        return ExitCode.FATAL
    except IngestError as exc:
        print(f"ingest: {printable(exc)}", file=sys.stderr)
        return ExitCode.FATAL
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # `ingest replay --dry-run | head`: the reader left; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.FATAL


# --------------------------------------------------------------------------------------- helpers


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
    from ingest.adapters.graphql.sink import GraphQLSink, TokenSource, load_schema_file

    url = settings.backend.url
    schema: str | None = None
    ca: Path | None = None
    if url is None:
        url = await stack.enter_async_context(embedded_backend(settings, port=embedded_port))
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
    sink = GraphQLSink(
        url, token_source=token_source, timeout_s=settings.backend.timeout_s, schema=schema, ca=ca
    )
    stack.push_async_callback(sink.aclose)  # idempotent; a failed connect has closed it already
    return sink


async def connect_with_backoff(sink: Any, settings: Settings) -> None:
    """Connect the sink; a backend that is down at start is retried like a push (``[relay]`` backoff).

    Returns at once when ``sink`` is connected already.

    Raises
    ------
    RetryableSinkError
        Still unreachable after ``[relay] max_attempts`` attempts.
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
            if attempt >= cfg.max_attempts:
                raise
            delay = backoff_delay(attempt, cfg.base_backoff_s, cfg.max_backoff_s)
            LOGGER.warning(
                "backend unreachable at start (attempt %d of %d), next try in %.1f s: %s",
                attempt, cfg.max_attempts, delay, exc,
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


def _print_table(title: str, rows: list[tuple[str, Any]], out: TextIO) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, value in rows:
        table.add_row(markup_safe(name), markup_safe(value))
    Console(file=out).print(table)


# --------------------------------------------------------------------------------------- commands


async def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.app.replay import ReplayOptions, run_replay

    opts = ReplayOptions(
        paths=list(args.paths),
        dry_run=args.dry_run,
        pretty=args.pretty,
        jobs=max(1, args.jobs),
        studies=frozenset(args.study),
        since=args.since,
    )
    summary = await run_replay(settings, opts, stdout=sys.stdout, stderr=sys.stderr)
    if args.json:
        print(json.dumps(summary.as_dict(), sort_keys=True), file=sys.stderr if args.dry_run else sys.stdout)
    elif not args.dry_run or sys.stderr.isatty():
        _print_table("ingest replay", summary.rows(), sys.stderr if args.dry_run else sys.stdout)
    return summary.exit_code()


async def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.adapters.state.sqlite import open_state_store
    from ingest.ports import StudyState

    store = open_state_store(settings.state.url, settings.data_dir, node=settings.state.node_id)
    try:
        rows = store.studies(StudyState(args.state) if args.state else None)
        # the reason code of each dead letter (multiple_matches, rejected, ...), when the store keeps it
        dead_reason = getattr(store, "dead_reason", None)
        reasons: dict[str, str | None] = {
            r.study_uid: dead_reason(r.study_uid) if callable(dead_reason) else None
            for r in rows
            if r.state is StudyState.DEAD
        }
    finally:
        store.close()
    counts = Counter(r.state.value for r in rows)
    now = datetime.now(UTC)
    nodes = node_summary(rows, now)
    if args.json:
        print(json.dumps({
            "counts": {s.value: counts.get(s.value, 0) for s in StudyState},
            "nodes": nodes,
            "studies": [
                {
                    "study_uid": r.study_uid, "state": r.state.value, "reason": reasons.get(r.study_uid),
                    "instances": r.instances,
                    "dirty": r.dirty, "attempts": r.attempts, "backend_id": r.backend_id,
                    "version_id": r.version_id, "last_error": r.last_error,
                    "next_attempt_at": r.next_attempt_at.isoformat() if r.next_attempt_at else None,
                    "pushed_at": r.pushed_at.isoformat() if r.pushed_at else None,
                    "lease_owner": r.lease_owner,
                    "lease_expires": r.lease_expires.isoformat() if r.lease_expires else None,
                    "lease_active": _lease_active(r, now),
                }
                for r in rows
            ],
        }, indent=2))
        return ExitCode.OK
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ingest status — {sum(counts.values())} studies "
                  + ", ".join(f"{s.value} {counts.get(s.value, 0)}" for s in StudyState))
    for col in ("Study Instance UID", "state", "instances", "attempts", "node (lease)", "backend id",
                "last error"):
        table.add_column(col)
    for r in rows:
        holder = ""
        if r.lease_owner:
            holder = r.lease_owner + ("" if _lease_active(r, now) else " (expired)")
        # untrusted text (backend messages, node names): escaped, and rich markup in it shown as is
        table.add_row(markup_safe(r.study_uid), r.state.value + (" (dirty)" if r.dirty else ""),
                      str(r.instances), str(r.attempts), markup_safe(holder), markup_safe(r.backend_id or ""),
                      markup_safe((r.last_error or "")[:120]))
    console = Console()
    console.print(table)
    if nodes:
        per_node = Table(title="nodes holding leases")
        for col in ("node", "active leases", "expired leases", "lease ends"):
            per_node.add_column(col)
        for n in nodes:
            per_node.add_row(markup_safe(n["node"]), str(n["active_leases"]), str(n["expired_leases"]),
                             n["lease_ends"] or "")
        console.print(per_node)
    return ExitCode.OK


def _lease_active(row: StudyRow, now: datetime) -> bool:
    return row.lease_owner is not None and row.lease_expires is not None and row.lease_expires > now


def node_summary(rows: Sequence[StudyRow], now: datetime) -> list[dict[str, Any]]:
    """Per-node activity in a (shared) state store, from the lease columns of ``rows``.

    Parameters
    ----------
    rows:
        Studies as :meth:`ingest.ports.StateStore.studies` returns them.
    now:
        The time leases are judged against (timezone-aware).

    Returns
    -------
    list of dict
        One entry per lease owner, sorted by name: ``node``, ``active_leases`` (studies it is pushing
        now), ``expired_leases`` (claims it left behind, e.g. a node that died; other nodes take them
        over) and ``lease_ends`` (ISO time of its latest active lease, or ``None``).
    """
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.lease_owner is None:
            continue
        entry = out.setdefault(
            r.lease_owner,
            {"node": r.lease_owner, "active_leases": 0, "expired_leases": 0, "lease_ends": None},
        )
        if _lease_active(r, now):
            assert r.lease_expires is not None
            entry["active_leases"] += 1
            ends = r.lease_expires.isoformat()
            entry["lease_ends"] = max(entry["lease_ends"] or ends, ends)
        else:
            entry["expired_leases"] += 1
    return [out[k] for k in sorted(out)]


async def _cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.adapters.state.sqlite import open_state_store
    from ingest.ports import StudyState
    from ingest.relay.relay import utcnow, wired_relay

    store = open_state_store(settings.state.url, settings.data_dir, node=settings.state.node_id)
    try:
        dead = [r.study_uid for r in store.studies(StudyState.DEAD)
                if args.all or r.study_uid == args.study]
        if args.study and not dead:
            print(f"ingest: study {printable(args.study)} is not dead-lettered", file=sys.stderr)
            return ExitCode.FATAL
        n = store.retry_dead(None if args.all else args.study, utcnow())
        print(f"{n} dead-lettered studies re-queued")
        if not args.now or not n:
            return ExitCode.OK
        async with open_sink(settings) as sink:
            relay = await wired_relay(settings, store, sink)
            await relay.drain(dead)
        still = [u for u in dead if (row := store.study(u)) is not None and row.state is StudyState.DEAD]
        for u in still:
            row = store.study(u)
            why = printable(row.last_error if row else "")
            print(f"study {printable(u)}: still dead: {why}", file=sys.stderr)
        return ExitCode.DEAD if still else ExitCode.OK
    finally:
        store.close()


async def _cmd_backend(args: argparse.Namespace, settings: Settings) -> int:
    stop = _stop_event()
    async with embedded_backend(settings, port=args.port) as url:
        LOGGER.info("embedded FHIR GraphQL backend listening on %s", url)
        await stop.wait()
    return ExitCode.OK


async def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.app.serve import serve

    return await serve(settings, _stop_event())


async def _cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.app.serve import serve

    given = {"folder": args.folder, "poll": args.poll, "after": args.after}
    watch = settings.watch.model_copy(update={k: v for k, v in given.items() if v is not None})
    listener = settings.listener.model_copy(update={"enabled": False})
    return await serve(settings.model_copy(update={"watch": watch, "listener": listener}), _stop_event())


def _stop_event() -> asyncio.Event:
    """An event set on SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop
