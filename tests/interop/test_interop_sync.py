"""``ingest sync`` writing to Medplum's own FHIR GraphQL implementation, mirroring a real Orthanc.

- Every study Orthanc holds becomes one ImagingStudy; a re-sync writes nothing; a series deleted in
  Orthanc (``DELETE /series/{id}``) disappears from its ImagingStudy at the next ``--full`` run; a deleted
  study is kept as it is (``[sync] on_study_gone = "keep"``) or marked ``entered-in-error``.
- A study both synced and received through the listener (``ingest serve``, dcmtk ``storescu``) is one
  ImagingStudy with the listener's values, and a later sync does not take them back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from samples.generate import GeneratedCorpus, generate
from tests import LOOPBACK_HTTP, REPO, free_ports, wait_until
from tests.sources.sync.pacs import OrthancPacs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _graphql(url: str, query: str) -> Any:
    req = urllib.request.Request(url, data=json.dumps({"query": query}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with LOOPBACK_HTTP.open(req, timeout=30) as rsp:
        body = json.loads(rsp.read())
    assert not body.get("errors"), body
    return body["data"]


def _study(url: str, study_uid: str) -> dict[str, Any] | None:
    """The one ImagingStudy Medplum holds for ``study_uid`` (``None`` when none)."""
    query = (
        f'{{ ImagingStudyList(identifier: "urn:dicom:uid|urn:oid:{study_uid}") {{ id meta {{ versionId }} '
        "status numberOfSeries numberOfInstances procedureCode { text } series { uid instance { uid } } } }"
    )
    found = _graphql(url, query)["ImagingStudyList"]
    assert len(found) <= 1, found
    return found[0] if found else None


def _env(medplum_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update({"INGEST_BACKEND__URL": medplum_url, "INGEST_RELAY__BASE_BACKOFF_S": "0.05",
                "INGEST_RELAY__MAX_BACKOFF_S": "0.4", **extra})
    return env


def _sync(data: Path, medplum_url: str, *args: str, **env: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "ingest", "--data-dir", str(data), "sync", *args, "--json"],
        cwd=REPO, env=_env(medplum_url, **env), capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


@pytest.fixture
def loaded(tmp_path: Path) -> Iterator[tuple[OrthancPacs, GeneratedCorpus]]:
    corpus = generate(tmp_path / "corpus", studies=9, files=40, seed=int.from_bytes(os.urandom(3)), matrix=8)
    orthanc = OrthancPacs(tmp_path / "orthanc", limit=4)
    try:
        orthanc.load(corpus.paths())
        yield orthanc, corpus
    finally:
        orthanc.stop()


def test_mirror_resync_and_deletions(tmp_path: Path, medplum_url: str,
                                     loaded: tuple[OrthancPacs, GeneratedCorpus]) -> None:
    pacs, corpus = loaded
    data = tmp_path / "data"
    first = _sync(data, medplum_url, "--from", pacs.dimse)
    assert first["studies"]["created"] == len(corpus.studies)
    assert first["instances"]["added"] == corpus.files
    before = {uid: _study(medplum_url, uid) for uid in corpus.study_uids}
    for study in corpus.studies:
        got = before[study.study_uid]
        assert got is not None
        assert (got["numberOfSeries"], got["numberOfInstances"]) == (len(study.series), study.instances)

    # unchanged: a full re-sync and an incremental one write nothing
    again = _sync(data, medplum_url, "--from", pacs.dimse, "--full")
    assert again["instances"]["added"] == 0 and again["instances"]["unchanged"] == corpus.files
    assert sum(again["studies"].values()) == 0
    incremental = _sync(data, medplum_url, "--from", pacs.dimse)
    assert incremental["instances"]["studies"] == 0  # from the watermark: nothing this recent
    assert {uid: _study(medplum_url, uid) for uid in corpus.study_uids} == before

    # a series deleted in the PACS disappears after the next full sync
    target = next(s for s in corpus.studies if len(s.series) >= 2)
    gone_series = target.series[0]
    pacs.call("DELETE", f"/series/{pacs.series_id(gone_series.series_uid)}")
    third = _sync(data, medplum_url, "--from", pacs.dimse, "--full")
    assert third["instances"]["withdrawn"] == gone_series.instances
    assert third["studies"]["updated"] == 1
    after = _study(medplum_url, target.study_uid)
    assert after is not None
    assert gone_series.series_uid not in {s["uid"] for s in after["series"]}
    assert after["numberOfInstances"] == target.instances - gone_series.instances
    assert after["numberOfSeries"] == len(target.series) - 1

    # a study deleted in the PACS: kept as it is by default...
    kept, marked = [s for s in corpus.studies if s is not target][:2]
    pacs.call("DELETE", f"/studies/{pacs.study_id(kept.study_uid)}")
    fourth = _sync(data, medplum_url, "--from", pacs.dimse, "--full")
    assert fourth["instances"]["gone"] == 1 and sum(fourth["studies"].values()) == 0
    assert _study(medplum_url, kept.study_uid) == before[kept.study_uid]
    # ... or entered-in-error
    pacs.call("DELETE", f"/studies/{pacs.study_id(marked.study_uid)}")
    fifth = _sync(data, medplum_url, "--from", pacs.dimse, "--full",
                  INGEST_SYNC__ON_STUDY_GONE="entered-in-error")
    assert fifth["instances"]["gone"] == 1 and fifth["studies"]["updated"] == 1
    gone = _study(medplum_url, marked.study_uid)
    assert gone is not None and gone["status"] == "entered-in-error"
    # ingest status shows the source's last run
    status = subprocess.run([sys.executable, "-m", "ingest", "--data-dir", str(data), "status", "--json"],
                            cwd=REPO, env=_env(medplum_url), capture_output=True, text=True, timeout=60,
                            check=True)
    [source] = json.loads(status.stdout)["sync"]
    assert source["last_status"] == "ok" and source["counts"]["gone"] == 1


@contextmanager
def _serving(data: Path, medplum_url: str) -> Iterator[int]:
    dicom_port, admin_port = free_ports(2)
    env = _env(medplum_url, INGEST_LISTENER__PORT=str(dicom_port),
               INGEST_LISTENER__ACCEPT_ANY_CALLING_AE="true",
               INGEST_ADMIN__PORT=str(admin_port), INGEST_ADMIN__MIN_FREE_BYTES="0",
               INGEST_RELAY__STABLE_AGE_S="0.3", INGEST_RELAY__POLL_INTERVAL_S="0.1")
    log = (data.parent / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "ingest", "--data-dir", str(data), "serve"],
                            cwd=REPO, env=env, stdout=log, stderr=log)

    def up() -> bool:
        assert proc.poll() is None, (data.parent / "serve.log").read_text()[-3000:]
        try:
            with LOOPBACK_HTTP.open(f"http://127.0.0.1:{admin_port}/healthz", timeout=2) as rsp:
                return bool(json.loads(rsp.read()).get("listener") == "ok")
        except OSError:
            return False

    try:
        wait_until(up, 60, "ingest serve listening", every=0.2)
        yield dicom_port
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed")
def test_synced_and_received_is_one_study_with_the_listener_values(
    tmp_path: Path, medplum_url: str, loaded: tuple[OrthancPacs, GeneratedCorpus]
) -> None:
    pacs, corpus = loaded
    data = tmp_path / "data"
    study = corpus.studies[0]
    # QIDO-RS from Orthanc carries no sequence: the synced ImagingStudy has no procedure code
    web = ("--from", pacs.dicomweb, "--query-limit", "4", "--study", study.study_uid)
    first = _sync(data, medplum_url, *web)
    assert first["studies"]["created"] == 1
    synced = _study(medplum_url, study.study_uid)
    assert synced is not None and not synced.get("procedureCode")
    # the same study arrives with its bytes through the listener: the listener's values win
    with _serving(data, medplum_url) as port:
        files = [str(p) for p in (corpus.root / study.directory).rglob("*.dcm")]
        subprocess.run(["storescu", "-aec", "INGEST", "127.0.0.1", str(port), *files], check=True,
                       capture_output=True, timeout=120)
        received = wait_until(
            lambda: (s := _study(medplum_url, study.study_uid)) is not None and s.get("procedureCode") and s,
            60, "the listener's values written", every=0.3,
        )
    assert received["id"] == synced["id"]  # one ImagingStudy
    assert received["numberOfInstances"] == study.instances
    # a later sync of the same study changes nothing: the records with bytes are richer
    again = _sync(data, medplum_url, *web)
    assert again["instances"]["added"] == 0 and sum(again["studies"].values()) == 0
    assert _study(medplum_url, study.study_uid) == received
