"""End-to-end benchmark: ``ingest replay`` into the embedded backend vs a raw ``dcmread`` loop.

Registered in ``bench/run.py`` through :data:`BENCHES`; the function takes the harness's ``BenchContext``
and builds rows with the harness's own ``Row`` (looked up through the context's module, so this file
works whether ``bench.run`` runs as ``__main__`` or is imported).

Same corpus as the foundation benchmark (``BenchContext.headers_corpus``: 60 studies, 20,000 files;
2,000 with ``--quick``). The backend is
``ingest backend`` run as a separate process on a free 127.0.0.1 port (fresh database per repetition),
so its ``GET /stats`` counters can be read; ``INGEST_BACKEND__URL`` points the replay at it. Rows:

- ``dcmread loop (baseline, e2e)``: ``pydicom.dcmread(stop_before_pixels=True)`` over every file.
- ``replay e2e --jobs 2 (new)``: ``ingest replay --jobs 2`` with a fresh data dir into an empty
  backend, whole process; target >= 2.5x the baseline (issue 12).
- ``replay e2e --jobs 2 (unchanged rerun)``: the same command again on the same data dir; it decides
  "nothing to do" from the state store's file identities (path, size, mtime, digest) without reading
  the files; target >= 5x the baseline (issue 12).
- ``backend requests per new study``: (lookups + reads + creates + updates) / studies during the first
  run; target <= 2 (the one schema introspection per process is reported in the note).
- ``backend writes on unchanged rerun``: creates + updates + deletes during the rerun; target 0.

Run alone: ``python -m bench.e2e [--quick]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom

__all__ = ["BENCHES", "bench_e2e"]

_OPS = ("lookups", "reads", "creates", "updates", "deletes")


def _h(ctx: Any) -> Any:
    """The harness module that made ``ctx`` (``bench.run`` or ``__main__``)."""
    return sys.modules[type(ctx).__module__]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_json(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url, timeout=5) as resp:  # 127.0.0.1 only
        body: dict[str, int] = json.loads(resp.read())
    return body


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update({"INGEST_ADMIN__ENABLED": "false", "INGEST_LISTENER__ENABLED": "false", **extra})
    return env


@contextlib.contextmanager
def _backend(ingest: tuple[str, ...], data_dir: Path, timeout_s: float = 60.0) -> Iterator[str]:
    """``ingest backend`` on a free port; yields its base URL; stops exactly that process afterwards."""
    port = _free_port()
    log = (data_dir / "backend.log").open("wb")
    proc = subprocess.Popen(
        [*ingest, "-q", "--data-dir", str(data_dir), "backend", "--host", "127.0.0.1", "--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
        env=_env(),
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"ingest backend exited with {proc.returncode}; see {data_dir / 'backend.log'}"
                )
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{base}/healthz", timeout=1).close()
                break
            if time.monotonic() > deadline:
                raise RuntimeError("ingest backend did not answer /healthz in time")
            time.sleep(0.05)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # our own child, by its PID
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()


def _dcmread_rate(paths: list[Path], repeats: int) -> tuple[float, float]:
    for p in paths:  # warm the page cache, like the harness's own baseline
        p.read_bytes()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in paths:
            pydicom.dcmread(p, stop_before_pixels=True)
        best = min(best, time.perf_counter() - t0)
    return len(paths) / best, best


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in ("requests", *_OPS)}


def bench_e2e(ctx: Any) -> list[Any]:
    """``ingest replay --jobs 2`` end to end into the embedded backend, then unchanged, vs dcmread."""
    h = _h(ctx)
    corpus = ctx.headers_corpus()
    paths = corpus.paths()
    studies = len(corpus.studies)
    baseline, base_s = _dcmread_rate(paths, ctx.repeats)
    rows = [
        h.Row(
            "dcmread loop (baseline, e2e)",
            baseline,
            "files/s",
            note=f"{len(paths)} files in {studies} studies, {base_s:.2f} s",
        ).finish()
    ]
    best: tuple[Any, Any, dict[str, int], dict[str, int]] | None = None
    for _ in range(ctx.repeats):
        backend_dir = ctx.fresh_dir("e2e-backend")
        data_dir = ctx.fresh_dir("e2e-data")
        with _backend(ctx.ingest, backend_dir) as base:
            env = _env(INGEST_BACKEND__URL=f"{base}/fhir/R4/$graphql")
            argv = [*ctx.ingest, "-q", "--data-dir", str(data_dir), "replay", str(corpus.root), "--jobs", "2"]
            s0 = _get_json(f"{base}/stats")
            first = h.run_child(argv, timeout_s=ctx.timeout_s, env=env)
            s1 = _get_json(f"{base}/stats")
            second = h.run_child(argv, timeout_s=ctx.timeout_s, env=env) if first.ok else first
            s2 = _get_json(f"{base}/stats")
        if not first.ok or not second.ok:
            best = (first, second, _delta(s1, s0), _delta(s2, s1))
            break
        if best is None or first.elapsed_s < best[0].elapsed_s:
            best = (first, second, _delta(s1, s0), _delta(s2, s1))
    assert best is not None
    first, second, new_ops, rerun_ops = best
    rows.append(h._child_row("replay e2e --jobs 2 (new)", first, len(paths), baseline, 2.5))
    rows.append(h._child_row("replay e2e --jobs 2 (unchanged rerun)", second, len(paths), baseline, 5.0))
    rows.append(_fixed_cost_row(ctx, h, len(paths), baseline, second))
    if first.ok:
        per_study = sum(new_ops[k] for k in ("lookups", "reads", "creates", "updates")) / studies
        rows.append(
            h.Row(
                "backend requests per new study",
                per_study,
                "req/study",
                status=h.PASS if per_study <= 2.0 else h.FAIL,
                note=(
                    f"target <= 2; {new_ops['lookups']} lookups, {new_ops['reads']} reads, "
                    f"{new_ops['creates']} creates, {new_ops['updates']} updates for {studies} studies; "
                    f"{new_ops['requests']} HTTP requests incl. schema introspection"
                ),
            )
        )
    if second.ok:
        writes = rerun_ops["creates"] + rerun_ops["updates"] + rerun_ops["deletes"]
        rows.append(
            h.Row(
                "backend writes on unchanged rerun",
                float(writes),
                "writes",
                status=h.PASS if writes == 0 else h.FAIL,
                note=f"target 0; {rerun_ops['requests']} HTTP requests, {rerun_ops['lookups']} lookups",
            )
        )
    return rows


_FIXED = "replay e2e: fixed cost (empty folder, whole process)"


def _fixed_cost_row(ctx: Any, h: Any, files: int, baseline: float, rerun: Any) -> Any:
    """What a replay process costs before its first file: ``ingest replay`` of an empty folder (start-up,
    imports, settings, opening the state store; ``BenchContext.fixed_cost``); the note says what the
    targets leave for the whole run."""
    empty, data_dir = ctx.fresh_dir("e2e-empty"), ctx.fresh_dir("e2e-data")
    argv = [*ctx.ingest, "-q", "--data-dir", str(data_dir), "replay", str(empty), "--jobs", "2"]
    with _backend(ctx.ingest, ctx.fresh_dir("e2e-backend")) as base:
        fixed = ctx.fixed_cost(argv, env=_env(INGEST_BACKEND__URL=f"{base}/fhir/R4/$graphql"))
    if not fixed.ok:
        return h.Row(_FIXED, None, "s", status=h.FAILED, note=f"exit {fixed.returncode}",
                     detail=fixed.stderr_tail)  # fmt: skip
    budget = {t: files / (t * baseline) for t in (2.5, 5.0)}
    note = (
        f"a whole replay of {files} files must take <= {budget[2.5]:.2f} s for 2.5x, <= {budget[5.0]:.2f} s "
        "for 5x"
    )
    if rerun.ok and rerun.elapsed_s > fixed.elapsed_s:
        rest = files / (rerun.elapsed_s - fixed.elapsed_s)
        note += f"; the rerun past it: {rest:,.0f} files/s ({rest / baseline:.1f}x)"
    return h.Row(_FIXED, fixed.elapsed_s, "s", note=note).finish()


BENCHES: list[tuple[str, Callable[[Any], list[Any]]]] = [("replay-e2e", bench_e2e)]


def main(argv: list[str] | None = None) -> int:
    """Run only this benchmark through the harness (``python -m bench.e2e [--quick]``)."""
    from bench import run

    args = list(argv if argv is not None else sys.argv[1:])
    return run.main([*args, "--only", "replay-e2e"])


if __name__ == "__main__":
    raise SystemExit(main())
