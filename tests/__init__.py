"""The test suite of ``ingest``; it mirrors the package tree."""

import itertools
import os
import random
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The repository root and the checked-in test fixtures, wherever a test module sits.
REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"

#: An HTTP opener that ignores ``http_proxy``/``https_proxy``: the tests talk to 127.0.0.1 only.
LOOPBACK_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux ``ip_local_port_range``)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_slice() -> range:
    """The ports this test process hands out: below the ephemeral range, where no outgoing connection of
    any process takes its source port, and a slice of its own per pytest-xdist worker."""
    low, high = 20000, _ephemeral_low()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    span = (high - low) // count
    return range(low + index * span, low + (index + 1) * span)


_SLICE = _port_slice()
_TURN = itertools.count(random.randrange(len(_SLICE)) if len(_SLICE) > 0 else 0)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all held open while choosing).

    Taken in turn from this process's slice of the ports below the kernel's ephemeral range
    (:func:`_port_slice`), so a port chosen here and bound a moment later by a server under test is not
    taken meanwhile as the source port of some outgoing connection, nor handed to another worker; the
    OS chooses when that slice is too small.
    """
    socks: list[socket.socket] = []
    try:
        if len(_SLICE) >= 64:
            tried = 0
            while len(socks) < n and tried < len(_SLICE):
                port = _SLICE[next(_TURN) % len(_SLICE)]
                tried += 1
                sock = socket.socket()
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    sock.close()
                    continue
                socks.append(sock)
        while len(socks) < n:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_until(check: Callable[[], Any], timeout: float, what: str, *, every: float = 0.05) -> Any:
    """Call ``check`` until it returns something truthy, and return that; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what}")
        time.sleep(every)
