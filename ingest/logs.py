"""Logging setup for the command line (library modules only create loggers), and escaping of untrusted text.

Every log line and every line ``ingest`` prints on a terminal may carry text that came from outside: AE
titles, file and archive member names, DICOM values in a library's message, a backend's error text. Such
text can forge log lines (a ``\\n`` followed by a fake record) or drive the terminal (``ESC [``
sequences, bidi overrides that reorder what is shown). So:

- :func:`printable` escapes control characters for output: C0 (U+0000-U+001F), DEL, C1
  (U+0080-U+009F), the Unicode line and paragraph separators (U+2028, U+2029) and the bidi embedding,
  override and isolate controls (U+202A-U+202E, U+2066-U+2069), as ``\\n``, ``\\r``, ``\\t``, ``\\x1b``,
  ``\\u2028``. Use it for everything printed that is not a fixed string of ours; :func:`markup_safe`
  also escapes rich markup for text that goes into a rich table.
- The formatters :func:`setup_logging` installs (:class:`TextFormatter`, :class:`JSONFormatter`)
  escape the rendered line of *every* record, ours and third-party ones (pynetdicom, pydicom, aiohttp):
  one record is always one line. Tracebacks keep their line breaks; the exception messages in them and
  any other control character are escaped.
- Python warnings (pydicom's validation warnings quote element values, i.e. patient data) are routed
  through logging by :func:`setup_logging`: each kind (the message with its quoted values removed) is
  logged once at WARNING, the full text at DEBUG only. pydicom's own ``pydicom`` logger, which repeats
  those warnings, gets the same treatment. Processes forked after :func:`setup_logging` (the parsing
  pools of ``replay`` and the watcher) inherit both.
"""

from __future__ import annotations

import json
import logging
import logging.config
import re
import threading
import traceback
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TextIO, TypeAlias

__all__ = [
    "JSONFormatter",
    "TextFormatter",
    "markup_safe",
    "printable",
    "restore_warnings",
    "setup_logging",
    "warning_kind",
]

# Loggers of libraries that log request variables or dataset contents (PHI) below WARNING.
_NOISY = (
    "gql", "gql.transport", "gql.transport.aiohttp", "pynetdicom", "aiohttp.access", "watchfiles", "pydicom",
)

_TEXT_FORMAT: Final = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# --------------------------------------------------------------------------------------------------
# escaping
# --------------------------------------------------------------------------------------------------

_UNSAFE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """Text safe to write on one line of a log or a terminal.

    Parameters
    ----------
    text:
        Anything; non-strings are converted with ``str``.

    Returns
    -------
    str
        ``text`` with every C0 control character, DEL, C1 control character, U+2028/U+2029 and bidi
        embedding/override/isolate control (U+202A-U+202E, U+2066-U+2069) written as an escape:
        ``\\n``, ``\\r``, ``\\t``, else ``\\xHH`` (below U+0100) or ``\\uHHHH``. Everything else,
        backslashes included, is unchanged.
    """
    value = text if isinstance(text, str) else str(text)
    return _UNSAFE.sub(_escape_char, value)


def markup_safe(text: object) -> str:
    """:func:`printable` text, with rich markup (``[...]``) escaped too: for rich tables and consoles."""
    from rich.markup import escape

    return escape(printable(text))


def _escape_lines(text: str) -> str:
    """Escape control characters inside each line of a multi-line text; the line breaks stay."""
    return "\n".join(printable(line) for line in text.split("\n"))


_ExcInfo: TypeAlias = (
    "tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]"
)


def _escape_exception_messages(te: traceback.TracebackException) -> None:
    """Escape, in place, the messages and notes of ``te`` and of its causes, contexts and group members.

    A message with a line break would otherwise print as extra traceback lines that look like records.
    """
    todo = [te]
    seen: set[int] = set()
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        message = getattr(item, "_str", None)
        if isinstance(message, str):
            item._str = printable(message)  # type: ignore[attr-defined]
        notes = getattr(item, "__notes__", None)
        if isinstance(notes, list):
            item.__notes__ = [printable(n) if isinstance(n, str) else n for n in notes]
        for linked in (item.__cause__, item.__context__):
            if linked is not None:
                todo.append(linked)
        todo.extend(getattr(item, "exceptions", None) or ())


def _format_exception(ei: _ExcInfo) -> str:
    """A traceback as :class:`logging.Formatter` renders it, with untrusted text escaped.

    Each line keeps its line break; control characters inside lines, and line breaks inside exception
    messages and notes, are escaped with :func:`printable`.
    """
    exc = ei[1]
    if exc is None:
        return _escape_lines("".join(traceback.format_exception(*ei)).rstrip("\n"))
    te = traceback.TracebackException(type(exc), exc, ei[2])
    _escape_exception_messages(te)
    return _escape_lines("".join(te.format()).rstrip("\n"))


class TextFormatter(logging.Formatter):
    """The text format; every rendered line is escaped with :func:`printable`, tracebacks line by line."""

    def __init__(self, fmt: str | None = _TEXT_FORMAT, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        out = printable(self.formatMessage(record))
        # the traceback is rendered here every time: a cached exc_text may come from another formatter
        if record.exc_info:
            out += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            out += "\n" + _escape_lines(record.exc_text)
        if record.stack_info:
            out += "\n" + _escape_lines(self.formatStack(record.stack_info))
        return out

    def formatException(self, ei: Any) -> str:
        return _format_exception(ei)


#: Fields a log call may attach (``extra={"study_uid": uid}``): each becomes a key of the JSON line. They
#: hold UIDs, AE titles, source kinds and statuses, never patient data.
LOG_FIELDS: Final = ("study_uid", "ae", "source", "status", "instances", "seconds")


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception text), escaped as in text,
    plus the :data:`LOG_FIELDS` a call attached (``study_uid``, ``ae``, ``source``, ``status``...)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": printable(record.name),
            "message": printable(record.getMessage()),
        }
        for key in LOG_FIELDS:
            value = getattr(record, key, None)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = value
            elif value is not None:
                out[key] = printable(str(value))
        if record.exc_info:
            out["exc"] = _format_exception(record.exc_info)
        elif record.exc_text:
            out["exc"] = _escape_lines(record.exc_text)
        return json.dumps(out, ensure_ascii=False)


# --------------------------------------------------------------------------------------------------
# warnings and pydicom's logger
# --------------------------------------------------------------------------------------------------

WARNINGS_LOGGER: Final = logging.getLogger("py.warnings")

# quoted values (bytes reprs first), each from the first quote to the last of its kind: a value may
# contain the other quote, or its own
_QUOTED: Final = tuple(re.compile(p, re.DOTALL) for p in (r"\bb'.*'", r'\bb".*"', r"'.*'", r'".*"'))
_KIND_MAX_CHARS: Final = 160
_KINDS_MAX: Final = 4096


def warning_kind(message: str) -> str:
    """The kind of a warning or library log message: the text with quoted values removed.

    Parameters
    ----------
    message:
        E.g. ``"Invalid value for VR DA: '2024xx12'."`` (pydicom quotes the values it complains about).

    Returns
    -------
    str
        E.g. ``"Invalid value for VR DA"``: every ``'...'`` / ``"..."`` span (``b'...'`` too) removed,
        whitespace collapsed, trailing punctuation dropped, control characters escaped, at most 160
        characters. Safe to log at WARNING when the values were quoted.
    """
    text = message
    for pattern in _QUOTED:
        text = pattern.sub("", text)
    text = " ".join(text.split()).rstrip(" :;,.-=")
    text = printable(text)
    return text if len(text) <= _KIND_MAX_CHARS else text[: _KIND_MAX_CHARS - 3] + "..."


class _Kinds:
    """The warning kinds already logged at WARNING in this process (bounded; thread-safe)."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def first(self, key: tuple[str, str]) -> bool:
        """``True`` the first time ``key`` is seen (and always once the table is full)."""
        with self._lock:
            if key in self._seen:
                return False
            if len(self._seen) < _KINDS_MAX:
                self._seen.add(key)
            return True

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()


_KINDS: Final = _Kinds()
_ShowWarning: TypeAlias = Callable[..., None]
_original_showwarning: _ShowWarning | None = None


def _source(filename: str) -> str:
    """The package a warning was issued from (``pydicom``), from the file name of its frame."""
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            index = parts.index(marker)
            if index + 1 < len(parts):
                return Path(parts[index + 1]).stem
    if Path(__file__).parent in Path(filename).parents:
        return "ingest"
    return Path(filename).stem or "python"


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` while :func:`setup_logging` is in effect: once per kind at WARNING."""
    if file is not None and _original_showwarning is not None:  # an explicit target: not the log
        _original_showwarning(message, category, filename, lineno, file, line)
        return
    text = str(message)
    source = _source(filename)
    kind = warning_kind(text)
    if _KINDS.first((source, kind)):
        WARNINGS_LOGGER.warning(
            "%s: %s (%s; once per kind, values removed; full text at DEBUG)",
            source, kind, category.__name__,
        )
    WARNINGS_LOGGER.debug("%s: %s (%s at %s:%d)", source, text, category.__name__, filename, lineno)


class _LibraryValuesFilter(logging.Filter):
    """Handler filter: WARNING+ records of the ``pydicom`` loggers are logged as their kind, once each.

    pydicom logs each validation warning at WARNING before it warns, with the value quoted; the
    warning itself (with the value) reaches DEBUG through :func:`_show_warning`.
    """

    _PREFIXES: Final = ("pydicom",)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        name = record.name
        if not any(name == p or name.startswith(p + ".") for p in self._PREFIXES):
            return True
        kind = warning_kind(record.getMessage())
        if not _KINDS.first((name.split(".", 1)[0], kind)):
            return False
        record.msg, record.args = "%s (once per kind, values removed)", (kind,)
        record.exc_info, record.exc_text = None, None  # an exception text may quote values too
        return True


def _capture_warnings() -> None:
    global _original_showwarning
    if _original_showwarning is None:
        _original_showwarning = warnings.showwarning
    warnings.showwarning = _show_warning


def restore_warnings() -> None:
    """Undo the warnings routing of :func:`setup_logging` (tests) and forget the kinds seen."""
    global _original_showwarning
    if _original_showwarning is not None:
        if warnings.showwarning is _show_warning:
            warnings.showwarning = _original_showwarning
        _original_showwarning = None
    _KINDS.clear()


# --------------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------------


def setup_logging(level: str = "INFO", fmt: str = "text", verbosity: int = 0) -> None:
    """Configure the root logger for an ``ingest`` process and route Python warnings through it.

    Parameters
    ----------
    level:
        ``[log] level`` (``DEBUG``, ``INFO``, ...); an unknown name means ``INFO``.
    fmt:
        ``"json"`` for :class:`JSONFormatter`, anything else for :class:`TextFormatter`.
    verbosity:
        The ``-v`` count (negative for ``-q``): ``level`` lowered (raised) by one step per count.

    Notes
    -----
    Installs a ``warnings.showwarning`` hook (undone by :func:`restore_warnings`); warnings that the
    warnings filters turn into errors (pytest's ``filterwarnings = error``) still raise.
    """
    base = logging.getLevelName(level.upper()) if isinstance(logging.getLevelName(level.upper()), int) else 20
    effective = max(logging.DEBUG, min(logging.CRITICAL, base - 10 * verbosity))
    formatter: dict[str, Any] = {"()": JSONFormatter} if fmt == "json" else {"()": TextFormatter}
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"default": formatter},
            "filters": {"library_values": {"()": _LibraryValuesFilter}},
            "handlers": {
                "stderr": {
                    "class": "logging.StreamHandler",
                    "formatter": "default",
                    "filters": ["library_values"],
                    "stream": "ext://sys.stderr",
                }
            },
            "root": {"level": effective, "handlers": ["stderr"]},
            # Never below WARNING, whatever -v says: they log PHI (variables, datasets) at DEBUG/INFO.
            "loggers": {name: {"level": max(logging.WARNING, effective)} for name in _NOISY},
        }
    )
    _capture_warnings()
