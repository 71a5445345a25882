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
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

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
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from ingest.sources.dimse.listener import TRANSFER_SYNTAXES
    from ingest.sources.dimse.netguard import GuardedRequestHandler, GuardedServer, quiet_pynetdicom_logging

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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (
            subprocess.run(
                ["echoscu", "-aec", "INGEST", "127.0.0.1", str(port)], capture_output=True
            ).returncode
            == 0
        ):
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing answers C-ECHO on port {port}")


def _storescu(port: int, folder: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        ["storescu", "-aec", "INGEST", "+sd", "+r", "127.0.0.1", str(port), str(folder)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stderr[-500:]}")
    return time.perf_counter() - started


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


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.dcm"))


def measure(
    work: Path, small: Path, n_small: int, ct: Path, n_ct: int, ct_study: str,
    ct2: tuple[Path, int] | None = None,
) -> list[Row]:
    """Run both receivers on both corpora (and ``ingest serve`` on a 2x CT series); return the rows."""
    rows: list[Row] = []
    rates: dict[str, tuple[float, float]] = {}
    peaks: dict[str, float] = {}
    # (a) bare baseline
    for name, folder, n in (("small", small, n_small), ("ct", ct, n_ct)):
        port = _free_port()
        out = Path(tempfile.mkdtemp(dir=work, prefix="bare-"))
        child = subprocess.Popen(
            [sys.executable, "-m", "bench.listener", "--baseline-scp", str(port), str(out)], cwd=REPO
        )
        try:
            _echo_ready(port)
            secs = _storescu(port, folder)
        finally:
            child.terminate()
            child.wait(30)
        rates[f"bare-{name}"] = (n / secs, _size(folder) / secs / 1e6)
    # (b) ingest serve
    runs = [("small", small, n_small), ("ct", ct, n_ct)] + ([("ct2", ct2[0], ct2[1])] if ct2 else [])
    for name, folder, n in runs:
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
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=log,
            )
        try:
            try:
                _echo_ready(port)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}: {(data / 'serve.log').read_text()[-1500:]}") from exc
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
                    Row(
                        "listener: peak RSS of ingest serve, CT series",
                        rss,
                        "MB",
                        note="target <= 150 MB",
                        status="pass" if rss <= 150 else "fail",
                    )
                )
                rows.append(
                    Row(
                        "listener: last C-STORE response -> ImagingStudy readable",
                        visible,
                        "s",
                        note="target <= release_grace_s (2) + 1 s",
                        status="pass" if visible <= 3 else "fail",
                    )
                )
        finally:
            child.send_signal(signal.SIGTERM)
            child.wait(60)
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
    for name in ("small", "ct"):
        b_rate, b_mb = rates[f"bare-{name}"]
        s_rate, s_mb = rates[f"serve-{name}"]
        rows.append(
            Row(
                f"listener: storescu -> ingest serve ({name})",
                s_rate,
                "inst/s",
                baseline=b_rate,
                target=0.9,
                note=f"{s_mb:.1f} MB/s vs bare {b_mb:.1f} MB/s",
            ).finish()
        )
    return rows


@benchmark("listener")
def bench_listener(ctx: BenchContext) -> list[Row]:
    """storescu -> bare pynetdicom SCP vs ``ingest serve`` (small corpus and CT series)."""
    small = ctx.corpus("small", studies=30, files=ctx.scale(5000, 600))
    ct = ctx.corpus("ct400", studies=0, files=0, ct_series=ctx.scale(400, 80))
    ct2 = ctx.corpus("ct800", studies=0, files=0, ct_series=ctx.scale(800, 160))
    return measure(ctx.work, small.root, small.files, ct.root, ct.files, ct.study_uids[-1],
                   ct2=(ct2.root, ct2.files))


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
