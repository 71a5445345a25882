"""Other receivers of the listener benchmark, each its own process on loopback: dcmtk ``storescp`` and
Orthanc, fed by dcmtk ``storescu`` with or without ``TCP_NODELAY`` (dcmtk tools set it only with
``TCP_NODELAY=1`` in their environment, Orthanc gets it in its environment too).

``storescp`` writes each instance to a file without fsync; Orthanc keeps its default durable storage
(files plus its SQLite index) under a generated configuration bound to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ORTHANC = "/usr/sbin/Orthanc"


def sender_env(nodelay: bool) -> dict[str, str]:
    """The environment of a dcmtk sender: ``TCP_NODELAY=1`` or none at all."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def echo_ready(port: int, timeout: float = 30) -> None:
    """Wait until something answers C-ECHO (called AE ``INGEST``) on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run(["echoscu", "-aec", "INGEST", "127.0.0.1", str(port)], capture_output=True)
        if done.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing answers C-ECHO on port {port}")


def storescu(port: int, folder: Path, *, nodelay: bool = False) -> float:
    """Send ``folder`` (recursively) in one association; returns the seconds it took."""
    started = time.perf_counter()
    done = subprocess.run(
        ["storescu", "-aec", "INGEST", "+sd", "+r", "127.0.0.1", str(port), str(folder)],
        capture_output=True, text=True, env=sender_env(nodelay),
    )
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stderr[-500:]}")
    return time.perf_counter() - started


def storescu_parallel(port: int, folders: list[Path], *, nodelay: bool = False) -> float:
    """One ``storescu`` association per folder, all at once; seconds until the last one finished."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", "INGEST", "+sd", "+r", "127.0.0.1", str(port), str(f)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=sender_env(nodelay),
        )
        for f in folders
    ]
    errors = []
    for proc in procs:
        _out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            errors.append(err[-300:])
    if errors:
        raise RuntimeError(f"storescu failed: {errors}")
    return time.perf_counter() - started


def split(files: list[Path], n: int, into: Path) -> list[Path]:
    """``files`` hard-linked round robin into ``n`` new folders under ``into`` (one per association)."""
    folders = [into / f"part{k}" for k in range(n)]
    for f in folders:
        f.mkdir(parents=True)
    for i, path in enumerate(sorted(files)):
        os.link(path, folders[i % n] / f"{i}.dcm")
    return folders


@contextmanager
def storescp(port: int, work: Path) -> Iterator[None]:
    """dcmtk ``storescp`` (AE ``INGEST``) writing into a fresh folder, with ``TCP_NODELAY=1``."""
    out = Path(tempfile.mkdtemp(dir=work, prefix="storescp-"))
    proc = subprocess.Popen(
        ["storescp", "-aet", "INGEST", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=sender_env(True),
    )
    try:
        echo_ready(port)
        yield
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(out, ignore_errors=True)


@contextmanager
def orthanc(port: int, http_port: int, work: Path) -> Iterator[None]:
    """Orthanc with its default durable storage, DICOM on ``port`` (AE ``INGEST``), ``TCP_NODELAY=1``."""
    root = Path(tempfile.mkdtemp(dir=work, prefix="orthanc-"))
    config = {
        "Name": "bench",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "DicomAet": "INGEST",
        "DicomPort": port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "Plugins": [],
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("wb")
    proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=log,
                            env=sender_env(True))
    try:
        echo_ready(port, timeout=60)
        yield
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
        shutil.rmtree(root, ignore_errors=True)
