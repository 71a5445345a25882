"""Merge our ImagingStudy with the backend's copy, and decide what to write (docs/mapping.md, "Merge").

Everything here works on FHIR JSON dicts rather than on :mod:`ingest.core.fhir` models: the backend's
copy may carry elements we do not model (extensions on primitives, newer elements, server additions),
and all of those must survive a merge untouched.

- :func:`merge` takes the elements the pipeline owns from ours and keeps everything else of theirs;
  with ``narrative=True`` it attaches our generated narrative (docs/mapping.md, "Narrative").
- :func:`digest` fingerprints a resource independently of key order and of series/instance order.
- :func:`plan` turns (ours, backend copy) into :class:`Create`, :class:`Update` or :class:`NoChange`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from ingest.core.fhir import ImagingStudy, ImagingStudySeries, ImagingStudySeriesInstance, prune_empty
from ingest.core.mapping import ACSN_SYSTEM, STUDY_UID_SYSTEM
from ingest.core.narrative import is_ingest_narrative
from ingest.core.narrative import narrative as generated_narrative
from ingest.core.records import BackendStudy

__all__ = ["Create", "NoChange", "Plan", "Update", "digest", "merge", "plan"]


# ImagingStudy elements the pipeline recomputes on every push; ours replaces theirs, and an element
# absent from ours is absent from the result. (identifier, subject, status, endpoint, series and the
# counts follow their own rules below.)
_OWNED_ALWAYS = (
    "modality",  # ImagingStudy.modality <- (0008,0060) of the series
    "started",  # ImagingStudy.started <- (0008,0020) + (0008,0030) + (0008,0201)
    "description",  # ImagingStudy.description <- (0008,1030)
    "referrer",  # ImagingStudy.referrer <- (0008,0090)
    "interpreter",  # ImagingStudy.interpreter <- (0008,1060)
    "procedureCode",  # ImagingStudy.procedureCode <- (0008,1032)
    "reasonCode",  # ImagingStudy.reasonCode <- (0040,1002) / (0040,100A)
)
# Status values a backend may hold that the pipeline may overwrite (never cancelled/entered-in-error).
_STATUS_OVERWRITABLE = frozenset({"registered", "available", "unknown"})
# Elements that are not part of the content a digest compares.
_NOT_DIGESTED = ("id", "meta", "text")


def _element_order(model: type[Any]) -> tuple[str, ...]:
    return tuple(field.alias or name for name, field in model.model_fields.items())


_STUDY_ORDER = _element_order(ImagingStudy)
_SERIES_ORDER = _element_order(ImagingStudySeries)
_INSTANCE_ORDER = _element_order(ImagingStudySeriesInstance)


# --------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoChange:
    """The backend already holds exactly what we would write."""

    backend_id: str
    version_id: str | None


@dataclass(frozen=True)
class Create:
    """No backend copy exists: create ``resource``."""

    resource: dict[str, Any]


@dataclass(frozen=True)
class Update:
    """Replace the backend resource ``backend_id`` with ``resource`` (its ``id`` already set)."""

    backend_id: str
    resource: dict[str, Any]


Plan: TypeAlias = NoChange | Create | Update


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _clean(resource: Mapping[str, Any] | None) -> dict[str, Any]:
    """A pruned deep copy (no ``null``/``""``/``[]``/``{}``); GraphQL reads return ``null`` for absent."""
    if resource is None:
        return {}
    cleaned = prune_empty(resource)
    return dict(cleaned) if isinstance(cleaned, Mapping) else {}


def _dicts(value: Any) -> list[dict[str, Any]]:
    """The items of a JSON array that are objects (anything else is kept out of keyed merges)."""
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def _ordered(element: Mapping[str, Any], order: Sequence[str]) -> dict[str, Any]:
    """``element`` with known keys in FHIR element order, unknown keys after them as they came."""
    known = {key: element[key] for key in order if key in element}
    return known | {key: value for key, value in element.items() if key not in known}


def _is_study_uid_identifier(identifier: Mapping[str, Any]) -> bool:
    # ImagingStudy.identifier with system urn:dicom:uid <- Study Instance UID (0020,000D)
    return identifier.get("system") == STUDY_UID_SYSTEM


def _is_accession_identifier(identifier: Mapping[str, Any]) -> bool:
    # ImagingStudy.identifier with type v2-0203#ACSN <- Accession Number (0008,0050)
    type_ = identifier.get("type")
    codings = _dicts(type_.get("coding")) if isinstance(type_, Mapping) else []
    return any(c.get("system") == ACSN_SYSTEM and c.get("code") == "ACSN" for c in codings)


def _is_owned_identifier(identifier: Mapping[str, Any]) -> bool:
    return _is_study_uid_identifier(identifier) or _is_accession_identifier(identifier)


def _merge_identifiers(ours: list[Any], theirs: list[Any]) -> list[Any]:
    """Our study-UID and ACSN identifiers replace theirs; every other identifier is kept (union)."""
    result = [i for i in ours if isinstance(i, dict) and _is_owned_identifier(i)]
    result += [i for i in theirs if not (isinstance(i, dict) and _is_owned_identifier(i))]
    seen = {(i.get("system"), i.get("value")) for i in result if isinstance(i, dict)}
    for identifier in ours:
        if isinstance(identifier, dict) and not _is_owned_identifier(identifier):
            key = (identifier.get("system"), identifier.get("value"))
            if key not in seen:
                seen.add(key)
                result.append(identifier)
    return result


def _merge_by_uid(
    ours: list[Any], theirs: list[Any], order: Sequence[str]
) -> tuple[list[dict[str, Any]], set[str]]:
    """Union of two arrays of ``{uid, ...}`` objects.

    Ours come first in our order, then theirs that we do not have, in their order. For a UID both
    have, our fields win and theirs' other fields are kept. Returns the merged list and the UIDs that
    only theirs has.
    """
    theirs_by_uid = {item["uid"]: item for item in _dicts(theirs) if isinstance(item.get("uid"), str)}
    ours_uids = {item.get("uid") for item in _dicts(ours)}
    merged = [_ordered(theirs_by_uid.get(item.get("uid"), {}) | item, order) for item in _dicts(ours)]
    foreign = [item for item in _dicts(theirs) if item.get("uid") not in ours_uids]
    foreign_uids = {item["uid"] for item in foreign if isinstance(item.get("uid"), str)}
    return merged + foreign, foreign_uids


def _merge_series(ours: list[Any], theirs: list[Any]) -> tuple[list[dict[str, Any]], set[str]]:
    """ImagingStudy.series merged by uid, instances by uid, ``numberOfInstances`` recomputed."""
    theirs_by_uid = {s["uid"]: s for s in _dicts(theirs) if isinstance(s.get("uid"), str)}
    series, foreign_uids = _merge_by_uid(ours, theirs, _SERIES_ORDER)
    ours_by_uid = {s.get("uid"): s for s in _dicts(ours)}
    result = []
    for merged in series:
        uid = merged.get("uid")
        our_series = ours_by_uid.get(uid)
        if our_series is not None and "instance" in our_series:
            their_instances = theirs_by_uid.get(uid, {}).get("instance", [])
            instances, _ = _merge_by_uid(our_series["instance"], their_instances, _INSTANCE_ORDER)
            merged["instance"] = instances
        if our_series is not None and "instance" not in our_series:
            # include_instances = false: our count is exact; theirs' list (if any) is left as it was.
            if "numberOfInstances" in our_series:
                merged["numberOfInstances"] = our_series["numberOfInstances"]
        elif isinstance(merged.get("instance"), list):
            # ImagingStudy.series.numberOfInstances = the instances present
            merged["numberOfInstances"] = len(merged["instance"])
        result.append(_ordered(merged, _SERIES_ORDER))
    return result, foreign_uids


def _coding_key(coding: Any) -> tuple[Any, Any]:
    return (coding.get("system"), coding.get("code")) if isinstance(coding, Mapping) else (None, coding)


def _merge_modality(
    ours: list[Any], theirs: list[Any], series: Iterable[Mapping[str, Any]], foreign_uids: set[str]
) -> list[Any]:
    """Our ImagingStudy.modality, plus theirs' codings that belong to series only theirs has."""
    foreign_codes = {
        _coding_key(s.get("modality")) for s in series if s.get("uid") in foreign_uids and "modality" in s
    }
    result = list(ours)
    present = {_coding_key(c) for c in result}
    for coding in theirs:
        key = _coding_key(coding)
        if key in foreign_codes and key not in present:
            present.add(key)
            result.append(coding)
    return result


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def merge(
    ours: Mapping[str, Any], theirs: Mapping[str, Any] | None, *, narrative: bool = False
) -> dict[str, Any]:
    """Merge our ImagingStudy into the backend's copy, per docs/mapping.md "Merge".

    Parameters
    ----------
    ours:
        FHIR JSON of the ImagingStudy the mapping built from everything we know of the study.
    theirs:
        FHIR JSON of the backend's copy, or ``None`` when there is none. ``null`` and empty values in
        it are ignored (a GraphQL read returns ``null`` for absent elements).
    narrative:
        ``[mapping] narrative`` (``MappingOptions.narrative``): attach our generated ``text``.

    Returns
    -------
    dict[str, Any]
        A new FHIR JSON dict (the inputs are not modified):

        - ``identifier``: our ``urn:dicom:uid`` and ACSN identifiers replace theirs; identifiers of
          other systems from both sides are kept.
        - ``modality``, ``started``, ``description``, ``referrer``, ``interpreter``,
          ``procedureCode``, ``reasonCode``: ours (absent in ours means absent), except that
          ``modality`` keeps theirs' codings of series only theirs has.
        - ``endpoint``: ours when ours has one, else theirs.
        - ``subject``: ours, except that a literal ``reference`` on theirs is never replaced by a
          logical one (theirs is kept then); theirs when ours has none.
        - ``status``: ours when theirs has none or ``registered``/``available``/``unknown``; a
          ``cancelled`` or ``entered-in-error`` on theirs is kept.
        - ``series`` and ``series.instance``: union by ``uid``; our fields win, theirs' other fields
          are kept. ``series.numberOfInstances`` is the length of the merged instance list, or our
          count when ours carries no instance list (``include_instances = false``).
        - ``numberOfSeries`` / ``numberOfInstances``: recomputed over the merged series.
        - ``id``: theirs (ours only without a backend copy); ``meta`` is dropped.
        - ``text``: with ``narrative``, :func:`ingest.core.narrative.narrative` of the merged
          result, unless theirs is a narrative someone else wrote (any status but ``generated``,
          or ``generated`` without our marker), which is kept; without ``narrative``, a
          narrative of ours on theirs is removed (it would go stale), any other is kept.
        - Everything else: theirs when theirs has it, else ours.
    """
    our = _clean(ours)
    their = _clean(theirs)
    result: dict[str, Any] = {**our, **their}  # not owned: theirs wins, ours fills gaps
    result["resourceType"] = "ImagingStudy"
    result.pop("meta", None)
    if "id" not in their:
        result.pop("id", None)
        if "id" in our:
            result["id"] = our["id"]

    # ImagingStudy.identifier
    identifiers = _merge_identifiers(our.get("identifier", []), their.get("identifier", []))
    if identifiers:
        result["identifier"] = identifiers

    # owned elements: ours, or nothing
    for key in _OWNED_ALWAYS:
        result.pop(key, None)
        if key in our:
            result[key] = our[key]

    # ImagingStudy.endpoint: configured on our side, or kept
    if "endpoint" in our:
        result["endpoint"] = our["endpoint"]

    # ImagingStudy.subject: never replace a literal reference with a logical one
    our_subject, their_subject = our.get("subject"), their.get("subject")
    if our_subject is not None:
        their_literal = isinstance(their_subject, Mapping) and "reference" in their_subject
        our_literal = isinstance(our_subject, Mapping) and "reference" in our_subject
        result["subject"] = their_subject if their_literal and not our_literal else our_subject

    # ImagingStudy.status: never overwrite cancelled / entered-in-error
    their_status = their.get("status")
    if "status" in our and (their_status is None or their_status in _STATUS_OVERWRITABLE):
        result["status"] = our["status"]

    # ImagingStudy.series (+ instances), then the counts over the merged result
    series, foreign_uids = _merge_series(our.get("series", []), their.get("series", []))
    if series:
        result["series"] = series
        result["numberOfSeries"] = len(series)
        counts = [s["numberOfInstances"] for s in series if isinstance(s.get("numberOfInstances"), int)]
        result["numberOfInstances"] = sum(counts)
        if "modality" in our or "modality" in their:
            modality = _merge_modality(
                our.get("modality", []), their.get("modality", []), series, foreign_uids
            )
            if modality:
                result["modality"] = modality
    else:
        for key in ("numberOfSeries", "numberOfInstances"):
            result.pop(key, None)
            if key in our:
                result[key] = our[key]

    # ImagingStudy.text (docs/mapping.md, "Narrative"): ours, recomputed from the merged result; one
    # someone else wrote (another status, or generated without our marker) is kept as it is
    their_text = their.get("text")
    if their_text is None or is_ingest_narrative(their_text):
        if narrative:
            result["text"] = generated_narrative(result)
        elif their_text is not None:
            result.pop("text")  # switched off: a narrative of ours would go stale

    return _ordered(result, ("resourceType", *_STUDY_ORDER))


def _canonical(resource: Mapping[str, Any]) -> Any:
    """The content a digest covers: no id/meta/text, no empties, series and instances sorted by uid."""
    content = _clean({k: v for k, v in resource.items() if k not in _NOT_DIGESTED})
    series = content.get("series")
    if isinstance(series, list):
        normalised = []
        for item in series:
            if isinstance(item, dict) and isinstance(item.get("instance"), list):
                item = {**item, "instance": sorted(item["instance"], key=_uid_sort_key)}
            normalised.append(item)
        content["series"] = sorted(normalised, key=_uid_sort_key)
    return content


def _uid_sort_key(item: Any) -> tuple[str, str]:
    if isinstance(item, Mapping) and isinstance(item.get("uid"), str):
        return (item["uid"], "")
    return ("\uffff", json.dumps(item, sort_keys=True, ensure_ascii=False))  # malformed items last, stable


def digest(resource: Mapping[str, Any]) -> str:
    """Fingerprint of an ImagingStudy's content, stable across backends.

    Parameters
    ----------
    resource:
        FHIR JSON of an ImagingStudy.

    Returns
    -------
    str
        Hex SHA-256 of the canonical JSON (sorted keys, no whitespace, UTF-8) of the resource without
        ``id``, ``meta`` and ``text``, with empty values removed and ``series`` / ``series.instance``
        sorted by ``uid``; so key order and series/instance order (which a backend such as Medplum may
        change) do not matter, while the order of every other array does.
    """
    canonical = json.dumps(_canonical(resource), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def plan(ours: Mapping[str, Any], backend: BackendStudy | None, *, narrative: bool = False) -> Plan:
    """Decide the write for one study.

    Parameters
    ----------
    ours:
        FHIR JSON of the ImagingStudy built from everything we know of the study.
    backend:
        The backend's copy (from ``Sink.find``), or ``None`` when it holds none.
    narrative:
        ``[mapping] narrative`` (``MappingOptions.narrative``), passed to :func:`merge`. The
        narrative is not digested: it never makes a write by itself.

    Returns
    -------
    Plan
        :class:`Create` with ``merge(ours, None)`` (ours without ``meta``, empties removed) when there
        is no backend copy; :class:`NoChange` when the merged result has the same :func:`digest` as
        the backend copy; else :class:`Update` with the merged result and ``id`` = the backend id.
    """
    if backend is None:
        return Create(merge(ours, None, narrative=narrative))
    merged = merge(ours, backend.resource, narrative=narrative)
    if digest(merged) == digest(backend.resource):
        return NoChange(backend.id, backend.version_id)
    body = {k: v for k, v in merged.items() if k not in ("resourceType", "id")}
    return Update(backend.id, {"resourceType": "ImagingStudy", "id": backend.id, **body})
