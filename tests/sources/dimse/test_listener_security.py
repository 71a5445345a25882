"""Listener security: association checks, TLS, PDU cap, deflate bomb, and defences before the AE check."""

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

from ingest.config import CallingAE
from ingest.sources.dimse.edge import PENDING_GRACE_S
from ingest.sources.dimse.status import STATUS_TABLE

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
from .raw_ul import CT_IMAGE as RAW_CT
from .raw_ul import (
    EXPLICIT_LE,
    IMPLICIT_LE,
    VERIFICATION,
    associate_rq,
    c_store_rq,
    closed_by_peer,
    p_data,
    parse_command,
    pdu,
    read_pdu,
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


# -- before the AE check: pending connections, A-ASSOCIATE-RQ deadline and size, raw-PDU validation --------


def _connect_from(source: str, port: int) -> socket.socket:
    """A TCP connection to the listener from a chosen loopback source address (127.0.0.0/8 is local)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _refused(run: Any, reason: str) -> float:
    return float(run.listener.metrics.connections_refused.labels(reason=reason)._value.get())


def _wait_until(predicate: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _no_traceback_or_raw_controls(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        text = record.getMessage()
        assert record.exc_info is None, text
        assert "Traceback" not in text
        assert not any(ch in text for ch in "\n\r\0\x1b\x07"), text
        assert not (record.name.startswith("pynetdicom") and record.levelno >= logging.ERROR), text


def test_silent_connections_do_not_lock_out_senders(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_associations=2, acse_timeout_s=30, associate_rq_timeout_s=30)
    with running_listener(settings) as run:
        silent = [_connect_from("127.0.0.2", run.port) for _ in range(3)]  # more than max_associations
        server = run.listener.server
        assert server is not None
        try:
            assert _wait_until(lambda: len(server.pending_ages("127.0.0.2")) == 3)  # all accepted
            ae = scu()
            ae.add_requested_context(Verification)
            first = ae.associate("127.0.0.1", run.port, ae_title="INGEST")
            assert first.is_established
            try:
                assert _rejection(run.port) is None  # the second of max_associations = 2
            finally:
                first.release()
        finally:
            for s in silent:
                s.close()


def test_silent_connections_hold_no_association_slot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    settings = make_settings(tmp_path, max_associations=2, acse_timeout_s=30, associate_rq_timeout_s=30)
    with running_listener(settings) as run:
        server = run.listener.server
        assert server is not None
        silent = [_connect_from("127.0.0.2", run.port) for _ in range(12)]
        try:
            # a burst of young connections is let in (up to twice max_pending_per_host = 8) ...
            assert _wait_until(lambda: server.pending == 12)
            assert not any(closed_by_peer(s, 0.01) for s in silent)
            # ... and once they have been silent for PENDING_GRACE_S, the sender's next connection
            # evicts the oldest down to the cap: 12 -> 7, plus the new one
            assert _wait_until(lambda: min(server.pending_ages("127.0.0.2")) >= PENDING_GRACE_S)
            silent.append(_connect_from("127.0.0.2", run.port))
            assert sum(closed_by_peer(s, 0.5) for s in silent[:5]) == 5
            assert _wait_until(lambda: server.pending == 8)
            assert _refused(run, "over_pending_per_host") == 5
            warned = "connection from 127.0.0.2 refused: too many"
            over_cap = [r for r in caplog.records if warned in r.getMessage()]
            assert len(over_cap) == 1  # one WARNING for the 5, not one per connection
            # legitimate senders from another address still associate, over max_associations times
            for _ in range(3):
                assert _rejection(run.port) is None
            if shutil.which("echoscu"):
                done = subprocess.run(
                    ["echoscu", "-aet", "TESTSCU", "-aec", "INGEST", "127.0.0.1", str(run.port)],
                    capture_output=True, timeout=15, check=False,
                )
                assert done.returncode == 0, done.stderr
            assert not any(closed_by_peer(s, 0.01) for s in silent[5:])  # still pending, not cut off
        finally:
            for s in silent:
                s.close()
        assert _wait_until(lambda: server.pending == 0)  # slots come back when the sockets close


def test_a_burst_of_associations_from_one_sender_is_never_cut(tmp_path: Path) -> None:
    """A router opening its associations at once: more connections than max_pending_per_host (8) are
    pending together, for milliseconds; none of them is closed, each gets its A-ASSOCIATE-AC."""
    settings = make_settings(tmp_path, max_associations=16)
    with running_listener(settings) as run:
        server = run.listener.server
        assert server is not None
        socks = [_connect_from("127.0.0.3", run.port) for _ in range(14)]
        try:
            assert _wait_until(lambda: server.pending == 14)  # all accepted, none has spoken yet
            for sock in socks:
                sock.sendall(associate_rq())
            answers = [read_pdu(sock) for sock in socks]
            assert [a[0] if a is not None else None for a in answers] == [0x02] * 14
            assert _refused(run, "over_pending_per_host") == 0
        finally:
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.sendall(pdu(0x05, b"\0" * 4))
                sock.close()
        # twice the cap at once is a burst no sender needs: the newest is closed unread
        flood = [_connect_from("127.0.0.4", run.port) for _ in range(17)]
        try:
            assert closed_by_peer(flood[-1], 2.0)
            assert _wait_until(lambda: server.pending == 16)
            assert _refused(run, "over_pending_per_host") == 1
        finally:
            for sock in flood:
                sock.close()


def test_pending_connections_are_capped_in_total(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_pending_connections=10, associate_rq_timeout_s=30)
    with running_listener(settings) as run:
        server = run.listener.server
        assert server is not None
        silent = [_connect_from("127.0.0.2", run.port) for _ in range(8)]
        silent += [_connect_from("127.0.0.3", run.port) for _ in range(2)]
        try:
            assert _wait_until(lambda: server.pending == 10)
            extra = _connect_from("127.0.0.4", run.port)
            silent.append(extra)
            assert closed_by_peer(extra, 1.0)
            assert _refused(run, "over_pending_total") == 1
        finally:
            for s in silent:
                s.close()
        assert _wait_until(lambda: server.pending == 0)
        assert _rejection(run.port) is None


def test_a_trickled_request_is_cut_off_at_its_deadline(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, associate_rq_timeout_s=1.5, acse_timeout_s=30, network_timeout_s=30)
    with running_listener(settings) as run:
        rq = associate_rq()
        with socket.create_connection(("127.0.0.1", run.port), timeout=5) as sock:
            started = time.monotonic()
            closed_at: float | None = None
            for byte in rq:  # one byte every 0.25 s: every single recv is far below any timeout
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    closed_at = time.monotonic()
                    break
                if closed_by_peer(sock, 0.25):
                    closed_at = time.monotonic()
                    break
            assert closed_at is not None
            assert 1.2 < closed_at - started < 3.0
        assert _refused(run, "rq_timeout") == 1
        assert _rejection(run.port) is None


def test_a_4_mib_request_is_closed_without_being_buffered(tmp_path: Path) -> None:
    with running_listener(make_settings(tmp_path, acse_timeout_s=30)) as run:
        with socket.create_connection(("127.0.0.1", run.port), timeout=5) as sock:
            # within max_peer_pdu (4 MiB), far over max_associate_rq_bytes (64 KiB)
            sock.sendall(struct.pack(">BBL", 0x01, 0, 4 * 1024 * 1024 - 6) + b"\0" * 1024)
            started = time.monotonic()
            assert closed_by_peer(sock, 2.0)
            assert time.monotonic() - started < 1.0
        assert _refused(run, "rq_too_large") == 1
        assert _rejection(run.port) is None


@pytest.mark.parametrize("bad", [b"TEST\nSCU", b"TEST\0SCU", b"\x1b[2JTESTSCU"])
def test_an_invalid_calling_ae_gets_a_clean_reject(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    with running_listener(make_settings(tmp_path, accept_any_calling_ae=True)) as run:
        with socket.create_connection(("127.0.0.1", run.port), timeout=5) as sock:
            sock.sendall(associate_rq(calling=bad))
            answer = read_pdu(sock)
        assert answer == (0x03, bytes([0, 1, 1, 3]))  # A-ASSOCIATE-RJ (1,1,3)
        with socket.create_connection(("127.0.0.1", run.port), timeout=5) as sock:
            sock.sendall(associate_rq(called=bad))
            assert read_pdu(sock) == (0x03, bytes([0, 1, 1, 7]))  # called AE invalid
        assert _rejection(run.port) is None
    _no_traceback_or_raw_controls(caplog)
    assert any(repr(bad.decode("latin-1"))[1:-1] in r.getMessage() for r in caplog.records)  # escaped


def test_an_even_presentation_context_id_gets_a_clean_reject(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with running_listener(make_settings(tmp_path)) as run:
        with socket.create_connection(("127.0.0.1", run.port), timeout=5) as sock:
            contexts = ((1, VERIFICATION, (IMPLICIT_LE,)), (2, RAW_CT, (IMPLICIT_LE,)))
            sock.sendall(associate_rq(contexts=contexts))
            assert read_pdu(sock) == (0x03, bytes([0, 1, 2, 1]))  # rejected-permanent, ACSE, no reason
        assert _refused(run, "even_context_id") == 1
        assert _rejection(run.port) is None
    _no_traceback_or_raw_controls(caplog)


def _raw_association(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(associate_rq(contexts=((1, RAW_CT, (EXPLICIT_LE,)),)))
    answer = read_pdu(sock)
    assert answer is not None and answer[0] == 0x02  # A-ASSOCIATE-AC
    return sock


def _status(rsp: tuple[int, bytes] | None) -> int:
    """The Status (0000,0900) of a single-PDV P-DATA-TF carrying a DIMSE response command."""
    assert rsp is not None and rsp[0] == 0x04
    item_len, _cx, control = struct.unpack_from(">LBB", rsp[1])
    assert control & 0x03 == 0x03  # command, last fragment
    (status,) = struct.unpack("<H", parse_command(rsp[1][6 : 4 + item_len])[0x0900])
    return int(status)


def test_an_over_long_command_uid_gets_a_clean_failure_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sop = "1.2.3.4.9.3"
    data = encode(instance(sop, "1.2.3.4.9.1", "1.2.3.4.9.2"))
    long_uid = (sop + "." + "7" * 70).encode()
    with running_listener(make_settings(tmp_path)) as run:
        sock = _raw_association(run.port)
        try:
            sock.sendall(p_data((1, 0x03, c_store_rq(RAW_CT, long_uid))) + p_data((1, 0x02, data)))
            status = _status(read_pdu(sock))
            assert status in (STATUS_TABLE["uid_mismatch"].status, STATUS_TABLE["invalid_uid"].status)
            # the association goes on: a valid C-STORE on it is stored
            sock.sendall(p_data((1, 0x03, c_store_rq(RAW_CT, sop.encode(), 2))) + p_data((1, 0x02, data)))
            assert _status(read_pdu(sock)) == 0x0000
            sock.sendall(pdu(0x05, b"\0" * 4))  # A-RELEASE-RQ
            assert read_pdu(sock) == (0x06, b"\0" * 4)
        finally:
            sock.close()
        assert [s.study_uid for s in run.store.studies()] == ["1.2.3.4.9.1"]
    _no_traceback_or_raw_controls(caplog)


def test_an_over_long_uid_in_a_fragmented_command_is_aborted_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    cmd = c_store_rq(RAW_CT, b"1.2." + b"5" * 70)
    with running_listener(make_settings(tmp_path)) as run:
        sock = _raw_association(run.port)
        try:
            sock.sendall(p_data((1, 0x01, cmd[:40])) + p_data((1, 0x03, cmd[40:])))
            assert read_pdu(sock) == (0x07, bytes([0, 0, 2, 6]))  # A-ABORT, provider, invalid parameter
            assert closed_by_peer(sock, 2.0)
        finally:
            sock.close()
        assert _rejection(run.port) is None
    _no_traceback_or_raw_controls(caplog)
