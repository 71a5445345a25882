
"""A real peer: Orthanc (Debian package) forwards a study with a retired Ultrasound image to the listener.

The test runs ``/usr/sbin/Orthanc`` as its own process with a generated configuration: HTTP and DICOM
on free ports, storage and index in ``tmp_path``, no remote access, no plugins, and one DICOM modality,
the listener. The study is uploaded through Orthanc's REST API (``POST /instances``) and forwarded with
``POST /modalities/ingest/store``; Orthanc must report success and the listener must hold the rows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from tests import LOOPBACK_HTTP, free_ports

from .listener_helpers import CT_IMAGE, instance, make_settings, running_listener

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"  # Ultrasound Image Storage (Retired), PS3.6 Annex A
STUDY = "1.2.3.77.1"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(120),
]


@dataclass
class Orthanc:
    base: str
    proc: subprocess.Popen[bytes]
    log: Path

    def call(self, method: str, path: str, body: bytes | None = None, timeout: float = 30) -> Any:
        req = urllib.request.Request(self.base + path, data=body, method=method)
        if body is not None:
            kind = "application/dicom" if path == "/instances" else "application/json"
            req.add_header("Content-Type", kind)
        with LOOPBACK_HTTP.open(req, timeout=timeout) as rsp:
            return json.loads(rsp.read())

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def orthanc_for(tmp_path: Path) -> Iterator[Any]:
    """A factory: ``orthanc_for(listener_port)`` starts Orthanc with the listener as modality "ingest"."""
    if not os.access(ORTHANC, os.X_OK):
        pytest.skip(f"Orthanc not installed ({ORTHANC} missing): the Orthanc forwarding test is skipped")
    started: list[Orthanc] = []

    def start(listener_port: int) -> Orthanc:
        http_port, dicom_port = free_ports(2)
        home = tmp_path / "orthanc"
        home.mkdir()
        config = {
            "Name": "ingest-test-orthanc",
            "StorageDirectory": str(home / "storage"),
            "IndexDirectory": str(home / "index"),
            "Plugins": [],
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {"ingest": ["INGEST", "127.0.0.1", listener_port]},
            "DicomScuTimeout": 15,
            "DicomAssociationCloseDelay": 0,
            "SaveJobs": False,
            "HttpsVerifyPeers": False,
        }
        cfg = home / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        log = home / "orthanc.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=out, stderr=subprocess.STDOUT, cwd=home)
        node = Orthanc(f"http://127.0.0.1:{http_port}", proc, log)
        started.append(node)
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {proc.returncode}:\n{node.logs()}")
            try:
                node.call("GET", "/system", timeout=2)
                return node
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"Orthanc did not answer /system within 30 s:\n{node.logs()}")
                time.sleep(0.2)

    yield start
    for node in started:  # stopped by its PID (the Popen object), nothing else
        if node.proc.poll() is None:
            node.proc.terminate()
            try:
                node.proc.wait(15)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(5)


def _part10(folder: Path, ds: Dataset) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / f"{len(list(folder.iterdir()))}.dcm"
    dcmwrite(path, ds, enforce_file_format=True)
    return path.read_bytes()


def test_orthanc_forwards_a_study_with_a_retired_ultrasound_image(tmp_path: Path, orthanc_for: Any) -> None:
    files = tmp_path / "files"
    files.mkdir()
    series = f"{STUDY}.2"
    bodies = [
        _part10(files, instance(f"{STUDY}.3.1", study=STUDY, series=series, SOPClassUID=US_RETIRED,
                                Modality="US", InstanceNumber=1)),
        _part10(files, instance(f"{STUDY}.3.2", study=STUDY, series=series, SOPClassUID=US_RETIRED,
                                Modality="US", InstanceNumber=2)),
        _part10(files, instance(f"{STUDY}.4.1", study=STUDY, series=f"{STUDY}.4", SOPClassUID=CT_IMAGE)),
    ]
    settings = make_settings(tmp_path / "data", allowed_calling_aes=["ORTHANC"])
    with running_listener(settings) as run:
        orthanc = orthanc_for(run.port)
        uploaded = [orthanc.call("POST", "/instances", body) for body in bodies]
        assert all(u["Status"] == "Success" for u in uploaded), uploaded
        study_ids = {u["ParentStudy"] for u in uploaded}
        assert len(study_ids) == 1
        try:
            result = orthanc.call(
                "POST", "/modalities/ingest/store",
                json.dumps({"Resources": sorted(study_ids), "Synchronous": True}).encode(),
                timeout=60,
            )
        except urllib.error.HTTPError as exc:
            pytest.fail(f"Orthanc's forward failed: {exc.read()!r}\n{orthanc.logs()}")
        assert result["InstancesCount"] == 3, result
        assert result["FailedInstancesCount"] == 0, result
        rows = sorted((r.sop_uid, r.sop_class_uid) for r in run.store.instances(STUDY))
        assert rows == [
            (f"{STUDY}.3.1", US_RETIRED),
            (f"{STUDY}.3.2", US_RETIRED),
            (f"{STUDY}.4.1", CT_IMAGE),
        ]
        assert b"ingest_presentation_contexts_refused_total{" not in run.listener.metrics.render()
