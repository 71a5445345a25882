"""Linked resources: ``ImagingStudy.subject`` -> Patient and ``ImagingStudy.endpoint`` -> Endpoint.

Two resolvers sit between the pure mapping and the backend:

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from pydantic import ValidationError

from ingest.config import Settings
from ingest.core.aggregate import pick
from ingest.core.datetimes import parse_da
from ingest.core.fhir import (
    AdministrativeGender,
    CodeableConcept,
    Coding,
    Endpoint,
    HumanName,
    Identifier,
    Patient,
    strip_controls,
)
from ingest.core.mapping import person_display
from ingest.core.records import InstanceRecord, PersonName
from ingest.errors import ConfigError, PermanentSinkError
from ingest.metrics import Metrics

__all__ = [
    "CONNECTION_TYPE_SYSTEM",
    "NAME_REPRESENTATION_URL",
    "URI_SYSTEM",
    "EndpointResolver",
    "LinkedBackend",
    "Links",
    "PatientResolver",
    "endpoint_resource",
    "human_names",
    "patient_resource",
    "prepare_links",
    "search_token",
]

LOGGER = logging.getLogger(__name__)

#: ISO 21090 EN.representation on HumanName (FHIR R4 core extension): ABC | IDE | SYL.
NAME_REPRESENTATION_URL: Final = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
#: Endpoint.connectionType code system (FHIR R4, extensible binding endpoint-connection-type).
CONNECTION_TYPE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
#: Identifier.system of an identifier that is itself a URI (here: the Endpoint's address).
URI_SYSTEM: Final = "urn:ietf:rfc:3986"

# Patient.gender (administrative-gender) <- Patient's Sex (0010,0040); anything else is omitted
_GENDER: Final[dict[str, AdministrativeGender]] = {"M": "male", "F": "female", "O": "other"}

PatientMode = Literal["logical", "lookup", "create"]
_MISSING: Final = object()


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


# --------------------------------------------------------------------------------------------------
# Pure helpers: search tokens and the resources we create
# --------------------------------------------------------------------------------------------------


def _escape(text: str) -> str:
    # FHIR search escaping (R4 3.1.1.5.9): "\", "|", "," and "$" in a value are escaped with "\"
    for ch in ("\\", "|", ",", "$"):
        text = text.replace(ch, "\\" + ch)
    return text


def search_token(system: str, value: str) -> str:
    """A FHIR token search value ``system|value``, escaped.

    Parameters
    ----------
    system, value:
        ``Identifier.system`` and ``Identifier.value``.

    Examples
    --------
    >>> search_token("urn:oid:1.2.3", "A|1")
    'urn:oid:1.2.3|A\\\\|1'
    """
    return f"{_escape(system)}|{_escape(value)}"


def _components(group: str) -> list[str]:
    # PN component group: family^given^middle^prefix^suffix (PS3.5 6.2)
    parts = [" ".join(strip_controls(p).split()) for p in group.split("^")]
    return (parts + [""] * 5)[:5]


def _human_name(group: str, representation: str | None) -> HumanName | None:
    family, given, middle, prefix, suffix = _components(group)
    if not any((family, given, middle, prefix, suffix)):
        return None
    # HumanName.text: alphabetic given-name first, ideographic/phonetic family-name first (as the
    # mapping's subject.display, ingest.core.mapping.person_display)
    as_pn = PersonName(alphabetic=group) if representation is None else PersonName(ideographic=group)
    extension = [{"url": NAME_REPRESENTATION_URL, "valueCode": representation}] if representation else []
    try:
        return HumanName.model_validate(
            {
                "extension": extension,  # HumanName.extension: iso21090-EN-representation IDE / SYL
                "text": person_display(as_pn),  # HumanName.text
                "family": family or None,  # HumanName.family <- component 1
                "given": [g for g in (given, middle) if g],  # HumanName.given <- components 2, 3
                "prefix": [prefix] if prefix else [],  # HumanName.prefix <- component 4
                "suffix": [suffix] if suffix else [],  # HumanName.suffix <- component 5
            }
        )
    except ValidationError:
        return None  # e.g. control characters: the name is left out, the Patient is still created


def human_names(name: PersonName | None) -> list[HumanName]:
    """Patient's Name (0010,0010) as FHIR R4 HumanNames, one per PN component group.

    The alphabetic group becomes a plain HumanName; the ideographic and phonetic groups carry the
    ISO 21090 ``EN.representation`` extension (``IDE`` / ``SYL``), the way FHIR R4 represents the
    alternative script forms of one name. Components: family -> ``family``; given and middle ->
    ``given``; prefix -> ``prefix``; suffix -> ``suffix``; ``text`` is the whole name as written.

    Parameters
    ----------
    name:
        The decoded PN value.

    Returns
    -------
    list of HumanName
        Empty groups (and groups FHIR cannot hold) are skipped.
    """
    if name is None:
        return []
    out: list[HumanName] = []
    for group, representation in ((name.alphabetic, None), (name.ideographic, "IDE"), (name.phonetic, "SYL")):
        human = _human_name(group, representation)
        if human is not None:
            out.append(human)
    return out


def _text(value: str | None) -> str | None:
    return strip_controls(value or "").strip() or None


def patient_resource(system: str, value: str, records: Sequence[InstanceRecord]) -> dict[str, Any]:
    """The Patient to create for ``system|value`` from the study's instances (FHIR JSON).

    Demographics come from the instances whose Patient ID (0010,0020) is ``value`` (all instances when
    none is), each value chosen by :func:`ingest.core.aggregate.pick` (most common, then lowest SOP
    Instance UID).

    Parameters
    ----------
    system, value:
        ``Patient.identifier`` (the subject's logical identifier).
    records:
        The study's instance records.

    Returns
    -------
    dict
        ``{"resourceType": "Patient", "identifier": [...], "name": [...], "gender": ..., "birthDate": ...}``
        without empty elements; an unknown sex and an invalid birth date are left out.
    """
    mine = [r for r in records if _text(r.patient_id) == value] or list(records)
    name = pick(mine, lambda r: r.patient_name)  # Patient.name <- (0010,0010)
    sex = pick(mine, lambda r: _text(r.patient_sex))  # Patient.gender <- (0010,0040)
    born = pick(mine, lambda r: parse_da(r.patient_birth_date or ""))  # Patient.birthDate <- (0010,0030)
    patient = Patient(
        identifier=[Identifier(system=system, value=value)],  # Patient.identifier <- (0010,0020) + issuer
        name=human_names(name),
        gender=_GENDER.get((sex or "").upper()),
        birth_date=born.isoformat() if born is not None else None,
    )
    return patient.to_fhir()


def endpoint_resource(url: str) -> dict[str, Any]:
    """The DICOMweb WADO-RS Endpoint for ``url`` (FHIR JSON, validated against the R4 model).

    Parameters
    ----------
    url:
        The WADO-RS base URL (``[endpoint] wado_rs_url``, already validated by the settings).
    """
    endpoint = Endpoint(
        identifier=[Identifier(system=URI_SYSTEM, value=url)],  # what we search it by
        status="active",
        connection_type=Coding(system=CONNECTION_TYPE_SYSTEM, code="dicom-wado-rs"),
        name="DICOMweb WADO-RS",
        payload_type=[CodeableConcept(text="DICOM WADO-RS")],  # as the R4 example Endpoint "example-wadors"
        payload_mime_type=["application/dicom"],
        address=url,
    )
    return endpoint.to_fhir()


def _carries(resource: Mapping[str, Any], system: str, value: str) -> bool:
    """Whether ``resource.identifier`` holds ``system|value`` (a backend might ignore a search argument)."""
    for ident in resource.get("identifier") or []:
        if isinstance(ident, Mapping) and ident.get("system") == system and ident.get("value") == value:
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
        ``[endpoint] wado_rs_url``.
    """

    def __init__(self, backend: LinkedBackend, url: str) -> None:
        self.backend = backend
        self.url = url
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
                created = await self.backend.create_resource("Endpoint", endpoint_resource(self.url))
                endpoint_id = str(created["id"])
                LOGGER.info("created Endpoint/%s for %s", endpoint_id, self.url)
            self._reference = f"Endpoint/{endpoint_id}"
            return self._reference


# --------------------------------------------------------------------------------------------------
# Wiring
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Links:
    """What :func:`prepare_links` gives the relay: the Endpoint reference and the subject hook."""

    endpoint_reference: str | None
    link: PatientResolver | None


async def prepare_links(
    settings: Settings, backend: LinkedBackend, *, metrics: Metrics | None = None
) -> Links:
    """Resolve the Endpoint and build the Patient resolver from ``[endpoint]`` and ``[patient]``.

    Call once at start, after the sink is connected; pass ``endpoint_reference`` to
    ``mapping_options(settings, endpoint_reference=...)`` and ``link`` to ``Relay(link=...)``.

    Parameters
    ----------
    settings:
        The settings (``[patient] mode``, ``[endpoint] wado_rs_url``).
    backend:
        The connected sink.
    metrics:
        Where Patient fallbacks are counted.

    Returns
    -------
    Links
        ``link`` is ``None`` in ``"logical"`` mode (nothing to resolve).

    Raises
    ------
    ConfigError
        The backend lacks the Patient or Endpoint operations the settings need.
    RetryableSinkError, PermanentSinkError
        Finding or creating the Endpoint failed.
    """
    link: PatientResolver | None = None
    if settings.patient.mode != "logical":
        link = PatientResolver(backend, settings.patient.mode, metrics=metrics)
        link.check()
    reference = None
    if settings.endpoint.wado_rs_url:
        reference = await EndpointResolver(backend, settings.endpoint.wado_rs_url).reference()
    return Links(endpoint_reference=reference, link=link)
