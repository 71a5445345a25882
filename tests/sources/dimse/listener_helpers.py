"""Shared helpers for the listener tests: a running listener on an OS-chosen loopback port, raw sends."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config

from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app.wiring import attach_commitment_reports
from ingest.config import ListenerSettings, RelaySettings, Settings, SpoolSettings
from ingest.metrics import Metrics
from ingest.sources.dimse.listener import Listener, start_listener

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


class FakeRelay:
    """Counts ``wake()`` calls (made on the loop thread)."""

    def __init__(self) -> None:
        self.wakes = 0
        self.woken = threading.Event()

    def wake(self) -> None:
        self.wakes += 1
        self.woken.set()


def make_settings(data_dir: Path, **listener: Any) -> Settings:
    relay = listener.pop("relay", None) or RelaySettings(stable_age_s=600, release_grace_s=1)
    spool = listener.pop("spool", None) or SpoolSettings()
    base: dict[str, Any] = {
        "port": 0,
        "allowed_calling_aes": ["TESTSCU"],
        "acse_timeout_s": 5,
        "dimse_timeout_s": 10,
        "network_timeout_s": 10,
    }
    base.update(listener)
    return Settings(data_dir=data_dir, listener=ListenerSettings(**base), relay=relay, spool=spool)


class Running:
    def __init__(self, listener: Listener, store: SQLiteStateStore, relay: FakeRelay) -> None:
        self.listener = listener
        self.store = store
        self.relay = relay

    @property
    def port(self) -> int:
        return self.listener.address[1]


@contextmanager
def running_listener(settings: Settings, store: SQLiteStateStore | None = None) -> Iterator[Running]:
    """A listener whose asyncio loop runs in a background thread, as in ``ingest serve``."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    own_store = store is None
    st = store or SQLiteStateStore(settings.data_dir / "state.sqlite3", node="test")
    relay = FakeRelay()
    metrics = Metrics()
    listener = asyncio.run_coroutine_threadsafe(
        start_listener(settings, st, relay.wake, metrics), loop
    ).result(10)
    if listener.commitment is not None:  # its report sender, as ingest serve attaches it
        attach_commitment_reports(settings, st, listener.commitment, metrics=metrics)
    try:
        yield Running(listener, st, relay)
    finally:
        asyncio.run_coroutine_threadsafe(listener.aclose(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
        if own_store:
            st.close()


def scu(ae_title: str = "TESTSCU") -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = 5
    ae.dimse_timeout = 10
    ae.network_timeout = 10
    return ae


def encode(ds: Dataset) -> bytes:
    """``ds`` encoded Explicit VR Little Endian, without file meta."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def raw_file(
    folder: Path, body: bytes, *, sop_class: str, sop_uid: str, ts: str = ExplicitVRLittleEndian
) -> Path:
    """A Part 10 file whose file meta gives the C-STORE command's UIDs and whose dataset is ``body``.

    Sent with ``STORE_SEND_CHUNKED_DATASET`` on, pynetdicom streams ``body`` unchanged.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    buf = BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta)  # type: ignore[arg-type]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"raw-{len(list(folder.iterdir()))}.dcm"
    path.write_bytes(buf.getvalue() + body)
    return path


def send_raw(port: int, path: Path, ts: str = ExplicitVRLittleEndian, sop_class: str = CT_IMAGE) -> Any:
    """Send a raw file (see :func:`raw_file`); returns the response status Dataset (or None)."""
    ae = scu()
    ae.add_requested_context(sop_class, ts)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="INGEST")
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
        return status
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def instance(
    sop_uid: str = "1.2.3.4.5.3", study: str = "1.2.3.4.5.1", series: str = "1.2.3.4.5.2", **extra: Any
) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE  # (0008,0016)
    ds.SOPInstanceUID = sop_uid  # (0008,0018)
    ds.StudyInstanceUID = study  # (0020,000D)
    ds.SeriesInstanceUID = series  # (0020,000E)
    ds.Modality = "CT"
    ds.PatientID = "P1"
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds
