"""``ingest serve`` in a subprocess with dcmtk ``storescu``/``echoscu`` as real clients."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from samples.generate import generate
from tests import REPO, free_ports

pytestmark = [
    pytest.mark.dcmtk,
    pytest.mark.skipif(shutil.which("storescu") is None or shutil.which("echoscu") is None,
                       reason="dcmtk storescu/echoscu not installed"),
]



def _free_ports() -> tuple[int, int, int]:
    """Three distinct free ports (``tests.free_ports``)."""
    a, b, c = free_ports(3)
    return a, b, c


class Serve:
    def __init__(self, data: Path, dicom_port: int, backend_port: int, admin_port: int) -> None:
        self.data, self.dicom_port, self.backend_port = data, dicom_port, backend_port
        self.admin_port = admin_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env.update({
            "INGEST_LISTENER__PORT": str(self.dicom_port),
            "INGEST_LISTENER__ACCEPT_ANY_CALLING_AE": "true",
            "INGEST_EMBEDDED_BACKEND__PORT": str(self.backend_port),
            "INGEST_ADMIN__PORT": str(self.admin_port),
            "INGEST_RELAY__RELEASE_GRACE_S": "0.5",
            "INGEST_RELAY__STABLE_AGE_S": "2",
            "INGEST_RELAY__POLL_INTERVAL_S": "0.2",
        })
        self.data.mkdir(parents=True, exist_ok=True)
        with (self.data / "serve.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingest", "--data-dir", str(self.data), "serve"],
                cwd=REPO, env=env, stdout=log, stderr=log,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ok = subprocess.run(["echoscu", "-aec", "INGEST", "127.0.0.1", str(self.dicom_port)],
                                capture_output=True).returncode == 0
            if ok:
                return
            assert self.proc.poll() is None, (self.data / "serve.log").read_text()
            time.sleep(0.2)
        raise AssertionError("ingest serve did not start listening")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None

    def graphql(self, query: str) -> dict[str, object]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.backend_port}/fhir/R4/$graphql",
            data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as rsp:
            body: dict[str, object] = json.loads(rsp.read())
        return body

    def admin(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=10) as rsp:
                return int(rsp.status), rsp.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    def has_all(self, expected: dict[str, tuple[int, int]]) -> bool:
        """Whether each study of ``expected`` (Study Instance UID -> (series, instances), as the sample
        generator reports them) is one ImagingStudy with all its instances."""
        for uid, (_series, n) in expected.items():
            found = self.studies(uid)
            if len(found) != 1 or found[0]["numberOfInstances"] != n:
                return False
        return True

    def studies(self, study_uid: str) -> list[dict[str, object]]:
        q = (f'{{ ImagingStudyList(identifier: "urn:dicom:uid|urn:oid:{study_uid}", _count: 5) '
             "{ id numberOfInstances } }")
        data = self.graphql(q)["data"]
        assert isinstance(data, dict)
        return list(data["ImagingStudyList"] or [])


@contextmanager
def serve(data: Path) -> Iterator[Serve]:
    s = Serve(data, *_free_ports())
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _wait_for(check: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.25)
    return False


def test_echoscu_and_storescu_folder_become_imaging_studies(tmp_path: Path) -> None:
    corpus = generate(tmp_path / "corpus", studies=3, files=30, seed=4)
    with serve(tmp_path / "data") as s:
        assert subprocess.run(["echoscu", "-aec", "INGEST", "127.0.0.1", str(s.dicom_port)]).returncode == 0
        sent = subprocess.run(
            ["storescu", "-aec", "INGEST", "+sd", "+r", "127.0.0.1", str(s.dicom_port), str(corpus.root)],
            capture_output=True, text=True,
        )
        assert sent.returncode == 0, sent.stderr
        assert _wait_for(lambda: s.has_all(corpus.expected), 30), (
            (tmp_path / "data" / "serve.log").read_text()[-3000:]
        )

        # the admin endpoint: healthy, and the counters say what happened
        status, body = s.admin("/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, text = s.admin("/metrics")
        assert status == 200
        samples = _prometheus(text)
        assert samples['ingest_instances_accepted_total{source="dimse"}'] == 30
        assert samples['ingest_studies_total{result="created"}'] == 3
        assert samples['ingest_associations_total{outcome="accepted"}'] >= 2  # echoscu + storescu
        assert samples['ingest_backend_requests_total{operation="create"}'] == 3
        assert samples["ingest_relay_queue_depth"] == 0


def _prometheus(text: str) -> dict[str, float]:
    """Sample name with labels -> value, from the Prometheus text format."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_sigkill_during_storescu_loses_nothing_acknowledged(tmp_path: Path) -> None:
    corpus = generate(tmp_path / "corpus", studies=4, files=500, seed=7, tiny=True)
    data = tmp_path / "data"
    s = Serve(data, *_free_ports())
    s.start()
    store = subprocess.Popen(
        ["storescu", "-v", "-aec", "INGEST", "+sd", "+r", "127.0.0.1", str(s.dicom_port), str(corpus.root)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert store.stdout is not None
    acked: list[str] = []
    current = None
    killed = False
    for line in store.stdout:
        m = re.search(r"Sending file: (.+)$", line.strip())
        if m:
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            if len(acked) == 150 and not killed:
                s.stop(signal.SIGKILL)
                killed = True
    store.wait(30)
    store.stdout.close()
    assert killed and 150 <= len(acked) < 500
    acked_uids = set()
    from pydicom import dcmread

    for path in acked:
        acked_uids.add(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    s.start()  # restart on the same data dir; the sender retries everything
    try:
        # every acknowledged instance survived the kill
        from ingest.adapters.state.sqlite import SQLiteStateStore

        rows = SQLiteStateStore(data / "state.sqlite3", node="check")
        try:
            have = {r.sop_uid for uid in corpus.study_uids for r in rows.instances(uid)}
        finally:
            rows.close()
        assert acked_uids <= have
        resent = subprocess.run(
            ["storescu", "-aec", "INGEST", "+sd", "+r", "127.0.0.1", str(s.dicom_port), str(corpus.root)],
            capture_output=True, text=True,
        )
        assert resent.returncode == 0, resent.stderr

        def complete() -> bool:
            for uid, (_series, n) in corpus.expected.items():
                found = s.studies(uid)
                if len(found) != 1 or found[0]["numberOfInstances"] != n:
                    return False
            return True

        assert _wait_for(complete, 40), (data / "serve.log").read_text()[-3000:]
    finally:
        s.stop()
