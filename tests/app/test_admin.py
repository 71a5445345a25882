"""The status page (ingest.app.admin) with aiohttp's test client over a real SQLite store in tmp_path, and its
store queries on every state store implementation."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app.admin import StatusPage, admin_token, mount_status
from ingest.app.serve import Health, admin_app
from ingest.config import AdminSettings, Settings, load_settings
from ingest.core.records import InstanceRecord, PersonName
from ingest.errors import ConfigError
from ingest.metrics import Metrics
from ingest.ports import StateStore, StudyState
from ingest.relay.relay import BackendHealth

CT = "1.2.840.10008.5.1.4.1.1.2"
NOW = datetime.now(UTC).replace(microsecond=0)
STUDY_A, STUDY_B, STUDY_X = "1.2.826.0.1.1", "1.2.826.0.1.2", "1.2.826.0.1.3"

Client = Any


def rec(study: str, series: str, sop: str, **extra: Any) -> InstanceRecord:
    return InstanceRecord(study_uid=study, series_uid=series, sop_uid=sop, sop_class_uid=CT, **extra)


def add(store: StateStore, record: InstanceRecord, *, when: datetime, source: str = "dimse:MODALITY") -> None:
    store.add_instance(record, source=source, spool_name=None, digest=f"c1:{record.sop_uid}", now=when,
                       due_at=when + timedelta(seconds=1))


def fill(store: StateStore) -> None:
    """A: two series from an AE, pushed; B: from the watcher, dead; X: a hostile description."""
    patient = {"patient_id": "PID-4711", "patient_name": PersonName(alphabetic="Doe^Jane"),
               "patient_birth_date": "19700101"}
    add(store, rec(STUDY_A, "1.2.826.0.1.1.1", "1.2.826.0.1.1.1.1", modality="CT", accession_number="ACC-A",
                   study_description="CT head", series_number=1, **patient), when=NOW - timedelta(minutes=9))
    add(store, rec(STUDY_A, "1.2.826.0.1.1.2", "1.2.826.0.1.1.2.1", modality="SR", accession_number="ACC-A",
                   study_description="CT head", series_number=2, **patient), when=NOW - timedelta(minutes=9))
    (claim,) = store.claim_due(NOW, 10, "n1", 60)
    store.mark_pushed(claim, backend_id="is-a", version_id="1", digest="x", now=NOW - timedelta(minutes=8))
    add(store, rec(STUDY_B, "1.2.826.0.1.2.1", "1.2.826.0.1.2.1.1", modality="MR", accession_number="ACC-B"),
        when=NOW - timedelta(minutes=5), source="watch")
    (claim,) = store.claim_due(NOW, 10, "n1", 60)
    store.dead_letter(claim, reason="rejected", error="HTTP 400: subject «…» invalid", now=NOW)
    add(store, rec(STUDY_X, "1.2.826.0.1.3.1", "1.2.826.0.1.3.1.1", modality="US",
                   study_description="<script>alert(1)</script>"), when=NOW - timedelta(minutes=1),
        source="replay")


class FixedHealth:
    async def report(self) -> tuple[int, dict[str, Any]]:
        return 200, {"status": "ok", "listener": "ok", "relay": "ok", "backend": "ok", "store": "ok",
                     "disk": "ok", "disk_free_bytes": 10 * 1024**3}


def settings_for(tmp_path: Path, **admin: Any) -> Settings:
    return Settings(data_dir=tmp_path, admin=AdminSettings(**admin))


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Any:
    store = SQLiteStateStore(tmp_path / "state.sqlite3", node="test-node")
    fill(store)
    yield store
    store.close()


MakeClient = Callable[..., Any]


@pytest.fixture
def make_client(aiohttp_client: Any, sqlite_store: SQLiteStateStore, tmp_path: Path) -> MakeClient:
    async def make(token: str | None = None, **admin: Any) -> tuple[Client, StatusPage]:
        settings = settings_for(tmp_path, **admin)
        app = web.Application()
        page = StatusPage(settings, sqlite_store, FixedHealth(), Metrics(), node="node-1",
                          builder=lambda records: {"resourceType": "ImagingStudy", "subject": {
                              "identifier": {"value": records[0].patient_id}}, "numberOfInstances":
                              len(records)}, token=token)
        page.mount(app)
        return await aiohttp_client(app), page

    return make


def csrf_of(text: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', text)
    assert found, "no CSRF token in the page"
    return found.group(1)


# -- the page ----------------------------------------------------------------------------------------------


async def test_studies_are_listed_newest_first_with_their_summary(make_client: MakeClient) -> None:
    client, _ = await make_client()
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
    text = await resp.text()
    rows = re.findall(r'<tr data-study="([0-9.]+)" data-state="(\w+)">', text)
    assert rows == [(STUDY_X, "pending"), (STUDY_B, "dead"), (STUDY_A, "pushed")]
    study_a = text[text.index(f'<tr data-study="{STUDY_A}" data-state'):]
    study_a = study_a[: study_a.index("</tr>")]
    for shown in ("AE MODALITY", "ACC-A", "CT, SR", "CT head", "2 / 2", "is-a", "pushed"):
        assert shown in study_a
    assert "watch" in text and "replay" in text
    assert "dead: rejected" in text and "HTTP 400: subject «…» invalid" in text
    assert 'src="/admin.js"' in text and "http" not in re.sub(r'xmlns="http://www.w3.org/2000/svg"', "", text)
    assert "node-1" in text


async def test_values_are_escaped(make_client: MakeClient) -> None:
    client, _ = await make_client()
    text = await (await client.get("/")).text()
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


async def test_patient_fields_hidden_by_default(make_client: MakeClient) -> None:
    client, _ = await make_client()
    for path in ("/", f"/study/{STUDY_A}"):
        text = await (await client.get(path)).text()
        assert "PID-4711" not in text and "Doe^Jane" not in text and "19700101" not in text


async def test_patient_fields_shown_when_configured(make_client: MakeClient) -> None:
    client, _ = await make_client(show_patient=True)
    text = await (await client.get("/")).text()
    assert "PID-4711" in text and "Doe^Jane" in text and "19700101" in text
    text = await (await client.get(f"/study/{STUDY_A}")).text()
    assert "PID-4711" in text


async def test_retry_without_csrf_token_is_refused(make_client: MakeClient, sqlite_store: StateStore) -> None:
    client, _ = await make_client()
    origin = f"http://{client.server.host}:{client.server.port}"
    resp = await client.post("/retry", data={"uid": STUDY_B}, headers={"Origin": origin},
                             allow_redirects=False)
    assert resp.status == 403
    resp = await client.post("/retry", data={"uid": STUDY_B, "csrf": "wrong"}, headers={"Origin": origin},
                             allow_redirects=False)
    assert resp.status == 403
    row = sqlite_store.study(STUDY_B)
    assert row is not None and row.state is StudyState.DEAD


async def test_retry_from_another_origin_is_refused(
    make_client: MakeClient, sqlite_store: StateStore
) -> None:
    client, _ = await make_client()
    csrf = csrf_of(await (await client.get("/")).text())
    for headers in ({"Origin": "http://evil.example"}, {"Referer": "http://evil.example/"}, {}):
        resp = await client.post("/retry", data={"uid": STUDY_B, "csrf": csrf}, headers=headers,
                                 allow_redirects=False)
        assert resp.status == 403, headers
    row = sqlite_store.study(STUDY_B)
    assert row is not None and row.state is StudyState.DEAD


async def test_retry_with_csrf_token_requeues_the_dead_letter(
    make_client: MakeClient, sqlite_store: StateStore
) -> None:
    client, _ = await make_client()
    csrf = csrf_of(await (await client.get("/")).text())
    origin = f"http://{client.server.host}:{client.server.port}"
    resp = await client.post("/retry", data={"uid": STUDY_B, "csrf": csrf}, headers={"Origin": origin},
                             allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"].startswith("/?retried=1")
    row = sqlite_store.study(STUDY_B)
    assert row is not None and row.state is StudyState.PENDING and row.dirty
    text = await (await client.get("/")).text()
    assert f'data-retry="{STUDY_B}"' not in text


async def test_token_is_required_when_configured(make_client: MakeClient, sqlite_store: StateStore) -> None:
    client, _ = await make_client(token="s3cret")
    assert (await client.get("/")).status == 401
    assert (await client.get("/", headers={"Authorization": "Bearer wrong"})).status == 401
    assert (await client.get("/", headers={"Authorization": "Bearer s3cret"})).status == 200
    resp = await client.get("/?token=s3cret")
    text = await resp.text()
    assert resp.status == 200 and f'href="/study/{STUDY_A}?token=s3cret"' in text
    assert (await client.get("/admin.js")).status == 200  # assets carry no data
    origin = f"http://{client.server.host}:{client.server.port}"
    csrf = csrf_of(text)
    resp = await client.post("/retry", data={"uid": STUDY_B, "csrf": csrf}, headers={"Origin": origin},
                             allow_redirects=False)
    assert resp.status == 401
    resp = await client.post("/retry", data={"uid": STUDY_B, "csrf": csrf, "token": "s3cret"},
                             headers={"Origin": origin}, allow_redirects=False)
    assert resp.status == 303
    assert sqlite_store.study(STUDY_B).state is StudyState.PENDING  # type: ignore[union-attr]


async def test_foreign_host_is_refused_without_token(make_client: MakeClient) -> None:
    client, _ = await make_client()
    assert (await client.get("/", headers={"Host": "rebound.example:9100"})).status == 403
    assert (await client.get("/", headers={"Host": "localhost:9100"})).status == 200


async def test_study_page_shows_series_quarantine_and_the_built_json(
    make_client: MakeClient, tmp_path: Path
) -> None:
    quarantine = tmp_path / "quarantine"
    quarantine.mkdir()
    (quarantine / "abc.json").write_text(json.dumps({
        "reason": "conflict", "rule": "other_content", "time": NOW.isoformat(), "kept": True,
        "detail": "SOP Instance UID 1.2.826.0.1.1.2.1 already stored with other content; <b>kept</b>",
    }))
    (quarantine / "def.json").write_text(json.dumps({"reason": "conflict", "detail": "SOP 9.9.9 other"}))
    client, _ = await make_client()
    resp = await client.get(f"/study/{STUDY_A}")
    assert resp.status == 200
    text = await resp.text()
    assert 'id="series"' in text and "1.2.826.0.1.1.1<" in text and "1.2.826.0.1.1.2<" in text
    assert "other_content" in text and "&lt;b&gt;kept&lt;/b&gt;" in text and "9.9.9" not in text
    assert "Built now from the stored instance rows" in text
    assert "«hidden: [admin] show_patient = false»" in text
    assert (await client.get("/study/1.2.3.999")).status == 404
    assert (await client.get("/study/not-a-uid")).status == 400


async def test_chart_has_bars_and_a_line(make_client: MakeClient) -> None:
    client, _ = await make_client()
    text = await (await client.get("/")).text()
    svg = text[text.index('<svg id="chart"'): text.index("</svg>")]
    assert len(re.findall(r'<rect class="bar"', svg)) >= 2
    points = re.search(r'<polyline class="line" points="([^"]+)"', svg)
    assert points and len(points.group(1).split()) == 60
    assert "Received: 4 instances; pushed: 1 studies" in text


async def test_mounted_on_the_admin_app_next_to_healthz(
    aiohttp_client: Any, sqlite_store: SQLiteStateStore, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path)
    health = Health(settings, sqlite_store, BackendHealth())
    app = admin_app(Metrics(), sqlite_store, health)
    mount_status(app, settings, sqlite_store, health, Metrics(), node="n")
    client = await aiohttp_client(app)
    assert (await client.get("/")).status == 200
    assert (await client.get("/healthz", headers={"Host": "elsewhere"})).status in (200, 503)


# -- settings ----------------------------------------------------------------------------------------------


def test_non_loopback_admin_host_needs_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="not a loopback address"):
        load_settings(None, data_dir=tmp_path, admin={"host": "0.0.0.0"})
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        load_settings(None, data_dir=tmp_path, admin={"host": host})
    settings = load_settings(None, data_dir=tmp_path, admin={"host": "0.0.0.0", "token_env": "ADM_TOKEN"})
    monkeypatch.delenv("ADM_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="ADM_TOKEN"):
        admin_token(settings)
    monkeypatch.setenv("ADM_TOKEN", " t0k ")
    assert admin_token(settings) == "t0k"
    (tmp_path / "tok").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        admin_token(load_settings(None, data_dir=tmp_path, admin={"token_file": str(tmp_path / "tok")}))


def test_show_patient_is_off_by_default() -> None:
    assert Settings().admin.show_patient is False


# -- the store queries, on SQLite and PostgreSQL -----------------------------------------------------------


def test_recent_studies_counts_groups_and_minutes(store: StateStore) -> None:
    fill(store)
    recent = store.recent_studies(2, 0)
    assert [r.study_uid for r in recent] == [STUDY_X, STUDY_B]
    assert recent[1].dead_reason == "rejected" and recent[1].instances == 1
    assert [r.study_uid for r in store.recent_studies(50, 2)] == [STUDY_A]
    assert store.study_counts() == {StudyState.PENDING: 1, StudyState.DEAD: 1, StudyState.PUSHED: 1}
    groups = store.series_groups([STUDY_A, STUDY_B])
    assert [(g.study_uid, g.series_uid, g.source, g.instances) for g in groups] == [
        (STUDY_A, "1.2.826.0.1.1.1", "dimse:MODALITY", 1),
        (STUDY_A, "1.2.826.0.1.1.2", "dimse:MODALITY", 1),
        (STUDY_B, "1.2.826.0.1.2.1", "watch", 1),
    ]
    assert groups[0].sample.accession_number == "ACC-A"
    assert groups[0].first_added == NOW - timedelta(minutes=9)
    since = NOW - timedelta(minutes=10)
    received, pushed = store.minute_counts(since, 12)
    assert len(received) == len(pushed) == 12
    assert received[1] == 2 and received[5] == 1 and received[9] == 1 and sum(received) == 4
    assert pushed[2] == 1 and sum(pushed) == 1
    assert store.series_groups([]) == []


# -- every method guarded, page numbers bounded, pages built off the loop -----------------------------------


async def test_head_needs_the_token_too(make_client: MakeClient) -> None:
    client, _ = await make_client(token="s3cret")
    for path in ("/", f"/study/{STUDY_A}", f"/study/{STUDY_A}/imagingstudy.json"):
        assert (await client.head(path)).status == 401, path
        assert (await client.head(path, headers={"Authorization": "Bearer s3cret"})).status == 200, path
        assert (await client.head(f"{path}?token=s3cret")).status == 200, path


async def test_other_methods_need_the_token_then_are_not_allowed(make_client: MakeClient) -> None:
    client, _ = await make_client(token="s3cret")
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        assert (await client.request(method, "/")).status == 401, method
        resp = await client.request(method, "/", headers={"Authorization": "Bearer s3cret"})
        assert resp.status == 405 and resp.headers["Allow"] == "GET, HEAD", method
    assert (await client.get("/retry")).status == 401
    assert (await client.get("/retry", headers={"Authorization": "Bearer s3cret"})).status == 405


async def test_foreign_host_is_refused_for_every_method(make_client: MakeClient) -> None:
    client, _ = await make_client()
    foreign = {"Host": "rebound.example:9100"}
    for path in ("/", f"/study/{STUDY_A}"):
        assert (await client.head(path, headers=foreign)).status == 403, path
        assert (await client.request("PUT", path, headers=foreign)).status == 403, path
        assert (await client.head(path, headers={"Host": "localhost:9100"})).status == 200, path
    resp = await client.post("/retry", data={"uid": STUDY_B}, headers={**foreign, "Origin": "http://rebound.example:9100"})
    assert resp.status == 403


@pytest.mark.parametrize("page", [str(10**30), "abc", "0", "-1", "1.5", "", "2"])
async def test_page_numbers_out_of_range_are_400(make_client: MakeClient, page: str) -> None:
    client, _ = await make_client()
    for path in ("/", f"/study/{STUDY_A}"):  # three studies, two instances: one page each
        resp = await client.get(path, params={"page": page})
        assert resp.status == 400, (path, page)
        assert "page" in await resp.text()


async def test_study_page_lists_one_page_of_instances(
    make_client: MakeClient, sqlite_store: StateStore
) -> None:
    big = "1.2.826.0.1.4"
    for i in range(120):
        add(sqlite_store, rec(big, f"{big}.{i % 3 + 1}", f"{big}.{i % 3 + 1}.{i + 1}", instance_number=i + 1),
            when=NOW)
    client, _ = await make_client()
    shown = []
    for page, rows in ((1, 50), (2, 50), (3, 20)):
        text = await (await client.get(f"/study/{big}", params={"page": str(page)})).text()
        sops = re.findall(r'<tr data-sop="([0-9.]+)">', text)
        assert len(sops) == rows, page
        shown += sops
        assert f"Instances (120; page {page} of 3)" in text
    assert len(set(shown)) == 120
    assert (await client.get(f"/study/{big}", params={"page": "4"})).status == 400
    assert text.count('<tr><td>') >= 3  # the three series


async def test_large_study_links_its_imagingstudy_instead_of_inlining_it(
    make_client: MakeClient, sqlite_store: StateStore
) -> None:
    big = "1.2.826.0.1.5"
    sqlite_store.add_instances(
        [(rec(big, f"{big}.1", f"{big}.1.{i + 1}"), "watch", None, f"c1:{big}.{i}") for i in range(600)],
        now=NOW, due_at=NOW,
    )
    client, _ = await make_client()
    text = await (await client.get(f"/study/{big}")).text()
    assert 'id="imagingstudy"' not in text and f'href="/study/{big}/imagingstudy.json"' in text
    resp = await client.get(f"/study/{big}/imagingstudy.json")
    assert resp.status == 200 and resp.content_type == "application/json"
    body = await resp.json()
    assert body["numberOfInstances"] == 600 and body["subject"] == "«hidden: [admin] show_patient = false»"


async def test_quarantine_side_files_are_read_once_and_new_ones_found(
    make_client: MakeClient, tmp_path: Path
) -> None:
    quarantine = tmp_path / "quarantine"
    quarantine.mkdir()
    for i in range(30):
        sop = "1.2.826.0.1.1.2.1" if i < 3 else f"7.7.{i}"
        side = {"reason": "conflict", "detail": f"SOP {sop} r{i}"}
        (quarantine / f"s{i}.json").write_text(json.dumps(side))
    (quarantine / "broken.json").write_text("{not json")  # read once too, naming nothing
    client, page = await make_client()
    page.quarantine.rescan_s = 0.0
    for _ in range(3):
        text = await (await client.get(f"/study/{STUDY_A}")).text()
        assert "Rejected / quarantined (3)" in text
    assert page.quarantine.reads == 31
    late = {"reason": "conflict", "detail": f"study {STUDY_A} late"}
    (quarantine / "late.json").write_text(json.dumps(late))
    (quarantine / "s0.json").unlink()
    text = await (await client.get(f"/study/{STUDY_A}")).text()
    assert "Rejected / quarantined (3)" in text and "late" in text and "r0<" not in text
    assert page.quarantine.reads == 32


async def test_pages_are_built_off_the_loop_and_bounded(
    aiohttp_client: Any, sqlite_store: SQLiteStateStore, tmp_path: Path
) -> None:
    release = threading.Event()
    building = threading.Event()

    def slow_builder(records: Any) -> dict[str, Any]:
        building.set()
        release.wait(10)
        return {"resourceType": "ImagingStudy"}

    app = web.Application()
    page = StatusPage(settings_for(tmp_path), sqlite_store, FixedHealth(), Metrics(), node="n",
                      builder=slow_builder, builders=1, queued=1)
    page.mount(app)
    client = await aiohttp_client(app)
    try:
        first = asyncio.ensure_future(client.get(f"/study/{STUDY_A}"))
        await wait_for_async(building.is_set)
        # the loop answers while the page is being built (the builder holds the one builder thread)
        assert (await client.get("/admin.js")).status == 200
        assert not first.done()
        second = asyncio.ensure_future(client.get("/"))
        await wait_for_async(lambda: page._in_flight == 2)
        busy = await client.get(f"/study/{STUDY_B}")  # one building, one waiting: no room for a third
        assert busy.status == 503 and busy.headers["Retry-After"] == "2"
    finally:
        release.set()
    assert (await first).status == 200 and (await second).status == 200
    assert (await client.get(f"/study/{STUDY_B}")).status == 200


async def wait_for_async(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_header_health_report_is_reused_between_close_views(
    aiohttp_client: Any, sqlite_store: SQLiteStateStore, tmp_path: Path
) -> None:
    class CountingHealth(FixedHealth):
        calls = 0

        async def report(self) -> tuple[int, dict[str, Any]]:
            CountingHealth.calls += 1
            return await super().report()

    app = web.Application()
    StatusPage(settings_for(tmp_path), sqlite_store, CountingHealth(), Metrics(), node="n").mount(app)
    client = await aiohttp_client(app)
    for path in ("/", f"/study/{STUDY_A}", "/", f"/study/{STUDY_B}"):
        assert (await client.get(path)).status == 200
    # the /healthz checks (a probe file in the spool folder) ran once (twice on a machine slow enough to
    # take more than 2 s for these pages), not once a page
    assert CountingHealth.calls <= 2
