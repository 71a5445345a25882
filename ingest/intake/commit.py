"""Group commit: concurrent admissions share one transaction (``docs/architecture.md``, Durability).

Each C-STORE needs its instance's row, and a small instance's bytes, durable before it is answered.
One SQLite WAL commit with ``synchronous=FULL`` costs about a millisecond, nearly all of it the fsync;
a PostgreSQL commit a round trip and a WAL flush. When several associations deliver at once,
:class:`GroupCommit` puts every candidate that is waiting into one
:meth:`ingest.intake.admit.Admission.admit` call: one transaction, one fsync, for all their rows and
bytes. Each caller gets back its own :class:`~ingest.intake.admit.Admitted` only after the transaction
that holds its row has committed, so the durability contract is unchanged.

One writer thread commits: it takes the queue (at most :attr:`GroupCommit.max_batch` candidates and
:attr:`GroupCommit.max_batch_bytes` of in-row bytes), commits it, completes every waiter's future and
takes what queued meanwhile. The DICOM edge hands it candidates from its event loop
(:meth:`GroupCommit.submit`, awaited, so the loop never waits for an fsync and no worker thread holds the
interpreter lock while it parses); a thread can wait for its own (:meth:`GroupCommit.admit`). With one
association each transaction carries one instance; with many, the candidates of the others queue while
one fsync runs and share the next. Admission's rules (duplicate, conflict,
quarantine, metrics, the relay's wake) stay in :class:`~ingest.intake.admit.Admission`: this module only
decides which candidates share a transaction.

When the transaction fails, every candidate of the batch gets the store's error (the admission has
removed their spool copies): each source answers it as it would its own failure (0xA700).

:class:`EdgeCommit` is how the DICOM edge's event loop commits the instances it reads itself (bytes
committed with their rows). It forms the batches on the loop, one transaction in flight at a time, and
sends each one where it costs least: with one association storing, to the writer thread above (the loop
has nothing else to do while it commits, and a thread is the quicker hand-off); with several, to a
writer process (:class:`~ingest.ports.RowWriter`), whose SQLite calls do not have to win the
interpreter lock back from a busy loop (``docs/architecture.md``, "Performance facts"). The loop reads
the process's outcome when its socket becomes readable and settles it (:meth:`Admission.settle`); a
settlement that would touch a disk or the store (a conflict, an IOCM release) runs on a worker thread.
Rejection notes and spooled instances always take the thread, where the admission's whole path runs.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from ingest.errors import StoreError, StoreUnavailableError
from ingest.intake.admit import Admission, Admitted, Candidate
from ingest.ports import RowWriter

__all__ = ["EdgeCommit", "GroupCommit"]

LOGGER = logging.getLogger(__name__)


def _in_row_bytes(item: Candidate) -> int:
    return len(item.data) if item.data is not None else 0


def _head(sizes: Iterable[int], max_count: int, max_bytes: int) -> int:
    """How many candidates from a queue's head (their in-row ``sizes``, in order) go into one
    transaction: at most ``max_count`` and ``max_bytes``; a first one larger than that still goes alone."""
    count, size = 0, 0
    for nbytes in sizes:
        if count and (count >= max_count or size + nbytes > max_bytes):
            break
        count += 1
        size += nbytes
    return count


def _own(exc: BaseException) -> BaseException:
    """One waiter's copy of a transaction's error, chained to it: one exception object is never raised
    in two places at once."""
    own = copy.copy(exc)
    own.__cause__ = exc
    return own


@dataclass(eq=False)
class _Waiter:
    item: Candidate
    size: int
    future: Future[Admitted] = field(default_factory=Future)


class GroupCommit:
    """Admit candidates from the event loop or from threads, several per transaction (module doc).

    Parameters
    ----------
    admission:
        The acceptance path that commits a batch (:meth:`Admission.admit`).
    max_batch:
        Most candidates in one transaction.
    max_batch_bytes:
        Most in-row bytes (:attr:`Candidate.data`) in one transaction; a single larger candidate still
        goes alone.

    Attributes
    ----------
    commits, committed:
        How many transactions ran, and how many candidates they carried (``committed / commits`` is the
        mean group size).
    """

    def __init__(
        self, admission: Admission, *, max_batch: int = 64, max_batch_bytes: int = 64 * 1024**2
    ) -> None:
        if max_batch < 1 or max_batch_bytes < 1:
            raise ValueError(
                f"max_batch and max_batch_bytes must be >= 1, got {max_batch} and {max_batch_bytes}"
            )
        self.admission = admission
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.commits = 0
        self.committed = 0
        self._cond = threading.Condition()
        self._queue: list[_Waiter] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def waiting(self) -> int:
        """Candidates queued for the next transaction (not the one being committed)."""
        with self._cond:
            return len(self._queue)

    def submit(self, item: Candidate) -> Future[Admitted]:
        """Queue ``item`` for the writer; the future is done once the transaction holding its row
        committed (its result) or failed (a :class:`~ingest.errors.StoreError`, module doc).

        Raises
        ------
        RuntimeError
            After :meth:`close`.
        """
        return self.submit_all([item])[0]

    def submit_all(self, items: Sequence[Candidate]) -> list[Future[Admitted]]:
        """:meth:`submit` each of ``items``, queued together (they share a transaction as far as the
        limits allow)."""
        mine = [_Waiter(item, _in_row_bytes(item)) for item in items]
        with self._cond:
            if self._closed:
                raise RuntimeError("the group commit is closed")
            self._queue.extend(mine)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ingest-commit", daemon=True)
                self._thread.start()
            self._cond.notify()
        return [me.future for me in mine]

    def admit(self, item: Candidate) -> Admitted:
        """Admit ``item`` from a thread; returns once the transaction holding its row committed.

        Raises
        ------
        StoreError
            When that transaction could not be committed (the item's spool copy, if any, is removed).
        """
        return self.submit(item).result()

    def close(self) -> None:
        """Commit what is queued, then stop the writer (later :meth:`submit` calls raise)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(30)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._take()
            self._commit(batch)

    def _take(self) -> list[_Waiter]:
        """The next batch from the queue's head (called with the condition held)."""
        count = _head((w.size for w in self._queue), self.max_batch, self.max_batch_bytes)
        batch = self._queue[:count]
        del self._queue[:count]
        return batch

    def _commit(self, batch: list[_Waiter]) -> None:
        """One transaction for ``batch``; every waiter gets its outcome or the error.

        A candidate whose waiter went away (its association aborted) is committed all the same: its
        data set was received whole, and the sender that sends it again gets "duplicate".
        """
        waiting = [w.future.set_running_or_notify_cancel() for w in batch]
        try:
            results = self.admission.admit([w.item for w in batch])
        except BaseException as exc:  # the writer goes on: the next batch may well commit
            for w, wanted in zip(batch, waiting, strict=True):
                if wanted:
                    w.future.set_exception(_own(exc))
            return
        with self._cond:
            self.commits += 1
            self.committed += len(batch)
        for w, wanted, result in zip(batch, waiting, results, strict=True):
            if wanted:
                w.future.set_result(result)
        if len(batch) > 1:
            LOGGER.debug("group commit: %d instances in one transaction", len(batch))


#: Most in-row bytes in one batch sent to the writer process (the loop writes it to a socket).
_PROCESS_BATCH_BYTES: Final = 8 * 1024**2


@dataclass(eq=False)
class _Pending:
    item: Candidate
    future: asyncio.Future[Admitted]


class EdgeCommit:
    """The edge's commits from its event loop: batches go to the writer thread or process (module doc).

    Parameters
    ----------
    group:
        The writer thread; worker threads admit through it directly (:meth:`admit`).
    writer:
        The writer process, or ``None`` (every batch takes the thread).
    concurrency:
        How many associations are open now (called on the loop); more than one sends batches to the
        process.
    max_batch:
        Most candidates in one batch.

    Attributes
    ----------
    to_process, to_thread:
        Batches sent each way (``to_process`` counts the writer process's transactions).
    """

    def __init__(
        self,
        group: GroupCommit,
        writer: RowWriter | None,
        concurrency: Callable[[], int],
        *,
        max_batch: int = 64,
    ) -> None:
        self.group = group
        self.admission = group.admission
        self.writer = writer
        self.concurrency = concurrency
        self.max_batch = max_batch
        self.to_process = 0
        self.to_thread = 0
        self._by_process_committed = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: list[_Pending] = []
        self._busy = False  # a batch in flight (one at a time)
        self._reading: int | None = None  # the writer's descriptor, while the loop watches it
        self._sent: tuple[list[_Pending], datetime] | None = None
        self._through_thread: asyncio.Task[None] | None = None  # the batch the writer thread holds

    @property
    def committed(self) -> int:
        """Candidates in committed transactions, by the writer process or the writer thread."""
        return self._by_process_committed + self.group.committed

    async def commit(self, item: Candidate) -> Admitted:
        """Admit ``item`` from the event loop; returns once the transaction holding its row committed.

        Raises
        ------
        StoreError
            When that transaction could not be committed.
        """
        loop = self._loop = asyncio.get_running_loop()
        me = _Pending(item, loop.create_future())
        self._queue.append(me)
        self._next()
        return await me.future

    def admit(self, item: Candidate) -> Admitted:
        """Admit ``item`` from a worker thread, through the writer thread (:meth:`GroupCommit.admit`)."""
        return self.group.admit(item)

    def close(self) -> None:
        """Stop the writer process (it finishes its batch) and the writer thread (it commits its queue).
        Called once the loop has stopped."""
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()
        self.group.close()

    # -- on the loop ------------------------------------------------------------------------------

    def _next(self) -> None:
        """Send the next batch, unless one is in flight."""
        if self._busy or not self._queue:
            return
        batch = self._take()
        self._busy = True
        try:
            if self._by_process(batch):
                try:
                    self._send(batch)
                    return
                except StoreUnavailableError as exc:  # the process is gone: this batch and the next by thread
                    self._lose_writer(exc)
            self._by_thread(batch)
        except Exception as exc:  # every waiter hears of it, and the next batch goes
            self._done(batch, exc)

    def _take(self) -> list[_Pending]:
        count = _head((_in_row_bytes(p.item) for p in self._queue), self.max_batch, _PROCESS_BATCH_BYTES)
        batch = self._queue[:count]
        del self._queue[:count]
        return batch

    def _by_process(self, batch: list[_Pending]) -> bool:
        writer = self.writer
        return (
            writer is not None and writer.running and self.concurrency() > 1
            and all(p.item.spool_name is None and not p.item.may_be_note for p in batch)
        )

    def _send(self, batch: list[_Pending]) -> None:
        assert self.writer is not None and self._loop is not None
        admission = self.admission
        now = admission.clock()
        rows, inline = admission.rows([p.item for p in batch])
        self.writer.send(rows, now=now, due_at=admission.due_at(now), inline=inline)
        self._sent = (batch, now)
        self.to_process += 1
        if self._reading is None:
            self._reading = self.writer.fileno()
            self._loop.add_reader(self._reading, self._received)

    def _received(self) -> None:
        """The writer process's outcome is readable: settle it."""
        if self.writer is None:
            return
        if self._sent is None:  # readable with nothing sent: the process ended (end of file)
            self._lose_writer(StoreUnavailableError("the process ended"))
            return
        batch, now = self._sent
        self._sent = None
        try:
            results = self.writer.receive()
        except StoreError as exc:
            if not self.writer.running:  # it died holding the batch
                self._lose_writer(exc)
            self._done(batch, exc)
            return
        items = [p.item for p in batch]
        try:
            self._by_process_committed += len(batch)
            if self.admission.settles_quietly(items, results):
                self._done(batch, self.admission.settle(items, results, now))
                return
            # a conflict or an IOCM release writes files and rows: not on the loop
            assert self._loop is not None
            settling = self._loop.run_in_executor(None, self.admission.settle, items, results, now)
        except Exception as exc:  # every waiter hears of it, and the next batch goes
            self._done(batch, exc)
            return
        settling.add_done_callback(lambda done: self._settled(batch, done))

    def _settled(self, batch: list[_Pending], done: asyncio.Future[list[Admitted]]) -> None:
        exc = done.exception()
        self._done(batch, exc if exc is not None else done.result())

    def _by_thread(self, batch: list[_Pending]) -> None:
        assert self._loop is not None
        self.to_thread += 1
        try:
            futures = self.group.submit_all([p.item for p in batch])
        except RuntimeError as exc:  # closed
            self._done(batch, StoreUnavailableError(f"the listener is stopping: {exc}"))
            return
        self._through_thread = self._loop.create_task(self._from_thread(batch, futures))

    async def _from_thread(self, batch: list[_Pending], futures: list[Future[Admitted]]) -> None:
        """The writer thread's outcomes (each error already the waiter's own copy)."""
        outcomes = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
        self._done(batch, outcomes)

    def _done(
        self, batch: list[_Pending], outcome: Sequence[Admitted | BaseException] | BaseException
    ) -> None:
        """Every waiter of ``batch`` gets its outcome (one per waiter, or the batch's error, each waiter its
        own copy); the next batch goes."""
        for index, pending in enumerate(batch):
            if pending.future.done():  # its association went away; the row is committed all the same
                continue
            one = _own(outcome) if isinstance(outcome, BaseException) else outcome[index]
            if isinstance(one, BaseException):
                pending.future.set_exception(one)
            else:
                pending.future.set_result(one)
        self._busy = False
        self._next()

    def _lose_writer(self, exc: BaseException) -> None:
        LOGGER.warning("the state store's writer process is gone (%s); commits go on in this process", exc)
        if self._reading is not None and self._loop is not None:
            self._loop.remove_reader(self._reading)
        self._reading = None
        writer, self.writer = self.writer, None
        if writer is not None and self._loop is not None:
            self._loop.run_in_executor(None, writer.close)  # joins the process: not on the loop
