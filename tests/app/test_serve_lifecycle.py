"""The study lifecycle through a real ``ingest serve`` child process and dcmtk ``storescu``: an IOCM
rejection note over the listener, a kill -9 between a note and the instances it names (SQLite and
PostgreSQL), and ``[intake] on_conflict = "replace"`` answered with success. Slow-ish (each test starts
the service; about 5-10 s each)."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests import iocm
from tests.app.test_serve_dcmtk import Serve, _free_ports, _prometheus, _wait_for

pytestmark = [
    pytest.mark.dcmtk,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu not installed"),
]



@pytest.fixture(autouse=True)
def _storescu_may_reject(monkeypatch: pytest.MonkeyPatch) -> None:
    """dcmtk storescu calls as STORESCU: allowed to send rejection notes (``reject = true``)."""
    monkeypatch.setenv("INGEST_LISTENER__ALLOWED_CALLING_AES", '[{"ae": "STORESCU", "reject": true}]')


QUERY = """{ ImagingStudyList(identifier: "urn:dicom:uid|urn:oid:%s", _count: 5) {
  id status description numberOfSeries numberOfInstances series { uid instance { uid } } } }"""


def _store(port: int, *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["storescu", "-v", "-aec", "INGEST", "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True, timeout=60)


def _resource(s: Serve, study: str) -> dict[str, Any] | None:
    found = s.graphql(QUERY % study)["data"]["ImagingStudyList"]  # type: ignore[index]
    return found[0] if found else None


def _listed(resource: dict[str, Any] | None) -> dict[str, list[str]]:
    if resource is None:
        return {}
    return {x["uid"]: sorted(i["uid"] for i in x.get("instance") or []) for x in resource.get("series") or []}


def _images(folder: Path, study: str, series: str, n: int) -> list[Path]:
    return [iocm.write(folder, f"i{i}.dcm", iocm.image(study, series, f"{series}.{i}", number=i))
            for i in range(1, n + 1)]


def _log(s: Serve) -> str:
    return (s.data / "serve.log").read_text()[-4000:]


def test_a_patient_safety_note_over_the_listener(tmp_path: Path) -> None:
    study = iocm.uid()
    series = f"{study}.1"
    s = Serve(tmp_path / "data", *_free_ports())
    s.start()
    try:
        sent = _store(s.dicom_port, *_images(tmp_path / "images", study, series, 3))
        assert sent.returncode == 0, sent.stderr
        assert _wait_for(lambda: len(_listed(_resource(s, study)).get(series, [])) == 3, 30), _log(s)
        note = iocm.write(tmp_path / "note", "note.dcm",
                          iocm.note(study, [(series, f"{series}.1"), (series, f"{series}.2")], code="113037"))
        sent = _store(s.dicom_port, note)
        assert sent.returncode == 0, sent.stderr
        assert _wait_for(lambda: _listed(_resource(s, study)) == {series: [f"{series}.3"]}, 30), _log(s)
        # the two rejected instances' bytes are gone (small instances are kept in-row, others in the
        # spool: neither holds them), their rows stay and say why
        with sqlite3.connect(s.data / "state.sqlite3") as db:
            reasons = dict(db.execute("SELECT sop_uid, bytes_removed_reason FROM instances").fetchall())
            rows = db.execute("SELECT sop_uid, spool_name FROM instances WHERE bytes_removed_at IS NULL")
            held = {sop for sop, name in rows.fetchall()}
            inline = {row[0] for row in db.execute("SELECT sop_uid FROM instance_bytes").fetchall()}
        assert reasons[f"{series}.1"] == reasons[f"{series}.2"] == "iocm:113037"
        assert reasons[f"{series}.3"] is None
        assert {f"{series}.1", f"{series}.2"}.isdisjoint(held | inline)
        assert f"{series}.3" in held
        samples = _prometheus(s.admin("/metrics")[1])
        assert samples['ingest_rejections_total{code="113037"}'] == 1
    finally:
        s.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    import psycopg

    server: str = request.getfixturevalue("postgres_url")
    schema = f"t_{uuid.uuid4().hex}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return f"{server}?options=-csearch_path%3D{schema}"


def test_kill_9_between_a_note_and_the_instances_it_names(
    tmp_path: Path, state_url: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if state_url is not None:
        monkeypatch.setenv("INGEST_STATE__URL", state_url)
    study = iocm.uid()
    series = f"{study}.1"
    s = Serve(tmp_path / "data", *_free_ports())
    s.start()
    try:
        note = iocm.write(tmp_path / "note", "note.dcm", iocm.note(study, [(series, f"{series}.1")]))
        sent = _store(s.dicom_port, note)
        assert sent.returncode == 0, sent.stderr  # acknowledged: durable
        s.stop(signal.SIGKILL)
        s.start()  # the same data dir and store
        sent = _store(s.dicom_port, *_images(tmp_path / "images", study, series, 2))
        assert sent.returncode == 0, sent.stderr
        assert _wait_for(lambda: _listed(_resource(s, study)) == {series: [f"{series}.2"]}, 30), _log(s)
        out = subprocess.run([*_ingest(s), "status", "--json"], capture_output=True, text=True, timeout=60)
        (row,) = [r for r in json.loads(out.stdout)["studies"] if r["study_uid"] == study]
        assert row["rejected"] == {"113001": 1}
    finally:
        s.stop()


def _ingest(s: Serve) -> list[str]:
    import sys

    return [sys.executable, "-m", "ingest", "--data-dir", str(s.data)]


def test_replace_over_the_listener_answers_success_and_quarantines_the_old_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INGEST_INTAKE__ON_CONFLICT", "replace")
    study = iocm.uid()
    series = f"{study}.1"
    sop = f"{series}.1"
    s = Serve(tmp_path / "data", *_free_ports())
    s.start()
    try:
        v1 = iocm.write(tmp_path / "v1", "a.dcm", iocm.image(study, series, sop, StudyDescription="Wrong"))
        assert _store(s.dicom_port, v1).returncode == 0
        assert _wait_for(lambda: (_resource(s, study) or {}).get("description") == "Wrong", 30), _log(s)
        v2 = iocm.write(tmp_path / "v2", "a.dcm", iocm.image(study, series, sop, StudyDescription="Right"))
        sent = _store(s.dicom_port, v2)
        assert sent.returncode == 0, sent.stderr
        # a replacement is answered with success (status 0x0000), not 0xC010
        assert "Received Store Response (Success)" in sent.stdout + sent.stderr, sent.stdout + sent.stderr
        assert _wait_for(lambda: (_resource(s, study) or {}).get("description") == "Right", 30), _log(s)
        sides = [json.loads(p.read_text()) for p in (s.data / "quarantine").glob("*.json")]
        (side,) = [x for x in sides if x["reason"] == "replaced"]
        assert side["rule"] == "replaced_by" and "replaced by c1:" in side["detail"] and side["kept"]
        samples = _prometheus(s.admin("/metrics")[1])
        assert samples["ingest_instances_replaced_total"] == 1
    finally:
        s.stop()


class Watch:
    """``ingest watch DROP --after delete`` (with the embedded backend) as a child process."""

    def __init__(self, tmp_path: Path) -> None:
        self.drop, self.data = tmp_path / "drop", tmp_path / "data"
        self.backend_port = _free_ports()[0]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import os
        import sys

        env = dict(os.environ)
        env.update({"INGEST_ADMIN__ENABLED": "false", "INGEST_EMBEDDED_BACKEND__PORT": str(self.backend_port),
                    "INGEST_RELAY__STABLE_AGE_S": "0.3", "INGEST_RELAY__POLL_INTERVAL_S": "0.1",
                    "INGEST_WATCH__SETTLE_MS": "200"})
        self.drop.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        with (self.data / "watch.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingest", "--data-dir", str(self.data), "watch", str(self.drop),
                 "--after", "delete"], cwd=self.data, env=env, stdout=log, stderr=log,
            )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # our own child, by its handle
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    def put(self, name: str, data: bytes) -> None:
        part = self.drop / f"{name}.part"
        part.write_bytes(data)
        part.rename(self.drop / name)

    def resource(self, study: str) -> dict[str, Any] | None:
        fake = Serve(self.data, 0, self.backend_port, 0)
        try:
            return _resource(fake, study)
        except OSError:  # the backend is not up yet
            return None


def test_kill_9_of_ingest_watch_between_a_note_and_its_instances(
    tmp_path: Path, state_url: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if state_url is not None:
        monkeypatch.setenv("INGEST_STATE__URL", state_url)
    study = iocm.uid()
    series = f"{study}.1"
    w = Watch(tmp_path)
    w.start()
    try:
        w.put("note.dcm", iocm.note(study, [(series, f"{series}.2")], code="113038"))
        # ingested (and so durable) once the watcher deleted it
        assert _wait_for(lambda: not (w.drop / "note.dcm").exists(), 30), (w.data / "watch.log").read_text()
        w.kill()
        w.start()
        for i in (1, 2):
            w.put(f"i{i}.dcm", iocm.image(study, series, f"{series}.{i}", number=i))
        assert _wait_for(lambda: _listed(w.resource(study)) == {series: [f"{series}.1"]}, 40), (
            (w.data / "watch.log").read_text()[-4000:]
        )
    finally:
        w.stop()
