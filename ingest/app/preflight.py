"""Checks made before anything binds or opens: every port, file and secret the settings name.

Each problem is one line naming the setting and its value (README "Configuration"), so a mistake in a
set-up ends in a sentence, not a traceback. ``ingest check-config`` prints them all; ``ingest serve``
and ``ingest watch`` refuse to start (exit 1) on the first run of them, before the listener, the admin
page or the embedded backend is bound.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from pathlib import Path

from ingest.config import Settings
from ingest.errors import ConfigError
from ingest.logs import printable

__all__ = ["file_problems", "port_problems", "problems"]


def _file_problem(key: str, path: Path | None) -> str | None:
    if path is None:
        return None
    shown = printable(str(path))
    if not path.exists():
        return f"{key} {shown}: no such file"
    if not path.is_file():
        return f"{key} {shown}: not a regular file"
    if not os.access(path, os.R_OK):
        return f"{key} {shown}: not readable by this user"
    return None


def file_problems(settings: Settings) -> list[str]:
    """Missing or unusable files and secrets named by the settings."""
    found: list[str] = []
    tls = settings.listener.tls
    checks: list[tuple[str, Path | None]] = [
        ("[backend] ca", settings.backend.ca),
        ("[backend] schema", settings.backend.schema_file),
        ("[backend] token_file", settings.backend.token_file),
        ("[backend] client_secret_file", settings.backend.client_secret_file),
        ("[admin] token_file", settings.admin.token_file),
    ]
    if tls.enabled and settings.listener.enabled:
        checks += [("[listener.tls] cert", tls.cert), ("[listener.tls] key", tls.key),
                   ("[listener.tls] ca", tls.ca)]
    for key, path in checks:
        problem = _file_problem(key, path)
        if problem:
            found.append(problem)
    if tls.enabled and settings.listener.enabled and not any(p.startswith("[listener.tls]") for p in found):
        # the listener's own context, built once here to check it: what it would refuse (certificate, key,
        # CA bundle) is named before anything binds
        from ingest.sources.dimse.associate import tls_context

        try:
            tls_context(tls)
        except ConfigError as exc:
            found.append(str(exc))
    if settings.backend.ca is not None and not any(p.startswith("[backend] ca") for p in found):
        try:
            ssl.create_default_context(cafile=str(settings.backend.ca))
        except (ssl.SSLError, OSError, ValueError) as exc:
            found.append(f"[backend] ca {printable(str(settings.backend.ca))}: not a PEM CA bundle "
                         f"({printable(getattr(exc, 'reason', None) or exc)})")
    secret_env = settings.backend.client_secret_env if settings.backend.url else None
    named = [("[admin] token_env", settings.admin.token_env if settings.admin.enabled else None),
             ("[backend] client_secret_env", secret_env)]
    if not settings.backend.url:
        named.append(("[embedded_backend] token_env", settings.embedded_backend.token_env))
    for key, name in named:
        if name and not os.environ.get(name):
            found.append(f"{key} names {printable(name)}, which is not set (an unset token never opens "
                         "the page or backend to everyone)")
    return found


def _bind_problem(key: str, host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                why = "in use by another process (another ingest, or another DICOM/HTTP server?)"
            elif exc.errno == errno.EACCES:
                why = "not allowed for this user (ports below 1024 need privileges or a capability)"
            elif exc.errno == errno.EADDRNOTAVAIL:
                why = "the address is not one of this machine's"
            else:
                why = printable(exc.strerror or exc)
            return f"{key} {port} on {printable(host)}: cannot listen: {why}"
    return None


def port_problems(settings: Settings, *, command: str = "serve") -> list[str]:
    """Ports the command would listen on that cannot be bound now."""
    wanted: list[tuple[str, str, int]] = []
    if command == "serve" and settings.listener.enabled:
        wanted.append(("[listener] port", settings.listener.host, settings.listener.port))
    if command in ("serve", "watch") and settings.admin.enabled:
        wanted.append(("[admin] port", settings.admin.host, settings.admin.port))
    if command in ("serve", "watch", "backend") and not settings.backend.url:
        wanted.append(("[embedded_backend] port", settings.embedded_backend.host,
                       settings.embedded_backend.port))
    found: list[str] = []
    for key, host, port in wanted:
        if port == 0:
            continue
        problem = _bind_problem(key, host, port)
        if problem:
            found.append(problem)
    return found


def problems(settings: Settings, *, command: str = "serve") -> list[str]:
    """Everything :func:`file_problems` and :func:`port_problems` find, files first."""
    return file_problems(settings) + port_problems(settings, command=command)
