"""Group commit (ingest.intake.commit): waiting candidates share one transaction; each gets its own outcome.

Against the real SQLite store and real spool / quarantine folders under ``tmp_path``; the only thing
held back is the first transaction (an event in front of the store's ``add_instances``), so that others
queue behind it as they do behind a real fsync. :class:`EdgeCommit`'s writer process is a real child on
the same store.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ingest.adapters.spool import Quarantine, Spool, read_instance
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.adapters.state.writer import WriterProcess
from ingest.core.lifecycle import KEY_OBJECT_SELECTION
from ingest.core.records import InstanceRecord
from ingest.errors import StoreUnavailableError
from ingest.intake.admit import Admission, Admitted, Candidate
from ingest.intake.commit import EdgeCommit, GroupCommit
from ingest.ports import Verdict

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
STUDY = "1.2.826.0.1.3680043.2.1125.9"


def rec(sop: str, **extra: Any) -> InstanceRecord:
    return InstanceRecord(study_uid=STUDY, series_uid=f"{STUDY}.1", sop_uid=sop, sop_class_uid=CT, **extra)


def part10(tag: bytes) -> bytes:
    return b"\0" * 128 + b"DICM" + tag


class Gate:
    """Holds the first ``add_instances`` call until released; records the size of every call."""

    def __init__(self, store: SQLiteStateStore) -> None:
        self.real = store.add_instances
        self.entered = threading.Event()
        self.release = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, items: Any, **kwargs: Any) -> Any:
        self.sizes.append(len(items))
        if len(self.sizes) == 1:
            self.entered.set()
            assert self.release.wait(20)
        return self.real(items, **kwargs)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStateStore]:
    st = SQLiteStateStore(tmp_path / "state.sqlite3", node="test")
    yield st
    st.close()


@pytest.fixture
def gate(store: SQLiteStateStore, monkeypatch: pytest.MonkeyPatch) -> Gate:
    """The store's ``add_instances`` behind a :class:`Gate`."""
    held = Gate(store)
    monkeypatch.setattr(store, "add_instances", held)
    return held


def _admission(store: SQLiteStateStore, tmp_path: Path, wakes: list[int]) -> Admission:
    return Admission(
        store, spool=Spool(tmp_path / "spool"), quarantine=Quarantine(tmp_path / "quarantine"), metrics=None,
        stable_age_s=0, wake=lambda: wakes.append(1), clock=lambda: T0, label="dimse",
    )


def _submit_all(group: GroupCommit, items: list[Candidate]) -> tuple[list[threading.Thread], dict[int, Any]]:
    out: dict[int, Any] = {}

    def run(k: int) -> None:
        try:
            out[k] = group.admit(items[k])
        except Exception as exc:
            out[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(items))]
    return threads, out


def _wait_for(cond: Any, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_waiting_candidates_share_one_transaction_and_each_gets_its_own_outcome(
    store: SQLiteStateStore, tmp_path: Path, gate: Gate
) -> None:
    wakes: list[int] = []
    group = GroupCommit(_admission(store, tmp_path, wakes))
    items = [Candidate(rec(f"1.2.3.{k}"), f"c1:{k}", "dimse:A", data=part10(b"%d" % k)) for k in range(6)]
    # the fifth is an identical duplicate of the fourth, the sixth a conflicting one: one batch, three rules
    items[4] = Candidate(rec("1.2.3.3"), "c1:3", "dimse:B", data=part10(b"dup"))
    items[5] = Candidate(rec("1.2.3.3", series_description="other"), "c1:x", "dimse:C", data=part10(b"c"))
    threads, out = _submit_all(group, items)
    threads[0].start()
    assert gate.entered.wait(10)  # the first is being committed ...
    for t in threads[1:]:
        t.start()
    assert _wait_for(lambda: group.waiting == 5)  # ... and the others queue behind it
    assert out == {}  # nobody is answered before its transaction commits
    gate.release.set()
    for t in threads:
        t.join(20)
    assert gate.sizes == [1, 5]  # two transactions for six candidates
    assert (group.commits, group.committed) == (2, 6)
    outcomes = [out[k].outcome if isinstance(out[k], Admitted) else out[k] for k in range(6)]
    assert outcomes == [Verdict.ADDED] * 4 + [Verdict.DUPLICATE, Verdict.CONFLICT]
    assert out[5].rule == "other_content"
    # every added row's bytes were committed with it; the duplicate's and the conflict's were not
    for k in range(4):
        assert read_instance(store, None, f"1.2.3.{k}") == part10(b"%d" % k)
    assert store.inline_bytes_total() == sum(len(part10(b"%d" % k)) for k in range(4))
    assert len(wakes) == 2  # due at once (stable_age 0): the relay is woken once per transaction that added


def test_a_failed_transaction_fails_every_candidate_in_it_and_nothing_is_kept(
    store: SQLiteStateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(store)
    calls = [0]

    def failing_second(items: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:  # as SQLite reports a full disk
            gate.sizes.append(len(items))
            raise StoreUnavailableError("state database: add_instances failed: database or disk is full")
        return gate(items, **kwargs)

    monkeypatch.setattr(store, "add_instances", failing_second)
    spool = Spool(tmp_path / "spool")
    admission = Admission(store, spool=spool, quarantine=None, metrics=None, stable_age_s=30,
                          wake=lambda: None, clock=lambda: T0, label="dimse")
    group = GroupCommit(admission)
    big = spool.write(part10(b"a larger instance, spooled"))  # a spool file is removed on failure too
    items = [
        Candidate(rec("1.2.4.0"), "c1:0", "dimse:A", data=part10(b"0")),
        Candidate(rec("1.2.4.1"), "c1:1", "dimse:A", data=part10(b"1")),
        Candidate(rec("1.2.4.2"), "c1:2", "dimse:A", spool_name=big.name),
    ]
    threads, out = _submit_all(group, items)
    threads[0].start()
    assert gate.entered.wait(10)
    threads[1].start()
    threads[2].start()
    assert _wait_for(lambda: group.waiting == 2)
    gate.release.set()
    for t in threads:
        t.join(20)
    assert isinstance(out[0], Admitted) and out[0].outcome is Verdict.ADDED
    for k in (1, 2):
        assert isinstance(out[k], StoreUnavailableError) and "disk is full" in str(out[k])
        assert store.instance_bytes(f"1.2.4.{k}") is None
    assert [r.sop_uid for r in store.instances(STUDY)] == ["1.2.4.0"]
    assert spool.names() == []  # the failed batch's spool copy is gone: nothing half-done remains
    assert (group.commits, group.committed) == (1, 1)


def test_batches_are_bounded_by_count_and_bytes(
    store: SQLiteStateStore, tmp_path: Path, gate: Gate
) -> None:
    group = GroupCommit(_admission(store, tmp_path, []), max_batch=3, max_batch_bytes=3 * 1000)
    items = [Candidate(rec(f"1.2.5.{k}"), f"c1:{k}", "dimse:A", data=b"x" * 1000) for k in range(8)]
    items[1] = Candidate(rec("1.2.5.1"), "c1:1", "dimse:A", data=b"x" * 5000)  # alone: over the byte cap
    threads, out = _submit_all(group, items)
    threads[0].start()
    assert gate.entered.wait(10)
    for t in threads[1:]:
        t.start()
        assert _wait_for(lambda t=t: group.waiting == threads.index(t))  # queued in this order
    gate.release.set()
    for t in threads:
        t.join(20)
    assert gate.sizes == [1, 1, 3, 3]
    assert all(isinstance(out[k], Admitted) and out[k].outcome is Verdict.ADDED for k in range(8))


def test_one_caller_commits_its_own_transaction(store: SQLiteStateStore, tmp_path: Path) -> None:
    group = GroupCommit(_admission(store, tmp_path, []))
    for k in range(3):
        got = group.admit(Candidate(rec(f"1.2.6.{k}"), f"c1:{k}", "dimse:A", data=part10(b"s")))
        assert got.outcome is Verdict.ADDED
        assert store.instance_bytes(f"1.2.6.{k}") == part10(b"s")  # durable before admit() returned
    assert (group.commits, group.committed) == (3, 3)


def test_limits_must_be_positive(store: SQLiteStateStore, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        GroupCommit(_admission(store, tmp_path, []), max_batch=0)


def test_the_event_loop_submits_and_awaits_without_waiting_for_the_fsync(
    store: SQLiteStateStore, tmp_path: Path, gate: Gate
) -> None:
    group = GroupCommit(_admission(store, tmp_path, []))
    items = [Candidate(rec(f"1.2.7.{k}"), f"c1:{k}", "dimse:A", data=part10(b"%d" % k)) for k in range(4)]

    async def scenario() -> list[Admitted]:
        first = asyncio.ensure_future(asyncio.wrap_future(group.submit(items[0])))
        while not gate.entered.is_set():  # the loop keeps running while the writer holds the first
            await asyncio.sleep(0.005)
        others = [asyncio.ensure_future(asyncio.wrap_future(group.submit(i))) for i in items[1:]]
        await asyncio.sleep(0.05)
        assert not any(o.done() for o in [first, *others])  # nobody answered before its commit
        gate.release.set()
        return await asyncio.gather(first, *others)

    got = asyncio.run(scenario())
    assert [a.outcome for a in got] == [Verdict.ADDED] * 4
    assert gate.sizes == [1, 3]
    group.close()
    with pytest.raises(RuntimeError, match="closed"):
        group.submit(items[0])


def test_a_waiter_that_went_away_does_not_stop_the_writer(
    store: SQLiteStateStore, tmp_path: Path, gate: Gate
) -> None:
    group = GroupCommit(_admission(store, tmp_path, []))
    first = group.submit(Candidate(rec("1.2.8.0"), "c1:0", "dimse:A", data=part10(b"0")))
    assert gate.entered.wait(10)
    gone = group.submit(Candidate(rec("1.2.8.1"), "c1:1", "dimse:A", data=part10(b"1")))
    assert gone.cancel()  # its association was aborted while it queued
    gate.release.set()
    assert first.result(20).outcome is Verdict.ADDED
    later = group.admit(Candidate(rec("1.2.8.2"), "c1:2", "dimse:A", data=part10(b"2")))
    assert later.outcome is Verdict.ADDED
    # received whole, it was committed all the same: a sender that sends it again gets "duplicate"
    assert store.instance_bytes("1.2.8.1") == part10(b"1")
    group.close()


# -- EdgeCommit: the edge's loop sends each batch to the writer thread or the writer process -----------


@pytest.fixture
def writer(store: SQLiteStateStore, sqlite_writer: WriterProcess) -> WriterProcess:
    """The writer process, started once ``store`` has created the database."""
    return sqlite_writer


def _edge(store: SQLiteStateStore, tmp_path: Path, writer: WriterProcess, open_associations: int,
          wakes: list[int] | None = None) -> EdgeCommit:
    return EdgeCommit(GroupCommit(_admission(store, tmp_path, wakes if wakes is not None else [])), writer,
                      concurrency=lambda: open_associations)


def _small(k: int, prefix: str = "1.2.9") -> Candidate:
    return Candidate(rec(f"{prefix}.{k}"), f"c9:{k}", "dimse:A", data=part10(b"%d" % k))


async def _all(edge: EdgeCommit, items: list[Candidate]) -> list[Admitted | BaseException]:
    return await asyncio.gather(*(edge.commit(i) for i in items), return_exceptions=True)


def test_with_several_associations_the_batches_go_to_the_writer_process(
    store: SQLiteStateStore, tmp_path: Path, writer: WriterProcess
) -> None:
    wakes: list[int] = []
    edge = _edge(store, tmp_path, writer, open_associations=4, wakes=wakes)
    items = [_small(k) for k in range(40)]
    got = asyncio.run(_all(edge, items))
    assert [a.outcome for a in got if isinstance(a, Admitted)] == [Verdict.ADDED] * 40
    # the first goes alone; the 39 that queued while it committed share the next transaction
    assert (edge.to_process, edge.to_thread) == (2, 0)
    assert edge.committed == 40 and edge.group.committed == 0
    assert wakes  # settled on the loop: the relay was woken
    assert all(store.instance_bytes(f"1.2.9.{k}") == part10(b"%d" % k) for k in range(40))
    edge.close()
    assert not writer.running


def test_with_one_association_the_batches_go_to_the_writer_thread(
    store: SQLiteStateStore, tmp_path: Path, writer: WriterProcess
) -> None:
    edge = _edge(store, tmp_path, writer, open_associations=1)
    got = asyncio.run(_all(edge, [_small(k) for k in range(5)]))
    assert [a.outcome for a in got if isinstance(a, Admitted)] == [Verdict.ADDED] * 5
    assert edge.to_process == 0 and edge.to_thread == 2
    assert edge.group.committed == 5
    edge.close()


def test_rejection_notes_and_spooled_instances_take_the_whole_admission_on_the_thread(
    store: SQLiteStateStore, tmp_path: Path, writer: WriterProcess
) -> None:
    edge = _edge(store, tmp_path, writer, open_associations=4)
    spool = Spool(tmp_path / "spool")
    name = spool.write(part10(b"big")).name
    note = Candidate(
        InstanceRecord(study_uid=STUDY, series_uid=f"{STUDY}.9", sop_uid="1.2.9.99",
                       sop_class_uid=KEY_OBJECT_SELECTION),
        "c9:note", "dimse:A", data=part10(b"note"),
    )
    spooled = Candidate(rec("1.2.9.98"), "c9:big", "dimse:A", spool_name=name)

    async def one_by_one() -> list[Admitted]:
        return [await edge.commit(note), await edge.commit(spooled)]

    got = asyncio.run(one_by_one())
    assert [a.outcome for a in got] == [Verdict.ADDED, Verdict.ADDED]
    assert edge.to_process == 0 and edge.to_thread == 2
    edge.close()


def test_a_conflict_from_the_process_is_settled_off_the_loop_and_quarantined(
    store: SQLiteStateStore, tmp_path: Path, writer: WriterProcess
) -> None:
    edge = _edge(store, tmp_path, writer, open_associations=4)
    first = _small(1)
    changed = Candidate(first.record, "c9:other", "dimse:A", body=part10(b"other"), data=part10(b"other"))

    async def scenario() -> tuple[Admitted, Admitted, Admitted]:
        return await edge.commit(first), await edge.commit(changed), await edge.commit(_small(1))

    added, conflict, duplicate = asyncio.run(scenario())
    assert added.outcome is Verdict.ADDED and duplicate.outcome is Verdict.DUPLICATE
    assert conflict.outcome is Verdict.CONFLICT and conflict.quarantined is not None
    assert Quarantine(tmp_path / "quarantine").holds(conflict.quarantined)
    assert edge.to_process == 3 and edge.to_thread == 0
    assert store.instance_bytes("1.2.9.1") == part10(b"1")  # the first version stays
    edge.close()


def test_when_the_writer_process_dies_commits_go_on_in_this_process(
    store: SQLiteStateStore, tmp_path: Path, writer: WriterProcess, caplog: pytest.LogCaptureFixture
) -> None:
    edge = _edge(store, tmp_path, writer, open_associations=4)

    async def scenario() -> Admitted:
        assert (await edge.commit(_small(1))).outcome is Verdict.ADDED  # by the process
        assert writer.pid is not None
        os.kill(writer.pid, signal.SIGKILL)
        for _ in range(1000):  # the loop sees the socket's end of file: no batch was in flight
            if edge.writer is None:
                break
            await asyncio.sleep(0.01)
        return await edge.commit(_small(2))

    later = asyncio.run(scenario())
    assert later.outcome is Verdict.ADDED
    assert edge.writer is None and (edge.to_process, edge.to_thread) == (1, 1)
    assert "writer process is gone" in caplog.text
    assert store.instance_bytes("1.2.9.2") == part10(b"2")
    edge.close()


def test_a_batch_held_by_a_dying_writer_process_fails_alone(
    store: SQLiteStateStore, tmp_path: Path, writer: WriterProcess
) -> None:
    """The child is stopped (SIGSTOP) so the batch is surely in its hands, then killed: that batch fails
    with StoreUnavailableError (answered 0xA700, the sender sends again); the next commit succeeds."""
    edge = _edge(store, tmp_path, writer, open_associations=4)
    assert writer.pid is not None
    pid = writer.pid

    async def scenario() -> tuple[Admitted | BaseException, Admitted]:
        os.kill(pid, signal.SIGSTOP)
        held = asyncio.ensure_future(edge.commit(_small(3)))
        await asyncio.sleep(0)  # the batch is sent
        assert edge.to_process == 1
        os.kill(pid, signal.SIGKILL)
        (outcome,) = await asyncio.gather(held, return_exceptions=True)
        return outcome, await edge.commit(_small(4))

    failed, later = asyncio.run(scenario())
    assert isinstance(failed, StoreUnavailableError)
    assert later.outcome is Verdict.ADDED and edge.writer is None
    edge.close()
