"""``ingest.app.wiring``: settings -> the mapping's options, the embedded backend, the sink and the relay.

The sink built by :func:`ingest.app.wiring.start_sink` is exercised over TLS in
tests/adapters/graphql/test_tls.py, the embedded backend's token check in
tests/backend/test_server_security.py, and the wired relay end to end in tests/relay/test_links.py and
tests/app/test_serve.py.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any

import pytest

from ingest.adapters.graphql.sink import GraphQLSink
from ingest.app.wiring import embedded_backend, mapping_options, start_sink
from ingest.backend.schema import build_backend_schema
from ingest.config import EmbeddedBackendSettings, MappingSettings, PatientSettings, Settings
from ingest.core.mapping import MappingOptions
from ingest.errors import ConfigError


def _settings(tmp_path: Path, token_env: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        embedded_backend=EmbeddedBackendSettings(port=0, token_env=token_env, database=tmp_path / "b.sqlite"),
    )


def test_options_from_settings() -> None:
    settings_ = Settings(
        mapping=MappingSettings(
            site_timezone="Europe/Berlin", include_instances=False, operator_function="SPRF"
        ),
        patient=PatientSettings(default_system="urn:oid:1.2.3"),
    )
    options = mapping_options(settings_, endpoint_reference="Endpoint/1")
    assert options == MappingOptions(
        site_timezone="Europe/Berlin",
        include_instances=False,
        include_study_id=False,
        operator_function="SPRF",
        patient_default_system="urn:oid:1.2.3",
        endpoint_reference="Endpoint/1",
    )


async def test_token_env_without_a_value_does_not_start_an_open_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    variable = f"INGEST_TEST_TOKEN_{uuid.uuid4().hex}"
    monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ConfigError, match=variable):
        async with embedded_backend(_settings(tmp_path, variable), port=0):
            pass
    monkeypatch.setenv(variable, "  ")
    with pytest.raises(ConfigError):
        async with embedded_backend(_settings(tmp_path, variable), port=0):
            pass


async def test_the_embedded_backend_is_probed_not_introspected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sink of the embedded backend takes the schema object that backend serves: one probe, no
    introspection (a full schema answered and built again at every start), and it still writes."""
    asked: list[str] = []
    execute = GraphQLSink._execute

    async def spy(self: GraphQLSink, request: Any, *, what: str, **kw: Any) -> Any:
        asked.append(what)
        return await execute(self, request, what=what, **kw)

    monkeypatch.setattr(GraphQLSink, "_execute", spy)
    settings = Settings(
        data_dir=tmp_path / "data",
        embedded_backend=EmbeddedBackendSettings(port=0, database=tmp_path / "b.sqlite"),
    )
    async with contextlib.AsyncExitStack() as stack:
        sink = await start_sink(settings, stack, embedded_port=0)
        await sink.connect()
        assert asked == ["backend probe"]
        assert sink._client is not None and sink._client.schema is build_backend_schema()
        uid = "1.2.826.0.1.3680043.8.498.2000.9"
        created = await sink.create({
            "resourceType": "ImagingStudy", "status": "available",
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
            "subject": {"display": "Test"}, "numberOfSeries": 0, "numberOfInstances": 0,
        })
        found = await sink.find(uid, None)
        assert found is not None and found.id == created.id


def test_mado_extensions_follow_the_profile() -> None:
    from ingest.config import ProfileSettings

    assert not mapping_options(Settings()).mado_extensions  # base
    assert not mapping_options(Settings(profile=ProfileSettings(name="smart-imaging"))).mado_extensions
    assert mapping_options(Settings(profile=ProfileSettings(name="mado"))).mado_extensions
    assert mapping_options(Settings(), profile="mado").mado_extensions  # replay --dry-run --bundle mado


# -- [mapping] site_timezone unset: the machine's time zone ------------------------------------------------


def _write_instance(path: Path, uid: str, study_date: str, offset: str | None = None) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = f"{uid}.1.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid
    ds.SeriesInstanceUID = f"{uid}.1"
    ds.Modality = "CT"
    ds.PatientID = "TZ-1"
    ds.StudyDate = study_date
    ds.StudyTime = "083000"
    if offset is not None:
        ds.TimezoneOffsetFromUTC = offset
    ds.save_as(path, enforce_file_format=True)


def _dry_run_started(tmp_path: Path, tz: str, *extra: str) -> dict[str, str]:
    """``ingest replay --dry-run`` in a subprocess with ``TZ`` set: Study Instance UID -> ``started``."""
    import json
    import os
    import subprocess
    import sys

    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    _write_instance(folder / "winter.dcm", "1.2.826.0.1.3680043.8.498.801", "20240115")
    _write_instance(folder / "summer.dcm", "1.2.826.0.1.3680043.8.498.802", "20240715")
    _write_instance(folder / "tagged.dcm", "1.2.826.0.1.3680043.8.498.803", "20240115", offset="+0900")
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")} | {"TZ": tz}
    proc = subprocess.run(
        [sys.executable, "-m", "ingest", "-q", *extra, "--data-dir", str(tmp_path / "data"), "replay",
         "--dry-run", "--jobs", "1", str(folder)],
        cwd=work, env=env, capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    studies = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return {s["identifier"][0]["value"].removeprefix("urn:oid:"): s.get("started") for s in studies}


def test_without_site_timezone_times_are_in_the_machines_zone(tmp_path: Path) -> None:
    started = _dry_run_started(tmp_path, "America/New_York")
    assert started == {
        "1.2.826.0.1.3680043.8.498.801": "2024-01-15T08:30:00-05:00",  # EST
        "1.2.826.0.1.3680043.8.498.802": "2024-07-15T08:30:00-04:00",  # EDT: the offset of that date
        "1.2.826.0.1.3680043.8.498.803": "2024-01-15T08:30:00+09:00",  # (0008,0201) wins
    }


def test_an_explicit_site_timezone_wins_over_the_machines(tmp_path: Path) -> None:
    config = tmp_path / "ingest.toml"
    config.write_text('[mapping]\nsite_timezone = "Europe/Berlin"\n')
    started = _dry_run_started(tmp_path, "America/New_York", "--config", str(config))
    assert started["1.2.826.0.1.3680043.8.498.801"] == "2024-01-15T08:30:00+01:00"
    assert started["1.2.826.0.1.3680043.8.498.802"] == "2024-07-15T08:30:00+02:00"
