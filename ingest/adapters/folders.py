"""Which files of a folder are read (``ingest replay``, the drop-folder watcher): a walk that needs no
DICOM code, so listing a folder (a replay rerun whose files are all unchanged) imports no parser.

:mod:`ingest.adapters.dicomfile` re-exports both functions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

__all__ = ["ignored_name", "iter_dicom_files"]

#: Names of files still being written (by a copy tool, a sender): never read (:func:`ignored_name`).
_IN_PROGRESS_SUFFIXES: Final = (".part", ".tmp")


def ignored_name(name: str) -> bool:
    """Whether a file or folder named ``name`` is skipped by every reader of folders (the walk of
    :func:`iter_dicom_files`, the drop-folder watcher): a dot-file or dot-folder, ``*.part``, ``*.tmp``."""
    return name.startswith(".") or name.endswith(_IN_PROGRESS_SUFFIXES)


def iter_dicom_files(root: Path) -> Iterator[Path]:
    """Yield the candidate DICOM files under *root*, recursively, in sorted order.

    Skips the names of :func:`ignored_name` (dot-files and dot-folders, ``*.part`` and ``*.tmp``), and
    symbolic links whose target lies outside *root*; symlinked folders inside *root* are entered
    once. A file given as *root* yields itself.

    Parameters
    ----------
    root:
        A folder or a file.

    Yields
    ------
    Path
        Paths of regular files (as found under *root*, not resolved).
    """
    if not root.is_dir():
        if root.is_file():
            yield root
        return
    real_root = root.resolve()
    yield from _walk(root, real_root, {real_root})


def _inside(path: Path, real_root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(real_root)
    except (OSError, RuntimeError):  # dangling or looping link
        return False


def _walk(folder: Path, real_root: Path, seen: set[Path]) -> Iterator[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if ignored_name(name):
            continue
        path = folder / name
        is_link = entry.is_symlink()
        if is_link and not _inside(path, real_root):
            continue
        try:
            if entry.is_dir():  # follows links; those are inside the root by now
                real = path.resolve()
                if real in seen:
                    continue
                seen.add(real)
                yield from _walk(path, real_root, seen)
            elif entry.is_file():
                yield path
        except OSError:
            continue
