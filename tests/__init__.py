"""The test suite of ``ingest``; it mirrors the package tree."""

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


def free_ports(n: int) -> list[int]:
    """``n`` distinct OS-chosen loopback ports (all held open while choosing)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
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
