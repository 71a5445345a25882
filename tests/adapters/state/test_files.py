"""Replay's file identities (``ingest.adapters.state.files``) on SQLite and PostgreSQL.

A file is known unchanged only when its row has the same size and mtime and the instance it carried is
still held with the digest recorded for it (docs/architecture.md "Replay").
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ingest.core.records import InstanceRecord
from ingest.ports import FileIdentity, StateStore, Verdict
from tests.conftest import StoreFactory

T0 = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
STUDY, SERIES = "1.2.3", "1.2.3.1"


def _add(store: StateStore, sop: str, digest: str, study: str = STUDY) -> None:
    record = InstanceRecord(study_uid=study, series_uid=SERIES, sop_uid=sop, sop_class_uid=CT)
    added = store.add_instance(
        record, source="test", spool_name=None, digest=digest, now=T0, due_at=T0 + timedelta(seconds=5)
    )
    assert added.outcome is Verdict.ADDED


def _ident(path: str, sop: str, *, size: int = 100, mtime_ns: int = 7, digest: str = "c1:a") -> FileIdentity:
    return FileIdentity(path, size, mtime_ns, digest, sop, STUDY)


def test_same_size_mtime_and_held_digest_is_unchanged(store: StateStore) -> None:
    _add(store, "1.2.3.1.1", "c1:a")
    store.remember_files([_ident("/in/a.dcm", "1.2.3.1.1")])
    assert store.unchanged_files([("/in/a.dcm", 100, 7)]) == {"/in/a.dcm": STUDY}


def test_other_size_or_mtime_or_unknown_path_is_not(store: StateStore) -> None:
    _add(store, "1.2.3.1.1", "c1:a")
    store.remember_files([_ident("/in/a.dcm", "1.2.3.1.1")])
    assert store.unchanged_files([("/in/a.dcm", 101, 7), ("/in/b.dcm", 100, 7)]) == {}
    assert store.unchanged_files([("/in/a.dcm", 100, 8)]) == {}


def test_instance_not_held_with_the_recorded_digest_is_not(store: StateStore) -> None:
    # the row names an instance the store does not hold, or holds with other content
    _add(store, "1.2.3.1.1", "c1:other")
    store.remember_files([_ident("/in/a.dcm", "1.2.3.1.1"), _ident("/in/b.dcm", "1.2.3.1.2")])
    assert store.unchanged_files([("/in/a.dcm", 100, 7), ("/in/b.dcm", 100, 7)]) == {}


def test_remember_replaces_the_row_of_a_path(store: StateStore) -> None:
    _add(store, "1.2.3.1.1", "c1:a")
    _add(store, "1.2.3.1.2", "c1:b")
    store.remember_files([_ident("/in/a.dcm", "1.2.3.1.1")])
    store.remember_files([_ident("/in/a.dcm", "1.2.3.1.2", size=200, mtime_ns=9, digest="c1:b")])
    assert store.unchanged_files([("/in/a.dcm", 100, 7)]) == {}
    assert store.unchanged_files([("/in/a.dcm", 200, 9)]) == {"/in/a.dcm": STUDY}


def test_many_paths_are_looked_up_in_chunks(store: StateStore) -> None:
    # more paths than one statement binds (SQLite's variable limit)
    n = 1000
    items = [(f"/in/{i:04d}.dcm", f"1.2.3.1.{i}", f"c1:{i}") for i in range(n)]
    added = store.add_instances(
        [
            (InstanceRecord(study_uid=STUDY, series_uid=SERIES, sop_uid=sop, sop_class_uid=CT), "test", None,
             digest)
            for _, sop, digest in items
        ],
        now=T0,
        due_at=T0,
    )
    assert len(added) == n
    store.remember_files([_ident(path, sop, digest=digest) for path, sop, digest in items])
    found = store.unchanged_files([(path, 100, 7) for path, _, _ in items])
    assert len(found) == n


def test_rows_survive_reopen(store_factory: StoreFactory) -> None:
    first = store_factory()
    _add(first, "1.2.3.1.1", "c1:a")
    first.remember_files([_ident("/in/a.dcm", "1.2.3.1.1")])
    first.close()
    assert store_factory().unchanged_files([("/in/a.dcm", 100, 7)]) == {"/in/a.dcm": STUDY}
