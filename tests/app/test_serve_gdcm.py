"""``ingest serve`` in a subprocess with GDCM's ``gdcmscu`` (Debian's ``libgdcm-tools``) as a real client.

GDCM frames its PDUs and DIMSE messages with its own code, not dcmtk's or pynetdicom's: another sender
the listener must understand. Debian's gdcmscu 3.0.21 ends every run with ``terminate called after
throwing an instance of 'gdcm::Exception' ... ProtocolStream as nullptr is invalid`` (exit status 134),
also against dcmtk ``storescp``, after its operation has completed. Its exit status therefore says
nothing; what these tests check is what ``ingest serve`` received, stored and wrote to its backend.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from samples.generate import generate
from tests import wait_until
from tests.app.test_serve_dcmtk import _prometheus, serve

pytestmark = [
    pytest.mark.dcmtk,  # Serve waits for the listener with echoscu
    pytest.mark.skipif(shutil.which("echoscu") is None, reason="dcmtk echoscu not installed"),
    pytest.mark.skipif(shutil.which("gdcmscu") is None, reason="GDCM gdcmscu not installed"),
]


def _gdcmscu(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["gdcmscu", "--aetitle", "GDCMSCU", "--call", "INGEST", *args],
                          capture_output=True, text=True, timeout=120)


def _metrics(s: object) -> dict[str, float]:
    status, text = s.admin("/metrics")  # type: ignore[attr-defined]
    assert status == 200
    return _prometheus(text)


def test_gdcmscu_echo_and_store_become_imaging_studies(tmp_path: Path) -> None:
    corpus = generate(tmp_path / "corpus", studies=2, files=12, seed=9)
    with serve(tmp_path / "data") as s:
        before = _metrics(s)['ingest_associations_total{outcome="accepted"}']  # the start's echoscu
        _gdcmscu("--echo", "127.0.0.1", str(s.dicom_port))
        wait_until(lambda: _metrics(s)['ingest_associations_total{outcome="accepted"}'] == before + 1, 30,
                   "gdcmscu's C-ECHO association accepted")

        sent = _gdcmscu("--store", "-r", "-i", str(corpus.root), "127.0.0.1", str(s.dicom_port))
        try:
            wait_until(lambda: s.has_all(corpus.expected), 30, "every study from gdcmscu")
        except AssertionError as exc:  # what gdcmscu and the service said, as they stand now
            log = (tmp_path / "data" / "serve.log").read_text()[-2000:]
            raise AssertionError(f"{exc}; gdcmscu: {sent.stderr[-500:]}; serve: {log}") from None
        samples = _metrics(s)
        assert samples['ingest_instances_accepted_total{source="dimse"}'] == 12
        assert samples['ingest_studies_total{result="created"}'] == 2
        assert samples.get('ingest_instances_rejected_total{reason="internal"}', 0) == 0
