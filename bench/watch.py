"""Benchmarks of the drop-folder watcher and of replay into the embedded backend (issue 5).

Registered in ``bench/run.py`` through :data:`BENCHES`. The functions take the harness's
``BenchContext`` and build rows with the harness's own ``Row`` (looked up through the context's module,
so this file works whether ``bench.run`` runs as ``__main__`` or is imported).

Rows:

- ``replay folder --jobs 2 (backend)`` / ``replay .tar.gz --jobs 2 (backend)``: the generated corpus
  end to end into the embedded backend, vs the single-process ``dcmread`` loop (target >= 1.8x for
  the folder; the archive row is informational).
- ``watch 2,000 files -> backend``: seconds from the last copied file's close until every study is
  readable in the backend with all its instances; target <= settle + stable_age + 2 s.
- ``replay 100k tiny files`` (only with ``BENCH_SCALE=1``: slow): time per file vs the 10,000-file run
  (target <= 1.1x) and peak RSS (target < 500 MB).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom

__all__ = ["BENCHES", "bench_replay_backend", "bench_scale", "bench_watch"]

_SETTLE_MS = 1000
_STABLE_AGE_S = 2.0


def _h(ctx: Any) -> Any:
    """The harness module that made ``ctx`` (``bench.run`` or ``__main__``)."""
    return sys.modules[type(ctx).__module__]


def _dcmread_rate(paths: list[Path]) -> tuple[float, float]:
    for p in paths:  # warm the page cache, like the harness's own baseline
        p.read_bytes()
    t0 = time.perf_counter()
    for p in paths:
        pydicom.dcmread(p, stop_before_pixels=True)
    elapsed = time.perf_counter() - t0
    return len(paths) / elapsed, elapsed


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update({"INGEST_ADMIN__ENABLED": "false", "INGEST_LISTENER__ENABLED": "false", **extra})
    return env


def bench_replay_backend(ctx: Any) -> list[Any]:
    """Replay into the embedded backend, --jobs 2, as a folder and as a .tar.gz, vs the dcmread loop."""
    h = _h(ctx)
    corpus = ctx.headers_corpus()
    paths = corpus.paths()
    baseline, base_s = _dcmread_rate(paths)
    archive = ctx.work / "corpus.tar.gz"
    if not archive.exists():
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(corpus.root, arcname="corpus")
    rows = [h.Row("dcmread loop (baseline, replay->backend)", baseline, "files/s",
                  note=f"{len(paths)} files, {base_s:.2f} s").finish()]
    for name, src, target in (("replay folder --jobs 2 (backend)", corpus.root, 1.8),
                              ("replay .tar.gz --jobs 2 (backend)", archive, None)):

        def argv(src: Path = src) -> list[str]:
            return [*ctx.ingest, "-q", "--data-dir", str(ctx.fresh_dir("data-replay")), "replay", str(src),
                    "--jobs", "2"]

        run = ctx.best_run(argv)
        row = h._child_row(name, run, len(paths), baseline, target or 0.0)
        if target is None and row.status != h.FAILED:
            row.target, row.status = None, h.INFO
        rows.append(row)
    return rows


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _graphql(url: str, query: str) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:  # 127.0.0.1 only
        body: dict[str, Any] = json.loads(resp.read())
    return body


def _backend_counts(url: str) -> tuple[int, int]:
    """(studies, instances) the backend holds."""
    body = _graphql(url, "{ ImagingStudyList(_count: 1000) { id numberOfInstances } }")
    if body.get("errors"):
        raise RuntimeError(f"backend query failed: {body['errors']}")
    studies = (body.get("data") or {}).get("ImagingStudyList") or []
    return len(studies), sum(int(s.get("numberOfInstances") or 0) for s in studies)


def _wait(cond: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if cond():
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def bench_watch(ctx: Any) -> list[Any]:
    """Watcher: 2,000 files copied into the folder -> all studies readable in the embedded backend."""
    h = _h(ctx)
    n_files = ctx.scale(2000, 500)
    corpus = ctx.corpus("watch", studies=20, files=n_files, seed=5)
    data, drop = ctx.fresh_dir("data-watch"), ctx.fresh_dir("drop")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/fhir/R4/$graphql"
    env = _env(INGEST_EMBEDDED_BACKEND__PORT=str(port), INGEST_WATCH__SETTLE_MS=str(_SETTLE_MS),
               INGEST_RELAY__STABLE_AGE_S=str(_STABLE_AGE_S), INGEST_WATCH__JOBS="2")
    budget = _SETTLE_MS / 1000 + _STABLE_AGE_S + 2.0
    name = f"watch {n_files:,} files -> backend"
    err_path = ctx.work / "watch-stderr.txt"
    with err_path.open("wb") as err:
        proc = subprocess.Popen([*ctx.ingest, "-q", "--data-dir", str(data), "watch", str(drop),
                                 "--after", "move"], stdout=subprocess.DEVNULL, stderr=err, env=env,
                                start_new_session=True)
    try:
        if not _wait(lambda: _backend_counts(url) == (0, 0), 120, proc):
            raise RuntimeError(f"ingest watch did not come up: {err_path.read_text()[-1500:]}")
        time.sleep(0.5)  # the watcher starts right after the backend answers
        t0 = time.perf_counter()
        for i, src in enumerate(corpus.paths()):
            shutil.copyfile(src, drop / f"f{i:05d}.dcm")
        closed = time.perf_counter()
        want = (len(corpus.studies), corpus.files)
        if not _wait(lambda: _backend_counts(url) == want, 300, proc):
            raise RuntimeError(f"not all studies readable: {_backend_counts(url)} != {want}; "
                               f"{err_path.read_text()[-1500:]}")
        done = time.perf_counter()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child's group
            proc.wait()
    latency = done - closed
    status = h.PASS if latency <= budget else h.FAIL
    return [h.Row(name, latency, "s", status=status,
                  note=f"last close -> all readable; target <= {budget:.1f} s (settle {_SETTLE_MS} ms + "
                       f"stable_age {_STABLE_AGE_S:g} s + 2 s); copying took {closed - t0:.2f} s",
                  extra={"latency_s": latency, "copy_s": closed - t0})]


def bench_scale(ctx: Any) -> list[Any]:
    """100,000 tiny files vs 10,000: replay time per file and peak RSS (BENCH_SCALE=1; slow)."""
    h = _h(ctx)
    if os.environ.get("BENCH_SCALE") != "1":
        return [h.Row("replay 100k tiny files", None, "s/file", status=h.INFO,
                      note="skipped: set BENCH_SCALE=1 (slow)")]
    small_n, big_n = ctx.scale(10_000, 2_000), ctx.scale(100_000, 20_000)
    runs = {}
    for n in (small_n, big_n):
        corpus = ctx.corpus(f"tiny-{n}", studies=max(1, n // 500), files=n, seed=9, tiny=True)
        runs[n] = h.run_child([*ctx.ingest, "-q", "--data-dir", str(ctx.fresh_dir("data-scale")), "replay",
                               str(corpus.root), "--jobs", "2"], timeout_s=ctx.timeout_s * 4)
    rows = []
    for n, run in runs.items():
        if not run.ok:
            rows.append(h.Row(f"replay {n:,} tiny files", None, "s/file", status=h.FAILED,
                              note="timed out" if run.timed_out else f"exit {run.returncode}",
                              detail=run.stderr_tail))
    if rows:
        return rows
    per_small, per_big = runs[small_n].elapsed_s / small_n, runs[big_n].elapsed_s / big_n
    ratio = per_big / per_small
    rss = runs[big_n].peak_rss_mb
    status = h.PASS if ratio <= 1.1 and rss < 500 else h.FAIL
    return [
        h.Row(f"replay {small_n:,} tiny files", per_small * 1000, "ms/file", status=h.INFO,
              note=f"{runs[small_n].elapsed_s:.1f} s, peak RSS {runs[small_n].peak_rss_mb:.0f} MB"),
        h.Row(f"replay {big_n:,} tiny files", per_big * 1000, "ms/file", status=status,
              note=f"{ratio:.2f}x per file vs {small_n:,} (target <= 1.1x); peak RSS {rss:.0f} MB "
                   f"(target < 500 MB); {runs[big_n].elapsed_s:.1f} s",
              extra={"ratio": ratio, "peak_rss_mb": rss}),
    ]


#: (name, function) pairs for ``bench/run.py`` to register, in table order.
BENCHES: list[tuple[str, Callable[[Any], list[Any]]]] = [
    ("replay-backend", bench_replay_backend),
    ("watch", bench_watch),
    ("replay-scale", bench_scale),
]
