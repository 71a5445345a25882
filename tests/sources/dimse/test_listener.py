"""The C-STORE listener: real pynetdicom SCUs on loopback against ``start_listener``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import create_file_meta
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ingest.adapters.dicomfile import read_header
from ingest.adapters.spool import read_instance
from ingest.config import SpoolSettings
from ingest.sources.dimse.listener import part10_prefix
from ingest.sources.dimse.status import STATUS_TABLE
from tests import iocm, wait_until

from .listener_helpers import (
    CT_IMAGE,
    encode,
    instance,
    make_settings,
    raw_file,
    running_listener,
    scu,
    send_raw,
)

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))


def test_echo(tmp_path: Path) -> None:
    with running_listener(make_settings(tmp_path)) as run:
        ae = scu()
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()


def test_store_is_durable_then_acknowledged_and_duplicates_are_quiet(tmp_path: Path) -> None:
    ds = dcmread(CT_SMALL)
    with running_listener(make_settings(tmp_path)) as run:
        ae = scu()
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        assert assoc.send_c_store(ds).Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000  # identical duplicate
        assoc.release()
        rows = run.store.instances(ds.StudyInstanceUID)
        assert [r.sop_uid for r in rows] == [ds.SOPInstanceUID]
        # a small instance is no spool file: its bytes were committed with its row (one durable write)
        assert run.listener.spool.names() == []
        assert [p.name for p in run.listener.spool.root.iterdir()] == []
        assert run.store.instance_spool_name(ds.SOPInstanceUID) is None
        kept = read_instance(run.store, run.listener.spool, ds.SOPInstanceUID)
        assert kept is not None and kept[128:132] == b"DICM"  # a Part 10 file (PS3.10 7.1)
        assert run.store.inline_bytes_total() == len(kept)  # the duplicate's bytes were not kept
        again = dcmread(BytesIO(kept))
        assert again.SOPInstanceUID == ds.SOPInstanceUID
        assert again.PixelData == ds.PixelData
        assert run.relay.woken.wait(5)


@pytest.mark.parametrize(
    ("sop_class", "sop_uid", "ts"),
    [
        (CT_IMAGE, "1.2.3.4.5.3", ExplicitVRLittleEndian),  # odd-length UIDs, padded with NUL
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.44", "1.2.840.10008.1.2"),  # even-length ones
    ],
)
def test_part10_prefix_is_what_pydicom_writes_for_pynetdicoms_file_meta(
    sop_class: str, sop_uid: str, ts: str
) -> None:
    meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_uid, transfer_syntax=ts)
    buf = BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    assert part10_prefix(sop_class, sop_uid, ts) == buf.getvalue()


def test_instance_over_inline_max_bytes_is_a_spool_file(tmp_path: Path) -> None:
    ds = dcmread(CT_SMALL)  # about 39 KB
    settings = make_settings(tmp_path, spool=SpoolSettings(inline_max_bytes=4096))
    with running_listener(settings) as run:
        ae = scu()
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        assert assoc.send_c_store(ds).Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000  # identical duplicate
        assoc.release()
        spooled = run.listener.spool.names()
        assert len(spooled) == 1  # the duplicate's copy was not kept
        assert run.store.instance_spool_name(ds.SOPInstanceUID) == spooled[0]
        assert run.store.instance_bytes(ds.SOPInstanceUID) is None
        assert run.store.inline_bytes_total() == 0
        # the spool holds a readable Part 10 file of the received instance
        parsed = read_header(run.listener.spool.path(spooled[0]))
        assert parsed.record.sop_uid == ds.SOPInstanceUID
        assert read_instance(run.store, run.listener.spool, ds.SOPInstanceUID) == (
            run.listener.spool.path(spooled[0]).read_bytes()
        )


def test_conflicting_duplicate_keeps_first_and_quarantines_second(tmp_path: Path) -> None:
    first = instance()
    second = instance(SeriesDescription="other content")
    for ds in (first, second):
        ds.file_meta = Dataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with running_listener(make_settings(tmp_path)) as run:
        ae = scu()
        ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        assert assoc.send_c_store(first).Status == 0x0000
        rsp = assoc.send_c_store(second)
        assoc.release()
        assert rsp.Status == STATUS_TABLE["conflict"].status
        assert "ErrorComment" in rsp
        rows = run.store.instances(first.StudyInstanceUID)
        assert len(rows) == 1 and rows[0].series_description is None
        names = run.listener.quarantine.names()
        assert len(names) == 1
        assert run.listener.quarantine.reason(names[0])["reason"] == "conflict"


def test_release_brings_studies_forward_abort_does_not(tmp_path: Path) -> None:
    with running_listener(make_settings(tmp_path)) as run:
        ae = scu()
        ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
        a = instance("1.2.9.1.3", study="1.2.9.1", series="1.2.9.1.2")
        b = instance("1.2.9.2.3", study="1.2.9.2", series="1.2.9.2.2")
        for ds in (a, b):
            ds.file_meta = Dataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        assert assoc.send_c_store(a).Status == 0x0000
        assoc.release()
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        assert assoc.send_c_store(b).Status == 0x0000
        assoc.abort()
        now = datetime.now(UTC)
        row_a, row_b = run.store.study("1.2.9.1"), run.store.study("1.2.9.2")
        assert row_a is not None and row_b is not None
        assert row_a.due_at is not None and row_a.due_at < now + timedelta(seconds=5)  # grace = 1 s
        assert row_b.due_at is not None and row_b.due_at > now + timedelta(seconds=500)  # stable_age 600


def _deep(levels: int) -> Dataset:
    inner = Dataset()
    inner.CodeValue = "X"
    for _ in range(levels):
        inner.is_undefined_length_sequence_item = True  # delimited items, as most modalities write
        outer = Dataset()
        outer.ContentSequence = Sequence([inner])
        outer["ContentSequence"].is_undefined_length = True
        inner = outer
    return inner


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing_study_uid", STATUS_TABLE["missing_tag"].status),
        ("dotdot_uid", STATUS_TABLE["invalid_uid"].status),
        ("mismatch", 0xA900),
        ("truncated", STATUS_TABLE["truncated"].status),
        ("deep_nesting", STATUS_TABLE["nesting_too_deep"].status),
        ("garbage", None),
    ],
)
def test_bad_data_gets_its_status_and_the_server_stays_up(
    tmp_path: Path, case: str, expected: int | None
) -> None:
    sop = "1.2.3.4.5.3"
    ds = instance(sop)
    if case == "missing_study_uid":
        del ds.StudyInstanceUID
        body = encode(ds)
    elif case == "dotdot_uid":
        ds.SeriesInstanceUID = "1.2.33"  # same length, patched below (pydicom warns on writing "..")
        body = encode(ds).replace(b"1.2.33", b"1.2..3")
    elif case == "mismatch":
        body = encode(instance("1.2.3.4.5.99"))
    elif case == "truncated":
        ds.ImageComments = "x" * 200  # (0020,4000) LT
        body = encode(ds)[:-50]
    elif case == "deep_nesting":
        deep = _deep(100)
        for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            setattr(deep, k, getattr(ds, k))
        body = encode(deep)
    else:
        body = b"\x01\x02" * 100
    path = raw_file(tmp_path / "raw", body, sop_class=CT_IMAGE, sop_uid=sop)
    with running_listener(make_settings(tmp_path / "data")) as run:
        rsp = send_raw(run.port, path)
        assert rsp is not None
        if expected is None:  # unparseable bytes: some 0xC0xx "cannot understand"
            assert 0xC000 <= rsp.Status <= 0xCFFF
        else:
            assert rsp.Status == expected
        assert rsp.ErrorComment
        assert run.store.studies() == []
        names = run.listener.quarantine.names()
        assert len(names) == 1
        side = run.listener.quarantine.reason(names[0])
        assert json.dumps(side)  # a reason side file exists and is JSON
        # still serving
        good = raw_file(
            tmp_path / "raw", encode(instance("1.2.3.4.6.3")), sop_class=CT_IMAGE, sop_uid="1.2.3.4.6.3"
        )
        assert send_raw(run.port, good).Status == 0x0000
        assert len(run.store.instances("1.2.3.4.5.1")) == 1



@pytest.mark.parametrize(
    ("count", "cap"), [(6, 5), (300_001, 100_000)], ids=["cap-plus-one", "300001-spilled-to-disk"]
)
def test_a_rejection_note_naming_more_instances_than_the_cap_is_refused_0xc007(
    tmp_path: Path, count: int, cap: int
) -> None:
    study = "1.2.3.4.7.1"
    # a Part 10 file whose meta names the note: sent as it is (the 300,001-instance note is 25 MiB, over
    # the 16 MiB the listener holds in memory: it is spilled to disk and read from there)
    path = tmp_path / "note.dcm"
    path.write_bytes(iocm.large_note(study, f"{study}.2", count, sop=f"{study}.99"))
    within = tmp_path / "within.dcm"
    within.write_bytes(iocm.large_note(study, f"{study}.2", 5, sop=f"{study}.98"))
    # the sender may send rejection notes (reject = true): only the cap refuses the note past it
    allowed = [{"ae": "TESTSCU", "reject": True}]
    with running_listener(make_settings(tmp_path / "data", max_rejection_items=cap,
                                        allowed_calling_aes=allowed)) as run:
        rsp = send_raw(run.port, path, sop_class=iocm.KOS)
        assert rsp is not None
        assert rsp.Status == 0xC007 == STATUS_TABLE["too_many_references"].status
        assert rsp.ErrorComment == "Key Object names more instances than the cap"
        assert run.store.studies() == []
        names = run.listener.quarantine.names()
        assert len(names) == 1
        assert run.listener.quarantine.reason(names[0])["reason"] == "too_many_references"
        # a note within the cap is stored
        assert send_raw(run.port, within, sop_class=iocm.KOS).Status == 0x0000
        assert [r.sop_uid for r in run.store.instances(study)] == [f"{study}.98"]


def test_one_line_says_what_each_association_did(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import re

    first, other = instance(), instance(sop_uid="1.2.3.4.5.7")
    conflicting = instance(SeriesDescription="other content")
    for ds in (first, other, conflicting):
        ds.file_meta = Dataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with caplog.at_level(logging.INFO, logger="ingest.sources.dimse.listener"), running_listener(
        make_settings(tmp_path)
    ) as run:
        ae = scu()
        ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        assert assoc.send_c_store(first).Status == 0x0000
        assert assoc.send_c_store(other).Status == 0x0000
        assert assoc.send_c_store(first).Status == 0x0000  # an identical duplicate
        assert assoc.send_c_store(conflicting).Status == STATUS_TABLE["conflict"].status
        assoc.release()

        def summary() -> list[str]:
            return [r.getMessage() for r in caplog.records if "stored," in r.getMessage()]

        wait_until(summary, 10, "the association's summary line")
    (line,) = summary()
    assert re.fullmatch(r"association from TESTSCU \(127\.0\.0\.1\) released: 2 stored, 1 duplicate, "
                        r"1 refused, \d+ bytes, \d+\.\d s", line), line
    record = next(r for r in caplog.records if r.getMessage() == line)
    assert record.levelno == logging.INFO and record.ae == "TESTSCU"
