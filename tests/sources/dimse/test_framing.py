"""P-DATA and DIMSE framing of the edge, byte for byte against pynetdicom's encoding of the same messages."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import UID
from pynetdicom.dimse_messages import C_ECHO_RSP, C_STORE_RSP, N_ACTION_RSP, N_EVENT_REPORT_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE, N_ACTION, N_EVENT_REPORT
from pynetdicom.dsutils import encode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from ingest.sources.dimse.framing import (
    FramingError,
    decode_command,
    encode_command,
    p_data_pdus,
    repair_command_set,
    split_pdvs,
)

from .raw_ul import CT_IMAGE, c_store_rq, element, parse_command

CT = CT_IMAGE.decode()


def _pynetdicom(message: Any, primitive: Any) -> bytes:
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))


@pytest.mark.parametrize(
    "fields",
    [
        {"Status": 0x0000},
        {"Status": 0xA700, "ErrorComment": "Spool full (max_bytes): not stored, retry later"},
        {"Status": 0xA900, "ErrorComment": "odd"},
        {"Status": 0x0111, "ErrorComment": "x" * 64},
        {"Status": 0xB000, "MessageIDBeingRespondedTo": 65535},
    ],
)
@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45"])
def test_a_store_response_is_encoded_as_pynetdicom_encodes_it(fields: dict[str, Any], sop_uid: str) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = sop_uid
    for keyword, value in fields.items():
        setattr(rsp, keyword, value)
    ours = encode_command({
        0x0002: CT, 0x0100: 0x8001, 0x0120: fields.get("MessageIDBeingRespondedTo", 7), 0x0800: 0x0101,
        0x0900: fields["Status"], 0x0902: fields.get("ErrorComment"), 0x1000: sop_uid,
    })
    assert ours == _pynetdicom(C_STORE_RSP(), rsp)


def test_an_echo_response_is_encoded_as_pynetdicom_encodes_it() -> None:
    rsp = C_ECHO()
    rsp.MessageIDBeingRespondedTo = 3
    rsp.AffectedSOPClassUID = "1.2.840.10008.1.1"
    rsp.Status = 0
    ours = encode_command({0x0002: "1.2.840.10008.1.1", 0x0100: 0x8030, 0x0120: 3, 0x0800: 0x0101, 0x0900: 0})
    assert ours == _pynetdicom(C_ECHO_RSP(), rsp)


@pytest.mark.parametrize("status, comment", [(0x0000, None), (0x0213, "more than 10 instances")])
def test_an_n_action_response_is_encoded_as_pynetdicom_encodes_it(status: int, comment: str | None) -> None:
    rsp = N_ACTION()
    rsp.MessageIDBeingRespondedTo = 9
    rsp.AffectedSOPClassUID = "1.2.840.10008.1.20.1"
    rsp.AffectedSOPInstanceUID = "1.2.840.10008.1.20.1.1"
    rsp.ActionTypeID = 1
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment
    ours = encode_command({
        0x0002: "1.2.840.10008.1.20.1", 0x0100: 0x8130, 0x0120: 9, 0x0800: 0x0101, 0x0900: status,
        0x0902: comment, 0x1000: "1.2.840.10008.1.20.1.1", 0x1008: 1,
    })
    assert ours == _pynetdicom(N_ACTION_RSP(), rsp)


def test_an_n_event_report_request_is_encoded_as_pynetdicom_encodes_it() -> None:
    from io import BytesIO

    rq = N_EVENT_REPORT()
    rq.MessageID = 5
    rq.AffectedSOPClassUID = "1.2.840.10008.1.20.1"
    rq.AffectedSOPInstanceUID = "1.2.840.10008.1.20.1.1"
    rq.EventTypeID = 1
    rq.EventInformation = BytesIO(b"\x08\x00\x95\x11\x02\x00\x00\x00\x31\x00")
    ours = encode_command({
        0x0002: "1.2.840.10008.1.20.1", 0x0100: 0x0100, 0x0110: 5, 0x0800: 0x0001,
        0x1000: "1.2.840.10008.1.20.1.1", 0x1002: 1,
    })
    assert ours == _pynetdicom(N_EVENT_REPORT_RQ(), rq)


@pytest.mark.parametrize("max_pdu", [0, 4096, 16384])
def test_p_data_pdus_are_pynetdicoms_pdus(max_pdu: int) -> None:
    command = encode_command({0x0002: CT, 0x0100: 0x0001, 0x0110: 1, 0x0700: 0, 0x0800: 0, 0x1000: "1.2.3"})
    data = bytes(range(256)) * 40
    pdus = p_data_pdus(1, command, data, max_pdu)
    expected = []
    step = max_pdu - 6 if max_pdu else len(data)
    pieces = [(0x03, command)] + [
        (0x00 | (0x02 if pos + step >= len(data) else 0), data[pos : pos + step])
        for pos in range(0, len(data), step)
    ]
    for control, piece in pieces:
        primitive = P_DATA()
        primitive.presentation_data_value_list.append([1, bytes([control]) + piece])
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        expected.append(bytes(pdu.encode()))
    assert pdus == expected
    if max_pdu:
        assert all(len(p) - 6 <= max_pdu for p in pdus)


def test_several_pdvs_in_one_body_are_split_and_broken_lengths_refused() -> None:
    body = struct.pack(">LBB", 3, 1, 0x03) + b"a" + struct.pack(">LBB", 4, 1, 0x02) + b"bc"
    assert [(cx, ctl, bytes(f)) for cx, ctl, f in split_pdvs(body)] == [(1, 3, b"a"), (1, 2, b"bc")]
    for broken in (b"", struct.pack(">LBB", 1, 1, 3), struct.pack(">LBB", 9, 1, 3) + b"x", b"\0\0"):
        with pytest.raises(FramingError):
            list(split_pdvs(broken))
    with pytest.raises(FramingError):  # reserved bits of the message control header
        list(split_pdvs(struct.pack(">LBB", 3, 1, 0x07) + b"a"))


def test_a_command_is_decoded_and_malformed_ones_refused() -> None:
    command = decode_command(c_store_rq(CT_IMAGE, b"1.2.3.4", 7))
    assert (command.command_field, command.message_id, command.has_data_set) == (0x0001, 7, True)
    assert command.text(0x0002) == CT and command.text(0x1000) == "1.2.3.4"
    good = c_store_rq(CT_IMAGE, b"1.2.3.4")
    for bad in (good[:-3], good.replace(b"\x00\x00\x00\x00\x04\x00", b"\x08\x00\x00\x00\x04\x00", 1),
                element(0x0000, struct.pack("<L", 99)) + good[12:], element(0x0110, b"\x01\x00")):
        with pytest.raises(FramingError):
            decode_command(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_command_and_pdv_decoders_raise_only_framing_errors(data: bytes) -> None:
    with contextlib.suppress(FramingError):
        decode_command(data)
    with contextlib.suppress(FramingError):
        list(split_pdvs(data))


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


@pytest.mark.parametrize(
    ("transfer_syntax", "implicit", "little"),
    [("1.2.840.10008.1.2", True, True), ("1.2.840.10008.1.2.1", False, True),
     ("1.2.840.10008.1.2.2", False, False)],
)
def test_a_message_data_set_is_encoded_as_pynetdicom_encodes_it_and_read_back(
    transfer_syntax: str, implicit: bool, little: bool
) -> None:
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pynetdicom.dsutils import encode

    from ingest.sources.dimse.framing import decode_data_set, encode_data_set

    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"
    ds = Dataset()
    ds.TransactionUID = "1.2.3.99"
    ds.ReferencedSOPSequence = Sequence([item])
    ds.StudyDate = "20240301"
    ds.NumberOfStudyRelatedInstances = 12
    data = encode_data_set(ds, transfer_syntax)
    assert data == encode(ds, implicit, little)
    back = decode_data_set(data, transfer_syntax)
    assert back.TransactionUID == "1.2.3.99" and back.NumberOfStudyRelatedInstances == 12
    assert back.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.3.4.5"
