"""The files ``ingest replay`` read (docs/architecture.md "Replay"), on the shared SQL rules of
:mod:`ingest.adapters.state.sql`.

One ``replay_files`` row per file path: its size and modification time (nanoseconds) as ``os.stat`` gave
them before the file was read, the content digest and SOP Instance UID of the instance it carried, and
its study. A rerun stats each input file; a file with the same size and mtime as its row, whose instance
row still holds that same digest, is known without reading it again. Anything else (another size or
mtime, an instance replaced or rejected since, a digest that changed) means the file is read and
admitted as usual, and its row rewritten.
"""

from __future__ import annotations

from collections.abc import Sequence

from ingest.adapters.state.sql import SQLStateStore, in_chunks
from ingest.ports import FileIdentity

__all__ = ["FileIdentityStore"]


class FileIdentityStore(SQLStateStore):
    """:class:`ingest.ports.FileIdentityState` for any SQL dialect."""

    def unchanged_files(self, stats: Sequence[tuple[str, int, int]]) -> dict[str, str]:
        """The files of ``stats`` (``(path, size, mtime_ns)``) known unchanged: path -> Study Instance UID.

        A file is unchanged when its row records the same size and mtime and the instance it carried
        is still stored with the digest recorded for the file.
        """
        wanted = {path: (size, mtime_ns) for path, size, mtime_ns in stats}
        paths = sorted(wanted)
        found: dict[str, str] = {}
        with self._use("unchanged_files") as cur:
            for chunk, marks in in_chunks(paths):
                rows = cur.execute(
                    self._q(
                        "SELECT f.path, f.size, f.mtime_ns, f.study_uid FROM replay_files f "
                        "JOIN instances i ON i.sop_uid = f.sop_uid AND i.digest = f.digest "
                        f"AND i.study_uid = f.study_uid WHERE f.path IN ({marks})"
                    ),
                    chunk,
                ).fetchall()
                for path, size, mtime_ns, study_uid in rows:
                    if wanted.get(str(path)) == (int(size), int(mtime_ns)):
                        found[str(path)] = str(study_uid)
        return found

    def remember_files(self, files: Sequence[FileIdentity]) -> None:
        """Insert or replace one row per file, in one transaction (the last of a repeated path wins)."""
        if not files:
            return
        latest = {f.path: f for f in files}
        with self._write("remember_files") as cur:
            cur.executemany(
                self._q(
                    "INSERT INTO replay_files (path, size, mtime_ns, digest, sop_uid, study_uid) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET size = excluded.size, "
                    "mtime_ns = excluded.mtime_ns, digest = excluded.digest, sop_uid = excluded.sop_uid, "
                    "study_uid = excluded.study_uid"
                ),
                [(f.path, f.size, f.mtime_ns, f.digest, f.sop_uid, f.study_uid) for f in latest.values()],
            )
