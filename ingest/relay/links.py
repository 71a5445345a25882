"""Linked resources: ``ImagingStudy.subject`` -> Patient and ``ImagingStudy.endpoint`` -> Endpoint.

Two resolvers sit between the pure mapping and the backend (the resources they create and the search
tokens they use are built by :mod:`ingest.core.linked`):

- :class:`PatientResolver` (``[patient] mode``): ``"logical"`` keeps the mapping's logical reference
  ``{type: "Patient", identifier: {system, value}, display}``; ``"lookup"`` searches
  ``PatientList(identifier: "<system>|<id>")`` and, on exactly one match, writes the literal reference
  ``Patient/<id>``; ``"create"`` does the same and creates the Patient (identifier, names, gender, birth
  date) when none matches. No match, several matches or a refused create fall back to the logical
  reference and count ``ingest_patient_fallbacks{cause}``. An existing Patient is never updated.
  Lookups are cached for the run; one asyncio lock per identifier makes one writer per patient in this
  process, and the search right before a create runs under that lock, so two studies of one new patient
  pushed concurrently create exactly one Patient. (Across nodes sharing a backend the search-then-create
  is not atomic; FHIR GraphQL has no conditional create.)
- :class:`EndpointResolver` (``[endpoint] wado_rs_url``): finds or creates, once per process, the one
  Endpoint (``connectionType`` ``dicom-wado-rs``) for the DICOMweb base URL, identified by
  ``{system: "urn:ietf:rfc:3986", value: <url>}`` (FHIR R4 Endpoint has no ``address`` search parameter),
  and yields ``Endpoint/<id>`` for ``MappingOptions.endpoint_reference``.

- :class:`Creator` and :class:`ProvenanceSink` (``[profile] write_linked``): ``ingest``'s Device (the
  MADO Creator) and the Organization it acts for are found by identifier or created, once per process,
  and every ImagingStudy the relay creates or updates gets a Provenance (``target``: that version of the
  ImagingStudy; ``agent``: ``assembler``, who = the Device, on behalf of the Organization).
- :class:`ProfileLink` (``[profile] name``, ``[endpoint] series_wado_rs_urls``): the link step when a
  profile or series-level endpoints are configured: the subject (above), then the series' Endpoint
  references (by the calling AE titles their instances came from, read from the state store) and the
  profile's rules (:func:`ingest.core.profiles.apply_profile`).

"Never replace an existing literal subject with a logical one" is the merge's rule
(:func:`ingest.core.merge.merge`); these resolvers only decide what *ours* is.

Patient identifiers, names and birth dates are PHI: they never appear in a log line above DEBUG, in an
exception message or in a metric label.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from ingest.config import EndpointSettings, PatientSettings, ProfileSettings
from ingest.core.fhir import Identifier, Provenance
from ingest.core.linked import (
    device_identifier,
    device_resource,
    endpoint_resource,
    organization_identifier,
    organization_resource,
    patient_resource,
    search_token,
)
from ingest.core.profiles import ProfileName, SeriesEndpoints, apply_profile
from ingest.core.records import BackendStudy, InstanceRecord
from ingest.core.terminology import PROVENANCE_PARTICIPANT_SYSTEM, URI_SYSTEM
from ingest.errors import ConfigError, PermanentSinkError, SinkError

if TYPE_CHECKING:  # prometheus_client stays unimported in replay --dry-run
    from datetime import datetime

    from ingest.metrics import Metrics
    from ingest.ports import Sink

__all__ = [
    "Creator",
    "EndpointResolver",
    "LinkedBackend",
    "Links",
    "PatientResolver",
    "ProfileLink",
    "ProvenanceSink",
    "SeriesSources",
    "check_profile",
    "prepare_links",
]

LOGGER = logging.getLogger(__name__)

PatientMode = Literal["logical", "lookup", "create"]
_MISSING: Final = object()
#: Study Instance UID -> Series Instance UID -> the calling AE titles its instances came from.
SeriesSources = Callable[[str], Awaitable[Mapping[str, Collection[str]]]]


class LinkedBackend(Protocol):
    """What the resolvers need from the backend (the GraphQL sink implements it)."""

    def supports(self, resource_type: str) -> bool:
        """Whether ``<Type>List(identifier:)`` and ``<Type>Create(res:)`` are available."""
        ...

    async def search_resources(
        self, resource_type: str, *, identifier: str, count: int = 2
    ) -> list[dict[str, Any]]:
        """The resources whose identifier matches the token ``identifier`` (FHIR JSON)."""
        ...

    async def create_resource(self, resource_type: str, resource: Mapping[str, Any]) -> dict[str, Any]:
        """Create ``resource``; returns it as the backend holds it (with ``id``)."""
        ...


def _carries(resource: Mapping[str, Any], system: str | None, value: str) -> bool:
    """Whether ``resource.identifier`` holds ``system|value`` (any system when ``system`` is ``None``; a
    backend might ignore a search argument)."""
    for ident in resource.get("identifier") or []:
        if not isinstance(ident, Mapping) or ident.get("value") != value:
            continue
        if system is None or ident.get("system") == system:
            return True
    return False


# --------------------------------------------------------------------------------------------------
# Patient
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cached:
    patient_id: str | None  # None: fall back to the logical reference
    cause: str | None  # why, for the metric
    expires: float  # monotonic seconds; inf for a found/created Patient


class PatientResolver:
    """Resolves ``ImagingStudy.subject`` per ``[patient] mode``; the relay's ``link`` hook.

    Parameters
    ----------
    backend:
        The FHIR backend (``GraphQLSink``).
    mode:
        ``"logical"``, ``"lookup"`` or ``"create"``.
    metrics:
        ``patient_fallbacks{cause}`` is counted here: ``no_identifier``, ``not_found``, ``multiple``,
        ``search_failed``, ``create_failed``.
    negative_ttl_s:
        How long "no single match" is remembered (a Patient created by others later is then found).
        Found and created Patients are remembered for the life of the resolver.
    max_cached:
        Bound of the cache (least recently used entries go first).
    clock:
        Monotonic seconds (tests inject one).
    """

    def __init__(
        self,
        backend: LinkedBackend,
        mode: PatientMode,
        *,
        metrics: Metrics | None = None,
        negative_ttl_s: float = 60.0,
        max_cached: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.mode = mode
        self.metrics = metrics
        self.negative_ttl_s = negative_ttl_s
        self.max_cached = max_cached
        self.clock = clock
        self.created = 0
        self.searches = 0
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def check(self) -> None:
        """Refuse to start when the mode needs Patient operations the backend lacks.

        Raises
        ------
        ConfigError
        """
        if self.mode != "logical" and not self.backend.supports("Patient"):
            raise ConfigError(
                f'[patient] mode "{self.mode}" needs PatientList(identifier:) and PatientCreate(res:) '
                "on the backend, and its schema has none"
            )

    async def __call__(self, study: dict[str, Any], records: Sequence[InstanceRecord]) -> dict[str, Any]:
        """Return ``study`` with ``subject`` resolved (a new dict; ``study`` is not changed).

        Parameters
        ----------
        study:
            ImagingStudy FHIR JSON from the mapping (logical ``subject``).
        records:
            The study's instance records (demographics for a created Patient).

        Raises
        ------
        RetryableSinkError
            The backend cannot be reached now; the relay retries the study.
        """
        if self.mode == "logical":
            return study
        subject = study.get("subject")
        ident = subject.get("identifier") if isinstance(subject, Mapping) else None
        system = ident.get("system") if isinstance(ident, Mapping) else None
        value = ident.get("value") if isinstance(ident, Mapping) else None
        if not isinstance(system, str) or not isinstance(value, str) or not system or not value:
            self._fallback("no_identifier")
            return study
        assert isinstance(subject, Mapping)
        patient_id = await self._resolve(system, value, records)
        if patient_id is None:
            return study
        # ImagingStudy.subject: literal Patient/<id>; the logical identifier and display are kept
        literal: dict[str, Any] = {
            "reference": f"Patient/{patient_id}",
            "type": "Patient",
            "identifier": ident,
        }
        if subject.get("display"):
            literal["display"] = subject["display"]
        LOGGER.debug("study %s: subject is Patient/%s", records[0].study_uid if records else "?", patient_id)
        return {**study, "subject": literal}

    # -- internals -----------------------------------------------------------------------------------

    def _fallback(self, cause: str) -> None:
        if self.metrics is not None:
            self.metrics.patient_fallbacks.labels(cause=cause).inc()

    def _cached(self, key: str) -> _Cached | None:
        hit = self._cache.get(key)
        if hit is None:
            return None
        if hit.expires <= self.clock():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return hit

    def _remember(self, key: str, patient_id: str | None, cause: str | None) -> None:
        expires = float("inf") if patient_id is not None else self.clock() + self.negative_ttl_s
        self._cache[key] = _Cached(patient_id, cause, expires)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)

    def _answer(self, hit: _Cached) -> str | None:
        if hit.patient_id is None and hit.cause is not None:
            self._fallback(hit.cause)
        return hit.patient_id

    async def _resolve(self, system: str, value: str, records: Sequence[InstanceRecord]) -> str | None:
        key = search_token(system, value)
        hit = self._cached(key)
        if hit is not None:
            return self._answer(hit)
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:  # one writer per patient identifier in this process
                hit = self._cached(key)  # another study of this patient may have resolved it meanwhile
                if hit is not None:
                    return self._answer(hit)
                return await self._search_or_create(key, system, value, records)
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    async def _search_or_create(
        self, key: str, system: str, value: str, records: Sequence[InstanceRecord]
    ) -> str | None:
        uid = records[0].study_uid if records else "?"
        self.searches += 1
        try:
            found = await self.backend.search_resources("Patient", identifier=key, count=2)
        except PermanentSinkError as exc:
            LOGGER.warning("study %s: Patient search refused, subject stays logical: %s", uid, exc)
            self._fallback("search_failed")
            return None
        matches = [m for m in found if _carries(m, system, value) and isinstance(m.get("id"), str)]
        if len(matches) == 1:
            self._remember(key, matches[0]["id"], None)
            return str(matches[0]["id"])
        if len(matches) > 1:
            LOGGER.warning(
                "study %s: several Patients carry the subject identifier; subject stays logical", uid
            )
            self._remember(key, None, "multiple")
            self._fallback("multiple")
            return None
        if self.mode == "lookup":
            LOGGER.info("study %s: no Patient carries the subject identifier; subject stays logical", uid)
            self._remember(key, None, "not_found")
            self._fallback("not_found")
            return None
        try:
            created = await self.backend.create_resource("Patient", patient_resource(system, value, records))
        except PermanentSinkError as exc:
            LOGGER.warning("study %s: PatientCreate refused, subject stays logical: %s", uid, exc)
            self._fallback("create_failed")
            return None  # not remembered: the next push of a study of this patient tries again
        self.created += 1
        patient_id = str(created["id"])
        self._remember(key, patient_id, None)
        LOGGER.info("study %s: created Patient/%s for the subject", uid, patient_id)
        return patient_id


# --------------------------------------------------------------------------------------------------
# Endpoint
# --------------------------------------------------------------------------------------------------


class EndpointResolver:
    """Finds or creates the Endpoint for one WADO-RS base URL, once per process.

    Parameters
    ----------
    backend:
        The FHIR backend (``GraphQLSink``).
    url:
        ``[endpoint] wado_rs_url``, or one of ``[endpoint] series_wado_rs_urls``.
    requires_access_token:
        ``[endpoint] requires_access_token``, written into an Endpoint it creates.
    mado:
        ``[profile] name = "mado"``: an Endpoint it creates carries ``MadoRetrieveLocationUIDExtension``.
    """

    def __init__(
        self, backend: LinkedBackend, url: str, *, requires_access_token: bool = True, mado: bool = True
    ) -> None:
        self.backend = backend
        self.url = url
        self.requires_access_token = requires_access_token
        self.mado = mado
        self._reference: str | None = None
        self._lock = asyncio.Lock()

    async def reference(self) -> str:
        """``Endpoint/<id>`` of the Endpoint whose ``address`` is the URL (created when none exists).

        Raises
        ------
        ConfigError
            The backend has no ``EndpointList(identifier:)`` / ``EndpointCreate(res:)``.
        RetryableSinkError, PermanentSinkError
            From the backend.
        """
        async with self._lock:
            if self._reference is not None:
                return self._reference
            if not self.backend.supports("Endpoint"):
                raise ConfigError(
                    "[endpoint] wado_rs_url needs EndpointList(identifier:) and EndpointCreate(res:) on "
                    "the backend, and its schema has none"
                )
            found = await self.backend.search_resources(
                "Endpoint", identifier=search_token(URI_SYSTEM, self.url), count=10
            )
            matches = sorted(
                (m for m in found if m.get("address") == self.url and isinstance(m.get("id"), str)),
                key=lambda m: (m.get("status") != "active", str(m["id"])),
            )
            if matches:
                endpoint_id = str(matches[0]["id"])
                if len(matches) > 1:
                    LOGGER.warning(
                        "%d Endpoints have address %s; using Endpoint/%s", len(matches), self.url, endpoint_id
                    )
            else:
                created = await self.backend.create_resource(
                    "Endpoint",
                    endpoint_resource(
                        self.url, requires_access_token=self.requires_access_token, mado=self.mado
                    ),
                )
                endpoint_id = str(created["id"])
                LOGGER.info("created Endpoint/%s for %s", endpoint_id, self.url)
            self._reference = f"Endpoint/{endpoint_id}"
            return self._reference


# --------------------------------------------------------------------------------------------------
# The creator (Device, Organization) and the Provenance of each write
# --------------------------------------------------------------------------------------------------


async def _find_or_create(
    backend: LinkedBackend, resource_type: str, identifier: Identifier, resource: Mapping[str, Any]
) -> str:
    """``<Type>/<id>`` of the resource carrying ``identifier`` (the lowest id when several do), created
    from ``resource`` when none does."""
    system, value = identifier.system or "", identifier.value or ""
    found = await backend.search_resources(resource_type, identifier=search_token(system, value), count=10)
    ids = sorted(str(m["id"]) for m in found if _carries(m, system, value) and isinstance(m.get("id"), str))
    if ids:
        return f"{resource_type}/{ids[0]}"
    created = await backend.create_resource(resource_type, resource)
    LOGGER.info("created %s/%s for [profile] write_linked", resource_type, created["id"])
    return f"{resource_type}/{created['id']}"


class Creator:
    """``ingest`` as the creator of what it writes: its Device and Organization, and their Provenances.

    Parameters
    ----------
    backend:
        The FHIR backend (``GraphQLSink``).
    profile:
        ``[profile]`` (``device_name``, ``manufacturer``, ``organization``).
    version:
        ``ingest``'s version (``Device.version``).
    clock:
        "Now" for ``Provenance.recorded`` (timezone-aware).
    """

    def __init__(
        self, backend: LinkedBackend, profile: ProfileSettings, version: str, *, clock: Callable[[], datetime]
    ) -> None:
        self.backend = backend
        self.profile = profile
        self.version = version
        self.clock = clock
        self.written = 0
        self._refs: tuple[str, str | None] | None = None
        self._lock = asyncio.Lock()

    def check(self) -> None:
        """Refuse to start when the backend cannot hold what ``write_linked`` writes.

        Raises
        ------
        ConfigError
        """
        needed = ["Device", "Provenance"] + (["Organization"] if self.profile.organization else [])
        missing = [t for t in needed if not self.backend.supports(t)]
        if missing:
            raise ConfigError(
                "[profile] write_linked needs " + ", ".join(f"{t}List / {t}Create" for t in missing)
                + " on the backend, and its schema has none"
            )

    async def references(self) -> tuple[str, str | None]:
        """``Device/<id>`` and ``Organization/<id>`` (``None`` without ``[profile] organization``)."""
        async with self._lock:
            if self._refs is None:
                cfg = self.profile
                org: str | None = None
                if cfg.organization:
                    name = cfg.organization
                    org = await _find_or_create(
                        self.backend, "Organization", organization_identifier(name),
                        organization_resource(name),
                    )
                device = device_resource(
                    cfg.device_name, self.version, manufacturer=cfg.manufacturer, owner=org
                )
                ident = device_identifier(cfg.device_name)
                self._refs = (await _find_or_create(self.backend, "Device", ident, device), org)
            return self._refs

    async def provenance(self, written: BackendStudy) -> str:
        """Write the Provenance of one ImagingStudy write; returns ``Provenance/<id>``."""
        device, org = await self.references()
        target = f"ImagingStudy/{written.id}"
        if written.version_id:
            target += f"/_history/{written.version_id}"  # the version this write made
        agent: dict[str, Any] = {
            "type": {"coding": [{"system": PROVENANCE_PARTICIPANT_SYSTEM, "code": "assembler",
                                 "display": "Assembler"}]},
            "who": {"reference": device, "type": "Device"},
        }
        if org is not None:
            agent["onBehalfOf"] = {"reference": org, "type": "Organization"}
        recorded = self.clock().isoformat(timespec="milliseconds")
        resource = Provenance.model_validate(
            {"resourceType": "Provenance", "target": [{"reference": target, "type": "ImagingStudy"}],
             "recorded": recorded, "agent": [agent]}
        ).to_fhir()
        created = await self.backend.create_resource("Provenance", resource)
        self.written += 1
        return f"Provenance/{created['id']}"


class ProvenanceSink:
    """The relay's sink with ``[profile] write_linked``: each ImagingStudy create or update is followed by
    its Provenance (:meth:`Creator.provenance`). A Provenance the backend refuses or cannot take now is
    logged as a WARNING; the ImagingStudy write stands and the study is not retried for it. Everything
    else is the wrapped sink's."""

    def __init__(self, sink: Sink, creator: Creator) -> None:
        self.sink = sink
        self.creator = creator

    async def find(self, study_uid: str, backend_id: str | None) -> BackendStudy | None:
        return await self.sink.find(study_uid, backend_id)

    async def create(self, resource: dict[str, Any]) -> BackendStudy:
        written = await self.sink.create(resource)
        await self._provenance(written)
        return written

    async def update(self, backend_id: str, resource: dict[str, Any]) -> BackendStudy:
        written = await self.sink.update(backend_id, resource)
        await self._provenance(written)
        return written

    async def aclose(self) -> None:
        await self.sink.aclose()

    def __getattr__(self, name: str) -> Any:  # connect, supports, search_resources, ... of the sink
        return getattr(self.sink, name)

    async def _provenance(self, written: BackendStudy) -> None:
        try:
            ref = await self.creator.provenance(written)
        except SinkError as exc:
            LOGGER.warning("ImagingStudy/%s written, but its Provenance was not: %s", written.id, exc)
            return
        LOGGER.debug("ImagingStudy/%s: %s", written.id, ref)


# --------------------------------------------------------------------------------------------------
# Profile
# --------------------------------------------------------------------------------------------------


class ProfileLink:
    """The link step with a profile: subject, series endpoints, then the profile's rules.

    Parameters
    ----------
    profile:
        ``[profile] name``.
    endpoints:
        The study-level Endpoint reference and the calling AE -> Endpoint reference table.
    patient:
        The subject resolver (``None`` in ``[patient] mode = "logical"``).
    sources:
        Where the calling AE titles of a study's series come from (the state store); needed only with
        series-level endpoints.
    """

    def __init__(
        self,
        profile: ProfileName,
        endpoints: SeriesEndpoints,
        *,
        patient: PatientResolver | None = None,
        sources: SeriesSources | None = None,
    ) -> None:
        self.profile = profile
        self.endpoints = endpoints
        self.patient = patient
        self.sources = sources

    async def __call__(self, study: dict[str, Any], records: Sequence[InstanceRecord]) -> dict[str, Any]:
        """Return ``study`` with the subject resolved and the profile applied (a new dict)."""
        if self.patient is not None:
            study = await self.patient(study, records)
        uid = records[0].study_uid if records else "?"
        endpoints = self.endpoints
        if self.sources is not None and endpoints.by_source and records:
            endpoints = replace(endpoints, sources=await self.sources(uid))
        profiled, problems = apply_profile(study, self.profile, endpoints)
        for problem in problems:  # rule names and UIDs only, never patient data
            LOGGER.info("study %s does not meet the %s profile: %s", uid, self.profile, problem)
        return profiled


# --------------------------------------------------------------------------------------------------
# Wiring
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Links:
    """What :func:`prepare_links` gives the relay: the Endpoint reference and the link step."""

    endpoint_reference: str | None
    link: PatientResolver | ProfileLink | None


def check_profile(profile: ProfileSettings, endpoint: EndpointSettings, *, include_instances: bool) -> None:
    """Refuse settings under which no ImagingStudy can meet ``[profile] name``.

    Raises
    ------
    ConfigError
        ``smart-imaging`` without ``[endpoint] wado_rs_url`` (ImagingStudy.endpoint 1..*); ``mado``
        without it (every series needs a WADO-RS Endpoint) or with ``[mapping] include_instances =
        false`` (series.instance 1..*).
    """
    if profile.name in ("smart-imaging", "mado") and not endpoint.wado_rs_url:
        raise ConfigError(
            f'[profile] name = "{profile.name}" needs [endpoint] wado_rs_url: the profile requires a '
            "WADO-RS Endpoint for every study and series"
        )
    if profile.name == "mado" and not include_instances:
        raise ConfigError(
            '[profile] name = "mado" needs [mapping] include_instances = true: the MADO ImagingStudy '
            "lists every instance of every series"
        )


async def prepare_links(
    patient: PatientSettings,
    endpoint: EndpointSettings,
    backend: LinkedBackend,
    *,
    metrics: Metrics | None = None,
    profile: ProfileSettings | None = None,
    sources: SeriesSources | None = None,
) -> Links:
    """Resolve the Endpoint and build the Patient resolver from ``[endpoint]`` and ``[patient]``.

    Call once at start, after the sink is connected; pass ``endpoint_reference`` to the mapping's
    options (``ingest.app.wiring.mapping_options``) and ``link`` to ``Relay(link=...)``.

    Parameters
    ----------
    patient:
        ``[patient]`` (``mode``).
    endpoint:
        ``[endpoint]`` (``wado_rs_url``).
    backend:
        The connected sink.
    metrics:
        Where Patient fallbacks are counted.
    profile:
        ``[profile]`` (``name``); ``None``: ``base``.
    sources:
        The calling AE titles of a study's series (needed with ``[endpoint] series_wado_rs_urls``).

    Returns
    -------
    Links
        ``link`` is ``None`` in ``"logical"`` mode with the ``base`` profile and no series-level
        endpoints (nothing to do); a :class:`ProfileLink` with a profile or series endpoints.

    Raises
    ------
    ConfigError
        The backend lacks the Patient or Endpoint operations the settings need.
    RetryableSinkError, PermanentSinkError
        Finding or creating the Endpoint failed.
    """
    link: PatientResolver | None = None
    if patient.mode != "logical":
        link = PatientResolver(backend, patient.mode, metrics=metrics)
        link.check()
    reference = None
    token = endpoint.requires_access_token
    name: ProfileName = profile.name if profile is not None else "base"
    mado = name == "mado"
    if endpoint.wado_rs_url:
        study_endpoint = EndpointResolver(
            backend, endpoint.wado_rs_url, requires_access_token=token, mado=mado
        )
        reference = await study_endpoint.reference()
    if name == "base" and not endpoint.series_wado_rs_urls:
        return Links(endpoint_reference=reference, link=link)
    by_url: dict[str, str] = {}
    for url in sorted(set(endpoint.series_wado_rs_urls.values())):
        if url == endpoint.wado_rs_url and reference is not None:
            by_url[url] = reference
        else:
            by_url[url] = await EndpointResolver(
                backend, url, requires_access_token=token, mado=mado
            ).reference()
    by_source = {ae: by_url[url] for ae, url in endpoint.series_wado_rs_urls.items()}
    profiled = ProfileLink(
        name, SeriesEndpoints(study=reference, by_source=by_source), patient=link, sources=sources
    )
    return Links(endpoint_reference=reference, link=profiled)
