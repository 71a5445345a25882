"""Settings: ``config/ingest.toml`` <- ``INGEST_<SECTION>__<KEY>`` environment <- command-line overrides.

Loaded once by the CLI into a frozen :class:`Settings` and passed down; nothing reads settings from
globals.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from ingest.errors import ConfigError

__all__ = [
    "AdminSettings",
    "BackendSettings",
    "CallingAE",
    "CommitmentSettings",
    "EmbeddedBackendSettings",
    "EndpointSettings",
    "IntakeSettings",
    "ListenerSettings",
    "LogSettings",
    "MappingSettings",
    "PatientSettings",
    "ProfileSettings",
    "RelaySettings",
    "Settings",
    "SpoolSettings",
    "StateSettings",
    "TLSSettings",
    "WatchSettings",
    "load_settings",
]

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control chars


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_ae(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"AE title {value!r} must be 1-16 printable characters without backslash")
    return value.strip()


class CallingAE(_Section):
    """A calling AE title allowed to send, optionally only from one host address."""

    ae: str
    host: str | None = None

    @field_validator("ae")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae(v)


class TLSSettings(_Section):
    enabled: bool = False
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False
    handshake_timeout_s: float = 10.0

    @model_validator(mode="after")
    def _complete(self) -> TLSSettings:
        if self.enabled and (self.cert is None or self.key is None):
            raise ValueError("[listener.tls] enabled needs both cert and key")
        if self.require_client_cert and self.ca is None:
            raise ValueError("[listener.tls] require_client_cert needs ca (the bundle that signs clients)")
        return self


class CommitmentSettings(_Section):
    """``[listener.commitment]``: the Storage Commitment Push Model SCP (docs/architecture.md)."""

    enabled: bool = True


class ListenerSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    ae_title: str = "INGEST"
    allowed_calling_aes: tuple[CallingAE, ...] = ()
    accept_any_calling_ae: bool = False
    check_called_ae: bool = True
    max_associations: int = Field(default=10, ge=1)
    max_pdu: int = Field(default=262_144, ge=4096)
    max_peer_pdu: int = Field(default=4 * 1024 * 1024, ge=4096)
    max_instance_bytes: int = Field(default=2 * 1024**3, ge=1024)
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    # Before the AE check (ingest.sources.dimse.netguard): a connection must deliver its whole A-ASSOCIATE-RQ
    # within associate_rq_timeout_s of being accepted, at most max_associate_rq_bytes long; connections
    # still waiting for theirs are capped per source address and in total, and hold no association slot.
    associate_rq_timeout_s: float = Field(default=5.0, gt=0)
    max_associate_rq_bytes: int = Field(default=64 * 1024, ge=1024)
    max_pending_per_host: int = Field(default=8, ge=1)
    max_pending_connections: int = Field(default=64, ge=1)
    intake_size: int = Field(default=256, ge=1)
    max_inflated_bytes: int = Field(default=64 * 1024**2, ge=1024)
    # Storage SOP classes neither pydicom nor pynetdicom knows: "refuse" their presentation contexts,
    # or "accept" well-formed UIDs under the storage root or a private root (like storescp -pm).
    unknown_storage_classes: Literal["refuse", "accept"] = "refuse"
    tls: TLSSettings = TLSSettings()
    commitment: CommitmentSettings = CommitmentSettings()

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae(v)

    @field_validator("allowed_calling_aes", mode="before")
    @classmethod
    def _aes(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [s for s in v.split(",") if s.strip()]
        if isinstance(v, list | tuple):
            return tuple({"ae": x} if isinstance(x, str) else x for x in v)
        return v


class WatchSettings(_Section):
    folder: Path | None = None
    poll: bool = False
    poll_interval_ms: int = Field(default=1000, ge=50)
    settle_ms: int = Field(default=1000, ge=0)
    after: Literal["move", "delete", "keep"] = "move"
    archive_dir: Path | None = None
    jobs: int = Field(default=2, ge=1)


class IntakeSettings(_Section):
    """``[intake]``: what acceptance does with a new version of a stored instance (docs/architecture.md)."""

    on_conflict: Literal["quarantine", "replace"] = "quarantine"


class SpoolSettings(_Section):
    """``[spool]``: how long accepted bytes are kept and the disk they may use (docs/architecture.md)."""


class ProfileSettings(_Section):
    """``[profile]``: the imaging profile written ImagingStudy resources follow (docs/mapping.md)."""

    name: Literal["base", "smart-imaging", "mado"] = "base"


class QuarantineSettings(_Section):
    # Bytes of rejected input kept in <data_dir>/quarantine (listener and watcher); past it, and for
    # input over max_instance_bytes, only a side file describing it is written.
    max_bytes: int = Field(default=1024**3, ge=0)


class BackendSettings(_Section):
    url: str | None = None
    token_env: str | None = "INGEST_BACKEND_TOKEN"
    token_file: Path | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    # PEM CA bundle the backend's TLS certificate is verified against, instead of the system CA store.
    ca: Path | None = None
    # SDL file of the backend's schema, for backends that refuse introspection (``[backend] schema``; the
    # attribute has another name because ``schema`` is taken on pydantic models).
    schema_file: Path | None = Field(default=None, alias="schema")

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True)


class EmbeddedBackendSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    token_env: str | None = None
    database: Path | None = None
    # Cost limits of one request, checked before it runs (ingest.backend.limits.QueryLimits): body size,
    # selection depth, field selections, aliases (fragments expanded), requests executed at once.
    max_body_bytes: int = Field(default=64 * 1024**2, ge=1024)
    max_query_depth: int = Field(default=15, ge=1)
    max_query_fields: int = Field(default=1000, ge=1)
    max_query_aliases: int = Field(default=100, ge=0)
    max_concurrent_requests: int = Field(default=4, ge=1)


class RelaySettings(_Section):
    stable_age_s: float = Field(default=10.0, ge=0)
    release_grace_s: float = Field(default=2.0, ge=0)
    max_attempts: int = Field(default=10, ge=1)
    base_backoff_s: float = Field(default=1.0, gt=0)
    max_backoff_s: float = Field(default=300.0, gt=0)
    concurrency: int = Field(default=4, ge=1)
    poll_interval_s: float = Field(default=0.5, gt=0)
    lease_s: float = Field(default=60.0, gt=0)
    # Recording a result the backend already holds: retried in place on a short schedule (no new write).
    record_retry_base_s: float = Field(default=0.5, gt=0)
    record_retry_max_s: float = Field(default=10.0, gt=0)
    record_attempts: int = Field(default=8, ge=1)


class StateSettings(_Section):
    url: str | None = None
    # This node's name in a shared store: lease owner and "received by" of its instances (ingest status).
    # Unset: the relay picks ``<host>-<random>`` per process. Must be unique among running nodes.
    node_id: str | None = None

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str | None) -> str | None:
        v = (v or "").strip() or None
        if v is not None and not re.fullmatch(r"[A-Za-z0-9._:@-]{1,64}", v):
            raise ValueError(
                f"[state] node_id {v!r} must be 1-64 characters from A-Z a-z 0-9 . _ : @ -"
            )
        return v


class AdminSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9100, ge=0, le=65535)
    # /healthz answers 503 ("disk: low") when the spool's file system has fewer free bytes than this.
    min_free_bytes: int = Field(default=256 * 1024**2, ge=0)
    # The status page (/, ingest.app.admin): patient names, IDs and birth dates only when true.
    show_patient: bool = False
    # Bearer token for the status page and its actions (/healthz and /metrics stay open), from an
    # environment variable or a file; required when host is not a loopback address.
    token_env: str | None = None
    token_file: Path | None = None

    @model_validator(mode="after")
    def _token_off_loopback(self) -> AdminSettings:
        if self.enabled and not _is_loopback(self.host) and not (self.token_env or self.token_file):
            raise ValueError(
                f"[admin] host {self.host!r} is not a loopback address: set token_env or token_file"
            )
        return self


def _is_loopback(host: str) -> bool:
    """Whether ``host`` names only loopback addresses (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


class MappingSettings(_Section):
    site_timezone: str | None = None
    include_instances: bool = True
    include_study_id: bool = False
    operator_function: str = "SPRF"
    narrative: bool = True  # ImagingStudy.text, docs/mapping.md "Narrative"

    @field_validator("site_timezone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        if v:
            try:
                ZoneInfo(v)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"site_timezone {v!r} is not an IANA time zone name") from exc
        return v or None


class PatientSettings(_Section):
    mode: Literal["logical", "lookup", "create"] = "logical"
    default_system: str | None = None

    @field_validator("default_system")
    @classmethod
    def _system(cls, v: str | None) -> str | None:
        v = (v or "").strip() or None
        is_uri = v is not None and v.startswith(("urn:", "http://", "https://"))
        if v is not None and (not is_uri or any(c.isspace() for c in v)):
            raise ValueError(
                f"[patient] default_system {v!r} must be a URI without spaces (urn:oid:..., http(s)://...)"
            )
        return v

    @model_validator(mode="after")
    def _system_needed(self) -> PatientSettings:
        # lookup/create search PatientList(identifier: "<system>|<id>"): an identifier without a system
        # could match another issuer's patient
        if self.mode != "logical" and self.default_system is None:
            raise ValueError(
                f'[patient] mode "{self.mode}" needs default_system (the Patient ID system used when '
                "the instances carry no usable Issuer of Patient ID)"
            )
        return self


class EndpointSettings(_Section):
    wado_rs_url: str | None = None

    @field_validator("wado_rs_url")
    @classmethod
    def _wado_rs(cls, v: str | None) -> str | None:
        v = (v or "").strip() or None
        if v is None:
            return None
        problem = _wado_rs_problem(v)
        if problem:
            shown = re.sub(r"//[^/@]*@", "//***@", v)  # never echo credentials
            raise ValueError(f"[endpoint] wado_rs_url {shown!r} is not a WADO-RS base URL: {problem}")
        return v


def _wado_rs_problem(url: str) -> str | None:
    """Why ``url`` is not a WADO-RS base URL (PS3.18 8.2: ``{base}/studies/...``), or ``None``."""
    if any(c.isspace() for c in url):
        return "it contains whitespace"
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a bad port
    except ValueError:
        return "it cannot be parsed as a URL"
    if parts.scheme not in ("http", "https"):
        return "the scheme must be http or https"
    if not parts.hostname:
        return "it has no host"
    if parts.username is not None or parts.password is not None:
        return "it must not carry credentials (they would be stored in the Endpoint resource)"
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return "it must not have a query or a fragment"
    if url.endswith("/"):
        return "it must not end with a slash"
    if any(seg.lower() == "studies" for seg in parts.path.split("/")):
        return "give the base URL, without /studies (the viewer appends /studies/{uid})"
    return None


class LogSettings(_Section):
    level: str = "INFO"
    format: Literal["text", "json"] = "text"


class Settings(BaseSettings):
    """Every setting of ``ingest``; see ``config/ingest.toml`` for what each key means."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix="INGEST_",
        env_nested_delimiter="__",
        toml_file=None,
    )

    data_dir: Path = Path("data")
    listener: ListenerSettings = ListenerSettings()
    watch: WatchSettings = WatchSettings()
    intake: IntakeSettings = IntakeSettings()
    spool: SpoolSettings = SpoolSettings()
    quarantine: QuarantineSettings = QuarantineSettings()
    backend: BackendSettings = BackendSettings()
    embedded_backend: EmbeddedBackendSettings = EmbeddedBackendSettings()
    relay: RelaySettings = RelaySettings()
    state: StateSettings = StateSettings()
    admin: AdminSettings = AdminSettings()
    mapping: MappingSettings = MappingSettings()
    patient: PatientSettings = PatientSettings()
    endpoint: EndpointSettings = EndpointSettings()
    profile: ProfileSettings = ProfileSettings()
    log: LogSettings = LogSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    def masked(self) -> dict[str, Any]:
        """The effective settings as a dict, safe to log (no secrets are held here, only their sources)."""
        data = self.model_dump(mode="json")
        url = data["state"].get("url")
        if url:
            data["state"]["url"] = re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)
        return data


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Load settings from ``config_file`` (if given), the environment, then ``overrides``.

    Raises
    ------
    ConfigError
        When the file is missing or a value is invalid; the message names the key.
    """
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file {config_file} does not exist")

    class _Bound(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

    try:
        bound = _Bound(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
    return bound
