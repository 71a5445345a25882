"""Sync benchmark: indexing what a PACS holds without moving its images.

Orthanc (Debian package, its DICOMweb plugin, C-FIND allowed) holds a generated corpus loaded through
its REST API (not timed). Baseline: Orthanc forwards every study by C-STORE to ``ingest serve``
(``POST /modalities/ingest/store``), timed from the request until the embedded backend lists every
instance. Rows: ``ingest sync --from dimse://...`` and ``--from http://.../dicom-web`` (each a whole
process on a fresh data dir, into its embedded backend), instances indexed per second, target >= 10x
the forwarding rate. Floors, same run: the same queries asked of Orthanc by bare clients, 4 at once, the
answers decoded and nothing else (urllib and json for QIDO-RS: what bounds any QIDO-RS sync over this
PACS; a pynetdicom SCU for C-FIND). Bytes moved: the
forwarding sends every stored file; a sync sends queries and answers only, never a C-MOVE, C-GET or
WADO retrieve (0 image bytes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.run import BenchContext, Row, benchmark

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
REPO = Path(__file__).resolve().parent.parent
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _call(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 600) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/dicom" if path == "/instances" else "application/json")
    with _HTTP.open(req, timeout=timeout) as rsp:
        text = rsp.read()
    return json.loads(text) if text else None


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


@contextmanager
def _orthanc(work: Path, ingest_port: int) -> Iterator[tuple[int, int]]:
    """Orthanc as the PACS; yields (HTTP port, DICOM port)."""
    root = Path(tempfile.mkdtemp(dir=work, prefix="orthanc-sync-"))
    http_port, dicom_port = _free_ports(2)
    config = {
        "Name": "bench-sync", "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
        "DicomAlwaysAllowFind": True, "DefaultEncoding": "Utf8", "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "SaveJobs": False,
        "DicomModalities": {"ingest": {"AET": "INGEST", "Host": "127.0.0.1", "Port": ingest_port}},
        "DicomAssociationCloseDelay": 0,
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("wb")
    proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=log,
                            env=dict(os.environ, TCP_NODELAY="1"))
    try:
        _wait(lambda: _call(http_port, "GET", "/system", timeout=2), 60, "Orthanc")
        yield http_port, dicom_port
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def _serve(work: Path) -> Iterator[tuple[int, int]]:
    """``ingest serve`` (embedded backend); yields (DICOM port, backend port)."""
    data = Path(tempfile.mkdtemp(dir=work, prefix="serve-sync-"))
    port, bport = _free_ports(2)
    env = dict(os.environ, INGEST_LISTENER__PORT=str(port), INGEST_LISTENER__ACCEPT_ANY_CALLING_AE="true",
               INGEST_EMBEDDED_BACKEND__PORT=str(bport), INGEST_ADMIN__ENABLED="false",
               INGEST_LOG__LEVEL="WARNING", INGEST_RELAY__STABLE_AGE_S="1")
    with (data / "serve.log").open("wb") as log:
        child = subprocess.Popen([sys.executable, "-m", "ingest", "--data-dir", str(data), "serve"],
                                 cwd=REPO, env=env, stdout=log, stderr=log)
    try:
        _wait(lambda: _instances(bport) >= 0, 60, "ingest serve's backend")
        yield port, bport
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(60)


def _instances(backend_port: int) -> int:
    """Instances the embedded backend's ImagingStudies list."""
    q = "{ ImagingStudyList(_count: 1000) { numberOfInstances } }"
    req = urllib.request.Request(f"http://127.0.0.1:{backend_port}/fhir/R4/$graphql",
                                 data=json.dumps({"query": q}).encode(),
                                 headers={"Content-Type": "application/json"})
    with _HTTP.open(req, timeout=10) as rsp:
        found = json.loads(rsp.read())["data"]["ImagingStudyList"] or []
    return sum(int(s.get("numberOfInstances") or 0) for s in found)


FLOOR_CLIENTS = 4  # as ``[sync] concurrency``'s default


def _qido_floor(http: int) -> int:
    """Ask Orthanc the QIDO-RS searches a sync asks (the same levels and fields), ``FLOOR_CLIENTS`` at once,
    reading each answer's JSON and nothing more; the instances answered."""
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlencode

    from ingest.sources.sync.answers import IMAGE_KEYS, SERIES_KEYS, STUDY_KEYS

    base = f"http://127.0.0.1:{http}/dicom-web"

    def get(path: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
        query = urlencode([("includefield", k) for k in keys] + [("limit", "1000")])
        with _HTTP.open(f"{base}{path}?{query}", timeout=600) as rsp:
            found: list[dict[str, Any]] = json.loads(rsp.read() or b"[]")
            return found

    def study(uid: str) -> int:
        n = 0
        for series in get(f"/studies/{uid}/series", SERIES_KEYS):
            suid = series["0020000E"]["Value"][0]
            n += len(get(f"/studies/{uid}/series/{suid}/instances", IMAGE_KEYS))
        return n

    uids = [s["0020000D"]["Value"][0] for s in get("/studies", STUDY_KEYS)]
    with ThreadPoolExecutor(FLOOR_CLIENTS) as pool:
        return sum(pool.map(study, uids))


def _cfind_floor(dicom: int) -> int:
    """Ask Orthanc the C-FIND queries a sync asks (Study Root, the same levels and return keys) over
    ``FLOOR_CLIENTS`` associations with a bare pynetdicom SCU, decoding the answers and nothing more;
    the instances answered."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND  # type: ignore

    from ingest.sources.sync.answers import IMAGE_KEYS, SERIES_KEYS, STUDY_KEYS, identifier

    ae = AE(ae_title="BENCH")
    ae.add_requested_context(FIND)
    local = threading.local()
    opened: list[Any] = []

    def answers(query: Any) -> list[Any]:
        assoc = getattr(local, "assoc", None)
        if assoc is None:
            assoc = local.assoc = ae.associate("127.0.0.1", dicom, ae_title="ORTHANC")
            opened.append(assoc)
            if not assoc.is_established:
                raise RuntimeError("Orthanc refused the association")
        return [ident for status, ident in assoc.send_c_find(query, FIND)
                if status is not None and status.Status in (0xFF00, 0xFF01)]

    def study(uid: str) -> int:
        n = 0
        for series in answers(identifier("SERIES", SERIES_KEYS, StudyInstanceUID=uid)):
            query = identifier("IMAGE", IMAGE_KEYS, StudyInstanceUID=uid,
                               SeriesInstanceUID=str(series.SeriesInstanceUID))
            n += len(answers(query))
        return n

    try:
        with ThreadPoolExecutor(FLOOR_CLIENTS) as pool:
            studies = pool.submit(answers, identifier("STUDY", STUDY_KEYS)).result()
            uids = [str(s.StudyInstanceUID) for s in studies]
            return sum(pool.map(study, uids))
    finally:
        for assoc in opened:
            assoc.release()


@benchmark("sync")
def bench_sync(ctx: BenchContext) -> list[Row]:
    """ingest sync (C-FIND, QIDO-RS) of a PACS's studies vs the PACS forwarding them by C-STORE."""
    if not (os.access(ORTHANC, os.X_OK) and Path(DICOMWEB_PLUGIN).is_file()):
        return [Row("sync", None, "inst/s", status="FAILED", note="Orthanc or its DICOMweb plugin missing")]
    corpus = ctx.corpus("sync", studies=40, files=ctx.scale(4000, 2000), matrix=64)
    files = corpus.files
    rows: list[Row] = []
    with _serve(ctx.work) as (ingest_port, backend_port), _orthanc(ctx.work, ingest_port) as (http, dicom):
        for path in corpus.paths():  # loading the PACS: not timed
            _call(http, "POST", "/instances", path.read_bytes())
        studies = _call(http, "GET", "/studies")
        t0 = time.perf_counter()
        job = _call(http, "POST", "/modalities/ingest/store",
                    json.dumps({"Resources": studies, "Synchronous": True}).encode())
        _wait(lambda: _instances(backend_port) >= files, 600, "every forwarded instance written")
        forward_s = time.perf_counter() - t0
        forward = files / forward_s
        moved = corpus.total_bytes
        rows.append(Row(f"sync: Orthanc forwards {files} instances by C-STORE (baseline)", forward, "inst/s",
                        note=f"{forward_s:.2f} s, {moved / 1e6:.1f} MB of images sent "
                        f"({job.get('InstancesCount', '?')} instances)",
                        extra={"elapsed_s": forward_s, "image_bytes": moved}).finish())
        asks: tuple[tuple[str, Callable[[int], int], int], ...] = (
            ("C-FIND", _cfind_floor, dicom), ("QIDO-RS", _qido_floor, http),
        )
        floors: dict[str, float] = {}  # the ingest rows below compare with their own source's floor
        for label, floor, port in asks:
            best = float("inf")
            for _ in range(ctx.repeats):
                t1 = time.perf_counter()
                answered = floor(port)
                best = min(best, time.perf_counter() - t1)
            floors[label] = files / best
            what = ("a bare pynetdicom SCU (ingest's own SCU is leaner)" if label == "C-FIND" else
                    "JSON only: the ratio is the most any QIDO-RS sync over this PACS could reach")
            rows.append(Row(
                f"sync: Orthanc answering the sync's {label} queries alone (floor)", files / best, "inst/s",
                forward, note=f"{best:.2f} s for {answered} instances, {FLOOR_CLIENTS} clients, {what}",
                extra={"elapsed_s": best},
            ).finish())
        for label, url, extra in (
            ("C-FIND", f"dimse://ORTHANC@127.0.0.1:{dicom}", []),
            ("QIDO-RS", f"http://127.0.0.1:{http}/dicom-web", ["--query-limit", "1000"]),
        ):
            def argv(url: str = url, extra: list[str] = extra) -> list[str]:
                data = ctx.fresh_dir("sync-data")
                return [*ctx.ingest, "-q", "--data-dir", str(data), "sync", "--from", url, *extra]

            env = dict(os.environ, INGEST_EMBEDDED_BACKEND__PORT="0")
            run = ctx.best_run(argv, env=env)
            if not run.ok:
                rows.append(Row(f"sync: ingest sync over {label}", None, "inst/s", forward, 10.0, "FAILED",
                                note=f"exit {run.returncode}", detail=run.stderr_tail).finish())
                continue
            rows.append(Row(
                f"sync: ingest sync over {label}, {files} instances", files / run.elapsed_s, "inst/s",
                forward, 10.0,
                note=f"{run.elapsed_s:.2f} s (whole process), cpu {run.cpu_s:.1f} s, 0 image bytes",
                extra={"elapsed_s": run.elapsed_s, "cpu_s": run.cpu_s, "image_bytes": 0},
            ).finish())
            rows.append(Row(
                f"sync: ingest sync over {label} / its query floor", files / run.elapsed_s, "inst/s",
                floors[label], note="the whole process (start-up, queries, records, backend, pushes) "
                "against the queries alone", extra={"elapsed_s": run.elapsed_s},
            ).finish())
    return rows
