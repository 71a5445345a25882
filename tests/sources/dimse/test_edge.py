"""The asyncio edge against real peers: framing variants, timers, release, abort, caps, fuzzed input."""

from __future__ import annotations

import logging
import resource
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ingest.config import CommitmentSettings
from ingest.sources.dimse.commitment import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH
from ingest.sources.dimse.edge import PENDING_GRACE_S
from tests import wait_until

from .listener_helpers import encode, instance, make_settings, running_listener, scu
from .raw_ul import (
    CT_IMAGE,
    EXPLICIT_LE,
    VERIFICATION,
    associate_rq,
    c_store_rq,
    closed_by_peer,
    element,
    item,
    p_data,
    parse_command,
    pdu,
    read_pdu,
    uid_value,
)


def _association(
    port: int, contexts: Any = ((1, CT_IMAGE, (EXPLICIT_LE,)),), user_info: Any = None
) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq(contexts=contexts, user_info=user_info))
    answer = read_pdu(sock)
    assert answer is not None and answer[0] == 0x02, answer  # A-ASSOCIATE-AC
    return sock


def _status(rsp: tuple[int, bytes] | None) -> int:
    assert rsp is not None and rsp[0] == 0x04, rsp
    item_len, _cx, control = struct.unpack_from(">LBB", rsp[1])
    assert control & 0x03 == 0x03
    (status,) = struct.unpack("<H", parse_command(rsp[1][6 : 4 + item_len])[0x0900])
    return int(status)


def _echo_ok(port: int) -> bool:
    ae = scu()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="INGEST")
    if not assoc.is_established:
        return False
    ok = bool(assoc.send_c_echo().Status == 0x0000)
    assoc.release()
    return ok


# -- timers, release and abort --------------------------------------------------------------------------


def test_an_idle_association_is_ended_at_the_network_timeout(tmp_path: Path) -> None:
    with running_listener(make_settings(tmp_path, network_timeout_s=1)) as run:
        ae = scu()
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        assert assoc.is_established
        wait_until(lambda: not assoc.is_established, 10, "the idle association ended")
        assert assoc.is_aborted


def test_the_acceptor_answers_release_and_abort_and_serves_in_between(tmp_path: Path) -> None:
    with running_listener(make_settings(tmp_path)) as run:
        ae = scu()
        ae.add_requested_context(Verification)
        for ending in ("release", "abort", "release"):
            assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
            assert assoc.is_established
            started = time.monotonic()
            for _ in range(20):
                assert assoc.send_c_echo().Status == 0x0000
            # a loop that stalled per message (waiting out a timer) would take minutes; a loaded 2-core
            # machine takes well under this
            assert time.monotonic() - started < 30
            if ending == "release":
                assoc.release()
                assert assoc.is_released
            else:
                assoc.abort()
                assert assoc.is_aborted
        assert run.listener.server is not None
        server = run.listener.server
        wait_until(lambda: not server.associations, 30, "every association ended")


def test_artim_closes_a_connection_the_peer_keeps_open_after_release(tmp_path: Path) -> None:
    with running_listener(make_settings(tmp_path, acse_timeout_s=1)) as run:
        sock = _association(run.port)
        try:
            sock.sendall(pdu(0x05, b"\0" * 4))  # A-RELEASE-RQ
            assert read_pdu(sock) == (0x06, b"\0" * 4)
            started = time.monotonic()
            assert closed_by_peer(sock, 5.0)  # we never close: the acceptor does at ARTIM expiry
            assert 0.7 < time.monotonic() - started < 4.0
        finally:
            sock.close()


def test_release_collision_at_shutdown(tmp_path: Path) -> None:
    """The listener asks an idle association to release at shutdown; the peer's own A-RELEASE-RQ
    crosses it (PS3.8 9.2.4): the acceptor waits for the requestor's A-RELEASE-RP, then answers."""
    settings = make_settings(tmp_path)
    seen: list[tuple[int, bytes] | None] = []
    with running_listener(settings) as run:
        sock = _association(run.port)

        def peer() -> None:
            seen.append(read_pdu(sock))  # the listener's A-RELEASE-RQ
            sock.sendall(pdu(0x05, b"\0" * 4))  # ours crosses it
            sock.sendall(pdu(0x06, b"\0" * 4))  # the requestor answers first (Sta9 -> Sta11)
            seen.append(read_pdu(sock))  # then the acceptor's A-RELEASE-RP
            seen.append(read_pdu(sock))  # and the connection closes

        thread = threading.Thread(target=peer)
        thread.start()
        started = time.monotonic()
    thread.join(10)
    sock.close()
    assert seen == [(0x05, b"\0" * 4), (0x06, b"\0" * 4), None]
    assert time.monotonic() - started < 8


def test_an_abort_in_the_middle_of_a_data_set_stores_and_acknowledges_nothing(tmp_path: Path) -> None:
    data = encode(instance("1.2.3.4.8.3", "1.2.3.4.8.1", "1.2.3.4.8.2"))
    with running_listener(make_settings(tmp_path)) as run:
        run.listener.large_instance_bytes = 64  # the first fragments already go to a spool file
        sock = _association(run.port)
        sock.sendall(p_data((1, 0x03, c_store_rq(CT_IMAGE, b"1.2.3.4.8.3"))) + p_data((1, 0x00, data[:100])))
        sock.sendall(pdu(0x07, bytes([0, 0, 0, 0])))  # A-ABORT, service user
        assert closed_by_peer(sock, 5)
        sock.close()
        assert _echo_ok(run.port)
        assert run.store.studies() == []
        wait_until(lambda: list(run.listener.spool.root.iterdir()) == [], 5, "no temporary file left")


# -- framing variants ------------------------------------------------------------------------------------


def test_pdvs_split_across_pdus_several_in_one_pdu_and_command_with_data_set(tmp_path: Path) -> None:
    first = encode(instance("1.2.3.4.6.3", "1.2.3.4.6.1", "1.2.3.4.6.2"))
    second = encode(instance("1.2.3.4.6.4", "1.2.3.4.6.1", "1.2.3.4.6.2"))
    with running_listener(make_settings(tmp_path)) as run:
        sock = _association(run.port)
        try:
            cmd = c_store_rq(CT_IMAGE, b"1.2.3.4.6.3", 1)
            sock.sendall(p_data((1, 0x01, cmd[:20])))  # the command over two PDUs
            sock.sendall(p_data((1, 0x03, cmd[20:])))
            sock.sendall(p_data((1, 0x00, first[:10]), (1, 0x00, first[10:30]), (1, 0x02, first[30:])))
            assert _status(read_pdu(sock)) == 0x0000
            # command and data set in one PDU
            sock.sendall(p_data((1, 0x03, c_store_rq(CT_IMAGE, b"1.2.3.4.6.4", 2)), (1, 0x02, second)))
            assert _status(read_pdu(sock)) == 0x0000
            sock.sendall(pdu(0x05, b"\0" * 4))
            assert read_pdu(sock) == (0x06, b"\0" * 4)
        finally:
            sock.close()
        assert sorted(r.sop_uid for r in run.store.instances("1.2.3.4.6.1")) == ["1.2.3.4.6.3", "1.2.3.4.6.4"]


@pytest.mark.parametrize("peer_max_pdu", [0, 4096])
def test_small_pdus_both_ways_and_an_unlimited_peer(tmp_path: Path, peer_max_pdu: int) -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    with running_listener(make_settings(tmp_path, max_pdu=4096)) as run:
        ae = scu()
        ae.maximum_pdu_size = peer_max_pdu
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        assert assoc.acceptor.maximum_length == 4096  # what the listener announced
        assert assoc.send_c_store(ds).Status == 0x0000  # ~39 KB in ~10 fragments
        assoc.release()
        assert [r.sop_uid for r in run.store.instances(ds.StudyInstanceUID)] == [ds.SOPInstanceUID]


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_implicit.dcm", "CT_small.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",
        "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm",
    ],
)
def test_one_data_set_per_transfer_syntax(tmp_path: Path, name: str) -> None:
    ds = dcmread(get_testdata_file(name))
    with running_listener(make_settings(tmp_path)) as run:
        ae = scu()
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        [row] = run.store.instances(ds.StudyInstanceUID)
        assert row.sop_uid == ds.SOPInstanceUID


def test_another_command_gets_0x0211_and_the_association_goes_on(tmp_path: Path) -> None:
    with running_listener(make_settings(tmp_path)) as run:
        contexts = ((1, CT_IMAGE, (EXPLICIT_LE,)), (3, VERIFICATION, (EXPLICIT_LE,)))
        sock = _association(run.port, contexts=contexts)
        try:
            find = (
                element(0x0002, uid_value(CT_IMAGE))
                + element(0x0100, struct.pack("<H", 0x0020))  # C-FIND-RQ
                + element(0x0110, struct.pack("<H", 4))
                + element(0x0800, struct.pack("<H", 0x0000))
            )
            sock.sendall(p_data((1, 0x03, find), (1, 0x02, b"\x08\x00\x52\x00\x06\x00STUDY ")))
            rsp = read_pdu(sock)
            assert _status(rsp) == 0x0211
            assert rsp is not None
            fields = parse_command(rsp[1][6:])
            assert struct.unpack("<H", fields[0x0100])[0] == 0x8020
            assert struct.unpack("<H", fields[0x0120])[0] == 4
            echo = (
                element(0x0002, uid_value(VERIFICATION))
                + element(0x0100, struct.pack("<H", 0x0030))
                + element(0x0110, struct.pack("<H", 5))
                + element(0x0800, struct.pack("<H", 0x0101))
            )
            sock.sendall(p_data((3, 0x03, echo)))
            assert _status(read_pdu(sock)) == 0x0000
        finally:
            sock.close()


def test_two_hundred_associations_of_one_instance_each(tmp_path: Path) -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    with running_listener(make_settings(tmp_path)) as run:
        ae = scu()
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        for n in range(200):
            ds.SOPInstanceUID = f"1.2.3.4.200.{n + 1}"
            assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
            assert assoc.send_c_store(ds).Status == 0x0000
            assoc.release()
        assert len(run.store.instances(ds.StudyInstanceUID)) == 200
        server = run.listener.server
        assert server is not None
        wait_until(lambda: not server.associations and not run.listener.active, 5, "every slot given back")


# -- the three holes ----------------------------------------------------------------------------------


def test_silent_connections_from_the_senders_own_address_do_not_lock_it_out(tmp_path: Path) -> None:
    with running_listener(make_settings(tmp_path, associate_rq_timeout_s=30)) as run:
        silent = [socket.create_connection(("127.0.0.1", run.port)) for _ in range(8)]  # the cap, same host
        try:
            server = run.listener.server
            assert server is not None
            wait_until(lambda: server.pending == 8, 5, "eight pending")
            assert _echo_ok(run.port)  # while they are young, a burst: let in beside them
            assert not closed_by_peer(silent[0], 0.01)
            wait_until(lambda: min(server.pending_ages("127.0.0.1")) >= PENDING_GRACE_S, 5, "silent a while")
            assert _echo_ok(run.port)  # evicts the oldest silent one instead of being refused
            assert closed_by_peer(silent[0], 2.0)
            assert not closed_by_peer(silent[1], 0.01)
            assert _echo_ok(run.port)
        finally:
            for s in silent:
                s.close()


def test_trickled_data_sets_lose_their_slots_at_the_message_deadline(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path, max_associations=2, dimse_timeout_s=1.5, network_timeout_s=60
    )
    data = encode(instance("1.2.3.4.5.3"))
    with running_listener(settings) as run:
        socks = [_association(run.port) for _ in range(2)]  # every slot
        stop = threading.Event()

        def trickle(sock: socket.socket) -> None:
            sock.sendall(p_data((1, 0x03, c_store_rq(CT_IMAGE, b"1.2.3.4.5.3"))))
            for byte in data:  # one byte per PDU every 0.2 s: every read is far below network_timeout
                if stop.wait(0.2):
                    return
                try:
                    sock.sendall(p_data((1, 0x00, bytes([byte]))))
                except OSError:
                    return

        threads = [threading.Thread(target=trickle, args=(s,)) for s in socks]
        started = time.monotonic()
        for t in threads:
            t.start()
        try:
            assert _echo_ok(run.port) is False  # both slots held
            for sock in socks:
                answer = read_pdu(sock)
                assert answer == (0x07, bytes([0, 0, 2, 0]))  # A-ABORT from the provider
            assert time.monotonic() - started < 6
            wait_until(lambda: _echo_ok(run.port), 5, "a slot is free again")
            assert run.store.studies() == []
        finally:
            stop.set()
            for t in threads:
                t.join(5)
            for s in socks:
                s.close()


def _n_action_rq(n_items: int) -> tuple[bytes, bytes]:
    """An N-ACTION-RQ command and its Action Information (explicit VR LE) naming ``n_items`` instances."""
    cls = uid_value(b"1.2.840.10008.5.1.4.1.1.2")
    one = (
        struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + struct.pack("<HH2sH", 0x0008, 0x1150, b"UI", len(cls)) + cls
        + struct.pack("<HH2sH", 0x0008, 0x1155, b"UI", 16) + b"1.2.3.4.5.6.7.8\0"
        + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    )
    txn = uid_value(b"1.2.3.4.77")
    info = (
        struct.pack("<HH2sH", 0x0008, 0x1195, b"UI", len(txn)) + txn
        + struct.pack("<HH2sHL", 0x0008, 0x1199, b"SQ", 0, 0xFFFFFFFF)
        + one * n_items
        + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    )
    command = (
        element(0x0003, uid_value(STORAGE_COMMITMENT_PUSH.encode()))
        + element(0x0100, struct.pack("<H", 0x0130))
        + element(0x0110, struct.pack("<H", 1))
        + element(0x0800, struct.pack("<H", 0x0000))
        + element(0x1001, uid_value(STORAGE_COMMITMENT_INSTANCE.encode()))
        + element(0x1008, struct.pack("<H", 1))
    )
    return command, info


def test_an_n_action_past_the_item_cap_is_refused_without_being_decoded(tmp_path: Path) -> None:
    command, info = _n_action_rq(300_000)  # ~27 MB: decoded, hundreds of MB of pydicom objects
    settings = make_settings(tmp_path, commitment=CommitmentSettings(enabled=True, max_instances=1000))
    with running_listener(settings) as run:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        sock = _association(run.port, contexts=((1, STORAGE_COMMITMENT_PUSH.encode(), (EXPLICIT_LE,)),))
        try:
            sock.sendall(p_data((1, 0x03, command)))
            step = 16000
            for pos in range(0, len(info), step):
                last = 0x02 if pos + step >= len(info) else 0x00
                sock.sendall(p_data((1, last, info[pos : pos + step])))
            assert _status(read_pdu(sock)) == 0x0213
        finally:
            sock.close()
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before < 64
        assert run.store.commitments() == []
        # a request within the cap still goes through
        command, info = _n_action_rq(3)
        sock = _association(run.port, contexts=((1, STORAGE_COMMITMENT_PUSH.encode(), (EXPLICIT_LE,)),))
        try:
            sock.sendall(p_data((1, 0x03, command), (1, 0x02, info)))
            assert _status(read_pdu(sock)) == 0x0000
        finally:
            sock.close()


# -- fuzzed input ------------------------------------------------------------------------------------


def test_malformed_input_ends_in_an_abort_or_reject_and_the_next_sender_is_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with running_listener(make_settings(tmp_path, associate_rq_timeout_s=1)) as run:

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            st.sampled_from(["first_pdu", "p_data", "command", "rq_items"]),
            st.binary(min_size=1, max_size=200),
        )
        def one(where: str, junk: bytes) -> None:
            caplog.clear()
            if where == "first_pdu":
                sock = socket.create_connection(("127.0.0.1", run.port), timeout=5)
                sock.sendall(junk)
            elif where == "rq_items":
                sock = socket.create_connection(("127.0.0.1", run.port), timeout=5)
                sock.sendall(associate_rq(extra_items=item(0x20, junk[:100])))
            else:
                sock = _association(run.port)
                body = junk if where == "p_data" else struct.pack(">LBB", len(junk) + 2, 1, 0x03) + junk
                sock.sendall(pdu(0x04, body))
            try:
                answer = read_pdu(sock) if where != "first_pdu" or len(junk) >= 6 else None
            finally:
                sock.close()
            if answer is not None:
                assert answer[0] in (0x02, 0x03, 0x04, 0x07), answer  # AC / data answered / RJ / A-ABORT
            assert _echo_ok(run.port)

        one()
    assert not [r for r in caplog.records if r.exc_info is not None or r.levelno >= logging.ERROR]


# -- other real peers -----------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed")
@pytest.mark.parametrize("option", ["-xi", "-xe", "-xb", "-xd"])
def test_storescu_with_each_proposed_transfer_syntax(tmp_path: Path, option: str) -> None:
    """dcmtk converts the explicit little endian file to the one transfer syntax it proposes."""
    source = get_testdata_file("CT_small.dcm")
    ds = dcmread(source)
    with running_listener(make_settings(tmp_path)) as run:
        done = subprocess.run(
            ["storescu", option, "-aet", "TESTSCU", "-aec", "INGEST", "127.0.0.1", str(run.port),
             str(source)],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert done.returncode == 0, done.stderr
        [row] = run.store.instances(ds.StudyInstanceUID)
        assert row.sop_uid == ds.SOPInstanceUID


def test_extended_negotiation_and_user_identity_items_get_standard_answers(tmp_path: Path) -> None:
    from pynetdicom.pdu_primitives import (
        AsynchronousOperationsWindowNegotiation,
        SOPClassCommonExtendedNegotiation,
        SOPClassExtendedNegotiation,
        UserIdentityNegotiation,
    )

    ds = dcmread(get_testdata_file("CT_small.dcm"))
    extended = SOPClassExtendedNegotiation()
    extended.sop_class_uid = ds.SOPClassUID
    extended.service_class_application_information = b"\x01\x00"
    common = SOPClassCommonExtendedNegotiation()
    common.sop_class_uid = ds.SOPClassUID
    common.service_class_uid = "1.2.840.10008.4.2"
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.positive_response_requested = True
    identity.primary_field = b"user"
    identity.secondary_field = b"secret"
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 4
    window.maximum_number_operations_performed = 4
    with running_listener(make_settings(tmp_path)) as run:
        ae = scu()
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate(
            "127.0.0.1", run.port, ae_title="INGEST", ext_neg=[extended, common, identity, window]
        )
        assert assoc.is_established
        answered = assoc.acceptor.primitive.user_information
        [async_rsp] = [i for i in answered if isinstance(i, AsynchronousOperationsWindowNegotiation)]
        window_rsp = (
            async_rsp.maximum_number_operations_invoked, async_rsp.maximum_number_operations_performed
        )
        assert window_rsp == (1, 1)
        unanswered = (UserIdentityNegotiation, SOPClassExtendedNegotiation)
        assert not [i for i in answered if isinstance(i, unanswered)]
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
