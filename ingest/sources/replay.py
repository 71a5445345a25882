"""Replay as a source: the files, folders and archives given to ``ingest replay``, as items to parse.

A replay can be split into shards (``--shard K/N``): each file belongs to exactly one shard, chosen by a
stable hash of its path relative to the argument that named it (for an archive member, its name inside
the archive), so N processes on N machines given the same archive (mounted anywhere) read every file
exactly once between them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ingest.errors import ArchiveError
from ingest.sources.parse import Item, expand_paths

__all__ = ["Shard", "ShardError", "parse_shard", "relative_key", "replay_items"]

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


def relative_key(root: Path, path: Path) -> str:
    """The shard key of ``path`` found under the replay argument ``root``: its path relative to
    ``root`` (``/``-separated), or its name when ``root`` is the file itself."""
    if path == root:
        return path.name
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


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
