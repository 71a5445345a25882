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
"""

from __future__ import annotations

import copy
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

from ingest.intake.admit import Admission, Admitted, Candidate

__all__ = ["GroupCommit"]

LOGGER = logging.getLogger(__name__)


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
        me = _Waiter(item, len(item.data) if item.data is not None else 0)
        with self._cond:
            if self._closed:
                raise RuntimeError("the group commit is closed")
            self._queue.append(me)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ingest-commit", daemon=True)
                self._thread.start()
            self._cond.notify()
        return me.future

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
        count, size = 0, 0
        for waiter in self._queue:
            if count and (count >= self.max_batch or size + waiter.size > self.max_batch_bytes):
                break
            count += 1
            size += waiter.size
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
                # each waiter gets its own copy, chained to the store's error: one exception object is
                # never raised in two places at once
                own = copy.copy(exc)
                own.__cause__ = exc
                if wanted:
                    w.future.set_exception(own)
            return
        with self._cond:
            self.commits += 1
            self.committed += len(batch)
        for w, wanted, result in zip(batch, waiting, results, strict=True):
            if wanted:
                w.future.set_result(result)
        if len(batch) > 1:
            LOGGER.debug("group commit: %d instances in one transaction", len(batch))
