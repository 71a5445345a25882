"""The QIDO-RS client's edges against a plain HTTP server on loopback: the bearer token is sent as an
``Authorization`` header only, and an HTTP error names the source and the search, never the token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from tests import REPO

TOKEN = "s3cr3t-token-value"


class _Qido(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str | None]]] = []
    status = 200

    def do_GET(self) -> None:
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        body = b"[]" if type(self).status == 200 else b'{"error": "no"}'
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def qido() -> Iterator[tuple[str, type[_Qido]]]:
    handler = type("Handler", (_Qido,), {"seen": [], "status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", handler
    finally:
        server.shutdown()
        server.server_close()


def _sync(tmp: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp / "ingest.toml").write_text(
        f'[sync]\nattempts = 1\n[[sync.sources]]\nname = "web"\nurl = "{url}"\ntoken_env = "PACS_TOKEN"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env["PACS_TOKEN"] = TOKEN
    return subprocess.run(
        [sys.executable, "-m", "ingest", "--config", str(tmp / "ingest.toml"), "--data-dir", str(tmp / "d"),
         "sync", "--name", "web", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def test_the_bearer_token_goes_in_the_authorization_header(
    tmp_path: Path, qido: tuple[str, type[_Qido]]
) -> None:
    url, handler = qido
    done = _sync(tmp_path, url, "--dry-run", "--json", "--since", "2024-01-01")
    assert done.returncode == 0, done.stderr
    [(path, auth)] = handler.seen
    assert path.startswith("/dicom-web/studies?") and "StudyDate=20240101-" in path
    assert auth == f"Bearer {TOKEN}"
    assert json.loads(done.stderr.splitlines()[-1])["instances"]["studies"] == 0


def test_an_http_error_names_the_source_and_the_search(tmp_path: Path, qido: tuple[str, type[_Qido]]) -> None:
    url, handler = qido
    handler.status = 401
    done = _sync(tmp_path, url, "--json", "--since", "2024-01-01")
    assert done.returncode == 1
    summary = json.loads(done.stdout)
    [error] = summary["errors"]
    assert error == f"source web: QIDO-RS STUDY StudyDate=20240101- at {url}: HTTP 401"
    assert TOKEN not in done.stdout + done.stderr
    # the failed run is recorded, and the watermark did not move
    status = subprocess.run([sys.executable, "-m", "ingest", "--data-dir", str(tmp_path / "d"), "status",
                             "--json"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    [run] = json.loads(status.stdout)["sync"]
    assert (run["source"], run["last_status"], run["watermark"]) == ("web", "failed", None)
    assert run["last_error"] == error


def _runs(tmp: Path) -> list[dict[str, object]]:
    status = subprocess.run(
        [sys.executable, "-m", "ingest", "--data-dir", str(tmp / "d"), "status", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )
    runs: list[dict[str, object]] = json.loads(status.stdout)["sync"]
    return runs


def test_the_watermark_moves_only_past_a_run_that_asked_everything_since_the_last(
    tmp_path: Path, qido: tuple[str, type[_Qido]]
) -> None:
    url, handler = qido
    assert _sync(tmp_path, url, "--json", "--since", "2024-01-01").returncode == 0
    [run] = _runs(tmp_path)
    assert (run["last_status"], run["watermark"]) == ("ok", None)  # 2024 on only: older studies unasked
    assert _sync(tmp_path, url, "--json").returncode == 0  # no watermark yet: everything
    [run] = _runs(tmp_path)
    assert run["watermark"] is not None
    assert "StudyDate=" not in handler.seen[-1][0]
    assert _sync(tmp_path, url, "--json").returncode == 0  # incremental: from the watermark less a day
    assert "StudyDate=" in handler.seen[-1][0]
