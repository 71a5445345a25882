"""Log and terminal output: escaped untrusted text, one line per record, warnings through logging."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingest.logs import (
    JSONFormatter,
    TextFormatter,
    markup_safe,
    printable,
    restore_warnings,
    setup_logging,
    warning_kind,
)
from tests import REPO

FORGED = "AE\nFORGED 2026-01-01 00:00:00,000 ERROR ingest: fake\x1b[31m"


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """Let a test call :func:`setup_logging`; puts the root logger, library levels and warnings back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ("pydicom", "pynetdicom", "py.warnings", "gql", "gql.transport", "gql.transport.aiohttp",
             "aiohttp.access", "watchfiles")
    levels = {name: logging.getLogger(name).level for name in names}
    showwarning = warnings.showwarning
    try:
        yield
    finally:
        restore_warnings()
        warnings.showwarning = showwarning
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        for name, lvl in levels.items():
            logging.getLogger(name).setLevel(lvl)


def _record(msg: str, *args: object, name: str = "pynetdicom.assoc", exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad value\nFORGED line \x1b[2J")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, exc_info)


# -- printable ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a\nb", "a\\nb"),
        ("a\rb\tc", "a\\rb\\tc"),
        ("\x00\x01\x1b[31m", "\\x00\\x01\\x1b[31m"),
        ("del\x7f", "del\\x7f"),
        ("c1\x85\x9b", "c1\\x85\\x9b"),
        ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
        ("bidi\u202etxt.exe\u202a\u2066\u2069", "bidi\\u202etxt.exe\\u202a\\u2066\\u2069"),
    ],
)
def test_printable_escapes_controls_separators_and_bidi(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_printable_keeps_ordinary_text() -> None:
    text = "Müller^Jürgen 山田^太郎 C:\\dicom\\x [red]é€"
    assert printable(text) == text
    assert printable(42) == "42"


def test_markup_safe_shows_rich_markup_and_controls_literally() -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("x")
    table.add_row(markup_safe("[bold red]evil[/]\x1b[31m"))
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(table)
    assert "[bold red]evil[/]\\x1b[31m" in out.getvalue()
    assert "\x1b" not in out.getvalue()


# -- formatters -----------------------------------------------------------------------------------------


def test_text_formatter_renders_a_forged_argument_on_one_line() -> None:
    line = TextFormatter().format(_record("Association request from %r / %s", FORGED, FORGED))
    assert "\n" not in line and "\x1b" not in line
    assert "AE\\nFORGED 2026-01-01" in line
    assert "fake\\x1b[31m" in line
    shown = "AE\\nFORGED 2026-01-01 00:00:00,000 ERROR ingest: fake\\x1b[31m"
    assert line.endswith(f"ERROR   pynetdicom.assoc: Association request from '{shown}' / {shown}")


def test_text_formatter_escapes_the_message_itself() -> None:
    line = TextFormatter().format(_record("calling AE " + FORGED + "\u2028x"))
    assert line.count("\n") == 0 and "\u2028" not in line
    assert line.endswith("calling AE AE\\nFORGED 2026-01-01 00:00:00,000 ERROR ingest: fake\\x1b[31m\\u2028x")


def test_traceback_keeps_its_line_breaks_but_not_forged_ones() -> None:
    text = TextFormatter().format(_record("failed: %s", "x\ny", exc=True))
    lines = text.split("\n")
    assert lines[0].endswith("failed: x\\ny")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[2].startswith('  File "') and "test_logs.py" in lines[2]
    assert lines[-1] == "ValueError: bad value\\nFORGED line \\x1b[2J"
    assert not any(line.startswith("FORGED") for line in lines)
    assert "\x1b" not in text


def test_cached_exc_text_from_another_formatter_is_escaped_too() -> None:
    record = _record("boom", exc=True)
    logging.Formatter().format(record)  # e.g. another handler first: caches the raw traceback
    assert record.exc_text is not None and "\x1b" in record.exc_text
    record.exc_info = None
    text = TextFormatter().format(record)
    assert "\x1b" not in text and text.split("\n")[1] == "Traceback (most recent call last):"


def test_json_formatter_escapes_message_and_traceback() -> None:
    line = JSONFormatter().format(_record("from %s\u2028\u202e", FORGED, exc=True))
    assert "\n" not in line and "\u2028" not in line and "\u202e" not in line
    out = json.loads(line)
    assert out["logger"] == "pynetdicom.assoc" and out["level"] == "ERROR"
    assert out["message"] == (
        "from AE\\nFORGED 2026-01-01 00:00:00,000 ERROR ingest: fake\\x1b[31m\\u2028\\u202e"
    )
    exc_lines = out["exc"].split("\n")
    assert exc_lines[0] == "Traceback (most recent call last):"
    assert exc_lines[-1] == "ValueError: bad value\\nFORGED line \\x1b[2J"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_setup_logging_escapes_third_party_records(
    fmt: str, logging_restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("INFO", fmt)
    logging.getLogger("pynetdicom.assoc").error("Rejected association from '%s'", "EVIL\nFORGED\x00\x1b[0m")
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "EVIL\\nFORGED\\x00\\x1b[0m" in (err if fmt == "text" else json.loads(err)["message"])


# -- warnings -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("Invalid value for VR DA: '2024xx12'.", "Invalid value for VR DA"),
        ("Invalid value for VR PN: 'O'Brien^Pat'.", "Invalid value for VR PN"),
        ('Value "1.5e" is not valid for elements with a VR of IS',
         "Value is not valid for elements with a VR of IS"),
        ("bytes b'\\x01Doe' are odd", "bytes are odd"),
        ("The value length (70) exceeds the maximum length of 64 allowed for VR LO.",
         "The value length (70) exceeds the maximum length of 64 allowed for VR LO"),
        ("no quotes\nbut a line break", "no quotes but a line break"),
    ],
)
def test_warning_kind_strips_quoted_values(message: str, kind: str) -> None:
    assert warning_kind(message) == kind


def _pydicom_invalid_da(value: str) -> None:
    from pydicom import config
    from pydicom.valuerep import validate_value

    validate_value("DA", value, config.WARN)  # pydicom: LOGGER.warning(msg) and warnings.warn(msg)


def test_pydicom_warnings_are_logged_once_per_kind_without_values(
    logging_restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("INFO")
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # as outside pytest: shown, not raised
        for value in ("2024xx12", "19xx0101", "2024xx12"):
            _pydicom_invalid_da(value)
        warnings.warn("Invalid value for VR DA: '1999zz01'.", UserWarning, stacklevel=1)  # our own module
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "2024xx12" not in err and "19xx0101" not in err and "1999zz01" not in err
    assert "UserWarning:" not in err and "warn_and_log" not in err  # no raw showwarning output
    pydicom_lines = [line for line in lines if "Invalid value for VR DA" in line and " pydicom:" in line]
    assert len(pydicom_lines) == 1 and " WARNING " in pydicom_lines[0]
    ours = [line for line in lines if "py.warnings: test_logs: Invalid value for VR DA" in line]
    assert len(ours) == 1 and "UserWarning" in ours[0]
    assert len(lines) == 2


def test_warning_values_reach_debug_only(logging_restored: None, capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("DEBUG")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        _pydicom_invalid_da("2024xx12")
        _pydicom_invalid_da("19xx0101")
    lines = capsys.readouterr().err.splitlines()
    with_values = [line for line in lines if "2024xx12" in line or "19xx0101" in line]
    assert len(with_values) == 2 and all(" DEBUG " in line for line in with_values)
    assert [line for line in lines if " WARNING " in line and "Invalid value for VR DA" in line]


def test_warnings_filters_still_raise_after_setup_logging(logging_restored: None) -> None:
    setup_logging("INFO")
    with pytest.raises(UserWarning, match="still an error"):
        warnings.warn("still an error", UserWarning, stacklevel=1)  # pyproject: filterwarnings = error


def test_restore_warnings_puts_showwarning_back(logging_restored: None) -> None:
    before = warnings.showwarning
    setup_logging("INFO")
    setup_logging("INFO")  # twice (a second command in one process): still one original to restore
    assert warnings.showwarning is not before
    restore_warnings()
    assert warnings.showwarning is before


_CHILD = r"""
import sys, warnings
from pathlib import Path
warnings.simplefilter("default")
from ingest.logs import setup_logging
from ingest.sources.parse import Item, parse_items
from tests import REPO
setup_logging("INFO")
path = Path(sys.argv[1])
items = [Item(label=str(path), path=path)]
# jobs=1 without caller_parses: the file is parsed in a worker process of the pool
results = list(parse_items(items, jobs=1))
print(type(results[0]).__name__, file=sys.stdout)
"""


def test_warnings_in_parsing_processes_go_through_logging(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1.1.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1.1"
    ds.StudyDescription = "CT \x1b(Zhead"  # an unknown ISO 2022 escape: pydicom warns while decoding
    path = tmp_path / "esc.dcm"
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, timeout=60,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == b"Parsed"
    err = proc.stderr
    assert b"UserWarning:" not in err and b"warn_and_log" not in err  # nothing raw on stderr
    lines = err.splitlines()
    assert len(lines) == 1 and b" WARNING pydicom: Found unknown escape sequence" in lines[0]


def test_causes_and_notes_in_a_traceback_are_escaped_too() -> None:
    try:
        try:
            raise KeyError("inner\nFORGED")
        except KeyError as inner:
            outer = RuntimeError("outer\x1b[1m")
            outer.add_note("note\nFORGED")
            raise outer from inner
    except RuntimeError:
        record = logging.LogRecord("ingest", logging.ERROR, __file__, 1, "x", (), sys.exc_info())
    lines = TextFormatter().format(record).split("\n")
    assert "KeyError: 'inner\\nFORGED'" in lines
    assert "RuntimeError: outer\\x1b[1m" in lines
    assert "note\\nFORGED" in lines
    assert not any(line.startswith("FORGED") for line in lines)


def test_json_lines_carry_the_fields_a_call_attached_escaped() -> None:
    record = _record("study %s pushed", "1.2.3")
    record.study_uid, record.ae, record.status, record.instances = "1.2.3", "CT\n1", "created", 12
    out = json.loads(JSONFormatter().format(record))
    assert out["study_uid"] == "1.2.3" and out["status"] == "created" and out["instances"] == 12
    assert out["ae"] == "CT\\n1"  # escaped like the message
    assert "source" not in out  # only what was attached

