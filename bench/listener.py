"""Listener benchmark: dcmtk ``storescu`` (defaults) -> (a) a bare pynetdicom SCP, (b) ``ingest serve``.

(a) is the best-configured baseline: pynetdicom writing each received dataset to a file, on the same
socket layer as the listener (``TCP_NODELAY``, quick ACKs re-armed before reads, one buffer per PDU)
and the same maximum PDU, no per-PDU log handlers. (b) is the full service (durable spool + state
row before each answer). Rows: instances/s and MB/s for the small corpus and the CT series, the ratio
(b)/(a) (target 0.9), peak RSS of ``ingest serve`` during the CT series (target 150 MB) and seconds
from ``storescu``'s last response to the ImagingStudy being readable (target grace + 1 s).

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

from bench.peers import echo_ready, orthanc, split, storescp, storescu, storescu_parallel
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


def baseline_scp(port: int, out: Path) -> None:
    """The bare SCP (run in a child process): write each dataset's bytes to a file, answer success."""
    from ingest.sources.dimse.netguard import GuardedRequestHandler, GuardedServer, quiet_pynetdicom_logging
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from ingest.sources.dimse.listener import TRANSFER_SYNTAXES

    quiet_pynetdicom_logging()
    ae = AE("INGEST")
    ae.maximum_pdu_size = MAX_PDU
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax), list(TRANSFER_SYNTAXES))
    ae.add_supported_context("1.2.840.10008.1.1")  # Verification, for the readiness probe
    counter = [0]

    def on_store(event: Any) -> int:
        counter[0] += 1
        with open(out / f"{counter[0]}.dcm", "wb") as fh:
            fh.write(event.encoded_dataset())
        return 0x0000

    server = ae.make_server(
        ("127.0.0.1", port),
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
        server_class=GuardedServer,
        request_handler=GuardedRequestHandler,
    )
    server.serve_forever(poll_interval=0.2)


def _echo_ready(port: int, timeout: float = 30) -> None:
    echo_ready(port, timeout)


def _storescu(port: int, folder: Path) -> float:
    return storescu(port, folder)


@contextmanager
def _bare(work: Path) -> Iterator[int]:
    """The bare SCP in a child process; yields its port."""
    port = _free_port()
    out = Path(tempfile.mkdtemp(dir=work, prefix="bare-"))
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.listener", "--baseline-scp", str(port), str(out)], cwd=REPO
    )
    try:
        _echo_ready(port)
        yield port
    finally:
        child.terminate()
        child.wait(30)
        shutil.rmtree(out, ignore_errors=True)


@contextmanager
def _serve(work: Path) -> Iterator[tuple[int, int, subprocess.Popen[bytes], Path]]:
    """``ingest serve`` on a fresh data dir; yields (DICOM port, backend port, process, data dir)."""
    data = Path(tempfile.mkdtemp(dir=work, prefix="serve-"))
    port, bport = _free_ports(2)
    env = dict(
        os.environ,
        INGEST_LISTENER__PORT=str(port),
        INGEST_LISTENER__ACCEPT_ANY_CALLING_AE="true",
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
            _echo_ready(port)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {(data / 'serve.log').read_text()[-1500:]}") from exc
        yield port, bport, child, data
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(60)


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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


def _durable_write_s(work: Path, size: int, n: int = 50) -> float:
    """Mean seconds to make one file of ``size`` bytes durable in ``work``: write, fsync, rename, folder
    fsync (what the spool does for an instance; the in-row path's WAL append and fsync cost about as much)."""
    folder = Path(tempfile.mkdtemp(dir=work, prefix="fsync-"))
    data = os.urandom(size)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            tmp = folder / f"{i}.tmp"
            with tmp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, folder / f"{i}.dcm")
            os.fsync(dir_fd)
        return (time.perf_counter() - t0) / n
    finally:
        os.close(dir_fd)
        shutil.rmtree(folder, ignore_errors=True)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.dcm"))


def measure(
    work: Path, small: Path, n_small: int, ct: Path, n_ct: int, ct_study: str,
    ct2: tuple[Path, int] | None = None, peers: tuple[Path, int] | None = None,
) -> list[Row]:
    """Every receiver on every corpus; return the rows.

    ``small`` and ``ct`` go to the bare SCP and to ``ingest serve`` (one association each, then
    ``small`` split over 4 concurrent associations); ``ct2`` (2x the CT series) to ``ingest serve``
    only, for the memory rows; ``peers`` (1,000 small instances) to ``ingest serve``, dcmtk
    ``storescp`` and Orthanc, with ``storescu`` with and without ``TCP_NODELAY``.
    """
    rows: list[Row] = []
    rates: dict[str, tuple[float, float]] = {}
    peaks: dict[str, float] = {}
    parts = split(sorted(small.rglob("*.dcm")), 4, Path(tempfile.mkdtemp(dir=work, prefix="split-")))
    # (a) bare baseline
    with _bare(work) as port:
        for name, folder, n in (("small", small, n_small), ("ct", ct, n_ct)):
            secs = _storescu(port, folder)
            rates[f"bare-{name}"] = (n / secs, _size(folder) / secs / 1e6)
        secs = storescu_parallel(port, parts)
        rates["bare-small4"] = (n_small / secs, _size(small) / secs / 1e6)
    # (b) ingest serve
    runs = [("small", small, n_small), ("ct", ct, n_ct)] + ([("ct2", ct2[0], ct2[1])] if ct2 else [])
    for name, folder, n in runs:
        with _serve(work) as (port, bport, child, _data):
            secs = _storescu(port, folder)
            last = time.perf_counter()
            rates[f"serve-{name}"] = (n / secs, _size(folder) / secs / 1e6)
            if name == "ct2":
                peaks[name] = _peak_rss_mb(child.pid)
            if name == "ct":
                rss = peaks[name] = _peak_rss_mb(child.pid)
                while _study_count(bport, ct_study) < 1 and time.perf_counter() - last < 60:
                    time.sleep(0.05)
                visible = time.perf_counter() - last
                rows.append(
                    Row("listener: peak RSS of ingest serve, CT series", rss, "MB",
                        note="target <= 150 MB", status="pass" if rss <= 150 else "fail")
                )
                rows.append(
                    Row("listener: last C-STORE response -> ImagingStudy readable", visible, "s",
                        note="target <= release_grace_s (2) + 1 s", status="pass" if visible <= 3 else "fail")
                )
    with _serve(work) as (port, _bport, _child, _data):
        secs = storescu_parallel(port, parts)
        rates["serve-small4"] = (n_small / secs, _size(small) / secs / 1e6)
    if "ct2" in peaks and "ct" in peaks:
        growth = peaks["ct2"] - peaks["ct"]
        rows.append(
            Row(
                "listener: peak RSS growth with a 2x CT series",
                growth,
                "MB",
                note=f"{ct2[1] if ct2 else 0} images: {peaks['ct2']:.1f} MB vs {n_ct}: {peaks['ct']:.1f} MB; "
                "target: no growth (within 10 MB)",
                status="pass" if growth <= 10 else "fail",
            )
        )
    for name, label, target in (
        ("small", "small, 1 association", 0.8), ("ct", "CT 512 KB, 1 association", 0.9),
        ("small4", "small, 4 associations", 0.9),
    ):
        b_rate, b_mb = rates[f"bare-{name}"]
        s_rate, s_mb = rates[f"serve-{name}"]
        rows.append(
            Row(
                f"listener: storescu -> ingest serve ({label})",
                s_rate,
                "inst/s",
                baseline=b_rate,
                target=target,
                note=f"{s_mb:.1f} MB/s vs bare pynetdicom SCP {b_mb:.1f} MB/s",
            ).finish()
        )
        if name == "small4":
            continue
        folder, n = (small, n_small) if name == "small" else (ct, n_ct)
        size = _size(folder) // n
        durable = _durable_write_s(work, size)
        rows.append(
            Row(
                f"listener: bare SCP + one durable write per instance ({label}) / bare SCP",
                1 / (1 / b_rate + durable),
                "inst/s",
                baseline=b_rate,
                note=(
                    f"computed: one durable write of {size / 1e3:.0f} kB measured at {durable * 1e3:.2f} ms; "
                    f"the most a listener answering once the bytes are durable can reach ({target}x asked)"
                ),
            ).finish()
        )
    if peers is not None:
        rows += measure_peers(work, *peers)
    return rows


def measure_peers(work: Path, folder: Path, n: int) -> list[Row]:
    """``folder`` (``n`` small instances) to ``ingest serve``, dcmtk ``storescp`` and Orthanc, each
    sent by ``storescu`` with ``TCP_NODELAY=1`` and by a default ``storescu``; ratio rows.

    The bare pynetdicom SCP gets the same corpus from the same senders: it writes files without fsync
    and does nothing else, so its rate over Orthanc's is the ceiling of any listener built on pynetdicom
    (an info row: what part of a shortfall the DIMSE engine itself accounts for)."""
    rate: dict[tuple[str, bool], float] = {}
    for nodelay in (True, False):
        with _serve(work) as (port, _bport, _child, _data):
            rate["serve", nodelay] = n / storescu(port, folder, nodelay=nodelay)
        port = _free_port()
        with storescp(port, work):
            rate["storescp", nodelay] = n / storescu(port, folder, nodelay=nodelay)
        port, http = _free_ports(2)
        with orthanc(port, http, work):
            rate["orthanc", nodelay] = n / storescu(port, folder, nodelay=nodelay)
        with _bare(work) as port:
            rate["bare", nodelay] = n / storescu(port, folder, nodelay=nodelay)
    rows: list[Row] = []
    for nodelay in (True, False):
        sender = "storescu TCP_NODELAY=1" if nodelay else "storescu default"
        for peer, target, what in (
            ("orthanc", 1.0, "Orthanc (durable storage)"), ("storescp", 0.5, "dcmtk storescp (no fsync)"),
        ):
            rows.append(
                Row(
                    f"listener: {n} small, {sender}: ingest serve / {what}",
                    rate["serve", nodelay],
                    "inst/s",
                    baseline=rate[peer, nodelay],
                    target=target,
                    note=f"{peer} {rate[peer, nodelay]:.0f} inst/s",
                ).finish()
            )
        share = rate["serve", nodelay] / rate["bare", nodelay]
        rows.append(
            Row(
                f"listener: {n} small, {sender}: bare pynetdicom SCP (no fsync) / Orthanc",
                rate["bare", nodelay],
                "inst/s",
                baseline=rate["orthanc", nodelay],
                note=f"pynetdicom's ceiling; ingest serve {share:.2f}x of it",
            ).finish()
        )
    return rows


@benchmark("listener")
def bench_listener(ctx: BenchContext) -> list[Row]:
    """storescu -> bare pynetdicom SCP vs ``ingest serve`` (small corpus, CT series, 4 associations),
    and ``ingest serve`` vs dcmtk ``storescp`` and Orthanc (1,000 small instances)."""
    small = ctx.corpus("small", studies=30, files=ctx.scale(5000, 600))
    ct = ctx.corpus("ct400", studies=0, files=0, ct_series=ctx.scale(400, 80))
    ct2 = ctx.corpus("ct800", studies=0, files=0, ct_series=ctx.scale(800, 160))
    thousand = ctx.corpus("small1000", studies=10, files=ctx.scale(1000, 300), seed=3)
    return measure(ctx.work, small.root, small.files, ct.root, ct.files, ct.study_uids[-1],
                   ct2=(ct2.root, ct2.files), peers=(thousand.root, thousand.files))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--baseline-scp", nargs=2, metavar=("PORT", "DIR"))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.baseline_scp:
        baseline_scp(int(args.baseline_scp[0]), Path(args.baseline_scp[1]))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-listener-") as tmp:
        ctx = BenchContext(work=Path(tmp), quick=args.quick, ingest=(sys.executable, "-m", "ingest"))
        for row in bench_listener(ctx):
            ratio = f" ratio {row.ratio:.2f}" if row.ratio is not None else ""
            base = f" (bare {row.baseline:.1f})" if row.baseline else ""
            print(f"{row.name}: {row.value:.2f} {row.unit}{base}{ratio} [{row.status}] {row.note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
