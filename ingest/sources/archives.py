"""Archives as sources: ``.zip``, ``.tar``, ``.tar.gz``/``.tgz`` read member by member, never unpacked.

Each member's bytes become an :class:`~ingest.sources.parse.Item` labelled ``<archive>!<member>``; nothing is
written to disk, so a hostile member name can never land outside a target folder. The members are still
checked as if they were to be extracted (``docs/reliability.md``, Security), so that a refusal is
reported, not silently ignored:

- a name that escapes the root (``../x``, ``/etc/x``, ``C:\\x``) -> rule ``unsafe_path``;
- a symbolic or hard link member -> rule ``link``;
- a device, FIFO or other non-regular member -> rule ``special_file``;
- an encrypted zip member -> rule ``encrypted``;
- a member larger than :attr:`ArchiveLimits.max_member_bytes` -> rule ``member_size``;
- a zip member whose declared size is more than :attr:`ArchiveLimits.max_ratio` times its compressed
  size -> rule ``compression_ratio``.

Tar members additionally pass :func:`tarfile.data_filter` (``filter="data"`` semantics). A refused
member is yielded as an item carrying a rejection (reason ``archive_member``), which replay reports
with the archive, the member and the rule; the other members are still read.

A refused whole archive raises :class:`ingest.errors.ArchiveError`: unreadable or corrupt, too many
members (:attr:`ArchiveLimits.max_members`), too many bytes in total
(:attr:`ArchiveLimits.max_total_bytes`), or a compressed tar stream that inflates more than
:attr:`ArchiveLimits.max_ratio` times its size on disk. A zip's central directory is checked before any
member is read; a tar stream is checked as it is read, so members before the breach were already
yielded.

Members are read in bounded chunks and judged after each one, whatever their headers claim: a member
stops at ``max_member_bytes``, and the ratio of bytes inflated so far to compressed bytes consumed so far
(for zip, the member's part of the file; for a compressed tar, the whole stream's position) is checked
while streaming, so a bomb is refused after about one chunk past the rule, never after inflating it.
"""

from __future__ import annotations

import posixpath
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

from ingest.errors import ArchiveError
from ingest.sources.parse import Item

__all__ = ["MEMBER_REASON", "ArchiveLimits", "is_archive", "iter_members"]

_SUFFIXES: Final = (".zip", ".tar", ".tar.gz", ".tgz")
#: The rejection reason of a refused member (the rule is in the message).
MEMBER_REASON: Final = "archive_member"
#: Ratios are only judged above this size: tiny members compress oddly without being bombs.
_RATIO_FLOOR: Final = 1024 * 1024
_READ_CHUNK: Final = 1024 * 1024
#: Zip members are read in smaller chunks: ``ZipExtFile`` reads ahead about one chunk of compressed
#: bytes, and the ratio judged while streaming must not wait for hundreds of MiB of output.
_ZIP_CHUNK: Final = 64 * 1024
#: A destination that is never created, only used to let ``tarfile.data_filter`` judge member names.
_VIRTUAL_ROOT: Final = "/nonexistent-ingest-archive-root"


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps that refuse archive bombs.

    Attributes
    ----------
    max_members:
        Most members (files, folders, links...) an archive may hold.
    max_total_bytes:
        Most uncompressed bytes of all members together.
    max_member_bytes:
        Largest single member (its bytes are held in memory while its header is parsed).
    max_ratio:
        Largest uncompressed/compressed size ratio: per member for zip, for the whole stream for a
        compressed tar (judged only above 1 MiB of output).
    """

    max_members: int = 1_000_000
    max_total_bytes: int = 64 * 1024**3
    max_member_bytes: int = 2 * 1024**3
    max_ratio: float = 250.0


DEFAULT_LIMITS: Final = ArchiveLimits()


def is_archive(path: Path) -> bool:
    """Whether ``path`` is a file whose name says zip, tar or gzip-compressed tar.

    Parameters
    ----------
    path:
        Any path given to ``ingest replay``.
    """
    name = path.name.lower()
    return path.is_file() and name.endswith(_SUFFIXES)


def iter_members(path: Path, limits: ArchiveLimits = DEFAULT_LIMITS) -> Iterator[Item]:
    """Yield every regular member of an archive as an :class:`Item` with its bytes, in archive order.

    Parameters
    ----------
    path:
        A ``.zip``, ``.tar``, ``.tar.gz`` or ``.tgz`` file.
    limits:
        The caps against archive bombs.

    Yields
    ------
    Item
        ``Item(label="<archive>!<member>", data=...)``, or for a refused member
        ``Item(label=..., rejection=("archive_member", message))``; folders are skipped.

    Raises
    ------
    ArchiveError
        The whole archive is refused (unreadable, corrupt, or over a cap); the message names the
        archive and the rule.
    """
    if path.name.lower().endswith(".zip"):
        yield from _zip_members(path, limits)
    else:
        yield from _tar_members(path, limits)


# --------------------------------------------------------------------------------------------------
# member checks shared by both formats


def _unsafe_name(name: str) -> str | None:
    """Why ``name`` would leave the extraction root, or ``None`` when it stays inside."""
    if "\x00" in name:
        return "contains a NUL character"
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) >= 2 and unified[1] == ":"):
        return "is an absolute path"
    normalised = posixpath.normpath(unified)
    if normalised == ".." or normalised.startswith("../") or ".." in unified.split("/"):
        return "escapes the archive root with '..'"
    return None


def _refused(archive: Path, member: str, rule: str, why: str) -> Item:
    label = f"{archive}!{member}"
    message = f"archive {archive}: member {member!r} refused (rule {rule}): {why}"
    return Item(label=label, rejection=(MEMBER_REASON, message))


def _too_many(archive: Path, count: int, limits: ArchiveLimits) -> ArchiveError:
    return ArchiveError(
        f"archive {archive} refused (rule max_members): more than {limits.max_members} members ({count})"
    )


def _too_big(archive: Path, total: int, limits: ArchiveLimits) -> ArchiveError:
    return ArchiveError(
        f"archive {archive} refused (rule max_total_bytes): members hold more than "
        f"{limits.max_total_bytes} bytes uncompressed ({total})"
    )


# --------------------------------------------------------------------------------------------------
# zip: the central directory is checked before anything is read


def _zip_mode(info: zipfile.ZipInfo) -> int:
    # The high 16 bits of the external attributes hold the Unix st_mode when made on Unix (APPNOTE 4.4.15)
    return (info.external_attr >> 16) & 0xFFFF if info.create_system == 3 else 0


def _zip_members(path: Path, limits: ArchiveLimits) -> Iterator[Item]:
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise ArchiveError(f"archive {path} refused (rule readable): {exc.strerror or exc}") from exc
    try:
        zf = zipfile.ZipFile(raw)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raw.close()
        raise ArchiveError(f"archive {path} refused (rule readable): not a readable zip file: {exc}") from exc
    with raw, zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise _too_many(path, len(infos), limits)
        total = sum(i.file_size for i in infos)
        if total > limits.max_total_bytes:
            raise _too_big(path, total, limits)
        for info in infos:
            name = info.filename
            mode = _zip_mode(info)
            why = _unsafe_name(name)
            if why is not None:
                yield _refused(path, name, "unsafe_path", why)
            elif stat.S_ISLNK(mode):
                yield _refused(path, name, "link", "symbolic link members are not read")
            elif info.is_dir() or stat.S_ISDIR(mode):
                continue
            elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # no type bits: a plain file
                yield _refused(path, name, "special_file", f"not a regular file (mode {mode:o})")
            elif info.flag_bits & 0x1:
                yield _refused(path, name, "encrypted", "encrypted members are not read")
            elif info.file_size > limits.max_member_bytes:
                yield _refused(path, name, "member_size",
                               f"{info.file_size} bytes, over the cap of {limits.max_member_bytes}")
            elif info.file_size > _RATIO_FLOOR and info.file_size > limits.max_ratio * max(
                info.compress_size, 1
            ):
                yield _refused(path, name, "compression_ratio",
                               f"{info.file_size} bytes from {info.compress_size} compressed: ratio over "
                               f"{limits.max_ratio:g}")
            else:
                yield _zip_read(path, zf, raw, info, limits)


def _zip_read(path: Path, zf: zipfile.ZipFile, raw: IO[bytes], info: zipfile.ZipInfo,
              limits: ArchiveLimits) -> Item:
    """Read one zip member in bounded chunks, judging its size and ratio as it inflates.

    ``ZipExtFile`` stops at the declared ``file_size`` and checks the CRC at the end, but one large
    ``read()`` inflates everything the compressed bytes hold first; small reads keep the memory bounded
    whatever the headers claim. The compressed bytes consumed so far are the position of ``raw`` past the
    member's data start (read-ahead makes that an over-estimate, so a real member is never judged
    early).
    """
    name = info.filename
    parts: list[bytes] = []
    out = 0
    try:
        with zf.open(info) as fh:
            start = raw.tell()  # just past the local header: the first compressed byte
            while chunk := fh.read(_ZIP_CHUNK):
                out += len(chunk)
                if out > limits.max_member_bytes:
                    return _refused(path, name, "member_size",
                                    f"inflates past the cap of {limits.max_member_bytes} bytes")
                consumed = min(max(raw.tell() - start, 1), max(info.compress_size, 1))
                if out > _RATIO_FLOOR and out > limits.max_ratio * consumed:
                    return _refused(path, name, "compression_ratio",
                                    f"{out} bytes inflated from {consumed} compressed: ratio over "
                                    f"{limits.max_ratio:g}")
                parts.append(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, ValueError) as exc:
        return _refused(path, name, "readable", f"cannot read member: {exc}")
    return Item(label=f"{path}!{name}", data=b"".join(parts))


# --------------------------------------------------------------------------------------------------
# tar: streamed ("r|*"), so a .tar.gz is inflated once, member after member


class _CountingReader:
    """A read-only file wrapper that counts the bytes read from disk (for the compression ratio)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.consumed = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.consumed += len(data)
        return data

    def close(self) -> None:
        self._raw.close()


def _tar_members(path: Path, limits: ArchiveLimits) -> Iterator[Item]:
    compressed = not path.name.lower().endswith(".tar")
    try:
        raw = path.open("rb")
    except OSError as exc:
        raise ArchiveError(f"archive {path} refused (rule readable): {exc.strerror or exc}") from exc
    counter = _CountingReader(raw)
    try:
        with _open_tar(path, counter) as tf:
            yield from _tar_stream(path, tf, counter, compressed, limits)
    finally:
        counter.close()


def _open_tar(path: Path, counter: _CountingReader) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=counter, mode="r|*")  # type: ignore[call-overload,no-any-return]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"archive {path} refused (rule readable): not a readable tar file: {exc}") from exc


def _tar_stream(
    path: Path, tf: tarfile.TarFile, counter: _CountingReader, compressed: bool, limits: ArchiveLimits
) -> Iterator[Item]:
    count = 0
    total = 0
    while True:
        try:
            member = tf.next()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ArchiveError(f"archive {path} refused (rule readable): corrupt after {count} members: "
                               f"{exc}") from exc
        if member is None:
            return
        count += 1
        if count > limits.max_members:
            raise _too_many(path, count, limits)
        name = member.name
        why = _unsafe_name(name)
        if why is not None:
            yield _refused(path, name, "unsafe_path", why)
            continue
        if member.issym() or member.islnk():
            yield _refused(path, name, "link", f"link member (to {member.linkname!r}) is not read")
            continue
        if member.isdir():
            continue
        if not member.isreg():
            yield _refused(path, name, "special_file", "device, FIFO or other non-regular member")
            continue
        try:
            # filter="data" semantics (PEP 706): the same judgement extraction would make
            tarfile.data_filter(member, _VIRTUAL_ROOT)
        except tarfile.FilterError as exc:
            yield _refused(path, name, "data_filter", str(exc))
            continue
        if member.size > limits.max_member_bytes:
            yield _refused(path, name, "member_size",
                           f"{member.size} bytes, over the cap of {limits.max_member_bytes}")
            continue
        if total + member.size > limits.max_total_bytes:
            raise _too_big(path, total + member.size, limits)

        def judge(out: int, member_name: str = name, before: int = total) -> None:
            # bytes inflated so far (earlier members and this one's chunks) against the stream read
            inflated = before + out
            if compressed and inflated > _RATIO_FLOOR and inflated > limits.max_ratio * max(
                counter.consumed, 1
            ):
                raise ArchiveError(
                    f"archive {path} refused (rule compression_ratio): member {member_name!r}: "
                    f"{inflated} bytes inflated from {counter.consumed} read, ratio over "
                    f"{limits.max_ratio:g}"
                )

        try:
            fh = tf.extractfile(member)
            data = b"" if fh is None else _read_all(fh, member.size, judge)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ArchiveError(f"archive {path} refused (rule readable): member {name!r} is cut short: "
                               f"{exc}") from exc
        total += member.size
        yield Item(label=f"{path}!{name}", data=data)


def _read_all(fh: IO[bytes], size: int, judge: Callable[[int], None]) -> bytes:
    """Read ``size`` bytes in bounded chunks, calling ``judge(bytes_so_far)`` after each (it raises to
    stop: a bomb is refused after one chunk past the rule, never after inflating the whole member)."""
    parts: list[bytes] = []
    left = size
    while left > 0:
        chunk = fh.read(min(left, _READ_CHUNK))
        if not chunk:
            raise EOFError(f"expected {size} bytes, got {size - left}")
        left -= len(chunk)
        judge(size - left)
        parts.append(chunk)
    return b"".join(parts)

