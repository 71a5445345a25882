"""Storage Commitment with real peers against a real ``ingest serve`` process (README "Storage Commitment").

- Orthanc (``/usr/sbin/Orthanc``, its own process, generated configuration on loopback, own storage)
  sends a study with ``"StorageCommitment": true`` (``POST /modalities/ingest/store``); Orthanc sends
  the N-ACTION after the C-STOREs and receives the N-EVENT-REPORT on its own DICOM port, on a new
  association (it does not offer the SCP role on its requesting association). ``GET
  /storage-commitment/{transaction}`` must then report ``Success``.
- ``ingest serve`` is killed with SIGKILL after it answered an N-ACTION and before it could report (the
  requester's reply port is closed at first): after a restart the report is delivered.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmwrite
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from tests import LOOPBACK_HTTP, REPO, free_ports, wait_until
from tests.sources.dimse.listener_helpers import CT_IMAGE, instance
from tests.sources.dimse.test_commitment import _pairs, _request, _requester, _stored, report_scp
from tests.sources.sync.pacs import OrthancPacs, need_orthanc

_until = functools.partial(wait_until, every=0.2)  # HTTP checks against running services


STUDY = "1.2.3.88.1"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]



class Serve:
    """``ingest serve`` as a subprocess on free loopback ports."""

    def __init__(self, data: Path, allowed: list[dict[str, Any]]) -> None:
        self.data = data
        self.dicom_port, self.backend_port, self.admin_port = free_ports(3)
        self.allowed = allowed
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env.update(
            {
                "INGEST_LISTENER__PORT": str(self.dicom_port),
                "INGEST_LISTENER__ALLOWED_CALLING_AES": json.dumps(self.allowed),
                "INGEST_LISTENER__COMMITMENT__RETRY_BASE_S": "0.3",
                "INGEST_LISTENER__COMMITMENT__RETRY_MAX_S": "0.5",
                "INGEST_LISTENER__COMMITMENT__POLL_INTERVAL_S": "0.2",
                "INGEST_EMBEDDED_BACKEND__PORT": str(self.backend_port),
                "INGEST_ADMIN__PORT": str(self.admin_port),
                "INGEST_ADMIN__MIN_FREE_BYTES": "0",
            }
        )
        self.data.mkdir(parents=True, exist_ok=True)
        with (self.data / "serve.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingest", "--data-dir", str(self.data), "serve"],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=log,
            )
        _until(self._listening, 30, f"ingest serve listening:\n{self.log()}")

    def _listening(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log()
        try:
            with LOOPBACK_HTTP.open(f"http://127.0.0.1:{self.admin_port}/healthz", timeout=2) as rsp:
                return bool(json.loads(rsp.read()).get("listener") == "ok")
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None

    def status(self) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "ingest", "--data-dir", str(self.data), "status", "--json"],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=60,
        )
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def log(self) -> str:
        path = self.data / "serve.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


@contextmanager
def serving(data: Path, allowed: list[dict[str, Any]]) -> Iterator[Serve]:
    s = Serve(data, allowed)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_orthanc_sends_a_study_with_storage_commitment_and_gets_success(tmp_path: Path) -> None:
    need_orthanc(dicomweb=False)
    reply_port = free_ports(1)[0]
    serve_allowed = [{"ae": "ORTHANC", "host": "127.0.0.1", "port": reply_port}]
    s = Serve(tmp_path / "data", serve_allowed)
    orthanc = OrthancPacs(
        tmp_path / "orthanc",
        modalities={"ingest": {"AET": "INGEST", "Host": "127.0.0.1", "Port": s.dicom_port}},
        dicomweb=False,
    )
    try:
        # Orthanc's DICOM port is only known now: the reply route points at it
        s.allowed[0]["port"] = orthanc.dicom_port
        s.start()
        files = tmp_path / "files"
        files.mkdir()
        uploaded = []
        for n in range(1, 4):
            ds = instance(f"{STUDY}.3.{n}", study=STUDY, series=f"{STUDY}.2", InstanceNumber=n)
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            path = files / f"{n}.dcm"
            dcmwrite(path, ds, enforce_file_format=True)
            uploaded.append(orthanc.call("POST", "/instances", path.read_bytes()))
        [study_id] = {u["ParentStudy"] for u in uploaded}
        try:
            job = orthanc.call(
                "POST",
                "/modalities/ingest/store",
                json.dumps(
                    {"Resources": [study_id], "StorageCommitment": True, "Synchronous": True}
                ).encode(),
                timeout=60,
            )
        except urllib.error.HTTPError as exc:
            pytest.fail(f"Orthanc's store failed: {exc.read()!r}\n{orthanc.logs()}\n{s.log()}")
        assert job["InstancesCount"] == 3 and job["FailedInstancesCount"] == 0, job
        transaction = job["StorageCommitmentTransactionUID"]
        result = _until(
            lambda: (
                (r := orthanc.call("GET", f"/storage-commitment/{transaction}"))["Status"] != "Pending" and r
            ),
            30,
            f"Orthanc received the report\n{orthanc.logs()}\n{s.log()}",
        )
        assert result["Status"] == "Success", result
        assert sorted(i["SOPInstanceUID"] for i in result["Success"]) == [
            f"{STUDY}.3.{n}" for n in range(1, 4)
        ]
        assert result["Failures"] == []
        status = s.status()["commitments"]
        assert status["counts"] == {"reported": 1} and status["undelivered"] == []
    finally:
        s.stop()
        orthanc.stop()


def test_a_report_answered_before_a_kill_is_delivered_after_the_restart(tmp_path: Path) -> None:
    reply_port = free_ports(1)[0]  # closed until the restart
    with serving(tmp_path / "data", [{"ae": "TESTSCU", "host": "127.0.0.1", "port": reply_port}]) as s:
        ae, kwargs = _requester(role=False)
        assoc = ae.associate("127.0.0.1", s.dicom_port, **kwargs)
        assert assoc.is_established
        uid = "1.2.3.9.2.77"
        assert assoc.send_c_store(_stored(uid)).Status == 0x0000
        status, _ = assoc.send_n_action(
            _request("1.2.3.9.777", [(CT_IMAGE, uid), (CT_IMAGE, "1.2.3.9.778")]),
            1,
            "1.2.840.10008.1.20.1",
            "1.2.840.10008.1.20.1.1",
        )
        assert status.Status == 0x0000
        assoc.release()
        pending = _until(
            lambda: [c for c in s.status()["commitments"]["undelivered"] if c["attempts"] >= 1],
            20,
            "a failed delivery attempt",
        )
        assert pending[0]["state"] == "pending" and "cannot connect" in pending[0]["last_error"]
        s.stop(signal.SIGKILL)
        with report_scp(reply_port) as reports:
            s.start()
            event_type, info = reports.get(timeout=30)
        assert event_type == 2
        assert _pairs(info, "ReferencedSOPSequence") == [(CT_IMAGE, uid)]
        assert _pairs(info, "FailedSOPSequence") == [(CT_IMAGE, "1.2.3.9.778", "0x0112")]
        _until(lambda: s.status()["commitments"]["counts"] == {"reported": 1}, 20, "recorded as reported")
