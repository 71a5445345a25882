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

from tests import REPO, free_ports

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


def test_status_page_in_chromium(serving: Serve, tmp_path: Path) -> None:
    studies = _sample_studies()
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

    problems: list[str] = []
    assert sync_playwright is not None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
                    if msg.type in ("error", "warning") else None)
            page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
            page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url}"))
            page.goto(serving.url)

            # the studies are listed, with what storescu sent
            for uid, n in studies.items():
                row = page.locator(f'#studies tr[data-study="{uid}"]')
                assert row.count() == 1, uid
                assert f"/ {n}" in row.inner_text()
            assert "AE STORESCU" in page.locator("#studies").inner_text()

            # the chart has points and non-zero bars
            points = page.locator("#chart polyline").get_attribute("points") or ""
            assert len(points.split()) >= 1
            heights = [float(h or 0) for h in page.locator("#chart rect.bar").evaluate_all(
                "els => els.map(e => e.getAttribute('height'))")]
            assert heights and max(heights) > 0

            # the dead letter, with the backend's message, and its Retry button
            dead = page.locator(f'#dead tr[data-study="{doomed}"]')
            assert dead.count() == 1
            assert "multiple_matches" in dead.inner_text() and "refusing to guess" in dead.inner_text()
            page.screenshot(path=str(tmp_path / "status.png"), full_page=True)

            serving.delete(duplicates[1])  # the cause is fixed; now re-drive it from the page
            with page.expect_navigation():
                page.locator(f'button[data-retry="{doomed}"]').click()
            assert page.locator(f'#dead tr[data-study="{doomed}"]').count() == 0
            # the 5 s refresh swaps <main> without a reload: the study turns pushed
            page.wait_for_selector(f'#studies tr[data-study="{doomed}"][data-state="pushed"]', timeout=30_000)
            assert page.evaluate("document.documentElement.getAttribute('data-refreshed')") is not None
            assert "Dead letters (0)" in page.locator("main").inner_text()
            page.wait_for_function(  # the chart's line leaves the baseline: studies pushed this hour
                "() => !/pushed: 0 studies/.test(document.querySelector('main').innerText)", timeout=30_000)
            ys = [float(pt.split(",")[1]) for pt in
                  (page.locator("#chart polyline").get_attribute("points") or "").split()]
            assert min(ys) < max(ys)

            # the study page
            page.locator(f'#studies tr[data-study="{doomed}"] a').click()
            page.wait_for_selector("#series")
            assert page.locator("#series tr").count() >= 2
            assert "ImagingStudy" in (page.locator("#imagingstudy").inner_text())
            page.screenshot(path=str(tmp_path / "study.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert (tmp_path / "status.png").stat().st_size > 0
