"""Storage Commitment Push Model SCP (PS3.4 Annex J) on a real listener, with pynetdicom SCUs on loopback.

Expected values come from PS3.4 J.3 and PS3.3 C.14.1.1: Event Type 1 when every referenced instance is
committed, 2 otherwise; committed instances in Referenced SOP Sequence (0008,1199), the others in Failed
SOP Sequence (0008,1198) with Failure Reason (0008,1197) 0x0112 (no such object instance), 0x0119
(class / instance conflict) or 0x0110 (processing failure).
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt

from ingest.config import CommitmentSettings, ListenerSettings
from ingest.sources.dimse.commitment import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH
from tests import free_ports
from tests import wait_until as _until

from .listener_helpers import CT_IMAGE, instance, make_settings, running_listener, scu
from .test_listener_security import _client_ctx, _close_client_socket, pki  # noqa: F401 (pki: fixture)

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
STUDY = "1.2.3.9.1"
SERIES = "1.2.3.9.2"


def _free_port() -> int:
    return free_ports(1)[0]


def _stored(uid: str) -> Dataset:
    ds = instance(uid, study=STUDY, series=SERIES)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _request(transaction_uid: str, items: Sequence[tuple[str, str]]) -> Dataset:
    # built without pydicom's value validation: some tests send invalid UIDs on purpose
    info = Dataset()
    info[0x00081195] = DataElement(0x00081195, "UI", transaction_uid, validation_mode=config.IGNORE)
    refs = []
    for cls, uid in items:
        item = Dataset()
        item[0x00081150] = DataElement(0x00081150, "UI", cls, validation_mode=config.IGNORE)
        item[0x00081155] = DataElement(0x00081155, "UI", uid, validation_mode=config.IGNORE)
        refs.append(item)
    info.ReferencedSOPSequence = DicomSequence(refs)
    return info


class Reports:
    """N-EVENT-REPORTs received by a test SCU: (event type, event information).

    :meth:`get` returns a report once the SCU has also *sent* its answer to it (``EVT_DIMSE_SENT``): the
    handler runs before pynetdicom sends the N-EVENT-REPORT-RSP, and a test that releases the association
    in between makes pynetdicom's own state machine fail (a P-DATA while awaiting the release answer).
    """

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[int, Dataset]] = queue.Queue()
        self._answered = threading.Semaphore(0)

    def handler(self, event: Any) -> tuple[int, None]:
        self.received.put((int(event.request.EventTypeID), event.event_information))
        return 0x0000, None

    def handlers(self) -> list[tuple[Any, Any]]:
        """The pynetdicom event handlers to bind."""
        return [(evt.EVT_N_EVENT_REPORT, self.handler), (evt.EVT_DIMSE_SENT, self.sent)]

    def sent(self, event: Any) -> None:
        if type(event.message).__name__ == "N_EVENT_REPORT_RSP":
            self._answered.release()

    def get(self, timeout: float = 10) -> tuple[int, Dataset]:
        report = self.received.get(timeout=timeout)
        assert self._answered.acquire(timeout=timeout), "the N-EVENT-REPORT was never answered"
        return report


def _pairs(ds: Dataset, keyword: str) -> list[tuple[str, ...]]:
    out = []
    for item in ds.get(keyword, []):
        pair = (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
        out.append((*pair, f"0x{int(item.FailureReason):04X}") if "FailureReason" in item else pair)
    return out


def _requester(
    role: bool, reports: Reports | None = None, ae_title: str = "TESTSCU"
) -> tuple[AE, dict[str, Any]]:
    ae = scu(ae_title)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    kwargs: dict[str, Any] = {"ae_title": "INGEST"}
    if role:
        kwargs["ext_neg"] = [build_role(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)]
    if reports is not None:
        kwargs["evt_handlers"] = reports.handlers()
    return ae, kwargs


@contextmanager
def report_scp(port: int, ae_title: str = "TESTSCU") -> Iterator[Reports]:
    """The requester's own N-EVENT-REPORT SCP on ``port`` (for reports on a new association)."""
    reports = Reports()
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_supported_context(
        STORAGE_COMMITMENT_PUSH,
        [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
        scu_role=True,
        scp_role=True,
    )
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=reports.handlers()
    )
    try:
        yield reports
    finally:
        server.shutdown()



def _holds(db: Path) -> dict[str, str | None]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT sop_uid, hold_until FROM instances").fetchall())


def test_report_on_the_same_association_lists_stored_and_fails_the_rest(tmp_path: Path) -> None:
    stored = [f"{SERIES}.1", f"{SERIES}.2"]
    with running_listener(make_settings(tmp_path)) as run:
        reports = Reports()
        ae, kwargs = _requester(role=True, reports=reports)
        assoc = ae.associate("127.0.0.1", run.port, **kwargs)
        assert assoc.is_established
        try:
            for uid in stored:
                assert assoc.send_c_store(_stored(uid)).Status == 0x0000
            items = [
                (CT_IMAGE, stored[0]),
                (CT_IMAGE, "1.2.3.9.404"),  # never sent
                (MR_IMAGE, stored[1]),  # sent as CT: class / instance conflict
                (CT_IMAGE, stored[1]),
            ]
            status, _ = assoc.send_n_action(
                _request("1.2.3.9.100", items), 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
            )
            assert status.Status == 0x0000
            event_type, info = reports.get()
        finally:
            assoc.release()
        assert event_type == 2
        assert info.TransactionUID == "1.2.3.9.100"
        assert _pairs(info, "ReferencedSOPSequence") == [(CT_IMAGE, stored[0]), (CT_IMAGE, stored[1])]
        assert _pairs(info, "FailedSOPSequence") == [
            (CT_IMAGE, "1.2.3.9.404", "0x0112"),
            (MR_IMAGE, stored[1], "0x0119"),
        ]
        # committed instances are held against retention (for [spool] commitment_hold, 30 days by default)
        holds = _holds(tmp_path / "state.sqlite3")
        assert all(holds[uid] is not None for uid in stored)
        [row] = run.store.commitments()
        assert (row.state, row.instances, row.committed, row.failed) == ("reported", 4, 2, 2)
        assert b'ingest_commitments_total{result="partial"} 1.0' in run.listener.metrics.render()


def test_all_committed_is_event_type_1_without_a_failed_sequence(tmp_path: Path) -> None:
    uid = f"{SERIES}.7"
    with running_listener(make_settings(tmp_path)) as run:
        reports = Reports()
        ae, kwargs = _requester(role=True, reports=reports)
        assoc = ae.associate("127.0.0.1", run.port, **kwargs)
        try:
            assert assoc.send_c_store(_stored(uid)).Status == 0x0000
            status, _ = assoc.send_n_action(
                _request("1.2.3.9.101", [(CT_IMAGE, uid)]),
                1,
                STORAGE_COMMITMENT_PUSH,
                STORAGE_COMMITMENT_INSTANCE,
            )
            assert status.Status == 0x0000
            event_type, info = reports.get()
        finally:
            assoc.release()
    assert event_type == 1
    assert _pairs(info, "ReferencedSOPSequence") == [(CT_IMAGE, uid)]
    assert "FailedSOPSequence" not in info


def test_report_on_a_new_association_when_the_requester_did_not_offer_the_scp_role(tmp_path: Path) -> None:
    reply_port = _free_port()
    uid = f"{SERIES}.3"
    settings = make_settings(
        tmp_path, allowed_calling_aes=[{"ae": "TESTSCU", "host": "127.0.0.1", "port": reply_port}]
    )
    with running_listener(settings) as run, report_scp(reply_port) as reports:
        ae, kwargs = _requester(role=False)
        assoc = ae.associate("127.0.0.1", run.port, **kwargs)
        assert assoc.is_established
        assert assoc.send_c_store(_stored(uid)).Status == 0x0000
        status, _ = assoc.send_n_action(
            _request("1.2.3.9.102", [(CT_IMAGE, uid), (CT_IMAGE, "1.2.3.9.405")]),
            1,
            STORAGE_COMMITMENT_PUSH,
            STORAGE_COMMITMENT_INSTANCE,
        )
        assert status.Status == 0x0000
        assoc.release()
        event_type, info = reports.get()
        assert event_type == 2
        assert _pairs(info, "ReferencedSOPSequence") == [(CT_IMAGE, uid)]
        assert _pairs(info, "FailedSOPSequence") == [(CT_IMAGE, "1.2.3.9.405", "0x0112")]
        _until(lambda: run.store.commitments()[0].state == "reported", 5, "recorded as reported")


def test_undeliverable_report_stays_pending_with_its_error_then_is_delivered(tmp_path: Path) -> None:
    reply_port = _free_port()  # nothing listens there at first
    settings = make_settings(
        tmp_path,
        allowed_calling_aes=[{"ae": "TESTSCU", "host": "127.0.0.1", "port": reply_port}],
        commitment=CommitmentSettings(retry_base_s=0.2, retry_max_s=0.2, poll_interval_s=0.1),
    )
    uid = f"{SERIES}.4"
    with running_listener(settings) as run:
        ae, kwargs = _requester(role=False)
        assoc = ae.associate("127.0.0.1", run.port, **kwargs)
        assert assoc.send_c_store(_stored(uid)).Status == 0x0000
        status, _ = assoc.send_n_action(
            _request("1.2.3.9.103", [(CT_IMAGE, uid)]),
            1,
            STORAGE_COMMITMENT_PUSH,
            STORAGE_COMMITMENT_INSTANCE,
        )
        assert status.Status == 0x0000
        assoc.release()
        row = _until(
            lambda: next((r for r in run.store.commitments() if r.attempts >= 1), None), 5, "a failed attempt"
        )
        assert row.state == "pending" and "cannot connect" in (row.last_error or "")
        with report_scp(reply_port) as reports:
            event_type, info = reports.get()
        assert event_type == 1 and _pairs(info, "ReferencedSOPSequence") == [(CT_IMAGE, uid)]
        _until(lambda: run.store.commitments()[0].state == "reported", 5, "recorded as reported")
        assert b'ingest_commitments_total{result="retried"}' in run.listener.metrics.render()


def test_released_bytes_are_a_processing_failure(tmp_path: Path) -> None:
    uid = f"{SERIES}.5"
    with running_listener(make_settings(tmp_path)) as run:
        reports = Reports()
        ae, kwargs = _requester(role=True, reports=reports)
        assoc = ae.associate("127.0.0.1", run.port, **kwargs)
        try:
            assert assoc.send_c_store(_stored(uid)).Status == 0x0000
            # what retention does when it removes an instance's bytes (ingest.adapters.state.retention)
            with sqlite3.connect(tmp_path / "state.sqlite3") as conn:
                conn.execute(
                    "UPDATE instances SET bytes_removed_at = '2024-01-01T00:00:00.000000+00:00', "
                    "spool_name = NULL WHERE sop_uid = ?",
                    (uid,),
                )
                conn.execute("DELETE FROM instance_bytes WHERE sop_uid = ?", (uid,))
            status, _ = assoc.send_n_action(
                _request("1.2.3.9.104", [(CT_IMAGE, uid)]),
                1,
                STORAGE_COMMITMENT_PUSH,
                STORAGE_COMMITMENT_INSTANCE,
            )
            assert status.Status == 0x0000
            event_type, info = reports.get()
        finally:
            assoc.release()
    assert event_type == 2
    assert "ReferencedSOPSequence" not in info
    assert _pairs(info, "FailedSOPSequence") == [(CT_IMAGE, uid, "0x0110")]


@pytest.mark.parametrize(
    ("action_type", "instance_uid", "info", "expected"),
    [
        (2, STORAGE_COMMITMENT_INSTANCE, _request("1.2.3.9.105", [(CT_IMAGE, "1.2.3.9.1.1")]), 0x0123),
        (1, "1.2.3.9.999", _request("1.2.3.9.106", [(CT_IMAGE, "1.2.3.9.1.1")]), 0x0112),
        (1, STORAGE_COMMITMENT_INSTANCE, _request("1.2.3.9.107", []), 0x0115),
        (1, STORAGE_COMMITMENT_INSTANCE, _request("1.2.3..9", [(CT_IMAGE, "1.2.3.9.1.1")]), 0x0115),
        (1, STORAGE_COMMITMENT_INSTANCE, _request("1.2.3.9.108", [(CT_IMAGE, "1.2.x")]), 0x0115),
    ],
    ids=["action-type-2", "wrong-sop-instance", "empty-sequence", "bad-transaction-uid", "bad-item-uid"],
)
def test_bad_requests_are_refused_and_nothing_is_stored(
    tmp_path: Path, action_type: int, instance_uid: str, info: Dataset, expected: int
) -> None:
    with running_listener(make_settings(tmp_path)) as run:
        ae, kwargs = _requester(role=False)
        assoc = ae.associate("127.0.0.1", run.port, **kwargs)
        try:
            status, _ = assoc.send_n_action(info, action_type, STORAGE_COMMITMENT_PUSH, instance_uid)
        finally:
            assoc.release()
        assert status.Status == expected
        assert "ErrorComment" in status
        assert run.store.commitments() == []


def test_too_many_instances_is_a_resource_limitation(tmp_path: Path) -> None:
    items = [(CT_IMAGE, f"1.2.3.9.1.{n}") for n in range(1, 4)]
    with running_listener(make_settings(tmp_path, commitment=CommitmentSettings(max_instances=2))) as run:
        ae, kwargs = _requester(role=False)
        assoc = ae.associate("127.0.0.1", run.port, **kwargs)
        try:
            status, _ = assoc.send_n_action(
                _request("1.2.3.9.109", items), 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
            )
        finally:
            assoc.release()
        assert status.Status == 0x0213
        assert run.store.commitments() == []


def test_a_transaction_uid_reused_for_other_instances_is_refused_the_same_request_is_reported_again(
    tmp_path: Path,
) -> None:
    uid = f"{SERIES}.6"
    with running_listener(make_settings(tmp_path)) as run:
        reports = Reports()
        ae, kwargs = _requester(role=True, reports=reports)
        assoc = ae.associate("127.0.0.1", run.port, **kwargs)
        try:
            assert assoc.send_c_store(_stored(uid)).Status == 0x0000
            first = _request("1.2.3.9.110", [(CT_IMAGE, uid)])
            assert (
                assoc.send_n_action(first, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE)[0].Status
                == 0x0000
            )
            assert reports.get()[0] == 1
            other = _request("1.2.3.9.110", [(CT_IMAGE, uid), (CT_IMAGE, "1.2.3.9.406")])
            assert (
                assoc.send_n_action(other, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE)[0].Status
                == 0x0110
            )
            assert (
                assoc.send_n_action(first, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE)[0].Status
                == 0x0000
            )
            event_type, info = reports.get()
        finally:
            assoc.release()
        assert event_type == 1 and _pairs(info, "ReferencedSOPSequence") == [(CT_IMAGE, uid)]
        assert [r.instances for r in run.store.commitments()] == [1]


def test_an_ae_outside_the_allowlist_cannot_ask(tmp_path: Path) -> None:
    with running_listener(make_settings(tmp_path)) as run:
        ae, kwargs = _requester(role=True, ae_title="STRANGER")
        assoc = ae.associate("127.0.0.1", run.port, **kwargs)
        assert assoc.is_rejected
        assert run.store.commitments() == []


def test_commitment_off_refuses_the_presentation_context(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, commitment=CommitmentSettings(enabled=False))
    with running_listener(settings) as run:
        ae, kwargs = _requester(role=False)
        assoc = ae.associate("127.0.0.1", run.port, **kwargs)
        try:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        finally:
            assoc.release()
    assert STORAGE_COMMITMENT_PUSH not in accepted and CT_IMAGE in accepted


def test_port_without_host_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match=r"port .* needs host"):
        ListenerSettings(allowed_calling_aes=[{"ae": "CT1", "port": 104}])


def test_report_over_tls_on_a_new_association(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """With ``[listener.tls]`` on, the report association is TLS too: this node's certificate as the
    client's, the requester's server certificate checked against ``ca``."""
    import ssl

    certs: Path = request.getfixturevalue("pki")  # the listener security tests' CA and certificates

    reply_port = _free_port()
    settings = make_settings(
        tmp_path,
        allowed_calling_aes=[{"ae": "TESTSCU", "host": "127.0.0.1", "port": reply_port}],
        tls={
            "enabled": True,
            "cert": certs / "server.crt",
            "key": certs / "server.key",
            "ca": certs / "ca.crt",
            "require_client_cert": True,
            "handshake_timeout_s": 2,
        },
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs / "ca.crt"))
    server_ctx.load_cert_chain(str(certs / "server.crt"), str(certs / "server.key"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # the report must come with ingest's certificate
    client_ctx = _client_ctx(certs, "client")
    reports = Reports()
    ae_scp = AE(ae_title="TESTSCU")
    ae_scp.acse_timeout = ae_scp.dimse_timeout = ae_scp.network_timeout = 5
    ae_scp.add_supported_context(
        STORAGE_COMMITMENT_PUSH,
        [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
        scu_role=True,
        scp_role=True,
    )
    server = ae_scp.start_server(
        ("127.0.0.1", reply_port),
        block=False,
        ssl_context=server_ctx,
        evt_handlers=reports.handlers(),
    )
    uid = f"{SERIES}.8"
    try:
        with running_listener(settings) as run:
            ae, kwargs = _requester(role=False)
            assoc = ae.associate("127.0.0.1", run.port, tls_args=(client_ctx, "127.0.0.1"), **kwargs)
            assert assoc.is_established
            assert assoc.send_c_store(_stored(uid)).Status == 0x0000
            status, _ = assoc.send_n_action(
                _request("1.2.3.9.111", [(CT_IMAGE, uid)]),
                1,
                STORAGE_COMMITMENT_PUSH,
                STORAGE_COMMITMENT_INSTANCE,
            )
            assert status.Status == 0x0000
            assoc.release()
            _close_client_socket(assoc)
            event_type, info = reports.get()
            assert event_type == 1 and _pairs(info, "ReferencedSOPSequence") == [(CT_IMAGE, uid)]
    finally:
        server.shutdown()


def test_a_report_the_requester_does_not_answer_on_its_association_ends_at_report_timeout_s(
    tmp_path: Path,
) -> None:
    from ingest.config import CommitmentSettings

    answer = threading.Event()

    def stalled(event: Any) -> tuple[int, None]:
        answer.wait(20)  # the requester's reactor stalls: no N-EVENT-REPORT response
        return 0x0000, None

    settings = make_settings(
        tmp_path, dimse_timeout_s=30,
        commitment=CommitmentSettings(report_timeout_s=1, retry_base_s=600, retry_max_s=600),
    )
    with running_listener(settings) as run:
        ae, kwargs = _requester(role=True)
        kwargs["evt_handlers"] = [(evt.EVT_N_EVENT_REPORT, stalled)]
        assoc = ae.associate("127.0.0.1", run.port, **kwargs)
        assert assoc.is_established
        try:
            status, _ = assoc.send_n_action(
                _request("1.2.3.9.120", [(CT_IMAGE, "1.2.3.9.121")]), 1,
                STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE,
            )
            assert status.Status == 0x0000
            # not the 30 s DIMSE timeout: report_timeout_s, then a retry with backoff
            _until(lambda: run.store.commitments()[0].attempts == 1, 8, "the attempt timed out")
            [row] = run.store.commitments()
            assert row.state == "pending" and row.next_attempt_at is not None
            assert row.last_error is not None and "no answer" in row.last_error
        finally:
            answer.set()
            assoc.abort()
