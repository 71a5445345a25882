"""Instance rows committed by a process of their own (``docs/architecture.md``, "Durability").

With several associations sending, the DICOM edge's event loop is busy with Python most of the time. A
commit writer thread beside it gives the interpreter lock up at every SQLite call and must win it back
from the loop: a transaction of two instances that takes 0.75 ms alone took 2.4-3.0 ms in
``ingest serve``. :class:`WriterProcess` runs :meth:`~ingest.ports.StateStore.add_instances` in a child
process with its own interpreter and its own connection to the same store; the loop writes a batch to
a socket, goes on reading other associations, and reads the outcome when the socket becomes readable
(:class:`ingest.intake.commit.EdgeCommit` decides which batches go there).

The contract is the store's: an outcome is read only after the transaction holding the rows committed
in the child; a failed transaction is :class:`~ingest.errors.StoreError` (its message, no stack), and a
store that cannot be reached stays :class:`~ingest.errors.StoreUnavailableError`. Store locks are the
database's own (SQLite's file locks, PostgreSQL's row locks): the child and this process may write at
the same time, as two nodes do.

The child is a new interpreter (``python -m ingest.adapters.state.writer``, never a fork of a process
running threads) on a socket pair; the store's settings go down the socket, not on its command line. It
ends when its socket closes, and at once, by the kernel, when the thread that started it ends
(``PR_SET_PDEATHSIG``, Linux; ``ingest serve`` starts it from its main thread):
the transaction of a killed ``ingest serve`` never commits after a new one has started and swept the
spool. A child that dies fails the batch it held with ``StoreUnavailableError``: its rows may have
committed or not, and nothing of it was acknowledged (the sender that sends again gets "duplicate" or a
new row).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

from ingest.core.records import RecordRow
from ingest.errors import StoreError, StoreUnavailableError
from ingest.ports import Added

__all__ = ["WriterProcess", "main"]

LOGGER = logging.getLogger(__name__)

_PR_SET_PDEATHSIG: Final = 1  # <linux/prctl.h>
#: Seconds :meth:`WriterProcess.close` waits for the child to finish its batch and close its store.
_JOIN_S: Final = 10.0
#: Seconds the child has to open its store before it is given up (commits then stay in this process).
_START_S: Final = 60.0

_Row = tuple[RecordRow, str, str | None, str]


def _die_with_parent(parent: int) -> None:
    """SIGKILL from the kernel when the process that started this one ends; end now if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


def _failure(exc: BaseException) -> tuple[str, bool, str]:
    """The child's answer for a failure: its kind and message only (no stack crosses)."""
    return ("error", isinstance(exc, StoreUnavailableError), f"{exc}")


def _error(unavailable: bool, detail: str) -> StoreError:
    """The parent's error for a failure the child answered (:func:`_failure`)."""
    return (StoreUnavailableError if unavailable else StoreError)(detail)


def _serve(conn: Connection) -> None:
    """The child: its settings, then its store, then one batch in and its outcome out until the socket
    closes."""
    url, data_dir, node, parent = pickle.loads(conn.recv_bytes())
    _die_with_parent(parent)
    from ingest.adapters.state import open_state_store

    try:
        store = open_state_store(url, Path(data_dir), node=node)
    except BaseException as exc:  # the parent raises it as its own error
        conn.send_bytes(pickle.dumps(_failure(exc)))
        return
    try:
        conn.send_bytes(pickle.dumps(("ready", False, "")))
        while True:
            try:
                request = conn.recv_bytes()
            except (EOFError, OSError):
                return
            rows, now, due_at, inline = pickle.loads(request)
            try:
                reply: tuple[str, bool, Any] = (
                    "ok", False, store.add_instances(rows, now=now, due_at=due_at, inline=inline)
                )
            except Exception as exc:  # this batch fails; the next one may commit
                reply = _failure(exc)
            conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        store.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ingest.adapters.state.writer FD``: the child, on the socket ``FD`` it inherited."""
    args = sys.argv[1:] if argv is None else argv
    # stopping is the parent's: Ctrl-C and a service manager's SIGTERM reach the whole group, and the
    # child ends when the parent closes the socket (or dies: _die_with_parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _serve(Connection(int(args[0])))
    return 0


class WriterProcess:
    """A child process that commits :meth:`~ingest.ports.StateStore.add_instances` batches (module doc).

    One batch at a time: :meth:`send`, then :meth:`receive` once :meth:`fileno` is readable (or at once,
    blocking). Not thread-safe: one owner (the edge's event loop) drives it.

    Parameters
    ----------
    url, data_dir, node:
        How the child opens the store (:func:`ingest.adapters.state.open_state_store`): the same ones this
        process opened its own with.
    """

    def __init__(self, *, url: str | None, data_dir: Path, node: str | None) -> None:
        self._args = (url, str(data_dir), node)
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._process: Any = None
        self._broken = False
        self._closed = False
        self._ready = threading.Event()
        self._settled = threading.Event()  # ready, or failed to start
        self._error: StoreError | None = None
        self.pid: int | None = None

    def start(self, timeout_s: float = _START_S) -> None:
        """:meth:`launch` then :meth:`wait_ready`.

        Raises
        ------
        StoreError, StoreUnavailableError
            When the child could not be started or could not open the store.
        """
        self.launch(timeout_s)
        self.wait_ready()

    def launch(self, timeout_s: float = _START_S) -> None:
        """Start the child (``python -m ingest.adapters.state.writer``), hand it the store's settings, and
        return; a thread of this process waits (at most ``timeout_s``) for the child to have opened its
        store, and it is :attr:`running` from then on. A child that cannot be started or does not get
        there is logged (one warning: commits stay in this process), closed, and never :attr:`running`;
        :meth:`wait_ready` raises its error.

        The kernel ends the child when the thread that calls this ends (``PR_SET_PDEATHSIG``): call it
        from the thread that lives as long as the writer is used (``ingest serve``'s main thread).
        """
        ours, theirs = socket.socketpair()
        try:
            with theirs:
                process = subprocess.Popen(
                    [sys.executable, "-m", "ingest.adapters.state.writer", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                )
        except OSError as exc:
            ours.close()
            self._settle(StoreUnavailableError(f"it could not be run: {exc}"))
            return
        conn = Connection(ours.detach())
        self._conn, self._process, self.pid = conn, process, process.pid
        try:
            # the settings go down the socket, not on the command line (a PostgreSQL URL may hold a password)
            conn.send_bytes(pickle.dumps((*self._args, os.getpid())))
        except OSError as exc:
            self._settle(StoreUnavailableError(f"it ended ({exc!r})"))
            return
        threading.Thread(
            target=self._await_ready, args=(conn, timeout_s), name="ingest-writer-start", daemon=True
        ).start()

    def _await_ready(self, conn: Connection, timeout_s: float) -> None:
        """Read the child's first answer (on a thread of its own: the child imports and opens its store)."""
        error: StoreError | None = None
        deadline = time.monotonic() + timeout_s
        try:
            while not conn.poll(0.1):
                if self._closed:
                    raise StoreUnavailableError("closed before it had started")
                if time.monotonic() > deadline:
                    raise StoreUnavailableError(f"no answer in {timeout_s:g} s")
            kind, unavailable, detail = pickle.loads(conn.recv_bytes())
            if kind != "ready":
                error = _error(unavailable, detail)
        except (EOFError, OSError) as exc:
            error = StoreUnavailableError(f"it ended ({exc!r})")
        except StoreUnavailableError as exc:
            error = exc
        self._settle(error)

    def _settle(self, error: StoreError | None) -> None:
        """The start's outcome: ready, or (unless closed meanwhile) one warning and the child closed."""
        if error is not None and not self._closed:
            LOGGER.warning("the state store's writer process did not start (%s); commits stay in this "
                           "process", error)
            self.close()
        elif error is None and not self._closed:
            self._ready.set()
            LOGGER.debug("state store writer process %d ready", self.pid)
        self._error = error
        self._settled.set()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until the child has opened its store, or has failed to.

        Raises
        ------
        StoreError, StoreUnavailableError
            When the child could not open the store, ended, or did not answer in time.
        """
        if not self._settled.wait(timeout_s):
            raise StoreUnavailableError("the state store's writer process has not answered yet")
        if self._error is not None:
            raise self._error

    @property
    def running(self) -> bool:
        """Whether the child has opened its store and has not been lost or closed."""
        return self._ready.is_set() and self._conn is not None and not self._broken

    def fileno(self) -> int:
        """The socket's descriptor (valid until :meth:`close`): readable when the outcome of the batch
        sent is there."""
        return self._connection().fileno()

    def _connection(self) -> Connection:
        if self._conn is None or not self.running:
            raise StoreUnavailableError("the state store's writer process is not running")
        return self._conn

    def send(
        self, rows: Sequence[_Row], *, now: datetime, due_at: datetime, inline: Sequence[bytes | None] | None
    ) -> None:
        """Hand the child one batch (:meth:`~ingest.ports.StateStore.add_instances`'s arguments).

        Raises
        ------
        StoreUnavailableError
            When the child is gone (it is then not :attr:`running`; :meth:`close` it).
        """
        conn = self._connection()
        request = pickle.dumps(
            (list(rows), now, due_at, None if inline is None else list(inline)),
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        try:
            conn.send_bytes(request)
        except OSError as exc:
            self._broken = True
            raise StoreUnavailableError(f"the state store's writer process is gone: {exc!r}") from exc

    def receive(self) -> list[Added]:
        """The outcome of the batch sent: one :class:`~ingest.ports.Added` per row, once committed.

        Raises
        ------
        StoreError, StoreUnavailableError
            The transaction's failure; ``StoreUnavailableError`` also when the child died holding the
            batch (it is then not :attr:`running`; :meth:`close` it).
        """
        conn = self._connection()
        try:
            kind, unavailable, value = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError) as exc:
            self._broken = True
            raise StoreUnavailableError(
                f"the state store's writer process ended holding a transaction: {exc!r}"
            ) from exc
        if kind != "ok":
            raise _error(unavailable, value)
        added: list[Added] = value
        return added

    def close(self) -> None:
        """Close the socket; the child finishes the batch it holds, closes its store and exits (joined; a
        child that does not end in time is killed). Idempotent."""
        with self._lock:
            self._closed = True
            conn, process, self._conn, self._process = self._conn, self._process, None, None
        if conn is not None:
            conn.close()
        if process is not None:
            try:
                process.wait(_JOIN_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(_JOIN_S)


if __name__ == "__main__":
    sys.exit(main())
