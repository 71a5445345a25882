"""Benchmark harness: ``python -m bench.run [--quick]`` (what ``make bench`` runs).

Every benchmark is a function registered with :func:`benchmark`; it receives a :class:`BenchContext`
(scratch folder, cached synthetic corpora, the ``ingest`` command) and returns :class:`Row` objects.
A row carries its own baseline, measured in the same run on the same data, so the ratio is meaningful
on any machine. The harness prints one table and writes ``bench/out/results.json``.

A benchmark that raises, or whose command exits non-zero, becomes a ``FAILED`` row with the error or
the tail of the child's stderr; the other benchmarks still run.

Adding a row (e.g. replay into the embedded backend, ``storescu`` -> listener, the watcher)::

    @benchmark("listener")
    def bench_listener(ctx: BenchContext) -> list[Row]:
        corpus = ctx.corpus("small", studies=30, files=ctx.scale(5000, 1000))
        ...  # measure a bare baseline and the pipeline, return rows
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from samples.generate import GeneratedCorpus, generate

__all__ = [
    "BENCHMARKS",
    "BenchContext",
    "ChildRun",
    "Row",
    "benchmark",
    "format_table",
    "main",
    "run_benchmarks",
    "run_child",
]

OUT_DIR = Path(__file__).resolve().parent / "out"

PASS, FAIL, FAILED, INFO = "pass", "fail", "FAILED", "info"


@dataclass
class Row:
    """One line of the results table.

    ``value`` and ``baseline`` share ``unit`` and are "higher is better" rates; ``target`` is the
    minimum acceptable ``ratio = value / baseline``. ``status`` is ``pass``/``fail`` against the
    target, ``info`` for a row without target (a baseline), ``FAILED`` when it could not be measured.
    """

    name: str
    value: float | None
    unit: str
    baseline: float | None = None
    target: float | None = None
    status: str = ""
    note: str = ""
    detail: str = ""  # e.g. the stderr tail of a failed command; printed below the table
    extra: dict[str, float] = field(default_factory=dict)  # peak RSS, CPU seconds, ...

    @property
    def ratio(self) -> float | None:
        """``value / baseline`` when both are known."""
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    def finish(self) -> Row:
        """Fill ``status`` from the ratio and the target unless already decided."""
        if not self.status:
            if self.value is None:
                self.status = FAILED
            elif self.target is None:
                self.status = INFO
            else:
                ratio = self.ratio
                self.status = PASS if ratio is not None and ratio >= self.target else FAIL
        return self

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON-ready dict, including the computed ratio."""
        data = asdict(self)
        data["ratio"] = self.ratio
        return data


@dataclass(frozen=True)
class ChildRun:
    """Outcome of one timed child process."""

    argv: tuple[str, ...]
    returncode: int
    elapsed_s: float
    peak_rss_mb: float  # largest resident set of the child or any of its reaped descendants
    cpu_s: float  # user + system CPU of the child and its reaped descendants
    stderr_tail: str
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """True when the command exited 0 within its time limit."""
        return self.returncode == 0 and not self.timed_out


def _tail(text: str, lines: int = 12, chars: int = 2000) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])[-chars:]


def run_child(
    argv: Sequence[str], *, timeout_s: float, env: dict[str, str] | None = None, cwd: Path | None = None
) -> ChildRun:
    """Run ``argv`` with stdout to /dev/null and time it with :func:`time.perf_counter`.

    The child is reaped with :func:`os.wait4`, whose rusage covers exactly this child and the
    descendants it reaped (worker processes), unlike ``getrusage(RUSAGE_CHILDREN)``, which
    accumulates over every child this process ever had.

    Parameters
    ----------
    argv:
        The command.
    timeout_s:
        The child (its process group) is killed after this many seconds.
    env, cwd:
        Passed to :class:`subprocess.Popen`.

    Returns
    -------
    ChildRun
        Exit code (-1 if it could not start), wall time, peak RSS, CPU time and the stderr tail.
    """
    with tempfile.TemporaryFile() as err:
        try:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            return ChildRun(tuple(argv), -1, 0.0, 0.0, 0.0, f"cannot start {argv[0]!r}: {exc}")
        timed_out = threading.Event()

        def _kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # our own child's group, made by start_new_session

        timer = threading.Timer(timeout_s, _kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        elapsed = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; keep Popen consistent
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    rss_mb = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2**20
    return ChildRun(
        tuple(argv),
        proc.returncode,
        elapsed,
        rss_mb,
        usage.ru_utime + usage.ru_stime,
        _tail(stderr),
        timed_out.is_set(),
    )


@dataclass
class BenchContext:
    """What a benchmark gets: scratch space, cached corpora and the command to run."""

    work: Path
    quick: bool
    ingest: tuple[str, ...]
    repeats: int = 1
    timeout_s: float = 600.0
    _corpora: dict[str, GeneratedCorpus] = field(default_factory=dict)

    def scale(self, full: int, quick: int) -> int:
        """``quick`` under ``--quick``, else ``full``."""
        return quick if self.quick else full

    def headers_corpus(self) -> GeneratedCorpus:
        """The replay benchmarks' corpus: 20,000 files in 60 studies (2,000 in 6 with ``--quick``), 64x64
        images; large enough that a replay's fixed cost (start-up, imports, the backend) is a small
        share of the whole, as it is for the archives replay is for."""
        return self.corpus("headers", studies=self.scale(60, 6), files=self.scale(20000, 2000), seed=1)

    def corpus(self, name: str, **kwargs: Any) -> GeneratedCorpus:
        """Generate (once per run) the corpus ``name`` with :func:`samples.generate.generate`."""
        if name not in self._corpora:
            self._corpora[name] = generate(self.work / "corpora" / name, **kwargs)
        return self._corpora[name]

    def fresh_dir(self, prefix: str) -> Path:
        """A new empty folder under the scratch space (e.g. a ``--data-dir``)."""
        return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=self.work))

    def best_run(
        self, argv_for: Callable[[], Sequence[str]], env: dict[str, str] | None = None
    ) -> ChildRun:
        """Run a command ``repeats`` times (fresh argv each time) and keep the fastest successful run."""
        best: ChildRun | None = None
        for _ in range(self.repeats):
            run = run_child(argv_for(), timeout_s=self.timeout_s, env=env)
            if not run.ok:
                return run
            if best is None or run.elapsed_s < best.elapsed_s:
                best = run
        assert best is not None
        return best

    def fixed_cost(self, argv: Sequence[str], env: dict[str, str] | None = None) -> ChildRun:
        """:meth:`best_run` of ``argv`` after one untimed run (which creates its data dir's state store,
        as a rerun finds it): what a command costs before any work, e.g. a replay of an empty folder."""
        first = run_child(argv, timeout_s=self.timeout_s, env=env)
        return first if not first.ok else self.best_run(lambda: argv, env)


Benchmark = Callable[[BenchContext], list[Row]]
BENCHMARKS: list[tuple[str, Benchmark]] = []


def benchmark(name: str) -> Callable[[Benchmark], Benchmark]:
    """Register a benchmark function under ``name`` (the order of registration is the table order)."""

    def register(fn: Benchmark) -> Benchmark:
        BENCHMARKS.append((name, fn))
        return fn

    return register


def _child_row(name: str, run: ChildRun, files: int, baseline: float, target: float) -> Row:
    if not run.ok:
        why = "timed out" if run.timed_out else f"exit {run.returncode}"
        return Row(
            name,
            None,
            "files/s",
            baseline,
            target,
            FAILED,
            note=why,
            detail=f"$ {shlex.join(run.argv)}\n{run.stderr_tail}",
        ).finish()
    return Row(
        name,
        files / run.elapsed_s,
        "files/s",
        baseline,
        target,
        note=f"{run.elapsed_s:.2f} s, cpu {run.cpu_s:.1f} s, peak RSS {run.peak_rss_mb:.0f} MB",
        extra={"elapsed_s": run.elapsed_s, "cpu_s": run.cpu_s, "peak_rss_mb": run.peak_rss_mb},
    ).finish()


# --------------------------------------------------------------------------------------------------
# Benchmarks


@benchmark("replay-dry-run")
def bench_replay_dry_run(ctx: BenchContext) -> list[Row]:
    """Header parsing: ``ingest replay --dry-run`` (1 and 2 jobs) vs a raw ``dcmread`` loop.

    Baseline: ``pydicom.dcmread(f, stop_before_pixels=True)`` over every file, in this process,
    after one pass that reads the bytes (so neither side pays for a cold page cache).
    """
    corpus = ctx.headers_corpus()
    paths = corpus.paths()
    t0 = time.perf_counter()
    for p in paths:
        p.read_bytes()
    read_s = time.perf_counter() - t0
    best = float("inf")
    for _ in range(ctx.repeats):
        t0 = time.perf_counter()
        for p in paths:
            pydicom.dcmread(p, stop_before_pixels=True)
        best = min(best, time.perf_counter() - t0)
    baseline = len(paths) / best
    rows = [
        Row(
            "read bytes (I/O floor)",
            len(paths) / read_s,
            "files/s",
            note=f"{len(paths)} files, {corpus.total_bytes / 1e6:.0f} MB, {read_s:.2f} s",
        ).finish(),
        Row(
            "dcmread loop (baseline)",
            baseline,
            "files/s",
            note=f"{len(paths)} files in {len(corpus.studies)} studies, {best:.2f} s",
        ).finish(),
    ]
    for jobs, target in ((1, 1.5), (2, 2.5)):  # issue 12

        def argv(jobs: int = jobs) -> list[str]:
            return [
                *ctx.ingest,
                "--data-dir",
                str(ctx.fresh_dir(f"data-j{jobs}")),
                "replay",
                str(corpus.root),
                "--dry-run",
                "--jobs",
                str(jobs),
            ]

        rows.append(
            _child_row(f"replay --dry-run --jobs {jobs}", ctx.best_run(argv), len(paths), baseline, target)
        )
    empty, data_dir = ctx.fresh_dir("dry-empty"), ctx.fresh_dir("data-empty")
    fixed = ctx.fixed_cost([*ctx.ingest, "--data-dir", str(data_dir), "replay", str(empty), "--dry-run"])
    if fixed.ok:
        budget = ", ".join(f"<= {len(paths) / (t * baseline):.2f} s for {t}x" for t in (1.5, 2.5))
        rows.append(
            Row(
                "replay --dry-run: fixed cost (empty folder, whole process)",
                fixed.elapsed_s,
                "s",
                note=f"a whole dry run of {len(paths)} files must take {budget}",
            ).finish()
        )
    else:
        rows.append(_child_row("replay --dry-run: fixed cost (empty folder)", fixed, 0, baseline, 0.0))
    return rows


BENCHMARKS.extend(__import__("bench.watch", fromlist=["BENCHES"]).BENCHES)  # watcher/replay rows
BENCHMARKS.extend(__import__("bench.e2e", fromlist=["BENCHES"]).BENCHES)  # replay end to end rows
__import__("bench.listener")  # storescu -> listener rows; registers itself with @benchmark
__import__("bench.commitment")  # Storage Commitment rows; registers itself with @benchmark
__import__("bench.sync")  # ingest sync vs the PACS forwarding by C-STORE; registers itself with @benchmark


# --------------------------------------------------------------------------------------------------
# Runner and output


def run_benchmarks(ctx: BenchContext, only: Sequence[str] = ()) -> list[Row]:
    """Run the registered benchmarks (those whose name contains one of ``only``, if given)."""
    rows: list[Row] = []
    for name, fn in BENCHMARKS:
        if only and not any(o in name for o in only):
            continue
        print(f"· {name} …", file=sys.stderr, flush=True)
        try:
            rows.extend(fn(ctx))
        except Exception as exc:  # a broken benchmark is a FAILED row, never the end of the run
            rows.append(
                Row(
                    name,
                    None,
                    "",
                    status=FAILED,
                    note=f"{type(exc).__name__}: {exc}",
                    detail=_tail(traceback.format_exc()),
                )
            )
    return rows


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"


def format_table(rows: Sequence[Row]) -> str:
    """Render rows as a fixed-width text table, with failure details below it."""
    header = ("benchmark", "value", "unit", "baseline", "ratio", "target", "result", "notes")
    body = [
        (
            r.name,
            _num(r.value),
            r.unit,
            _num(r.baseline),
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            "-" if r.target is None else f">={r.target:.2f}x",
            r.status,
            r.note,
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    right = {1, 3, 4, 5}

    def fmt(line: Sequence[str]) -> str:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(b) for b in body]
    for r in rows:
        if r.status == FAILED and r.detail:
            lines += ["", f"{r.name}: FAILED ({r.note})", *("    " + d for d in r.detail.splitlines())]
    return "\n".join(lines)


def _default_ingest() -> tuple[str, ...]:
    script = Path(sys.executable).with_name("ingest")
    if script.exists():
        return (str(script),)
    found = shutil.which("ingest")
    return (found,) if found else (sys.executable, "-m", "ingest")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description="Benchmark ingest against baselines.")
    p.add_argument("--quick", action="store_true", help="smaller corpora, one repetition")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only benchmarks whose name contains NAME (repeatable)",
    )
    p.add_argument("--out", type=Path, default=OUT_DIR, help="folder for results.json (default bench/out)")
    p.add_argument(
        "--ingest", default=None, help="the ingest command, shell-quoted (default: the venv's ingest script)"
    )
    p.add_argument("--repeats", type=int, default=None, help="repetitions per measurement (best kept)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a child is killed")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (corpora, data dirs)")
    p.add_argument("--check", action="store_true", help="exit 1 if any row misses its target")
    p.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    p.add_argument(
        "--scale", action="store_true", help="add the scale-out benchmark (bench/scale.py)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, print the table, write ``results.json``; return the exit code.

    Exit codes: 0 all measured (and, with ``--check``, all targets met); 1 a row FAILED or
    (with ``--check``) missed its target.
    """
    args = _parser().parse_args(argv)
    if args.scale and not any(name == "multinode-scale" for name, _ in BENCHMARKS):
        from bench.scale import bench_scale

        BENCHMARKS.append(("multinode-scale", bench_scale))
    if args.list:
        for name, fn in BENCHMARKS:
            print(f"{name}: {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    ingest = tuple(shlex.split(args.ingest)) if args.ingest else _default_ingest()
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 2)
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    started = dt.datetime.now(dt.UTC)
    try:
        ctx = BenchContext(
            work=work, quick=args.quick, ingest=ingest, repeats=max(1, repeats), timeout_s=args.timeout
        )
        rows = run_benchmarks(ctx, args.only)
    finally:
        if args.keep:
            print(f"scratch kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(format_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "started": started.isoformat(timespec="seconds"),
        "quick": args.quick,
        "repeats": repeats,
        "ingest": list(ingest),
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "pydicom": pydicom.__version__,
            "platform": platform.platform(),
        },
        "rows": [r.to_json() for r in rows],
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nresults: {args.out / 'results.json'}")
    if any(r.status == FAILED for r in rows):
        return 1
    return 1 if args.check and any(r.status == FAIL for r in rows) else 0


if __name__ == "__main__":
    # Run the canonical ``bench.run`` module, not this ``__main__`` copy: benchmark modules register into
    # ``bench.run.BENCHMARKS`` when they import it.
    from bench import run as _canonical

    raise SystemExit(_canonical.main())
