"""Settings: ``config/ingest.toml`` <- ``INGEST_<SECTION>__<KEY>`` environment <- command-line overrides.

Loaded once by the CLI into a frozen :class:`Settings` and passed down; nothing reads settings from
globals.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from datetime import timedelta
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
    "SyncSettings",
    "SyncSource",
    "TLSSettings",
    "WatchSettings",
    "load_settings",
    "parse_duration",
    "unsafe_commitment_retention",
]

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control chars


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_ae(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError(f"AE title {value!r} must be 1-16 printable characters without backslash")
    return value.strip()


class CallingAE(_Section):
    """A calling AE title allowed to send, optionally only from one host address.

    ``host`` and ``port`` together are also where Storage Commitment reports for this AE go when they
    cannot be sent on the requester's own association (``[listener.commitment]``).

    ``reject``: its IOCM rejection notes are applied (docs/architecture.md "Study lifecycle"); without it
    they are quarantined (``rejection_not_allowed``). ``replace``: with ``[intake] on_conflict =
    "replace"``, it may replace instances other AEs sent and move an instance to another patient. Both
    are per AE title: an AE listed several times (several hosts) has them only when every entry does.
    """

    ae: str
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    reject: bool = False
    replace: bool = False

    @field_validator("ae")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae(v)

    @model_validator(mode="after")
    def _port_needs_host(self) -> CallingAE:
        if self.port is not None and self.host is None:
            raise ValueError(
                f"allowed_calling_aes entry {self.ae!r}: port (where Storage Commitment reports go) "
                "needs host"
            )
        return self


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
    # Most instances one N-ACTION may reference; more are refused with 0x0213 (resource limitation).
    max_instances: int = Field(default=100_000, ge=1)
    # A report that cannot be delivered is retried with exponential backoff and full jitter between
    # retry_base_s and retry_max_s, and given up ("abandoned", shown by ingest status) give_up_after_s
    # after the request arrived.
    retry_base_s: float = Field(default=2.0, gt=0)
    retry_max_s: float = Field(default=300.0, gt=0)
    give_up_after_s: float = Field(default=7 * 86400.0, gt=0)
    # How often the sender looks for due reports (retries, other nodes' requests) besides being woken.
    poll_interval_s: float = Field(default=1.0, gt=0)
    # One delivery on a new association (connect, association, N-EVENT-REPORT and its answer) ends after
    # report_timeout_s: the association is aborted, its connection closed and the report retried later.
    report_timeout_s: float = Field(default=30.0, gt=0)
    # Reports delivered at once, at most one per requester AE (a requester that never answers holds one).
    senders: int = Field(default=4, ge=1, le=64)


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
    # Before the AE check (ingest.sources.dimse.edge): a connection must deliver its whole A-ASSOCIATE-RQ
    # within associate_rq_timeout_s of being accepted, at most max_associate_rq_bytes long; connections
    # still waiting for theirs are capped per source address and in total, and hold no association slot.
    associate_rq_timeout_s: float = Field(default=5.0, gt=0)
    max_associate_rq_bytes: int = Field(default=64 * 1024, ge=1024)
    max_pending_per_host: int = Field(default=8, ge=1)
    max_pending_connections: int = Field(default=64, ge=1)
    # A DIMSE message in progress must be complete within dimse_timeout_s plus one second per
    # min_message_rate bytes received (a data set trickled a byte at a time ends there).
    min_message_rate: int = Field(default=1024, ge=1)
    intake_size: int = Field(default=256, ge=1)
    # Instances committed with their bytes (up to [spool] inline_max_bytes) go through a writer process of
    # their own while several associations are open (ingest.adapters.state.writer); false: one thread.
    commit_process: bool = True
    max_inflated_bytes: int = Field(default=64 * 1024**2, ge=1024)
    # Most instances a Key Object Selection Document (an IOCM rejection note) may name in its Current
    # Requested Procedure Evidence (0040,A375), counted while the header is read, before any is decoded;
    # past it the note is refused (0xC007, quarantine reason too_many_references). Every source.
    max_rejection_items: int = Field(default=100_000, ge=1)
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
    # A file that reads as incomplete (truncated, or too short for a preamble and "DICM") stays in the
    # folder and is read again when it changes; it is quarantined only once unchanged for this long.
    incomplete_timeout: str = "5m"

    @field_validator("incomplete_timeout")
    @classmethod
    def _incomplete_timeout(cls, v: str) -> str:
        parse_duration(v, key="[watch] incomplete_timeout")
        return v.strip().lower()


class IntakeSettings(_Section):
    """``[intake]``: what acceptance does with a new version of a stored instance (docs/architecture.md)."""

    on_conflict: Literal["quarantine", "replace"] = "quarantine"
    # ImagingStudy.status of a study whose every instance an IOCM rejection removed, when not all of them
    # were rejected for 113037 / 113038 (those always give "entered-in-error"): 113001 quality, 113039
    # retention (docs/architecture.md "Study lifecycle")
    all_rejected_status: Literal["cancelled", "entered-in-error", "unknown", "available"] = "cancelled"


class SpoolSettings(_Section):
    """``[spool]``: how long accepted bytes are kept and the disk they may use (docs/architecture.md)."""

    # Received instances of at most this many bytes are kept in the state store, in the transaction of
    # their row (one durable write each); larger ones stream to spool files (docs/architecture.md).
    inline_max_bytes: int = Field(default=128 * 1024, ge=0)
    # Retention and the disk budget (ingest.intake.retention; docs/architecture.md "Retention and the
    # disk budget"). retain: "forever", "until_pushed", or a duration ("30d") after the study's last push.
    retain: str = "forever"
    # Spool files plus in-row instance bytes may not pass max_bytes (None: no cap); the spool's file
    # system keeps min_free_bytes free. An instance that would cross either is refused (0xA700).
    max_bytes: int | None = Field(default=None, ge=0)
    min_free_bytes: int = Field(default=64 * 1024**2, ge=0)
    # A committed instance (Storage Commitment) is kept at least this long after its commitment.
    commitment_hold: str = "30d"
    # Quarantined inputs are removed this long after they were quarantined ("forever": never).
    quarantine_retain: str = "forever"
    retention_interval_s: float = Field(default=60.0, gt=0)
    retention_batch: int = Field(default=200, ge=1)

    @field_validator("retain")
    @classmethod
    def _retain(cls, v: str) -> str:
        v = v.strip().lower()
        if v not in ("forever", "until_pushed"):
            parse_duration(v, key="[spool] retain", extra='"forever", "until_pushed" or ')
        return v

    @field_validator("commitment_hold")
    @classmethod
    def _hold(cls, v: str) -> str:
        parse_duration(v, key="[spool] commitment_hold")
        return v.strip().lower()

    @field_validator("quarantine_retain")
    @classmethod
    def _quarantine_retain(cls, v: str) -> str:
        v = v.strip().lower()
        if v != "forever":
            parse_duration(v, key="[spool] quarantine_retain", extra='"forever" or ')
        return v

    @property
    def retain_after_push(self) -> timedelta | None:
        """How long after its study's last push an instance's bytes are kept (``None``: forever)."""
        if self.retain == "forever":
            return None
        return timedelta(0) if self.retain == "until_pushed" else parse_duration(self.retain)

    @property
    def hold(self) -> timedelta:
        """``commitment_hold`` as a duration."""
        return parse_duration(self.commitment_hold)

    @property
    def quarantine_retain_for(self) -> timedelta | None:
        """``quarantine_retain`` as a duration (``None``: forever)."""
        return None if self.quarantine_retain == "forever" else parse_duration(self.quarantine_retain)


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)")
_DURATION_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, *, key: str = "duration", extra: str = "") -> timedelta:
    """A duration written as a number and a unit: ``"45s"``, ``"90m"``, ``"12h"``, ``"30d"``, ``"2w"``.

    Raises
    ------
    ValueError
        When ``text`` is not such a duration; the message names ``key``.
    """
    match = _DURATION_RE.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(
            f"{key} {text!r} must be {extra}a duration: a number and s, m, h, d or w (e.g. \"30d\")"
        )
    return timedelta(seconds=float(match.group(1)) * _DURATION_UNIT[match.group(2)])


class ProfileSettings(_Section):
    """``[profile]``: the imaging profile written ImagingStudy resources follow (docs/mapping.md
    "Imaging profiles"), and what the profiles' manifest says about its creator."""

    name: Literal["base", "smart-imaging", "mado"] = "base"
    # Local Namespace Entity ID (0040,0031) of an Issuer of Accession Number that is not a URI -> the
    # Identifier.system URI the site uses for it (MADO requires an accession system).
    issuer_systems: dict[str, str] = Field(default_factory=dict)
    # The creator Device (ingest itself) and the Organization it acts for, in the manifest Bundle and,
    # with write_linked, in the backend.
    device_name: str = Field(default="ingest", min_length=1, max_length=200)
    manufacturer: str | None = None
    organization: str | None = None
    # ingest serve / replay also find-or-create the Device (and Organization) in the backend and write a
    # Provenance for every ImagingStudy they create or update.
    write_linked: bool = False

    @field_validator("issuer_systems")
    @classmethod
    def _issuer_uris(cls, v: dict[str, str]) -> dict[str, str]:
        for local, system in v.items():
            if not re.fullmatch(r"(urn:|https?://)\S+", system):
                raise ValueError(
                    f"[profile] issuer_systems: the system of {local!r} must be a urn: or http(s) URI"
                )
        return v


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
    # OAuth2 client credentials (Medplum client applications): the token is fetched from token_url and
    # refreshed before it expires; the client secret comes from client_secret_env or client_secret_file.
    token_url: str | None = None
    client_id: str | None = None
    client_secret_env: str | None = None
    client_secret_file: Path | None = None
    scope: str | None = None

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True)

    @model_validator(mode="after")
    def _client_credentials(self) -> BackendSettings:
        if self.token_url is None:
            if self.client_id or self.client_secret_env or self.client_secret_file:
                raise ValueError("[backend] client_id / client_secret_* need token_url (the OAuth2 token "
                                 "endpoint, e.g. https://api.medplum.com/oauth2/token)")
            return self
        parts = urlsplit(self.token_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"[backend] token_url {self.token_url!r} is not an http(s) URL")
        if not self.client_id:
            raise ValueError("[backend] token_url needs client_id")
        if not (self.client_secret_env or self.client_secret_file):
            raise ValueError("[backend] token_url needs client_secret_env or client_secret_file")
        return self

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v.strip())
        shown = re.sub(r"//[^/@]*@", "//***@", v)  # never echo credentials
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"[backend] url {shown!r} is not an http(s) URL of a FHIR GraphQL endpoint "
                "(e.g. https://fhir.example.org/fhir/R4/$graphql)"
            )
        return v.strip()


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


    @field_validator("url")
    @classmethod
    def _postgres_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        scheme = urlsplit(v.strip()).scheme
        if v.strip() and scheme not in ("postgresql", "postgres") and not v.startswith("sqlite:///"):
            shown = re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", v)
            raise ValueError(
                f"[state] url {shown!r}: only postgresql:// (and sqlite:///PATH) URLs are supported "
                "(leave it unset for the SQLite store in the data dir)"
            )
        return v.strip()

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
    # unset: the machine's own zone, resolved at start (ingest.app.wiring.machine_timezone)
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
    # Calling AE title -> the WADO-RS base URL serving the series whose instances that AE sent (a series
    # served elsewhere than the study; docs/mapping.md "Imaging profiles").
    series_wado_rs_urls: dict[str, str] = Field(default_factory=dict)
    # SMART Imaging Access: whether a client sends its SMART access token to these WADO-RS services.
    requires_access_token: bool = True

    @field_validator("series_wado_rs_urls")
    @classmethod
    def _series_wado_rs(cls, v: dict[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for ae, url in v.items():
            url = url.strip()
            problem = _wado_rs_problem(url)
            if problem:
                shown = re.sub(r"//[^/@]*@", "//***@", url)  # never echo credentials
                raise ValueError(
                    f"[endpoint] series_wado_rs_urls {ae!r}: {shown!r} is not a WADO-RS base URL: {problem}"
                )
            out[ae.strip()] = url
        return out

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


class LinksSettings(_Section):
    # ImagingStudy.basedOn <- the order (Accession Number, Request Attributes Sequence): "off", "logical"
    # (by identifier) or "lookup" (ServiceRequest/<id> when the backend holds exactly one match)
    based_on: Literal["off", "logical", "lookup"] = "logical"
    # ImagingStudy.encounter <- Admission ID (0038,0010) + issuer: "off", "logical" or "lookup"
    encounter: Literal["off", "logical", "lookup"] = "off"
    # ImagingStudy.referrer: "display" (the Referring Physician's Name) or "lookup" (Practitioner/<id> by
    # the Referring Physician Identification Sequence (0008,0096); names alone never decide)
    referrer: Literal["display", "lookup"] = "display"


_SYNC_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SyncSource(_Section):
    """One PACS ``ingest sync`` mirrors (``[[sync.sources]]``); docs/architecture.md "Sync"."""

    name: str
    # dimse://CALLED_AE@HOST:PORT (C-FIND, Study Root) or an http(s):// DICOMweb root (QIDO-RS)
    url: str
    calling_ae: str | None = None
    interval_s: float = Field(default=3600.0, gt=0)
    # this PACS's answer cap, when it differs from [sync] query_limit
    query_limit: int | None = Field(default=None, ge=2)
    # ingest serve: every run asks everything (and reconciles every study), not from the watermark
    full: bool = False
    wado_rs_url: str | None = None
    # DICOMweb: bearer token from this environment variable or file; PEM CA bundle for https / TLS
    token_env: str | None = None
    token_file: Path | None = None
    ca: Path | None = None
    # DIMSE over TLS (as the listener's [listener.tls]): client certificate and key when the PACS asks
    tls: bool = False
    cert: Path | None = None
    key: Path | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _SYNC_NAME_RE.match(v):
            raise ValueError(f"[[sync.sources]] name {v!r}: letters, digits, '.', '_', '-' (at most 64)")
        return v

    @field_validator("calling_ae")
    @classmethod
    def _calling(cls, v: str | None) -> str | None:
        return None if v is None else _check_ae(v)

    @field_validator("wado_rs_url")
    @classmethod
    def _wado(cls, v: str | None) -> str | None:
        v = (v or "").strip() or None
        if v is not None and (problem := _wado_rs_problem(v)):
            raise ValueError(f"[[sync.sources]] wado_rs_url is not a WADO-RS base URL: {problem}")
        return v


class SyncSettings(_Section):
    """``ingest sync`` and the sources ``ingest serve`` syncs on their interval (docs/architecture.md
    "Sync")."""

    # a study the PACS no longer lists: "keep" its ImagingStudy as it is, or mark it "entered-in-error"
    on_study_gone: Literal["keep", "entered-in-error"] = "keep"
    calling_ae: str = "INGEST"
    # answers at which a study-level query is taken as cut short by the PACS (QIDO-RS: sent as limit)
    query_limit: int = Field(default=1000, ge=2)
    concurrency: int = Field(default=4, ge=1, le=16)
    timeout_s: float = Field(default=30.0, gt=0)
    attempts: int = Field(default=3, ge=1)
    retry_base_s: float = Field(default=1.0, gt=0)
    # an incremental run re-reads study dates from this many days before the last run's
    overlap_days: int = Field(default=1, ge=0)
    lease_s: float = Field(default=600.0, gt=0)
    sources: tuple[SyncSource, ...] = ()

    @field_validator("calling_ae")
    @classmethod
    def _calling(cls, v: str) -> str:
        return _check_ae(v)

    @model_validator(mode="after")
    def _unique(self) -> SyncSettings:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError("[[sync.sources]] names must be unique")
        return self


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
    links: LinksSettings = LinksSettings()


    sync: SyncSettings = SyncSettings()
    log: LogSettings = LogSettings()

    @model_validator(mode="after")
    def _commitment_kept(self) -> Settings:
        # docs/architecture.md "Retention and the disk budget": no setting may remove a committed
        # instance's bytes before [spool] commitment_hold (retention itself always waits for the hold)
        problem = unsafe_commitment_retention(self)
        if problem:
            raise ValueError(problem)
        return self

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


def unsafe_commitment_retention(settings: Settings) -> str | None:
    """Why these settings could remove a committed instance's bytes before ``[spool] commitment_hold``,
    or ``None`` (docs/architecture.md "Retention and the disk budget").

    Retention never removes bytes under a hold (``instances.hold_until``), whatever ``retain`` says, so a
    ``retain`` shorter than ``commitment_hold`` is safe. Unsafe are:

    - a zero ``commitment_hold`` with commitment on and a ``retain`` other than ``forever``: a committed
      instance's bytes could go as soon as its study is pushed;
    - ``[intake] on_conflict = "replace"`` with commitment on and a ``quarantine_retain`` shorter than
      ``commitment_hold``: a committed instance replaced by a newer version goes to the quarantine,
      whose retention would remove it before the hold ends.
    """
    spool = settings.spool
    if not settings.listener.commitment.enabled:
        return None
    if spool.retain != "forever" and spool.hold <= timedelta(0):
        return (
            f"[spool] commitment_hold {spool.commitment_hold!r} with [spool] retain {spool.retain!r} and "
            "[listener.commitment] enabled: committed instances could be removed as soon as their study "
            "is pushed; set commitment_hold to how long senders may rely on a commitment"
        )
    quarantine_for = spool.quarantine_retain_for
    replacing = settings.intake.on_conflict == "replace"
    if replacing and quarantine_for is not None and quarantine_for < spool.hold:
        return (
            f"[spool] quarantine_retain {spool.quarantine_retain!r} is shorter than [spool] commitment_hold "
            f"{spool.commitment_hold!r} with [intake] on_conflict \"replace\" and [listener.commitment] "
            "enabled: a committed instance replaced by a newer version would leave the quarantine before "
            "its hold ends; make quarantine_retain at least commitment_hold"
        )
    return None


def load_settings(
    config_file: Path | None = None, *, environ: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
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

    environ = dict(os.environ) if environ is None else environ

    try:
        bound = _Bound(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
    unknown = unknown_environment(bound, environ)
    if unknown:
        raise ConfigError("; ".join(unknown))
    return bound


#: ``INGEST_*`` variables that are not settings but are read by ``ingest`` itself.
_OTHER_VARIABLES = frozenset({"INGEST_CONFIG"})


def _setting_variables(model: type[BaseModel], prefix: str) -> tuple[set[str], set[str]]:
    """The environment names of every setting under ``model`` (``INGEST_LISTENER__TLS__CERT``), and
    the prefixes under which any name is a setting (dict-valued keys)."""
    names: set[str] = set()
    open_prefixes: set[str] = set()
    for name, field in model.model_fields.items():
        for key in {name, field.alias or name}:
            env = f"{prefix}{key.upper()}"
            names.add(env)
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                sub_names, sub_open = _setting_variables(annotation, env + "__")
                names |= sub_names
                open_prefixes |= sub_open
            elif getattr(annotation, "__origin__", None) is dict:
                open_prefixes.add(env + "__")
    return names, open_prefixes


def unknown_environment(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """One message per ``INGEST_*`` variable in ``environ`` that names no setting (a typo such as
    ``INGEST_LISTENR__PORT`` would otherwise be ignored silently), with the closest setting named.

    Variables that a ``*_env`` setting names (``[backend] token_env = "INGEST_BACKEND_TOKEN"``) are
    secrets' sources, not settings, and are allowed.
    """
    names, open_prefixes = _setting_variables(Settings, "INGEST_")
    secrets = {value.upper() for value in _env_names(settings.model_dump())}
    problems = []
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith("INGEST_") or upper in names or upper in secrets:
            continue
        if upper in _OTHER_VARIABLES or any(upper.startswith(p) for p in open_prefixes):
            continue
        close = difflib.get_close_matches(upper, sorted(names), n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(
            f"environment variable {printable_name(variable)} names no setting{hint}; settings are "
            "INGEST_<SECTION>__<KEY>, as in config/ingest.toml"
        )
    return problems


def _env_names(data: Any) -> list[str]:
    """The values of every ``token_env`` / ``*_env`` key in a settings dump (secret sources)."""
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, str) and (key == "token_env" or key.endswith("_env")):
                found.append(value)
            else:
                found.extend(_env_names(value))
    elif isinstance(data, list):
        for value in data:
            found.extend(_env_names(value))
    return found


def printable_name(name: str) -> str:
    """An environment variable's name as shown in a message (control characters escaped)."""
    return name.encode("unicode_escape").decode("ascii")
