"""End-to-end tests of ``ingest replay`` as a user runs it: folders and archives, filters, twice over."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from datetime import date
from pathlib import Path
from typing import Any

import pydicom
import pytest

from samples.generate import GeneratedCorpus, generate

pytestmark = pytest.mark.timeout(120)


def _ingest(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``ingest`` in a clean folder (no config/ingest.toml there), with its own data dir."""
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    return subprocess.run(
        [sys.executable, "-m", "ingest", "-q", "--data-dir", str(tmp / "data"), *args],
        cwd=work, env=env, capture_output=True, text=True, timeout=100,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> GeneratedCorpus:
    return generate(tmp_path_factory.mktemp("corpus") / "c", studies=3, files=12, seed=11)


@pytest.fixture(scope="module")
def archives(corpus: GeneratedCorpus, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("archives")
    made = {"zip": out / "c.zip", "tar.gz": out / "c.tar.gz", "tar": out / "c.tar"}
    with zipfile.ZipFile(made["zip"], "w", zipfile.ZIP_DEFLATED) as zf:
        for p in corpus.paths():
            zf.write(p, p.relative_to(corpus.root).as_posix())
    for kind in ("tar.gz", "tar"):
        with tarfile.open(made[kind], "w:gz" if kind == "tar.gz" else "w") as tf:
            tf.add(corpus.root, arcname="c")
    return made


def _dry_run(tmp: Path, *paths: Path, jobs: int = 1, study: str | None = None,
             since: date | None = None) -> tuple[int, str, dict[str, Any]]:
    """``replay --dry-run`` in process (no interpreter start-up): exit code, stdout, summary."""
    from ingest.app.replay import ReplayOptions, run_replay
    from ingest.config import Settings

    opts = ReplayOptions(paths=list(paths), dry_run=True, jobs=jobs,
                         studies=frozenset([study] if study else []), since=since)
    out, err = io.StringIO(), io.StringIO()
    summary = asyncio.run(run_replay(Settings(data_dir=tmp / "data"), opts, stdout=out, stderr=err))
    return summary.exit_code(), out.getvalue(), summary.as_dict()


def _studies(stdout: str) -> dict[str, dict[str, Any]]:
    """The printed ImagingStudies keyed by their Study Instance UID identifier."""
    out = {}
    for line in stdout.splitlines():
        res = json.loads(line)
        uid = next(i["value"] for i in res["identifier"] if i["system"] == "urn:dicom:uid")
        out[uid.removeprefix("urn:oid:")] = res
    return out


def test_folder_zip_and_tar_gz_give_identical_imaging_studies(
    tmp_path: Path, corpus: GeneratedCorpus, archives: dict[str, Path]
) -> None:
    outputs = {}
    for name, src in [("folder", corpus.root), *archives.items()]:
        rc, stdout, _ = _dry_run(tmp_path, src, jobs=2 if name == "folder" else 1)
        assert rc == 0
        outputs[name] = stdout
    assert len(set(outputs.values())) == 1, "the same study must map the same from every container"
    studies = _studies(outputs["folder"])
    assert set(studies) == set(corpus.study_uids)
    for uid, (n_series, n_instances) in corpus.expected.items():
        assert studies[uid]["numberOfSeries"] == n_series
        assert studies[uid]["numberOfInstances"] == n_instances


def test_zip_with_escaping_and_link_members_is_refused_without_writing_outside(
    tmp_path: Path, corpus: GeneratedCorpus
) -> None:
    good = corpus.paths()[0]
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../evil.dcm", good.read_bytes())
        zf.writestr("/tmp/ingest-abs-evil.dcm", good.read_bytes())
        link = zipfile.ZipInfo("link.dcm")
        link.create_system = 3
        link.external_attr = (0o120777) << 16  # S_IFLNK
        zf.writestr(link, "../../etc/passwd")
        zf.writestr("ok/inst.dcm", good.read_bytes())
    before = set(tmp_path.parent.rglob("*"))
    run = _ingest(tmp_path, "replay", str(archive), "--dry-run", "--json")
    assert run.returncode == 2, run.stderr  # some inputs rejected, the rest processed
    assert not Path("/tmp/ingest-abs-evil.dcm").exists()
    new = set(tmp_path.parent.rglob("*")) - before
    assert not any(p.name.endswith("evil.dcm") for p in new)
    for member, rule in (("../evil.dcm", "unsafe_path"), ("/tmp/ingest-abs-evil.dcm", "unsafe_path"),
                         ("link.dcm", "link")):
        line = next(ln for ln in run.stderr.splitlines() if f"!{member}:" in ln)
        assert str(archive) in line and f"rule {rule}" in line
    summary = json.loads(run.stderr.strip().splitlines()[-1])
    assert summary["instances"]["rejected_by_reason"] == {"archive_member": 3}
    assert summary["instances"]["accepted"] == 1
    assert len(_studies(run.stdout)) == 1


def test_refused_whole_archive_is_one_rejected_input_and_others_go_on(tmp_path: Path,
                                                                     corpus: GeneratedCorpus) -> None:
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"not gzip" * 100)
    run = _ingest(tmp_path, "replay", str(broken), str(corpus.root), "--dry-run", "--json")
    assert run.returncode == 2
    assert f"rejected: {broken}: archive_refused:" in run.stderr
    summary = json.loads(run.stderr.strip().splitlines()[-1])
    assert summary["instances"]["rejected_by_reason"] == {"archive_refused": 1}
    assert summary["instances"]["accepted"] == corpus.files


def test_study_and_since_filters(tmp_path: Path, corpus: GeneratedCorpus) -> None:
    wanted = corpus.study_uids[1]
    rc, stdout, _ = _dry_run(tmp_path, corpus.root, study=wanted)
    assert rc == 0
    assert set(_studies(stdout)) == {wanted}
    # --since: computed from the files themselves, independently of ingest
    dates = {}
    for p in corpus.paths():
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        dates[str(ds.StudyInstanceUID)] = str(ds.StudyDate)
    cutoff = sorted(dates.values())[1]  # keeps every study but the oldest
    since = date(int(cutoff[:4]), int(cutoff[4:6]), int(cutoff[6:]))
    rc, stdout, summary = _dry_run(tmp_path, corpus.root, since=since)
    assert rc == 0
    assert set(_studies(stdout)) == {uid for uid, d in dates.items() if d >= cutoff}
    oldest = min(dates, key=lambda u: dates[u])
    assert summary["instances"]["filtered"] == corpus.expected[oldest][1]


def test_same_folder_replayed_twice_writes_nothing_the_second_time(tmp_path: Path,
                                                                   corpus: GeneratedCorpus) -> None:
    first = _ingest(tmp_path, "replay", str(corpus.root), "--jobs", "2", "--json")
    assert first.returncode == 0, first.stderr
    s1 = json.loads(first.stdout)
    assert s1["studies"]["created"] == len(corpus.studies)
    assert s1["instances"]["accepted"] == corpus.files
    second = _ingest(tmp_path, "replay", str(corpus.root), "--jobs", "1", "--json")
    assert second.returncode == 0, second.stderr
    s2 = json.loads(second.stdout)
    assert s2["studies"]["created"] == 0 and s2["studies"]["updated"] == 0
    assert s2["instances"] == {"accepted": 0, "duplicate": corpus.files, "filtered": 0, "rejected": 0,
                               "rejected_by_reason": {}}
    # the same files as an archive are the same instances: still nothing new
    archive = tmp_path / "again.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in corpus.paths():
            zf.write(p, p.relative_to(corpus.root).as_posix())
    third = _ingest(tmp_path, "replay", str(archive), "--jobs", "1", "--json")
    assert third.returncode == 0, third.stderr
    s3 = json.loads(third.stdout)
    assert s3["studies"]["created"] == 0 and s3["studies"]["updated"] == 0
    assert s3["instances"]["duplicate"] == corpus.files


def test_rejected_file_names_are_printed_escaped(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "evil\nname\x1b[31m.dcm").write_bytes(b"not DICOM at all\n\x1b[2J")
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    proc = subprocess.run(
        [sys.executable, "-m", "ingest", "-q", "--data-dir", str(tmp_path / "data"), "replay", "--dry-run",
         "--jobs", "1", str(folder)],
        cwd=work, env=env, capture_output=True, timeout=100,
    )
    assert proc.returncode == 2, proc.stderr
    assert b"\x1b" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(b"rejected: " + str(folder).encode() + b"/evil\\nname\\x1b[31m.dcm: ")


def test_dry_run_prints_the_generated_narrative(tmp_path: Path, corpus: GeneratedCorpus) -> None:
    """``[mapping] narrative`` (on by default): each printed study carries the XHTML narrative of its
    own series, with the description as text (docs/mapping.md "Narrative")."""
    import xml.etree.ElementTree as ET

    code, stdout, _ = _dry_run(tmp_path, corpus.root)
    assert code == 0
    studies = _studies(stdout)
    assert studies
    for study in studies.values():
        text = study["text"]
        assert text["status"] == "generated"
        root = ET.fromstring(text["div"])
        assert root.tag == "{http://www.w3.org/1999/xhtml}div"
        shown = "".join(root.itertext())
        if "description" in study:
            assert study["description"] in shown
        for series in study["series"]:
            assert series["uid"] in shown or str(series.get("number", "")) in shown


# --------------------------------------------------------------------------- on the terminal


def test_a_missing_path_is_named_and_exits_2(tmp_path: Path, corpus: GeneratedCorpus) -> None:
    missing = tmp_path / "no-such-folder"
    done = _ingest(tmp_path, "replay", "--dry-run", str(corpus.root), str(missing))
    assert done.returncode == 2, done.stderr
    assert f"rejected: {missing}: not_found: no such file or folder" in done.stderr
    assert len(done.stdout.splitlines()) == 3  # the existing folder's studies are still printed


def test_an_empty_folder_says_so(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _ingest(tmp_path, "replay", "--dry-run", str(empty))
    assert done.returncode == 0, done.stderr
    assert f"no DICOM files found in {empty}: nothing to do" in done.stderr
    assert done.stdout == ""


def _on_a_terminal(tmp: Path, *args: str, columns: int = 160) -> tuple[int, str]:
    """Run ``ingest`` with stderr on a pseudo-terminal; its exit code and everything the terminal got."""
    import pty
    import select

    work = tmp / "work"
    work.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update(COLUMNS=str(columns), LINES="40", TERM="xterm-256color")
    env.pop("NO_COLOR", None)
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ingest", "--data-dir", str(tmp / "data"), *args],
        cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary,
    )
    os.close(secondary)
    seen = bytearray()
    try:
        while True:
            ready, _, _ = select.select([primary], [], [], 100)
            if not ready:
                break
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal's other end closed: the process is gone
                break
            if not chunk:
                break
            seen += chunk
        code = proc.wait(timeout=100)
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, seen.decode("utf-8", "replace")


def test_progress_on_a_terminal_has_total_rate_and_eta_and_lines_print_above_it(
    tmp_path: Path, corpus: GeneratedCorpus
) -> None:
    import re

    bad = tmp_path / "in" / "zz-not-dicom.dcm"
    bad.parent.mkdir()
    bad.write_bytes(b"not DICOM at all" * 20)
    for p in corpus.paths():  # enough files for the bar to be drawn while reading
        target = tmp_path / "in" / p.relative_to(corpus.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
    code, screen = _on_a_terminal(tmp_path, "-v", "replay", "--dry-run", str(tmp_path / "in"))
    assert code == 2, screen
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)
    total = len(list((tmp_path / "in").rglob("*.dcm")))
    # the bar: files read of the total, the rate, the ETA
    assert re.search(rf"\b\d+/{total}\b", plain), plain
    assert "files/s" in plain and "ETA" in plain, plain
    # the rejected line is a line of its own, never glued to the bar's text
    lines = [line for line in re.split(r"[\r\n]+", plain) if "zz-not-dicom" in line]
    assert lines, plain
    for line in lines:
        assert line.strip().startswith("rejected:"), line
        assert "files/s" not in line and "ETA" not in line, line


def _shard_of(relative: str, count: int) -> int:
    """The shard (1-based) README.md gives a file: BLAKE2b (8 bytes, big-endian) of its path relative to
    the argument naming it (an archive member: its name in the archive), modulo N."""
    import hashlib

    digest = hashlib.blake2b(relative.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count + 1


def test_shards_of_a_folder_and_of_a_zip_split_the_files_between_them(
    tmp_path: Path, corpus: GeneratedCorpus, archives: dict[str, Path]
) -> None:
    want = {k: 0 for k in (1, 2, 3)}
    for p in corpus.paths():
        want[_shard_of(p.relative_to(corpus.root).as_posix(), 3)] += 1
    assert all(want.values()), want
    for src in (corpus.root, archives["zip"]):  # the zip's members are named relative to the corpus root
        for k in (1, 2, 3):
            run = _ingest(tmp_path, "replay", str(src), "--shard", f"{k}/3", "--dry-run", "--json")
            assert run.returncode == 0, run.stderr
            summary = json.loads(run.stderr.strip().splitlines()[-1])
            assert summary["files"] == summary["instances"]["accepted"] == want[k], (src, k)


@pytest.mark.parametrize("spec", ["0/2", "3/2", "1/0", "2", "a/b", "1/2/3"])
def test_a_shard_out_of_range_exits_1_with_a_message(tmp_path: Path, corpus: GeneratedCorpus,
                                                     spec: str) -> None:
    run = _ingest(tmp_path, "replay", str(corpus.root), "--shard", spec, "--dry-run")
    assert run.returncode == 1, run.stderr
    assert f"--shard '{spec}'" in run.stderr and "K/N" in run.stderr
    assert run.stdout == ""


def test_a_deflate_bomb_in_a_replayed_folder_is_refused_under_the_listener_cap(tmp_path: Path) -> None:
    from tests.adapters.test_dicomfile import deflated_file

    folder = tmp_path / "in"
    folder.mkdir()
    bomb = folder / "bomb.dcm"
    bomb.write_bytes(deflated_file(8, bytes(1 << 20)))  # 8 MiB inflated: under the default 64 MiB cap
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env["INGEST_LISTENER__MAX_INFLATED_BYTES"] = str(1 << 20)
    for jobs in ("1", "2"):
        run = subprocess.run(
            [sys.executable, "-m", "ingest", "-q", "--data-dir", str(tmp_path / "data"), "replay",
             str(folder), "--jobs", jobs, "--json"],
            cwd=work, env=env, capture_output=True, text=True, timeout=100,
        )
        assert run.returncode == 2, run.stderr
        assert f"rejected: {bomb}: inflate_cap:" in run.stderr
        summary = json.loads(run.stdout)
        assert summary["instances"]["rejected_by_reason"] == {"inflate_cap": 1}
