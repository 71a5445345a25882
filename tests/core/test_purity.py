"""The core stays pure: no I/O, clock, asyncio, networking or logging configuration."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import ingest.core

CORE = Path(ingest.core.__file__).parent
MODULES = sorted(CORE.rglob("*.py"))
FORBIDDEN = {
    "asyncio",
    "aiohttp",
    "gql",
    "pynetdicom",
    "sqlite3",
    "socket",
    "psycopg",
    "logging.config",
    "time",
    "os",
}


def imported_names(path: Path) -> set[str]:
    """Every module named in an import statement of *path* (and each parent package)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in found:
            parts = name.split(".")
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def module_name(path: Path) -> str:
    return ".".join(("ingest", "core", *path.relative_to(CORE).with_suffix("").parts)).removesuffix(
        ".__init__"
    )


def test_core_has_the_expected_modules() -> None:
    names = {p.stem for p in MODULES}
    assert {"tags", "extract", "records"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_core_module_imports_nothing_impure(path: Path) -> None:
    assert imported_names(path) & FORBIDDEN == set()


def test_imports_detected_by_the_checker(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os.path\nfrom logging import config\nfrom time import monotonic\n")
    assert {"os", "logging.config", "time"} <= imported_names(sample)


def test_importing_core_pulls_in_no_network_or_async_library() -> None:
    modules = [module_name(p) for p in MODULES]
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    loaded = set(json.loads(out.stdout))
    heavy = {"asyncio", "aiohttp", "gql", "pynetdicom", "sqlite3", "psycopg"}
    assert loaded & heavy == set()
