"""Listener benchmark: dcmtk ``storescu`` -> ``ingest serve`` against Orthanc and dcmtk ``storescp``.

Every row is a ratio measured in the same run on the same corpus: ``ingest serve`` (durable: each
instance's bytes and row committed before its answer) against Orthanc (Debian package, default durable
storage, ``TCP_NODELAY=1``) and dcmtk ``storescp`` (files without fsync). Senders: ``storescu`` with
``TCP_NODELAY=1`` and a default one (Nagle on). Corpora: small instances (~12 KB) and a CT series
(512 KB each), over 1 and 4 concurrent associations; 200 associations of one instance each; the peak RSS
of ``ingest serve`` and its state store writer process (summed) while 10 associations send the CT series;
seconds from the last response to the ImagingStudy being readable. One more row measures the writer
process itself: small instances over 4 associations, ``ingest serve`` as shipped against
``[listener] commit_process = false`` (one writer thread), taking turns like the peers.

The receivers take turns: for each case, each repetition runs every peer once (a fresh one each time),
in an order rotated per repetition, and each peer's fastest run is kept. The 2-core bench machine's
speed drifts by tens of percent over minutes; measured peer after peer, a slow phase would fall on one
peer's rows only and move the ratio. The note of each row gives every run of both peers.

Run alone: ``python -m bench.listener [--quick]``; ``bench.run`` registers :func:`bench_listener`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.peers import echo_ready, orthanc, sender_env, split, storescp, storescu, storescu_parallel
from bench.run import BenchContext, Row, benchmark

REPO = Path(__file__).resolve().parents[1]
MAX_PDU = 262144


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports chosen by the OS (all held open while choosing)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _free_port() -> int:
    return _free_ports(1)[0]


def _storescu(port: int, folder: Path, *, nodelay: bool = True) -> float:
    return storescu(port, folder, nodelay=nodelay)


@contextmanager
def _serve(
    work: Path, *, commit_process: bool = True
) -> Iterator[tuple[int, int, subprocess.Popen[bytes], Path]]:
    """``ingest serve`` on a fresh data dir; yields (DICOM port, backend port, process, data dir)."""
    data = Path(tempfile.mkdtemp(dir=work, prefix="serve-"))
    port, bport = _free_ports(2)
    env = dict(
        os.environ,
        INGEST_LISTENER__COMMIT_PROCESS=str(commit_process).lower(),
        INGEST_LISTENER__PORT=str(port),
        INGEST_LISTENER__ACCEPT_ANY_CALLING_AE="true",
        INGEST_LISTENER__MAX_ASSOCIATIONS="16",
        INGEST_EMBEDDED_BACKEND__PORT=str(bport),
        INGEST_ADMIN__ENABLED="false",
        INGEST_LISTENER__MAX_PDU=str(MAX_PDU),
        INGEST_LOG__LEVEL="WARNING",
    )
    with (data / "serve.log").open("wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "ingest", "--data-dir", str(data), "serve"],
            cwd=REPO, env=env, stdout=log, stderr=log,
        )
    try:
        try:
            echo_ready(port)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {(data / 'serve.log').read_text()[-1500:]}") from exc
        yield port, bport, child, data
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(60)
        shutil.rmtree(data, ignore_errors=True)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _peak_rss_tree_mb(pid: int) -> tuple[float, float]:
    """Peak RSS of ``pid`` and the sum of it and its children's peaks (``ingest serve`` and its state
    store writer process)."""
    own = _peak_rss_mb(pid)
    return own, own + sum(_peak_rss_mb(child) for child in _children(pid))


def _study_count(backend_port: int, study_uid: str) -> int:
    q = f'{{ ImagingStudyList(identifier: "urn:dicom:uid|urn:oid:{study_uid}", _count: 2) {{ id }} }}'
    req = urllib.request.Request(
        f"http://127.0.0.1:{backend_port}/fhir/R4/$graphql",
        data=json.dumps({"query": q}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as rsp:
        data = json.loads(rsp.read())["data"]["ImagingStudyList"]
    return len(data or [])


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.dcm"))


@contextmanager
def _peer(name: str, work: Path) -> Iterator[int]:
    """A fresh receiver ``name`` (``serve``, ``orthanc``, ``storescp``); yields its DICOM port."""
    if name in ("serve", "serve, one writer thread"):
        with _serve(work, commit_process=name == "serve") as (port, _bport, _child, _data):
            yield port
    elif name == "orthanc":
        port, http = _free_ports(2)
        with orthanc(port, http, work):
            yield port
    else:
        port = _free_port()
        with storescp(port, work):
            yield port


def _one_per_association(port: int, files: list[Path], nodelay: bool) -> float:
    """One ``storescu`` association (one process) per file, one after the other; total seconds."""
    started = time.perf_counter()
    for path in files:
        done = subprocess.run(
            ["storescu", "-aec", "INGEST", "127.0.0.1", str(port), str(path)],
            capture_output=True, text=True, env=sender_env(nodelay),
        )
        if done.returncode != 0:
            raise RuntimeError(f"storescu failed: {done.stderr[-300:]}")
    return time.perf_counter() - started


PEERS = ("serve", "orthanc", "storescp")
#: ``ingest serve`` with ``[listener] commit_process = false``, measured on :data:`WRITER_CASE` only
ONE_WRITER = "serve, one writer thread"
WRITER_CASE = "small 4 assocs, TCP_NODELAY=1"


def measure(
    work: Path, small: Path, n_small: int, ct: Path, n_ct: int, ct_study: str, *, n_nagle: int,
    repeats: int = 1,
) -> list[Row]:
    """Every receiver on every corpus and sender, the peers taking turns ``repeats`` times (module doc);
    return the rows."""
    rows: list[Row] = []
    rate: dict[tuple[str, str], float] = {}  # (peer, case) -> instances/s, the fastest run
    runs: dict[tuple[str, str], list[float]] = {}  # (peer, case) -> instances/s of every run
    mbs: dict[tuple[str, str], float] = {}
    scratch = Path(tempfile.mkdtemp(dir=work, prefix="split-"))
    small_files = sorted(small.rglob("*.dcm"))
    ct_files = sorted(ct.rglob("*.dcm"))
    small4 = split(small_files, 4, scratch / "small4")
    ct4 = split(ct_files, 4, scratch / "ct4")
    ct10 = split(ct_files, 10, scratch / "ct10")
    nagle = split(small_files[:n_nagle], 1, scratch / "nagle")[0]
    nagle4 = split(small_files[:n_nagle], 4, scratch / "nagle4")
    singles = small_files[:200]
    cases: list[tuple[str, Any, int, int, bool]] = [  # name, folder(s), instances, bytes, TCP_NODELAY
        ("small 1 assoc, TCP_NODELAY=1", small, n_small, _size(small), True),
        ("CT 1 assoc, TCP_NODELAY=1", ct, n_ct, _size(ct), True),
        ("small 4 assocs, TCP_NODELAY=1", small4, n_small, _size(small), True),
        ("CT 4 assocs, TCP_NODELAY=1", ct4, n_ct, _size(ct), True),
        ("small 1 assoc, default sender", nagle, n_nagle, _size(nagle), False),
        ("small 4 assocs, default sender", nagle4, n_nagle, _size(nagle), False),
    ]
    one_each = "200 one-instance associations"
    for case, folder, n, size, nodelay in [*cases, (one_each, singles, len(singles), 0, True)]:
        # the writer process's own row: ingest without it takes its turn among the peers on that case
        peers = (*PEERS, ONE_WRITER) if case == WRITER_CASE else PEERS
        for turn in range(repeats):
            for peer in peers[turn % len(peers):] + peers[: turn % len(peers)]:
                with _peer(peer, work) as port:
                    if case == one_each:
                        secs = _one_per_association(port, folder, nodelay)
                    elif isinstance(folder, list):
                        secs = storescu_parallel(port, folder, nodelay=nodelay)
                    else:
                        secs = _storescu(port, folder, nodelay=nodelay)
                runs.setdefault((peer, case), []).append(n / secs)
                if n / secs >= rate.get((peer, case), 0.0):
                    rate[peer, case] = n / secs
                    if size:
                        mbs[peer, case] = size / secs / 1e6
    # memory with 10 CT associations, and the time to a readable study
    with _serve(work) as (port, bport, child, _data):
        storescu_parallel(port, ct10, nodelay=True)
        last = time.perf_counter()
        rss, rss_all = _peak_rss_tree_mb(child.pid)
        while _study_count(bport, ct_study) < 1 and time.perf_counter() - last < 60:
            time.sleep(0.05)
        visible = time.perf_counter() - last
    targets = {
        "small 1 assoc, TCP_NODELAY=1": 1.3, "CT 1 assoc, TCP_NODELAY=1": 1.3,
        "small 4 assocs, TCP_NODELAY=1": 1.3, "CT 4 assocs, TCP_NODELAY=1": 1.3,
        "small 1 assoc, default sender": 4.0, "small 4 assocs, default sender": 4.0,
        "200 one-instance associations": 1.0,
    }
    def every(peer: str, case: str) -> str:
        return "/".join(f"{r:.0f}" for r in runs[peer, case])

    for case, target in targets.items():
        ours = rate["serve", case]
        rows.append(
            Row(f"listener: {case}: ingest serve / Orthanc", ours, "inst/s", baseline=rate["orthanc", case],
                target=target,
                note=f"best of runs: ingest {every('serve', case)}, Orthanc {every('orthanc', case)} inst/s"
                + (f"; ingest {mbs['serve', case]:.1f} MB/s" if ("serve", case) in mbs else "")).finish()
        )
        rows.append(
            Row(f"listener: {case}: ingest serve / dcmtk storescp (no fsync)", ours, "inst/s",
                baseline=rate["storescp", case],
                note=f"best of runs: storescp {every('storescp', case)} inst/s").finish()
        )
    ct_mb = mbs["serve", "CT 1 assoc, TCP_NODELAY=1"]
    rows.append(
        Row("listener: CT on one association (MB/s)", ct_mb, "MB/s", note="target >= 120 MB/s",
            status="pass" if ct_mb >= 120 else "fail")
    )
    rows.append(
        Row("listener: small, 4 associations / 1 association (ingest serve)",
            rate["serve", "small 4 assocs, TCP_NODELAY=1"], "inst/s",
            baseline=rate["serve", "small 1 assoc, TCP_NODELAY=1"], target=1.5).finish()
    )
    rows.append(
        Row("listener: small, 4 associations: writer process / one writer thread (ingest serve)",
            rate["serve", WRITER_CASE], "inst/s", baseline=rate[ONE_WRITER, WRITER_CASE],
            note=f"best of runs: process {every('serve', WRITER_CASE)}, "
                 f"thread {every(ONE_WRITER, WRITER_CASE)} inst/s").finish()
    )
    rows.append(
        Row("listener: peak RSS of ingest serve and its writer process, 10 CT associations", rss_all, "MB",
            note=f"target <= 150 MB (the two peaks summed); the service's own process {rss:.0f} MB",
            status="pass" if rss_all <= 150 else "fail")
    )
    rows.append(
        Row("listener: last C-STORE response -> ImagingStudy readable", visible, "s",
            note="target <= release_grace_s (2) + 1 s", status="pass" if visible <= 3 else "fail")
    )
    return rows


@benchmark("listener")
def bench_listener(ctx: BenchContext) -> list[Row]:
    """storescu -> ``ingest serve`` vs Orthanc and dcmtk ``storescp`` (module doc)."""
    small = ctx.corpus("small1000", studies=10, files=ctx.scale(1000, 300), seed=3)
    ct = ctx.corpus("ct300", studies=0, files=0, ct_series=ctx.scale(300, 80))
    return measure(ctx.work, small.root, small.files, ct.root, ct.files, ct.study_uids[-1],
                   n_nagle=ctx.scale(200, 100), repeats=ctx.repeats)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-listener-") as tmp:
        ctx = BenchContext(work=Path(tmp), quick=args.quick, ingest=(sys.executable, "-m", "ingest"),
                           repeats=1 if args.quick else 2)
        for row in bench_listener(ctx):
            ratio = f" ratio {row.ratio:.2f}" if row.ratio is not None else ""
            base = f" (baseline {row.baseline:.1f})" if row.baseline else ""
            print(f"{row.name}: {row.value:.2f} {row.unit}{base}{ratio} [{row.status}] {row.note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
