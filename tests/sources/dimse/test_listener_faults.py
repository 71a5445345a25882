"""Listener faults: spool write errors, aborted transfers, many concurrent associations."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.pdu import P_DATA_TF

from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.config import SpoolSettings
from ingest.errors import StoreUnavailableError
from tests import wait_until

from .listener_helpers import CT_IMAGE, instance, make_settings, running_listener, scu


def _with_meta(ds: Dataset) -> Dataset:
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_spool_write_error_answers_out_of_resources_and_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every instance is a spool file here ([spool] inline_max_bytes = 0)
    with running_listener(make_settings(tmp_path, spool=SpoolSettings(inline_max_bytes=0))) as run:
        real_write = os.write

        def failing_write(fd: int, data: bytes) -> int:
            if threading.current_thread().name.startswith("ingest-store"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", failing_write)
        ae = scu()
        ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        rsp = assoc.send_c_store(_with_meta(instance()))
        monkeypatch.setattr(os, "write", real_write)
        assert rsp.Status == 0xA700
        assert run.store.studies() == []
        assert run.listener.spool.names() == []
        assert [p for p in run.listener.spool.root.iterdir()] == []  # no temporary file left either
        assert assoc.send_c_store(_with_meta(instance())).Status == 0x0000  # recovers once the disk does
        assoc.release()


def test_state_store_failure_answers_out_of_resources_and_keeps_no_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small instance's bytes go with its row: when that transaction fails, nothing is kept (0xA700)."""
    with running_listener(make_settings(tmp_path)) as run:
        real_add = run.store.add_instances

        def failing_add(*args: Any, **kwargs: Any) -> Any:  # as SQLite reports a full disk
            raise StoreUnavailableError("state database: add_instances failed: database or disk is full")

        monkeypatch.setattr(run.store, "add_instances", failing_add)
        ae = scu()
        ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        rsp = assoc.send_c_store(_with_meta(instance()))
        monkeypatch.setattr(run.store, "add_instances", real_add)
        assert rsp.Status == 0xA700
        assert "ErrorComment" in rsp
        assert run.store.studies() == []
        assert run.store.inline_bytes_total() == 0
        assert list(run.listener.spool.root.iterdir()) == []
        assert assoc.send_c_store(_with_meta(instance())).Status == 0x0000  # recovers with the store
        assoc.release()
        assert run.store.instance_bytes("1.2.3.4.5.3") is not None


def test_association_aborted_mid_transfer_leaves_nothing_half_stored(tmp_path: Path) -> None:
    big = _with_meta(instance())
    big.PixelData = b"\0" * (8 * 1024 * 1024)  # (7FE0,0010): many PDUs
    big["PixelData"].VR = "OB"
    sent = [0]

    def cut_after_a_few(event: evt.Event) -> None:  # the connection dies mid-transfer
        if isinstance(event.pdu, P_DATA_TF):
            sent[0] += 1
            if sent[0] == 5:
                event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    with running_listener(make_settings(tmp_path)) as run:
        ae = scu()
        ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST",
                             evt_handlers=[(evt.EVT_PDU_SENT, cut_after_a_few)])
        assoc.send_c_store(big)
        assert sent[0] >= 5
        # once the listener has let the association go, nothing more can arrive from it
        wait_until(lambda: not run.listener.active, 10, "the cut association ended")
        assert run.store.studies() == []
        assert run.listener.spool.names() == []
        assert [p for p in run.listener.spool.root.iterdir()] == []


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed")
def test_eight_concurrent_associations_all_stored_with_bounded_memory(tmp_path: Path) -> None:
    """Eight dcmtk ``storescu`` processes, 200 small instances each, at once: every one stored, and the
    listener's process (the senders are other processes) grows by less than 100 MB."""
    n_assoc, per = 8, 200
    folders = []
    for k in range(n_assoc):
        folder = tmp_path / f"sender-{k}"
        folder.mkdir()
        for i in range(per):
            ds = _with_meta(instance(f"1.2.8.{k}.3.{i}", study=f"1.2.8.{k}", series=f"1.2.8.{k}.2"))
            ds.save_as(folder / f"{i:03d}.dcm", enforce_file_format=True)
        folders.append(folder)
    # the listener's own idle timeout runs while a handler waits for its commit: generous on a loaded box
    settings = make_settings(tmp_path / "data", max_associations=8, network_timeout_s=120,
                             dimse_timeout_s=120)
    with running_listener(settings) as run:
        writer = run.listener.group.writer
        wait_until(lambda: writer is not None and writer.running, 60, "the writer process opened the store")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        senders = [
            subprocess.Popen(["storescu", "-aet", "TESTSCU", "-aec", "INGEST", "-to", "120", "-ta", "120",
                              "-td", "120", "+sd", "127.0.0.1", str(run.port), str(folder)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for folder in folders
        ]
        outputs = [proc.communicate(timeout=240)[0].decode(errors="replace") for proc in senders]
        for proc, out in zip(senders, outputs, strict=True):
            assert proc.returncode == 0, out
        for k in range(n_assoc):
            assert len(run.store.instances(f"1.2.8.{k}")) == per
        # small instances: no spool file, the bytes of each are in the state store with its row
        assert run.listener.spool.names() == []
        assert all(
            run.store.instance_bytes(f"1.2.8.{k}.3.{i}") is not None
            for k in range(n_assoc)
            for i in range(per)
        )
        assert run.listener.group.committed == n_assoc * per
        # eight associations open: their commits went to the writer process, several per transaction
        assert 0 < run.listener.group.to_process < n_assoc * per
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before < 100


def test_full_intake_answers_out_of_resources_and_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every intake slot taken by a store still in progress, the next C-STORE gets 0xA700 at once."""
    store = SQLiteStateStore(tmp_path / "state.sqlite3", node="test")
    entered, proceed = threading.Event(), threading.Event()
    real_add = store.add_instances

    def slow_add(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        proceed.wait(20)  # holds the only intake slot
        return real_add(*args, **kwargs)

    monkeypatch.setattr(store, "add_instances", slow_add)

    def send(ds: Dataset) -> int | None:
        ae = scu()
        ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        assert assoc.is_established
        try:
            status = getattr(assoc.send_c_store(_with_meta(ds)), "Status", None)
        finally:
            assoc.release()
        return int(status) if status is not None else None

    try:
        with running_listener(make_settings(tmp_path, intake_size=1), store) as run:
            first: list[int | None] = []
            sender = threading.Thread(target=lambda: first.append(send(instance("1.2.9.3.1"))))
            sender.start()
            assert entered.wait(10), "the first C-STORE never reached the store"
            started = time.monotonic()
            second = send(instance("1.2.9.3.2"))
            answered_in = time.monotonic() - started
            proceed.set()
            sender.join(20)
        assert second == 0xA700
        assert answered_in < 5  # refused at once, not queued behind the slow store
        assert first == [0x0000]
        assert [r.sop_uid for r in store.instances("1.2.3.4.5.1")] == ["1.2.9.3.1"]
    finally:
        proceed.set()
        store.close()
