"""What ``ingest sync`` keeps per source (``ingest.adapters.state.sync``), on SQLite and PostgreSQL, and
metadata-only rows in the instance table (docs/architecture.md "Sync")."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import cast

from ingest.adapters.state.sync import SyncStore
from ingest.core.records import InstanceRecord
from ingest.ports import CommitmentAdded, StateStore, StudyState, Verdict
from tests.conftest import StoreFactory

T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
STUDY, S1, S2 = "1.2.3", "1.2.3.1", "1.2.3.2"
METADATA = "m1:" + "ef" * 32


def _rec(sop: str, series: str = S1, **extra: object) -> InstanceRecord:
    return InstanceRecord(study_uid=STUDY, series_uid=series, sop_uid=sop, sop_class_uid=CT, **extra)  # type: ignore[arg-type]


def _add(store: StateStore, record: InstanceRecord, digest: str, source: str = "sync:pacs") -> Verdict:
    added = store.add_instance(record, source=source, spool_name=None, digest=digest, now=T0, due_at=T0)
    return added.outcome


def _push(store: StateStore) -> None:
    [claim] = store.claim_due(T0 + timedelta(hours=1), 10, "t", 60)
    store.mark_pushed(claim, backend_id="x", version_id="1", digest="d", now=T0 + timedelta(hours=1))


def _clean(store: StateStore) -> bool:
    row = store.study(STUDY)
    return row is not None and row.state is StudyState.PUSHED and not row.dirty


def test_a_later_arrival_with_bytes_takes_over_and_sync_never_takes_it_back(store: StateStore) -> None:
    synced = cast(SyncStore, store)
    assert _add(store, _rec("1.2.3.1.1", instance_number=1), METADATA) is Verdict.ADDED
    _push(store)
    full = _rec("1.2.3.1.1", instance_number=1, study_description="from the header")
    assert _add(store, full, "c1:" + "ab" * 32, source="dimse:MODALITY") is Verdict.ADDED
    assert store.instances(STUDY) == [full]
    assert not _clean(store)  # the study is written again, with the richer values
    _push(store)
    # the PACS's answers again: a duplicate of what is held, nothing written
    assert _add(store, _rec("1.2.3.1.1", instance_number=1), METADATA) is Verdict.DUPLICATE
    assert store.instances(STUDY) == [full]
    assert _clean(store)
    assert synced.sync_source_of(["1.2.3.1.1"]) == {"1.2.3.1.1": "dimse:MODALITY"}


def test_withdrawal_restoration_and_an_unchanged_listing_writes_nothing(store: StateStore) -> None:
    for sop, series in (("1.2.3.1.1", S1), ("1.2.3.1.2", S1), ("1.2.3.2.1", S2)):
        _add(store, _rec(sop, series), METADATA)
    listed = {"1.2.3.1.1": S1, "1.2.3.1.2": S1, "1.2.3.2.1": S2}
    sync = cast(SyncStore, store).sync_study
    assert sync("pacs", STUDY, study_date="20240301", listed=listed, now=T0, due_at=T0) == (0, 0)
    _push(store)
    assert sync("pacs", STUDY, study_date="20240301", listed=listed, now=T0, due_at=T0) == (0, 0)
    assert _clean(store)  # unchanged: nothing written, still pushed and clean
    # series S2 deleted in the PACS: its instance is withdrawn, the study is due again
    without = {k: v for k, v in listed.items() if v != S2}
    assert sync("pacs", STUDY, study_date="20240301", listed=without, now=T0, due_at=T0) == (1, 0)
    assert not _clean(store)
    marked = {r.sop_uid: r.rejected_for for r in store.instances(STUDY)}
    assert marked == {"1.2.3.1.1": None, "1.2.3.1.2": None, "1.2.3.2.1": "113039"}
    _push(store)
    assert sync("pacs", STUDY, study_date="20240301", listed=without, now=T0, due_at=T0) == (0, 0)
    assert _clean(store)
    # it comes back: restored
    assert sync("pacs", STUDY, study_date="20240301", listed=listed, now=T0, due_at=T0) == (0, 1)
    assert {r.rejected_for for r in store.instances(STUDY)} == {None}


def test_a_study_gone_is_kept_or_marked(store: StateStore) -> None:
    synced = cast(SyncStore, store)
    _add(store, _rec("1.2.3.1.1"), METADATA)
    synced.sync_study("pacs", STUDY, study_date="20240301", listed={"1.2.3.1.1": S1},
                     now=T0, due_at=T0)
    _push(store)
    assert synced.sync_known_studies("pacs") == {STUDY: "20240301"}
    assert synced.sync_study_gone("pacs", STUDY, mark=False, now=T0, due_at=T0) is False
    assert _clean(store) and synced.sync_known_studies("pacs") == {}
    assert synced.sync_study_gone("pacs", STUDY, mark=True, now=T0, due_at=T0) is True
    assert [r.rejected_for for r in store.instances(STUDY)] == ["113038"]
    # listed again: the mark is taken back
    assert synced.sync_study("pacs", STUDY, study_date="20240301",
                            listed={"1.2.3.1.1": S1}, now=T0, due_at=T0) == (0, 1)
    assert [r.rejected_for for r in store.instances(STUDY)] == [None]


def test_one_claimant_at_a_time_and_once_per_interval(store_factory: StoreFactory) -> None:
    a, b = cast(SyncStore, store_factory()), cast(SyncStore, store_factory())
    claim = a.sync_claim
    assert claim("pacs", owner="node-a", now=T0, lease_s=60, every_s=300) is True
    assert b.sync_claim("pacs", owner="node-b", now=T0, lease_s=60, every_s=300) is False
    a.sync_finish("pacs", owner="node-a", now=T0 + timedelta(seconds=5), status="ok",
                  error=None, counts={"instances": 3}, watermark="20240301")
    # released, but the interval has not passed since the run started
    assert b.sync_claim("pacs", owner="node-b", now=T0 + timedelta(seconds=10), lease_s=60,
                        every_s=300) is False
    assert b.sync_claim("pacs", owner="node-b", now=T0 + timedelta(seconds=301), lease_s=60,
                        every_s=300) is True
    # the holder renews its lease; a lease that expired (a node that died) can be taken over
    assert b.sync_renew("pacs", owner="node-b", now=T0 + timedelta(seconds=350), lease_s=60) is True
    assert a.sync_renew("pacs", owner="node-a", now=T0 + timedelta(seconds=350), lease_s=60) is False
    assert a.sync_claim("pacs", owner="node-a", now=T0 + timedelta(seconds=400), lease_s=60,
                        every_s=0) is False
    assert a.sync_claim("pacs", owner="node-a", now=T0 + timedelta(seconds=411), lease_s=60,
                        every_s=0) is True
    [run] = b.sync_runs()
    assert (run.source, run.watermark, run.last_status) == ("pacs", "20240301", "ok")
    assert run.counts == {"instances": 3}
    assert b.sync_watermark("pacs") == "20240301"
    a.close()
    b.close()



def test_storage_commitment_treats_a_synced_row_as_bytes_not_held(store: StateStore) -> None:
    _add(store, _rec("1.2.3.1.1"), METADATA)
    assert store.add_commitment("9.1", "CT1", [(CT, "1.2.3.1.1")], now=T0) is CommitmentAdded.NEW
    report = store.decide_commitment("9.1", now=T0, hold_until=T0 + timedelta(days=30))
    # never committed: a synced row is no instance this requester sent (0x0112, as an unknown one)
    assert report.committed == () and report.failed == ((CT, "1.2.3.1.1", 0x0112),)
    # the instance then arrives with its bytes: the next request commits it
    full = _rec("1.2.3.1.1", study_description="x")
    store.add_instances([(full, "dimse:CT1", "a" * 32, "c1:" + "ab" * 32)], now=T0, due_at=T0)
    assert store.add_commitment("9.2", "CT1", [(CT, "1.2.3.1.1")], now=T0) is CommitmentAdded.NEW
    assert store.decide_commitment("9.2", now=T0, hold_until=T0 + timedelta(days=30)).committed == (
        (CT, "1.2.3.1.1"),
    )
