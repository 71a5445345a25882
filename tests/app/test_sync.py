"""``ingest serve`` with a configured ``[[sync.sources]]`` source: two nodes sharing one PostgreSQL store
sync it once per interval between them, every study the PACS (a real Orthanc) holds is written once, and
with ``full = true`` a series deleted in the PACS is withdrawn by the next run.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pydicom
import pytest

from samples.generate import GeneratedCorpus, generate
from tests.app.test_multinode import (
    Child,
    Cluster,
    _backend,
    _serve,
    children,
    cluster,
    complete,
    expected_instances,
    wait_until,
)
from tests.sources.sync.pacs import OrthancPacs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
_ = (children, cluster)  # fixtures

INTERVAL = 3.0


def _sops(corpus: GeneratedCorpus, directory: str) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in (corpus.root / directory).glob("*.dcm")]


def _runs(nodes: list[Child]) -> list[tuple[datetime, str]]:
    """Every run start logged by ``nodes``: (when, node), in time order."""
    found = [
        (datetime.fromisoformat(m[1]), node.name)
        for node in nodes
        for m in re.finditer(r"sync run of pacs started at (\S+) by ", node.text())
    ]
    return sorted(found)


def test_two_nodes_sync_a_configured_source_once_per_interval(
    cluster: Cluster, children: Callable[..., Child], tmp_path: Path
) -> None:
    corpus = generate(tmp_path / "corpus", studies=4, files=16, seed=23, matrix=8)
    pacs = OrthancPacs(tmp_path / "orthanc")
    try:
        pacs.load(corpus.paths())
        backend_url, _ = _backend(children, tmp_path)
        pg = cluster.new_database()
        source = json.dumps([{"name": "pacs", "url": pacs.dimse, "interval_s": INTERVAL, "full": True}])
        nodes = [
            _serve(children, tmp_path, name, pg=pg, backend_url=backend_url, INGEST_SYNC__SOURCES=source)[0]
            for name in ("node-a", "node-b")
        ]
        want = expected_instances(corpus.paths())
        wait_until(lambda: complete(backend_url, want), 60, "every study written once")
        wait_until(lambda: len(_runs(nodes)) >= 4, 60, "four runs")
        runs = _runs(nodes)
        gaps = [(b[0] - a[0]).total_seconds() for a, b in itertools.pairwise(runs)]
        assert min(gaps) >= INTERVAL - 0.05, runs  # never two runs within one interval, whatever the node
        for node in nodes:
            assert "could not run" not in node.text()
        # full = true: every run reconciles every study, so a series deleted in the PACS goes
        study = next(s for s in corpus.studies if len(s.series) >= 2)
        gone = study.series[0]
        pacs.call("DELETE", f"/series/{pacs.series_id(gone.series_uid)}")
        want[study.study_uid] -= set(_sops(corpus, gone.directory))
        wait_until(lambda: complete(backend_url, want), 60, "the deleted series withdrawn")
    finally:
        pacs.stop()
