"""``ingest replay`` end to end against the embedded FHIR GraphQL backend (docs/architecture.md,
"Writing the backend").

Each test runs the real command line as a child process (``python -m ingest replay``) against an embedded
backend started in the test's event loop on 127.0.0.1 (port chosen by the OS) and pointed at with
``INGEST_BACKEND__URL``, so the test can read the backend's ``/stats`` counters and write to it
directly between two replays. Inputs come from ``samples.generate`` (synthetic, deterministic).
"""

from __future__ import annotations

import html
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from ingest.adapters.graphql.sink import GraphQLSink
from samples.generate import GeneratedCorpus, GeneratedStudy, generate
from tests.faultproxy import (
    gql,
    ingest_env,
    run_ingest,
    running_backend,
    stats,
    studies_with_identifier,
)

GRAPHQL = "/fhir/R4/$graphql"

CREATE = """mutation($res: ImagingStudyCreate!) { ImagingStudyCreate(res: $res) { id } }"""
UPDATE = """mutation($id: ID!, $res: ImagingStudyCreate!) {
  ImagingStudyUpdate(id: $id, res: $res) { id meta { versionId } }
}"""


def _copy(corpus: GeneratedCorpus, dirs: list[str], dest: Path) -> Path:
    """Copy the given corpus sub-folders (``study-001/series-02``...) to ``dest``."""
    for d in dirs:
        shutil.copytree(corpus.root / d, dest / d)
    return dest


def _writes(s: dict[str, int]) -> int:
    return s["creates"] + s["updates"] + s["deletes"]


async def test_new_study_one_lookup_one_create_then_rerun_writes_nothing(tmp_path: Path) -> None:
    corpus = generate(tmp_path / "corpus", studies=1, files=6, seed=101, tiny=True)
    (study,) = corpus.studies
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        env = ingest_env(base + GRAPHQL)
        first = await run_ingest(
            tmp_path / "data", "replay", str(corpus.root), "--jobs", "1", "--json", env=env, cwd=tmp_path
        )
        assert first.returncode == 0, first.stderr
        summary = first.json()
        assert summary["studies"]["created"] == 1
        assert summary["instances"]["accepted"] == study.instances
        after_first = await stats(base)
        assert after_first["lookups"] == 1
        assert after_first["creates"] == 1
        assert after_first["updates"] == 0
        assert after_first["reads"] == 0

        [resource] = await studies_with_identifier(base + GRAPHQL, study.study_uid)
        assert resource["numberOfInstances"] == study.instances
        assert resource["numberOfSeries"] == len(study.series)
        assert {s["uid"] for s in resource["series"]} == {s.series_uid for s in study.series}

        # the same input again, same state store: everything is a duplicate, nothing is written
        again = await run_ingest(
            tmp_path / "data", "replay", str(corpus.root), "--jobs", "1", "--json", env=env, cwd=tmp_path
        )
        assert again.returncode == 0, again.stderr
        assert again.json()["instances"]["duplicate"] == study.instances
        after_again = await stats(base)
        assert _writes(after_again) == _writes(after_first)

        # a fresh state store (e.g. another machine): one lookup finds the study unchanged, no write
        before_fresh = await stats(base)
        fresh = await run_ingest(
            tmp_path / "data2", "replay", str(corpus.root), "--jobs", "1", "--json", env=env, cwd=tmp_path
        )
        assert fresh.returncode == 0, fresh.stderr
        assert fresh.json()["studies"]["unchanged"] == 1
        after_fresh = await stats(base)
        assert _writes(after_fresh) == _writes(after_first)
        assert after_fresh["lookups"] == before_fresh["lookups"] + 1
        assert [
            r["meta"]["versionId"] for r in await studies_with_identifier(base + GRAPHQL, study.study_uid)
        ] == [resource["meta"]["versionId"]]


def _split_study(corpus: GeneratedCorpus) -> tuple[GeneratedStudy, list[str], list[str]]:
    study = next(s for s in corpus.studies if len(s.series) >= 2)
    dirs = [s.directory for s in study.series]
    return study, dirs[:-1], dirs[-1:]


async def test_same_study_split_across_two_replays_is_one_imaging_study(tmp_path: Path) -> None:
    corpus = generate(tmp_path / "corpus", studies=1, files=6, seed=102, tiny=True)
    study, first_dirs, second_dirs = _split_study(corpus)
    part_a = _copy(corpus, first_dirs, tmp_path / "a")
    part_b = _copy(corpus, second_dirs, tmp_path / "b")
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        env = ingest_env(base + GRAPHQL)
        run_a = await run_ingest(
            tmp_path / "data", "replay", str(part_a), "--jobs", "1", "--json", env=env, cwd=tmp_path
        )
        assert run_a.returncode == 0, run_a.stderr
        assert run_a.json()["studies"]["created"] == 1
        run_b = await run_ingest(
            tmp_path / "data", "replay", str(part_b), "--jobs", "1", "--json", env=env, cwd=tmp_path
        )
        assert run_b.returncode == 0, run_b.stderr
        assert run_b.json()["studies"]["updated"] == 1
        found = await studies_with_identifier(base + GRAPHQL, study.study_uid)
        assert len(found) == 1
        [resource] = found
        assert resource["numberOfInstances"] == study.instances
        assert resource["numberOfSeries"] == len(study.series)
        assert {s["uid"] for s in resource["series"]} == {s.series_uid for s in study.series}
        s = await stats(base)
        assert s["creates"] == 1 and s["updates"] == 1


async def test_series_added_later_keeps_foreign_note_and_cancelled_status(tmp_path: Path) -> None:
    corpus = generate(tmp_path / "corpus", studies=1, files=6, seed=103, tiny=True)
    study, first_dirs, later_dirs = _split_study(corpus)
    part_a = _copy(corpus, first_dirs, tmp_path / "a")
    part_b = _copy(corpus, later_dirs, tmp_path / "b")
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        url = base + GRAPHQL
        env = ingest_env(url)
        run_a = await run_ingest(
            tmp_path / "data", "replay", str(part_a), "--jobs", "1", env=env, cwd=tmp_path
        )
        assert run_a.returncode == 0, run_a.stderr

        # someone else annotates the study and cancels it, directly on the backend
        async with GraphQLSink(url, token_source=None, timeout_s=5) as sink:
            current = await sink.find(study.study_uid, None)
        assert current is not None
        edited: dict[str, Any] = {k: v for k, v in current.resource.items() if k != "meta"}
        edited["note"] = [{"text": "reviewed by radiology QA"}]
        edited["status"] = "cancelled"
        answer = await gql(url, UPDATE, {"id": current.id, "res": edited})
        assert not answer.get("errors"), answer

        run_b = await run_ingest(
            tmp_path / "data", "replay", str(part_b), "--jobs", "1", "--json", env=env, cwd=tmp_path
        )
        assert run_b.returncode == 0, run_b.stderr
        assert run_b.json()["studies"]["updated"] == 1
        [resource] = await studies_with_identifier(url, study.study_uid)
        assert resource["id"] == current.id
        assert resource["status"] == "cancelled"
        assert resource["note"] == [{"text": "reviewed by radiology QA"}]
        assert {s["uid"] for s in resource["series"]} == {s.series_uid for s in study.series}
        assert resource["numberOfInstances"] == study.instances


async def test_two_backend_matches_dead_letter_others_written(tmp_path: Path) -> None:
    corpus = generate(tmp_path / "corpus", studies=3, files=9, seed=104, tiny=True)
    clash, *others = corpus.studies
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        url = base + GRAPHQL
        for _ in range(2):  # two resources that carry the same study identifier, made by someone else
            res = {
                "resourceType": "ImagingStudy",
                "status": "available",
                "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{clash.study_uid}"}],
                "subject": {"display": "someone else's copy"},
            }
            answer = await gql(url, CREATE, {"res": res})
            assert not answer.get("errors"), answer
        env = ingest_env(url)
        run = await run_ingest(
            tmp_path / "data", "replay", str(corpus.root), "--jobs", "1", "--json", env=env, cwd=tmp_path
        )
        assert run.returncode == 3, run.stderr  # some studies dead-lettered
        assert run.json()["studies"] == {
            "created": 2, "updated": 0, "unchanged": 0, "dead": 1, "pending": 0, "printed": 0
        }
        for other in others:
            assert len(await studies_with_identifier(url, other.study_uid)) == 1
        assert len(await studies_with_identifier(url, clash.study_uid)) == 2  # untouched, never guessed

        status = await run_ingest(tmp_path / "data", "status", "--json", env=env, cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        rows = {r["study_uid"]: r for r in status.json()["studies"]}
        assert status.json()["counts"] == {"pending": 0, "pushed": 2, "dead": 1}
        assert rows[clash.study_uid]["state"] == "dead"
        assert rows[clash.study_uid]["reason"] == "multiple_matches"
        assert clash.study_uid in rows[clash.study_uid]["last_error"]
        assert all(rows[o.study_uid]["state"] == "pushed" for o in others)


async def test_no_token_or_patient_names_in_info_logs(tmp_path: Path) -> None:
    token = "s3cret-token-0f9a7c2e"
    corpus = generate(tmp_path / "corpus", studies=3, files=6, seed=105, tiny=True)
    async with running_backend(tmp_path / "backend.sqlite3", token=token) as base:
        env = ingest_env(base + GRAPHQL)
        env["INGEST_BACKEND_TOKEN"] = token
        run = await run_ingest(
            tmp_path / "data", "replay", str(corpus.root), "--jobs", "1", env=env, cwd=tmp_path
        )
        assert run.returncode == 0, run.stderr
        assert "INFO" in run.stderr  # the log was captured at INFO
        for s in corpus.studies:
            assert len(await studies_with_identifier(base + GRAPHQL, s.study_uid, token=token)) == 1
        status = await run_ingest(tmp_path / "data", "status", env=env, cwd=tmp_path)
    logs = run.stderr + run.stdout + status.stdout + status.stderr
    assert token not in logs
    for s in corpus.studies:
        for part in (p for group in s.patient_name.split("=") for p in group.split("^")):
            if len(part) >= 2:
                assert part not in logs, f"patient name component {part!r} in the log"
        assert s.patient_id not in logs


async def test_embedded_backend_started_in_process_when_no_url(tmp_path: Path) -> None:
    from ingest.backend.store import ResourceStore, SearchRequest

    corpus = generate(tmp_path / "corpus", studies=2, files=4, seed=106, tiny=True)
    env = ingest_env(None)
    env["INGEST_EMBEDDED_BACKEND__PORT"] = "0"
    for expected in ("created", "unchanged"):
        data = tmp_path / "data"
        if expected == "unchanged":  # forget the state, keep the backend database
            for f in data.glob("state.sqlite3*"):
                f.unlink()
        run = await run_ingest(
            data, "replay", str(corpus.root), "--jobs", "1", "--json", env=env, cwd=tmp_path
        )
        assert run.returncode == 0, run.stderr
        assert run.json()["studies"][expected] == 2
    store = ResourceStore(tmp_path / "data" / "backend.sqlite3")
    try:
        for s in corpus.studies:
            found = store.search(
                "ImagingStudy",
                SearchRequest(
                    params={"identifier": f"urn:dicom:uid|urn:oid:{s.study_uid}"}, count=5, offset=0
                ),
            )
            assert len(found) == 1
            assert found[0]["numberOfInstances"] == s.instances
    finally:
        store.close()


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Children get their environment explicitly; make sure nothing leaks from the parent either."""
    for key in [k for k in os.environ if k.startswith("INGEST_")]:
        monkeypatch.delenv(key)


async def test_the_written_study_carries_the_generated_narrative(tmp_path: Path) -> None:
    """A replay writes ``text`` (status generated, XHTML div with the description) to the backend; the
    unchanged rerun writes nothing (docs/mapping.md "Narrative")."""
    corpus = generate(tmp_path / "corpus", studies=1, files=3, seed=103, tiny=True)
    [study] = corpus.studies
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        env = ingest_env(base + GRAPHQL)
        for _ in range(2):
            run = await run_ingest(tmp_path / "data", "replay", str(corpus.root), "--jobs", "1", "--json",
                                   env=env, cwd=tmp_path)
            assert run.returncode == 0, run.stderr
        body = await gql(
            base + GRAPHQL,
            "query($i: String) { ImagingStudyList(identifier: $i) { description text { status div } } }",
            {"i": f"urn:dicom:uid|urn:oid:{study.study_uid}"},
        )
        [resource] = body["data"]["ImagingStudyList"]
        assert resource["text"]["status"] == "generated"
        assert resource["text"]["div"].startswith('<div xmlns="http://www.w3.org/1999/xhtml"')
        if resource.get("description"):
            assert html.escape(resource["description"]) in resource["text"]["div"]
        s = await stats(base)
        assert s["creates"] == 1 and s["updates"] == 0


async def test_a_study_pushed_early_and_grown_later_ends_complete_and_single(tmp_path: Path) -> None:
    # a study's first two series, then 1,600 files of two other studies, then its last series: the
    # study stops growing for more than ingest.sources.replay.QUIET_FILES (1,024) files, is pushed
    # early while the rest is read, and the replay ends with it whole, once, beside the other two
    first = generate(tmp_path / "one", studies=1, files=400, seed=102, tiny=True)
    middle = generate(tmp_path / "two", studies=2, files=1600, seed=103, tiny=True)
    (study,) = first.studies
    # quiet at the first 256-file batch end 1,024 files past its first part: still inside the middle
    assert len(study.series) >= 2 and middle.files >= 1024 + 256
    root = tmp_path / "input"
    for series in study.series[:-1]:
        shutil.copytree(first.root / series.directory, root / "a" / series.directory)
    shutil.copytree(middle.root, root / "m")
    shutil.copytree(first.root / study.series[-1].directory, root / "z" / study.series[-1].directory)
    async with running_backend(tmp_path / "backend.sqlite3") as base:
        env = ingest_env(base + GRAPHQL)
        run = await run_ingest(
            tmp_path / "data", "replay", str(root), "--jobs", "2", "--json", env=env, cwd=tmp_path,
            timeout=120.0,
        )
        assert run.returncode == 0, run.stderr
        assert "studies pushed early, once they had stopped growing" in run.stderr
        summary = run.json()
        assert summary["instances"]["accepted"] == first.files + middle.files
        assert summary["studies"]["created"] == 3
        found = await studies_with_identifier(base + GRAPHQL, study.study_uid)
        assert len(found) == 1
        [resource] = found
        assert resource["numberOfInstances"] == sum(s.instances for s in study.series)
        assert {s["uid"] for s in resource["series"]} == {s.series_uid for s in study.series}
        for other in middle.studies:
            [written] = await studies_with_identifier(base + GRAPHQL, other.study_uid)
            assert written["numberOfInstances"] == sum(s.instances for s in other.series)
        s = await stats(base)
        # created once each; the early one updated once if its last series came after its push
        assert s["creates"] == 3 and s["updates"] == summary["studies"]["updated"] <= 1
