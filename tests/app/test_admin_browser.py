"""The status page in a real browser: Debian chromium driven by Playwright, against ``ingest serve`` in a
subprocess (embedded backend) that received ``samples/studies`` from dcmtk ``storescu``.

The dead letter is a real one: before the studies are sent, the embedded backend is given two
ImagingStudy resources with one study's identifier, so its push finds two matches and is dead-lettered
(``multiple_matches``). One duplicate is then deleted and the page's Retry button re-drives the study.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests import REPO, free_ports, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
SAMPLES = REPO / "samples" / "studies"

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None  # type: ignore[assignment]

pytestmark = [
    pytest.mark.dcmtk,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} not installed (apt chromium)"),
    pytest.mark.skipif(sync_playwright is None, reason="playwright not installed (pip install playwright)"),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed"),
]


def _sample_studies() -> dict[str, int]:
    """Study Instance UID -> instances, of ``samples/studies``."""
    counts: dict[str, int] = {}
    for path in sorted(SAMPLES.rglob("*.dcm")):
        uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        counts[uid] = counts.get(uid, 0) + 1
    return counts


def _wait_for(check: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; serve log:\n{log.read_text()[-3000:]}")


class Serve:
    """``python -m ingest --config <toml> serve`` on free loopback ports, embedded backend."""

    def __init__(self, tmp: Path) -> None:
        self.dicom_port, self.backend_port, self.admin_port = free_ports(3)
        self.data = tmp / "data"
        self.log = tmp / "serve.log"
        self.config = tmp / "ingest.toml"
        self.config.write_text(
            f'data_dir = "{self.data}"\n'
            f"[listener]\nport = {self.dicom_port}\naccept_any_calling_ae = true\n"
            f"[embedded_backend]\nport = {self.backend_port}\n"
            f'[admin]\nhost = "127.0.0.1"\nport = {self.admin_port}\n'
            "[relay]\nstable_age_s = 1\nrelease_grace_s = 0.3\npoll_interval_s = 0.2\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}/"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingest", "--config", str(self.config), "serve"],
                cwd=REPO, env=env, stdout=log, stderr=log,
            )

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                with urllib.request.urlopen(f"{self.url}healthz", timeout=2):
                    pass
                self.graphql("{ ImagingStudyList(_count: 1) { id } }")
            except OSError:
                return False
            return True

        _wait_for(up, 30, "ingest serve to start", self.log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def graphql(self, query: str) -> dict[str, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.backend_port}/fhir/R4/$graphql",
            data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as rsp:
            body: dict[str, Any] = json.loads(rsp.read())
        assert not body.get("errors"), body
        return body

    def create_duplicate(self, study_uid: str) -> str:
        res = (
            '{resourceType: "ImagingStudy", status: "available", subject: {reference: "Patient/other"}, '
            f'identifier: [{{system: "urn:dicom:uid", value: "urn:oid:{study_uid}"}}]}}'
        )
        created = self.graphql(f"mutation {{ ImagingStudyCreate(res: {res}) {{ id }} }}")
        return str(created["data"]["ImagingStudyCreate"]["id"])

    def delete(self, backend_id: str) -> None:
        self.graphql(f'mutation {{ ImagingStudyDelete(id: "{backend_id}") {{ id }} }}')

    def page(self) -> str:
        with urllib.request.urlopen(self.url, timeout=10) as rsp:
            return str(rsp.read().decode())


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Serve]:
    s = Serve(tmp_path)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _sample_files() -> dict[str, tuple[str, str, str, str]]:
    """Path -> (Study Instance UID, SOP Class UID, SOP Instance UID, accession), of ``samples/studies``."""
    out = {}
    for path in sorted(SAMPLES.rglob("*.dcm")):
        ds = dcmread(path, stop_before_pixels=True)
        out[str(path)] = (str(ds.StudyInstanceUID), str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                          str(ds.get("AccessionNumber", "")))
    return out


def _ask_commitment(
    port: int, transaction_uid: str, items: list[tuple[str, str]], *, wait_report: bool, ae_title: str
) -> None:
    """A Storage Commitment N-ACTION from ``ae_title`` (pynetdicom); with ``wait_report`` the association
    offers the SCP role and stays open until the N-EVENT-REPORT came on it."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, build_role, evt

    from ingest.sources.dimse.commitment import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH

    reports: list[int] = []
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH, ExplicitVRLittleEndian)
    kwargs: dict[str, Any] = {"ae_title": "INGEST"}
    if wait_report:
        kwargs["ext_neg"] = [build_role(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)]
        kwargs["evt_handlers"] = [(evt.EVT_N_EVENT_REPORT, lambda event: reports.append(1) or (0x0000, None))]
    info = Dataset()
    info.TransactionUID = transaction_uid
    refs = []
    for cls, uid in items:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, uid
        refs.append(item)
    info.ReferencedSOPSequence = DicomSequence(refs)
    assoc = ae.associate("127.0.0.1", port, **kwargs)
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_action(info, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE)
        assert status.Status == 0x0000
        if wait_report:  # the report arrives on this association (pynetdicom's thread)
            wait_until(lambda: reports, 30, "the N-EVENT-REPORT")
    finally:
        assoc.release()


def test_status_page_in_chromium(serving: Serve, tmp_path: Path) -> None:
    studies = _sample_studies()
    files = _sample_files()
    assert len(studies) >= 2
    doomed = sorted(studies)[0]
    duplicates = [serving.create_duplicate(doomed), serving.create_duplicate(doomed)]

    sent = subprocess.run(
        ["storescu", "-aec", "INGEST", "+sd", "+r", "127.0.0.1", str(serving.dicom_port), str(SAMPLES)],
        capture_output=True, text=True, timeout=120,
    )
    assert sent.returncode == 0, sent.stderr

    def settled() -> bool:
        text = serving.page()
        others = all(f'data-study="{uid}" data-state="pushed"' in text for uid in studies if uid != doomed)
        return others and f'data-study="{doomed}" data-state="dead"' in text

    _wait_for(settled, 60, "the studies pushed and one dead-lettered", serving.log)

    # a conflicting copy of one instance (other content, same SOP Instance UID) from another AE: quarantined
    first_path, (mr_study, cls, sop, _) = next((p, f) for p, f in files.items() if "study-002" in p)
    ds = dcmread(first_path)
    ds.SeriesDescription = "changed <b>content</b>"
    ds.save_as(tmp_path / "conflict.dcm", enforce_file_format=True)
    subprocess.run(["storescu", "-aet", "MODALITY<2>", "-aec", "INGEST", "127.0.0.1", str(serving.dicom_port),
                    str(tmp_path / "conflict.dcm")], capture_output=True, timeout=60, check=False)
    # Storage Commitment: one request (from the AE that sent the instances) reported on its association,
    # one from another AE whose report cannot be delivered
    mine = [(f[1], f[2]) for f in files.values() if f[0] == mr_study]
    _ask_commitment(serving.dicom_port, "1.2.826.0.1.3680043.10.543.101", [*mine, (cls, "1.2.3.404")],
                    wait_report=True, ae_title="STORESCU")
    _ask_commitment(serving.dicom_port, "1.2.826.0.1.3680043.10.543.102", mine[:1], wait_report=False,
                    ae_title="COMMITTER")

    shots: dict[str, Path] = {}
    problems: list[str] = []
    assert sync_playwright is not None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
                    if msg.type in ("error", "warning") else None)
            page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
            page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url}"))

            def shot(name: str) -> None:
                shots[name] = tmp_path / f"{name}.png"
                page.screenshot(path=str(shots[name]), full_page=True)

            page.goto(serving.url)

            # the studies are listed, with what storescu sent; the modality as the ImagingStudy has it
            for uid, n in studies.items():
                row = page.locator(f'#studies tr[data-study="{uid}"]')
                assert row.count() == 1, uid
                assert f"/ {n}" in row.inner_text()
            assert "AE STORESCU" in page.locator("#studies").inner_text()
            mr_cells = page.locator(f'#studies tr[data-study="{mr_study}"] td').all_inner_texts()
            assert "MR" in mr_cells and "KO, MR" not in mr_cells  # its KO series is not an acquisition

            # the chart has points and non-zero bars
            points = page.locator("#chart polyline").get_attribute("points") or ""
            assert len(points.split()) >= 1
            heights = [float(h or 0) for h in page.locator("#chart rect.bar").evaluate_all(
                "els => els.map(e => e.getAttribute('height'))")]
            assert heights and max(heights) > 0

            # the dead letter, with the backend's message, and the Retry buttons
            dead = page.locator(f'#dead tr[data-study="{doomed}"]')
            assert dead.count() == 1
            assert "multiple_matches" in dead.inner_text() and "refusing to guess" in dead.inner_text()
            assert page.locator('header [data-key="dead"]').inner_text() == "1"
            shot("index")

            serving.delete(duplicates[1])  # the cause is fixed; now re-drive every dead letter from the page
            with page.expect_navigation():
                page.locator("#retry-all").click()
            assert page.locator(f'#dead tr[data-study="{doomed}"]').count() == 0
            assert "Retry: 1 dead letter(s) re-queued." in page.locator("main").inner_text()
            # the header's numbers change in place from /summary.json: no reload (the marker stays)
            page.evaluate("window.__sameDocument = true")
            uptime = page.locator('header [data-key="uptime"]').inner_text()
            page.wait_for_function(
                "u => document.querySelector('header [data-key=\"uptime\"]').textContent !== u", arg=uptime,
                timeout=30_000)
            page.wait_for_function(
                "() => document.querySelector('header [data-key=\"relay-queue\"]').textContent === '0'",
                timeout=30_000)
            assert page.evaluate("window.__sameDocument") is True
            assert page.evaluate("document.documentElement.getAttribute('data-refreshed')") is not None

            # search: by accession, then by state and modality, from the form
            accession = next(f[3] for f in files.values() if f[0] == mr_study)
            page.fill('#search input[name="q"]', accession.lower())
            with page.expect_navigation():
                page.locator('#search button[type="submit"]').click()
            assert page.locator("#studies tr[data-study]").count() == 1
            assert page.locator(f'#studies tr[data-study="{mr_study}"]').count() == 1
            page.fill('#search input[name="q"]', "")
            page.select_option('#search select[name="state"]', "pushed")
            page.fill('#search input[name="modality"]', "KO")
            with page.expect_navigation():
                page.locator('#search button[type="submit"]').click()
            assert [r.get_attribute("data-study") for r in page.locator("#studies tr[data-study]").all()] == [
                mr_study]
            assert "Searched the newest" in page.locator("#search-note").inner_text()
            shot("search")

            # the study page: series in series-number order
            page.locator(f'#studies tr[data-study="{mr_study}"] a').click()
            page.wait_for_selector("#series")
            numbers = [int(t) for t in page.locator("#series tr td:first-child").all_inner_texts()]
            assert numbers == sorted(numbers) and len(numbers) == 3
            assert page.locator("#study-modality").inner_text() == "MR"
            assert "ImagingStudy" in (page.locator("#imagingstudy").inner_text())
            assert "AE MODALITY<2>" in page.locator("#quarantine").inner_text()
            shot("study")

            # the quarantine list
            page.locator('nav.views a[href="/quarantine"]').click()
            page.wait_for_selector("#quarantine-list")
            row = page.locator("#quarantine-list tr").nth(1).inner_text()
            assert "conflict" in row and "AE MODALITY<2>" in row and "yes" in row and sop in row
            shot("quarantine")

            # Storage Commitment
            page.locator('nav.views a[href="/commitments"]').click()
            page.wait_for_selector("#commitments")
            reported = page.locator('#commitments tr[data-transaction="1.2.826.0.1.3680043.10.543.101"]')
            cells = reported.locator("td").all_inner_texts()
            # requester, state, instances; committed and failed (decided by the store) add up to them
            assert cells[2:5] == ["STORESCU", "reported", str(len(mine) + 1)], cells
            assert int(cells[5]) + int(cells[6]) == len(mine) + 1 and int(cells[6]) >= 1, cells
            other = page.locator('#commitments tr[data-transaction="1.2.826.0.1.3680043.10.543.102"]')
            assert other.count() == 1 and "COMMITTER" in other.inner_text()
            shot("commitments")
        finally:
            browser.close()
    assert problems == []
    for name in ("index", "search", "study", "quarantine", "commitments"):
        assert shots[name].stat().st_size > 0, name
