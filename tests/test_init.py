"""The ``ingest`` package itself: its version, read only when asked for (ingest/__init__.py)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import ingest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _declared_version() -> str:
    with PYPROJECT.open("rb") as fh:
        return str(tomllib.load(fh)["project"]["version"])


def test_version_is_the_one_pyproject_declares() -> None:
    assert ingest.__version__ == _declared_version()


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = ingest.no_such_thing


def test_importing_ingest_does_not_read_the_installed_metadata() -> None:
    # importlib.metadata costs tens of milliseconds: a bare import must not pay for it
    code = "import sys, ingest; print('importlib.metadata' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_version_option_prints_it() -> None:
    code = "import sys; from ingest.app.cli import main; sys.exit(main(['--version']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"ingest {_declared_version()}\n"
