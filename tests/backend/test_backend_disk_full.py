"""The embedded backend on a full disk, alone and with a real ``ingest replay`` / ``ingest retry`` pushing.

``PRAGMA max_page_count`` on the backend's own connection makes every write that needs one more page fail
with ``database or disk is full`` (SQLITE_FULL), as a full file system does; raising it again is space
coming back. A storage failure is transient: the backend answers HTTP 503 ``no-store``, the relay
retries it without an attempt limit, the study stays pending and is written once space returns.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from ingest.backend.server import GRAPHQL_PATH, STORE_KEY, create_app, start_backend
from ingest.backend.store import ResourceStore, StorageError
from samples.generate import generate
from tests.backend.test_backend import CREATE, LIST_IDS, post, study
from tests.faultproxy import (
    Fault,
    fault_proxy,
    ingest_env,
    is_create,
    run_ingest,
    stats,
    studies_with_identifier,
)

BIG = study(31, description="x" * 6000)  # larger than a page: the write needs a new one
AiohttpClient = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


def _fill(conn: sqlite3.Connection) -> None:
    """No page more than the database has now, and none of them free: a write of a row larger than a
    page (it needs an overflow page) fails with SQLITE_FULL, as on a full file system."""
    assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")


def _free(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA max_page_count = 1073741823")


def _conn(store: ResourceStore) -> sqlite3.Connection:
    return store._connection()  # the store's own connection: the one that meets the full disk


def _patient(n: int) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": f"p-{n}", "name": [{"family": "x" * 6000}]}  # > a page


def test_store_rolls_back_cleanly_and_is_usable_once_space_returns(tmp_path: Path) -> None:
    store = ResourceStore(tmp_path / "backend.sqlite3")
    try:
        conn = _conn(store)
        store.put(_patient(0))
        _fill(conn)
        with pytest.raises(StorageError) as info:
            store.put(_patient(1))
        assert info.value.full
        assert "database or disk is full" in str(info.value)
        assert "cannot rollback" not in str(info.value)
        assert not conn.in_transaction
        assert store.read("Patient", "p-1") is None  # nothing half-written
        _free(conn)
        store.put(_patient(1))  # the same write succeeds once space is back
        assert store.read("Patient", "p-1") is not None
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        store.close()


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, tmp_path: Path) -> TestClient[web.Request, web.Application]:
    return await aiohttp_client(create_app(tmp_path / "backend.sqlite3"))


async def test_full_disk_answers_503_no_store_with_retry_after_then_writes(
    client: TestClient[web.Request, web.Application],
) -> None:
    assert client.app is not None
    conn = _conn(client.app[STORE_KEY])
    _fill(conn)
    resp = await client.post(GRAPHQL_PATH, json={"query": CREATE, "variables": {"res": BIG}})
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "5"
    body = await resp.json(content_type=None)
    assert body["resourceType"] == "OperationOutcome"
    issues = [(i["code"], i["details"]["text"]) for i in body["issue"]]
    assert issues == [("no-store", "Storage full, retry later")]
    _free(conn)
    status, created = await post(client, CREATE, {"res": BIG})
    assert status == 200 and created["data"]["ImagingStudyCreate"]["id"]
    identifier = "urn:dicom:uid|urn:oid:1.2.826.0.1.3680043.8.498.2000.31"
    status, found = await post(client, LIST_IDS, {"i": identifier})
    assert len(found["data"]["ImagingStudyList"]) == 1  # the refused attempt left nothing behind


async def _backend(db: Path) -> AsyncIterator[tuple[str, sqlite3.Connection]]:
    runner, port = await start_backend(db, host="127.0.0.1", port=0)
    try:
        yield f"http://127.0.0.1:{port}", _conn(runner.app[STORE_KEY])
    finally:
        await runner.cleanup()


@pytest.fixture
async def backend(tmp_path: Path) -> AsyncIterator[tuple[str, sqlite3.Connection]]:
    async for b in _backend(tmp_path / "backend.sqlite3"):
        yield b


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout} s")
        await asyncio.sleep(0.05)


async def _state_counts(data: Path, env: dict[str, str], cwd: Path) -> dict[str, int]:
    status = await run_ingest(data, "status", "--json", env=env, cwd=cwd)
    assert status.returncode == 0, status.stderr
    counts: dict[str, int] = status.json()["counts"]
    return counts


async def test_replay_waits_out_a_full_disk_and_writes_every_study_once(
    tmp_path: Path, backend: tuple[str, sqlite3.Connection]
) -> None:
    base, conn = backend
    corpus = generate(tmp_path / "corpus", studies=2, files=80, seed=211, tiny=True)
    env = ingest_env(base + GRAPHQL_PATH, max_attempts=2)  # far fewer tries than the outage lasts
    _fill(conn)
    replay = asyncio.ensure_future(
        run_ingest(
            tmp_path / "data", "replay", str(corpus.root), "--jobs", "1", "--json", env=env, cwd=tmp_path
        )
    )
    try:
        async def refused_often() -> bool:  # every study tried several times over its attempt limit
            return (await stats(base))["creates"] >= 8 or replay.done()

        await _until(refused_often, "creates refused while the disk is full")
        assert not replay.done(), (await replay).stderr
        counts = await _state_counts(tmp_path / "data", env, tmp_path)
        assert counts["dead"] == 0 and counts["pending"] == 2
        _free(conn)
        run = await replay
    finally:
        if not replay.done():
            _free(conn)
            await replay
    assert run.returncode == 0, run.stderr
    assert run.json()["studies"]["created"] == 2 and run.json()["studies"]["dead"] == 0

    assert "HTTP 503" in run.stderr and "Storage full" in run.stderr
    assert "cannot rollback" not in run.stderr
    for s in corpus.studies:
        assert len(await studies_with_identifier(base + GRAPHQL_PATH, s.study_uid)) == 1
    assert await _state_counts(tmp_path / "data", env, tmp_path) == {"pending": 0, "pushed": 2, "dead": 0}


def _bad_started(body: dict[str, Any]) -> dict[str, Any]:
    res = dict(body["variables"]["res"])
    res["started"] = "2024-13-45"
    return {**body, "variables": {**body["variables"], "res": res}}


async def test_retry_now_on_a_full_disk_waits_and_exits_0_once_written(
    tmp_path: Path, backend: tuple[str, sqlite3.Connection]
) -> None:
    base, conn = backend
    corpus = generate(tmp_path / "corpus", studies=1, files=40, seed=212, tiny=True)
    async with fault_proxy(base) as proxy:  # the first create is refused: the study is dead-lettered
        env = ingest_env(proxy.graphql_url, max_attempts=2)
        proxy.arm(Fault("mutate", times=1, when=is_create, change=_bad_started))
        run = await run_ingest(
            tmp_path / "data", "replay", str(corpus.root), "--jobs", "1", "--json", env=env, cwd=tmp_path
        )
        assert run.returncode == 3 and run.json()["studies"]["dead"] == 1, run.stderr
    env = ingest_env(base + GRAPHQL_PATH, max_attempts=2)
    _fill(conn)
    before = (await stats(base))["creates"]
    retry = asyncio.ensure_future(
        run_ingest(tmp_path / "data", "retry", "--all", "--now", env=env, cwd=tmp_path)
    )
    try:
        async def refused_often() -> bool:
            return (await stats(base))["creates"] - before >= 4 or retry.done()

        await _until(refused_often, "creates refused while the disk is full")
        assert not retry.done(), (await retry).stderr
        _free(conn)
        result = await retry
    finally:
        if not retry.done():
            _free(conn)
            await retry
    assert result.returncode == 0, result.stderr
    assert "still dead" not in result.stderr
    uid = corpus.studies[0].study_uid
    assert len(await studies_with_identifier(base + GRAPHQL_PATH, uid)) == 1
    assert await _state_counts(tmp_path / "data", env, tmp_path) == {"pending": 0, "pushed": 1, "dead": 0}
