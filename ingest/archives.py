"""Archives as sources: ``.zip``, ``.tar``, ``.tar.gz``/``.tgz`` read member by member."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ingest.sources import Item

__all__ = ["is_archive", "iter_members"]

_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


def is_archive(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(_SUFFIXES)


def iter_members(path: Path) -> Iterator[Item]:
    raise NotImplementedError("archive replay is not implemented yet")
