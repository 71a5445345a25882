"""Backend faults during ``ingest replay`` (docs/reliability.md "Bad input the tests cover").

The real command line runs as a child process with ``INGEST_BACKEND__URL`` pointing at a
:class:`tests.faultproxy.FaultProxy` in front of the embedded backend (both in the test's event loop, on
127.0.0.1 with OS-chosen ports) and with small ``[relay]`` backoff settings. Every test ends by checking
the backend itself: each study exactly once, with all its instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

from samples.generate import GeneratedCorpus, generate
from tests.faultproxy import (
    Fault,
    FaultProxy,
    fault_proxy,
    ingest_env,
    is_create,
    is_write,
    run_ingest,
    running_backend,
    stats,
    studies_with_identifier,
)

GRAPHQL = "/fhir/R4/$graphql"


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("INGEST_")]:
        monkeypatch.delenv(key)


async def _assert_all_written_once(backend_graphql: str, corpus: GeneratedCorpus) -> None:
    for s in corpus.studies:
        found = await studies_with_identifier(backend_graphql, s.study_uid)
        assert len(found) == 1, f"study {s.study_uid}: {len(found)} ImagingStudy resources"
        assert found[0]["numberOfInstances"] == s.instances
        assert found[0]["numberOfSeries"] == len(s.series)


async def _replay(
    tmp_path: Path, corpus: Any, env: dict[str, str], timeout: float = 60,
    stderr_lines: list[str] | None = None,
) -> Any:
    """``ingest replay <corpus> --jobs 1 --json`` on the test's data dir."""
    return await run_ingest(
        tmp_path / "data", "replay", str(corpus.root), "--jobs", "1", "--json", env=env, cwd=tmp_path,
        timeout=timeout, stderr_lines=stderr_lines,
    )


async def _when(predicate: Any, timeout: float = 30.0) -> None:
    """Wait until ``predicate()`` holds (polling the proxy's counters)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def test_backend_down_at_start_and_mid_replay_all_40_written_once(tmp_path: Path) -> None:
    corpus = generate(tmp_path / "corpus", studies=40, files=40, seed=201, tiny=True)
    async with running_backend(tmp_path / "backend.sqlite3") as base, fault_proxy(base) as proxy:
        await proxy.down()  # down at start: the replay reads its input and waits for the backend
        writes_seen: list[int] = []
        created_at_outage: list[int] = []
        proxy.arm(Fault("delay", times=10_000, when=_counting(writes_seen), seconds=0.0))

        def input_read() -> bool:  # the replay has stored all 40 studies: it now needs the backend
            db = tmp_path / "data" / "state.sqlite3"
            if not db.exists():
                return False
            try:
                with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.2)) as c:
                    return int(c.execute("SELECT count(*) FROM studies").fetchone()[0]) >= 40
            except sqlite3.Error:
                return False

        said: list[str] = []

        async def outages() -> None:
            await _when(input_read, timeout=60)
            # the first connection attempts after the input is read are refused (the replay says so)
            await _when(lambda: any("backend unreachable at start" in line for line in said), timeout=60)
            await proxy.up()
            await _when(lambda: len(writes_seen) >= 12)  # about a third of the way through the pushes
            await proxy.down()  # "30 s" of the issue, shortened to 5 s: same shape, faster test
            created_at_outage.append((await stats(base))["creates"])
            await asyncio.sleep(5.0)
            await proxy.up()

        scenario = asyncio.ensure_future(outages())
        run = await _replay(tmp_path, corpus, ingest_env(proxy.graphql_url), stderr_lines=said)
        await scenario
        assert run.returncode == 0, run.stderr
        summary = run.json()
        assert summary["studies"]["created"] + summary["studies"]["unchanged"] == 40
        assert summary["studies"]["dead"] == 0
        assert "backend unreachable at start" in run.stderr
        assert 0 < created_at_outage[0] < 40  # the second outage really came in the middle of the pushes
        assert "backend unavailable" in run.stderr  # retried pushes during the mid-replay outage
        await _assert_all_written_once(base + GRAPHQL, corpus)


def _counting(seen: list[int]) -> Any:
    def when(body: dict[str, Any]) -> bool:
        if is_write(body):
            seen.append(1)
        return False  # count only; never applies

    return when


async def test_http_500_and_429_are_retried(tmp_path: Path) -> None:
    corpus = generate(tmp_path / "corpus", studies=3, files=6, seed=202, tiny=True)
    async with running_backend(tmp_path / "backend.sqlite3") as base, fault_proxy(base) as proxy:
        f500 = proxy.arm(Fault("status", times=3, when=is_create, status=500))
        f429 = proxy.arm(Fault("status", times=2, status=429, headers={"Retry-After": "0"}))
        run = await _replay(tmp_path, corpus, ingest_env(proxy.graphql_url))
        assert run.returncode == 0, run.stderr
        assert (f500.hits, f429.hits) == (3, 2)
        assert run.json()["studies"]["created"] == 3
        assert "HTTP 500" in run.stderr and "HTTP 429" in run.stderr
        await _assert_all_written_once(base + GRAPHQL, corpus)
        assert (await stats(base))["creates"] == 3


def _bad_started(body: dict[str, Any]) -> dict[str, Any]:
    """The create with ImagingStudy.started broken: a real validation error from the backend."""
    res = dict(body["variables"]["res"])
    res["started"] = "2024-13-45"
    return {**body, "variables": {**body["variables"], "res": res}}


async def test_validation_error_dead_letter_then_retry_succeeds(tmp_path: Path) -> None:
    corpus = generate(tmp_path / "corpus", studies=2, files=4, seed=203, tiny=True)
    bad, good = corpus.studies
    async with running_backend(tmp_path / "backend.sqlite3") as base, fault_proxy(base) as proxy:
        env = ingest_env(proxy.graphql_url)

        def is_bad_create(body: dict[str, Any]) -> bool:
            return is_create(body) and bad.study_uid in str(body.get("variables"))

        broken = proxy.arm(Fault("mutate", times=1, when=is_bad_create, change=_bad_started))
        run = await _replay(tmp_path, corpus, env)
        assert broken.hits == 1
        assert run.returncode == 3, run.stderr
        assert run.json()["studies"]["dead"] == 1
        assert await studies_with_identifier(base + GRAPHQL, bad.study_uid) == []
        assert len(await studies_with_identifier(base + GRAPHQL, good.study_uid)) == 1

        status = await run_ingest(tmp_path / "data", "status", "--json", env=env, cwd=tmp_path)
        rows = {r["study_uid"]: r for r in status.json()["studies"]}
        assert rows[bad.study_uid]["state"] == "dead"
        assert rows[bad.study_uid]["reason"] == "rejected"
        assert "ImagingStudy.started" in rows[bad.study_uid]["last_error"]  # the backend's message

        # the cause is fixed (the proxy no longer breaks the request): retry re-drives the dead letter
        retry = await run_ingest(tmp_path / "data", "retry", "--all", "--now", env=env, cwd=tmp_path)
        assert retry.returncode == 0, retry.stderr
        assert "1 dead-lettered studies re-queued" in retry.stdout
        await _assert_all_written_once(base + GRAPHQL, corpus)
        status = await run_ingest(tmp_path / "data", "status", "--json", env=env, cwd=tmp_path)
        assert status.json()["counts"] == {"pending": 0, "pushed": 2, "dead": 0}


async def test_response_lost_after_commit_still_one_resource(tmp_path: Path) -> None:
    corpus = generate(tmp_path / "corpus", studies=2, files=4, seed=204, tiny=True)
    async with running_backend(tmp_path / "backend.sqlite3") as base, fault_proxy(base) as proxy:
        lost = proxy.arm(Fault("drop_after_commit", times=2, when=is_create))
        run = await _replay(tmp_path, corpus, ingest_env(proxy.graphql_url))
        assert lost.hits == 2
        assert run.returncode == 0, run.stderr
        summary = run.json()["studies"]
        assert summary["dead"] == 0
        await _assert_all_written_once(base + GRAPHQL, corpus)
        assert (await stats(base))["creates"] == 2  # the retry found the committed copy: no second create


async def test_kill_9_mid_replay_rerun_completes_without_duplicates(tmp_path: Path) -> None:
    corpus = generate(tmp_path / "corpus", studies=24, files=24, seed=205, tiny=True)
    async with running_backend(tmp_path / "backend.sqlite3") as base, fault_proxy(base) as proxy:
        env = ingest_env(proxy.graphql_url, lease_s=1, concurrency=2)
        slow = proxy.arm(Fault("delay", times=10_000, when=is_write, seconds=0.1))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ingest",
            "--data-dir",
            str(tmp_path / "data"),
            "replay",
            str(corpus.root),
            "--jobs",
            "1",
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await _when(lambda: slow.hits >= 8, timeout=40)
        finally:
            proc.kill()  # SIGKILL to our own child, by its handle
            await proc.wait()
        assert proc.returncode == -9
        written_before = (await stats(base))["creates"]
        assert 0 < written_before < len(corpus.studies)

        slow.times = 0  # the backend is fast again
        rerun = await _replay(tmp_path, corpus, env)
        assert rerun.returncode == 0, rerun.stderr
        summary = rerun.json()
        assert summary["instances"]["duplicate"] == corpus.files  # every instance was durable before the kill
        await _assert_all_written_once(base + GRAPHQL, corpus)
        status = await run_ingest(tmp_path / "data", "status", "--json", env=env, cwd=tmp_path)
        assert status.json()["counts"] == {"pending": 0, "pushed": 24, "dead": 0}


async def test_proxy_refuses_connections_while_down(tmp_path: Path) -> None:
    """The fault proxy itself: down means connection refused, up means forwarded again."""
    import aiohttp

    async with running_backend(tmp_path / "backend.sqlite3") as base, fault_proxy(base) as proxy:
        assert isinstance(proxy, FaultProxy)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{proxy.base}/healthz") as resp:
                assert resp.status == 200
            await proxy.down()
            with pytest.raises(aiohttp.ClientConnectionError):
                async with session.get(f"{proxy.base}/healthz"):
                    pass
            await proxy.up()
            async with session.get(f"{proxy.base}/healthz") as resp:
                assert resp.status == 200
        assert proxy.forwarded == 2
