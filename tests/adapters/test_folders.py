"""The folder walk (``ingest.adapters.folders``): which files replay and the watcher read.

Its behaviour on links, loops and in-progress names is covered where it is used (tests/adapters/
test_dicomfile.py, tests/sources/test_dropfolder.py); here: the names it skips, its order, and that it
loads no DICOM code (a replay rerun that finds every file unchanged lists folders and nothing more).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ingest.adapters import dicomfile
from ingest.adapters.folders import ignored_name, iter_dicom_files


@pytest.mark.parametrize(
    ("name", "ignored"),
    [(".hidden.dcm", True), ("a.dcm.part", True), ("a.tmp", True), ("a.dcm", False), ("part", False)],
)
def test_ignored_names(name: str, ignored: bool) -> None:
    assert ignored_name(name) is ignored


def test_walk_is_sorted_recursive_and_skips_ignored_names(tmp_path: Path) -> None:
    for rel in ("b/2.dcm", "b/1.dcm", "a.dcm", ".git/x.dcm", "c/.d/y.dcm", "c/z.part"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in iter_dicom_files(tmp_path)] == [
        "a.dcm", "b/1.dcm", "b/2.dcm",
    ]


def test_dicomfile_re_exports_the_same_functions() -> None:
    assert dicomfile.iter_dicom_files is iter_dicom_files
    assert dicomfile.ignored_name is ignored_name


def test_walking_loads_no_dicom_code(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from ingest.adapters.folders import iter_dicom_files\n"
        f"assert len(list(iter_dicom_files(Path({str(tmp_path)!r})))) == 0\n"
        "assert 'pydicom' not in sys.modules and 'ingest.adapters.dicomfile' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
