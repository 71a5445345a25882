"""The relay end to end against Medplum's own FHIR GraphQL implementation (``server.mjs``).

The same core scenarios as ``tests/test_replay_backend.py`` against the Medplum reference server of the
``medplum_url`` fixture: create (Medplum answers ``null``, not ``[]``, for a search without a match), an
unchanged rerun that writes nothing, an update that keeps a note and a ``cancelled`` status written by
someone else, and two matches -> dead letter. The first test runs the real ``ingest replay`` command
(``INGEST_BACKEND__URL`` = Medplum); the second drives the same pipeline (state store -> relay -> GraphQL
sink) in-process with one sink, because learning Medplum's large schema costs seconds per connection.
The server is shared by the whole session, so every corpus gets fresh Study Instance UIDs (``2.25.<uuid4>``).
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import pydicom

from ingest.adapters.graphql.sink import GraphQLSink
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app.wiring import mapping_options
from ingest.config import RelaySettings, Settings
from ingest.ports import StudyState
from ingest.relay.build import StudyBuilder
from ingest.relay.relay import Relay, utcnow
from ingest.sources.parse import Parsed, expand_paths, parse_items
from samples.generate import GeneratedCorpus, generate
from tests.faultproxy import gql, ingest_env, run_ingest, studies_with_identifier

UPDATE = """mutation($id: ID!, $res: ImagingStudyCreate!) {
  ImagingStudyUpdate(id: $id, res: $res) { id meta { versionId } }
}"""
CREATE = """mutation($res: ImagingStudyCreate!) { ImagingStudyCreate(res: $res) { id } }"""


def _corpus(tmp_path: Path, studies: int, files: int, seed: int) -> tuple[GeneratedCorpus, dict[str, str]]:
    """A generated corpus whose Study Instance UIDs (0020,000D) are replaced by fresh ones.

    Returns the corpus and ``{generated uid: fresh uid}``.
    """
    corpus = generate(tmp_path / "corpus", studies=studies, files=files, seed=seed, tiny=True)
    fresh = {s.study_uid: f"2.25.{uuid.uuid4().int}" for s in corpus.studies}
    for path in corpus.paths():
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = fresh[ds.StudyInstanceUID]  # (0020,000D)
        ds.save_as(path)
    return corpus, fresh


def _copy(corpus: GeneratedCorpus, dirs: list[str], dest: Path) -> Path:
    for d in dirs:
        shutil.copytree(corpus.root / d, dest / d)
    return dest


async def test_replay_creates_on_medplum(medplum_url: str, tmp_path: Path) -> None:
    corpus, fresh = _corpus(tmp_path, studies=2, files=5, seed=301)
    env = ingest_env(medplum_url)
    for s in corpus.studies:
        assert await studies_with_identifier(medplum_url, fresh[s.study_uid]) == []  # Medplum: null

    first = await run_ingest(
        tmp_path / "data", "replay", str(corpus.root), "--jobs", "1", "--json", env=env, cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr
    assert first.json()["studies"]["created"] == 2
    versions: dict[str, str] = {}
    for s in corpus.studies:
        [resource] = await studies_with_identifier(medplum_url, fresh[s.study_uid])
        assert resource["numberOfInstances"] == s.instances
        assert resource["numberOfSeries"] == len(s.series)
        assert resource["status"] == "available"
        versions[s.study_uid] = resource["meta"]["versionId"]

    status = await run_ingest(tmp_path / "data", "status", "--json", env=env, cwd=tmp_path)
    assert status.json()["counts"] == {"pending": 0, "pushed": 2, "dead": 0}
    rows = {r["study_uid"]: r for r in status.json()["studies"]}
    for s in corpus.studies:
        assert rows[fresh[s.study_uid]]["version_id"] == versions[s.study_uid]


async def test_pipeline_scenarios_against_medplum(medplum_url: str, tmp_path: Path) -> None:
    corpus, fresh = _corpus(tmp_path, studies=3, files=9, seed=302)
    grown, rerun, clash = corpus.studies
    dirs = [s.directory for s in grown.series]
    assert len(dirs) >= 2
    later = dirs[-1:]
    settings = Settings(
        data_dir=tmp_path,
        relay=RelaySettings(base_backoff_s=0.05, max_backoff_s=0.5, max_attempts=20, poll_interval_s=0.05),
    )
    builder = StudyBuilder(mapping_options(settings))

    def accept(store: SQLiteStateStore, roots: list[Path]) -> set[str]:
        now = utcnow()
        parsed = [p for p in parse_items(expand_paths(roots), jobs=1) if isinstance(p, Parsed)]
        store.add_instances(
            [(p.record, f"file:{p.label}", None, p.digest) for p in parsed], now=now, due_at=now
        )
        return {p.record.study_uid for p in parsed}

    # someone else already made two resources with the identifier of ``clash``
    for _ in range(2):
        res = {
            "resourceType": "ImagingStudy",
            "status": "available",
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{fresh[clash.study_uid]}"}],
            "subject": {"display": "someone else's copy"},
        }
        answer = await gql(medplum_url, CREATE, {"res": res})
        assert not answer.get("errors"), answer

    first_roots = [corpus.root / d for d in dirs[:-1]] + [
        corpus.root / rerun.directory,
        corpus.root / clash.directory,
    ]
    async with GraphQLSink(medplum_url, token_source=None, timeout_s=10) as sink:
        with SQLiteStateStore(tmp_path / "state.sqlite3") as store:
            relay = Relay(store, sink, builder, settings.relay, node="interop-1")
            await relay.drain(accept(store, first_roots))
            assert relay.totals.results == {"created": 2, "dead": 1}
            assert store.dead_reason(fresh[clash.study_uid]) == "multiple_matches"
            assert len(await studies_with_identifier(medplum_url, fresh[clash.study_uid])) == 2

            # the same input through a fresh state store: found on Medplum, equal, not written again
            [before] = await studies_with_identifier(medplum_url, fresh[rerun.study_uid])
            with SQLiteStateStore(tmp_path / "state2.sqlite3") as store2:
                relay2 = Relay(store2, sink, builder, settings.relay, node="interop-2")
                await relay2.drain(accept(store2, [corpus.root / rerun.directory]))
                assert relay2.totals.results == {"unchanged": 1}
            [after] = await studies_with_identifier(medplum_url, fresh[rerun.study_uid])
            assert after["meta"]["versionId"] == before["meta"]["versionId"]

            # someone else annotates and cancels ``grown``; then its last series arrives
            current = await sink.find(fresh[grown.study_uid], None)
            assert current is not None
            edited: dict[str, Any] = {k: v for k, v in current.resource.items() if k != "meta"}
            edited.update(note=[{"text": "reviewed by radiology QA"}], status="cancelled")
            answer = await gql(medplum_url, UPDATE, {"id": current.id, "res": edited})
            assert not answer.get("errors"), answer
            relay3 = Relay(store, sink, builder, settings.relay, node="interop-3")
            await relay3.drain(accept(store, [corpus.root / d for d in later]))
            assert relay3.totals.results == {"updated": 1}
            row = store.study(fresh[grown.study_uid])
            assert row is not None and row.state is StudyState.PUSHED

    [resource] = await studies_with_identifier(medplum_url, fresh[grown.study_uid])
    assert resource["id"] == current.id
    assert resource["status"] == "cancelled"
    assert resource["note"] == [{"text": "reviewed by radiology QA"}]
    assert {s["uid"] for s in resource["series"]} == {s.series_uid for s in grown.series}
    assert resource["numberOfInstances"] == grown.instances
