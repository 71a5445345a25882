"""Set-up mistakes end in one line naming the setting, exit 1, nothing bound (``ingest.app.preflight``).

Each case runs a real ``ingest serve`` (or ``ingest check-config``) as a user would.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from tests import free_ports, wait_until

pytestmark = pytest.mark.timeout(120)


def _env(ports: list[int], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    listener, admin, backend = ports
    env.update(INGEST_LISTENER__PORT=str(listener), INGEST_ADMIN__PORT=str(admin),
               INGEST_EMBEDDED_BACKEND__PORT=str(backend), **extra)
    return env


def _run(tmp: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "ingest", "--data-dir", str(tmp / "data"), *args],
                          cwd=work, env=env, capture_output=True, text=True, timeout=100)


def _bound(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("which", ["listener", "admin", "embedded_backend"])
def test_a_port_in_use_is_named_and_nothing_else_is_bound(tmp_path: Path, which: str) -> None:
    ports = free_ports(3)
    taken = dict(zip(["listener", "admin", "embedded_backend"], ports, strict=True))[which]
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        done = _run(tmp_path, _env(ports), "serve")
        others = [p for p in ports if p != taken]
        assert not any(_bound(p) for p in others)  # refused before anything was bound
    assert done.returncode == 1, done.stderr
    assert f"cannot start: [{which}] port {taken} on 127.0.0.1: cannot listen: in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_and_non_pem_tls_files_are_named(tmp_path: Path) -> None:
    not_pem = tmp_path / "key.pem"
    not_pem.write_text("not a key\n")
    env = _env(free_ports(3), INGEST_LISTENER__TLS__ENABLED="true",
               INGEST_LISTENER__TLS__CERT=str(tmp_path / "missing.pem"),
               INGEST_LISTENER__TLS__KEY=str(not_pem))
    done = _run(tmp_path, env, "serve")
    assert done.returncode == 1
    assert f"[listener.tls] cert {tmp_path / 'missing.pem'}: no such file" in done.stderr
    assert "Traceback" not in done.stderr
    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    env["INGEST_LISTENER__TLS__CERT"] = str(tmp_path / "cert.pem")
    done = _run(tmp_path, env, "serve")
    assert done.returncode == 1
    assert "not a PEM certificate and its private key" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_ca_bundle_the_listener_would_refuse_is_named_before_anything_binds(tmp_path: Path) -> None:
    """A good certificate and key with a CA bundle that is not PEM: refused by the preflight (with the
    other problems, before any port is bound), not by the listener after the store and the backend
    have started."""
    ca = trustme.CA(organization_name="ingest preflight test CA")
    leaf = ca.issue_cert("127.0.0.1")
    cert, key, bundle = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    bundle.write_text("garbage, not a certificate\n")
    ports = free_ports(3)
    env = _env(ports, INGEST_LISTENER__TLS__ENABLED="true", INGEST_LISTENER__TLS__CERT=str(cert),
               INGEST_LISTENER__TLS__KEY=str(key), INGEST_LISTENER__TLS__CA=str(bundle))
    done = _run(tmp_path, env, "serve")
    assert done.returncode == 1, done.stderr
    assert f"cannot start: [listener.tls] ca {bundle}: not a PEM CA bundle" in done.stderr
    assert "Traceback" not in done.stderr
    assert not any(_bound(p) for p in ports)
    assert not (tmp_path / "data" / "state.sqlite3").exists()  # refused before the store was opened

    ca.cert_pem.write_to_path(str(bundle))  # a real bundle passes; this run stops at a port in use
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", ports[0]))
        blocker.listen()
        done = _run(tmp_path, env, "serve")
    assert done.returncode == 1, done.stderr
    assert f"[listener] port {ports[0]} on 127.0.0.1: cannot listen: in use" in done.stderr
    assert "[listener.tls]" not in done.stderr


def test_a_second_service_on_one_data_dir_is_refused(tmp_path: Path) -> None:
    first_ports = free_ports(3)
    work = tmp_path / "work"
    work.mkdir()
    log = tmp_path / "first.log"
    with log.open("ab") as out:
        first = subprocess.Popen(
            [sys.executable, "-m", "ingest", "--data-dir", str(tmp_path / "data"), "serve"],
            cwd=work, env=_env(first_ports), stdout=out, stderr=out,
        )
    try:
        wait_until(lambda: _bound(first_ports[0]) or first.poll() is not None, 120,
                   "the first service's listener")
        assert first.poll() is None, log.read_text()
        done = _run(tmp_path, _env(free_ports(3)), "serve")
        assert done.returncode == 1
        assert "is in use by a running ingest: refusing to start" in done.stderr
        assert "Traceback" not in done.stderr
        check = _run(tmp_path, _env(free_ports(3)), "check-config")
        assert check.returncode == 1
        assert f"in use by a running ingest (pid {first.pid})" in check.stderr
    finally:
        first.terminate()
        first.wait(timeout=60)


def test_unknown_environment_names_and_bad_urls_are_refused(tmp_path: Path) -> None:
    done = _run(tmp_path, _env(free_ports(3), INGEST_LISTENR__PORT="1"), "status")
    assert done.returncode == 1
    assert "INGEST_LISTENR__PORT names no setting (did you mean INGEST_LISTENER__PORT?)" in done.stderr
    done = _run(tmp_path, _env(free_ports(3), INGEST_BACKEND__URL="ftp://x/y"), "status")
    assert done.returncode == 1
    assert "[backend] url 'ftp://x/y' is not an http(s) URL" in done.stderr


def test_check_config_prints_settings_masked_and_exits_0_when_all_is_well(tmp_path: Path) -> None:
    env = _env(free_ports(3), INGEST_STATE__URL="postgresql://ingest:hunter2@127.0.0.1:1/ingest")
    done = _run(tmp_path, env, "check-config")
    assert done.returncode == 0, done.stderr
    assert '"url": "postgresql://ingest:***@127.0.0.1:1/ingest"' in done.stdout
    assert "hunter2" not in done.stdout + done.stderr
    assert "no problems found" in done.stderr
    # the first line names the settings file (here: none) and the data dir
    first = done.stderr.splitlines()[0]
    assert "ingest check-config: settings built-in defaults, data dir" in first
    assert str((tmp_path / "data").resolve()) in first
