"""The test suite of ``ingest``; it mirrors the package tree."""

import socket
import urllib.request
from pathlib import Path

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
