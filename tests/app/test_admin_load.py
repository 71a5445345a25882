"""The status page under load, against a real ``ingest serve`` subprocess: viewers of a large study page
must not slow the C-STORE listener down (dcmtk ``storescu`` as the sender)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ingest.adapters.state import open_state_store
from ingest.core.records import InstanceRecord
from tests import LOOPBACK_HTTP, REPO, free_ports, wait_until

pytestmark = [
    pytest.mark.dcmtk,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed"),
]

CT = "1.2.840.10008.5.1.4.1.1.2"
BIG_STUDY = "1.2.826.0.1.3680043.10.543.7"
BIG_INSTANCES = 3000
SIDE_FILES = 20_000
VIEWERS = 8
SENT = 24


def _fill_store(data: Path) -> None:
    """One study of ``BIG_INSTANCES`` rows in 30 series, written through the state store's API."""
    store = open_state_store(None, data, node="load-node")
    now = datetime.now(UTC)
    try:
        items = []
        for i in range(BIG_INSTANCES):
            series = f"{BIG_STUDY}.{i % 30 + 1}"
            record = InstanceRecord(
                study_uid=BIG_STUDY, series_uid=series, sop_uid=f"{series}.{i + 1}", sop_class_uid=CT,
                modality="CT", series_number=i % 30 + 1, instance_number=i + 1, accession_number="ACC-LOAD",
                study_description="load", series_description=f"series {i % 30 + 1}",
            )
            items.append((record, "dimse:MODALITY", None, f"c1:{i}"))
        # far in the future: the relay never claims it while the test runs
        store.add_instances(items, now=now, due_at=now + timedelta(days=1))
    finally:
        store.close()


def _fill_quarantine(data: Path) -> None:
    """``SIDE_FILES`` side files; one in a thousand names an instance of the big study."""
    folder = data / "quarantine"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for i in range(SIDE_FILES):
        sop = f"{BIG_STUDY}.{i % 30 + 1}.{i + 1}" if i % 1000 == 0 else f"1.2.826.0.1.9.{i}"
        side = {"reason": "conflict", "rule": "other_content", "time": "2026-01-01T00:00:00+00:00",
                "detail": f"SOP Instance UID {sop} already stored with other content", "kept": False,
                "source": "dimse:MODALITY", "size": 1000}
        (folder / f"{secrets.token_hex(16)}.json").write_text(json.dumps(side))


def _write_corpus(folder: Path) -> Path:
    """``SENT`` small CT instances of one new study."""
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    for i in range(SENT):
        ds = Dataset()
        ds.SOPClassUID = CT
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "LOAD-1", "Load^Test"
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = bytes(8 * 8 * 2)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(folder / f"{i:03d}.dcm", enforce_file_format=True)
    return folder


class Serve:
    def __init__(self, tmp: Path) -> None:
        self.dicom_port, self.admin_port, closed_port = free_ports(3)
        self.data = tmp / "data"
        self.log = tmp / "serve.log"
        self.config = tmp / "ingest.toml"
        # a backend nobody listens on: the relay waits for it and stays idle
        self.config.write_text(
            f'data_dir = "{self.data}"\n'
            f'[backend]\nurl = "http://127.0.0.1:{closed_port}/fhir/R4/$graphql"\n'
            f"[listener]\nport = {self.dicom_port}\naccept_any_calling_ae = true\n"
            f'[admin]\nhost = "127.0.0.1"\nport = {self.admin_port}\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingest", "--config", str(self.config), "serve"],
                cwd=REPO, env=env, stdout=log, stderr=log,
            )

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            return self.get("/healthz") != 0

        wait_until(up, 60, "ingest serve to start")

    def get(self, path: str) -> int:
        try:
            with LOOPBACK_HTTP.open(f"http://127.0.0.1:{self.admin_port}{path}", timeout=60) as rsp:
                rsp.read()
                return int(rsp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.proc.kill()
                self.proc.wait(10)

    def storescu(self, corpus: Path) -> float:
        """Wall time of one ``storescu`` association sending the corpus; it must succeed."""
        started = time.monotonic()
        done = subprocess.run(
            ["storescu", "-aec", "INGEST", "+sd", "127.0.0.1", str(self.dicom_port), str(corpus)],
            capture_output=True, timeout=120, check=False,
        )
        elapsed = time.monotonic() - started
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return elapsed


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Serve]:
    s = Serve(tmp_path)
    _fill_store(s.data)
    _fill_quarantine(s.data)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_study_page_viewers_do_not_slow_the_listener(serving: Serve, tmp_path: Path) -> None:
    loaded = _write_corpus(tmp_path / "loaded")
    serving.storescu(_write_corpus(tmp_path / "warm"))  # first association: imports and caches warm up
    # without viewers; the slower of two runs, so that a lucky one does not tighten the bound
    baseline = max(serving.storescu(_write_corpus(tmp_path / f"quiet{i}")) for i in range(2))

    stop = threading.Event()
    answers: list[list[int]] = [[] for _ in range(VIEWERS)]

    def view(mine: list[int]) -> None:
        while not stop.is_set():
            mine.append(serving.get(f"/study/{BIG_STUDY}"))

    viewers = [threading.Thread(target=view, args=(mine,), daemon=True) for mine in answers]
    for t in viewers:
        t.start()
    try:
        wait_until(lambda: all(answers), 120, "every viewer to get a page once")
        under_load = serving.storescu(loaded)
    finally:
        stop.set()
        for t in viewers:
            t.join(120)
    statuses = [status for mine in answers for status in mine]
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses
    # the viewers' pages are built off the listener's way: the 24 stores take at most a few times as long
    # (plus a fixed second for a loaded machine) as without them
    assert under_load < 3 * baseline + 1.0, (baseline, under_load)
