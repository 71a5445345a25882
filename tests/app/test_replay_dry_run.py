"""The fast paths of ``replay --dry-run``: they must give exactly what the plain paths give.

- :func:`ingest.core.extract.extract_elements` (plain mapping of raw elements) vs
  :func:`ingest.core.extract.extract` on a pydicom ``Dataset`` read by pydicom itself;
- the dry run mapping quiet studies while parsing goes on vs mapping everything at the end.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file, get_testdata_files

from ingest.adapters.dicomfile import read_header
from ingest.app import replay
from ingest.config import load_settings
from ingest.core.extract import extract
from ingest.errors import HeaderError
from ingest.sources.parse import expand_paths
from samples.generate import generate

pytestmark = pytest.mark.timeout(60)

_SINGLE_FILES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "ExplVR_BigEnd.dcm", "image_dfl.dcm")
_FILES: list[str] = sorted(
    {
        *get_testdata_files("dicomdirtests/98892003/*/*"),
        *get_charset_files("chr*.dcm"),
        *(str(get_testdata_file(f)) for f in _SINGLE_FILES),
    }
)


@pytest.mark.parametrize("name", _FILES, ids=lambda p: Path(p).name)
def test_file_reader_matches_extract_of_a_pydicom_dataset(name: str) -> None:
    path = Path(name)
    try:
        expected = extract(pydicom.dcmread(path, stop_before_pixels=True), source=str(path))
    except HeaderError as exc:
        with pytest.raises(type(exc)):
            read_header(path)
        return
    assert read_header(path).record == expected


def _dry_run(roots: list[Path], jobs: int) -> tuple[str, dict[str, Any]]:
    settings = load_settings(None)
    out = io.StringIO()
    summary = replay.ReplaySummary()
    opts = replay.ReplayOptions(paths=roots, dry_run=True, jobs=jobs)
    replay._dry_run(settings, opts, summary, out, io.StringIO())
    return out.getvalue(), summary.as_dict()


def test_studies_mapped_early_are_mapped_again_when_they_grow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = generate(tmp_path / "c", studies=3, files=24, seed=5, tiny=True)
    # the first study's files come first and last: it is mapped while quiet, then grows again
    first = sorted(p for p in corpus.root.rglob("*.dcm") if corpus.studies[0].study_uid in _uid(p))
    late = tmp_path / "late"
    late.mkdir()
    for path in first[len(first) // 2 :]:
        shutil.move(path, late / path.name)
    roots = [corpus.root, late]
    files = len(list(expand_paths(roots)))

    monkeypatch.setattr(replay, "_QUIET_FILES", 10**9)  # reference: everything mapped at the end
    expected, expected_summary = _dry_run(roots, jobs=1)
    assert expected.count("\n") == 3

    monkeypatch.setattr(replay, "_QUIET_FILES", 2)  # map as soon as a study is quiet for 2 files
    calls: list[int] = []
    real = json.dumps

    def counting(*args: Any, **kwargs: Any) -> str:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(json, "dumps", counting)
    for jobs in (1, 2):
        calls.clear()
        text, summary = _dry_run(roots, jobs=jobs)
        assert text == expected
        assert {k: v for k, v in summary.items() if k != "seconds"} == {
            k: v for k, v in expected_summary.items() if k != "seconds"
        }
        assert len(calls) > 3  # some studies were mapped early, the grown one again
    assert files == 24


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
