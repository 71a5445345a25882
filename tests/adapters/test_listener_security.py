"""Listener security: association checks, TLS (mutual, refused, silent clients), PDU cap, deflate bomb."""

from __future__ import annotations

import contextlib
import gc
import logging
import resource
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from ingest.adapters.listener import STATUS_TABLE
from ingest.config import CallingAE

from .listener_helpers import (
    CT_IMAGE,
    encode,
    instance,
    make_settings,
    raw_file,
    running_listener,
    scu,
    send_raw,
)


def _rejection(port: int, calling: str = "TESTSCU", called: str = "INGEST") -> tuple[int, int, int] | None:
    ae = scu(calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if assoc.is_established:
        assoc.release()
        return None
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    return (rj.result, rj.result_source, rj.diagnostic)


def test_unknown_calling_ae_and_wrong_called_ae_are_rejected(tmp_path: Path) -> None:
    with running_listener(make_settings(tmp_path)) as run:
        assert _rejection(run.port, calling="STRANGER") == (1, 1, 3)
        assert _rejection(run.port, called="SOMEONE") == (1, 1, 7)
        assert _rejection(run.port) is None


def test_calling_ae_pinned_to_another_host_is_rejected(tmp_path: Path) -> None:
    pinned = (CallingAE(ae="TESTSCU", host="10.9.9.9"),)
    with running_listener(make_settings(tmp_path, allowed_calling_aes=pinned)) as run:
        assert _rejection(run.port) == (1, 1, 3)
    ok = (CallingAE(ae="TESTSCU", host="127.0.0.1"),)
    with running_listener(make_settings(tmp_path, allowed_calling_aes=ok)) as run:
        assert _rejection(run.port) is None


def test_over_the_association_limit_is_rejected(tmp_path: Path) -> None:
    with running_listener(make_settings(tmp_path, max_associations=1)) as run:
        ae = scu()
        ae.add_requested_context(Verification)
        first = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
        assert first.is_established
        try:
            assert _rejection(run.port) == (2, 3, 2)
        finally:
            first.release()
        deadline = time.monotonic() + 5
        while _rejection(run.port) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _rejection(run.port) is None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_huge_declared_pdu_is_cut_off_with_bounded_memory(tmp_path: Path) -> None:
    with running_listener(make_settings(tmp_path)) as run:
        before = _peak_rss_mb()
        with socket.create_connection(("127.0.0.1", run.port), timeout=5) as sock:
            # A-ASSOCIATE-RQ header declaring 256 MiB, then a trickle of bytes
            sock.sendall(struct.pack(">BBL", 0x01, 0, 256 * 1024 * 1024) + b"\0" * 1024)
            sock.settimeout(5)
            try:
                closed = sock.recv(1) == b""
            except ConnectionResetError:
                closed = True
        assert closed
        assert _peak_rss_mb() - before < 64
        assert _rejection(run.port) is None  # the listener still serves


def test_deflate_bomb_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    head = encode(instance("1.2.3.4.7.3"))
    bomb_plain = head + b"\x09\x00\x10\x00UN\0\0" + struct.pack("<L", 200 * 1024 * 1024)  # (0009,0010)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(bomb_plain)]
    zeros = b"\0" * (1024 * 1024)
    for _ in range(200):
        parts.append(comp.compress(zeros))
    parts.append(comp.flush())
    body = b"".join(parts)
    assert len(body) < 1024 * 1024
    path = raw_file(
        tmp_path / "raw", body, sop_class=CT_IMAGE, sop_uid="1.2.3.4.7.3", ts=DeflatedExplicitVRLittleEndian
    )
    settings = make_settings(tmp_path / "data", max_inflated_bytes=8 * 1024 * 1024)
    with running_listener(settings) as run:
        before = _peak_rss_mb()
        rsp = send_raw(run.port, path, ts=DeflatedExplicitVRLittleEndian)
        assert rsp.Status in (0xA700, STATUS_TABLE["inflate_cap"].status)
        assert _peak_rss_mb() - before < 64
        assert run.store.studies() == []


# -- TLS ---------------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        cwd=d,
    )


def _leaf(d: Path, name: str, ca: str, san: str | None = None) -> None:
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=d,
    )
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.crt",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.crt",
        "-days",
        "2",
        "-extfile",
        ext.name,
        cwd=d,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not found")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue")
    _leaf(d, "server", "ca", san="IP:127.0.0.1")
    _leaf(d, "client", "ca")
    _leaf(d, "intruder", "rogue")
    return d


def _tls_settings(tmp_path: Path, pki: Path) -> object:
    return make_settings(
        tmp_path,
        tls={
            "enabled": True,
            "cert": pki / "server.crt",
            "key": pki / "server.key",
            "ca": pki / "ca.crt",
            "require_client_cert": True,
            "handshake_timeout_s": 2,
        },
    )


def _client_ctx(pki: Path, cert: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    return ctx


@contextlib.contextmanager
def _quiet_client_transport() -> Iterator[None]:
    """Keep pynetdicom's SCU from logging the expected refused handshakes as errors with tracebacks."""
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _tls_echo(port: int, ctx: ssl.SSLContext) -> bool:
    ae = scu()
    ae.add_requested_context(Verification)
    with _quiet_client_transport():
        assoc = ae.associate("127.0.0.1", port, ae_title="INGEST", tls_args=(ctx, "127.0.0.1"))
    if not assoc.is_established:
        _close_client_socket(assoc)
        return False
    ok = bool(assoc.send_c_echo().Status == 0x0000)
    assoc.release()
    _close_client_socket(assoc)
    return ok


def _close_client_socket(assoc: Any) -> None:
    """Close the SCU's SSL socket once its threads are done.

    pynetdicom's client closes a socket only when ``shutdown()`` succeeded; an SSL socket whose peer went
    first stays open until the garbage collector finds it, and its ResourceWarning would surface in
    whichever test runs next.
    """
    for thread in (assoc, assoc.dul):
        if thread.is_alive():
            thread.join(5)
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.close()
    gc.collect()


# pynetdicom's SCU leaks its SSLSocket when the server refuses the handshake (transport.py
# ``_shutdown_socket``: ``shutdown()`` raises, so ``close()`` never runs): client side, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_mutual_tls_happy_path_and_refusals(tmp_path: Path, pki: Path) -> None:
    with running_listener(_tls_settings(tmp_path, pki)) as run:  # type: ignore[arg-type]
        assert _tls_echo(run.port, _client_ctx(pki, "client"))
        assert not _tls_echo(run.port, _client_ctx(pki, "intruder"))  # untrusted client certificate
        assert not _tls_echo(run.port, _client_ctx(pki, None))  # no client certificate
        # plain DICOM on the TLS port
        assert _rejection_plain(run.port)
        assert run.listener.server is not None and run.listener.server.handshake_failures >= 3
    gc.collect()  # the leaked client sockets are reported here, under this test's filter


def _rejection_plain(port: int) -> bool:
    ae = scu()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="INGEST")
    return not assoc.is_established


def test_silent_tls_client_does_not_delay_a_legitimate_one(tmp_path: Path, pki: Path) -> None:
    with running_listener(_tls_settings(tmp_path, pki)) as run:  # type: ignore[arg-type]
        silent = socket.create_connection(("127.0.0.1", run.port))
        try:
            started = time.monotonic()
            ok: list[bool] = []
            t = threading.Thread(target=lambda: ok.append(_tls_echo(run.port, _client_ctx(pki, "client"))))
            t.start()
            t.join(10)
            assert ok == [True]
            assert time.monotonic() - started < 1.5  # well below the 2 s handshake timeout
        finally:
            silent.close()
