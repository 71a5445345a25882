"""Tests for ingest.sources.parse: finite inputs (files, folders) and the header-parsing pool.

``parse_items`` yields one :class:`Parsed` or :class:`Rejected` per item, in input order, whichever
process parsed it, with a bounded number of batches in flight (docs/architecture.md "The data flow").
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Generator, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_charset_files, get_testdata_file, get_testdata_files

from ingest.sources import parse
from ingest.sources.parse import Item, Parsed, Rejected, expand_paths, parse_items

pytestmark = pytest.mark.timeout(60)

_SINGLE_FILES = ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "ExplVR_BigEnd.dcm", "image_dfl.dcm")
_FILES: list[str] = sorted(
    {
        *get_testdata_files("dicomdirtests/98892003/*/*"),
        *get_charset_files("chr*.dcm"),
        *(str(get_testdata_file(f)) for f in _SINGLE_FILES),
    }
)


def _outcome(result: Parsed | Rejected) -> tuple[str, tuple[Any, ...]]:
    if isinstance(result, Parsed):
        return result.label, (result.record, result.digest, result.size)
    return result.label, (result.reason, result.message)


def test_caller_parsing_keeps_input_order_and_results(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    items = [Item(label=name, path=Path(name)) for name in _FILES * 6]  # > several batches
    items.insert(7, Item(label=str(junk), path=junk))
    items.insert(3, Item(label="refused", rejection=("archive_refused", "refused before reading")))
    plain = [_outcome(r) for r in parse_items(items, jobs=1)]
    parallel = [_outcome(r) for r in parse_items(items, jobs=2, caller_parses=True)]
    workers_only = [_outcome(r) for r in parse_items(items, jobs=2)]
    assert [label for label, _ in plain] == [item.label for item in items]
    assert parallel == plain
    assert workers_only == plain
    assert dict(plain)["refused"] == ("archive_refused", "refused before reading")
    assert dict(plain)[str(junk)][0] == "not_dicom"


# --------------------------------------------------------------------------------------------------
# expand_paths
# --------------------------------------------------------------------------------------------------


def test_expand_paths_keeps_the_order_of_the_roots_and_sorts_each_folder(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for rel in ("b/2.dcm", "b/1.dcm", "a.dcm", "c/d/3.dcm"):
        (first / rel).parent.mkdir(parents=True, exist_ok=True)
        (first / rel).write_bytes(b"x")
    second.mkdir()
    (second / "z.dcm").write_bytes(b"x")
    single = tmp_path / "single.dcm"
    single.write_bytes(b"x")

    items = list(expand_paths([second, first, single, tmp_path / "missing"]))
    expected = [second / "z.dcm", first / "a.dcm", first / "b/1.dcm", first / "b/2.dcm", first / "c/d/3.dcm",
                single]
    assert items == [Item(label=str(p), path=str(p)) for p in expected]  # path strings, as str() gives them


def test_expand_paths_is_lazy(tmp_path: Path) -> None:
    (tmp_path / "one.dcm").write_bytes(b"x")

    def roots() -> Iterator[Path]:
        yield tmp_path
        raise AssertionError("the next root was read before the caller asked for it")

    one = str(tmp_path / "one.dcm")
    assert next(expand_paths(roots())) == Item(label=one, path=one)


# --------------------------------------------------------------------------------------------------
# Parsed and Rejected
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jobs", [1, 2])
def test_unreadable_files_are_rejected_naming_them(tmp_path: Path, jobs: int) -> None:
    missing = tmp_path / "gone.dcm"
    folder = tmp_path / "a-folder.dcm"
    folder.mkdir()
    items = [Item(label=str(p), path=p) for p in (missing, folder)]
    results = list(parse_items(items, jobs=jobs))
    assert [type(r) for r in results] == [Rejected, Rejected]
    for item, result in zip(items, results, strict=True):
        assert isinstance(result, Rejected)
        assert (result.label, result.reason) == (item.label, "unreadable")
        assert result.message.startswith(f"cannot read {item.label}")


@pytest.mark.parametrize("jobs", [1, 2])
def test_bytes_items_give_what_the_file_gives(jobs: int) -> None:
    path = Path(str(get_testdata_file("CT_small.dcm")))
    data = path.read_bytes()
    from_path, from_bytes = parse_items(
        [Item(label=str(path), path=path), Item(label="study.zip!ct.dcm", data=data)], jobs=jobs
    )
    assert isinstance(from_path, Parsed) and isinstance(from_bytes, Parsed)
    assert from_bytes.label == "study.zip!ct.dcm"
    assert (from_bytes.record, from_bytes.digest) == (from_path.record, from_path.digest)
    assert from_path.size == from_bytes.size == len(data)


@pytest.mark.parametrize(("jobs", "caller_parses"), [(1, False), (2, False), (2, True)])
def test_inflate_cap_reaches_every_parsing_process(jobs: int, caller_parses: bool) -> None:
    deflated = Path(str(get_testdata_file("image_dfl.dcm")))
    items = [Item(label=str(deflated), path=deflated)] * 3
    capped = list(parse_items(items, jobs=jobs, caller_parses=caller_parses, max_inflated_bytes=1024))
    assert [(r.label, getattr(r, "reason", None)) for r in capped] == [(str(deflated), "inflate_cap")] * 3
    assert all(isinstance(r, Parsed) for r in parse_items(items, jobs=jobs, caller_parses=caller_parses))


# --------------------------------------------------------------------------------------------------
# The pool: bounded in-flight batches, a long-lived pool
# --------------------------------------------------------------------------------------------------


class _Counting:
    """A long input that counts how many items ``parse_items`` has taken from it."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.taken = 0

    def __iter__(self) -> Iterator[Item]:
        for i in range(self.total):
            self.taken += 1
            yield Item(label=str(i), rejection=("refused", "decided before reading"))


@pytest.mark.parametrize(
    ("jobs", "caller_parses", "batches_ahead"),
    [
        (1, True, 0),  # in the calling process: one item at a time
        (2, False, 2 * parse._AHEAD + 1),  # the pool's queue, and the batch being yielded
        (3, True, 2 * parse._AHEAD + parse._MAX_WINDOW + 1),  # plus what the caller parsed meanwhile
    ],
)
def test_items_are_read_a_bounded_number_of_batches_ahead(
    jobs: int, caller_parses: bool, batches_ahead: int
) -> None:
    source = _Counting(total=200 * parse._BATCH)
    results = parse_items(source, jobs=jobs, caller_parses=caller_parses)
    try:
        for done in range(1, 10 * parse._BATCH + 1):
            result = next(results)
            assert result.label == str(done - 1)
            assert source.taken - done <= batches_ahead * parse._BATCH, (done, source.taken)
    finally:
        if isinstance(results, Generator):  # stop the pool now, not when garbage collected
            results.close()
    assert source.taken < source.total


def test_a_given_pool_is_used_and_left_running(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    items = [Item(label=str(junk), path=junk)] * 3
    with ProcessPoolExecutor(1) as pool:
        for _ in range(2):  # the watcher reuses its pool burst after burst
            results = list(parse_items(items, jobs=1, pool=pool))
            assert [getattr(r, "reason", None) for r in results] == ["not_dicom"] * 3
        assert pool.submit(len, "still running").result(timeout=30) == len("still running")


# --------------------------------------------------------------------------------------------------
# what a replay rerun needs: the stat passed through, no parser loaded for nothing
# --------------------------------------------------------------------------------------------------


def test_the_items_stat_comes_back_with_its_record_from_every_process() -> None:
    name = str(get_testdata_file("CT_small.dcm"))
    stat = (name, 1234, 5678)
    items = [Item(label=name, path=Path(name), stat=stat)] * 130 + [Item(label=name, path=Path(name))]
    for jobs, caller in ((1, False), (2, False), (2, True)):
        results = list(parse_items(items, jobs=jobs, caller_parses=caller))
        assert all(isinstance(r, Parsed) for r in results)
        assert [r.stat for r in results if isinstance(r, Parsed)] == [stat] * 130 + [None]


def test_listing_and_an_empty_input_load_no_header_parser(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(b"x")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from ingest.sources.parse import expand_paths, parse_items\n"
        f"listed = list(expand_paths([Path({str(tmp_path)!r})]))\n"
        "assert len(listed) == 1, listed\n"
        "assert list(parse_items(iter([]), jobs=2)) == []\n"
        "loaded = [m for m in ('ingest.adapters.dicomfile', 'pydicom') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("jobs", "caller_parses"), [(1, False), (2, False), (2, True)])
def test_rows_carry_the_records_the_parse_gives_as_their_state_store_json(
    tmp_path: Path, jobs: int, caller_parses: bool
) -> None:
    from ingest.core.records import InstanceRecord
    from ingest.sources.parse import ParsedRow
    from samples.generate import generate

    corpus = generate(tmp_path / "c", studies=2, files=150, seed=11, tiny=True)  # > two 64-item batches
    items = [Item(str(p), path=p) for p in corpus.paths()] + [Item("missing.dcm", path=tmp_path / "nope")]
    records = list(parse_items(items, jobs=1))
    rows = list(parse_items(items, jobs=jobs, caller_parses=caller_parses, rows=True))
    assert len(rows) == len(records) == corpus.files + 1
    for got, want in zip(rows, records, strict=True):
        if isinstance(want, Rejected):
            assert got == want  # a refusal is the same either way
            continue
        assert isinstance(got, ParsedRow) and isinstance(want, Parsed)
        assert (got.label, got.digest, got.size) == (want.label, want.digest, want.size)
        r = want.record
        assert (got.row.study_uid, got.row.series_uid, got.row.sop_uid, got.row.sop_class_uid,
                got.row.study_date) == (r.study_uid, r.series_uid, r.sop_uid, r.sop_class_uid, r.study_date)
        assert InstanceRecord.model_validate_json(got.row.json) == r == got.row.record()
