"""Group commit: concurrent admissions share one transaction (``docs/architecture.md``, Durability).

Each C-STORE handler (one thread per association) needs its instance's row, and a small instance's
bytes, durable before it answers. One SQLite WAL commit with ``synchronous=FULL`` costs about a
millisecond, nearly all of it the fsync; a PostgreSQL commit a round trip and a WAL flush. When
several associations deliver at once, :class:`GroupCommit` puts every candidate that is waiting into
one :meth:`ingest.intake.admit.Admission.admit` call: one transaction, one fsync, for all their rows and
bytes. Each caller gets back its own :class:`~ingest.intake.admit.Admitted` only after the transaction
that holds its row has committed, so the durability contract is unchanged.

The committer is whichever waiting thread finds no commit in progress (leader/follower): it takes the
queue (at most :attr:`GroupCommit.max_batch` candidates and :attr:`GroupCommit.max_batch_bytes` of
in-row bytes), commits it, hands every waiter its outcome and lets the next waiting thread commit what
queued meanwhile. With one association nobody waits and a commit costs no thread hand-off; with many,
the commits of the others happen while one fsync runs. Admission's rules (duplicate, conflict,
quarantine, metrics, the relay's wake) stay in :class:`~ingest.intake.admit.Admission`: this module only
decides which candidates share a transaction.

When the transaction fails, every candidate of the batch gets the store's error (the admission has
removed their spool copies): each source answers it as it would its own failure (0xA700).
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass

from ingest.intake.admit import Admission, Admitted, Candidate

__all__ = ["GroupCommit"]

LOGGER = logging.getLogger(__name__)


@dataclass(eq=False)
class _Waiter:
    item: Candidate
    size: int
    done: bool = False
    result: Admitted | None = None
    error: BaseException | None = None


class GroupCommit:
    """Admit candidates from many threads, several per transaction (module doc).

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
        self._committing = False

    @property
    def waiting(self) -> int:
        """Candidates queued for the next transaction (not the one being committed)."""
        with self._cond:
            return len(self._queue)

    def admit(self, item: Candidate) -> Admitted:
        """Admit ``item``; returns once the transaction holding its row committed (or raises).

        Raises
        ------
        StoreError
            When that transaction could not be committed (the item's spool copy, if any, is removed).
        """
        me = _Waiter(item, len(item.data) if item.data is not None else 0)
        with self._cond:
            self._queue.append(me)
        while True:
            with self._cond:
                while self._committing and not me.done:
                    self._cond.wait()
                if me.done:
                    break
                batch = self._take()
                self._committing = True
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._committing = False
                    self._cond.notify_all()
        if me.error is not None:
            # each waiter raises its own copy, chained to the store's error: one exception object is
            # never raised in two threads at once
            raise copy.copy(me.error) from me.error
        assert me.result is not None
        return me.result

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
        """One transaction for ``batch``; every waiter gets its outcome or the error."""
        try:
            results = self.admission.admit([w.item for w in batch])
        except BaseException as exc:
            with self._cond:
                for w in batch:
                    w.error, w.done = exc, True
            if not isinstance(exc, Exception):
                raise
            return
        with self._cond:
            self.commits += 1
            self.committed += len(batch)
            for w, result in zip(batch, results, strict=True):
                w.result, w.done = result, True
        if len(batch) > 1:
            LOGGER.debug("group commit: %d instances in one transaction", len(batch))
