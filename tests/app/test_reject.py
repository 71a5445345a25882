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


async def _reject(settings: Settings, **kw: str | None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args: dict[str, str | None] = {"study": STUDY, "series": None, "instance": None, "code": "113001"}
    args.update(kw)
    code = await run_reject(settings, study=str(args["study"]), series=args["series"],
                            instance=args["instance"], code=str(args["code"]), now=T0, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


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


async def test_a_rejection_of_an_unknown_study_waits_and_a_repeat_changes_nothing(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    code, out, _ = await _reject(settings)
    assert code == 0 and "no instance of it is stored yet" in out
    code, out, _ = await _reject(settings)
    assert code == 0 and "already rejected for 113001" in out and "nothing changed" in out


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
