"""Storage Commitment rows of ``make bench``: a real ``ingest serve`` and a pynetdicom requester.

- ``commitment round trip``: a study of 500 small instances (``--quick``: 100) is stored on one
  association, then one N-ACTION asks for all of it; the time from sending the N-ACTION to receiving the
  N-EVENT-REPORT (on the same association, the requester offering the SCP role) gives committed
  instances per second. No baseline: an info row, the seconds in the note.
- ``listener with commitment``: the same study stored and committed (N-ACTION to report included) by a
  service with ``[listener.commitment]`` on, against storing it into a service with it off, in the same
  run: instances per second of each, and their ratio (target 0.8: asking for commitment once per study
  should cost little next to storing it).

``python -m bench.commitment [--quick]`` runs these rows alone.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt

from bench.run import BenchContext, Row, benchmark

REPO = Path(__file__).resolve().parents[1]

SC_PUSH = "1.2.840.10008.1.20.1"
SC_INSTANCE = "1.2.840.10008.1.20.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _serve(work: Path, *, commitment: bool) -> Iterator[int]:
    """``ingest serve`` on a fresh data dir (commitment on or off); yields its DICOM port."""
    data = Path(tempfile.mkdtemp(dir=work, prefix="commit-serve-"))
    port, bport = _free_port(), _free_port()
    env = dict(
        os.environ,
        INGEST_LISTENER__PORT=str(port),
        INGEST_LISTENER__ACCEPT_ANY_CALLING_AE="true",
        INGEST_LISTENER__COMMITMENT__ENABLED="true" if commitment else "false",
        INGEST_EMBEDDED_BACKEND__PORT=str(bport),
        INGEST_ADMIN__ENABLED="false",
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
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
            except OSError:
                if child.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "ingest serve did not start: " + (data / "serve.log").read_text()[-1500:]
                    ) from None
                time.sleep(0.2)
                continue
            break
        yield port
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(60)


def _study(n: int, seed: int) -> list[Dataset]:
    study = f"1.2.826.0.1.3680043.10.1137.{seed}"
    out = []
    for i in range(1, n + 1):
        ds = Dataset()
        ds.SOPClassUID = CT_IMAGE
        ds.SOPInstanceUID = f"{study}.3.{i}"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = f"{study}.2"
        ds.Modality = "CT"
        ds.PatientID = "BENCH"
        ds.InstanceNumber = i
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def _request(transaction_uid: str, study: list[Dataset]) -> Dataset:
    info = Dataset()
    info.TransactionUID = transaction_uid
    refs = []
    for ds in study:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        refs.append(item)
    info.ReferencedSOPSequence = DicomSequence(refs)
    return info


def run_study(port: int, study: list[Dataset], *, commit: bool, transaction_uid: str) -> tuple[float, float]:
    """Store ``study`` on one association (and, with ``commit``, ask for its commitment and wait for
    the report); returns (total seconds, N-ACTION-to-report seconds)."""
    reports: queue.Queue[tuple[int, Any]] = queue.Queue()

    def on_report(event: Any) -> tuple[int, None]:
        reports.put((int(event.request.EventTypeID), event.event_information))
        return 0x0000, None

    ae = AE(ae_title="BENCH")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(CT_IMAGE, ExplicitVRLittleEndian)
    kwargs: dict[str, Any] = {"ae_title": "INGEST", "evt_handlers": [(evt.EVT_N_EVENT_REPORT, on_report)]}
    if commit:
        ae.add_requested_context(SC_PUSH, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        kwargs["ext_neg"] = [build_role(SC_PUSH, scu_role=True, scp_role=True)]
    started = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, **kwargs)
    if not assoc.is_established:
        raise RuntimeError("association not established")
    round_trip = 0.0
    try:
        for ds in study:
            status = assoc.send_c_store(ds)
            if int(getattr(status, "Status", -1)) != 0:
                raise RuntimeError(f"C-STORE answered {status}")
        if commit:
            asked = time.perf_counter()
            status, _ = assoc.send_n_action(_request(transaction_uid, study), 1, SC_PUSH, SC_INSTANCE)
            if int(getattr(status, "Status", -1)) != 0:
                raise RuntimeError(f"N-ACTION answered {status}")
            event_type, info = reports.get(timeout=120)
            round_trip = time.perf_counter() - asked
            committed = len(info.get("ReferencedSOPSequence", []))
            if event_type != 1 or committed != len(study):
                raise RuntimeError(f"report: event type {event_type}, {committed}/{len(study)} committed")
    finally:
        assoc.release()
    return time.perf_counter() - started, round_trip


def measure(work: Path, n: int) -> list[Row]:
    rows: list[Row] = []
    with _serve(work, commitment=False) as port:
        off_s, _ = run_study(port, _study(n, 1), commit=False, transaction_uid="")
    with _serve(work, commitment=True) as port:
        on_s, round_trip = run_study(
            port, _study(n, 2), commit=True, transaction_uid="1.2.826.0.1.3680043.10.1137.99.1"
        )
    rows.append(
        Row(
            f"commitment round trip ({n} instances, N-ACTION to N-EVENT-REPORT)",
            n / round_trip,
            "inst/s",
            note=f"{round_trip * 1000:.0f} ms",
        ).finish()
    )
    rows.append(
        Row(
            f"listener with commitment on / off ({n} instances, one association)",
            n / on_s,
            "inst/s",
            baseline=n / off_s,
            target=0.8,
            note=f"on {on_s:.2f} s (store + commit), off {off_s:.2f} s (store)",
        ).finish()
    )
    return rows


@benchmark("commitment")
def bench_commitment(ctx: BenchContext) -> list[Row]:
    """Storage Commitment: N-ACTION to N-EVENT-REPORT for a 500-instance study, and the listener's rate
    with commitment on vs off."""
    return measure(ctx.work, ctx.scale(500, 100))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        for row in measure(Path(work), 100 if args.quick else 500):
            ratio = f"  ratio {row.ratio:.2f}" if row.ratio is not None else ""
            base = f"  baseline {row.baseline:.1f}" if row.baseline else ""
            print(f"{row.name}: {row.value:.1f} {row.unit}{base}{ratio}  [{row.status}] {row.note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
