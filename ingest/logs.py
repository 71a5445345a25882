"""Logging setup for the command line (library modules only create loggers)."""

from __future__ import annotations

import json
import logging
import logging.config
from datetime import UTC, datetime
from typing import Any

__all__ = ["JSONFormatter", "setup_logging"]

# Loggers of libraries that log request variables or dataset contents (PHI) below WARNING.
_NOISY = ("gql", "gql.transport", "gql.transport.aiohttp", "pynetdicom", "aiohttp.access", "watchfiles")


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception text)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "text", verbosity: int = 0) -> None:
    """Configure the root logger; ``verbosity`` (-v count, negative for -q) adjusts ``level``."""
    base = logging.getLevelName(level.upper()) if isinstance(logging.getLevelName(level.upper()), int) else 20
    effective = max(logging.DEBUG, min(logging.CRITICAL, base - 10 * verbosity))
    formatter: dict[str, Any] = (
        {"()": JSONFormatter}
        if fmt == "json"
        else {"format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s"}
    )
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"default": formatter},
            "handlers": {
                "stderr": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
            },
            "root": {"level": effective, "handlers": ["stderr"]},
            # Never below WARNING, whatever -v says: they log PHI (variables, datasets) at DEBUG/INFO.
            "loggers": {name: {"level": max(logging.WARNING, effective)} for name in _NOISY},
        }
    )
