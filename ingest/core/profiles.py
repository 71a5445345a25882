"""The imaging profiles an ImagingStudy may follow, and the manifest Bundle of one study
(docs/mapping.md "Imaging profiles").

``[profile] name`` chooses the rules applied to the mapped ImagingStudy (FHIR JSON) before it is merged:

- ``base``: FHIR R4 ImagingStudy as docs/mapping.md maps it, plus series-level endpoints where a series
  is served by another WADO-RS service than the study (``[endpoint] series_wado_rs_urls``).
- ``smart-imaging``: the SMART Imaging Access "SMART ImagingStudy" profile: the Study Instance UID
  identifier, at least one ``modality`` (the series' modalities when none is an acquisition modality)
  and at least one WADO-RS ``endpoint``.
- ``mado``: the IHE MADO "MADO Imaging Study" profile: every series references the WADO-RS Endpoint(s)
  that serve it (``series.endpoint`` 1..*), every series lists its instances, ``procedureCode`` carries
  a text a person can read (invariant mado-reqproc-1), and ``basedOn`` names the order by its
  accession identifier.

:func:`manifest` builds the ``collection`` Bundle ``ingest replay --dry-run --bundle`` prints: the
ImagingStudy, its Patient and Endpoints, and, for ``mado``, the Device that created it (``ingest``),
the Organization it acts for (when configured) and a Provenance whose targets are all of them.

Pure: no I/O, no clock (the timestamp is passed in), no settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ingest.core.fhir import Bundle, ImagingStudy, ImagingStudySeries, Provenance, prune_empty
from ingest.core.linked import uuid_urn
from ingest.core.terminology import (
    PROVENANCE_PARTICIPANT_SYSTEM,
    STUDY_UID_SYSTEM,
    URI_SYSTEM,
    V2_0203_SYSTEM,
)

__all__ = [
    "MADO_BUNDLE_PROFILE",
    "MADO_IMAGING_STUDY_PROFILE",
    "PROFILE_URLS",
    "SMART_IMAGING_STUDY_PROFILE",
    "Linked",
    "ProfileName",
    "SeriesEndpoints",
    "apply_profile",
    "endpoint_placeholder",
    "manifest",
    "profile_problems",
    "series_sources",
]

ProfileName = Literal["base", "smart-imaging", "mado"]

#: SMART Imaging Access, "SMART ImagingStudy".
SMART_IMAGING_STUDY_PROFILE: Final = "http://fhir.org/argonaut/smart-imaging/StructureDefinition/smart-imaging-study"
#: IHE MADO, "MADO Imaging Study" and "MADO FHIR Imaging Study Manifest Bundle".
MADO_IMAGING_STUDY_PROFILE: Final = "https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoImagingStudy"
MADO_BUNDLE_PROFILE: Final = "https://profiles.ihe.net/RAD/MADO/StructureDefinition/MadoFhirBundle"
#: The ImagingStudy profile each name claims in ``meta.profile`` (in the manifest Bundle).
PROFILE_URLS: Final[Mapping[str, str]] = {
    "smart-imaging": SMART_IMAGING_STUDY_PROFILE,
    "mado": MADO_IMAGING_STUDY_PROFILE,
}


@dataclass(frozen=True)
class SeriesEndpoints:
    """Which WADO-RS Endpoint serves which series.

    Parameters
    ----------
    study:
        Reference to the study-level Endpoint (``[endpoint] wado_rs_url``), or ``None``.
    by_source:
        Calling AE title -> reference to the Endpoint of ``[endpoint] series_wado_rs_urls``.
    sources:
        Series Instance UID -> the calling AE titles its instances came from (empty for files).
    """

    study: str | None = None
    by_source: Mapping[str, str] = field(default_factory=dict)
    sources: Mapping[str, Collection[str]] = field(default_factory=dict)

    def of(self, series_uid: str, *, required: bool) -> list[str]:
        """The Endpoint references of one series (sorted, no duplicates).

        A series whose instances came from an AE with its own URL is served there; when some of its
        instances came from elsewhere, the study-level Endpoint serves those, so it is listed too.
        ``required`` (MADO: ``series.endpoint`` 1..*): a series without its own gets the study's.
        """
        came_from = set(self.sources.get(series_uid, ()))
        own = {self.by_source[ae] for ae in came_from if ae in self.by_source}
        if own and self.study is not None and (not came_from <= set(self.by_source)):
            own.add(self.study)
        if not own and required and self.study is not None:
            own.add(self.study)
        return sorted(own)


def _in_order(element: Mapping[str, Any], model: type[Any]) -> dict[str, Any]:
    """``element`` with its keys in the model's (the StructureDefinition's) order; unknown keys last."""
    order = [f.alias or name for name, f in model.model_fields.items()]
    rank = {key: i for i, key in enumerate(order)}
    return {k: element[k] for k in sorted(element, key=lambda k: rank.get(k, len(order)))}


def _codings(concept: Any) -> list[dict[str, Any]]:
    coding = concept.get("coding") if isinstance(concept, Mapping) else None
    return [c for c in coding if isinstance(c, dict)] if isinstance(coding, list) else []


def _accession(study: Mapping[str, Any]) -> dict[str, Any] | None:
    for ident in study.get("identifier") or []:
        if isinstance(ident, dict) and any(
            c.get("system") == V2_0203_SYSTEM and c.get("code") == "ACSN" for c in _codings(ident.get("type"))
        ):
            return ident
    return None


def apply_profile(
    study: Mapping[str, Any], profile: ProfileName, endpoints: SeriesEndpoints | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The mapped ImagingStudy with the rules of ``profile`` applied (a new dict).

    Parameters
    ----------
    study:
        ImagingStudy FHIR JSON from :func:`ingest.core.mapping.build_imaging_study`.
    profile:
        ``base``, ``smart-imaging`` or ``mado`` (module doc).
    endpoints:
        The Endpoint references; ``None``: the study's ``endpoint`` as mapped, no series endpoints.

    Returns
    -------
    tuple
        The resource, and warnings for the rules the data cannot meet (they name the rule and the
        series by UID; never patient data).
    """
    # a new top level and new series objects (the only levels written below); what lies deeper is
    # shared with ``study`` and never changed here (a deep copy of a study's instance lists cost more
    # than the whole rest of this function)
    out = dict(study)
    if isinstance(out.get("series"), list):
        out["series"] = [dict(s) if isinstance(s, dict) else s for s in out["series"]]
    warnings: list[str] = []
    mado = profile == "mado"
    if endpoints is not None:
        # ImagingStudy.endpoint <- [endpoint] wado_rs_url
        if endpoints.study is not None:
            out["endpoint"] = [{"reference": endpoints.study}]
        # ImagingStudy.series.endpoint <- [endpoint] series_wado_rs_urls by the series' calling AEs
        for series in out.get("series") or []:
            refs = endpoints.of(series.get("uid", ""), required=mado)
            if refs:
                series["endpoint"] = [{"reference": r} for r in refs]
    if profile == "smart-imaging" and not out.get("modality"):
        # SMART ImagingStudy: modality 1..*; a study of SR/KO/PR only lists its series' modalities
        seen: dict[tuple[Any, Any], dict[str, Any]] = {}
        for series in out.get("series") or []:
            m = series.get("modality")
            if isinstance(m, dict):
                seen.setdefault((m.get("system"), m.get("code")), m)
        if seen:
            out["modality"] = [seen[k] for k in sorted(seen, key=str)]
    if mado:
        # mado-reqproc-1: procedureCode.text or procedureCode.coding.display, shown to a person
        codes = [c for c in out.get("procedureCode") or [] if isinstance(c, dict)]
        readable = any(c.get("text") or any(x.get("display") for x in _codings(c)) for c in codes)
        if not readable and isinstance(out.get("description"), str):
            # <- Study Description (0008,1030), the procedure as the modality named it
            out["procedureCode"] = [*codes, {"text": out["description"]}]
        # MadoImagingStudy.basedOn[order]: the order, by its accession identifier
        accession = _accession(out)
        if accession is not None and not out.get("basedOn"):
            out["basedOn"] = [{"type": "ServiceRequest", "identifier": accession}]
    out["series"] = [_in_order(s, ImagingStudySeries) for s in out.get("series") or []] or None
    out = _in_order({k: v for k, v in out.items() if v is not None}, ImagingStudy)
    warnings.extend(profile_problems(out, profile))
    return out, warnings


def profile_problems(study: Mapping[str, Any], profile: ProfileName) -> list[str]:
    """What keeps ``study`` from meeting ``profile`` (``[]``: it meets every rule ``ingest`` checks)."""
    problems: list[str] = []
    if profile == "base":
        return problems
    uid_identifiers = [
        i
        for i in study.get("identifier") or []
        if isinstance(i, dict) and i.get("system") == STUDY_UID_SYSTEM
    ]
    if len(uid_identifiers) != 1:
        problems.append(f"{profile}: ImagingStudy.identifier needs exactly one Study Instance UID identifier")
    if not study.get("endpoint") and profile == "smart-imaging":
        problems.append(
            "smart-imaging: ImagingStudy.endpoint 1..*: no WADO-RS Endpoint ([endpoint] wado_rs_url)"
        )
    if profile == "smart-imaging" and not study.get("modality"):
        problems.append("smart-imaging: ImagingStudy.modality 1..*: no series has a modality")
    if profile == "mado":
        codes = [c for c in study.get("procedureCode") or [] if isinstance(c, dict)]
        if not any(c.get("text") or any(x.get("display") for x in _codings(c)) for c in codes):
            problems.append(
                "mado: mado-reqproc-1: no procedureCode text or display (no Procedure Code Sequence "
                "(0008,1032) with a meaning, no Study Description (0008,1030))"
            )
        accession = _accession(study)
        if accession is not None and not accession.get("system"):
            problems.append(
                "mado: the accession identifier needs a system (Issuer of Accession Number Sequence "
                "(0008,0051) with a Universal Entity ID, or [profile] issuer_systems)"
            )
        for series in study.get("series") or []:
            uid = series.get("uid")
            if not series.get("endpoint"):
                problems.append(f"mado: series {uid}: series.endpoint 1..*: no WADO-RS Endpoint serves it")
            if not series.get("instance"):
                problems.append(
                    f"mado: series {uid}: series.instance 1..*: no instance list "
                    "([mapping] include_instances = false)"
                )
    return problems


# --------------------------------------------------------------------------------------------------
# the manifest Bundle
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linked:
    """The resources a manifest carries besides the ImagingStudy (FHIR JSON, without ``id``).

    Parameters
    ----------
    patient:
        The study's Patient (``ImagingStudy.subject``), or ``None`` (no Patient ID).
    endpoints:
        WADO-RS base URL -> its Endpoint; the ImagingStudy references them as ``Endpoint/<url>``
        placeholders that :func:`manifest` turns into the entries' full URLs.
    device:
        ``ingest`` as the creator (MADO Creator); with ``organization``, what the Provenance names.
    organization:
        The Organization ``ingest`` acts for (``[profile] organization``), or ``None``.
    """

    patient: dict[str, Any] | None = None
    endpoints: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    device: dict[str, Any] | None = None
    organization: dict[str, Any] | None = None


def endpoint_placeholder(url: str) -> str:
    """The reference an ImagingStudy holds to the Endpoint of ``url`` before a manifest resolves it."""
    return f"Endpoint/{url}"


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def manifest(
    study: Mapping[str, Any],
    linked: Linked,
    *,
    profile: ProfileName,
    timestamp: str,
) -> dict[str, Any]:
    """The ``collection`` Bundle of one study (docs/mapping.md "Imaging profiles", "The manifest").

    Each entry has a ``urn:uuid:`` full URL, name-based on what the resource is (the study's UID, the
    Endpoint's URL, the patient identifier, the device name), and references between entries use them.
    ``mado`` adds the Device, the Organization (when given) and a Provenance (``target``: every other
    entry; ``agent``: ``assembler`` who = the Device, on behalf of the Organization; ``recorded`` =
    ``timestamp``) and claims the MADO profiles in ``meta.profile``.

    Parameters
    ----------
    study:
        The ImagingStudy after :func:`apply_profile`; its ``endpoint`` references are placeholders
        (:func:`endpoint_placeholder`) or already ``urn:uuid:`` references.
    linked:
        The Patient, Endpoints, Device and Organization.
    profile:
        The profile the ImagingStudy follows.
    timestamp:
        ``Bundle.timestamp`` and ``Provenance.recorded`` (FHIR instant; the caller's clock).

    Returns
    -------
    dict
        The Bundle, validated against ``ingest.core.fhir.Bundle`` (and each entry against its model).
    """
    uid = str(next(
        (i.get("value") for i in study.get("identifier") or [] if i.get("system") == STUDY_UID_SYSTEM),
        "",
    ))
    study_url = uuid_urn("ImagingStudy", uid)
    entries: list[dict[str, Any]] = []
    urls: dict[str, str] = {}  # placeholder reference -> full URL
    for address, endpoint in sorted(linked.endpoints.items()):
        full = uuid_urn("Endpoint", address)
        urls[endpoint_placeholder(address)] = full
        entries.append({"fullUrl": full, "resource": endpoint})
    resolved = json.loads(json.dumps(study))  # a deep copy whose references are replaced below
    resolved.pop("id", None)
    resolved.pop("meta", None)
    for holder in [resolved, *(s for s in resolved.get("series") or [])]:
        for ref in holder.get("endpoint") or []:
            if isinstance(ref, dict) and ref.get("reference") in urls:
                ref["reference"] = urls[ref["reference"]]
    if profile in PROFILE_URLS:  # meta first, after resourceType
        resolved = {"resourceType": "ImagingStudy", "meta": {"profile": [PROFILE_URLS[profile]]}, **resolved}
    patient_entry: dict[str, Any] | None = None
    if linked.patient is not None:
        ident = (linked.patient.get("identifier") or [{}])[0]
        patient_url = uuid_urn("Patient", str(ident.get("system")), str(ident.get("value")))
        # ImagingStudy.subject -> the Patient entry (the logical identifier and display are kept)
        subject = {k: v for k, v in (resolved.get("subject") or {}).items() if k != "reference"}
        resolved["subject"] = {"reference": patient_url, **subject, "type": "Patient"}
        patient_entry = {"fullUrl": patient_url, "resource": linked.patient}
    entries.insert(0, {"fullUrl": study_url, "resource": resolved})
    if patient_entry is not None:
        entries.insert(1, patient_entry)

    if profile == "mado" and linked.device is not None:
        org_url: str | None = None
        if linked.organization is not None:
            org_url = uuid_urn("Organization", _digest(linked.organization.get("identifier")))
        device_url = uuid_urn("Device", _digest(linked.device.get("identifier")))
        device = dict(linked.device)
        if org_url is not None:
            device["owner"] = {"reference": org_url, "type": "Organization"}
        entries.append({"fullUrl": device_url, "resource": device})
        if org_url is not None:
            entries.append({"fullUrl": org_url, "resource": linked.organization})
        targets = [{"reference": e["fullUrl"]} for e in entries]
        agent: dict[str, Any] = {
            # Provenance.agent[mado-creator]: assembler, who = the MADO Creator Device
            "type": {"coding": [{"system": PROVENANCE_PARTICIPANT_SYSTEM, "code": "assembler",
                                 "display": "Assembler"}]},
            "who": {"reference": device_url, "type": "Device"},
        }
        if org_url is not None:
            agent["onBehalfOf"] = {"reference": org_url, "type": "Organization"}
        provenance = Provenance.model_validate(
            {"resourceType": "Provenance", "target": targets, "recorded": timestamp, "agent": [agent]}
        ).to_fhir()
        provenance_url = uuid_urn("Provenance", study_url, _digest(targets))
        entries.append({"fullUrl": provenance_url, "resource": provenance})

    content = _digest([e["resource"] for e in entries])
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "meta": {"profile": [MADO_BUNDLE_PROFILE]} if profile == "mado" else None,
        # Bundle.identifier: name-based on the study and the content, so an equal manifest has an equal id
        "identifier": {"system": URI_SYSTEM, "value": uuid_urn("manifest", study_url, content)},
        "type": "collection",
        "timestamp": timestamp,
        "entry": entries,
    }
    return Bundle.model_validate(prune_empty(bundle)).to_fhir()


def series_sources(pairs: Sequence[tuple[str, str]]) -> dict[str, set[str]]:
    """``(series UID, instance source)`` pairs -> series UID -> the calling AE titles (``dimse:<AE>``
    sources; files and replays have none)."""
    out: dict[str, set[str]] = {}
    for series_uid, source in pairs:
        if source.startswith("dimse:"):
            out.setdefault(series_uid, set()).add(source.removeprefix("dimse:"))
    return out
