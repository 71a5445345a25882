"""Durable, private folders for received bytes: the spool and the quarantine.

"Accepted" means durable (``docs/reliability.md``, Durability): bytes are written to a temporary name in
the same folder, ``fsync``'d, renamed to their final name and the folder itself is ``fsync``'d, so after a
crash a file is either complete under its final name or absent. Names are random (``uuid4().hex``), never
derived from DICOM values or AE titles, and every path handed out is checked to stay under the root
(``docs/reliability.md``, Security). Folders are created ``0700`` and files ``0600``.

Small received instances are not spool files: their bytes are committed in the state store with their
row (``instance_bytes``, ``[spool] inline_max_bytes``); :func:`read_instance` reads an accepted instance's
bytes wherever they are kept.

The quarantine is bounded: it holds at most ``max_bytes`` (``[quarantine] max_bytes``, 1 GiB by
default) of kept bytes. Past that, and for any input refused for its size, only the side file is written
(``"kept": false`` and why); side files themselves are small and always written.

Every ``OSError`` (ENOSPC, EIO, EDQUOT, ...) becomes :class:`ingest.errors.StoreUnavailableError`; the
message names the folder, never the data, and no temporary file is left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from ingest.errors import StoreUnavailableError
from ingest.ports import StateStore

__all__ = [
    "DEFAULT_QUARANTINE_BYTES", "Quarantine", "QuotaExceededError", "Spool", "SpoolFile", "SpoolWriter",
    "fsync_dir", "read_instance",
]

LOGGER = logging.getLogger(__name__)

_DIR_MODE: Final = 0o700
_FILE_MODE: Final = 0o600
_TMP_PREFIX: Final = ".tmp-"
_NAME_RE: Final = re.compile(r"^[0-9a-f]{32}$")
_SIDE_SUFFIX: Final = ".json"
_COPY_CHUNK: Final = 1024 * 1024
#: The default quota of the quarantine (``[quarantine] max_bytes``).
DEFAULT_QUARANTINE_BYTES: Final = 1024**3
#: Why bytes were not kept in the quarantine (the side file's ``not_kept``).
QUARANTINE_FULL: Final = "quarantine full"
OVER_SIZE_CAP: Final = "over the size cap"
_OPEN_FLAGS: Final = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
)


@dataclass(frozen=True)
class SpoolFile:
    """A file committed durably to a spool or quarantine folder.

    Attributes
    ----------
    name:
        The random file name (32 lowercase hex digits); what the state store records.
    path:
        Absolute path of the file, under the folder's root.
    size:
        Number of bytes written.
    sha256:
        Hex SHA-256 of the bytes written; ``""`` when the writer was opened with ``hashed=False``.
    """

    name: str
    path: Path
    size: int
    sha256: str


class QuotaExceededError(StoreUnavailableError):
    """A write would take a folder past its ``max_bytes`` quota (nothing was written)."""


def _describe(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else "unknown"
    return f"{code}: {exc.strerror or exc}"


def fsync_dir(path: Path) -> None:
    """``fsync`` the folder ``path`` itself, so the names renamed into it survive a power loss.

    Raises
    ------
    OSError
        When the folder cannot be opened or synced.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _PrivateFolder:
    """A ``0700`` folder of ``0600`` files with random names, written atomically."""

    _kind = "folder"

    def __init__(self, root: Path, *, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        try:
            root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            os.chmod(root, _DIR_MODE)  # an existing folder is tightened too
            self.root = root.resolve(strict=True)
            self._used = self._scan_used()
        except OSError as exc:
            raise StoreUnavailableError(
                f"cannot prepare {self._kind} folder {root}: {_describe(exc)}"
            ) from exc

    # -- names and paths -------------------------------------------------------------------------------

    def _scan_used(self) -> int:
        total = 0
        with os.scandir(self.root) as it:
            for entry in it:
                if entry.is_file(follow_symlinks=False) and not entry.name.startswith(_TMP_PREFIX):
                    total += entry.stat(follow_symlinks=False).st_size
        return total

    def _contained(self, name: str) -> Path:
        """The path of ``name`` under the root; refuses anything that could leave it."""
        candidate = self.root / name
        if os.path.dirname(os.path.normpath(candidate)) != str(self.root) or not Path(
            os.path.realpath(candidate)
        ).is_relative_to(self.root):
            raise ValueError(f"{self._kind} name {name!r} escapes {self.root}")
        return candidate

    def path(self, name: str) -> Path:
        """The path of a committed file.

        Parameters
        ----------
        name:
            A name returned by this folder (32 lowercase hex digits).

        Raises
        ------
        ValueError
            When ``name`` is not such a name or would resolve outside the root.
        """
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"{self._kind} name {name!r} is not a 32-hex-digit random name")
        return self._contained(name)

    def names(self) -> list[str]:
        """Names of the committed files (temporary and side files excluded), sorted."""
        try:
            return sorted(p.name for p in self.root.iterdir() if _NAME_RE.fullmatch(p.name))
        except OSError as exc:
            raise StoreUnavailableError(f"cannot list {self._kind} {self.root}: {_describe(exc)}") from exc

    def bytes_used(self) -> int:
        """Bytes held by committed files, as tracked since this object was opened."""
        with self._lock:
            return self._used

    def remove(self, name: str) -> None:
        """Remove a committed file (and its side file, if any); a missing file is not an error.

        Raises
        ------
        StoreUnavailableError
            When the file system refuses.
        """
        target = self.path(name)
        freed = 0
        try:
            for victim in (target, self._contained(name + _SIDE_SUFFIX)):
                try:
                    freed += victim.lstat().st_size
                    victim.unlink()
                except FileNotFoundError:
                    continue
        except OSError as exc:
            raise StoreUnavailableError(
                f"cannot remove a file from {self._kind} {self.root}: {_describe(exc)}"
            ) from exc
        finally:
            with self._lock:
                self._used = max(0, self._used - freed)

    def sweep_temps(self, older_than_s: float = 3600.0) -> int:
        """Remove temporary files left by a crash that are older than ``older_than_s``; returns how many.

        ``older_than_s=0`` removes every temporary file: only safe when no writer of this folder is
        running, i.e. at start while holding the data dir's lock (:mod:`ingest.adapters.datadir`).
        """
        cutoff = time.time() - older_than_s
        removed = 0
        try:
            with os.scandir(self.root) as it:
                for entry in it:
                    if (
                        entry.name.startswith(_TMP_PREFIX)
                        and (older_than_s <= 0 or entry.stat(follow_symlinks=False).st_mtime < cutoff)
                    ):
                        os.unlink(entry.path)
                        removed += 1
        except OSError as exc:
            raise StoreUnavailableError(f"cannot sweep {self._kind} {self.root}: {_describe(exc)}") from exc
        return removed

    # -- writing ---------------------------------------------------------------------------------------

    def _reserve(self, nbytes: int, *, quota: bool = True) -> None:
        with self._lock:
            if quota and self.max_bytes is not None and self._used + nbytes > self.max_bytes:
                raise QuotaExceededError(
                    f"{self._kind} {self.root} is over its quota of {self.max_bytes} bytes"
                )
            self._used += nbytes

    def _unreserve(self, nbytes: int) -> None:
        with self._lock:
            self._used = max(0, self._used - nbytes)

    def open_writer(self, *, hashed: bool = True) -> SpoolWriter:
        """Start a chunked write of one file (bounded memory for large objects).

        Parameters
        ----------
        hashed:
            Compute :attr:`SpoolFile.sha256` while writing; ``False`` leaves it ``""`` (the listener,
            whose header read digests the content anyway: ~1 ms per 512 KiB saved).

        Returns
        -------
        SpoolWriter
            Call :meth:`SpoolWriter.write` per chunk and then :meth:`SpoolWriter.commit`; leaving its
            ``with`` block without committing aborts it.

        Raises
        ------
        StoreUnavailableError
            When the temporary file cannot be created.
        """
        return SpoolWriter(self, hashed=hashed)

    def _would_exceed(self, nbytes: int) -> bool:
        with self._lock:
            return self.max_bytes is not None and self._used + nbytes > self.max_bytes

    def sync(self) -> None:
        """Make the names of files committed with ``sync_dir=False`` durable (one folder fsync).

        Raises
        ------
        StoreUnavailableError
            When the folder cannot be synced; those files must then be treated as not stored.
        """
        try:
            fsync_dir(self.root)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot sync the folder {self.root}: {_describe(exc)}") from exc

    def write(self, data: bytes) -> SpoolFile:
        """Write ``data`` durably under a new random name.

        Raises
        ------
        StoreUnavailableError
            Disk full, I/O error, quota exceeded...; nothing is left behind.
        """
        with self.open_writer() as writer:
            writer.write(data)
            return writer.commit()


class SpoolWriter:
    """One file being written: temp name, ``fsync``, ``rename``, ``fsync`` of the folder.

    Not thread-safe: one writer belongs to one thread. Obtain it from ``open_writer()``.
    """

    def __init__(self, folder: _PrivateFolder, *, quota: bool = True, hashed: bool = True) -> None:
        self._folder = folder
        self._quota = quota
        self.name = uuid.uuid4().hex
        # names made here (hex digits) cannot leave the resolved root, and the file is created with
        # O_EXCL | O_NOFOLLOW and renamed over nothing it would follow: no realpath per file (it walked
        # every component of the root; docs/architecture.md, "Performance facts")
        self._tmp = folder.root / f"{_TMP_PREFIX}{self.name}"
        self._final = folder.root / self.name
        self._hash = hashlib.sha256() if hashed else None
        self._size = 0
        self._fd: int | None = None
        self._done = False
        try:
            self._fd = os.open(self._tmp, _OPEN_FLAGS, _FILE_MODE)
            os.fchmod(self._fd, _FILE_MODE)  # whatever the umask: rw for the owner only, never executable
        except OSError as exc:
            self._cleanup()
            raise self._unavailable("cannot create a file in", exc) from exc

    def _unavailable(self, what: str, exc: OSError) -> StoreUnavailableError:
        return StoreUnavailableError(f"{what} {self._folder._kind} {self._folder.root}: {_describe(exc)}")

    def _cleanup(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                LOGGER.warning("Closing a temporary file in %s failed", self._folder.root)
            self._fd = None
        try:
            self._tmp.unlink(missing_ok=True)
        except OSError:
            LOGGER.warning("Could not remove temporary file %s", self._tmp)
        self._folder._unreserve(self._size)
        self._done = True

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """Append ``chunk``.

        Raises
        ------
        StoreUnavailableError
            On any ``OSError`` or when the folder's quota would be exceeded; the writer is then aborted.
        """
        if self._done or self._fd is None:
            raise ValueError("write() on a committed or aborted spool writer")
        view = memoryview(chunk).cast("B")
        try:
            self._folder._reserve(len(view), quota=self._quota)
        except StoreUnavailableError:
            self._cleanup()
            raise
        self._size += len(view)
        try:
            offset = 0
            while offset < len(view):
                offset += os.write(self._fd, view[offset:])
        except OSError as exc:
            self._cleanup()
            raise self._unavailable("cannot write to", exc) from exc
        if self._hash is not None:
            self._hash.update(view)

    def commit(self, *, sync_dir: bool = True) -> SpoolFile:
        """Make the file durable under its final name and return it.

        Parameters
        ----------
        sync_dir:
            ``False`` leaves the folder's fsync to the caller, who commits a batch of files and then calls
            :meth:`Spool.sync` once (the files are durable only after that call).

        Raises
        ------
        StoreUnavailableError
            When ``fsync``/``rename`` fails; the temporary file is removed.
        """
        if self._done or self._fd is None:
            raise ValueError("commit() on a committed or aborted spool writer")
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.rename(self._tmp, self._final)
        except OSError as exc:
            self._cleanup()
            raise self._unavailable("cannot commit a file to", exc) from exc
        try:
            if sync_dir:
                fsync_dir(self._folder.root)
        except OSError as exc:
            # The rename happened but may not survive a crash: not durable, so not accepted.
            try:
                self._final.unlink(missing_ok=True)
            except OSError:
                LOGGER.warning("Could not remove unsynced file %s", self._final)
            self._cleanup()
            raise self._unavailable("cannot sync the folder of", exc) from exc
        self._done = True
        digest = "" if self._hash is None else self._hash.hexdigest()
        return SpoolFile(self.name, self._final, self._size, digest)

    def abort(self) -> None:
        """Discard what was written; idempotent."""
        if not self._done:
            self._cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()


class Spool(_PrivateFolder):
    """Received instances, kept durably until the relay no longer needs them.

    Parameters
    ----------
    root:
        The spool folder (created ``0700``; an existing one is tightened to ``0700``).
    max_bytes:
        Optional quota; a write that would exceed it raises :class:`StoreUnavailableError` (the
        listener answers 0xA700, Out of Resources).

    Raises
    ------
    StoreUnavailableError
        When the folder cannot be created or read.
    """

    _kind = "spool"


class Quarantine(_PrivateFolder):
    """Rejected or conflicting inputs, each with a ``<name>.json`` side file saying why.

    The side file holds the reason code, the rule, the time, a detail message, the size, the SHA-256 (when
    the bytes were read), the source and whether the bytes were kept; never patient data (callers pass
    messages built from UIDs and rules only).

    Parameters
    ----------
    root:
        The quarantine folder (created ``0700``; an existing one is tightened to ``0700``).
    max_bytes:
        The quota of kept bytes (``[quarantine] max_bytes``); ``None`` for none. Past it, :meth:`put`
        writes the side file only (``"not_kept": "quarantine full"``).

    Attributes
    ----------
    not_kept:
        How many inputs this object recorded by side file only, since it was opened.
    """

    _kind = "quarantine"

    def __init__(self, root: Path, *, max_bytes: int | None = DEFAULT_QUARANTINE_BYTES) -> None:
        super().__init__(root, max_bytes=max_bytes)
        self.not_kept = 0

    def put(
        self,
        data_or_path: bytes | Path,
        reason: str,
        rule: str,
        detail: str,
        now: datetime,
        *,
        source: str | None = None,
    ) -> str:
        """Keep a copy of the bytes (or of the file at a path) and record why.

        When the copy would take the folder past its quota, the bytes are not kept: only the side file
        is written, with ``"kept": false`` and ``"not_kept": "quarantine full"``, and a warning is logged.

        Parameters
        ----------
        data_or_path:
            The bytes, or a file whose content is copied (the original is left in place).
        reason:
            Stable reason code (``HeaderError.reason``, ``"conflict"``, ...).
        rule:
            The rule that refused it (e.g. ``"other_content"``, ``"uid_grammar"``).
        detail:
            Human-readable message; no patient data.
        now:
            Timezone-aware time of the decision.
        source:
            Where the input came from (a drop-folder path, ``dimse:<calling AE>``), for the side file.

        Returns
        -------
        str
            The random name of the quarantined file (see :meth:`holds` for whether its bytes were kept).

        Raises
        ------
        StoreUnavailableError
            When the copy or the side file cannot be written durably (nothing is left behind).
        """
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        if isinstance(data_or_path, Path):
            try:
                size = data_or_path.stat().st_size
            except OSError as exc:
                raise StoreUnavailableError(
                    f"cannot read {data_or_path} into quarantine {self.root}: {_describe(exc)}"
                ) from exc
        else:
            size = len(data_or_path)
        if self._would_exceed(size):
            return self._side_only(size, reason, rule, detail, now, source, QUARANTINE_FULL)
        try:
            with self.open_writer() as writer:
                if isinstance(data_or_path, Path):
                    try:
                        for chunk in _read_chunks(data_or_path):
                            writer.write(chunk)
                    except OSError as exc:
                        raise StoreUnavailableError(
                            f"cannot read {data_or_path} into quarantine {self.root}: {_describe(exc)}"
                        ) from exc
                else:
                    writer.write(data_or_path)
                kept = writer.commit()
        except QuotaExceededError:  # other writers filled it meanwhile, or the file grew
            return self._side_only(size, reason, rule, detail, now, source, QUARANTINE_FULL)
        side = self._side(kept.name, reason, rule, detail, now, source, kept.size, kept.sha256, None)
        try:
            self._write_side(kept.name, side)
        except StoreUnavailableError:
            self.remove(kept.name)
            raise
        return kept.name

    def describe(
        self, size: int, reason: str, rule: str, detail: str, now: datetime, *, source: str | None = None
    ) -> str:
        """Record an input refused for its size by a side file only: its bytes are never copied.

        Parameters
        ----------
        size:
            The input's size in bytes.
        reason, rule, detail, now, source:
            As for :meth:`put`.

        Returns
        -------
        str
            The random name the side file is recorded under (``<name>.json``; no ``<name>`` file).

        Raises
        ------
        StoreUnavailableError
            When the side file cannot be written durably.
        """
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        return self._side_only(size, reason, rule, detail, now, source, OVER_SIZE_CAP)

    def holds(self, name: str) -> bool:
        """Whether the bytes of ``name`` were kept (``False`` for a side-file-only record)."""
        return self.path(name).is_file()

    def _side_only(
        self, size: int, reason: str, rule: str, detail: str, now: datetime, source: str | None, why: str
    ) -> str:
        name = uuid.uuid4().hex
        self._write_side(name, self._side(name, reason, rule, detail, now, source, size, None, why))
        self.not_kept += 1
        LOGGER.warning("quarantine: a rejected input (%s, rule %s, %d bytes) is not kept (%s), only its "
                       "side file %s.json", reason, rule, size, why, name)
        return name

    @staticmethod
    def _side(
        name: str,
        reason: str,
        rule: str,
        detail: str,
        now: datetime,
        source: str | None,
        size: int,
        sha256: str | None,
        not_kept: str | None,
    ) -> bytes:
        side: dict[str, object] = {
            "name": name,
            "reason": reason,
            "rule": rule,
            "time": now.astimezone(UTC).isoformat(),
            "detail": detail,
            "size": size,
            "sha256": sha256,
            "source": source,
            "kept": not_kept is None,
            "not_kept": not_kept,
        }
        return json.dumps(side, indent=2, sort_keys=True).encode()

    def _write_side(self, name: str, payload: bytes) -> None:
        # side files are small and always written, past the quota too: they say what was not kept
        with SpoolWriter(self, quota=False) as writer:
            writer.write(payload)
            tmp_committed = writer.commit()
        try:
            os.rename(tmp_committed.path, self._contained(name + _SIDE_SUFFIX))
            fsync_dir(self.root)
        except OSError as exc:
            self.remove(tmp_committed.name)
            raise StoreUnavailableError(
                f"cannot write a side file in quarantine {self.root}: {_describe(exc)}"
            ) from exc

    def reason(self, name: str) -> dict[str, object]:
        """The side file of a quarantined file, as a dict."""
        side = self._contained(self.path(name).name + _SIDE_SUFFIX)
        try:
            loaded: dict[str, object] = json.loads(side.read_bytes())
        except OSError as exc:
            raise StoreUnavailableError(
                f"cannot read a side file in quarantine {self.root}: {_describe(exc)}"
            ) from exc
        return loaded


def read_instance(store: StateStore, spool: Spool | None, sop_uid: str) -> bytes | None:
    """The Part 10 bytes of an accepted instance: in-row (``instance_bytes``) or its spool file.

    Parameters
    ----------
    store:
        The state store holding its row (and its bytes, for a small instance).
    spool:
        The spool folder its row's ``spool_name`` is in (``None``: in-row bytes only).
    sop_uid:
        Its SOP Instance UID.

    Returns
    -------
    bytes or None
        ``None`` when the instance is unknown or its bytes are kept nowhere any more (released).

    Raises
    ------
    StoreUnavailableError
        When the store or the spool file cannot be read.
    """
    data = store.instance_bytes(sop_uid)
    if data is not None:
        return data
    name = store.instance_spool_name(sop_uid)
    if name is None or spool is None:
        return None
    try:
        return spool.path(name).read_bytes()
    except FileNotFoundError:  # released by retention since the row was read
        return None
    except OSError as exc:
        raise StoreUnavailableError(f"cannot read a file of spool {spool.root}: {_describe(exc)}") from exc


def _read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(_COPY_CHUNK):
            yield chunk
