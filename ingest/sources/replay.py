"""Replay as a source beside the listener and the drop folder: the files, folders and archives given to
``ingest replay``, parsed under the listener's caps and fed to intake (:class:`ReplaySource`).

Files an earlier replay stored unchanged (same absolute path, size and mtime; the same digest in the
instance row) are skipped without being read; the others are admitted in batches through one
:class:`~ingest.intake.admit.Admission` per run, and remembered once held.

A replay can be split into shards (``--shard K/N``): each file belongs to exactly one shard, chosen by a
stable hash of its path relative to the argument that named it (for an archive member, its name inside
the archive), so N processes on N machines given the same archive (mounted anywhere) read every file
exactly once between them.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, overload

from ingest.errors import ArchiveError
from ingest.ports import FileIdentity, StateStore, StudyState, Verdict
from ingest.sources.parse import Item, Parsed, ParsedRow, Rejected, expand_paths, parse_items

if TYPE_CHECKING:
    from ingest.intake.admit import Admission

__all__ = [
    "QUIET_FILES", "Dated", "ReplayCaps", "ReplaySource", "ReplayTotals", "Shard", "ShardError",
    "parse_replay", "parse_shard", "relative_key", "replay_items",
]

_SHARD = re.compile(r"(\d+)/(\d+)")


class ShardError(ValueError):
    """A ``--shard`` value that is not ``K/N`` with ``1 <= K <= N``."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def owns(self, relative: str) -> bool:
        """Whether the file at ``relative`` (a path relative to its replay argument, ``/``-separated)
        belongs to this shard (BLAKE2b of its UTF-8 bytes, modulo ``count``)."""
        key = relative.encode("utf-8", "surrogateescape")
        digest = hashlib.blake2b(key, digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index - 1


def parse_shard(text: str) -> Shard:
    """``"K/N"`` as a :class:`Shard`; :class:`ShardError` naming the problem otherwise."""
    found = _SHARD.fullmatch(text.strip())
    if found is None:
        raise ShardError(f"--shard {text!r}: expected K/N, e.g. 1/4 (shard K of N, K from 1 to N)")
    index, count = int(found[1]), int(found[2])
    if count < 1 or not 1 <= index <= count:
        raise ShardError(f"--shard {text!r}: out of range: K/N needs N at least 1 and K from 1 to N")
    return Shard(index, count)


def relative_key(root: Path, path: str | Path) -> str:
    """The shard key of ``path`` found under the replay argument ``root``: its path relative to
    ``root`` (``/``-separated), or its name when ``root`` is the file itself."""
    text, base = str(path), str(root)
    if text == base:
        return os.path.basename(text)
    if base == ".":
        return text
    head = base if base.endswith("/") else base + "/"
    return text.removeprefix(head) if text.startswith(head) else Path(text).as_posix()


def replay_items(paths: list[Path], shard: Shard | None = None) -> Iterator[Item]:
    """Every file of ``paths`` (files, folders, archives' members) as an :class:`Item`, in order.

    A path that does not exist, and a refused whole archive, are items carrying a rejection (every shard
    reports them); with ``shard``, only the files and members that shard owns are yielded.
    """
    from ingest.sources import archives

    for path in paths:
        if not path.exists():  # a typo or an unmounted share: named, counted as rejected (exit 2)
            yield Item(label=str(path), rejection=("not_found", "no such file or folder"))
        elif archives.is_archive(path):
            prefix = f"{path}!"
            try:
                for member in archives.iter_members(path):
                    if shard is None or shard.owns(member.label.removeprefix(prefix)):
                        yield member
            except ArchiveError as exc:  # a refused whole archive is one rejected input; others go on
                yield Item(label=str(path), rejection=("archive_refused", str(exc)))
        elif shard is None:
            yield from expand_paths([path])
        else:
            for item in expand_paths([path]):
                assert item.path is not None
                if shard.owns(relative_key(path, item.path)):
                    yield item


@dataclass
class ReplayTotals:
    """What a replay read and admitted so far (the summary's counts; filled as the replay goes)."""

    files: int = 0
    unchanged_files: int = 0  # files known from an earlier replay (same path, size, mtime): not read again
    accepted: int = 0
    duplicate: int = 0
    filtered: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class ReplayCaps:
    """The caps every source parses under (``[listener] max_inflated_bytes``, ``max_rejection_items``)."""

    max_inflated_bytes: int
    max_rejection_items: int


@overload
def parse_replay(
    paths: list[Path], caps: ReplayCaps, *, jobs: int, shard: Shard | None = ...,
    caller_parses: bool = ..., skip: Callable[[Iterator[Item]], Iterator[Item]] | None = ...,
    rows: Literal[False] = ...,
) -> Iterator[Parsed | Rejected]: ...


@overload
def parse_replay(
    paths: list[Path], caps: ReplayCaps, *, jobs: int, shard: Shard | None = ...,
    caller_parses: bool = ..., skip: Callable[[Iterator[Item]], Iterator[Item]] | None = ...,
    rows: Literal[True],
) -> Iterator[ParsedRow | Rejected]: ...


def parse_replay(
    paths: list[Path], caps: ReplayCaps, *, jobs: int, shard: Shard | None = None,
    caller_parses: bool = False, skip: Callable[[Iterator[Item]], Iterator[Item]] | None = None,
    rows: bool = False,
) -> Iterator[Any]:
    """The parse results of a replay's items (``skip``, if given, drops items before they are parsed);
    with ``rows``, each record as its state store row (what a replay stores; :func:`parse_items`)."""
    items = replay_items(paths, shard)
    return parse_items(
        skip(items) if skip is not None else items, jobs=jobs, caller_parses=caller_parses, rows=rows,
        max_inflated_bytes=caps.max_inflated_bytes, max_rejection_items=caps.max_rejection_items,
    )


class Dated(Protocol):
    """What ``--study`` and ``--since`` read of a record (an :class:`InstanceRecord` or a
    :class:`~ingest.core.records.RecordRow`)."""

    @property
    def study_uid(self) -> str: ...

    @property
    def study_date(self) -> str | None: ...


# Parsed files admitted per transaction.
_STORE_BATCH = 256
#: Admitted files after which a study that gained none of them counts as quiet (:meth:`ReplaySource.read`).
QUIET_FILES = 1024
# Files stat-ed and looked up in the state store per query (unchanged reruns).
_KNOWN_CHUNK = 256
# A file modified this recently is not remembered: a write within the same mtime tick as our stat could
# otherwise go unnoticed by the next run (it re-reads the file instead).
_RACY_NS = 2_000_000_000


class ReplaySource:
    """``ingest replay``'s input fed to intake: one :class:`~ingest.intake.admit.Admission` per run, with
    no spool (the files stay where they are), no quarantine and nothing to wake (the caller drains the
    studies it touched once the input is read).

    Parameters
    ----------
    store:
        The state store.
    paths, shard, jobs, caps:
        What to read, which shard of it, in how many processes, under which caps.
    wanted:
        Whether a parsed instance is kept (``--study``, ``--since``; given its row); the others count as
        filtered.
    studies:
        ``--study`` UIDs (an unchanged file of another study counts as filtered), empty for all.
    skip_unchanged:
        Whether files an earlier replay stored unchanged are skipped without being read (``False`` with
        ``--since``, which needs each file's Study Date).
    stable_age_s, on_conflict:
        ``[relay] stable_age_s`` and ``[intake] on_conflict``.
    totals:
        The counts to fill.
    """

    def __init__(
        self, store: StateStore, *, paths: list[Path], shard: Shard | None, jobs: int, caps: ReplayCaps,
        wanted: Callable[[Dated], bool], studies: frozenset[str], skip_unchanged: bool,
        stable_age_s: float, on_conflict: str, totals: ReplayTotals,
    ) -> None:
        self.store = store
        self.paths = paths
        self.shard = shard
        self.jobs = jobs
        self.caps = caps
        self.wanted = wanted
        self.studies = studies
        self.skip_unchanged = skip_unchanged
        self.stable_age_s = stable_age_s
        self.on_conflict = on_conflict
        self.totals = totals
        #: studies an admitted (or duplicate) instance of this input belongs to
        self.touched: set[str] = set()
        #: studies of files not read again (unchanged since an earlier replay)
        self.known: set[str] = set()
        self._admission: Admission | None = None
        self._admitted = 0  # files admitted so far (added or duplicate)
        self._growing: dict[str, int] = {}  # study -> ``_admitted`` when it last gained an instance

    def read(
        self, *, on_rejected: Callable[[Rejected], None], on_file: Callable[[], None],
        on_first: Callable[[], object] = lambda: None, on_quiet: Callable[[set[str]], object] | None = None,
    ) -> None:
        """Read, parse and admit every item; ``on_rejected`` is told of each refused input, ``on_file``
        is called after each file, ``on_first`` once the first parse result is back.

        ``on_quiet``, if given, is told of studies that stopped growing while the input is still being
        read: studies with admitted instances and none among the last :data:`QUIET_FILES` files admitted
        (an archive is usually laid out a study at a time). The caller may push them early; a study
        that grows again afterwards is dirty again and pushed again, like any study that gets a late
        instance."""
        totals = self.totals
        batch: list[ParsedRow] = []
        results = parse_replay(self.paths, self.caps, jobs=self.jobs, shard=self.shard, rows=True,
                               skip=self._skip_known if self.skip_unchanged else None)
        for n, result in enumerate(results):
            if not n:
                on_first()
            totals.files += 1
            if isinstance(result, Rejected):
                totals.rejected[result.reason] += 1
                on_rejected(result)
            elif not self.wanted(result.row):
                totals.filtered += 1
            else:
                batch.append(result)
                if len(batch) >= _STORE_BATCH:
                    self._admit(batch, on_rejected, on_quiet)
                    batch = []
            on_file()
        if batch:
            self._admit(batch, on_rejected, on_quiet)

    def _report_quiet(self, on_quiet: Callable[[set[str]], object]) -> None:
        """Tell ``on_quiet`` of the studies that have not grown for :data:`QUIET_FILES` admitted files."""
        quiet = {uid for uid, at in self._growing.items() if self._admitted - at >= QUIET_FILES}
        if quiet:
            for uid in quiet:
                del self._growing[uid]
            on_quiet(quiet)

    def studies_to_push(self) -> set[str]:
        """The studies the relay must see: those this input touched, and those all of whose files were
        unchanged but that the store does not hold pushed and clean."""
        out = set(self.touched)
        for uid in sorted(self.known - self.touched):
            row = self.store.study(uid)
            if row is None or row.state is not StudyState.PUSHED or row.dirty:
                out.add(uid)
        return out

    def _skip_known(self, items: Iterator[Item]) -> Iterator[Item]:
        """``items`` less the files an earlier replay read and whose instance the store still holds
        unchanged (same absolute path, size and mtime; same digest in the instance row): those are counted
        as unchanged duplicates and their studies added to :attr:`known`. The others get
        :attr:`Item.stat`, so they are remembered once admitted."""
        pending: list[Item] = []
        totals = self.totals

        def flush() -> Iterator[Item]:
            stats: list[tuple[str, int, int]] = []
            for item in pending:
                assert item.path is not None
                try:
                    info = os.stat(item.path)
                except OSError:
                    stats.append(("", 0, 0))  # parsing reports it (unreadable)
                    continue
                stats.append((os.path.abspath(item.path), info.st_size, info.st_mtime_ns))
            found = self.store.unchanged_files([ident for ident in stats if ident[0]])
            now_ns = time.time_ns()
            for item, ident in zip(pending, stats, strict=True):
                study_uid = found.get(ident[0]) if ident[0] else None
                if study_uid is None:
                    fresh = bool(ident[0]) and now_ns - ident[2] >= _RACY_NS
                    yield Item(item.label, path=item.path, stat=ident) if fresh else item
                    continue
                totals.files += 1
                totals.unchanged_files += 1
                if self.studies and study_uid not in self.studies:
                    totals.filtered += 1
                else:
                    totals.duplicate += 1
                    self.known.add(study_uid)
            pending.clear()

        for item in items:
            if item.path is None or item.rejection is not None:
                yield from flush()
                yield item
                continue
            pending.append(item)
            if len(pending) >= _KNOWN_CHUNK:
                yield from flush()
        yield from flush()

    def _admit(
        self, batch: list[ParsedRow], on_rejected: Callable[[Rejected], None],
        on_quiet: Callable[[set[str]], object] | None,
    ) -> None:
        from ingest.intake.admit import Admission, Candidate  # (not needed by a rerun that reads no file)

        if self._admission is None:
            self._admission = Admission(
                self.store, spool=None, quarantine=None, metrics=None, stable_age_s=self.stable_age_s,
                label="replay", on_conflict=self.on_conflict,
            )
        results = self._admission.admit([Candidate(p.row, p.digest, f"file:{p.label}") for p in batch])
        remember: list[FileIdentity] = []
        totals = self.totals
        for parsed, admitted in zip(batch, results, strict=True):
            row = parsed.row
            self.touched.add(row.study_uid)
            if admitted.outcome in (Verdict.ADDED, Verdict.DUPLICATE):
                self._admitted += 1
                if admitted.outcome is Verdict.ADDED:
                    self._growing[row.study_uid] = self._admitted
                    totals.accepted += 1
                else:
                    totals.duplicate += 1
                if parsed.stat is not None:  # held now with this digest: a rerun need not read it again
                    remember.append(FileIdentity(*parsed.stat, parsed.digest, row.sop_uid, row.study_uid))
            else:
                totals.rejected["conflict"] += 1
                why = f"SOP Instance UID {row.sop_uid}: {admitted.rule}"
                on_rejected(Rejected(parsed.label, "conflict", why))
        self.store.remember_files(remember)
        if on_quiet is not None:
            self._report_quiet(on_quiet)
