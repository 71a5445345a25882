"""``ingest serve`` and its disk: ``[spool]`` retention and the disk budget, end to end.

Real parts only: ``serve()`` in-process (or ``python -m ingest serve`` as a child) with its listener on a
free loopback port, a pynetdicom sender, the embedded backend, the SQLite state store; the last test puts
the data dir on a real 32 MiB tmpfs. Expected behaviour from docs/architecture.md "Retention and the
disk budget": bytes go only after the study is pushed and never under a commitment hold; past
``max_bytes`` / ``min_free_bytes`` the sender gets 0xA700 and nothing accepted before is lost; the
watcher leaves files where they are; an unsafe retain / commitment combination stops ``serve`` at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from ingest.adapters.spool import Spool, read_instance
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app.serve import serve
from ingest.config import (
    AdminSettings,
    ListenerSettings,
    RelaySettings,
    Settings,
    SpoolSettings,
    WatchSettings,
)
from tests import free_ports
from tests.faultproxy import studies_with_identifier

GRAPHQL = "/fhir/R4/$graphql"
ROOT = "1.2.826.0.1.3680043.10.543"  # synthetic UIDs
CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))


def free_port() -> int:
    return free_ports(1)[0]


async def until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def healthz(port: int) -> tuple[int, dict[str, Any]] | None:
    try:
        url = f"http://127.0.0.1:{port}/healthz"
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            return resp.status, await resp.json()
    except aiohttp.ClientError:
        return None


def instance(study: str, n: int, size: int) -> Dataset:
    """A synthetic Secondary Capture instance carrying ``size`` bytes of (never decoded) pixel data."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = f"{study}.1.{n}"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = f"{study}.1"
    ds.PatientID = "SYN-DISK"
    ds.PatientName = "Synthetic^Disk"
    ds.StudyDate = "20240301"
    ds.Modality = "OT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = n
    ds.add_new(0x7FE00010, "OB", bytes([n % 251]) * size)  # Pixel Data
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def send(port: int, datasets: Sequence[Dataset]) -> list[tuple[int, str]]:
    """C-STORE every data set in one association: (status, error comment) of each."""
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="INGEST")
    assert assoc.is_established
    out: list[tuple[int, str]] = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            out.append((int(rsp.Status), str(rsp.get("ErrorComment", ""))))
    finally:
        assoc.release()
    return out


def echo(port: int) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="INGEST")
    assert assoc.is_established
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def stored(data_dir: Path, sop_uid: str) -> Dataset | None:
    """The accepted instance as ingest keeps it (in-row or spool file), parsed; ``None`` if not kept."""
    with SQLiteStateStore(data_dir / "state.sqlite3", node="probe") as store:
        data = read_instance(store, Spool(data_dir / "spool"), sop_uid)
    return None if data is None else dcmread(BytesIO(data))


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[asyncio.Task[int]]:
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, stop))
    try:
        await until(lambda: healthz(settings.admin.port), 10.0, "admin endpoint up")
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.shield(task), timeout=30)


def fast_relay() -> RelaySettings:
    return RelaySettings(stable_age_s=0.2, release_grace_s=0.1, base_backoff_s=0.05, max_backoff_s=0.3,
                         poll_interval_s=0.05)


# -- until_pushed: bytes go only after the push, and never under a commitment hold ---------------------


async def test_until_pushed_releases_after_the_push_and_never_under_a_hold(tmp_path: Path) -> None:
    from ingest.backend.server import start_backend

    backend_port, dicom_port, admin_port = free_port(), free_port(), free_port()
    settings = Settings(
        data_dir=tmp_path / "data",
        listener=ListenerSettings(port=dicom_port, accept_any_calling_ae=True),
        admin=AdminSettings(port=admin_port, min_free_bytes=0),
        relay=fast_relay(),
        # the backend is not there yet: the study stays pending
        backend={"url": f"http://127.0.0.1:{backend_port}{GRAPHQL}", "timeout_s": 2, "token_env": None},
        spool=SpoolSettings(retain="until_pushed", retention_interval_s=0.1, inline_max_bytes=4096),
    )
    study = f"{ROOT}.1"
    sent = [instance(study, 1, 2000), instance(study, 2, 50_000), instance(study, 3, 60_000)]  # in-row, files
    runner = None
    try:
        async with serving(settings):
            assert await asyncio.to_thread(send, dicom_port, sent) == [(0, "")] * 3
            # a Storage Commitment holds instance 3 for an hour (what the commitment SCP records)
            with SQLiteStateStore(settings.data_dir / "state.sqlite3", node="probe") as store:
                hour = datetime.now(UTC) + timedelta(hours=1)
                assert store.hold_bytes([sent[2].SOPInstanceUID], until=hour) == 1
            await asyncio.sleep(1.0)  # ten retention passes while the study waits for the backend
            for ds in sent:
                kept = stored(settings.data_dir, ds.SOPInstanceUID)
                assert kept is not None and kept.PixelData == ds.PixelData  # nothing released before the push

            runner, _ = await start_backend(tmp_path / "backend.sqlite3", host="127.0.0.1", port=backend_port)
            url = f"http://127.0.0.1:{backend_port}{GRAPHQL}"
            found = await until(lambda: studies_with_identifier(url, study), 10.0, "study pushed")
            assert found[0]["numberOfInstances"] == 3
            await until(lambda: stored(settings.data_dir, sent[1].SOPInstanceUID) is None, 5.0, "released")
            assert stored(settings.data_dir, sent[0].SOPInstanceUID) is None
            held = stored(settings.data_dir, sent[2].SOPInstanceUID)
            assert held is not None and held.PixelData == sent[2].PixelData  # the hold wins
            with SQLiteStateStore(settings.data_dir / "state.sqlite3", node="probe") as store:
                # only the held instance's file is left; every row stays
                left = Spool(settings.data_dir / "spool").names()
                assert left == [store.instance_spool_name(sent[2].SOPInstanceUID)]
                assert len(store.instances(study)) == 3
                assert store.inline_bytes_total() == 0
            _, metrics = await get(f"http://127.0.0.1:{admin_port}/metrics")
            assert 'ingest_spool_released_total{reason="retention"} 2.0' in metrics
    finally:
        if runner is not None:
            await runner.cleanup()


# -- max_bytes: 0xA700 through the listener, nothing accepted lost, the watcher leaves files -----------


async def test_max_bytes_answers_a700_and_keeps_what_was_accepted(tmp_path: Path) -> None:
    dicom_port, admin_port = free_port(), free_port()
    drop = tmp_path / "drop"
    drop.mkdir()
    settings = Settings(
        data_dir=tmp_path / "data",
        listener=ListenerSettings(port=dicom_port, accept_any_calling_ae=True),
        admin=AdminSettings(port=admin_port, min_free_bytes=0),
        embedded_backend={"port": free_port()},
        relay=fast_relay(),
        watch=WatchSettings(folder=drop, settle_ms=50, after="move"),
        # 1 MiB or less in-row, larger in spool files: both count against max_bytes
        spool=SpoolSettings(max_bytes=2_000_000, inline_max_bytes=1024**2),
    )
    study = f"{ROOT}.2"
    sizes = [300_000, 1_200_000, 300_000, 300_000, 250_000]  # 1.8 MB fit; the next two would not
    sent = [instance(study, n + 1, size) for n, size in enumerate(sizes)]
    async with serving(settings):
        answers = await asyncio.to_thread(send, dicom_port, sent)
        assert [status for status, _ in answers] == [0x0000, 0x0000, 0x0000, 0xA700, 0xA700]
        assert answers[3][1] == "Spool full (max_bytes): not stored, retry later"
        for ds in sent[:3]:  # rows and bytes of what was accepted are intact
            kept = stored(settings.data_dir, ds.SOPInstanceUID)
            assert kept is not None and kept.SOPInstanceUID == ds.SOPInstanceUID
            assert kept.PixelData == ds.PixelData
        with SQLiteStateStore(settings.data_dir / "state.sqlite3", node="probe") as store:
            assert [r.sop_uid for r in store.instances(study)] == [ds.SOPInstanceUID for ds in sent[:3]]

        status, body = await until(lambda: healthz(admin_port), 5.0, "healthz")
        assert status == 503 and body["accepting"] is False
        assert re.fullmatch(
            r"full: 18\d{5} of max_bytes 2000000 bytes used, an instance of 25\d{4} bytes does not fit",
            body["spool"],
        ), body["spool"]
        _, metrics = await get(f"http://127.0.0.1:{admin_port}/metrics")
        assert 'ingest_spool_refusals_total{reason="max_bytes"} 2.0' in metrics

        # the watcher leaves a dropped file where it is, neither archived nor quarantined
        instance(study, 9, 300_000).save_as(tmp_path / "big.dcm", enforce_file_format=True)
        os.replace(tmp_path / "big.dcm", drop / "big.dcm")
        await until(lambda: refusals(admin_port, 3), 10.0, "the watcher asked the budget")
        await asyncio.sleep(0.3)
        assert (drop / "big.dcm").is_file()
        assert list((settings.data_dir / "quarantine").glob("*.json")) == []
        assert echo(dicom_port) == 0x0000  # still serving


async def refusals(port: int, count: int) -> bool:
    _, metrics = await get(f"http://127.0.0.1:{port}/metrics")
    return f'ingest_spool_refusals_total{{reason="max_bytes"}} {count:.1f}' in metrics


# -- a tiny real file system: min_free_bytes keeps the spool from ENOSPC ---------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs mounted under ``tmp_path`` (needs root and CAP_SYS_ADMIN; skipped otherwise)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a 32 MiB tmpfs needs root (mount -t tmpfs); not root here")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_tiny_disk_fills_to_min_free_bytes_and_never_to_enospc(tiny_fs: Path, tmp_path: Path) -> None:
    """Slow-ish (~5 s): a real ``ingest serve`` child gets 80 instances of 300-600 kB (36 MB) for 32 MiB."""
    dicom_port, admin_port = free_port(), free_port()
    data_dir = tiny_fs / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update({
        "INGEST_LISTENER__PORT": str(dicom_port),
        "INGEST_LISTENER__ACCEPT_ANY_CALLING_AE": "true",
        "INGEST_ADMIN__PORT": str(admin_port),
        "INGEST_ADMIN__MIN_FREE_BYTES": "0",
        "INGEST_EMBEDDED_BACKEND__PORT": str(free_port()),
        "INGEST_EMBEDDED_BACKEND__DATABASE": str(tmp_path / "backend.sqlite3"),  # not on the tiny disk
        "INGEST_SPOOL__MIN_FREE_BYTES": str(5 * 1024**2),
        "INGEST_SPOOL__INLINE_MAX_BYTES": str(400_000),  # in-row and spool files both
        "INGEST_RELAY__STABLE_AGE_S": "3600",  # keep the relay out of it
    })
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ingest", "--data-dir", str(data_dir), "serve"],
                                env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        asyncio.run(until(lambda: healthz(admin_port), 20.0, "serve up"))
        study = f"{ROOT}.3"
        sent = [instance(study, n + 1, 300_000 if n % 2 else 600_000) for n in range(80)]
        answers = send(dicom_port, sent)
        codes = [status for status, _ in answers]
        accepted = codes.count(0x0000)
        assert 20 < accepted < 80 and set(codes) == {0x0000, 0xA700}, codes
        assert codes == [0x0000] * accepted + [0xA700] * (80 - accepted)  # full stays full
        assert all(comment == "Spool full (min_free_bytes): not stored, retry later"
                   for _, comment in answers[accepted:])
        status, body = asyncio.run(healthz(admin_port)) or (0, {})
        assert status == 503 and body["spool"].startswith("full: ") and "min_free_bytes" in body["spool"]
        assert body["store"] == "ok" and body["listener"] == "ok"
        assert echo(dicom_port) == 0x0000
        assert shutil.disk_usage(tiny_fs).free >= 5 * 1024**2  # min_free_bytes was kept
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        text = log.read_text(errors="replace")
        assert not re.search(r"ENOSPC|No space left|disk is full|0x0110", text), text[-3000:]
        for ds in sent[:accepted]:
            kept = stored(data_dir, ds.SOPInstanceUID)
            assert kept is not None and kept.PixelData == ds.PixelData
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- refused at start ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "keys"),
    [
        (
            '[spool]\nretain = "until_pushed"\ncommitment_hold = "0s"\n',
            ["[spool] commitment_hold", "[spool] retain", "[listener.commitment] enabled"],
        ),
        (
            '[intake]\non_conflict = "replace"\n[spool]\nquarantine_retain = "7d"\ncommitment_hold = "30d"\n',
            ["[spool] quarantine_retain", "[spool] commitment_hold", "[intake] on_conflict",
             "[listener.commitment] enabled"],
        ),
    ],
)
def test_serve_refuses_to_start_when_committed_bytes_could_go_early(
    tmp_path: Path, toml: str, keys: list[str]
) -> None:
    config = tmp_path / "ingest.toml"
    config.write_text(toml)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    done = subprocess.run(
        [sys.executable, "-m", "ingest", "--config", str(config), "--data-dir", str(tmp_path / "d"), "serve"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 1, done.stderr
    for key in keys:
        assert key in done.stderr, done.stderr
    assert not (tmp_path / "d" / "state.sqlite3").exists()  # nothing started


def test_a_retain_shorter_than_the_hold_is_accepted(tmp_path: Path) -> None:
    # retention waits for every hold, so a short retain is safe (docs/architecture.md)
    settings = Settings(spool=SpoolSettings(retain="1d", commitment_hold="30d"))
    assert settings.spool.retain_after_push == timedelta(days=1)


# -- large data sets, received to disk as they arrive ------------------------------------------------------


def test_a_data_set_received_to_disk_is_refused_when_the_spool_is_full(tmp_path: Path) -> None:
    from ingest.intake.retention import DiskBudget
    from ingest.metrics import Metrics
    from tests.sources.dimse.listener_helpers import make_settings, running_listener

    settings = make_settings(
        tmp_path / "data", accept_any_calling_ae=True, spool=SpoolSettings(inline_max_bytes=0)
    )
    with running_listener(settings) as run:
        run.listener.large_instance_bytes = 64 * 1024  # data sets past 64 KiB go to a spool file
        metrics = Metrics()
        run.listener.budget = DiskBudget(
            run.listener.spool, max_bytes=250_000, min_free_bytes=0, metrics=metrics
        )
        study = f"{ROOT}.4"
        first, second = instance(study, 1, 200_000), instance(study, 2, 200_000)
        answers = send(run.port, [first, second])
        assert answers == [(0x0000, ""), (0xA700, "Spool full (max_bytes): not stored, retry later")]
        spool = run.listener.spool
        assert spool.names() == [run.store.instance_spool_name(first.SOPInstanceUID)]
        assert [p.name for p in spool.root.iterdir() if p.name.startswith(".tmp-")] == []  # nothing left over
        assert run.store.instance_spool_name(second.SOPInstanceUID) is None
        assert metrics.registry.get_sample_value("ingest_spool_refusals_total", {"reason": "max_bytes"}) == 1
        data = read_instance(run.store, spool, first.SOPInstanceUID)
        assert data is not None and dcmread(BytesIO(data)).PixelData == first.PixelData
