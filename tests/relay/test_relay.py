"""The relay (``ingest.relay.relay.Relay``), a fake Sink, the real SQLite state store and an injected clock.

No sleeps: time only moves when a test moves the clock. The fake sink keeps resources in a dict, finds them
by the study identifier ``urn:dicom:uid|urn:oid:<uid>`` like a FHIR server would, and can be told to fail.
"""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app.wiring import mapping_options
from ingest.config import RelaySettings, Settings
from ingest.core.records import InstanceRecord
from ingest.errors import MultipleMatchesError, PermanentSinkError, RetryableSinkError, StoreUnavailableError
from ingest.ports import BackendStudy, StudyState
from ingest.relay.build import StudyBuilder
from ingest.relay.relay import Relay, backoff_delay, record_delay

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"  # SOP Class UID (0008,0016): CT Image Storage
STUDY_A = "1.2.826.0.1.3680043.8.498.1"
STUDY_B = "1.2.826.0.1.3680043.8.498.2"
T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


class Clock:
    """An injected clock: ``now`` moves only when the test says so."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class FakeSink:
    """A FHIR backend in a dict, with scripted failures per operation (``find``/``create``/``update``)."""

    def __init__(self) -> None:
        self.resources: dict[str, dict[str, Any]] = {}
        self.calls: Counter[str] = Counter()
        self.fail: dict[str, list[Exception]] = {"find": [], "create": [], "update": []}
        self.lose_response: set[str] = set()  # ops whose write commits but whose answer is "lost"
        self.on_write: Callable[[], None] | None = None

    def _matches(self, study_uid: str) -> list[dict[str, Any]]:
        value = f"urn:oid:{study_uid}"
        return [
            r
            for r in self.resources.values()
            if any(
                i.get("system") == "urn:dicom:uid" and i.get("value") == value
                for i in r.get("identifier", [])
            )
        ]

    def _found(self, resource: dict[str, Any]) -> BackendStudy:
        return BackendStudy(resource["id"], resource["meta"]["versionId"], copy.deepcopy(resource))

    def _store(self, rid: str, resource: dict[str, Any]) -> BackendStudy:
        stored = copy.deepcopy(resource)
        stored.update(id=rid, meta={"versionId": uuid.uuid4().hex})
        self.resources[rid] = stored
        return self._found(stored)

    def _maybe_fail(self, op: str) -> None:
        self.calls[op] += 1
        if self.fail[op]:
            raise self.fail[op].pop(0)

    async def find(self, study_uid: str, backend_id: str | None) -> BackendStudy | None:
        self._maybe_fail("find")
        if backend_id is not None and backend_id in self.resources:
            return self._found(self.resources[backend_id])
        found = self._matches(study_uid)
        if len(found) >= 2:
            raise MultipleMatchesError(f"{len(found)} ImagingStudy resources carry study {study_uid}")
        return self._found(found[0]) if found else None

    async def create(self, resource: dict[str, Any]) -> BackendStudy:
        self._maybe_fail("create")
        if self.on_write is not None:
            self.on_write()
        written = self._store(uuid.uuid4().hex, resource)
        if "create" in self.lose_response:
            self.lose_response.discard("create")
            raise RetryableSinkError("create: connection reset after the request was sent")
        return written

    async def update(self, backend_id: str, resource: dict[str, Any]) -> BackendStudy:
        self._maybe_fail("update")
        if self.on_write is not None:
            self.on_write()
        return self._store(backend_id, resource)

    async def aclose(self) -> None:
        pass


def record(study: str, series: int, instance: int) -> InstanceRecord:
    return InstanceRecord(
        study_uid=study,  # (0020,000D)
        series_uid=f"{study}.{series}",  # (0020,000E)
        sop_uid=f"{study}.{series}.{instance}",  # (0008,0018)
        sop_class_uid=CT_IMAGE,  # (0008,0016)
        modality="CT",  # (0008,0060)
        series_number=series,  # (0020,0011)
        instance_number=instance,  # (0020,0013)
        study_date="20240501",  # (0008,0020)
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    relay = RelaySettings(
        stable_age_s=10, base_backoff_s=1, max_backoff_s=30, max_attempts=4, concurrency=2, lease_s=60
    )
    return Settings(data_dir=tmp_path, relay=relay)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with SQLiteStateStore(tmp_path / "state.sqlite3", node="test") as s:
        yield s


@pytest.fixture
def sink() -> FakeSink:
    return FakeSink()


@pytest.fixture
def relay(store: SQLiteStateStore, sink: FakeSink, settings: Settings, clock: Clock) -> Relay:
    return Relay(
        store, sink, StudyBuilder(mapping_options(settings)), settings.relay, node="relay-1", clock=clock
    )


def add(store: SQLiteStateStore, clock: Clock, settings: Settings, *records: InstanceRecord) -> None:
    for r in records:
        store.add_instance(
            r,
            source="test",
            spool_name=None,
            digest=f"d-{r.sop_uid}",
            now=clock(),
            due_at=clock() + timedelta(seconds=settings.relay.stable_age_s),
        )


async def test_study_is_pushed_once_stable_one_lookup_one_create(
    relay: Relay, store: SQLiteStateStore, sink: FakeSink, clock: Clock, settings: Settings
) -> None:
    add(store, clock, settings, record(STUDY_A, 1, 1), record(STUDY_A, 1, 2))
    clock.advance(9.9)
    assert await relay.run_once() == 0  # not stable yet (stable_age_s = 10)
    assert sink.calls == Counter()
    clock.advance(0.1)
    assert await relay.run_once() == 1
    assert sink.calls == Counter(find=1, create=1)
    [resource] = sink.resources.values()
    ident = resource["identifier"][0]
    assert (ident["system"], ident["value"]) == ("urn:dicom:uid", f"urn:oid:{STUDY_A}")
    assert resource["numberOfInstances"] == 2
    row = store.study(STUDY_A)
    assert row is not None and row.state is StudyState.PUSHED and not row.dirty
    assert row.backend_id == resource["id"] and row.version_id == resource["meta"]["versionId"]
    assert relay.totals.results == Counter(created=1)

    clock.advance(60)
    assert await relay.run_once() == 0  # nothing new: nothing claimed, the backend is not asked
    assert sink.calls == Counter(find=1, create=1)


async def test_more_instances_later_update_with_the_union(
    relay: Relay, store: SQLiteStateStore, sink: FakeSink, clock: Clock, settings: Settings
) -> None:
    add(store, clock, settings, record(STUDY_A, 1, 1))
    clock.advance(10)
    await relay.run_once()
    add(store, clock, settings, record(STUDY_A, 2, 1), record(STUDY_A, 2, 2))
    clock.advance(10)
    assert await relay.run_once() == 1
    assert sink.calls == Counter(find=2, create=1, update=1)
    [resource] = sink.resources.values()
    assert resource["numberOfSeries"] == 2
    assert resource["numberOfInstances"] == 3
    assert relay.totals.results == Counter(created=1, updated=1)


async def test_state_lost_backend_unchanged_no_write(
    tmp_path: Path, relay: Relay, store: SQLiteStateStore, sink: FakeSink, clock: Clock, settings: Settings
) -> None:
    records = (record(STUDY_A, 1, 1), record(STUDY_A, 1, 2))
    add(store, clock, settings, *records)
    clock.advance(10)
    await relay.run_once()
    version = next(iter(sink.resources.values()))["meta"]["versionId"]
    with SQLiteStateStore(tmp_path / "other.sqlite3", node="other") as fresh:
        add(fresh, clock, settings, *records)
        clock.advance(10)
        other = Relay(
            fresh, sink, StudyBuilder(mapping_options(settings)), settings.relay, node="relay-2", clock=clock
        )
        assert await other.run_once() == 1
        assert other.totals.results == Counter(unchanged=1)
        row = fresh.study(STUDY_A)
        assert row is not None and row.state is StudyState.PUSHED and row.version_id == version
    assert sink.calls == Counter(find=2, create=1)
    assert next(iter(sink.resources.values()))["meta"]["versionId"] == version


async def test_transient_failure_backs_off_with_persisted_next_attempt(
    tmp_path: Path, relay: Relay, store: SQLiteStateStore, sink: FakeSink, clock: Clock, settings: Settings
) -> None:
    add(store, clock, settings, record(STUDY_A, 1, 1))
    clock.advance(10)
    sink.fail["create"].append(RetryableSinkError("HTTP 503", code=503))
    assert await relay.run_once() == 1
    assert relay.totals.results == Counter(retried=1)
    row = store.study(STUDY_A)
    assert row is not None and row.state is StudyState.PENDING and row.dirty and row.attempts == 1
    assert row.next_attempt_at is not None
    assert (
        clock() <= row.next_attempt_at <= clock() + timedelta(seconds=1)
    )  # full jitter, attempt 1: [0, base]
    assert row.last_error is not None and "HTTP 503" in row.last_error
    assert not sink.resources

    # a restart keeps the next attempt time (it lives in the store, not in the relay)
    store.close()
    with SQLiteStateStore(tmp_path / "state.sqlite3", node="test") as reopened:
        again = reopened.study(STUDY_A)
        assert again is not None and again.next_attempt_at == row.next_attempt_at
        relay2 = Relay(
            reopened, sink, StudyBuilder(mapping_options(settings)), settings.relay, node="r2", clock=clock
        )
        if row.next_attempt_at > clock():
            assert await relay2.run_once() == 0  # not before its next attempt
        clock.now = row.next_attempt_at
        assert await relay2.run_once() == 1
        assert relay2.totals.results == Counter(created=1)
        done = reopened.study(STUDY_A)
        assert done is not None and done.state is StudyState.PUSHED and done.attempts == 0
    assert len(sink.resources) == 1


async def test_a_clock_set_back_one_hour_still_pushes_a_pending_study_and_its_retry(
    relay: Relay, store: SQLiteStateStore, sink: FakeSink, clock: Clock, settings: Settings
) -> None:
    add(store, clock, settings, record(STUDY_A, 1, 1))  # due at T0 + 10 s
    clock.advance(10)
    sink.fail["create"].append(RetryableSinkError("HTTP 503", code=503))
    add(store, clock, settings, record(STUDY_B, 1, 1))  # due at T0 + 20 s
    assert await relay.run_once() == 1  # A fails: its next attempt is within max_backoff_s (30 s)
    row = store.study(STUDY_A)
    assert row is not None and row.next_attempt_at is not None
    clock.advance(9)
    clock.now -= timedelta(hours=1)  # set back one hour
    # both due times now look an hour away, further than stable_age_s / max_backoff_s allow: due
    assert await relay.run_once() == 2
    assert relay.totals.results == Counter(retried=1, created=2)
    # a study that arrives after the step waits its stable age as usual
    add(store, clock, settings, record("1.2.826.0.1.3680043.8.498.3", 1, 1))
    assert await relay.run_once() == 0
    clock.advance(10)
    assert await relay.run_once() == 1


def test_backoff_is_full_jitter_exponential_and_capped() -> None:
    for attempt, cap in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 30.0), (20, 30.0)):
        delays = [backoff_delay(attempt, 1.0, 30.0) for _ in range(300)]
        assert all(0.0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.5  # spread over the whole range, not a fixed step
        assert min(delays) < cap * 0.5


async def test_permanent_error_dead_letters_and_other_studies_go_on(
    relay: Relay, store: SQLiteStateStore, sink: FakeSink, clock: Clock, settings: Settings
) -> None:
    add(store, clock, settings, record(STUDY_A, 1, 1))
    clock.advance(1)
    add(store, clock, settings, record(STUDY_B, 1, 1))
    clock.advance(10)
    # the backend rejects study A's create (A and B are pushed concurrently: which create comes first
    # depends on the state store's threads, so the failure is tied to the study, not to the call order)
    create = sink.create
    rejected: PermanentSinkError | None = PermanentSinkError(
        "backend rejected the request: ImagingStudy.started invalid"
    )

    async def reject_a_once(resource: dict[str, Any]) -> BackendStudy:
        nonlocal rejected
        if rejected is not None and resource["identifier"][0]["value"] == f"urn:oid:{STUDY_A}":
            sink.calls["create"] += 1
            exc, rejected = rejected, None
            raise exc
        return await create(resource)

    sink.create = reject_a_once  # type: ignore[method-assign]
    assert await relay.run_once() == 2
    assert relay.totals.results == Counter(dead=1, created=1)
    dead = store.study(STUDY_A)
    assert dead is not None and dead.state is StudyState.DEAD
    assert dead.last_error is not None and "ImagingStudy.started" in dead.last_error
    assert store.dead_reason(STUDY_A) == "rejected"
    ok = store.study(STUDY_B)
    assert ok is not None and ok.state is StudyState.PUSHED

    clock.advance(3600)
    assert await relay.run_once() == 0  # a dead letter is not retried by itself
    assert store.retry_dead(STUDY_A, clock()) == 1
    assert await relay.run_once() == 1
    row = store.study(STUDY_A)
    assert row is not None and row.state is StudyState.PUSHED
    assert len(sink.resources) == 2


async def test_multiple_matches_dead_letter_never_guess(
    relay: Relay, store: SQLiteStateStore, sink: FakeSink, clock: Clock, settings: Settings
) -> None:
    ident = [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_A}"}]
    for rid in ("x1", "x2"):
        sink.resources[rid] = {
            "resourceType": "ImagingStudy",
            "id": rid,
            "meta": {"versionId": "1"},
            "status": "available",
            "identifier": ident,
        }
    add(store, clock, settings, record(STUDY_A, 1, 1), record(STUDY_B, 1, 1))
    clock.advance(10)
    await relay.run_once()
    assert store.dead_reason(STUDY_A) == "multiple_matches"
    assert sink.calls["create"] == 1 and sink.calls["update"] == 0  # only study B was written
    assert {r["meta"]["versionId"] for r in (sink.resources["x1"], sink.resources["x2"])} == {"1"}


async def test_retries_exhausted_dead_letter(
    relay: Relay, store: SQLiteStateStore, sink: FakeSink, clock: Clock, settings: Settings
) -> None:
    add(store, clock, settings, record(STUDY_A, 1, 1))
    clock.advance(10)
    sink.fail["find"] = [RetryableSinkError(f"connection refused #{i}") for i in range(10)]
    for attempt in range(1, settings.relay.max_attempts + 1):
        assert await relay.run_once() == 1
        clock.advance(settings.relay.max_backoff_s)
        row = store.study(STUDY_A)
        assert row is not None
        assert row.state is (
            StudyState.DEAD if attempt == settings.relay.max_attempts else StudyState.PENDING
        )
    assert store.dead_reason(STUDY_A) == "retries_exhausted"
    assert relay.totals.results == Counter(retried=3, dead=1)
    assert sink.calls["find"] == 4 and not sink.resources


async def test_instance_arriving_during_a_push_keeps_the_study_due(
    relay: Relay, store: SQLiteStateStore, sink: FakeSink, clock: Clock, settings: Settings
) -> None:
    add(store, clock, settings, record(STUDY_A, 1, 1))
    clock.advance(10)
    late = record(STUDY_A, 1, 2)

    def arrive() -> None:  # a C-STORE lands while the relay is writing
        sink.on_write = None
        add(store, clock, settings, late)

    sink.on_write = arrive
    await relay.run_once()
    row = store.study(STUDY_A)
    assert row is not None and row.dirty and row.state is StudyState.PENDING and row.backend_id is not None
    clock.advance(10)
    assert await relay.run_once() == 1
    [resource] = sink.resources.values()
    assert resource["numberOfInstances"] == 2
    assert relay.totals.results == Counter(created=1, updated=1)


async def test_response_lost_after_commit_is_found_not_created_twice(
    relay: Relay, store: SQLiteStateStore, sink: FakeSink, clock: Clock, settings: Settings
) -> None:
    add(store, clock, settings, record(STUDY_A, 1, 1))
    clock.advance(10)
    sink.lose_response.add("create")
    await relay.run_once()
    assert relay.totals.results == Counter(retried=1)
    clock.advance(settings.relay.max_backoff_s)
    await relay.run_once()
    assert relay.totals.results == Counter(retried=1, unchanged=1)
    assert len(sink.resources) == 1 and sink.calls["create"] == 1
    row = store.study(STUDY_A)
    assert row is not None and row.state is StudyState.PUSHED
    assert row.backend_id == next(iter(sink.resources))


async def test_drain_pushes_at_once_and_waits_out_a_retry(
    store: SQLiteStateStore, sink: FakeSink, settings: Settings
) -> None:
    class Ticking(Clock):  # every look at the clock moves it one second: retries come due without sleeping
        def __call__(self) -> datetime:
            self.now += timedelta(seconds=1)
            return self.now

    ticking = Ticking()
    cfg = settings.model_copy(update={"relay": settings.relay.model_copy(update={"max_backoff_s": 2.0})})
    relay = Relay(store, sink, StudyBuilder(mapping_options(cfg)), cfg.relay, node="drainer", clock=ticking)
    for r in (record(STUDY_A, 1, 1), record(STUDY_B, 1, 1)):
        store.add_instance(
            r,
            source="t",
            spool_name=None,
            digest=r.sop_uid,
            now=ticking.now,
            due_at=ticking.now + timedelta(hours=1),
        )  # not stable for an hour
    sink.fail["create"].append(RetryableSinkError("HTTP 502", code=502))
    await relay.drain([STUDY_A, STUDY_B])  # end of the replay input: due now, pushed, retried
    assert relay.totals.results == Counter(created=2, retried=1)
    assert {r.state for r in store.studies()} == {StudyState.PUSHED}
    assert len(sink.resources) == 2


async def test_retry_after_hint_is_honoured_within_the_cap(
    relay: Relay, store: SQLiteStateStore, sink: FakeSink, clock: Clock, settings: Settings
) -> None:
    add(store, clock, settings, record(STUDY_A, 1, 1), record(STUDY_B, 1, 1))
    clock.advance(10)
    sink.fail["find"] = [
        RetryableSinkError("HTTP 429", code=429, retry_after=20.0),
        RetryableSinkError("HTTP 503", code=503, retry_after=3600.0),  # more than max_backoff_s (30)
    ]
    await relay.run_once()
    waits = sorted(
        (row.next_attempt_at - clock()).total_seconds() for row in store.studies() if row.next_attempt_at
    )
    assert waits == [20.0, 30.0]


# -- recording a push that the backend already holds ------------------------------------------------------


class FlakyStore:
    """The real store, except that the methods named in ``failing`` raise ``StoreUnavailableError`` for
    their first ``times`` calls (``None``: always), like a locked or unreachable database would."""

    def __init__(self, inner: SQLiteStateStore, failing: set[str], times: int | None) -> None:
        self.inner = inner
        self.failing = failing
        self.times = times
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if name not in self.failing:
            return method

        def flaky(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if self.times is None or self.calls[name] <= self.times:
                raise StoreUnavailableError(f"{name}: database is locked")
            return method(*args, **kwargs)

        return flaky


def test_record_delay_is_short_doubling_and_capped_at_ten_seconds() -> None:
    defaults = RelaySettings()
    schedule = [
        record_delay(n, defaults.record_retry_base_s, defaults.record_retry_max_s) for n in range(1, 9)
    ]
    assert schedule == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


async def test_recording_failure_is_retried_in_place_within_seconds_backend_written_once(
    store: SQLiteStateStore, sink: FakeSink, clock: Clock, settings: Settings
) -> None:
    flaky = FlakyStore(store, {"mark_pushed"}, times=2)
    relay = Relay(flaky, sink, StudyBuilder(mapping_options(settings)), settings.relay, node="r", clock=clock)
    add(store, clock, settings, record(STUDY_A, 1, 1))
    clock.advance(10)
    started = time.monotonic()
    assert await relay.run_once() == 1
    elapsed = time.monotonic() - started
    assert elapsed < 4.0  # default schedule: 0.5 s + 1 s, not [relay] max_backoff_s (30 s here)
    assert flaky.calls["mark_pushed"] == 3
    row = store.study(STUDY_A)
    assert row is not None and row.state is StudyState.PUSHED and not row.dirty
    assert row.backend_id == next(iter(sink.resources))
    assert sink.calls == Counter(find=1, create=1)  # recorded without writing to the backend again
    assert relay.totals.results == Counter(created=1)


async def test_recording_that_keeps_failing_leaves_the_study_for_the_next_push_no_duplicate(
    store: SQLiteStateStore, sink: FakeSink, clock: Clock, settings: Settings
) -> None:
    cfg = settings.model_copy(update={"relay": settings.relay.model_copy(
        update={"record_attempts": 3, "record_retry_base_s": 0.01, "record_retry_max_s": 0.02}
    )})
    flaky = FlakyStore(store, {"mark_pushed"}, times=3)
    relay = Relay(flaky, sink, StudyBuilder(mapping_options(cfg)), cfg.relay, node="r", clock=clock)
    add(store, clock, cfg, record(STUDY_A, 1, 1))
    clock.advance(10)
    assert await relay.run_once() == 1
    assert relay.totals.results == Counter(unrecorded=1)
    row = store.study(STUDY_A)
    assert row is not None and row.state is StudyState.PENDING and row.dirty and row.backend_id is None
    assert sink.calls == Counter(find=1, create=1)

    clock.advance(5)
    assert await relay.run_once() == 0  # still claimed: its lease has not run out
    clock.advance(cfg.relay.lease_s)
    assert await relay.run_once() == 1  # the store works again: the backend's copy is found
    assert relay.totals.results == Counter(unrecorded=1, unchanged=1)
    assert sink.calls == Counter(find=2, create=1) and len(sink.resources) == 1
    row = store.study(STUDY_A)
    assert row is not None and row.state is StudyState.PUSHED and row.backend_id == next(iter(sink.resources))


async def test_relay_survives_a_store_that_cannot_even_schedule_the_retry(
    store: SQLiteStateStore, sink: FakeSink, clock: Clock, settings: Settings
) -> None:
    flaky = FlakyStore(store, {"instances", "schedule_retry"}, times=None)
    relay = Relay(flaky, sink, StudyBuilder(mapping_options(settings)), settings.relay, node="r", clock=clock)
    add(store, clock, settings, record(STUDY_A, 1, 1))
    clock.advance(10)
    assert await relay.run_once() == 1  # no exception out of the relay loop
    assert flaky.calls["schedule_retry"] == 1
    row = store.study(STUDY_A)
    assert row is not None and row.state is StudyState.PENDING and row.dirty
    assert not sink.calls


# -- the subject guard (docs/mapping.md, "The lifecycle of a study") -------------------------------------


def _subject(pid: str) -> dict[str, Any]:
    # ImagingStudy.subject as the mapping writes it in logical mode: Patient ID (0010,0020) + issuer
    return {"type": "Patient", "identifier": {"system": "urn:oid:1.2.3", "value": pid}}


def _relay_with_subject(
    store: SQLiteStateStore, sink: FakeSink, settings: Settings, clock: Clock, subject: dict[str, Any]
) -> Relay:
    build = StudyBuilder(mapping_options(settings))
    return Relay(
        store, sink, lambda records: {**build(records), "subject": dict(subject)}, settings.relay,
        node="relay-1", clock=clock,
    )


async def test_a_corrected_patient_id_moves_the_subject(
    store: SQLiteStateStore, sink: FakeSink, settings: Settings, clock: Clock
) -> None:
    subject = _subject("PID-1")
    relay = _relay_with_subject(store, sink, settings, clock, subject)
    add(store, clock, settings, record(STUDY_A, 1, 1))
    clock.advance(10)
    await relay.run_once()
    [rid] = sink.resources
    subject.update(_subject("PID-2"))  # the corrected instance carries another Patient ID
    add(store, clock, settings, record(STUDY_A, 1, 2))
    clock.advance(10)
    await relay.run_once()
    assert relay.totals.results["updated"] == 1
    assert sink.resources[rid]["subject"]["identifier"]["value"] == "PID-2"


async def test_a_subject_another_writer_changed_is_not_overwritten_by_a_corrected_patient_id(
    store: SQLiteStateStore, sink: FakeSink, settings: Settings, clock: Clock
) -> None:
    subject = _subject("PID-1")
    relay = _relay_with_subject(store, sink, settings, clock, subject)
    add(store, clock, settings, record(STUDY_A, 1, 1))
    clock.advance(10)
    await relay.run_once()
    [rid] = sink.resources
    sink.resources[rid]["subject"] = {"reference": "Patient/reconciled"}  # another writer re-links it
    subject.update(_subject("PID-2"))
    add(store, clock, settings, record(STUDY_A, 1, 2))
    clock.advance(10)
    await relay.run_once()
    assert relay.totals.results["dead"] == 1 and sink.calls["update"] == 0
    row = store.study(STUDY_A)
    assert row is not None and row.state is StudyState.DEAD and row.dead_reason == "subject_changed"
    assert "another writer" in (row.last_error or "")
    assert sink.resources[rid]["subject"] == {"reference": "Patient/reconciled"}


async def test_a_backend_copy_the_sink_cannot_carry_back_is_dead_lettered_with_its_reason(
    store: SQLiteStateStore, sink: FakeSink, settings: Settings, clock: Clock, relay: Relay
) -> None:
    from ingest.errors import ForeignContentError

    add(store, clock, settings, record(STUDY_A, 1, 1))
    sink.fail["find"].append(
        ForeignContentError("the backend copy holds contained, which ...", reason="unwritable_content")
    )
    clock.advance(10)
    await relay.run_once()
    row = store.study(STUDY_A)
    assert row is not None and row.dead_reason == "unwritable_content"
    assert sink.calls["create"] == 0 and sink.calls["update"] == 0


async def _until(check: Callable[[], bool], what: str, timeout_s: float = 10) -> None:
    """Let the relay's loop (and its store threads) run until ``check()``; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_a_hanging_push_does_not_stop_the_relay_claiming_and_pushing_other_studies(
    relay: Relay, store: SQLiteStateStore, sink: FakeSink, clock: Clock, settings: Settings
) -> None:
    # the write of study A hangs (a backend that answers only at its timeout); B becomes due meanwhile
    released, hanging = asyncio.Event(), asyncio.Event()
    create = sink.create

    async def hanging_for_a(resource: dict[str, Any]) -> BackendStudy:
        if resource["identifier"][0]["value"] == f"urn:oid:{STUDY_A}":
            hanging.set()
            await released.wait()
        return await create(resource)

    sink.create = hanging_for_a  # type: ignore[method-assign]
    add(store, clock, settings, record(STUDY_A, 1, 1))
    clock.advance(10)
    stop = asyncio.Event()
    loop_task = asyncio.create_task(relay.run_forever(stop))
    try:
        await _until(hanging.is_set, "study A's write to start")
        add(store, clock, settings, record(STUDY_B, 1, 1))
        clock.advance(10)
        relay.wake()
        await _until(lambda: _state(store, STUDY_B) is StudyState.PUSHED, "study B pushed while A hangs")
        assert _state(store, STUDY_A) is StudyState.PENDING  # still being written
        released.set()
        await _until(lambda: _state(store, STUDY_A) is StudyState.PUSHED, "study A pushed once released")
    finally:
        released.set()
        stop.set()
        await asyncio.wait_for(loop_task, 10)  # the loop ends once its pushes have finished
    assert relay.totals.results == Counter(created=2)


def _state(store: SQLiteStateStore, study_uid: str) -> StudyState | None:
    row = store.study(study_uid)
    return None if row is None else row.state


async def test_a_study_being_pushed_is_not_pushed_twice_when_the_clock_is_set_back(
    relay: Relay, store: SQLiteStateStore, sink: FakeSink, clock: Clock, settings: Settings
) -> None:
    add(store, clock, settings, record(STUDY_A, 1, 1))
    clock.advance(10)
    entered, release = asyncio.Event(), asyncio.Event()
    real_find = sink.find

    async def slow_find(study_uid: str, backend_id: str | None) -> BackendStudy | None:
        entered.set()
        await release.wait()
        return await real_find(study_uid, backend_id)

    sink.find = slow_find  # type: ignore[method-assign]
    first = asyncio.create_task(relay.run_once())
    await asyncio.wait_for(entered.wait(), 5)
    clock.now -= timedelta(hours=1)  # set back: the push's lease (until T0 + 70 s) now looks stale
    assert await asyncio.wait_for(relay.run_once(), 5) == 0  # claimed again, being pushed here: dropped
    release.set()
    assert await asyncio.wait_for(first, 5) == 1
    assert sink.calls["create"] == 1 and len(sink.resources) == 1


async def test_a_study_due_soon_is_pushed_when_it_is_due_not_at_the_next_poll(
    store: SQLiteStateStore, sink: FakeSink, settings: Settings
) -> None:
    # as after an association's release: the study is made due shortly and the relay told. With a poll
    # interval far longer than the wait, only sleeping until the due time pushes it in time.
    cfg = settings.relay.model_copy(update={"poll_interval_s": 60.0})
    relay = Relay(store, sink, StudyBuilder(mapping_options(settings)), cfg, node="relay-1")
    stop = asyncio.Event()
    loop_task = asyncio.create_task(relay.run_forever(stop))
    try:
        now = datetime.now(UTC)
        store.add_instance(record(STUDY_A, 1, 1), source="test", spool_name=None, digest="d",
                           now=now, due_at=now + timedelta(seconds=0.2))
        relay.wake()  # what intake does after a commit; the study is not due yet
        await _until(lambda: _state(store, STUDY_A) is StudyState.PUSHED, "the study pushed", timeout_s=30)
        assert datetime.now(UTC) >= now + timedelta(seconds=0.2)  # not before it was due
    finally:
        stop.set()
        await asyncio.wait_for(loop_task, 10)
