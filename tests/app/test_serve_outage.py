"""Backend outages heal themselves (README "Where data goes", docs/reliability.md): a real ``ingest serve``
whose backend (a real ``ingest backend`` process) goes away while studies arrive, and ``ingest replay``
against a backend that does not answer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from samples.generate import generate
from tests import LOOPBACK_HTTP, free_ports, wait_until

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed"),
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update(extra)
    return env


@contextmanager
def _backend(data: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``ingest backend`` on ``port`` over ``data``'s database; ended (by its PID) on leaving."""
    data.mkdir(parents=True, exist_ok=True)
    log = (data / "backend.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "ingest", "--data-dir", str(data), "backend",
                             "--port", str(port)], env=_env(), stdout=log, stderr=log)
    try:
        wait_until(lambda: _answers(port) or proc.poll() is not None, 60, "ingest backend to listen")
        assert proc.poll() is None, (data / "backend.log").read_text()
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        log.close()


def _answers(port: int) -> bool:
    try:
        with LOOPBACK_HTTP.open(f"http://127.0.0.1:{port}/healthz", timeout=2):
            return True
    except OSError:
        return False


def _status(data: Path) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-m", "ingest", "-q", "--data-dir", str(data), "status", "--json"],
                          env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def _health(port: int) -> dict[str, object]:
    try:
        with LOOPBACK_HTTP.open(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return dict(json.load(answer))
    except OSError as exc:  # 503 still carries the JSON
        body = getattr(exc, "read", lambda: b"{}")()
        return dict(json.loads(body or b"{}"))


def test_a_backend_down_past_the_attempt_limit_dead_letters_nothing_and_heals_at_once(tmp_path: Path) -> None:
    dicom, admin, backend_port = free_ports(3)
    corpus = generate(tmp_path / "corpus", studies=1, files=3, seed=5, tiny=True)
    backend_data = tmp_path / "backend"
    env = _env(
        INGEST_BACKEND__URL=f"http://127.0.0.1:{backend_port}/fhir/R4/$graphql", INGEST_BACKEND__TOKEN_ENV="",
        INGEST_LISTENER__PORT=str(dicom), INGEST_ADMIN__PORT=str(admin),
        INGEST_LISTENER__ACCEPT_ANY_CALLING_AE="true", INGEST_RELAY__STABLE_AGE_S="0.5",
        INGEST_RELAY__RELEASE_GRACE_S="0.2", INGEST_RELAY__POLL_INTERVAL_S="0.1",
        # two attempts used to be the end: dead-lettered; and a retry waits up to 60 s without the probe
        INGEST_RELAY__MAX_ATTEMPTS="2", INGEST_RELAY__BASE_BACKOFF_S="0.2", INGEST_RELAY__MAX_BACKOFF_S="60",
        INGEST_BACKEND__TIMEOUT_S="2",
    )
    serve = None
    data = tmp_path / "data"
    log = tmp_path / "serve.log"
    try:
        with _backend(backend_data, backend_port):
            with log.open("ab") as out:
                serve = subprocess.Popen([sys.executable, "-m", "ingest", "--data-dir", str(data), "serve"],
                                         env=env, stdout=out, stderr=out)
            wait_until(lambda: _health(admin).get("backend") == "ok", 60, "serve connected to the backend")
        # the backend is gone; a study arrives and its pushes fail past max_attempts
        sent = subprocess.run(["storescu", "-aec", "INGEST", "+sd", "+r", "127.0.0.1", str(dicom),
                               str(corpus.root)], capture_output=True, timeout=60)
        assert sent.returncode == 0, sent.stderr

        def failed_often() -> bool:
            studies = _status(data)["studies"]
            assert isinstance(studies, list)
            return bool(studies) and all(s["attempts"] >= 3 for s in studies)

        wait_until(failed_often, 120, "three failed pushes")
        assert _status(data)["counts"] == {"pending": 1, "pushed": 0, "dead": 0}  # never dead-lettered
        assert str(_health(admin).get("backend", "")).startswith("failing")
        # the backend is back: pushed within seconds, not after the study's own 60 s backoff
        with _backend(backend_data, backend_port):
            wait_until(lambda: _status(data)["counts"] == {"pending": 0, "pushed": 1, "dead": 0}, 20,
                       "the study pushed once the backend answers again")
            wait_until(lambda: _health(admin).get("backend") == "ok", 10, "/healthz backend ok again")
    finally:
        if serve is not None and serve.poll() is None:
            serve.terminate()
            serve.wait(timeout=60)
    assert "dead-lettered" not in log.read_text()


def test_replay_against_a_backend_that_does_not_answer_leaves_studies_pending_exit_3(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    corpus = generate(tmp_path / "corpus", studies=2, files=2, seed=6, tiny=True)
    env = _env(INGEST_BACKEND__URL=f"http://127.0.0.1:{port}/fhir/R4/$graphql", INGEST_BACKEND__TOKEN_ENV="",
               INGEST_RELAY__BASE_BACKOFF_S="0.1", INGEST_RELAY__MAX_BACKOFF_S="0.5")
    data = tmp_path / "data"
    command = [sys.executable, "-m", "ingest", "--data-dir", str(data), "replay", str(corpus.root)]
    done = subprocess.run([*command, "--wait-backend", "3s"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3, done.stderr
    assert "2 studies left pending: the backend did not answer within --wait-backend 3s" in done.stderr
    assert "ssl:default" not in done.stderr
    assert f"cannot connect to 127.0.0.1:{port} (" in done.stderr
    assert _status(data)["counts"] == {"pending": 2, "pushed": 0, "dead": 0}
    # a later replay, with the backend up, pushes them
    with _backend(tmp_path / "backend", port):
        again = subprocess.run([sys.executable, "-m", "ingest", "--data-dir", str(data), "replay",
                                str(corpus.root)], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert _status(data)["counts"] == {"pending": 0, "pushed": 2, "dead": 0}


def test_ctrl_c_says_what_was_stored_and_a_rerun_goes_on(tmp_path: Path) -> None:
    import signal

    (port,) = free_ports(1)
    corpus = generate(tmp_path / "corpus", studies=2, files=3, seed=7, tiny=True)
    for path in corpus.paths():  # written a minute ago (a file written within 2 s is always read again)
        os.utime(path, (path.stat().st_mtime - 60, path.stat().st_mtime - 60))
    env = _env(INGEST_BACKEND__URL=f"http://127.0.0.1:{port}/fhir/R4/$graphql", INGEST_BACKEND__TOKEN_ENV="",
               INGEST_RELAY__BASE_BACKOFF_S="0.1", INGEST_RELAY__MAX_BACKOFF_S="0.5")
    data = tmp_path / "data"
    err = tmp_path / "replay.err"
    with err.open("wb") as out:
        command = [sys.executable, "-m", "ingest", "--data-dir", str(data), "replay", str(corpus.root)]
        proc = subprocess.Popen([*command, "--wait-backend", "5m"], env=env, stdout=subprocess.DEVNULL,
                                stderr=out)
    try:
        # every file is read and stored; the replay waits for the backend: the user presses Ctrl-C
        wait_until(lambda: "backend unreachable at start" in err.read_text(), 60, "the replay waiting")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err.read_text()
    assert code == 130, text
    assert ("interrupted after 3 file(s): 3 new instance(s) were stored; run the same command again to go on"
            in text), text
    with _backend(tmp_path / "backend", port):
        again = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["files_unchanged"] == 3 and summary["studies"]["created"] == 2
