"""The layout is a checked fact: the import-linter contracts in pyproject.toml hold, and nothing in the
repository points at a file outside it (docs/architecture.md "Which way imports go")."""

from __future__ import annotations

import re
import subprocess
import sys

from tests import REPO


def test_import_contracts_hold() -> None:
    """Every contract of ``[tool.importlinter]`` (no cycles, layers, forbidden imports) is kept."""
    lint_imports = REPO / ".venv" / "bin" / "lint-imports"
    cmd = [str(lint_imports)] if lint_imports.exists() else [sys.executable, "-m", "importlinter.cli"]
    done = subprocess.run(
        [*cmd, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert ", 0 broken." in done.stdout, done.stdout[-2000:]


def test_comments_cite_only_documents_the_repository_holds() -> None:
    """A ``*.md`` file named in the package or the tests exists in the repository."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    names = {p.rsplit("/", 1)[-1] for p in tracked if p.endswith(".md")}
    cited: set[str] = set()
    for path in [*REPO.glob("ingest/**/*.py"), *REPO.glob("bench/*.py")]:
        cited.update(re.findall(r"\b([A-Za-z_][\w./-]*\.md)\b", path.read_text(encoding="utf-8")))
    missing = sorted(c for c in cited if c.rsplit("/", 1)[-1] not in names)
    assert not missing, f"cited but not in the repository: {missing}"
