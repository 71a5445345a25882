"""The synthetic sample generator (samples/generate.py), the committed samples and the bench harness.

Expected values (names, character-set bytes, counts) are written out here, not taken from the generator.
"""

from __future__ import annotations

import io
import json
import re
import struct
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from bench import run as bench
from samples import generate as gen
from tests import REPO

ROOT = REPO
COMMITTED = ROOT / "samples" / "studies"
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# profile order of the generator's table: study-001 is Japanese, study-002 German MR, ...
EXPECTED_NAMES = [
    "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "Müller^Jürgen",
    "Hong^Gildong=洪^吉洞=홍^길동",
    "Παπαδοπούλου^Ελένη",
    "Weiß-Schäfer^Anneliese",
    "Testpatient^Alpha",
    "Lefèvre^Zoé",
    "Øster^Åse",
    "Sample^Kim",
]


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _rel_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in _files(root)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> gen.GeneratedCorpus:
    """All nine profiles, a few instances each, small images."""
    return gen.generate(tmp_path_factory.mktemp("corpus"), studies=9, files=60, seed=7, matrix=8)


@pytest.fixture(scope="module")
def datasets(corpus: gen.GeneratedCorpus) -> dict[str, pydicom.Dataset]:
    return {p.relative_to(corpus.root).as_posix(): pydicom.dcmread(p) for p in _files(corpus.root)}


# --- determinism -----------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = gen.generate(tmp_path / "a", studies=9, files=30, seed=3, matrix=8)
    b = gen.generate(tmp_path / "b", studies=9, files=30, seed=3, matrix=8)
    files_a, files_b = _rel_bytes(a.root), _rel_bytes(b.root)
    assert len(files_a) == 30
    assert files_a == files_b
    assert a.study_uids == b.study_uids


def test_other_seed_gives_other_uids(tmp_path: Path) -> None:
    a = gen.generate(tmp_path / "a", studies=2, files=4, seed=1, matrix=8)
    b = gen.generate(tmp_path / "b", studies=2, files=4, seed=2, matrix=8)
    assert set(a.study_uids).isdisjoint(b.study_uids)
    ds_a = pydicom.dcmread(a.paths()[0])
    ds_b = pydicom.dcmread(b.paths()[0])
    assert ds_a.SOPInstanceUID != ds_b.SOPInstanceUID


def test_tiny_is_deterministic_and_canonical(tmp_path: Path) -> None:
    """Tiny files are hand-assembled; pydicom must re-encode each one to the very same bytes."""
    a = gen.generate(tmp_path / "a", studies=9, files=27, seed=5, tiny=True)
    b = gen.generate(tmp_path / "b", studies=9, files=27, seed=5, tiny=True)
    assert _rel_bytes(a.root) == _rel_bytes(b.root)
    for path in a.paths():
        raw = path.read_bytes()
        ds = pydicom.dcmread(path)
        assert "PixelData" not in ds
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        again = io.BytesIO()
        ds.save_as(again, enforce_file_format=True)
        assert again.getvalue() == raw, path


# --- readability and content -----------------------------------------------------------------------


def test_every_file_reads_with_valid_uids_and_pixels(datasets: dict[str, pydicom.Dataset]) -> None:
    sop_uids = set()
    for rel, ds in datasets.items():
        meta = ds.file_meta
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID, rel
        assert meta.MediaStorageSOPClassUID == ds.SOPClassUID, rel
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID):
            assert UID_RE.match(uid) and len(uid) <= 64, (rel, uid)
        sop_uids.add(ds.SOPInstanceUID)
        if ds.Modality in {"SR", "KO"}:
            assert "PixelData" not in ds
            assert ds.ConceptNameCodeSequence[0].CodeMeaning
            continue
        frames = int(ds.get("NumberOfFrames", 1))
        assert len(ds.PixelData) == ds.Rows * ds.Columns * ds.BitsAllocated // 8 * frames, rel
        fmt = ">" if meta.TransferSyntaxUID == ExplicitVRBigEndian else "<"
        if ds.BitsAllocated == 16:
            values = struct.unpack(f"{fmt}{len(ds.PixelData) // 2}H", ds.PixelData)
            # a wrong byte order shows up as values far beyond BitsStored
            assert max(values) < 2**ds.BitsStored, rel
    assert len(sop_uids) == len(datasets)


@pytest.mark.parametrize(
    ("study", "charset", "raw"),
    [
        # ISO 2022 IR 87: JIS X 0208 behind ESC $ B, back to ASCII with ESC ( B
        (0, ["", "ISO 2022 IR 87"], b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B="),
        # ISO 2022 IR 149: KS X 1001 in G1 behind ESC $ ) C
        (2, ["", "ISO 2022 IR 149"], b"Hong^Gildong=\x1b$)C\xfb\xf3^"),
        # ISO 8859-1: u-umlaut is 0xFC
        (1, "ISO_IR 100", b"M\xfcller^J\xfcrgen"),
        # ISO 8859-7: Greek capital Pi is 0xD0
        (3, "ISO_IR 126", b"\xd0\xe1\xf0\xe1\xe4\xef\xf0\xef\xfd\xeb\xef\xf5^"),
        # UTF-8: sharp s is C3 9F
        (4, "ISO_IR 192", "Weiß-Schäfer^Anneliese".encode()),
    ],
)
def test_non_ascii_names_decode_exactly(
    corpus: gen.GeneratedCorpus, study: int, charset: str | list[str], raw: bytes
) -> None:
    info = corpus.studies[study]
    for path in sorted((corpus.root / info.directory).rglob("*.dcm")):
        data = path.read_bytes()
        assert raw in data, path
        ds = pydicom.dcmread(path)
        assert ds.SpecificCharacterSet == charset
        assert str(ds.PatientName) == EXPECTED_NAMES[study]
    assert info.patient_name == EXPECTED_NAMES[study]


def test_japanese_name_groups(corpus: gen.GeneratedCorpus) -> None:
    ds = pydicom.dcmread(corpus.paths()[0])
    name = ds.PatientName
    assert (name.family_name, name.given_name) == ("Yamada", "Tarou")
    assert name.ideographic == "山田^太郎"
    assert name.phonetic == "やまだ^たろう"
    assert ds.StudyDescription == "胸部CT"
    assert ds.file_meta.TransferSyntaxUID != ImplicitVRLittleEndian  # JIS escapes in explicit VR
    assert gen.JAPANESE_NAME == "Yamada^Tarou=山田^太郎=やまだ^たろう"


def test_all_names_and_descriptions_round_trip(corpus: gen.GeneratedCorpus) -> None:
    for study, expected in zip(corpus.studies, EXPECTED_NAMES, strict=True):
        ds = pydicom.dcmread(sorted((corpus.root / study.directory).rglob("*.dcm"))[-1])
        assert str(ds.PatientName) == expected
    korean = pydicom.dcmread(sorted((corpus.root / corpus.studies[2].directory).rglob("*.dcm"))[0])
    assert korean.StudyDescription == "복부 초음파"
    assert korean.ReasonForTheRequestedProcedure == "복통"


def test_corpus_variety(datasets: dict[str, pydicom.Dataset]) -> None:
    all_ds = list(datasets.values())
    modalities = {ds.Modality for ds in all_ds}
    assert {"CT", "MR", "US", "CR", "DX", "MG", "PT", "NM", "XA", "SR", "KO"} <= modalities
    syntaxes = Counter(ds.file_meta.TransferSyntaxUID for ds in all_ds)
    assert syntaxes[ExplicitVRBigEndian] == 1
    assert syntaxes[ImplicitVRLittleEndian] > 0
    assert syntaxes[ExplicitVRLittleEndian] > len(all_ds) / 2  # explicit VR LE mostly
    by_study: dict[str, set[str | None]] = defaultdict(set)
    for ds in all_ds:
        by_study[ds.StudyInstanceUID].add(ds.get("TimezoneOffsetFromUTC"))
    tz = [next(iter(v)) for v in by_study.values()]
    assert all(len(v) == 1 for v in by_study.values())  # one offset per study
    assert None in tz and any(t is not None for t in tz)
    assert any(int(ds.get("NumberOfFrames", 1)) > 1 for ds in all_ds)
    designators = {ds.ProcedureCodeSequence[0].CodingSchemeDesignator for ds in all_ds}
    assert {"SCT", "LN", "RADLEX"} <= designators
    assert any(ds.get("Laterality") in {"L", "R"} for ds in all_ds)
    assert any(ds.get("ImageLaterality") in {"L", "R"} for ds in all_ds)
    with_issuer = [ds for ds in all_ds if "IssuerOfAccessionNumberSequence" in ds]
    assert with_issuer and all(ds.AccessionNumber for ds in with_issuer)
    assert all(ds.IssuerOfPatientID and ds.ReferringPhysicianName for ds in all_ds)
    assert all(ds.get("PerformingPhysicianName") or ds.get("OperatorsName") for ds in all_ds)
    ko = [ds for ds in all_ds if ds.Modality == "KO"]
    referenced = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for k in ko for i in k.ContentSequence}
    sops = {ds.SOPInstanceUID for ds in all_ds}
    assert referenced and referenced <= sops  # key objects point at instances that exist


# --- counts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("studies", "files"), [(9, 9), (3, 100), (12, 50), (1, 1)])
def test_counts_match_request(tmp_path: Path, studies: int, files: int) -> None:
    corpus = gen.generate(tmp_path, studies=studies, files=files, seed=11, tiny=True)
    paths = _files(tmp_path)
    assert len(paths) == files == corpus.files
    seen: dict[str, dict[str, int]] = defaultdict(Counter)
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        seen[ds.StudyInstanceUID][ds.SeriesInstanceUID] += 1
    assert len(seen) == studies
    assert {uid: (len(s), sum(s.values())) for uid, s in seen.items()} == corpus.expected
    assert sum(n for _, n in corpus.expected.values()) == files


def test_invalid_counts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="files"):
        gen.generate(tmp_path, studies=5, files=4, seed=1)
    with pytest.raises(ValueError, match="files"):
        gen.generate(tmp_path, studies=0, files=3, seed=1)


def test_cli_small_and_ct_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gen.main(["--out", str(tmp_path / "s"), "--small"]) == 0
    assert "24 files" in capsys.readouterr().out
    small = _files(tmp_path / "s")
    assert len(small) == 24
    assert len({pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in small}) == 4
    assert gen.main(["--out", str(tmp_path / "ct"), "--ct-series", "3", "-q"]) == 0
    ct = [pydicom.dcmread(p) for p in _files(tmp_path / "ct")]
    assert len(ct) == 3 and len({ds.SeriesInstanceUID for ds in ct}) == 1
    assert {(ds.Modality, ds.Rows, ds.Columns, ds.BitsAllocated) for ds in ct} == {("CT", 512, 512, 16)}
    assert sorted(ds.InstanceNumber for ds in ct) == [1, 2, 3]
    assert gen.main(["--out", str(tmp_path / "bad"), "--studies", "3", "--files", "2"]) == 2


def test_paths_carry_no_dicom_values(corpus: gen.GeneratedCorpus) -> None:
    for p in corpus.paths():
        rel = p.relative_to(corpus.root).as_posix()
        assert re.fullmatch(r"study-\d{3}/series-\d{2}/inst-\d{5}\.dcm", rel), rel


# --- committed samples -----------------------------------------------------------------------------


def test_committed_samples_are_reproducible(tmp_path: Path) -> None:
    """samples/studies is exactly `python -m samples.generate --out samples/studies --small`."""
    assert gen.main(["--out", str(tmp_path), "--small", "-q"]) == 0
    committed = _rel_bytes(COMMITTED)
    assert committed == _rel_bytes(tmp_path)
    assert sum(len(b) for b in committed.values()) < 1_000_000
    modalities = {pydicom.dcmread(COMMITTED / rel).Modality for rel in committed}
    assert {"SR", "KO"} <= modalities
    first = pydicom.dcmread(COMMITTED / "study-001" / "series-01" / "inst-00001.dcm")
    assert str(first.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"


# --- bench harness -----------------------------------------------------------------------------------


def test_run_child_reports_failure_and_stderr() -> None:
    code = "import sys; print('x' * 10); sys.stderr.write('line1\\nboom: broken\\n'); sys.exit(3)"
    run = bench.run_child([sys.executable, "-c", code], timeout_s=30)
    assert run.returncode == 3 and not run.ok
    assert run.stderr_tail.splitlines()[-1] == "boom: broken"
    assert run.peak_rss_mb > 1 and run.elapsed_s > 0
    row = bench._child_row("cmd", run, files=10, baseline=100.0, target=1.0)
    assert row.status == bench.FAILED and row.value is None
    table = bench.format_table([row])
    assert "FAILED" in table and "boom: broken" in table


def test_run_child_timeout_and_missing_command(tmp_path: Path) -> None:
    run = bench.run_child([sys.executable, "-c", "import time; time.sleep(30)"], timeout_s=0.5)
    assert run.timed_out and not run.ok and run.elapsed_s < 10
    missing = bench.run_child([str(tmp_path / "no-such-ingest")], timeout_s=5)
    assert missing.returncode == -1 and "cannot start" in missing.stderr_tail


def test_rows_ratio_and_status() -> None:
    ok = bench.Row("a", 180.0, "files/s", baseline=100.0, target=1.8).finish()
    low = bench.Row("b", 90.0, "files/s", baseline=100.0, target=1.0).finish()
    info = bench.Row("c", 5.0, "files/s").finish()
    assert ok.ratio == pytest.approx(1.8) and ok.status == bench.PASS
    assert low.ratio == pytest.approx(0.9) and low.status == bench.FAIL
    assert (info.ratio, info.status) == (None, bench.INFO)
    lines = bench.format_table([ok, low, info]).splitlines()
    assert lines[0].split()[:7] == ["benchmark", "value", "unit", "baseline", "ratio", "target", "result"]
    assert "1.80x" in lines[2] and ">=1.80x" in lines[2] and "pass" in lines[2]


def test_harness_end_to_end_with_fake_ingest(tmp_path: Path) -> None:
    """The foundation row against a stand-in `ingest` that fails: FAILED rows, JSON written, exit 1."""
    fake = tmp_path / "fake_ingest.py"
    fake.write_text("import sys\nsys.stderr.write('replay: not implemented\\n')\nsys.exit(2)\n")
    original = list(bench.BENCHMARKS)
    calls: list[str] = []

    @bench.benchmark("tiny-fake")
    def tiny(ctx: bench.BenchContext) -> list[bench.Row]:
        corpus = ctx.corpus("t", studies=2, files=4, seed=1, tiny=True)
        calls.append(str(corpus.root))
        run = ctx.best_run(lambda: [*ctx.ingest, "replay", str(corpus.root)])
        return [bench._child_row("fake replay", run, corpus.files, 10.0, 1.0)]

    @bench.benchmark("raises")
    def broken(ctx: bench.BenchContext) -> list[bench.Row]:
        raise RuntimeError("no listener yet")

    try:
        out = tmp_path / "out"
        code = bench.main(
            [
                "--only",
                "fake",
                "--only",
                "raises",
                "--out",
                str(out),
                "--ingest",
                f"{sys.executable} {fake}",
                "--repeats",
                "1",
            ]
        )
    finally:
        bench.BENCHMARKS[:] = original
    assert code == 1
    assert len(calls) == 1 and not Path(calls[0]).exists()  # scratch removed
    result = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["fake replay"]["status"] == "FAILED"
    assert "not implemented" in rows["fake replay"]["detail"]
    assert rows["raises"]["status"] == "FAILED" and "no listener yet" in rows["raises"]["note"]
    assert "replay-dry-run" not in {r["name"] for r in result["rows"]}
