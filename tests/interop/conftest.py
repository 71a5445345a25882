"""Fixtures that run Medplum's own FHIR GraphQL implementation (``server.mjs``) on loopback.

``medplum_url`` and ``medplum_token_url`` each start one ``node server.mjs --port 0`` per test session
(per xdist worker), wait for its ``LISTENING <port>`` line and yield the GraphQL endpoint
``http://127.0.0.1:<port>/fhir/R4/$graphql``. At the end of the session exactly that process is
terminated, by its PID. Every test collected from this folder gets the ``interop`` marker.

Without ``node`` the tests are skipped. With ``node`` but without ``node_modules`` the fixture runs
``npm ci`` once (under a file lock shared by the xdist workers) and fails the tests if that fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import selectors
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from ingest.adapters.graphql.sink import GraphQLSink
from ingest.adapters.state.sqlite import SQLiteStateStore

HERE = Path(__file__).resolve().parent
SERVER_SCRIPT = HERE / "server.mjs"
# A file only a complete install has (an interrupted install can leave a bare node_modules/ behind).
INSTALLED_MARKER = HERE / "node_modules" / "@medplum" / "fhir-router" / "package.json"
GRAPHQL_PATH = "/fhir/R4/$graphql"
STARTUP_TIMEOUT_S = 60.0
NPM_CI_TIMEOUT_S = 300.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Add the ``interop`` marker to every test collected from this folder."""
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.interop)


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    return node


def _ensure_node_modules(lock_dir: Path) -> None:
    """Run ``npm ci`` once if the packages are missing; fail (never skip) when it cannot."""
    if INSTALLED_MARKER.is_file():
        return
    with (lock_dir / "interop-npm-ci.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another xdist worker may be installing right now
        if INSTALLED_MARKER.is_file():
            return
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail(f"{HERE / 'node_modules'} is missing and npm is not installed to run `npm ci`")
        try:
            proc = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=HERE,
                capture_output=True,
                text=True,
                timeout=NPM_CI_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"`npm ci` in {HERE} did not finish within {NPM_CI_TIMEOUT_S:.0f} s")
        if proc.returncode != 0 or not INSTALLED_MARKER.is_file():
            pytest.fail(
                f"`npm ci` in {HERE} failed with exit code {proc.returncode}:\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            )


def _wait_for_port(proc: subprocess.Popen[bytes], stderr_path: Path) -> int:
    """Read stdout until ``LISTENING <port>``; fail with the server's stderr if it dies or stalls."""
    assert proc.stdout is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(
                    f"server.mjs (pid {proc.pid}) printed no LISTENING line in {STARTUP_TIMEOUT_S:.0f} s; "
                    f"stderr: {stderr_path.read_text(errors='replace')[-2000:]}"
                )
            if not selector.select(timeout=min(remaining, 0.5)):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:  # EOF: the process exited
                proc.wait(timeout=5)
                pytest.fail(
                    f"server.mjs exited with code {proc.returncode} before listening; "
                    f"stderr: {stderr_path.read_text(errors='replace')[-2000:]}"
                )
            buffer += chunk
    line = buffer.split(b"\n", 1)[0].decode("ascii", errors="replace").strip()
    word, _, port = line.partition(" ")
    if word != "LISTENING" or not port.isdigit():
        pytest.fail(f"unexpected first line from server.mjs: {line!r}")
    return int(port)


@contextlib.contextmanager
def _run_server(lock_dir: Path, token: str | None, oauth: dict[str, str] | None = None) -> Iterator[str]:
    """Start ``node server.mjs --port 0`` and yield its GraphQL URL; terminate that PID afterwards.

    ``oauth`` (``MEDPLUM_CLIENT_ID``, ``MEDPLUM_CLIENT_SECRET``, ``MEDPLUM_TOKEN_LIFETIME``) turns on its
    OAuth2 token endpoint at ``/oauth2/token``."""
    node = _node()
    _ensure_node_modules(lock_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "MEDPLUM_TOKEN") and
           not k.startswith("MEDPLUM_CLIENT")}
    if token is not None:
        env["MEDPLUM_TOKEN"] = token  # through the environment, never on the command line
    env.update(oauth or {})
    with tempfile.TemporaryDirectory(prefix="medplum-interop-") as tmp:
        stderr_path = Path(tmp) / "server.stderr"
        with stderr_path.open("wb") as stderr:
            proc = subprocess.Popen(
                [node, str(SERVER_SCRIPT), "--port", "0"],
                cwd=HERE,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        try:
            port = _wait_for_port(proc, stderr_path)
            yield f"http://127.0.0.1:{port}{GRAPHQL_PATH}"
        finally:
            if proc.poll() is None:
                proc.terminate()  # SIGTERM to exactly this PID
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            assert proc.stdout is not None
            proc.stdout.close()


@pytest.fixture(scope="session")
def _interop_lock_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Under xdist getbasetemp() is per worker (.../popen-gwN); its parent is shared by all workers.
    return tmp_path_factory.getbasetemp().parent


@pytest.fixture(scope="session")
def medplum_url(_interop_lock_dir: Path) -> Iterator[str]:
    """GraphQL endpoint of a Medplum reference server without authentication."""
    with _run_server(_interop_lock_dir, token=None) as url:
        yield url


@pytest.fixture(scope="session")
def medplum_token() -> str:
    """The bearer token that the ``medplum_token_url`` server requires (random per session)."""
    return secrets.token_urlsafe(24)


@pytest.fixture(scope="session")
def medplum_token_url(_interop_lock_dir: Path, medplum_token: str) -> Iterator[str]:
    """GraphQL endpoint of a Medplum server that requires ``Authorization: Bearer <medplum_token>``."""
    with _run_server(_interop_lock_dir, token=medplum_token) as url:
        yield url


@pytest.fixture(scope="session")
def medplum_oauth(_interop_lock_dir: Path) -> Iterator[dict[str, str]]:
    """A Medplum server whose ``/fhir/R4/`` needs an OAuth2 token from its ``/oauth2/token`` (client
    credentials; tokens live 3 s): ``url`` (GraphQL), ``token_url``, ``base``, ``client_id``, ``secret``."""
    client_id, secret = "ingest-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    oauth = {"MEDPLUM_CLIENT_ID": client_id, "MEDPLUM_CLIENT_SECRET": secret, "MEDPLUM_TOKEN_LIFETIME": "3"}
    with _run_server(_interop_lock_dir, token=None, oauth=oauth) as url:
        base = url.split("/fhir/", 1)[0]
        yield {"url": url, "token_url": f"{base}/oauth2/token", "base": base, "client_id": client_id,
               "secret": secret}


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from each test alone, never from the INGEST_* environment of the shell."""
    for key in [k for k in os.environ if k.startswith("INGEST_")]:
        monkeypatch.delenv(key)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sink(medplum_url: str) -> AsyncIterator[GraphQLSink]:
    """A connected sink on the Medplum server, one per test module."""
    async with GraphQLSink(medplum_url, token_source=None, timeout_s=30) as s:
        yield s


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStateStore]:
    """A fresh SQLite state store per test."""
    with SQLiteStateStore(tmp_path / "state.sqlite3", node="interop") as opened:
        yield opened
