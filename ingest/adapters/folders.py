"""Which files of a folder are read (``ingest replay``, the drop-folder watcher): a walk that needs no
DICOM code, so listing a folder (a replay rerun whose files are all unchanged) imports no parser.

:mod:`ingest.adapters.dicomfile` re-exports both functions.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

__all__ = ["ignored_name", "iter_dicom_files", "iter_dicom_paths"]

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
    for path in iter_dicom_paths(root):
        yield Path(path)


def iter_dicom_paths(root: Path) -> Iterator[str]:
    """:func:`iter_dicom_files` as strings (``str()`` of each of its paths), built without a
    :class:`~pathlib.Path` per file, which cost about a third of an unchanged replay's reading (measured in
    docs/architecture.md, "Unchanged reruns")."""
    if not root.is_dir():
        if root.is_file():
            yield str(root)
        return
    real_root = root.resolve()
    yield from _walk(str(root), real_root, {str(real_root)})


def _inside(path: str, real_root: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(real_root)
    except (OSError, RuntimeError):  # dangling or looping link
        return False


def _child(folder: str, name: str) -> str:
    """``str(Path(folder) / name)`` for ``folder`` in pathlib's form (``str()`` of a Path)."""
    if folder == ".":
        return name
    return folder + name if folder.endswith("/") else f"{folder}/{name}"


def _walk(folder: str, real_root: Path, seen: set[str]) -> Iterator[str]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if ignored_name(name):
            continue
        path = _child(folder, name)
        if entry.is_symlink() and not _inside(path, real_root):
            continue
        try:
            if entry.is_dir():  # follows links; those are inside the root by now
                real = os.path.realpath(path)
                if real in seen:
                    continue
                seen.add(real)
                yield from _walk(path, real_root, seen)
            elif entry.is_file():
                yield path
        except OSError:
            continue
