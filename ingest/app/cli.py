"""Command line: ``ingest serve | replay | sync | watch | status | retry | reject | rejections | relink |
backend`` and the operator's commands (``check-config | check-store | init | backup | migrate``).

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
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any, TextIO

from ingest.config import Settings, load_settings, parse_duration
from ingest.errors import ConfigError, IngestError, RetryableSinkError
from ingest.exitcodes import ExitCode
from ingest.logs import markup_safe, printable, setup_logging

__all__ = ["build_parser", "main", "run"]

LOGGER = logging.getLogger("ingest.app.cli")

#: Where the settings file is looked for, in order, when ``--config`` is not given (README "Configuration").
CONFIG_ENV = "INGEST_CONFIG"
CONFIG_SEARCH = (Path("config/ingest.toml"), Path("/etc/ingest/ingest.toml"))


class _Version(argparse.Action):
    """``--version``: reads the installed version only when asked (importlib.metadata is slow to import)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from ingest import __version__

        sys.stdout.write(f"ingest {__version__}\n")  # on stdout, as argparse's own version action
        parser.exit()


def _duration_text(text: str) -> str:
    """An argparse type: ``text`` when it is a duration (``30s``, ``5m``), else the argument error."""
    try:
        parse_duration(text, key="--wait-backend")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ingest",
        description="DICOM in (C-STORE listener, drop folder, archive replay), FHIR R4 ImagingStudy out.",
        epilog=__doc__.split("Exit codes", 1)[1].join(["Exit codes", ""]) if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    parser.add_argument(
        "--config", type=Path, default=None,
        help=(f"settings file (default: ${CONFIG_ENV}, else the first of "
              f"{', '.join(map(str, CONFIG_SEARCH))} that exists, else built-in defaults)"),
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None,
        help="state database, spool, archive and quarantine (default ./data; env INGEST_DATA_DIR)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="less logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the service: listener, watcher, relay, admin, embedded backend")
    p.add_argument("--adopt-spool", action="store_true",
                   help="start although the state store is new or empty while spool/ holds files, and "
                   "admit every spool file again (after a lost state database)")
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
    p.add_argument("--bundle", choices=("plain", "mado"), default=None,
                   help="with --dry-run: print each study as a FHIR collection Bundle (ImagingStudy, "
                   "Patient, Endpoints; mado: also the creator Device and a Provenance)")
    p.add_argument(
        "--jobs", "-j", type=int, default=os.cpu_count() or 1, help="header-parsing processes"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--wait-backend", default="60s", metavar="DURATION", type=_duration_text,
        help="how long to wait for a backend that does not answer (30s, 5m, 1h; default 60s); then the "
             "studies not pushed stay pending for `ingest serve` or a later replay (exit 3)",
    )
    p.add_argument("--study", action="append", default=[], metavar="UID", help="only this Study Instance UID")
    p.add_argument("--since", type=date.fromisoformat, default=None, metavar="YYYY-MM-DD",
                   help="only studies with a Study Date on or after this date")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="read only shard K of N (1 <= K <= N): the files whose path relative to its PATH "
                        "argument hashes to K; N machines on one PostgreSQL state store replay one archive")
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
    p.add_argument("--adopt-spool", action="store_true",
                   help="start although the state store is new or empty while spool/ holds files, and "
                   "admit every spool file again (after a lost state database)")
    p.set_defaults(func=_cmd_watch)

    p = sub.add_parser("status", help="studies pending, pushed and dead (with the last error)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--state", choices=["pending", "pushed", "dead"], default=None)
    p.add_argument("--since", type=date.fromisoformat, default=None, metavar="YYYY-MM-DD",
                   help="studies whose last instance arrived on or after that day (UTC)")
    p.add_argument("--ae", default=None, help="studies a calling AE sent (some of) its instances from")
    p.add_argument("--limit", type=int, default=None,
                   help="at most this many studies, newest first (table default 50; --json: all)")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("retry", help="re-drive dead-lettered studies")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--study", metavar="UID")
    g.add_argument("--all", action="store_true")
    p.add_argument("--now", action="store_true", help="push them now instead of leaving it to `ingest serve`")
    p.set_defaults(func=_cmd_retry)

    p = sub.add_parser("reject", help="reject instances, a series or a study (IOCM, without a KOS)")
    p.add_argument("--study", metavar="UID", required=True)
    p.add_argument("--series", metavar="UID", default=None)
    p.add_argument("--instance", metavar="UID", default=None, help="one SOP Instance UID")
    p.add_argument("--code", required=True, metavar="CODE",
                   help="113001 quality, 113037 patient safety, 113038 worklist entry, 113039 retention")
    p.add_argument("--now", action="store_true",
                   help="write the study now instead of leaving it to `ingest serve`")
    p.add_argument("--force", action="store_true",
                   help="record the rejection of a study not received yet (else exit 1: a mistyped UID)")
    p.add_argument("--undo", action="store_true",
                   help="remove a rejection `ingest reject` recorded (bytes already removed stay removed)")
    p.set_defaults(func=_cmd_reject)

    p = sub.add_parser(
        "check-config",
        help="print the effective settings (secrets masked) and every problem found with them",
        description="Prints the effective settings as JSON on stdout (secrets masked) and each problem on "
                    "stderr, one line naming the setting: files, ports (whether they can be bound now), "
                    "tokens, the data dir. Exit 0 when none is found, 1 otherwise.",
    )
    p.add_argument("--command", dest="for_command", choices=("serve", "watch", "backend"), default="serve",
                   help="which command's ports to check (default serve)")
    p.set_defaults(func=_cmd_check_config)
    p = sub.add_parser("init", help="write a settings file and a private data dir into a folder")
    p.add_argument("folder", type=Path, help="where ingest.toml and data/ go (created 0700)")
    p.add_argument("--force", action="store_true", help="write ingest.toml anew when it exists")
    p.set_defaults(func=_cmd_init)
    p = sub.add_parser("backup", help="copy the SQLite state store while the service runs")
    p.add_argument("destination", type=Path, help="a new file (the copy is one self-contained SQLite file)")
    p.set_defaults(func=_cmd_backup)
    p = sub.add_parser("migrate", help="bring the state store's schema to this version's (or --check)")
    p.add_argument("--check", action="store_true",
                   help="only say whether a migration is needed (exit 1 when it is); change nothing")
    p.set_defaults(func=_cmd_migrate)
    p = sub.add_parser(
        "relink", help="link pushed studies whose order, visit or referrer is still a logical reference"
    )
    p.add_argument("--since", type=date.fromisoformat, default=None, metavar="YYYY-MM-DD",
                   help="only studies whose last instance arrived on or after that day (UTC)")
    p.add_argument("--study", default=None, metavar="UID", help="only this study")
    p.set_defaults(func=_cmd_relink)
    p = sub.add_parser(
        "check-store", help="check the state store: SQLite integrity_check, PostgreSQL schema",
        description="Run SQLite's full PRAGMA integrity_check on the state database (or, for PostgreSQL, "
        "check that ingest's schema and tables are there) without changing it. Exit 0: sound; 1: the "
        "problems are printed.",
    )
    p.set_defaults(func=_cmd_check_store)
    p = sub.add_parser("rejections", help="list recorded IOCM rejections (notes and `ingest reject`)")
    p.add_argument("--study", metavar="UID", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_rejections)
    p = sub.add_parser(
        "sync", help="index the studies a PACS holds (C-FIND or QIDO-RS answers), without moving pixels",
        description="Ask a PACS (dimse://CALLED_AE@HOST:PORT: C-FIND; http(s)://...: a DICOMweb root, "
        "QIDO-RS) for its studies, series and instances and write one ImagingStudy per study. Without "
        "--full (or dates) a run starts from the last run's watermark. Exit 0: done; 1: fatal or a query "
        "failed; 2: some answers refused; 3: some studies dead-lettered.",
    )
    p.add_argument("--from", dest="source_url", metavar="SOURCE", default=None,
                   help="dimse://CALLED_AE@HOST:PORT or an http(s):// DICOMweb root")
    p.add_argument("--name", default=None, help="a configured [[sync.sources]] name (or the name for --from)")
    p.add_argument("--calling-ae", default=None, help="calling AE title (default: [sync] calling_ae)")
    p.add_argument("--query-limit", type=int, default=None, metavar="N",
                   help="the PACS's answer cap (default: the source's, else [sync] query_limit)")
    p.add_argument("--since", type=date.fromisoformat, default=None, metavar="YYYY-MM-DD",
                   help="only studies with a Study Date on or after this date")
    p.add_argument("--until", type=date.fromisoformat, default=None, metavar="YYYY-MM-DD",
                   help="only studies with a Study Date on or before this date")
    p.add_argument("--study", action="append", default=[], metavar="UID", help="only this Study Instance UID")
    p.add_argument("--full", action="store_true",
                   help="ask for everything, not from the watermark (reconciles every study)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the ImagingStudy JSON (NDJSON), write nothing")
    p.add_argument("--pretty", action="store_true", help="with --dry-run: indented JSON")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_sync)

    p = sub.add_parser("backend", help="run the embedded FHIR GraphQL backend alone")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=_cmd_backend)
    return parser


def find_config(given: Path | None, environ: dict[str, str] | None = None) -> tuple[Path | None, str]:
    """The settings file to use and where it came from: ``--config``, then ``$INGEST_CONFIG``, then the
    first of :data:`CONFIG_SEARCH` that exists; ``(None, "built-in defaults")`` when there is none.

    A file named by ``--config`` or ``$INGEST_CONFIG`` must exist (``load_settings`` says so)."""
    env = os.environ if environ is None else environ
    if given is not None:
        return given, "--config"
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]), CONFIG_ENV
    for candidate in CONFIG_SEARCH:
        if candidate.is_file():
            return candidate, "found"
    return None, "built-in defaults"


def _settings(args: argparse.Namespace, config: Path | None) -> Settings:
    overrides: dict[str, Any] = {}
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    return load_settings(config, **overrides)


def _log_effective(settings: Settings, args: argparse.Namespace, config: Path | None, origin: str) -> None:
    # Every command's first line names the settings file and the data dir (an `ingest status` run from
    # another folder would otherwise read an empty ./data silently); the full settings are at DEBUG.
    where = f"{printable(str(config.absolute()))} ({origin})" if config is not None else origin
    LOGGER.info("ingest %s: settings %s, data dir %s", args.command, where,
                printable(str(settings.data_dir.resolve())))
    if args.command in ("serve", "watch"):
        LOGGER.info("%s", startup_summary(settings))
    LOGGER.debug("effective settings: %s", json.dumps(settings.masked(), sort_keys=True))


def startup_summary(settings: Settings) -> str:
    """One line: what the service listens on, whom it lets in, where it writes."""
    lst = settings.listener
    if lst.enabled:
        aes = ("any calling AE" if lst.accept_any_calling_ae
               else ", ".join(printable(a.ae) for a in lst.allowed_calling_aes) or "no calling AE")
        listener = (f"listener {printable(lst.ae_title)} on {lst.host}:{lst.port}"
                    f"{' (TLS)' if lst.tls.enabled else ''}, allowing {aes}")
    else:
        listener = "listener off"
    backend = (f"backend {printable(settings.backend.url)}" if settings.backend.url else
               f"embedded backend on {settings.embedded_backend.host}:{settings.embedded_backend.port}")
    watch = f", watching {printable(str(settings.watch.folder))}" if settings.watch.folder else ""
    from ingest.adapters.state import sqlite_path

    lite = sqlite_path(settings.state.url, settings.data_dir)
    state = "state store PostgreSQL" if lite is None else f"state store SQLite {printable(str(lite))}"
    admin = f", admin on {settings.admin.host}:{settings.admin.port}" if settings.admin.enabled else ""
    return f"{listener}{watch}; {backend}; {state}{admin}"


async def run(args: argparse.Namespace) -> int:
    from ingest.adapters.datadir import private_umask, tighten

    # Before anything is created: the data dir holds patient data (state store, backend, spool), so
    # every file this process creates is 0600 and every folder 0700 from the start, SQLite's -wal/-shm
    # included, with no window where a chmod has not happened yet.
    private_umask()
    config, origin = find_config(args.config)
    settings = _settings(args, config)
    setup_logging(settings.log.level, settings.log.format, args.verbose - args.quiet)
    _log_effective(settings, args, config, origin)
    try:
        tighten(settings.data_dir)  # what an earlier version or a restore left readable by others
    except OSError as exc:
        raise ConfigError(
            f"data dir {settings.data_dir}: cannot make it private: {exc.strerror or exc}"
        ) from exc
    dry = getattr(args, "dry_run", False)
    if settings.state.node_id is None and args.command in _NODE_COMMANDS and not dry:
        # one id per data dir across restarts (leases, spool ownership, `ingest status` per node)
        from ingest.adapters.datadir import stable_node_id

        node = stable_node_id(settings.data_dir)
        settings = settings.model_copy(update={"state": settings.state.model_copy(update={"node_id": node})})
    result: int = await args.func(args, settings)
    return result


#: Commands that claim studies or receive instances as a node of the state store.
_NODE_COMMANDS = frozenset({"serve", "watch", "replay", "retry", "reject"})


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
    from ingest.app.replay import ReplayOptions, ReplaySummary, run_replay
    from ingest.sources.replay import ShardError, parse_shard

    try:
        shard = parse_shard(args.shard) if args.shard is not None else None
    except ShardError as exc:
        print(f"ingest replay: {printable(str(exc))}", file=sys.stderr)
        return int(ExitCode.FATAL)
    opts = ReplayOptions(
        paths=list(args.paths),
        dry_run=args.dry_run,
        pretty=args.pretty,
        bundle=args.bundle,
        jobs=max(1, args.jobs),
        studies=frozenset(args.study),
        since=args.since,
        wait_backend_s=parse_duration(args.wait_backend, key="--wait-backend").total_seconds(),
        shard=shard,
    )
    if args.bundle and not args.dry_run:
        print("ingest replay: --bundle needs --dry-run", file=sys.stderr)
        return int(ExitCode.FATAL)
    summary = ReplaySummary()
    try:
        await run_replay(settings, opts, stdout=sys.stdout, stderr=sys.stderr, summary=summary)
    except (KeyboardInterrupt, asyncio.CancelledError):
        # Ctrl-C: what is stored stays stored; a rerun skips the files already stored unchanged
        done = ("nothing was written (dry run)" if args.dry_run else
                f"{summary.accepted} new instance(s) were stored; run the same command again to go on "
                "(files already stored are not read again)")
        print(f"\ningest replay: interrupted after {summary.files} file(s): {done}", file=sys.stderr)
        raise KeyboardInterrupt from None
    if summary.studies.get("pending"):
        print(f"ingest replay: {summary.studies['pending']} stud"
              f"{'y' if summary.studies['pending'] == 1 else 'ies'} left pending: the backend did not answer "
              f"within --wait-backend {printable(args.wait_backend)}; they are kept in the state store, and "
              "`ingest serve` or a later `ingest replay` pushes them", file=sys.stderr)
    if summary.files == 0:
        shown = ", ".join(printable(str(p)) for p in args.paths)
        print(f"ingest replay: no DICOM files found in {shown}: nothing to do", file=sys.stderr)
    if args.json:
        print(json.dumps(summary.as_dict(), sort_keys=True), file=sys.stderr if args.dry_run else sys.stdout)
    elif not args.dry_run or sys.stderr.isatty():
        _print_table("ingest replay", summary.rows(), sys.stderr if args.dry_run else sys.stdout)
    return summary.exit_code()


async def _cmd_sync(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.app.sync import SyncOptions, run_sync

    opts = SyncOptions(
        url=args.source_url, name=args.name, calling_ae=args.calling_ae, query_limit=args.query_limit,
        since=args.since, until=args.until,
        studies=frozenset(args.study), full=args.full, dry_run=args.dry_run, pretty=args.pretty,
    )
    summary = await run_sync(settings, opts, stdout=sys.stdout, stderr=sys.stderr)
    if args.json:
        print(json.dumps(summary.as_dict(), sort_keys=True), file=sys.stderr if args.dry_run else sys.stdout)
    elif not args.dry_run or sys.stderr.isatty():
        _print_table("ingest sync", summary.rows(), sys.stderr if args.dry_run else sys.stdout)
    return summary.exit_code()


async def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.app.status import run_status
    from ingest.app.wiring import store_missing

    if store_missing(settings):
        # an `ingest status` from another folder would read (and create) an empty ./data silently
        print(f"ingest status: no state store in data dir {printable(str(settings.data_dir.resolve()))}: "
              "run it where the service runs, or name the service's settings (--config, $INGEST_CONFIG) "
              "or data dir (--data-dir)", file=sys.stderr)
        return int(ExitCode.FATAL)

    return await run_status(settings, state=args.state, as_json=args.json, since=args.since, ae=args.ae,
                            limit=None if args.limit is None else max(0, args.limit))


async def _cmd_reject(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.app.reject import run_reject

    return await run_reject(settings, study=args.study, series=args.series, instance=args.instance,
                            code=args.code, push_now=args.now, force=args.force, undo=args.undo)


async def _cmd_rejections(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.app.reject import run_rejections

    return await run_rejections(settings, study=args.study, as_json=args.json)


async def _cmd_retry(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.app.wiring import open_sink, open_store, wired_relay
    from ingest.ports import StudyState
    from ingest.relay.relay import utcnow

    store = open_store(settings)
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
        try:
            async with open_sink(settings) as sink:
                relay = await wired_relay(settings, store, sink)
                await relay.drain(dead)
        except RetryableSinkError as exc:  # re-queued all the same: pushed once the backend is back
            print(f"ingest: the backend is unavailable now, the re-queued studies stay pending: "
                  f"{printable(str(exc))}", file=sys.stderr)
            return ExitCode.OK
        still = [u for u in dead if (row := store.study(u)) is not None and row.state is StudyState.DEAD]
        for u in still:
            row = store.study(u)
            why = printable(row.last_error if row else "")
            print(f"study {printable(u)}: still dead: {why}", file=sys.stderr)
        return ExitCode.DEAD if still else ExitCode.OK
    finally:
        store.close()


async def _cmd_check_config(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.adapters.datadir import lock_holder
    from ingest.app.preflight import problems

    print(json.dumps(settings.masked(), indent=2, sort_keys=True))
    found = problems(settings, command=args.for_command)
    holder = lock_holder(settings.data_dir)
    if holder is not None:
        shown = printable(str(settings.data_dir))
        found.append(f"data dir {shown}: in use by a running ingest (pid {holder})")
    for problem in found:
        print(f"ingest check-config: {problem}", file=sys.stderr)
    if not found:
        print("ingest check-config: no problems found", file=sys.stderr)
    return int(ExitCode.FATAL if found else ExitCode.OK)


async def _cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.app.operate import run_init

    return run_init(args.folder, force=args.force)


async def _cmd_backup(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.app.operate import run_backup

    return await asyncio.to_thread(run_backup, settings, args.destination)


async def _cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.app.operate import run_migrate

    return await asyncio.to_thread(run_migrate, settings, check=args.check)


async def _cmd_relink(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.app.relink import run_relink

    return await run_relink(settings, since=args.since, study=args.study)


async def _cmd_backend(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.app.wiring import embedded_backend

    stop = _stop_event()
    async with embedded_backend(settings, port=args.port) as url:
        LOGGER.info("embedded FHIR GraphQL backend listening on %s", url)
        await stop.wait()
    return ExitCode.OK


async def _cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.app.serve import serve

    return await serve(settings, _stop_event(), adopt_spool=args.adopt_spool)


async def _cmd_check_store(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.app.startup import check_store

    what, problems = await asyncio.to_thread(check_store, settings)
    if not problems:
        print(f"state store {printable(what)}: ok")
        return ExitCode.OK
    print(f"state store {printable(what)}: {len(problems)} problem(s)", file=sys.stderr)
    for problem in problems:
        print(f"  {printable(problem)}", file=sys.stderr)
    return ExitCode.FATAL


async def _cmd_watch(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.app.serve import serve

    given = {"folder": args.folder, "poll": args.poll, "after": args.after}
    watch = settings.watch.model_copy(update={k: v for k, v in given.items() if v is not None})
    listener = settings.listener.model_copy(update={"enabled": False})
    return await serve(settings.model_copy(update={"watch": watch, "listener": listener}), _stop_event(),
                       adopt_spool=args.adopt_spool)


def _stop_event() -> asyncio.Event:
    """An event set on SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop
