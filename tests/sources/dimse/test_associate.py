"""The A-ASSOCIATE-RQ checks, the deadline of its reading and the negotiation of the edge, as units."""

from __future__ import annotations

import asyncio
import struct
import time

import pytest
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import (
    AsynchronousOperationsWindowNegotiation,
    SCP_SCU_RoleSelectionNegotiation,
)

from ingest.sources.dimse.associate import (
    AEPolicy,
    Negotiator,
    Refusal,
    check_associate_rq,
    context,
    decode_associate_rq,
    read_associate_rq,
    reject_pdu,
)

from .raw_ul import CT_IMAGE, IMPLICIT_LE, VERIFICATION, associate_rq, item, pdu


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


# -- reading against a deadline ----------------------------------------------------------------------------


async def _read(
    chunks: list[tuple[float, bytes]], *, timeout: float, eof: bool = False
) -> tuple[bytes, float]:
    """Feed ``chunks`` (delay, bytes) to a stream and read the request from it within ``timeout``."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()

    async def feed() -> None:
        for delay, data in chunks:
            await asyncio.sleep(delay)
            reader.feed_data(data)
        if eof:
            reader.feed_eof()

    feeder = asyncio.create_task(feed())
    started = time.monotonic()
    try:
        got = await read_associate_rq(reader, deadline=loop.time() + timeout, max_bytes=65536)
    finally:
        feeder.cancel()
    return got, time.monotonic() - started


async def test_a_trickle_does_not_extend_the_deadline() -> None:
    rq = associate_rq()
    started = time.monotonic()
    with pytest.raises(Refusal) as info:
        await _read([(0.1, bytes([b])) for b in rq[:-1]], timeout=0.8)
    elapsed = time.monotonic() - started
    assert info.value.reason == "rq_timeout"
    assert 0.7 < elapsed < 1.5  # a byte every 0.1 s would reset a per-read timeout forever


async def test_a_declared_length_over_the_cap_is_refused_unread() -> None:
    started = time.monotonic()
    with pytest.raises(Refusal) as info:
        await _read([(0, struct.pack(">BBL", 0x01, 0, 4 * 1024 * 1024) + b"\0" * 100)], timeout=5)
    assert info.value.reason == "rq_too_large"
    assert info.value.answer() == b""  # just closed
    assert time.monotonic() - started < 1  # not waiting for the 4 MiB


async def test_a_first_pdu_other_than_a_request_is_aborted() -> None:
    with pytest.raises(Refusal) as info:
        await _read([(0, pdu(0x04, b"\0" * 10))], timeout=2)  # P-DATA-TF before associating
    assert info.value.abort == 0x02  # unexpected PDU


async def test_a_connection_closed_mid_request_is_just_closed() -> None:
    with pytest.raises(Refusal) as info:
        await _read([(0, associate_rq()[:30])], timeout=2, eof=True)
    assert info.value.reason == "closed" and info.value.answer() == b""


async def test_a_complete_valid_request_is_returned_whole() -> None:
    rq = associate_rq()
    got, _ = await _read([(0, rq)], timeout=2)
    assert got == rq


# -- negotiation through pynetdicom's public codec ------------------------------------------------------


ROLE_CLASS = b"1.2.840.10008.1.20.1"


def _negotiator() -> Negotiator:
    return Negotiator(
        "INGEST", 262144,
        [
            context(VERIFICATION.decode(), [IMPLICIT_LE.decode()]),
            context(CT_IMAGE.decode(), [IMPLICIT_LE.decode()]),
            context(ROLE_CLASS.decode(), [IMPLICIT_LE.decode()], roles=True),
        ],
    )


def _ac(pdu_bytes: bytes) -> A_ASSOCIATE_AC:
    ac = A_ASSOCIATE_AC()
    ac.decode(pdu_bytes)
    return ac


def test_contexts_are_accepted_or_refused_with_their_reason() -> None:
    rq = associate_rq(
        contexts=(
            (1, VERIFICATION, (IMPLICIT_LE,)), (3, b"1.2.3.4", (IMPLICIT_LE,)), (5, CT_IMAGE, (b"1.2.9",))
        )
    )
    negotiated = _negotiator().accept(decode_associate_rq(rq))
    assert list(negotiated.accepted) == [1]
    assert {int(cx.context_id): cx.result for cx in negotiated.rejected} == {3: 0x03, 5: 0x04}
    assert negotiated.peer_max_pdu == 16384
    ac = _ac(negotiated.ac_pdu).to_primitive()
    assert ac.result == 0 and ac.maximum_length_received == 262144
    assert {int(cx.context_id): cx.result for cx in ac.presentation_context_definition_results_list} == {
        1: 0, 3: 3, 5: 4,
    }


def _role_item(uid: bytes, scu: int, scp: int) -> bytes:
    return item(0x54, struct.pack(">H", len(uid)) + uid + bytes([scu, scp]))


def test_role_selection_and_the_async_window_get_their_standard_answers() -> None:
    user = (
        item(0x51, struct.pack(">L", 0))  # unlimited
        + item(0x52, b"1.2.826.0.1.3680043.9.9999")
        + item(0x53, struct.pack(">HH", 5, 5))  # asynchronous operations window 5/5
        + _role_item(ROLE_CLASS, 1, 1)
        + item(0x58, bytes([1, 1]) + struct.pack(">H", 4) + b"user" + struct.pack(">H", 0))  # user identity
    )
    rq = associate_rq(contexts=((1, ROLE_CLASS, (IMPLICIT_LE,)),), user_info=user)
    negotiated = _negotiator().accept(decode_associate_rq(rq))
    assert negotiated.peer_max_pdu == 0
    [cx] = negotiated.accepted.values()
    assert cx.as_scu and cx.as_scp  # this side may send the N-EVENT-REPORT on it
    info = _ac(negotiated.ac_pdu).to_primitive().user_information
    [role] = [i for i in info if isinstance(i, SCP_SCU_RoleSelectionNegotiation)]
    assert (role.scu_role, role.scp_role) == (True, True)
    [window] = [i for i in info if isinstance(i, AsynchronousOperationsWindowNegotiation)]
    assert (window.maximum_number_operations_invoked, window.maximum_number_operations_performed) == (1, 1)


def test_a_reject_is_encoded_by_pynetdicom() -> None:
    rj = A_ASSOCIATE_RJ()
    rj.decode(reject_pdu(2, 3, 2))
    assert (rj.result, rj.source, rj.reason_diagnostic) == (2, 3, 2)
    assert reject_pdu(1, 1, 3) == bytes([0x03, 0, 0, 0, 0, 4, 0, 1, 1, 3])


def test_the_ae_policy() -> None:
    policy = AEPolicy({"CT": {None}, "MR": {"10.0.0.1"}}, "INGEST")
    assert policy.check("CT", "INGEST", "10.9.9.9") is None
    assert policy.check("MR", "INGEST", "10.0.0.1") is None
    assert policy.check("MR", "INGEST", "10.0.0.2") == ((1, 1, 3), "calling AE not allowed from this host")
    assert policy.check("XX", "INGEST", "10.0.0.1") == ((1, 1, 3), "calling AE not allowed")
    rejected = policy.check("CT", "OTHER", "10.0.0.1")
    assert rejected is not None and rejected[0] == (1, 1, 7)
    assert AEPolicy(None, None).check("ANY", "ANY", "h") is None
