"""The data dir's permissions and its one-owner lock (edge).

Everything under the data dir may hold patient data (the state store keeps each instance's header
record, the embedded backend its Patient resources, the spool and quarantine the instances), so nothing
in it is for other local users (``docs/reliability.md``, Security):

- The CLI sets the process umask to ``0o077`` before anything is created (:func:`private_umask`), so
  every file ``ingest`` or a library it uses creates (SQLite's database, ``-wal``, ``-shm`` and
  ``-journal`` files, the watcher's ``watch.sqlite3``...) is ``0600`` and every folder ``0700``, with no
  chmod race after creation. The spool and quarantine also ``fchmod`` their files, whatever the umask.
- :func:`tighten` fixes what an earlier version, a restore from backup or a hand-made folder left
  looser, at the start of every command that opens the data dir: the data dir itself and every entry
  directly in it, and the contents of ``spool/``, ``quarantine/`` and ``archive/`` when such a folder
  itself was loose. A folder that already was ``0700`` is not walked (its files cannot be reached by
  anyone else, and ``ingest`` creates them ``0600``): a start with a 100,000-file spool stays cheap. It
  logs one WARNING naming what it changed, as paths relative to the data dir (random names and fixed
  file names, never patient data).

:class:`DataDirLock` is an exclusive ``flock`` on ``<data_dir>/ingest.lock`` held by ``ingest serve`` /
``ingest watch`` for as long as they run. Only the holder writes the spool, quarantine and archive
temporary files, so at start it may remove every ``.tmp-*`` file (a ``kill -9`` during a receive leaves
one) regardless of its age. Two services on one data dir are not supported; the second one does not get
the lock, logs a warning and keeps the age rule, so it never removes a temporary file the first is still
writing.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import socket
import stat
from pathlib import Path
from types import TracebackType
from typing import Final, Self

__all__ = [
    "LOCK_NAME", "NODE_ID_NAME", "PRIVATE_UMASK", "DataDirLock", "lock_holder", "private_umask",
    "stable_node_id", "tighten",
]

LOGGER = logging.getLogger(__name__)

#: The umask the CLI runs with: no group or other bits on anything created.
PRIVATE_UMASK: Final = 0o077
#: The lock file of the process that owns the data dir's folders.
LOCK_NAME: Final = "ingest.lock"
_DIR_MODE: Final = 0o700
_FILE_MODE: Final = 0o600
#: Folders of random-named files, walked when found loose.
_FOLDERS: Final = ("spool", "quarantine", "archive")


def private_umask() -> int:
    """Set the process umask to :data:`PRIVATE_UMASK`; returns the previous one.

    Set before anything is created, this makes every new file ``0600`` and folder ``0700`` at the moment
    it is created, including the files SQLite makes itself (``-wal``, ``-shm``), which a chmod after the
    fact would leave readable for a moment.
    """
    return os.umask(PRIVATE_UMASK)


def _tighten_one(path: Path, rel: str, changed: list[str]) -> bool:
    """Make ``path`` ``0700`` (folder) or ``0600`` (file); returns whether it was a loose folder.

    Symbolic links and special files are left alone (``chmod`` would follow a link out of the data dir).
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        wanted = _DIR_MODE
    elif stat.S_ISREG(st.st_mode):
        wanted = _FILE_MODE
    else:
        return False
    if mode == wanted:
        return False
    os.chmod(path, wanted, follow_symlinks=False)
    changed.append(f"{rel} ({mode:04o} -> {wanted:04o})")
    return stat.S_ISDIR(st.st_mode) and bool(mode & 0o077)


def tighten(data_dir: Path) -> list[str]:
    """Make the data dir ``0700`` and what ``ingest`` keeps in it ``0600`` / ``0700``.

    Parameters
    ----------
    data_dir:
        The data dir; nothing happens when it does not exist yet.

    Returns
    -------
    list[str]
        What was changed, as ``"<path relative to the data dir> (<old> -> <new>)"``; also logged as one
        WARNING.

    Raises
    ------
    OSError
        When a mode cannot be changed (not the owner, read-only file system).
    """
    if not data_dir.is_dir():
        return []
    changed: list[str] = []
    _tighten_one(data_dir, ".", changed)
    loose_folders: list[str] = []
    with os.scandir(data_dir) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if _tighten_one(Path(entry.path), entry.name, changed) and entry.name in _FOLDERS:
            loose_folders.append(entry.name)
    for name in loose_folders:  # a loose folder may hold loose files: walk it once
        with os.scandir(data_dir / name) as it:
            for entry in sorted(it, key=lambda e: e.name):
                _tighten_one(Path(entry.path), f"{name}/{entry.name}", changed)
    if changed:
        LOGGER.warning("data dir %s was readable by others; tightened: %s", data_dir, ", ".join(changed))
    return changed


NODE_ID_NAME = "node-id"


def stable_node_id(data_dir: Path) -> str:
    """This data dir's node id, kept in ``<data_dir>/node-id`` so that it survives restarts.

    Made once: ``<host name>-<8 random hex digits>`` for a new data dir (two services on one host
    differ); a data dir that already holds a state store from before the id was kept gets the host name,
    the id its rows carry. A name read back that is not a valid node id is replaced (and logged).
    """
    path = data_dir / NODE_ID_NAME
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = path.read_text(encoding="ascii").strip()
        if _NODE_ID.fullmatch(text):
            return text
        LOGGER.warning("%s does not hold a valid node id: a new one is made", path)
    data_dir.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    host = re.sub(r"[^A-Za-z0-9._:@-]", "-", socket.gethostname())[:48] or "node"
    existing = (data_dir / "state.sqlite3").exists() or any((data_dir / "spool").glob("*"))
    node = host if existing else f"{host}-{secrets.token_hex(4)}"
    temporary = data_dir / f".tmp-node-id-{secrets.token_hex(8)}"
    temporary.write_text(node + "\n", encoding="ascii")
    os.replace(temporary, path)
    return node


_NODE_ID = re.compile(r"[A-Za-z0-9._:@-]{1,64}")


def _recorded_pid(path: Path) -> str | None:
    """The pid the lock's holder wrote into ``path``, or ``None`` when it is unreadable or empty."""
    with contextlib.suppress(OSError, ValueError):
        text = path.read_text().strip()
        return str(int(text)) if text else None
    return None


def lock_holder(data_dir: Path) -> str | None:
    """The pid of the process holding ``data_dir``'s lock, or ``None`` when nobody holds it (nothing is
    created: a data dir that does not exist is not held)."""
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _recorded_pid(path) or "unknown"
        return None
    finally:
        os.close(fd)


class DataDirLock:
    """An exclusive, non-blocking ``flock`` on ``<data_dir>/ingest.lock`` (see the module docstring).

    Parameters
    ----------
    data_dir:
        The data dir (created ``0700`` if missing).

    Attributes
    ----------
    held:
        Whether this process holds the lock; ``False`` when another process does (a warning was logged).
    """

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        self.path = data_dir / LOCK_NAME
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        self._fd: int | None = os.open(self.path, flags, _FILE_MODE)
        self.held = False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _recorded_pid(self.path)
            LOGGER.warning("data dir %s is in use by another ingest process (pid %s); two services on one "
                           "data dir are not supported, temporary files younger than an hour are kept",
                           data_dir, other or "unknown")
            os.close(self._fd)
            self._fd = None
            return
        self.held = True
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        """Give the lock up (closing the file releases the ``flock``); idempotent."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.held = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
