"""A run's walk and intake (``ingest.sources.sync.run``) against a pynetdicom Study Root SCP on loopback
and a real SQLite state store: a study whose image-level answers list fewer instances than its
study-level answer announced is admitted but nothing of it is withdrawn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.sources.sync.dimse import DimseFinder
from ingest.sources.sync.run import SyncCounts, SyncIntake, SyncScope, Walker
from tests import free_ports

STUDY = "1.2.826.0.1.3680043.10.1.88"
SERIES = f"{STUDY}.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


class _Pacs:
    """Answers one study (announcing ``announced`` instances) with one series of ``listed`` instances."""

    def __init__(self) -> None:
        self.announced = 3
        self.listed = 3
        self.port = free_ports(1)[0]
        ae = AE(ae_title="PACS")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_FIND, self.on_find)])

    def on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        level = event.identifier.QueryRetrieveLevel
        answers: list[Dataset] = []
        if level == "STUDY":
            ds = Dataset()
            ds.StudyInstanceUID, ds.StudyDate = STUDY, "20240105"
            ds.NumberOfStudyRelatedInstances = str(self.announced)
            answers = [ds]
        elif level == "SERIES":
            ds = Dataset()
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = STUDY, SERIES, "CT"
            answers = [ds]
        else:
            for n in range(1, self.listed + 1):
                ds = Dataset()
                ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
                ds.SOPInstanceUID, ds.SOPClassUID, ds.InstanceNumber = f"{SERIES}.{n}", CT, str(n)
                answers.append(ds)
        for ds in answers:
            ds.QueryRetrieveLevel = level
            yield 0xFF00, ds
        yield 0x0000, None


@pytest.fixture
def pacs() -> Iterator[_Pacs]:
    p = _Pacs()
    try:
        yield p
    finally:
        p.server.shutdown()


def _run(pacs: _Pacs, store: SQLiteStateStore) -> SyncCounts:
    finder = DimseFinder("pacs", f"dimse://PACS@127.0.0.1:{pacs.port}", calling_ae="INGEST", timeout_s=10)
    walker = Walker(finder, query_limit=100, concurrency=1, attempts=1, retry_base_s=0.1)
    intake = SyncIntake(store, name="pacs", stable_age_s=0, on_study_gone="keep")
    counts = SyncCounts()
    try:
        for listing in walker.walk(SyncScope(), counts):
            intake(listing, counts)
        intake.reconcile_gone(SyncScope(), counts)
    finally:
        finder.close()
    return counts


def test_a_listing_short_of_the_announced_count_withdraws_nothing(tmp_path: Path, pacs: _Pacs) -> None:
    with SQLiteStateStore(tmp_path / "state.sqlite3") as store:
        first = _run(pacs, store)
        assert (first.instances, first.added, first.withdrawn) == (3, 3, 0)
        pacs.listed = 2  # an answer lost on the way: the study still announces 3
        short = _run(pacs, store)
        assert (short.short_listings, short.withdrawn) == (1, 0)
        assert {r.rejected_for for r in store.instances(STUDY)} == {None}
        pacs.announced = 2  # the PACS really holds 2 now
        gone = _run(pacs, store)
        assert (gone.short_listings, gone.withdrawn) == (0, 1)
        marked = {r.sop_uid: r.rejected_for for r in store.instances(STUDY)}
        assert marked == {f"{SERIES}.1": None, f"{SERIES}.2": None, f"{SERIES}.3": "113039"}
