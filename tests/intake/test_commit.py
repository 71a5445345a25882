"""Group commit (ingest.intake.commit): waiting candidates share one transaction; each gets its own outcome.

Against the real SQLite store and real spool / quarantine folders under ``tmp_path``; the only thing
held back is the first transaction (an event in front of the store's ``add_instances``), so that others
queue behind it as they do behind a real fsync.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ingest.adapters.spool import Quarantine, Spool, read_instance
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.core.records import InstanceRecord
from ingest.errors import StoreUnavailableError
from ingest.intake.admit import Admission, Admitted, Candidate
from ingest.intake.commit import GroupCommit
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
