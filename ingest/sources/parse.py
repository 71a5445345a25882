"""Finite sources of DICOM files (paths, folders) and parallel header parsing.

Parsing runs in worker processes (``--jobs``; for ``replay``, the calling process is one of them) with a
bounded number of batches in flight, so memory stays flat however large the input is. Each item comes back
as :class:`Parsed` or :class:`Rejected`, in order.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

from ingest.adapters.folders import iter_dicom_paths
from ingest.core.records import InstanceRecord, RecordRow
from ingest.errors import HeaderError, IngestError

__all__ = ["Item", "Parsed", "ParsedRow", "Rejected", "expand_paths", "parse_items"]

_BATCH = 64  # items per task: small enough to balance the tail, large enough to amortise the IPC
_AHEAD = 6  # batches queued per worker process
_MAX_WINDOW = 32  # batches held in order behind a slow one, at most (memory stays bounded)


@dataclass(frozen=True)
class Item:
    """One file to read: a path on disk, or bytes (an archive member) with a label naming it.

    ``rejection`` is a refusal decided before parsing, as ``(reason, message)`` (an archive member that
    escapes its root, a link...): :func:`parse_items` reports it as :class:`Rejected` without reading.
    """

    label: str
    path: str | Path | None = None
    data: bytes | None = None
    rejection: tuple[str, str] | None = None
    #: ``(absolute path, st_size, st_mtime_ns)`` as ``os.stat`` gave them before the file is read, when
    #: the caller wants to remember the file (replay's unchanged reruns); passed on to :class:`Parsed`
    stat: tuple[str, int, int] | None = None


@dataclass(frozen=True)
class Parsed:
    label: str
    record: InstanceRecord
    digest: str
    size: int
    stat: tuple[str, int, int] | None = None  # the item's :attr:`Item.stat`


@dataclass(frozen=True, slots=True)
class ParsedRow:
    """:class:`Parsed` with the record as its state store row (``parse_items(..., rows=True)``): made
    in the parsing process, it crosses to the caller as a few strings (no model is built there)."""

    label: str
    row: RecordRow
    digest: str
    size: int
    stat: tuple[str, int, int] | None = None  # the item's :attr:`Item.stat`


@dataclass(frozen=True)
class Rejected:
    label: str
    reason: str
    message: str


def expand_paths(paths: Iterable[Path]) -> Iterator[Item]:
    """Files and folders (recursively, sorted) as :class:`Item`\\ s, each path a string (no
    :class:`~pathlib.Path` built per file); archives are handled by the caller."""
    for root in paths:
        for path in iter_dicom_paths(root):
            yield Item(label=path, path=path)


def _parse_one(item: Item, max_inflated_bytes: int, max_rejection_items: int) -> Parsed | Rejected:
    if item.rejection is not None:
        return Rejected(item.label, *item.rejection)
    # the header walker is imported by the first parse, not with this module: listing files (a replay
    # rerun that finds them all unchanged) loads no DICOM code
    from ingest.adapters.dicomfile import read_header, read_header_bytes

    try:
        if item.path is not None:
            parsed = read_header(
                item.path, max_inflated_bytes=max_inflated_bytes, max_rejection_items=max_rejection_items
            )
        else:
            parsed = read_header_bytes(
                item.data or b"", source=item.label, max_inflated_bytes=max_inflated_bytes,
                max_rejection_items=max_rejection_items,
            )
    except HeaderError as exc:
        return Rejected(item.label, exc.reason, str(exc))
    except IngestError as exc:
        return Rejected(item.label, "unreadable", str(exc))
    except OSError as exc:
        return Rejected(item.label, "unreadable", f"cannot read {item.label}: {exc.strerror or exc}")
    return Parsed(item.label, parsed.record, parsed.digest, parsed.size, item.stat)


def _parse_row(item: Item, max_inflated_bytes: int, max_rejection_items: int) -> ParsedRow | Rejected:
    parsed = _parse_one(item, max_inflated_bytes, max_rejection_items)
    if isinstance(parsed, Rejected):
        return parsed
    return ParsedRow(parsed.label, RecordRow.of(parsed.record), parsed.digest, parsed.size, parsed.stat)


def _parse_batch(
    items: list[Item], max_inflated_bytes: int, max_rejection_items: int, rows: bool = False
) -> list[Any]:
    parse = _parse_row if rows else _parse_one
    return [parse(item, max_inflated_bytes, max_rejection_items) for item in items]


@overload
def parse_items(
    items: Iterable[Item], *, jobs: int = ..., max_inflated_bytes: int = ..., max_rejection_items: int = ...,
    caller_parses: bool = ..., pool: ProcessPoolExecutor | None = ..., rows: Literal[False] = ...,
) -> Iterator[Parsed | Rejected]: ...


@overload
def parse_items(
    items: Iterable[Item], *, jobs: int = ..., max_inflated_bytes: int = ..., max_rejection_items: int = ...,
    caller_parses: bool = ..., pool: ProcessPoolExecutor | None = ..., rows: Literal[True],
) -> Iterator[ParsedRow | Rejected]: ...


@overload
def parse_items(
    items: Iterable[Item], *, jobs: int = ..., max_inflated_bytes: int = ..., max_rejection_items: int = ...,
    caller_parses: bool = ..., pool: ProcessPoolExecutor | None = ..., rows: bool,
) -> Iterator[Parsed | ParsedRow | Rejected]: ...


def parse_items(
    items: Iterable[Item],
    *,
    jobs: int = 1,
    max_inflated_bytes: int = 64 * 1024**2,
    max_rejection_items: int = 100_000,
    caller_parses: bool = False,
    pool: ProcessPoolExecutor | None = None,
    rows: bool = False,
) -> Iterator[Any]:
    """Parse the headers of ``items``, yielding one result per item in input order.

    Parameters
    ----------
    items:
        The files to read (consumed lazily, a few batches ahead of the results).
    jobs:
        Processes that parse: ``1`` parses in the calling process. With ``caller_parses=False``,
        ``jobs`` worker processes parse and the caller only collects; with ``caller_parses=True``,
        ``jobs - 1`` workers parse and the caller parses too, whenever it would otherwise wait for
        a worker (no process sits idle, and its results need no pickling). Use ``caller_parses``
        only where the calling thread has nothing else to do (``replay``), not next to an event
        loop that must stay responsive.
    max_inflated_bytes:
        Cap on the inflated size of a Deflated Explicit VR Little Endian dataset.
    max_rejection_items:
        Most instances a Key Object Selection Document's evidence may name (``[listener]
        max_rejection_items``).
    caller_parses:
        See ``jobs``.
    pool:
        A long-lived pool of ``jobs`` (or ``jobs - 1``) workers to use instead of starting one for this
        call (the watcher keeps one, so each burst does not pay for starting processes).
    rows:
        Yield :class:`ParsedRow` (the record as its state store row, made by the parsing process)
        instead of :class:`Parsed`: for a caller that only stores the records (``ingest replay``).

    Yields
    ------
    Parsed | ParsedRow | Rejected
        The header record, or why the item was refused.
    """
    it = iter(items)
    first = next(it, None)
    if first is None:  # nothing to read: no walker imported, no process started
        return
    it = itertools.chain([first], it)
    import ingest.adapters.dicomfile  # noqa: F401  (loaded once here, before the worker processes fork)

    workers = jobs - 1 if caller_parses else jobs
    if workers < 1:
        parse = _parse_row if rows else _parse_one
        for item in it:
            yield parse(item, max_inflated_bytes, max_rejection_items)
        return
    with contextlib.nullcontext(pool) if pool is not None else ProcessPoolExecutor(workers) as pool:
        # in input order: batches sent to a worker (futures) and batches the caller parsed (lists)
        window: deque[Future[list[Any]] | list[Any]] = deque()
        in_pool = 0  # futures in the window
        exhausted = False
        while True:
            while not exhausted and in_pool < workers * _AHEAD:  # workers run ahead while the caller is busy
                batch = list(itertools.islice(it, _BATCH))
                if not batch:
                    exhausted = True
                    break
                window.append(pool.submit(_parse_batch, batch, max_inflated_bytes, max_rejection_items, rows))
                in_pool += 1
            if not window:
                return
            head = window[0]
            if isinstance(head, list):
                window.popleft()
                yield from head
                continue
            if caller_parses and not exhausted and not head.done() and len(window) < _MAX_WINDOW:
                # rather than wait for the worker, parse the next batch here (it queues behind the head)
                batch = list(itertools.islice(it, _BATCH))
                if batch:
                    window.append(_parse_batch(batch, max_inflated_bytes, max_rejection_items, rows))
                else:
                    exhausted = True
                continue
            window.popleft()
            in_pool -= 1
            yield from head.result()
