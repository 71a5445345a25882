"""The Storage Commitment report sender (``ingest.relay.reports``) over the real SQLite state store,
delivering through the real pynetdicom SCU adapter (``ingest.adapters.dimse_scu``) to real peers on
127.0.0.1: a pynetdicom N-EVENT-REPORT SCP, and a "tarpit" that accepts connections and never answers.

Time moves in the clock tests only when a test steps the injected clock; nothing sleeps a fixed time.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest.adapters.dimse_scu import DimseReportSCU
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.clock import Timekeeper
from ingest.config import CommitmentSettings
from ingest.ports import CommitmentRow
from ingest.relay.reports import CommitmentReports
from tests import free_ports, wait_until
from tests.sources.dimse.test_commitment import Reports, report_scp
from tests.test_clock import SteppedClock

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
HOLD = timedelta(days=30)


class Tarpit:
    """A TCP server that accepts every connection and reads it, never answering.

    ``open`` counts the connections that have sent something (an association request) and are not
    closed by the peer yet; ``most`` is the highest ``open`` seen.
    """

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self._lock = threading.Lock()
        self.open = 0
        self.most = 0
        self.associations = 0
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            t = threading.Thread(target=self._read, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _read(self, conn: socket.socket) -> None:
        counted = False
        try:
            while conn.recv(65536):
                if not counted:
                    counted = True
                    with self._lock:
                        self.open += 1
                        self.associations += 1
                        self.most = max(self.most, self.open)
        except OSError:
            pass
        finally:
            if counted:
                with self._lock:
                    self.open -= 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.server.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes its reader
            conn.close()
        for t in self._threads:
            t.join(5)
        self._accepting.join(5)


@pytest.fixture
def tarpit() -> Iterator[Tarpit]:
    pit = Tarpit()
    try:
        yield pit
    finally:
        pit.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStateStore]:
    with SQLiteStateStore(tmp_path / "state.sqlite3", node="test") as s:
        yield s


def _free_port() -> int:
    return free_ports(1)[0]


def _scu(routes: dict[str, tuple[str, int]]) -> DimseReportSCU:
    return DimseReportSCU(
        "INGEST", routes, acse_timeout_s=30, dimse_timeout_s=30, network_timeout_s=30
    )


def _request(store: SQLiteStateStore, uid: str, ae: str, now: datetime) -> None:
    store.add_commitment(uid, ae, [(CT_IMAGE, f"{uid}.1")], now=now)


def _row(store: SQLiteStateStore, uid: str) -> CommitmentRow:
    (row,) = [r for r in store.commitments() if r.transaction_uid == uid]
    return row


@pytest.mark.slow
def test_a_requester_that_never_answers_holds_one_slot_and_one_connection_others_get_theirs(
    store: SQLiteStateStore, tarpit: Tarpit
) -> None:
    now = datetime.now(UTC)
    for n in range(5):  # the oldest reports go to the tarpit
        _request(store, f"1.2.3.{n + 1}", "TARPIT", now - timedelta(minutes=10 - n))
    _request(store, "1.2.4.1", "REQUESTER", now)
    port = _free_port()
    settings = CommitmentSettings(report_timeout_s=6, retry_base_s=600, retry_max_s=600, senders=4)
    sender = CommitmentReports(
        store,
        [_scu({"TARPIT": ("127.0.0.1", tarpit.port), "REQUESTER": ("127.0.0.1", port)})],
        settings, hold=HOLD, owner="test",
    )
    with report_scp(port, ae_title="REQUESTER") as reports:
        sender.start()
        try:
            wait_until(lambda: not reports.received.empty(), 5, "the other requester's report")
            # it did not wait for the tarpit: no attempt to the tarpit has ended yet
            assert tarpit.open == 1
            assert [_row(store, f"1.2.3.{n + 1}").attempts for n in range(5)] == [0] * 5
            wait_until(lambda: _row(store, "1.2.4.1").state == "reported", 5, "recorded as reported")
            event_type, info = reports.get()
            assert event_type == 2 and str(info.TransactionUID) == "1.2.4.1"
            # the tarpit's attempt ends at report_timeout_s: its connection is closed, it is retried later
            wait_until(
                lambda: any(_row(store, f"1.2.3.{n + 1}").attempts for n in range(5)), 15,
                "a timed-out attempt",
            )
        finally:
            sender.close()
    wait_until(lambda: tarpit.open == 0, 10, "the tarpit's connections closed")
    assert tarpit.most == 1  # never more than one association open to it
    failed = [r for r in (_row(store, f"1.2.3.{n + 1}") for n in range(5)) if r.attempts]
    assert failed and all(r.state == "pending" for r in failed)
    assert all(r.next_attempt_at is not None and r.next_attempt_at > now for r in failed)
    assert all("no answer to the association request" in (r.last_error or "") for r in failed), [
        r.last_error for r in failed
    ]


def _unreachable_sender(
    store: SQLiteStateStore, clock: SteppedClock, give_up_after_s: float
) -> CommitmentReports:
    settings = CommitmentSettings(retry_base_s=10, retry_max_s=10, give_up_after_s=give_up_after_s)
    return CommitmentReports(
        store, [_scu({})], settings, hold=HOLD, owner="test", timekeeper=Timekeeper(clock)
    )


def test_a_clock_set_forward_does_not_abandon_a_report_until_that_time_has_passed(
    store: SQLiteStateStore, caplog: pytest.LogCaptureFixture
) -> None:
    clock = SteppedClock()
    sender = _unreachable_sender(store, clock, give_up_after_s=3600)
    _request(store, "1.2.5.1", "NOWHERE", clock.now())
    clock.step(31 * 86400)  # set forward 31 days
    with caplog.at_level(logging.WARNING):
        assert sender.run_once() == 1
    row = _row(store, "1.2.5.1")
    assert row.state == "pending" and row.attempts == 1
    assert "wall clock is" in caplog.text and "ahead" in caplog.text
    # once the process has really run that long, the give-up timer acts again
    clock.advance(31 * 86400 + 10)  # past the next attempt (retry_max_s = 10)
    clock.step(-31 * 86400)  # the wall clock moved 10 s; monotonic time caught up with the step
    assert sender.run_once() == 1
    assert _row(store, "1.2.5.1").state == "abandoned"


def test_a_clock_set_back_one_hour_still_delivers_a_waiting_report(store: SQLiteStateStore) -> None:
    clock = SteppedClock()
    port = _free_port()
    settings = CommitmentSettings(retry_base_s=30, retry_max_s=30)
    sender = CommitmentReports(
        store, [_scu({"REQUESTER": ("127.0.0.1", port)})], settings, hold=HOLD, owner="test",
        timekeeper=Timekeeper(clock),
    )
    _request(store, "1.2.6.1", "REQUESTER", clock.now())
    (claim,) = store.claim_commitments(clock.now(), 10, "test", 60)
    store.commitment_retry(claim, error="unreachable", next_attempt_at=clock.now() + timedelta(seconds=20))
    clock.step(-3600)  # set back one hour: the next attempt now looks 1 h 20 s away
    reports: Reports
    with report_scp(port, ae_title="REQUESTER") as reports:
        assert sender.run_once() == 1
        event_type, info = reports.get(timeout=10)
    assert str(info.TransactionUID) == "1.2.6.1" and event_type == 2
    assert _row(store, "1.2.6.1").state == "reported"


def test_a_next_attempt_within_retry_max_is_not_due_early(store: SQLiteStateStore) -> None:
    clock = SteppedClock()
    sender = _unreachable_sender(store, clock, give_up_after_s=3600)
    _request(store, "1.2.7.1", "NOWHERE", clock.now())
    (claim,) = store.claim_commitments(clock.now(), 10, "test", 60)
    store.commitment_retry(claim, error="unreachable", next_attempt_at=clock.now() + timedelta(seconds=10))
    assert sender.run_once() == 0
    clock.advance(10)
    assert sender.run_once() == 1
