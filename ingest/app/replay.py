"""``ingest replay``: wires the replay source (:mod:`ingest.sources.replay`) to the state store and the
relay, drains the studies its input touched at the end, and reports (progress, rejected inputs, summary).
``--dry-run`` maps the parsed studies and prints them instead, writing nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ingest.config import Settings
from ingest.core.admission import CONFLICT_OTHER_STUDY, Existing, Verdict, decide
from ingest.core.datetimes import parse_da
from ingest.core.records import InstanceRecord
from ingest.exitcodes import ExitCode
from ingest.logs import printable
from ingest.ports import StateStore, StudyState
from ingest.sources.parse import Parsed, Rejected
from ingest.sources.replay import (
    Dated,
    ReplayCaps,
    ReplaySource,
    ReplayTotals,
    Shard,
    parse_replay,
    relative_key,
)

if TYPE_CHECKING:  # the pipeline (mapping, FHIR models) is imported when needed, after parsing has started
    from ingest.adapters.graphql.sink import GraphQLSink
    from ingest.relay.relay import Relay

__all__ = ["ReplayOptions", "ReplaySummary", "run_replay"]

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayOptions:
    paths: list[Path]
    dry_run: bool = False
    pretty: bool = False
    bundle: str | None = None  # --bundle plain|mado (with dry_run): a FHIR Bundle per study
    jobs: int = 1
    studies: frozenset[str] = frozenset()
    since: date | None = None
    # --wait-backend: how long the backend may stay unreachable (connecting, or failing transiently)
    # before the replay stops waiting and leaves the studies not pushed yet pending (exit 3)
    wait_backend_s: float = 60.0
    # --shard K/N: only the files whose path (relative to its argument) hashes to shard K
    shard: Shard | None = None


@dataclass
class ReplaySummary(ReplayTotals):
    """The source's counts (:class:`~ingest.sources.replay.ReplayTotals`) and the studies' outcomes."""

    studies: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "files_unchanged": self.unchanged_files,
            "instances": {
                "accepted": self.accepted,
                "duplicate": self.duplicate,
                "filtered": self.filtered,
                "rejected": sum(self.rejected.values()),
                "rejected_by_reason": dict(sorted(self.rejected.items())),
            },
            "studies": {
                k: self.studies.get(k, 0)
                for k in ("created", "updated", "unchanged", "dead", "pending", "printed")
            },
            "seconds": round(self.seconds, 3),
        }

    def rows(self) -> list[tuple[str, Any]]:
        rows: list[tuple[str, Any]] = [("files read", self.files - self.unchanged_files)]
        if self.unchanged_files:
            rows.append(("files unchanged (not read again)", self.unchanged_files))
        for k in ("created", "updated", "unchanged", "dead", "printed"):
            if self.studies.get(k) or k in ("created", "updated", "unchanged", "dead"):
                rows.append((f"studies {k}", self.studies.get(k, 0)))
        rows += [("instances accepted", self.accepted), ("instances duplicate", self.duplicate)]
        if self.filtered:
            rows.append(("instances filtered out", self.filtered))
        rows.append(("instances rejected", sum(self.rejected.values())))
        rows += [(f"  rejected: {reason}", n) for reason, n in sorted(self.rejected.items())]
        rows.append(("seconds", f"{self.seconds:.2f}"))
        return rows

    def exit_code(self) -> ExitCode:
        if self.studies.get("dead") or self.studies.get("pending"):
            return ExitCode.DEAD
        if self.rejected:
            return ExitCode.REJECTED
        return ExitCode.OK


def _wanted(record: Dated, opts: ReplayOptions) -> bool:
    if opts.studies and record.study_uid not in opts.studies:
        return False
    if opts.since is not None:
        d = parse_da(record.study_date or "")
        if d is None or d < opts.since:
            return False
    return True


class _Progress:
    """A progress bar on a terminal (files read of the total, rate, ETA); plain periodic lines otherwise.

    The total is counted by a thread that walks the folders given (archives' members are not counted
    ahead: with an archive among the inputs the bar shows the files read and the rate, no total). While
    the bar is shown, log records and the per-file "rejected" lines are printed above it, never into it.
    """

    def __init__(self, stderr: TextIO, summary: ReplaySummary, opts: ReplayOptions) -> None:
        self.summary = summary
        self.stderr = stderr
        self.opts = opts
        self.tty = stderr.isatty()
        self.start = time.perf_counter()
        self.last = self.start
        self._progress: Any = None
        self._task: Any = None
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []
        self._total: int | None = None
        self._counting = False
        self._lines: Any = None

    @property
    def out(self) -> TextIO:
        """Where a line goes while the bar is shown (above it)."""
        return self._lines if self._lines is not None else self.stderr

    def __enter__(self) -> _Progress:
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=Console(file=self.stderr, stderr=self.stderr is sys.stderr),
                transient=True, redirect_stderr=False, redirect_stdout=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("files", total=None, rate="")
            self._lines = _ConsoleLines(self._progress.console)
            # log records go through the bar's console, which prints them above the bar
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream in (
                    self.stderr, sys.__stderr__
                ):
                    self._handlers.append((handler, handler.setStream(self._lines)))
            if all(not archives_path(p) for p in self.opts.paths):
                self._counting = True
                threading.Thread(target=self._count, name="replay-count", daemon=True).start()
        return self

    def _count(self) -> None:
        from ingest.adapters.folders import iter_dicom_files

        total = 0
        shard = self.opts.shard
        for path in self.opts.paths:
            for found in iter_dicom_files(path):
                if shard is not None and not shard.owns(relative_key(path, found)):
                    continue
                total += 1
                if not self._counting:  # the replay ended first
                    return
        self._total = total

    def update(self, studies: int) -> None:
        s = self.summary
        now = time.perf_counter()
        rate = s.files / max(now - self.start, 1e-6)
        rejected = sum(s.rejected.values())
        if self._progress is not None:
            self._progress.update(
                self._task, completed=s.files, total=self._total,
                description=f"{studies} studies, {rejected} rejected, files", rate=f"{rate:.0f} files/s",
            )
        elif now - self.last >= 5.0:
            self.last = now
            print(f"ingest replay: {s.files} files ({rate:.0f}/s), {studies} studies, {rejected} rejected",
                  file=self.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        self._counting = False
        if self._lines is not None:
            self._lines.flush()
        if self._progress is not None:
            self._progress.__exit__(None, None, None)
            for handler, previous in self._handlers:
                if previous is not None:
                    handler.setStream(previous)
            self._handlers.clear()


class _ConsoleLines:
    """A text stream whose complete lines are printed by a rich console (above its live display)."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            # already escaped by ingest's formatters; printed as it is (no markup, no highlighting)
            self.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self.write("\n")


def archives_path(path: Path) -> bool:
    """Whether ``path`` is an archive input (its members are not counted ahead for the bar)."""
    from ingest.sources import archives

    return archives.is_archive(path)


def _caps(settings: Settings) -> ReplayCaps:
    """Replay parses under the caps the listener and the watcher apply."""
    return ReplayCaps(settings.listener.max_inflated_bytes, settings.listener.max_rejection_items)


def _report_rejected(r: Rejected, stderr: TextIO) -> None:
    # file and member names, and messages quoting them, are untrusted: one escaped line per input
    print(f"rejected: {printable(r.label)}: {printable(r.reason)}: {printable(r.message)}", file=stderr)


async def run_replay(
    settings: Settings, opts: ReplayOptions, *, stdout: TextIO, stderr: TextIO,
    summary: ReplaySummary | None = None,
) -> ReplaySummary:
    """Read every input, then push (or print, with ``dry_run``) every study it carried.

    ``summary`` (a new one by default) is filled as the replay goes, so that a caller interrupted
    meanwhile can still say what was read and stored.
    """
    summary = ReplaySummary() if summary is None else summary
    started = time.perf_counter()
    if opts.dry_run:
        await asyncio.to_thread(_dry_run, settings, opts, summary, stdout, stderr)
    else:
        await _replay(settings, opts, summary, stderr)
    summary.seconds = time.perf_counter() - started
    return summary


# Dry run: a study that has had no new instance for this many files is mapped while parsing goes on
# (its JSON is kept, and reused at the end if the study did not change since).
_QUIET_FILES = 256
_PROGRESS_EVERY = 32


def _dry_run(
    settings: Settings, opts: ReplayOptions, summary: ReplaySummary, stdout: TextIO, stderr: TextIO
) -> None:
    studies: dict[str, dict[str, tuple[str, InstanceRecord]]] = {}
    owner: dict[str, str] = {}  # SOP Instance UID -> Study Instance UID
    last_seen: dict[str, int] = {}  # Study Instance UID -> files read when it last grew (unmapped ones)
    mapped: dict[str, tuple[int, str]] = {}  # Study Instance UID -> (instances, JSON) when mapped

    def to_json(uid: str) -> str:
        records = [rec for _, rec in studies[uid].values()]
        if opts.bundle in ("plain", "mado"):  # docs/mapping.md "Imaging profiles"
            from ingest.app.bundle import study_bundle

            study = study_bundle(settings, records, "mado" if opts.bundle == "mado" else "plain")
        else:
            from ingest.app.bundle import dry_run_study

            study = dry_run_study(settings, records)
        return json.dumps(study, ensure_ascii=False, indent=2 if opts.pretty else None)

    # the caller parses too (--jobs N: N processes in all); this thread has nothing else to do
    results = parse_replay(opts.paths, _caps(settings), jobs=opts.jobs, shard=opts.shard, caller_parses=True)
    with _Progress(stderr, summary, opts) as progress:
        for result in results:
            summary.files += 1
            if isinstance(result, Rejected):
                summary.rejected[result.reason] += 1
                _report_rejected(result, progress.out)
            elif not _wanted(result.record, opts):
                summary.filtered += 1
            elif _collect(studies, owner, result, summary, progress.out):
                last_seen[result.record.study_uid] = summary.files
            if summary.files % _QUIET_FILES == 0:  # map the studies that have stopped growing
                for uid in [u for u, seen in last_seen.items() if summary.files - seen >= _QUIET_FILES]:
                    del last_seen[uid]
                    mapped[uid] = (len(studies[uid]), to_json(uid))
            if summary.files % _PROGRESS_EVERY == 0:
                progress.update(len(studies))
        progress.update(len(studies))
    for uid in sorted(studies):
        done = mapped.get(uid)
        # the mapping is a pure function of the study's records, which only ever grow
        text = done[1] if done is not None and done[0] == len(studies[uid]) else to_json(uid)
        stdout.write(text + "\n")
        summary.studies["printed"] += 1
    stdout.flush()


def _collect(
    studies: dict[str, dict[str, tuple[str, InstanceRecord]]],
    owner: dict[str, str],
    parsed: Parsed,
    summary: ReplaySummary,
    stderr: TextIO,
) -> bool:
    """Add a dry run's parsed instance to its study; ``True`` when the study gained an instance.

    What is new, a duplicate or a conflict is decided as the state store decides it
    (:func:`ingest.core.admission.decide`), against the instances collected so far.
    """
    rec = parsed.record
    held_in = owner.get(rec.sop_uid)  # the study holding this SOP Instance UID, if any
    found = None
    if held_in is not None:
        digest, record = studies[held_in][rec.sop_uid]
        found = Existing(held_in, digest, record)
    decision = decide(found, rec, parsed.digest)
    if decision.verdict is Verdict.ADDED:
        owner[rec.sop_uid] = rec.study_uid
        studies.setdefault(rec.study_uid, {})[rec.sop_uid] = (parsed.digest, rec)
        summary.accepted += 1
        return True
    if decision.verdict is Verdict.DUPLICATE:
        summary.duplicate += 1
        return False
    summary.rejected["conflict"] += 1
    if decision.detail == CONFLICT_OTHER_STUDY:
        why = f"SOP Instance UID {rec.sop_uid} already seen in study {held_in}"
    else:
        why = f"SOP Instance UID {rec.sop_uid} seen before with other content; kept the first"
    _report_rejected(Rejected(parsed.label, "conflict", why), stderr)
    return False


async def _prepare_sink(
    settings: Settings, stack: contextlib.AsyncExitStack, reading: asyncio.Event
) -> tuple[GraphQLSink, bool]:
    """Start the backend (when embedded) and try once to connect its sink, while the input is read;
    the sink, and whether it connected.

    Waits for ``reading`` first: the parsing processes are forked by then, not while this thread imports.
    A backend that cannot be reached yet is retried (with backoff) once the input is read, as before.
    """
    await reading.wait()
    from ingest.app.wiring import start_sink
    from ingest.errors import RetryableSinkError
    from ingest.relay.build import StudyBuilder  # noqa: F401  (mapping, FHIR models: loaded meanwhile too)

    sink = await start_sink(settings, stack, embedded_port=0)
    try:
        await sink.connect()
    except RetryableSinkError:
        return sink, False
    return sink, True


async def _relay(settings: Settings, store: StateStore, sink: GraphQLSink) -> Relay:
    """A replay's relay, over a connected sink (``[endpoint]`` / ``[patient]`` need the backend). A
    backend that fails for now is waited for (``--wait-backend``), never a reason to dead-letter."""
    from ingest.app.wiring import wired_relay

    relay = await wired_relay(settings, store, sink)
    relay.transient_dead_letters = False
    return relay


async def _push_early(
    settings: Settings, store: StateStore, sink_ready: asyncio.Future[tuple[GraphQLSink, bool]],
    quiet: asyncio.Queue[set[str] | None],
) -> Relay | None:
    """Push the studies the source reports quiet (:meth:`ReplaySource.read`) while it reads on, each
    once, until ``None`` is queued; the relay that pushed them, or ``None`` when the backend did not
    answer at once (then everything is pushed at the end, with the backend waited for).

    One pass per report: a study the backend refuses for now is retried by the drain at the end.
    Pushing while reading puts the second core to work: at the end of a replay only the relay runs.
    """
    sink, connected = await sink_ready
    relay = await _relay(settings, store, sink) if connected else None
    while (uids := await quiet.get()) is not None:
        if relay is not None:
            await relay.drain(uids, deadline=time.monotonic())
    if relay is not None:
        early = sum(relay.totals.results.get(k, 0) for k in ("created", "updated", "unchanged"))
        if early:
            LOGGER.info("replay: %d studies pushed early, once they had stopped growing", early)
    return relay


async def _abandon(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait for it; its outcome (result, error) is dropped."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # retrieved: not reported as "never retrieved"


async def _replay(settings: Settings, opts: ReplayOptions, summary: ReplaySummary, stderr: TextIO) -> None:
    from ingest.app.wiring import open_store

    store = open_store(settings)
    source = ReplaySource(
        store, paths=opts.paths, shard=opts.shard, jobs=opts.jobs, caps=_caps(settings),
        wanted=lambda record: _wanted(record, opts), studies=opts.studies,
        skip_unchanged=opts.since is None,  # --since needs each file's Study Date: every file is read then
        stable_age_s=settings.relay.stable_age_s, on_conflict=settings.intake.on_conflict, totals=summary,
    )
    touched: set[str] = set()
    loop = asyncio.get_running_loop()
    reading = asyncio.Event()  # set once the first parsed file is back (the worker processes exist)
    quiet: asyncio.Queue[set[str] | None] = asyncio.Queue()  # studies to push while reading on
    try:
        def read_all() -> None:
            with _Progress(stderr, summary, opts) as progress:
                source.read(
                    on_rejected=lambda r: _report_rejected(r, progress.out),
                    on_file=lambda: progress.update(len(source.touched)),
                    on_first=lambda: loop.call_soon_threadsafe(reading.set),
                    on_quiet=lambda uids: loop.call_soon_threadsafe(quiet.put_nowait, uids),
                )
                progress.update(len(source.touched))
            touched.update(source.studies_to_push())

        async with contextlib.AsyncExitStack() as stack:
            # the backend and the sink's connection (introspection, fitted documents) are prepared on the
            # loop while the input is read in a thread; studies that stop growing meanwhile are pushed
            early = asyncio.ensure_future(_prepare_sink(settings, stack, reading))
            pushing = asyncio.ensure_future(_push_early(settings, store, early, quiet))
            try:
                await asyncio.to_thread(read_all)
            except BaseException:
                await _abandon(pushing)
                await _abandon(early)
                raise
            if not touched:  # nothing new, nothing pending: no backend, no mapping, nothing imported
                await _abandon(pushing)
                await _abandon(early)
                if summary.unchanged_files:
                    LOGGER.info("replay: %d unchanged files, every study already pushed: nothing to do",
                                summary.unchanged_files)
                summary.studies["unchanged"] += len(source.known)
                return
            reading.set()  # (already set when a file was parsed)
            quiet.put_nowait(None)
            relay = await pushing
            sink, _ = await early
            await _drain(settings, store, sink, touched, source.known, summary, opts.wait_backend_s, relay)
    finally:
        store.close()


async def _drain(
    settings: Settings, store: StateStore, sink: GraphQLSink, touched: set[str], known: set[str],
    summary: ReplaySummary, wait_backend_s: float, relay: Relay | None = None,
) -> None:
    """Push every study the input touched that is not pushed yet (the sink connects with backoff first,
    if it has not yet); ``relay``: the one that pushed studies while the input was read, if any.

    A backend that does not answer (connecting, or failing transiently) is waited for up to
    ``wait_backend_s`` in all; then the studies not pushed yet stay pending in the state store (counted as
    ``pending``; ``ingest serve`` or a later replay pushes them) and nothing is dead-lettered for it.
    """
    from ingest.app.wiring import connect_with_backoff

    deadline = time.monotonic() + wait_backend_s
    try:
        await asyncio.wait_for(connect_with_backoff(sink, settings, forever=True),
                               timeout=max(0.0, wait_backend_s))
    except TimeoutError:
        summary.studies["pending"] = len(touched)
        return
    if relay is None:
        relay = await _relay(settings, store, sink)
    if not await relay.drain(touched, deadline=deadline):
        waiting = {r.study_uid for r in await asyncio.to_thread(store.studies, StudyState.PENDING)}
        summary.studies["pending"] = len(waiting & touched)
    summary.studies.update(relay.totals.results)
    summary.studies.pop("retried", None)
    # Studies this input carried that needed no push at all (already pushed, nothing new) are
    # unchanged too; the relay only counts the ones it had to check against the backend.
    pushed = sum(summary.studies.get(k, 0) for k in ("created", "updated", "unchanged", "dead", "pending"))
    summary.studies["unchanged"] += max(0, len(touched | known) - pushed)
