"""``ingest.app.wiring``: settings -> the mapping's options, the embedded backend, the sink and the relay.

The sink built by :func:`ingest.app.wiring.start_sink` is exercised over TLS in
tests/adapters/graphql/test_tls.py, the embedded backend's token check in
tests/backend/test_server_security.py, and the wired relay end to end in tests/relay/test_links.py and
tests/app/test_serve.py.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from ingest.app.wiring import embedded_backend, mapping_options
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
