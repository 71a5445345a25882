"""Tests for ingest.config: loading (``config/ingest.toml`` <- ``INGEST_<SECTION>__<KEY>`` <- command-line
overrides), the validators of each section, and errors that name the key.

Expectations come from ``config/ingest.toml`` (what each key means) and the README "Configuration" section.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from ingest.config import (
    CallingAE,
    EndpointSettings,
    ListenerSettings,
    PatientSettings,
    Settings,
    load_settings,
)
from ingest.errors import ConfigError
from tests import REPO

SYSTEM = "urn:oid:1.2.826.0.1.3680043.2.1143.99"
WADO = "https://pacs.example.org/dicom-web"


@pytest.fixture(autouse=True)
def _no_ingest_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the environment: start each test without any ``INGEST_*`` variable."""
    for name in [n for n in os.environ if n.startswith("INGEST_")]:
        monkeypatch.delenv(name)


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ingest.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Sources and their precedence
# --------------------------------------------------------------------------------------------------


def test_environment_overrides_the_file_and_command_line_overrides_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _toml(tmp_path, 'data_dir = "from-file"\n[listener]\nport = 1000\nae_title = "FILEAE"\n')
    assert load_settings(config).data_dir == Path("from-file")
    assert load_settings(config).listener.port == 1000

    monkeypatch.setenv("INGEST_DATA_DIR", "from-env")
    monkeypatch.setenv("INGEST_LISTENER__PORT", "2000")
    settings = load_settings(config)
    assert settings.data_dir == Path("from-env")
    assert settings.listener.port == 2000
    assert settings.listener.ae_title == "FILEAE"  # one key overridden, the rest of its section stays

    assert load_settings(config, data_dir=Path("from-cli")).data_dir == Path("from-cli")
    assert load_settings(config, data_dir=None).data_dir == Path("from-env")  # an option not given


def test_environment_reaches_every_section_with_its_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGEST_LISTENER__ACCEPT_ANY_CALLING_AE", "true")
    monkeypatch.setenv("INGEST_LISTENER__TLS__HANDSHAKE_TIMEOUT_S", "2.5")
    monkeypatch.setenv("INGEST_RELAY__STABLE_AGE_S", "0.5")
    monkeypatch.setenv("INGEST_STATE__NODE_ID", "node-a")
    settings = load_settings()
    assert settings.listener.accept_any_calling_ae is True
    assert settings.listener.tls.handshake_timeout_s == 2.5
    assert settings.relay.stable_age_s == 0.5
    assert settings.state.node_id == "node-a"


def test_no_file_and_no_environment_gives_the_defaults() -> None:
    assert load_settings().model_dump() == Settings().model_dump()
    assert load_settings(None).listener == ListenerSettings()


def test_missing_config_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_settings(missing)


def test_unparsable_config_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    config = _toml(tmp_path, "[listener\nport = \n")
    with pytest.raises(ConfigError, match=re.escape(str(config))):
        load_settings(config)


def test_unknown_keys_are_refused_naming_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"listener\.prot\b"):
        load_settings(_toml(tmp_path, "[listener]\nprot = 104\n"))
    with pytest.raises(ConfigError, match=r"relay\.stable_age\b"):
        load_settings(relay={"stable_age": 1})


def test_every_invalid_value_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGEST_LISTENER__PORT", "not-a-port")
    with pytest.raises(ConfigError) as info:
        load_settings(_toml(tmp_path, "[relay]\nconcurrency = 0\n"))
    assert "listener.port" in str(info.value)
    assert "relay.concurrency" in str(info.value)


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError):
        setattr(settings, "data_dir", Path("elsewhere"))  # noqa: B010 (a frozen field, typed read-only)
    with pytest.raises(ValidationError):
        setattr(settings.listener, "port", 104)  # noqa: B010


def test_masked_settings_hide_the_state_store_password() -> None:
    settings = load_settings(state={"url": "postgresql://ingest:s3cret@db.example.org:5432/ingest"})
    masked = settings.masked()
    assert masked["state"]["url"] == "postgresql://ingest:***@db.example.org:5432/ingest"
    assert "s3cret" not in repr(masked)
    assert settings.state.url == "postgresql://ingest:s3cret@db.example.org:5432/ingest"  # only the view


# --------------------------------------------------------------------------------------------------
# config/ingest.toml, the documentation of every key
# --------------------------------------------------------------------------------------------------


def _fields(model: type[BaseModel], section: str = "") -> dict[str, set[str]]:
    """Keys per TOML table (``""`` for the top level, ``listener.tls`` for a nested one)."""
    tables: dict[str, set[str]] = {section: set()}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            tables.update(_fields(annotation, f"{section}.{name}" if section else name))
        else:
            tables[section].add(field.alias or name)
    return tables


def _documented(text: str) -> dict[str, set[str]]:
    """Keys per table in the shipped file, set (``key = ...``) or shown commented out (``# key = ...``)."""
    tables: dict[str, set[str]] = {"": set()}
    section = ""
    for line in text.splitlines():
        if header := re.fullmatch(r"\[([a-z_.]+)\]\s*", line):
            section = header.group(1)
            tables.setdefault(section, set())
        elif key := re.match(r"#?\s*([a-z][a-z0-9_]*)\s*=\s*\S", line):
            tables[section].add(key.group(1))
    return tables


def test_shipped_config_file_lists_every_setting_and_nothing_else() -> None:
    shipped = REPO / "config" / "ingest.toml"
    assert _documented(shipped.read_text(encoding="utf-8")) == _fields(Settings)


def test_shipped_config_file_loads() -> None:
    settings = load_settings(REPO / "config" / "ingest.toml")
    assert [c.ae for c in settings.listener.allowed_calling_aes] == ["STORESCU", "ECHOSCU", "SAMPLE_SCU"]


# --------------------------------------------------------------------------------------------------
# Listener: AE titles (PS3.5 AE VR) and TLS completeness
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "title",
    ["", "   ", "A" * 17, "BACK\\SLASH", "TAB\tAE", "NEW\nLINE", "ESC\x1bAE", "ÄRZTE"],
    ids=["empty", "spaces", "17-chars", "backslash", "tab", "newline", "escape", "non-ascii"],
)
def test_invalid_ae_titles_are_refused_naming_the_key(title: str) -> None:
    with pytest.raises(ConfigError, match=r"listener\.ae_title"):
        load_settings(listener={"ae_title": title})
    with pytest.raises(ConfigError, match=r"listener\.allowed_calling_aes\.0\.ae"):
        load_settings(listener={"allowed_calling_aes": [title]})


def test_ae_titles_keep_sixteen_characters_and_lose_surrounding_spaces() -> None:
    # PS3.5 AE: at most 16 characters; leading and trailing spaces are not significant
    assert load_settings(listener={"ae_title": "A" * 16}).listener.ae_title == "A" * 16
    assert load_settings(listener={"ae_title": " PACS "}).listener.ae_title == "PACS"
    assert load_settings(listener={"ae_title": "CT 1"}).listener.ae_title == "CT 1"


def test_calling_aes_as_names_or_pinned_to_a_host(tmp_path: Path) -> None:
    config = _toml(
        tmp_path, '[listener]\nallowed_calling_aes = ["STORESCU", {ae = "CT1", host = "10.1.2.3"}]\n'
    )
    assert load_settings(config).listener.allowed_calling_aes == (
        CallingAE(ae="STORESCU"),
        CallingAE(ae="CT1", host="10.1.2.3"),
    )
    listed = load_settings(listener={"allowed_calling_aes": "A, B,,"}).listener.allowed_calling_aes
    assert [c.ae for c in listed] == ["A", "B"]


@pytest.mark.parametrize(
    ("tls", "needs"),
    [
        ({"enabled": True}, "enabled needs both cert and key"),
        ({"enabled": True, "cert": "/tls/server.crt"}, "enabled needs both cert and key"),
        ({"enabled": True, "key": "/tls/server.key"}, "enabled needs both cert and key"),
        ({"require_client_cert": True}, "require_client_cert needs ca"),
        (
            {"enabled": True, "cert": "/c", "key": "/k", "require_client_cert": True},
            "require_client_cert needs ca",
        ),
    ],
)
def test_incomplete_tls_is_refused_naming_the_table(tls: dict[str, Any], needs: str) -> None:
    with pytest.raises(ConfigError, match=r"listener\.tls") as info:
        load_settings(listener={"tls": tls})
    assert needs in str(info.value)


def test_complete_tls_is_kept() -> None:
    complete = {"enabled": True, "cert": "/c", "key": "/k", "ca": "/ca", "require_client_cert": True}
    tls = load_settings(listener={"tls": complete}).listener.tls
    assert (tls.enabled, tls.cert, tls.key, tls.ca) == (True, Path("/c"), Path("/k"), Path("/ca"))


def test_unknown_storage_classes_setting_defaults_to_refuse() -> None:
    assert ListenerSettings().unknown_storage_classes == "refuse"
    assert ListenerSettings(unknown_storage_classes="accept").unknown_storage_classes == "accept"
    with pytest.raises(ValueError):
        ListenerSettings(unknown_storage_classes="promiscuous")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# State node_id, mapping site_timezone
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "node_id", ["node-a", "replay-1", "host.example.org:9100", "ingest@ward_3", "N" * 64]
)
def test_valid_node_ids_are_kept(node_id: str) -> None:
    assert load_settings(state={"node_id": node_id}).state.node_id == node_id


@pytest.mark.parametrize("node_id", ["node a", "N" * 65, "nöde", "a/b", "semi;colon"])
def test_invalid_node_ids_are_refused_naming_the_key(node_id: str) -> None:
    with pytest.raises(ConfigError, match=r"state\.node_id"):
        load_settings(state={"node_id": node_id})


def test_blank_node_id_means_unset() -> None:
    assert load_settings(state={"node_id": "  "}).state.node_id is None
    assert load_settings().state.node_id is None


def test_site_timezone_must_be_an_iana_zone() -> None:
    assert load_settings(mapping={"site_timezone": "Europe/Berlin"}).mapping.site_timezone == "Europe/Berlin"
    assert load_settings(mapping={"site_timezone": ""}).mapping.site_timezone is None
    with pytest.raises(ConfigError, match=r"mapping\.site_timezone.*Mars/Olympus"):
        load_settings(mapping={"site_timezone": "Mars/Olympus"})


# --------------------------------------------------------------------------------------------------
# Endpoint wado_rs_url, patient mode and default_system
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://pacs.example.org/dicom-web/studies", "/studies"),
        ("https://pacs.example.org/dicom-web/studies/1.2.3", "/studies"),
        ("https://pacs.example.org/dicom-web/", "slash"),
        ("https://pacs.example.org/", "slash"),
        ("ftp://pacs.example.org/dicom-web", "http or https"),
        ("pacs.example.org/dicom-web", "http or https"),
        ("https:///dicom-web", "no host"),
        ("https://pacs.example.org/dicom-web?x=1", "query"),
        ("https://pacs.example.org/dicom web", "whitespace"),
    ],
)
def test_invalid_wado_rs_url_is_refused_naming_the_key(url: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(endpoint={"wado_rs_url": url})
    assert "endpoint.wado_rs_url" in str(info.value)
    assert why in str(info.value)


def test_wado_rs_url_credentials_are_refused_and_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(endpoint={"wado_rs_url": "https://user:s3cret@pacs.example.org/dicom-web"})
    assert "credentials" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_invalid_wado_rs_url_from_config_file_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "ingest.toml"
    config.write_text(f'[endpoint]\nwado_rs_url = "{WADO}/"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"endpoint\.wado_rs_url.*slash"):
        load_settings(config)
    monkeypatch.setenv("INGEST_ENDPOINT__WADO_RS_URL", f"{WADO}/studies")
    with pytest.raises(ConfigError, match=r"endpoint\.wado_rs_url.*studies"):
        load_settings()


def test_valid_wado_rs_urls_are_kept() -> None:
    assert load_settings(endpoint={"wado_rs_url": WADO}).endpoint.wado_rs_url == WADO
    assert (
        EndpointSettings(wado_rs_url="http://10.0.0.5:8042/dicom-web").wado_rs_url
        == "http://10.0.0.5:8042/dicom-web"
    )
    assert EndpointSettings(wado_rs_url="  ").wado_rs_url is None


@pytest.mark.parametrize("url", [f"{WADO}#viewer", f"{WADO}?", f"{WADO}#"])
def test_wado_rs_url_without_fragment_or_empty_query(url: str) -> None:
    with pytest.raises(ConfigError, match=r"endpoint\.wado_rs_url.*query or a fragment"):
        load_settings(endpoint={"wado_rs_url": url})


@pytest.mark.parametrize("mode", ["lookup", "create"])
def test_resolving_modes_need_default_system(mode: str) -> None:
    with pytest.raises(ConfigError, match=r"patient.*default_system"):
        load_settings(patient={"mode": mode})
    assert load_settings(patient={"mode": mode, "default_system": SYSTEM}).patient.mode == mode


def test_default_system_must_be_a_uri() -> None:
    with pytest.raises(ConfigError, match=r"patient\.default_system"):
        load_settings(patient={"mode": "logical", "default_system": "HOSPITAL A"})
    assert load_settings().patient == PatientSettings(mode="logical", default_system=None)


@pytest.mark.parametrize(
    "system", ["urn:oid:1.2.3.4.5", "urn:uuid:0b8f6e4c-3f1e-4c1a-9d2b-6c7a1f0e2d3c", "https://hospital.example/mrn"]
)
def test_default_system_uris_are_kept(system: str) -> None:
    patient = load_settings(patient={"mode": "lookup", "default_system": system}).patient
    assert patient.default_system == system


@pytest.mark.parametrize("system", ["urn:oid:1.2 3", "hospital.example/mrn", "ftp://hospital.example/mrn"])
def test_default_system_that_is_no_uri_or_has_spaces_is_refused(system: str) -> None:
    with pytest.raises(ConfigError, match=r"patient\.default_system"):
        load_settings(patient={"default_system": system})


def test_unknown_patient_mode_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"patient\.mode"):
        load_settings(patient={"mode": "guess", "default_system": SYSTEM})


# ------------------------------------------------------------------ strict environment, URL schemes


def test_an_unknown_environment_variable_is_refused_with_the_closest_setting_named() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(environ={"INGEST_LISTENR__PORT": "1"})
    assert "INGEST_LISTENR__PORT names no setting" in str(err.value)
    assert "did you mean INGEST_LISTENER__PORT?" in str(err.value)
    with pytest.raises(ConfigError, match="INGEST_LISTENER__PROT names no setting"):
        load_settings(environ={"INGEST_LISTENER__PROT": "1"})


def test_setting_and_secret_variables_are_allowed() -> None:
    load_settings(environ={
        "INGEST_LISTENER__PORT": "1", "INGEST_LISTENER__TLS__CERT": "c.pem",
        "INGEST_ENDPOINT__SERIES_WADO_RS_URLS__CT1": "x", "INGEST_DATA_DIR": "d",
        "INGEST_BACKEND_TOKEN": "secret",  # [backend] token_env's default names it
        "INGEST_CONFIG": "ingest.toml", "PATH": "/bin", "INGESTION": "not ours",
    })
    named = load_settings(admin={"token_env": "INGEST_PAGE_TOKEN"}, environ={"INGEST_PAGE_TOKEN": "t"})
    assert named.admin.token_env == "INGEST_PAGE_TOKEN"


@pytest.mark.parametrize("url", ["ftp://x/y", "x/y", "http://", "file:///etc/passwd"])
def test_a_backend_url_must_be_http(url: str) -> None:
    with pytest.raises(ConfigError, match=r"\[backend\] url .* is not an http\(s\) URL"):
        load_settings(backend={"url": url})


def test_a_state_url_must_be_postgresql_and_its_password_is_not_shown() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(state={"url": "mysql://user:hunter2@db/ingest"})
    assert "only postgresql:// (and sqlite:///PATH) URLs are supported" in str(err.value)
    assert "hunter2" not in str(err.value)
    assert load_settings(state={"url": "postgresql://u@h/db"}).state.url == "postgresql://u@h/db"
    assert load_settings(state={"url": "sqlite:///tmp/s.db"}).state.url == "sqlite:///tmp/s.db"


def test_calling_aes_may_reject_and_replace_only_when_said(tmp_path: Path) -> None:
    cfg = tmp_path / "ingest.toml"
    cfg.write_text('[listener]\n'
                   'allowed_calling_aes = ["CT1", {ae = "PACS1", reject = true, replace = true}]\n')
    entries = load_settings(cfg).listener.allowed_calling_aes
    assert [(e.ae, e.reject, e.replace) for e in entries] == [("CT1", False, False), ("PACS1", True, True)]
    with pytest.raises(ConfigError, match=r"allowed_calling_aes\.0\.reject"):
        load_settings(listener={"allowed_calling_aes": [{"ae": "CT1", "reject": "sometimes"}]})
