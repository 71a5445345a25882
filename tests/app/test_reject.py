"""``ingest reject`` in-process (ingest.app.reject): messages, exit codes, and the bytes it removes.
The command line end to end is in tests/app/test_replay_lifecycle.py and the Medplum interop tests."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ingest.adapters.spool import Spool
from ingest.adapters.state.sqlite import SQLiteStateStore
from ingest.app.reject import run_reject
from ingest.app.status import _rejected_text
from ingest.config import Settings
from ingest.core.records import InstanceRecord

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY = "1.2.826.0.1.3680043.2.1125.97"
SERIES = f"{STUDY}.1"


async def _reject(
    settings: Settings, *, force: bool = False, undo: bool = False, now: datetime = T0, **kw: str | None
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args: dict[str, str | None] = {"study": STUDY, "series": None, "instance": None, "code": "113001"}
    args.update(kw)
    code = await run_reject(settings, study=str(args["study"]), series=args["series"],
                            instance=args["instance"], code=str(args["code"]), now=now, out=out, err=err,
                            force=force, undo=undo)
    return code, out.getvalue(), err.getvalue()


def _stored(tmp_path: Path, *sops: str, source: str = "t") -> None:
    with SQLiteStateStore(tmp_path / "state.sqlite3", node="t") as store:
        for sop in sops:
            record = InstanceRecord(study_uid=STUDY, series_uid=SERIES, sop_uid=sop, sop_class_uid=CT)
            store.add_instance(record, source=source, spool_name=None, digest=f"d{sop}", now=T0, due_at=T0)


async def test_a_patient_safety_rejection_removes_the_spooled_bytes(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    spool = Spool(tmp_path / "spool")
    kept = [spool.write(b"instance %d" % i) for i in (1, 2)]
    with SQLiteStateStore(tmp_path / "state.sqlite3", node="t") as store:
        for i, file in enumerate(kept, start=1):
            record = InstanceRecord(study_uid=STUDY, series_uid=SERIES, sop_uid=f"{SERIES}.{i}",
                                    sop_class_uid=CT)
            store.add_instance(record, source="t", spool_name=file.name, digest=f"d{i}", now=T0,
                               due_at=T0 + timedelta(seconds=1))
    code, out, _ = await _reject(settings, series=SERIES, instance=f"{SERIES}.1", code="113037")
    assert code == 0 and "rejected instance" in out and "due to be written again" in out
    assert spool.names() == [kept[1].name]
    with SQLiteStateStore(tmp_path / "state.sqlite3", node="t") as store:
        assert store.rejected_counts() == {STUDY: {"113037": 1}}


async def test_a_forced_rejection_of_an_unknown_study_waits_and_a_repeat_changes_nothing(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path)
    code, out, _ = await _reject(settings, force=True)
    assert code == 0 and "no instance of it is stored yet" in out
    code, out, _ = await _reject(settings, force=True)
    assert code == 0 and "already rejected for 113001" in out and "nothing changed" in out


async def test_a_study_never_seen_exits_1_naming_it_and_records_nothing(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    _stored(tmp_path, f"{SERIES}.1")
    typo = STUDY + "9"
    code, out, err = await _reject(settings, study=typo)
    assert code == 1 and out == ""
    assert f"study {typo} is not in the state store" in err and "--force" in err
    with SQLiteStateStore(tmp_path / "state.sqlite3", node="t") as store:
        assert store.rejection_rows() == []


async def test_rejections_lists_what_was_recorded_and_by_whom(tmp_path: Path) -> None:
    import json

    from ingest.app.reject import run_rejections
    from ingest.core.lifecycle import KEY_OBJECT_SELECTION
    from ingest.core.records import Code, SopReference

    settings = Settings(data_dir=tmp_path)
    _stored(tmp_path, f"{SERIES}.1", f"{SERIES}.2")
    with SQLiteStateStore(tmp_path / "state.sqlite3", node="t") as store:
        note = InstanceRecord(
            study_uid=STUDY, series_uid=f"{STUDY}.9", sop_uid=f"{STUDY}.9.1",
            sop_class_uid=KEY_OBJECT_SELECTION,
            concept_code=Code(value="113038", designator="DCM", meaning="Incorrect Modality Worklist Entry"),
            evidence=(SopReference(study_uid=STUDY, series_uid=SERIES, sop_uid=f"{SERIES}.2"),),
        )
        store.add_instance(note, source="dimse:MOD", spool_name=None, digest="dn", now=T0, due_at=T0)
    assert (await _reject(settings, instance=f"{SERIES}.1", now=T0 + timedelta(minutes=1)))[0] == 0
    out = io.StringIO()
    assert await run_rejections(settings, as_json=True, out=out) == 0
    assert json.loads(out.getvalue())["rejections"] == [
        {"study_uid": STUDY, "series_uid": SERIES, "sop_uid": f"{SERIES}.2", "code": "113038",
         "added_at": "2024-03-01T12:00:00+00:00", "note_uid": f"{STUDY}.9.1", "source": "dimse:MOD"},
        {"study_uid": STUDY, "series_uid": "", "sop_uid": f"{SERIES}.1", "code": "113001",
         "added_at": "2024-03-01T12:01:00+00:00", "note_uid": "", "source": "ingest reject"},
    ]
    out = io.StringIO()
    assert await run_rejections(settings, study=STUDY + "9", out=out) == 0
    assert out.getvalue() == "no rejections recorded\n"
    out = io.StringIO()
    assert await run_rejections(settings, study=STUDY, out=out) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "113001" in lines[1] and "source=ingest reject" in lines[1]


async def test_undo_brings_the_instances_back_and_only_undoes_what_ingest_reject_made(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    _stored(tmp_path, f"{SERIES}.1", f"{SERIES}.2")
    assert (await _reject(settings, series=SERIES, code="113038"))[0] == 0
    with SQLiteStateStore(tmp_path / "state.sqlite3", node="t") as store:
        assert store.rejected_counts() == {STUDY: {"113038": 2}}
        pushed = T0 + timedelta(minutes=1)
        for claim in store.claim_due(pushed, 10, "n", 60):  # written: clean
            store.mark_pushed(claim, backend_id="b1", version_id="1", digest="x", now=pushed)
        row = store.study(STUDY)
        assert row is not None and not row.dirty
    later = T0 + timedelta(hours=1)
    code, _, err = await _reject(settings, series=SERIES, code="113001", undo=True, now=later)
    assert code == 1 and "has no rejection for 113001" in err  # another code: nothing undone
    code, out, _ = await _reject(settings, series=SERIES, code="113038", undo=True, now=later)
    assert code == 0 and "removed the rejection" in out and "stay removed" in out
    with SQLiteStateStore(tmp_path / "state.sqlite3", node="t") as store:
        assert store.rejected_counts() == {}
        assert [r.rejected_for for r in store.instances(STUDY)] == [None, None]
        row = store.study(STUDY)
        assert row is not None and row.dirty and row.due_at == later
    code, _, err = await _reject(settings, series=SERIES, code="113038", undo=True, now=later)
    assert code == 1 and f"series {SERIES} of study {STUDY} has no rejection" in err


async def test_bad_input_exits_1_naming_it_and_records_nothing(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    code, _, err = await _reject(settings, series="1.2.3.")
    assert code == 1 and "--series 1.2.3. is not a valid DICOM UID" in err
    code, _, err = await _reject(settings, code="113038x")
    assert code == 1 and "--code 113038x is not a rejection code (113001, 113037, 113038, 113039)" in err
    assert not (tmp_path / "state.sqlite3").exists()


def test_status_text_of_rejected_counts() -> None:
    assert _rejected_text({}) == ""
    assert _rejected_text({"113037": 1, "113001": 2}) == "3 (113001: 2, 113037: 1)"
