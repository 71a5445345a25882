"""The test suite of ``ingest``; it mirrors the package tree."""

from pathlib import Path

#: The repository root and the checked-in test fixtures, wherever a test module sits.
REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
