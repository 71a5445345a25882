"""``/metrics`` of a real ``ingest serve`` after a study arrives by C-STORE and is pushed: the latency
histograms are observed, no ``_created`` series, the process metrics are there."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from samples.generate import generate
from tests import LOOPBACK_HTTP, free_ports, wait_until

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed"),
]


def _metrics(port: int) -> str:
    try:
        with LOOPBACK_HTTP.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return str(answer.read().decode())
    except OSError:
        return ""


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_histograms_are_observed_by_a_real_serve(tmp_path: Path) -> None:
    dicom, admin, backend = free_ports(3)
    corpus = generate(tmp_path / "corpus", studies=1, files=3, seed=9, tiny=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update(INGEST_LISTENER__PORT=str(dicom), INGEST_ADMIN__PORT=str(admin),
               INGEST_EMBEDDED_BACKEND__PORT=str(backend), INGEST_LISTENER__ACCEPT_ANY_CALLING_AE="true",
               INGEST_RELAY__STABLE_AGE_S="0.5", INGEST_RELAY__RELEASE_GRACE_S="0.2",
               INGEST_RELAY__POLL_INTERVAL_S="0.1", INGEST_LOG__FORMAT="json")
    with (tmp_path / "serve.log").open("ab") as log:
        command = [sys.executable, "-m", "ingest", "--data-dir", str(tmp_path / "data"), "serve"]
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=log)
    try:
        wait_until(lambda: "ingest_cstore_seconds" in _metrics(admin), 60, "the admin endpoint")
        sent = subprocess.run(["storescu", "-aec", "INGEST", "+sd", "+r", "127.0.0.1", str(dicom),
                               str(corpus.root)], capture_output=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        def pushed() -> str:
            text = _metrics(admin)
            return text if _sample(text, "ingest_pushed_latency_seconds_count") >= 1 else ""

        text = wait_until(pushed, 60, "the study pushed")
        assert _sample(text, "ingest_cstore_seconds_count") == 3
        assert _sample(text, "ingest_push_seconds_count") >= 1
        assert 0 < _sample(text, "ingest_pushed_latency_seconds_sum") < 60
        assert "_created" not in text
        assert _sample(text, "process_resident_memory_bytes") > 0
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    # JSON log lines carry fields: the push names its study and result
    log_text = (tmp_path / "serve.log").read_text()
    lines = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    pushed = [line for line in lines if line.get("status") == "created"]
    assert pushed and pushed[0]["study_uid"] == corpus.studies[0].study_uid
