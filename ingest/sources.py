"""Finite sources of DICOM files (paths, folders) and parallel header parsing.

Parsing runs in worker processes (``--jobs``) with a bounded number of batches in flight, so memory stays
flat however large the input is. Each item comes back as :class:`Parsed` or :class:`Rejected`, in order.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ingest.adapters.dicomfile import iter_dicom_files, read_header, read_header_bytes
from ingest.core.records import InstanceRecord
from ingest.errors import HeaderError, IngestError

__all__ = ["Item", "Parsed", "Rejected", "expand_paths", "parse_items"]

_BATCH = 128


@dataclass(frozen=True)
class Item:
    """One file to read: a path on disk, or bytes (an archive member) with a label naming it.

    ``rejection`` is a refusal decided before parsing, as ``(reason, message)`` (an archive member that
    escapes its root, a link...): :func:`parse_items` reports it as :class:`Rejected` without reading.
    """

    label: str
    path: Path | None = None
    data: bytes | None = None
    rejection: tuple[str, str] | None = None


@dataclass(frozen=True)
class Parsed:
    label: str
    record: InstanceRecord
    digest: str
    size: int


@dataclass(frozen=True)
class Rejected:
    label: str
    reason: str
    message: str


def expand_paths(paths: Iterable[Path]) -> Iterator[Item]:
    """Files and folders (recursively, sorted) as :class:`Item`\\ s; archives are handled by the caller."""
    for root in paths:
        for path in iter_dicom_files(root):
            yield Item(label=str(path), path=path)


def _parse_one(item: Item, max_inflated_bytes: int) -> Parsed | Rejected:
    if item.rejection is not None:
        return Rejected(item.label, *item.rejection)
    try:
        if item.path is not None:
            parsed = read_header(item.path, max_inflated_bytes=max_inflated_bytes)
        else:
            parsed = read_header_bytes(
                item.data or b"", source=item.label, max_inflated_bytes=max_inflated_bytes
            )
    except HeaderError as exc:
        return Rejected(item.label, exc.reason, str(exc))
    except IngestError as exc:
        return Rejected(item.label, "unreadable", str(exc))
    except OSError as exc:
        return Rejected(item.label, "unreadable", f"cannot read {item.label}: {exc.strerror or exc}")
    return Parsed(item.label, parsed.record, parsed.digest, parsed.size)


def _parse_batch(items: list[Item], max_inflated_bytes: int) -> list[Parsed | Rejected]:
    return [_parse_one(item, max_inflated_bytes) for item in items]


def parse_items(
    items: Iterable[Item], *, jobs: int = 1, max_inflated_bytes: int = 64 * 1024**2
) -> Iterator[Parsed | Rejected]:
    """Parse headers of ``items``, in input order, using ``jobs`` worker processes (1 = in process)."""
    it = iter(items)
    if jobs <= 1:
        for item in it:
            yield _parse_one(item, max_inflated_bytes)
        return
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        pending: deque[Future[list[Parsed | Rejected]]] = deque()
        while True:
            while len(pending) < jobs * 3:
                batch = list(itertools.islice(it, _BATCH))
                if not batch:
                    break
                pending.append(pool.submit(_parse_batch, batch, max_inflated_bytes))
            if not pending:
                return
            yield from pending.popleft().result()
