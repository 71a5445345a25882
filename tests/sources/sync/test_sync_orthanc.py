"""``ingest sync --dry-run`` against a real Orthanc (C-FIND and QIDO-RS), and what a PACS that fails does.

Orthanc holds a generated corpus (``samples.generate``) loaded through its REST API, with
``LimitFindResults`` set to 3: both source kinds must still list every study (the study-level windows
are split until no answer is cut short), give the same ImagingStudies element by element, and match a
replay of the same files on every element a query can carry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from samples.generate import GeneratedCorpus, generate
from tests import REPO, free_ports
from tests.sources.sync.pacs import OrthancPacs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LIMIT = 3  # Orthanc's LimitFindResults: far fewer than the corpus's studies


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> GeneratedCorpus:
    return generate(tmp_path_factory.mktemp("corpus"), studies=9, files=40, seed=7, matrix=8)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, corpus: GeneratedCorpus) -> Iterator[OrthancPacs]:
    orthanc = OrthancPacs(tmp_path_factory.mktemp("orthanc"), limit=LIMIT)
    try:
        orthanc.load(corpus.paths())
        yield orthanc
    finally:
        orthanc.stop()


def _ingest(
    tmp: Path, *args: str, config: str = "", timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    cfg = tmp / "ingest.toml"
    cfg.write_text(config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    return subprocess.run(
        [sys.executable, "-m", "ingest", "--config", str(cfg), "--data-dir", str(tmp / "data"), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def _studies(out: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for line in out.splitlines():
        study = json.loads(line)
        uid = next(i["value"] for i in study["identifier"] if i.get("system") == "urn:dicom:uid")
        found[uid.removeprefix("urn:oid:")] = study
    return found


def _no_sequences(study: dict[str, Any]) -> dict[str, Any]:
    """``study`` without the elements that come from DICOM sequences (and the narrative made of them):
    issuers of the accession and the Patient ID, procedure and reason codes, document titles, and the
    order references (``basedOn``: the accession's issuer and the Request Attributes Sequence)."""
    out = {k: v for k, v in study.items() if k not in ("text", "procedureCode", "reasonCode", "basedOn")}
    out["identifier"] = [{k: v for k, v in i.items() if k != "system" or v == "urn:dicom:uid"}
                         for i in study["identifier"]]
    if "subject" in out:
        out["subject"] = {**study["subject"],
                          "identifier": {"value": study["subject"]["identifier"]["value"]}}
    out["series"] = [
        {**s, "instance": [{k: v for k, v in i.items() if k not in ("title", "extension")}
                           for i in s.get("instance", [])]}
        for s in study.get("series", [])
    ]
    return out


def _config(pacs: OrthancPacs, limit: int) -> str:
    return (
        "[sync]\nconcurrency = 2\nattempts = 1\n"
        f'[[sync.sources]]\nname = "pacs-dimse"\nurl = "{pacs.dimse}"\nwado_rs_url = "{pacs.dicomweb}"\n'
        f'[[sync.sources]]\nname = "pacs-web"\nurl = "{pacs.dicomweb}"\nquery_limit = {limit}\n'
    )


def test_both_source_kinds_list_every_study_the_same_way_despite_the_answer_cap(
    tmp_path: Path, pacs: OrthancPacs, corpus: GeneratedCorpus
) -> None:
    config = _config(pacs, LIMIT)
    dimse = _ingest(tmp_path, "sync", "--name", "pacs-dimse", "--dry-run", "--json", config=config)
    assert dimse.returncode == 0, dimse.stderr
    web = _ingest(tmp_path, "sync", "--name", "pacs-web", "--dry-run", "--json", config=config)
    assert web.returncode == 0, web.stderr
    by_dimse, by_web = _studies(dimse.stdout), _studies(web.stdout)
    assert sorted(by_dimse) == sorted(corpus.study_uids)  # nothing lost to LimitFindResults
    # element by element, the Endpoint (the DICOMweb root) included, but for what Orthanc's QIDO-RS
    # cannot carry: its DICOMweb plugin answers with its main DICOM tags and no sequence
    assert {u: _no_sequences(s) for u, s in by_dimse.items()} == {
        u: _no_sequences(s) for u, s in by_web.items()
    }
    assert any(s.get("procedureCode") for s in by_dimse.values())  # C-FIND carries them (Orthanc)
    for study in corpus.studies:
        got = by_dimse[study.study_uid]
        assert (got["numberOfSeries"], got["numberOfInstances"]) == (len(study.series), study.instances)
        assert got["endpoint"][0]["identifier"]["value"] == pacs.dicomweb
    # the windows were split: the DIMSE answers were cut short (Orthanc ends them with 0xFE00), the
    # QIDO-RS ones reached the configured limit
    assert json.loads(dimse.stderr.splitlines()[-1])["instances"]["windows_split"] > 0
    assert json.loads(web.stderr.splitlines()[-1])["instances"]["windows_split"] > 0


# What a study-, series- and image-level query carries of the ImagingStudy (docs/architecture.md "Sync").
_STUDY_KEYS = ("identifier", "status", "modality", "subject", "started", "referrer", "interpreter",
               "numberOfSeries", "numberOfInstances", "description", "procedureCode", "reasonCode")
_SERIES_KEYS = ("uid", "number", "modality", "description", "numberOfInstances", "bodySite", "laterality",
                "started", "performer")
_INSTANCE_KEYS = ("uid", "sopClass", "number", "title", "extension")


def _carried(study: dict[str, Any]) -> dict[str, Any]:
    out = {k: study.get(k) for k in _STUDY_KEYS}
    out["series"] = [
        {**{k: s.get(k) for k in _SERIES_KEYS},
         "instance": [{k: i.get(k) for k in _INSTANCE_KEYS} for i in s.get("instance", [])]}
        for s in study.get("series", [])
    ]
    return out


def test_sync_matches_a_replay_of_the_same_files_on_every_element_a_query_carries(
    tmp_path: Path, pacs: OrthancPacs, corpus: GeneratedCorpus
) -> None:
    synced = _ingest(tmp_path, "sync", "--from", pacs.dimse, "--dry-run")
    assert synced.returncode == 0, synced.stderr
    replayed = _ingest(tmp_path, "replay", str(corpus.root), "--dry-run", "--jobs", "1")
    assert replayed.returncode == 0, replayed.stderr
    by_sync, by_replay = _studies(synced.stdout), _studies(replayed.stdout)
    assert sorted(by_sync) == sorted(by_replay)
    for uid in by_sync:
        assert _carried(by_sync[uid]) == _carried(by_replay[uid]), uid


def test_one_study_and_date_filters(tmp_path: Path, pacs: OrthancPacs, corpus: GeneratedCorpus) -> None:
    uid = corpus.study_uids[4]
    one = _ingest(tmp_path, "sync", "--from", pacs.dicomweb, "--study", uid, "--dry-run")
    assert one.returncode == 0, one.stderr
    assert list(_studies(one.stdout)) == [uid]
    # a date window no study falls in lists nothing
    none = _ingest(tmp_path, "sync", "--from", pacs.dimse, "--since", "1990-01-01", "--until", "1990-12-31",
                   "--dry-run", "--json")
    assert none.returncode == 0, none.stderr
    assert none.stdout == ""
    assert json.loads(none.stderr.splitlines()[-1])["instances"]["studies"] == 0


# -- a PACS that fails ---------------------------------------------------------------------------------


class _Pacs:
    """A pynetdicom C-FIND SCP that answers as told: a failure status, or nothing for a while."""

    def __init__(self, *, status: int = 0xC000, stall: threading.Event | None = None,
                 refuse: bool = False) -> None:
        self.port = free_ports(1)[0]
        ae = AE(ae_title="BADPACS")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        if refuse:
            ae.require_calling_aet = ["SOMEONE"]
        self.stall = stall

        def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
            if self.stall is not None:
                self.stall.wait(20)
            yield status, None

        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_FIND, on_find)])

    @property
    def url(self) -> str:
        return f"dimse://BADPACS@127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.stall is not None:
            self.stall.set()
        self.server.shutdown()


@pytest.mark.parametrize("kind", ["refused", "failure", "timeout"])
def test_a_failing_pacs_is_named_with_the_query_and_exits_1(tmp_path: Path, kind: str) -> None:
    pacs = _Pacs(refuse=kind == "refused", stall=threading.Event() if kind == "timeout" else None)
    try:
        config = "[sync]\nattempts = 2\nretry_base_s = 0.05\ntimeout_s = 1.0\n"
        run = _ingest(tmp_path, "sync", "--from", pacs.url, "--since", "2020-01-01", "--json", config=config)
    finally:
        pacs.stop()
    assert run.returncode == 1, run.stderr
    [line] = [x for x in run.stderr.splitlines() if x.startswith("ingest sync: source ")]
    assert "C-FIND QueryRetrieveLevel=STUDY StudyDate=20200101-" in line
    assert f"BADPACS@127.0.0.1:{pacs.port}" in line
    expected = {"refused": "association rejected", "failure": "failed with status 0xC000",
                "timeout": "no answer"}[kind]
    assert expected in line, line
    summary = json.loads(run.stdout)
    assert summary["errors"] == [line.removeprefix("ingest sync: ")]
    assert summary["instances"]["queries"] == 2  # retried once ([sync] attempts = 2)
