"""Orthanc as the PACS that ``ingest sync`` mirrors: its own process on loopback, C-FIND allowed to any
AE (``DicomAlwaysAllowFind``), the DICOMweb plugin on its HTTP port, loaded through its REST API."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests import LOOPBACK_HTTP, free_ports, wait_until

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
#: The DICOMweb plugin of Debian's ``orthanc-dicomweb`` package.
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

_until = functools.partial(wait_until, every=0.2)


def need_orthanc(dicomweb: bool = True) -> None:
    if not os.access(ORTHANC, os.X_OK):
        pytest.skip(f"Orthanc not installed ({ORTHANC} missing)")
    if dicomweb and not Path(DICOMWEB_PLUGIN).is_file():
        pytest.skip(f"Orthanc's DICOMweb plugin not installed ({DICOMWEB_PLUGIN} missing)")


class OrthancPacs:
    """A running Orthanc; ``limit`` sets ``LimitFindResults`` (0: no cap), ``modalities`` its
    ``DicomModalities``, ``dicomweb`` whether the DICOMweb plugin is loaded."""

    def __init__(
        self,
        home: Path,
        *,
        limit: int = 0,
        modalities: dict[str, Any] | None = None,
        dicomweb: bool = True,
    ) -> None:
        need_orthanc(dicomweb)
        self.http_port, self.dicom_port = free_ports(2)
        home.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "ingest-sync-test",
            "StorageDirectory": str(home / "storage"),
            "IndexDirectory": str(home / "index"),
            "Plugins": [DICOMWEB_PLUGIN] if dicomweb else [],
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/", "EnableWado": True},
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "DefaultEncoding": "Utf8",
            "LimitFindResults": limit,
            "LimitFindInstances": 0,
            "DicomModalities": modalities or {},
            "DicomScuTimeout": 15,
            "DicomAssociationCloseDelay": 0,
            "SaveJobs": False,
        }
        (home / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log = home / "orthanc.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [ORTHANC, str(home / "orthanc.json")], stdout=out, stderr=subprocess.STDOUT, cwd=home
            )
        try:
            _until(self._up, 30, "Orthanc answering /system")
        except BaseException:
            self.stop()
            raise

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"dimse://ORTHANC@127.0.0.1:{self.dicom_port}"

    def _up(self) -> bool:
        assert self.proc.poll() is None, self.logs()
        try:
            self.call("GET", "/system", timeout=2)
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def call(self, method: str, path: str, body: bytes | None = None, timeout: float = 60) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        if body is not None:
            req.add_header(
                "Content-Type", "application/dicom" if path == "/instances" else "application/json"
            )
        with LOOPBACK_HTTP.open(req, timeout=timeout) as rsp:
            text = rsp.read()
        return json.loads(text) if text else None

    def load(self, paths: list[Path]) -> list[dict[str, Any]]:
        """Upload files (``POST /instances``); Orthanc's answers."""
        return [self.call("POST", "/instances", p.read_bytes()) for p in paths]

    def series_id(self, series_uid: str) -> str:
        [found] = self.call("POST", "/tools/lookup", series_uid.encode())
        return str(found["ID"])

    def study_id(self, study_uid: str) -> str:
        [found] = self.call("POST", "/tools/lookup", study_uid.encode())
        return str(found["ID"])

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:  # by its own PID (the Popen object)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
