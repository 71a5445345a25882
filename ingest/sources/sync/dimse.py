"""The C-FIND SCU of ``ingest sync --from dimse://CALLED_AE@HOST:PORT`` (Study Root, pynetdicom).

Each querying thread keeps one association open and asks its queries on it, one after the other (the
run bounds how many threads query at once); a query that fails aborts it (the next one opens another),
and :meth:`DimseFinder.close` releases them all.
Answers with a pending status (0xFF00 / 0xFF01) are the matches; the final status decides the rest:
success (0x0000) is a complete answer; cancel (0xFE00, what Orthanc ends an answer cut at
``LimitFindResults`` with) or a warning (0x0001, 0xBxxx) is an answer cut short (the study level splits
its window); anything else, a refused association, a timeout or a lost connection raises
:class:`~ingest.errors.SyncSourceError` naming the source and the query. Never C-MOVE, C-GET.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from typing import Any

from pydicom.dataset import Dataset

from ingest.errors import SyncSourceError
from ingest.logs import printable
from ingest.sources.sync.answers import identifier

__all__ = ["DimseFinder", "parse_dimse_url"]

LOGGER = logging.getLogger(__name__)


def parse_dimse_url(url: str) -> tuple[str, str, int]:
    """``dimse://CALLED_AE@HOST:PORT`` -> (called AE, host, port).

    Raises
    ------
    ValueError
        When ``url`` is not of that form.
    """
    rest = url.removeprefix("dimse://")
    ae, sep, hostport = rest.rpartition("@")
    host, colon, port = hostport.rpartition(":")
    if not url.startswith("dimse://") or not sep or not colon or not ae or not host or not port.isdigit():
        raise ValueError(f"{url!r} is not dimse://CALLED_AE@HOST:PORT")
    if not 0 < int(port) < 65536 or len(ae) > 16 or "\\" in ae:
        raise ValueError(f"{url!r}: bad port or AE title")
    return ae, host.strip("[]"), int(port)


def _query_text(query: Dataset) -> str:
    """The matching keys of ``query`` (no return keys, no patient values: the level, UIDs and dates)."""
    shown = [
        f"{key}={query.get(key)}"
        for key in ("QueryRetrieveLevel", "StudyInstanceUID", "SeriesInstanceUID", "StudyDate")
        if query.get(key)
    ]
    return printable(" ".join(shown))


class _HeldCheckpoint(threading.Event):
    """pynetdicom's reactor checkpoint of an association this SCU owns, kept closed between queries.

    pynetdicom's association thread (its "reactor") takes every DIMSE message off the queue whenever its
    checkpoint is open, as a request to serve. ``send_c_find`` closes it and waits for a flag the reactor
    sets just before it blocks, which the reactor also still shows for a moment after it passed: a
    C-FIND answer arriving in that moment is taken by the reactor, logged as an unexpected message and
    dropped, and the query ends without it (a silently missing match). Held, the checkpoint stays closed
    from before the first query (:meth:`wait_blocked`: the reactor is inside :meth:`wait`) until
    :meth:`let_go`; an abort or a kill still opens it, so the association thread can end.
    """

    def __init__(self, assoc: Any) -> None:
        super().__init__()
        self._assoc = assoc
        self._held = True
        self._waiting = 0

    def wait(self, timeout: float | None = None) -> bool:
        self._waiting += 1
        try:
            return super().wait(timeout)
        finally:
            self._waiting -= 1

    def set(self) -> None:
        ending = getattr(self._assoc, "_kill", False) or getattr(self._assoc, "_sent_abort", False)
        if not self._held or ending:
            super().set()

    def wait_blocked(self, timeout: float) -> bool:
        """Wait until the reactor is blocked on this checkpoint; ``False`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self._waiting:
            if time.monotonic() >= deadline or not self._assoc.is_established:
                return False
            time.sleep(0.0005)
        return True

    def let_go(self) -> None:
        """Open the checkpoint for good (after the release: the association thread ends)."""
        self._held = False
        super().set()


def _no_delay(assoc: Any) -> None:
    """``TCP_NODELAY`` on the association's socket: a C-FIND request is a command and an identifier
    written one after the other, which Nagle's algorithm would hold back until the peer's delayed ACK
    (~40 ms per query); a quick ACK is armed too (Linux), for the peer's first answers."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        quick = getattr(socket, "TCP_QUICKACK", None)
        if quick is not None:
            sock.setsockopt(socket.IPPROTO_TCP, quick, 1)


class DimseFinder:
    """C-FIND at study, series and image level against one PACS."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        calling_ae: str,
        timeout_s: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # (made at import)
            StudyRootQueryRetrieveInformationModelFind,
        )

        self.name = name
        self.called_ae, self.host, self.port = parse_dimse_url(url)
        self._model = StudyRootQueryRetrieveInformationModelFind
        ae = AE(ae_title=calling_ae)
        ae.add_requested_context(self._model)
        ae.acse_timeout = timeout_s
        ae.dimse_timeout = timeout_s
        ae.network_timeout = timeout_s
        self._ae = ae
        self._tls = tls
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[Any] = []

    def where(self) -> str:
        return f"{printable(self.called_ae)}@{self.host}:{self.port}"

    def _association(self, what: str) -> Any:
        """This thread's open association (one per querying thread, reused), opened when needed."""
        assoc = getattr(self._local, "assoc", None)
        if assoc is not None and assoc.is_established:
            return assoc
        kwargs: dict[str, Any] = {"ae_title": self.called_ae}
        if self._tls is not None:
            kwargs["tls_args"] = (self._tls, self.host)  # the certificate must name the host
        assoc = self._ae.associate(self.host, self.port, **kwargs)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
            raise SyncSourceError(f"{what}: association {why}")
        _no_delay(assoc)
        held = _HeldCheckpoint(assoc)
        assoc._reactor_checkpoint = held
        if not held.wait_blocked(5.0):
            held.let_go()
            assoc.abort()
            raise SyncSourceError(f"{what}: the association did not become ready")
        self._local.assoc = assoc
        with self._lock:
            self._open.append(assoc)
        return assoc

    def ask(self, level: str, keys: tuple[str, ...], matching: dict[str, str], limit: int | None
            ) -> tuple[list[Dataset], bool]:
        """:class:`~ingest.sources.sync.run.Finder`: C-FIND ``level`` for ``keys`` (``limit`` is the
        PACS's own: C-FIND has none)."""
        return self.find(identifier(level, keys, **matching))

    def find(self, query: Dataset) -> tuple[list[Dataset], bool]:
        """Ask ``query``; (the matches, whether the answer was complete)."""
        what = f"source {self.name}: C-FIND {_query_text(query)} at {self.where()}"
        assoc = self._association(what)
        answers: list[Dataset] = []
        final: int | None = None
        try:
            for status, ds in assoc.send_c_find(query, self._model):
                if not status:  # pynetdicom: no response within dimse_timeout, or the connection went
                    raise SyncSourceError(f"{what}: no answer (timeout or connection lost)")
                code = int(status.Status)
                if code in (0xFF00, 0xFF01):
                    if ds is not None:
                        answers.append(ds)
                else:
                    final = code
        except BaseException:
            self._local.assoc = None
            if assoc.is_established:
                assoc.abort()
            assoc._reactor_checkpoint.let_go()
            raise
        if final == 0x0000:
            return answers, True
        if final is not None and (final == 0xFE00 or final == 0x0001 or 0xB000 <= final <= 0xBFFF):
            LOGGER.info("%s: answer cut short (status 0x%04X) after %d matches", what, final, len(answers))
            return answers, False
        shown = "none" if final is None else f"0x{final:04X}"
        raise SyncSourceError(f"{what}: failed with status {shown}")

    def close(self) -> None:
        """Release every association the querying threads opened."""
        with self._lock:
            opened, self._open = self._open, []
        for assoc in opened:
            if assoc.is_established:
                assoc.release()
            checkpoint = assoc._reactor_checkpoint
            if isinstance(checkpoint, _HeldCheckpoint):
                checkpoint.let_go()
