"""Scale-out benchmark: one replay split over 2 processes on PostgreSQL vs 1 process on SQLite.

``python -m bench.run --scale`` adds it to the run (``--scale --only multinode`` runs it alone). Rows
are built with the harness's own ``Row`` (looked up through the context's module, so this file works
whether ``bench.run`` runs as ``__main__`` or is imported). Same corpus, same run:

Corpus: 20,000 files in 40 studies (5,000 with ``--quick``): on the 5,000-file corpus one process needs
~5 s, most of it fixed start-up cost (imports, backend connection, schema introspection), which two
processes cannot share; 20,000 files make the per-file work dominate.

- baseline: ``ingest replay <corpus> --jobs 1`` on the default SQLite store into a fresh embedded backend;
- two ``ingest replay <half> --jobs 1`` processes started together over disjoint halves of the corpus
  (alternate study folders), sharing one throwaway PostgreSQL cluster and one fresh embedded backend;
- two ``ingest replay <corpus> --shard K/2 --jobs 1`` processes started together over the whole corpus
  (files dealt by the hash of their path, so most studies have files in both shards), on a fresh
  database of the same cluster and another fresh embedded backend; their backend writes are shown
  (a study split across shards may be written once by each).

Each process parses with one job: a process stands for one machine with one core, so the ratio measures
what a second node adds (target >= 1.6x on 2 CPUs). The backend writes (``/stats`` creates + updates) of
both runs must be equal: splitting the input must not cost extra writes.

The backend is ``ingest backend --port 0`` as its own process; the cluster is started as the ``postgres``
user when running as root. Without PostgreSQL binaries the rows are ``FAILED`` with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.run import BenchContext, ChildRun, Row

__all__ = ["bench_scale", "postgres_cluster", "split_by_study"]

_TARGET = 1.6


def _harness(ctx: BenchContext) -> ModuleType:
    """The harness module that made ``ctx`` (``bench.run`` or ``__main__``)."""
    return sys.modules[type(ctx).__module__]


def _pg_bin(name: str) -> str | None:
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).is_file():
            return str(folder / name)
    return shutil.which(name)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (its own temporary folder, removed after); yields a URL.

    Raises
    ------
    RuntimeError
        When the binaries are missing or the cluster does not start.
    """
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise RuntimeError("PostgreSQL binaries (initdb, pg_ctl) not found")
    # not under the harness's scratch folder: that one is root's 0700, and the cluster runs as postgres
    base = Path(tempfile.mkdtemp(prefix="ingest-bench-pg-"))
    try:
        run_as: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(base, "postgres")
            run_as = ["runuser", "-u", "postgres", "--"]
        data = base / "data"
        made = subprocess.run(
            [*run_as, initdb, "-D", str(data), "-U", "ingest", "--auth=trust", "-E", "UTF8", "--no-sync"],
            capture_output=True,
        )
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed: {made.stderr.decode(errors='replace')[-500:]}")
        port = _free_port()
        # durable commits as in production (fsync on); only the cluster's lifetime is throwaway
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c max_connections=50"
        started = subprocess.run(
            [*run_as, pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w", "-o", opts, "start"],
            capture_output=True,
        )
        if started.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {started.stderr.decode(errors='replace')[-500:]}")
        try:
            yield f"postgresql://ingest@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(
                [*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def _backend(ctx: BenchContext, name: str) -> Iterator[tuple[str, str]]:
    """``ingest backend --port 0`` in a fresh data dir; yields (GraphQL URL, base URL)."""
    data = ctx.fresh_dir(name)
    log = data / "backend.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [*ctx.ingest, "--data-dir", str(data), "backend", "--port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=_env(),
        )
    try:
        deadline = time.monotonic() + 60
        found = None
        while found is None and time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+/fhir/R4/\$graphql)", log.read_text())
            time.sleep(0.05)
        if found is None:
            raise RuntimeError(f"embedded backend did not start: {log.read_text()[-500:]}")
        url = found[1]
        yield url, url.split("/fhir/", 1)[0]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # our own child, by its handle
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update({"INGEST_LOG__LEVEL": "INFO", **extra})
    return env


def _writes(base: str) -> int:
    with urllib.request.urlopen(f"{base}/stats", timeout=30) as resp:
        stats = json.loads(resp.read())
    return int(stats.get("creates", 0)) + int(stats.get("updates", 0))


def _new_database(server_url: str, name: str) -> str:
    """A new database ``name`` on the cluster at ``server_url``; its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def split_by_study(root: Path, parts: int = 2) -> list[list[Path]]:
    """The study folders under ``root`` dealt round-robin into ``parts`` disjoint lists."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    return [folders[i::parts] for i in range(parts)]


def _concurrently(
    h: ModuleType, argvs: Sequence[Sequence[str]], env: dict[str, str], timeout_s: float
) -> tuple[float, list[ChildRun]]:
    runs: list[ChildRun | None] = [None] * len(argvs)

    def one(i: int) -> None:
        runs[i] = h.run_child(argvs[i], timeout_s=timeout_s, env=env)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(argvs))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return elapsed, [r for r in runs if r is not None]


def _failed(h: ModuleType, name: str, note: str, detail: str = "") -> Row:
    row: Row = h.Row(name, None, "files/s", status=h.FAILED, note=note, detail=detail)
    return row


def bench_scale(ctx: BenchContext) -> list[Row]:
    """Replay split over 2 processes on PostgreSQL vs 1 process on SQLite: files/s and backend writes."""
    h = _harness(ctx)
    corpus = ctx.corpus("scale", studies=40, files=ctx.scale(20000, 5000), seed=1)
    files = corpus.files
    halves = split_by_study(corpus.root)

    with _backend(ctx, "scale-backend-1") as (url, base):
        single: ChildRun = h.run_child(
            [
                *ctx.ingest,
                "--data-dir",
                str(ctx.fresh_dir("scale-sqlite")),
                "replay",
                str(corpus.root),
                "--jobs",
                "1",
            ],
            timeout_s=ctx.timeout_s,
            env=_env(INGEST_BACKEND__URL=url),
        )
        single_writes = _writes(base)
    if not single.ok:
        return [_failed(h, "replay 1 process, SQLite", f"exit {single.returncode}", single.stderr_tail)]
    single_rate = files / single.elapsed_s

    try:
        with postgres_cluster() as pg, _backend(ctx, "scale-backend-2") as (url, base):
            argvs = [
                [
                    *ctx.ingest,
                    "--data-dir",
                    str(ctx.fresh_dir(f"scale-pg-{i}")),
                    "replay",
                    *map(str, half),
                    "--jobs",
                    "1",
                ]
                for i, half in enumerate(halves)
            ]
            elapsed, runs = _concurrently(
                h, argvs, _env(INGEST_BACKEND__URL=url, INGEST_STATE__URL=pg), ctx.timeout_s
            )
            multi_writes = _writes(base)
            shard_pg = _new_database(pg, "shards")
            with _backend(ctx, "scale-backend-3") as (shard_url, shard_base):
                shard_argvs = [
                    [*ctx.ingest, "--data-dir", str(ctx.fresh_dir(f"scale-shard-{k}")), "replay",
                     str(corpus.root), "--shard", f"{k}/2", "--jobs", "1"]
                    for k in (1, 2)
                ]
                shard_elapsed, shard_runs = _concurrently(
                    h, shard_argvs, _env(INGEST_BACKEND__URL=shard_url, INGEST_STATE__URL=shard_pg),
                    ctx.timeout_s,
                )
                shard_writes = _writes(shard_base)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        runs, failure = [], str(exc)
    else:
        failure = ""
    bad = [r for r in runs if not r.ok]
    rows = [
        h.Row(
            "replay 1 process, SQLite (baseline)",
            single_rate,
            "files/s",
            note=f"{files} files, {single.elapsed_s:.2f} s, cpu {single.cpu_s:.1f} s, "
            f"{single_writes} backend writes",
            extra={"elapsed_s": single.elapsed_s, "backend_writes": float(single_writes)},
        ).finish()
    ]
    if failure:
        rows.append(_failed(h, "replay 2 processes, PostgreSQL", failure))
        return rows
    if bad:
        rows.append(
            _failed(h, "replay 2 processes, PostgreSQL", f"exit {bad[0].returncode}", bad[0].stderr_tail)
        )
        return rows
    rows.append(
        h.Row(
            "replay 2 processes, PostgreSQL",
            files / elapsed,
            "files/s",
            single_rate,
            _TARGET,
            note=f"{elapsed:.2f} s wall ({', '.join(f'{r.elapsed_s:.2f}' for r in runs)} s), "
            f"cpu {sum(r.cpu_s for r in runs):.1f} s, {multi_writes} backend writes",
            extra={"elapsed_s": elapsed, "backend_writes": float(multi_writes)},
        ).finish()
    )
    bad_shards = [r for r in shard_runs if not r.ok]
    if bad_shards:
        rows.append(_failed(h, "replay --shard 1/2 + 2/2, PostgreSQL", f"exit {bad_shards[0].returncode}",
                            bad_shards[0].stderr_tail))
    else:
        rows.append(
            h.Row(
                "replay --shard 1/2 + 2/2, PostgreSQL",
                files / shard_elapsed,
                "files/s",
                single_rate,
                _TARGET,
                note=f"{shard_elapsed:.2f} s wall ({', '.join(f'{r.elapsed_s:.2f}' for r in shard_runs)} s), "
                f"cpu {sum(r.cpu_s for r in shard_runs):.1f} s, {shard_writes} backend writes",
                extra={"elapsed_s": shard_elapsed, "backend_writes": float(shard_writes)},
            ).finish()
        )
    rows.append(
        h.Row(
            "backend writes, 2 processes vs 1",
            float(multi_writes),
            "writes",
            float(single_writes),
            status=h.PASS if multi_writes == single_writes else h.FAIL,
            note="target: equal",
        )
    )
    return rows
