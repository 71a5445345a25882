"""netguard's pre-association checks as units: A-ASSOCIATE-RQ validation, command-set repair, deadlines."""

from __future__ import annotations

import importlib
import inspect
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import UID
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ingest.sources.dimse import netguard
from ingest.sources.dimse.netguard import (
    PYNETDICOM_HOOKS,
    Hook,
    Refusal,
    check_associate_rq,
    read_associate_rq,
    repair_command_set,
)
from tests import wait_until

from .listener_helpers import make_settings, running_listener, scu
from .raw_ul import (
    CT_IMAGE,
    IMPLICIT_LE,
    VERIFICATION,
    associate_rq,
    c_store_rq,
    element,
    item,
    parse_command,
    pdu,
)


def _refusal(rq: bytes) -> Refusal:
    with pytest.raises(Refusal) as info:
        check_associate_rq(rq)
    return info.value


def test_a_well_formed_request_passes() -> None:
    check_associate_rq(
        associate_rq(contexts=((1, VERIFICATION, (IMPLICIT_LE,)), (3, CT_IMAGE, (IMPLICIT_LE,))))
    )
    check_associate_rq(associate_rq(calling=b" PADDED", called=b"INGEST"))  # leading spaces: not significant


@pytest.mark.parametrize(
    "bad", [b"TEST\nSCU", b"TESTSCU\n", b"TEST\0SCU", b"\x1b[31mRED", b"BACK\\SLASH", b"CAF\xc9"]
)
def test_invalid_calling_ae_is_rejected_1_1_3_and_escaped(bad: bytes) -> None:
    refusal = _refusal(associate_rq(calling=bad))
    assert refusal.reject == (1, 1, 3)
    assert refusal.answer() == bytes([0x03, 0, 0, 0, 0, 4, 0, 1, 1, 3])  # A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)
    assert all(ch.isprintable() for ch in refusal.message)


def test_invalid_or_blank_called_ae_is_rejected_1_1_7() -> None:
    assert _refusal(associate_rq(called=b"ING\x07EST")).reject == (1, 1, 7)
    assert _refusal(associate_rq(called=b"")).reject == (1, 1, 7)  # 16 spaces


def test_calling_ae_is_checked_before_called_ae() -> None:
    assert _refusal(associate_rq(calling=b"A\nB", called=b"C\nD")).reject == (1, 1, 3)


@pytest.mark.parametrize("cx_id", [0, 2, 254])
def test_even_presentation_context_id_is_rejected(cx_id: int) -> None:
    refusal = _refusal(
        associate_rq(contexts=((1, VERIFICATION, (IMPLICIT_LE,)), (cx_id, CT_IMAGE, (IMPLICIT_LE,))))
    )
    assert refusal.reason == "even_context_id"
    assert refusal.reject == (1, 2, 1)


def test_over_long_or_unprintable_syntax_uids_are_rejected() -> None:
    long_uid = b"1.2." + b"3" * 70
    assert _refusal(associate_rq(contexts=((1, long_uid, (IMPLICIT_LE,)),))).reject == (1, 2, 1)
    assert _refusal(associate_rq(contexts=((1, VERIFICATION, (b"1.2\n840",)),))).reject == (1, 2, 1)
    user = item(0x51, struct.pack(">L", 16384)) + item(0x52, long_uid)
    assert _refusal(associate_rq(user_info=user)).reason == "invalid_uid"
    # NUL padding of an odd-length UID is not part of the value (PS3.5 9.1)
    check_associate_rq(associate_rq(contexts=((1, b"1.2.840.10008.1.1\0", (IMPLICIT_LE + b"\0",)),)))


def test_broken_framing_and_unknown_items_are_aborted() -> None:
    rq = associate_rq()
    truncated = pdu(0x01, rq[6:] + b"\x20\x00\x00\x40\x01")  # an item claiming 64 bytes, 1 present
    assert _refusal(truncated).abort == 0x06
    unknown = associate_rq(extra_items=item(0x77, b"x"))
    refusal = _refusal(unknown)
    assert refusal.abort == 0x04
    assert refusal.answer() == bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 4])  # A-ABORT, source 2 (PS3.8 9.3.8)
    assert _refusal(pdu(0x01, b"\0" * 20)).abort == 0x06  # shorter than the fixed fields
    assert _refusal(associate_rq(contexts=())).reject == (1, 2, 1)


def test_a_valid_command_set_is_left_alone() -> None:
    assert repair_command_set(c_store_rq(CT_IMAGE, b"1.2.3.4.5")) is None


@pytest.mark.parametrize("element_no", [0x1000, 0x0002])
def test_an_over_long_command_uid_is_replaced_by_a_fresh_valid_uid(element_no: int) -> None:
    long_uid = b"1.2." + b"3" * 70
    cmd = c_store_rq(
        long_uid if element_no == 0x0002 else CT_IMAGE, long_uid if element_no == 0x1000 else b"1.2.3"
    )
    repaired = repair_command_set(cmd)
    assert repaired is not None
    elements = parse_command(repaired)
    uid = UID(elements[element_no].rstrip(b"\0").decode("ascii"))
    assert uid.is_valid and uid.startswith("2.25.") and len(uid) <= 64
    (group_length,) = struct.unpack("<L", elements[0x0000])
    assert group_length == len(repaired) - 12  # everything after (0000,0000) itself (PS3.7 E.1)
    assert elements[0x0110] == struct.pack("<H", 1)  # the other elements are kept
    again = repair_command_set(cmd)
    assert again is not None and parse_command(again)[element_no] != elements[element_no]  # fresh each time


def test_an_invalid_move_originator_ae_is_dropped() -> None:
    cmd = c_store_rq(CT_IMAGE, b"1.2.3", extra=element(0x1030, b"EVIL\nAE "))
    repaired = repair_command_set(cmd)
    assert repaired is not None
    assert 0x1030 not in parse_command(repaired)
    assert repair_command_set(c_store_rq(CT_IMAGE, b"1.2.3", extra=element(0x1030, b"GOODAE"))) is None


# -- reading against a deadline ----------------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    try:
        yield server, client
    finally:
        server.close()
        client.close()


def test_a_trickle_does_not_extend_the_deadline(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    rq = associate_rq()
    stop = threading.Event()

    def trickle() -> None:
        for byte in rq[:-1]:
            if stop.wait(0.1):
                return
            client.send(bytes([byte]))

    sender = threading.Thread(target=trickle)
    sender.start()
    started = time.monotonic()
    try:
        with pytest.raises(Refusal) as info:
            read_associate_rq(server, deadline=started + 0.8, max_bytes=65536)
    finally:
        stop.set()
        sender.join()
    elapsed = time.monotonic() - started
    assert info.value.reason == "rq_timeout"
    assert 0.7 < elapsed < 1.5  # a byte every 0.1 s would reset a per-recv timeout forever


def test_a_declared_length_over_the_cap_is_refused_unread(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(struct.pack(">BBL", 0x01, 0, 4 * 1024 * 1024) + b"\0" * 100)
    started = time.monotonic()
    with pytest.raises(Refusal) as info:
        read_associate_rq(server, deadline=started + 5, max_bytes=65536)
    assert info.value.reason == "rq_too_large"
    assert info.value.answer() == b""  # just closed
    assert time.monotonic() - started < 1  # not waiting for the 4 MiB


def test_a_first_pdu_other_than_a_request_is_aborted(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(pdu(0x04, b"\0" * 10))  # P-DATA-TF before associating
    with pytest.raises(Refusal) as info:
        read_associate_rq(server, deadline=time.monotonic() + 2, max_bytes=65536)
    assert info.value.abort == 0x02  # unexpected PDU


def test_a_complete_valid_request_is_returned_whole(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    rq = associate_rq()
    client.sendall(rq)
    assert read_associate_rq(server, deadline=time.monotonic() + 2, max_bytes=65536) == rq


def _resolve(dotted: str) -> Any:
    """The module or class at ``dotted`` (``pynetdicom.dimse.DIMSEServiceProvider``)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def _hook_id(hook: Hook) -> str:
    return f"{hook.owner.removeprefix('pynetdicom.')}.{hook.name}"


@pytest.mark.parametrize("hook", PYNETDICOM_HOOKS, ids=_hook_id)
def test_pynetdicom_internals_still_exist(hook: Hook) -> None:
    """Every name netguard hooks into is still in the installed pynetdicom, with the same parameters."""
    _check_hook(hook)


@pytest.mark.parametrize(
    "hook",
    [
        Hook("pynetdicom.dimse.DIMSEServiceProvider", "receive_primitive", ("pdu",)),
        Hook("pynetdicom.dimse.DIMSEServiceProvider", "no_such_method"),
        Hook("pynetdicom.association.Association", "_no_such_attribute", instance=True),
        Hook("pynetdicom.acse.ACSE", "send_reject", uses=("something it does not do",)),
    ],
    ids=_hook_id,
)
def test_the_hook_check_fails_on_a_changed_name(hook: Hook) -> None:
    with pytest.raises(AssertionError):
        _check_hook(hook)


def _check_hook(hook: Hook) -> None:
    owner = _resolve(hook.owner)
    if hook.instance:
        source = inspect.getsource(owner)
        assigned = rf"\bself\.{re.escape(hook.name)}\b\s*(:[^=]*)?=(?!=)"  # annotations may span lines
        assert re.search(assigned, source), (
            f"{hook.owner} no longer sets self.{hook.name} (used by {hook.by})"
        )
    else:
        assert hasattr(owner, hook.name), f"{hook.owner}.{hook.name} is gone (used by {hook.by})"
    if hook.params is not None:
        target = inspect.getattr_static(owner, hook.name)
        target = getattr(target, "__func__", target)  # staticmethod / classmethod
        params = [p for p in inspect.signature(target).parameters if p != "self"]
        assert params == list(hook.params), f"{hook.owner}.{hook.name} now takes {params} (used by {hook.by})"
    if hook.uses:
        source = inspect.getsource(owner if hook.instance else getattr(owner, hook.name))
        for text in hook.uses:
            assert text in source, f"{hook.owner}.{hook.name} no longer does {text!r} (used by {hook.by})"


def test_every_hook_names_its_user() -> None:
    names = [(h.owner, h.name) for h in PYNETDICOM_HOOKS]
    assert len(names) == len(set(names))
    assert all(h.by for h in PYNETDICOM_HOOKS)


# -- the DUL waits for work (GuardedSocket.wake_dul_on_send) ---------------------------------------------


@pytest.fixture
def woken(
    pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, Any, socket.socket]]:
    """A guarded socket on an acceptor association whose DUL waits up to 0.3 s; (socket, DUL, peer)."""
    from pynetdicom import AE
    from pynetdicom.association import Association

    monkeypatch.setattr(netguard, "_IDLE_WAIT_S", 0.3)
    server, client = pair
    assoc = Association(AE("INGEST"), "acceptor")
    sock = netguard.GuardedSocket(assoc, server, max_pdu_bytes=1 << 20, max_message_bytes=1 << 20)
    assoc.set_socket(sock)
    sock.wake_dul_on_send(assoc.dul)
    yield sock, assoc.dul, client
    sock.close()


def test_an_idle_dul_waits_instead_of_polling(woken: tuple[Any, Any, socket.socket]) -> None:
    sock, dul, _peer = woken
    assert dul._run_loop_delay == 0.0  # pynetdicom's loop no longer sleeps between passes
    started = time.monotonic()
    assert sock.ready is False
    assert time.monotonic() - started >= 0.25  # it waited in select for the bound


def test_a_pdu_queued_for_sending_wakes_the_waiting_dul(woken: tuple[Any, Any, socket.socket]) -> None:
    sock, dul, _peer = woken
    threading.Timer(0.05, dul.to_provider_queue.put, args=("primitive",)).start()
    started = time.monotonic()
    assert sock.ready is False  # nothing to read: the DUL goes round and sends what was queued
    assert time.monotonic() - started < 0.25
    assert dul.to_provider_queue.get_nowait() == "primitive"
    started = time.monotonic()
    assert sock.ready is False  # the wake-up was consumed: the next idle pass waits again
    assert time.monotonic() - started >= 0.25


def test_data_from_the_peer_wakes_the_waiting_dul(woken: tuple[Any, Any, socket.socket]) -> None:
    sock, _dul, peer = woken
    threading.Timer(0.05, peer.sendall, args=(b"\x01",)).start()
    started = time.monotonic()
    assert sock.ready is True
    assert time.monotonic() - started < 0.25


def test_a_wake_up_after_close_is_harmless(woken: tuple[Any, Any, socket.socket]) -> None:
    sock, dul, _peer = woken
    sock.close()
    dul.to_provider_queue.put("late")  # an answer queued as the association ends: no error
    assert sock.ready is False


# -- the acceptor loop waits for requests (_Acceptor) -----------------------------------------------------


def test_an_idle_association_is_ended_at_the_network_timeout(tmp_path: Path) -> None:
    with running_listener(make_settings(tmp_path, network_timeout_s=1)) as run:
        ae = scu()
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        assert assoc.is_established
        # the listener's loop sees its idle timer expire and aborts
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
            assert time.monotonic() - started < 5
            if ending == "release":
                assoc.release()
                assert assoc.is_released
            else:
                assoc.abort()
                assert assoc.is_aborted
        wait_until(lambda: _alive(run) == [], 5, "every acceptor thread ended")


def _alive(run: Any) -> list[Any]:
    return [a for a in run.listener.server.active_associations if a.is_alive()]


# -- C-STORE responses encoded without pydicom (fast_store_responses) -------------------------------------


def _store_rsp(sop_uid: str, **fields: Any) -> Any:
    from pynetdicom.dimse_primitives import C_STORE

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CT_IMAGE
    rsp.AffectedSOPInstanceUID = sop_uid
    for keyword, value in fields.items():
        setattr(rsp, keyword, value)
    return rsp


@pytest.mark.parametrize(
    "fields",
    [
        {"Status": 0x0000},
        {"Status": 0xA700, "ErrorComment": "Spool full (max_bytes): not stored, retry later"},
        {"Status": 0xA900, "ErrorComment": "odd"},
        {"Status": 0xC000, "OffendingElement": [0x00100020, 0x0020000D]},
        {"Status": 0x0111, "ErrorComment": "x" * 64},
        {"Status": 0xB000, "MessageIDBeingRespondedTo": 65535},
    ],
)
@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45"])
def test_a_store_response_is_encoded_as_pynetdicom_encodes_it(fields: dict[str, Any], sop_uid: str) -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dsutils import encode

    rsp = _store_rsp(sop_uid, **fields)
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    assert netguard.encode_store_response(rsp) == encode(msg.command_set, True, True)


def test_a_response_it_does_not_cover_is_left_to_pynetdicom() -> None:
    assert netguard.encode_store_response(_store_rsp("1.2.3.4", Status=0xA700, ErrorComment="é")) is None
    rsp = _store_rsp("1.2.3.4", Status=0x0000)
    rsp.DataSet = BytesIO(b"\x08\x00\x18\x00")  # a response with a data set: not a C-STORE-RSP shape here
    assert netguard.encode_store_response(rsp) is None


def test_the_listener_answers_stores_without_pynetdicom_encoding_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pynetdicom.dimse_messages import C_STORE_RSP

    def refuse(self: Any, primitive: Any) -> None:
        raise AssertionError("a C-STORE response went through pynetdicom's encoder")

    monkeypatch.setattr(C_STORE_RSP, "primitive_to_message", refuse)
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    with running_listener(make_settings(tmp_path)) as run:
        ae = scu()
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        assert assoc.send_c_store(ds).Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000  # duplicate: answered the same way
        assoc.release()
        assert [r.sop_uid for r in run.store.instances(ds.StudyInstanceUID)] == [ds.SOPInstanceUID]
