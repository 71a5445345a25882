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
from ingest.adapters.folders import ignored_name, iter_dicom_files, iter_dicom_paths
from ingest.sources.replay import relative_key


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


@pytest.mark.parametrize(
    ("cwd", "given"),
    [("tree", "."), ("", "tree"), ("", "./tree/"), ("", "tree/sub/.."), ("", "ABSOLUTE")],
)
def test_path_strings_are_what_pathlib_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cwd: str, given: str
) -> None:
    """The walk builds its paths as strings; each is ``str()`` of the Path that the root joined with the
    file's relative path gives, whatever form the root was given in, and its shard key is that relative
    path as ``Path.relative_to`` gives it."""
    for rel in ("tree/a.dcm", "tree/sub/b.dcm", "tree/sub/deeper/c.dcm"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    monkeypatch.chdir(tmp_path / cwd)
    root = tmp_path / "tree" if given == "ABSOLUTE" else Path(given)
    rels = ["a.dcm", "sub/b.dcm", "sub/deeper/c.dcm"]  # tree/sub/.. lists tree (the system resolves ..)
    expected = [str(root / rel) for rel in rels]
    assert list(iter_dicom_paths(root)) == expected
    assert [str(p) for p in iter_dicom_files(root)] == expected
    assert [relative_key(root, p) for p in iter_dicom_paths(root)] == [
        (root / rel).relative_to(root).as_posix() for rel in rels
    ]


def test_a_file_given_as_root_is_walked_as_itself(tmp_path: Path) -> None:
    single = tmp_path / "one.dcm"
    single.write_bytes(b"")
    assert list(iter_dicom_paths(single)) == [str(single)]
    assert relative_key(single, str(single)) == "one.dcm"


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
