"""Merge our ImagingStudy with the backend's copy, and decide what to write (docs/mapping.md, "Merge").

Everything here works on FHIR JSON dicts rather than on :mod:`ingest.core.fhir` models: the backend's
copy may carry elements we do not model (extensions on primitives, newer elements, server additions),
and all of those must survive a merge untouched.

- :func:`merge` takes the elements the pipeline owns from ours and keeps everything else of theirs;
  with ``narrative=True`` it attaches our generated narrative (docs/mapping.md, "Narrative").
- :func:`digest` fingerprints a resource independently of key order and of series/instance order.
- :func:`plan` turns (ours, backend copy) into :class:`Create`, :class:`Update`, :class:`NoChange`, or
  :class:`Refuse` (the subject guard).

With :class:`Written` (what ``ingest`` built at its last write, kept by the state store) the merge tells
"ours" from "theirs" for every owned value: a value equal to what ``ingest`` wrote before is ours and is
replaced by (or removed with) today's; anything else on the backend copy was put there by another writer
and is kept (docs/mapping.md, "The lifecycle of a study"). Without that record (a fresh data dir, another
node's store, a study written by an older version) nothing on the backend copy is known to be ours: every
value the mapping does not produce now is another writer's and is kept.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from ingest.core.fhir import ImagingStudy, ImagingStudySeries, ImagingStudySeriesInstance, prune_empty
from ingest.core.lifecycle import WITHDRAWN_KEY, withdraw
from ingest.core.narrative import is_ingest_narrative
from ingest.core.narrative import narrative as generated_narrative
from ingest.core.records import BackendStudy
from ingest.core.terminology import STUDY_UID_SYSTEM, V2_0203_SYSTEM

__all__ = [
    "Create",
    "NoChange",
    "Plan",
    "Refuse",
    "Update",
    "Written",
    "digest",
    "merge",
    "plan",
    "subject_conflict",
]


# ImagingStudy elements the pipeline recomputes on every push: ours replaces theirs; without ours, theirs
# is removed only when it is what ingest wrote last time (_owned_element). (identifier, subject, status,
# endpoint, series and the counts follow their own rules below.)
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
# Resource.meta elements a client sets (FHIR R4 Meta); the rest of meta is the server's.
_CLIENT_META = ("profile", "security", "tag")
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


@dataclass(frozen=True)
class Refuse:
    """Writing would overwrite another writer's change: dead-letter the study with ``reason``."""

    reason: str
    message: str


Plan: TypeAlias = NoChange | Create | Update | Refuse


@dataclass(frozen=True)
class Written:
    """What ``ingest`` wrote last time, from the state store.

    Attributes
    ----------
    ours:
        The ImagingStudy the mapping built for that write (FHIR JSON, before the merge): ingest's own
        values as they were then.
    subject:
        ``ImagingStudy.subject`` as the written resource carried it (the merge may have kept a literal
        reference another writer set); ``None`` when unknown.
    """

    ours: Mapping[str, Any]
    subject: Mapping[str, Any] | None = None


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
    return any(c.get("system") == V2_0203_SYSTEM and c.get("code") == "ACSN" for c in codings)


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


def _same(a: Any, b: Any) -> bool:
    """Equal as FHIR JSON (key order and empty values do not matter)."""
    return bool(_canonical_value(a) == _canonical_value(b))


def _canonical_value(value: Any) -> Any:
    cleaned = prune_empty(value) if isinstance(value, Mapping | list) else value
    return json.dumps(cleaned, sort_keys=True, ensure_ascii=False, default=str)


def _keep_theirs_list(ours: list[Any], theirs: list[Any], before: list[Any]) -> list[Any]:
    """An owned list: ours, then theirs' items that are neither ours now nor ours before."""
    result = list(ours)
    for item in theirs:
        if any(_same(item, o) for o in result):
            continue
        if not any(_same(item, b) for b in before):
            result.append(item)
    return result


def _owned_element(
    key: str, our: Mapping[str, Any], their: Mapping[str, Any], before: Mapping[str, Any]
) -> Any:
    """An owned element of a study, series or instance; ``None`` to leave it out.

    ``before`` is what ``ingest`` wrote last time for this study, series or instance (``{}`` when
    nothing of it is known to be ours). Ours when we have it (a list: plus theirs' items that were
    never ours); without ours, theirs unless it is what we wrote before (another writer's value stays).
    """
    mine, yours = our.get(key), their.get(key)
    was = before.get(key)
    if isinstance(mine, list) and isinstance(yours, list):
        return _keep_theirs_list(mine, yours, was if isinstance(was, list) else [])
    if mine is not None:
        return mine
    if yours is None or _same(yours, was):
        return None
    return yours


def _target(reference: Any) -> tuple[Any, ...] | None:
    """What a logical reference names: (type, identifier type codes, system, value); ``None`` for a
    reference without an identifier."""
    if not isinstance(reference, Mapping) or not isinstance(reference.get("identifier"), Mapping):
        return None
    ident = reference["identifier"]
    codings = ident.get("type", {}).get("coding", []) if isinstance(ident.get("type"), Mapping) else []
    codes = tuple(sorted(str(c.get("code")) for c in codings if isinstance(c, Mapping)))
    return (reference.get("type"), codes, ident.get("system"), ident.get("value"))


def _merge_references(our: Any, their: Any, was: Any) -> list[Any] | None:
    """``basedOn`` (docs/mapping.md "Order, visit, referrer"): ours, plus another writer's references.

    A reference of theirs that ``ingest`` wrote before, or that names the same target (type and
    identifier) as one of ours, is ours: replaced by today's (a logical one by its literal one once
    resolved). Only when theirs is literal and ours for that target is still logical is theirs kept
    instead (someone linked it; never downgraded). Everything else of theirs stays.
    """
    mine = list(our) if isinstance(our, list) else []
    yours = list(their) if isinstance(their, list) else []
    before = list(was) if isinstance(was, list) else []
    targets = {_target(r): i for i, r in enumerate(mine) if _target(r) is not None}
    result = list(mine)
    for item in yours:
        if any(_same(item, b) for b in before):
            continue  # ours from the last write
        target = _target(item)
        if target is not None and target in targets:
            index = targets[target]
            if isinstance(item, Mapping) and item.get("reference") and not result[index].get("reference"):
                result[index] = item
            continue
        if not any(_same(item, r) for r in result):
            result.append(item)
    return result or None


def _merge_reference(our: Any, their: Any, was: Any) -> Any:
    """``encounter`` (a single reference): ours replaces theirs when theirs is what ``ingest`` wrote
    before or names the same target (unless theirs is literal and ours still logical); any other
    reference of theirs is another writer's and stays. Without ours, theirs unless it was ours."""
    if their is None:
        return our
    if our is None:
        return None if _same(their, was) else their
    if _same(their, was):
        return our
    if _target(their) is not None and _target(their) == _target(our):
        return their if their.get("reference") and not our.get("reference") else our
    return their


def _merge_element(
    our: Mapping[str, Any], their: Mapping[str, Any], before: Mapping[str, Any], skip: Iterable[str]
) -> dict[str, Any]:
    """A series or an instance both sides have: theirs' other elements kept, owned ones by
    :func:`_owned_element` (an element ours had before and has no more is removed)."""
    skipped = set(skip)
    result = {k: v for k, v in their.items() if k not in skipped}
    for key in {*our, *their} - skipped:
        if key not in our and key not in before:
            continue  # never ours: theirs as it is
        value = _owned_element(key, our, their, before)
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def _merge_with_before(
    ours: list[Any], theirs: list[Any], before: list[Any], order: Sequence[str], nested: str | None
) -> tuple[list[dict[str, Any]], set[str]]:
    """Series (``nested="instance"``) or instances merged by uid with what ingest wrote before.

    Ours first; theirs that only they have, unless ingest wrote that uid before (it is no longer ours:
    removed). A uid ``before`` does not hold was never written by ``ingest``: everything theirs holds
    under it is another writer's. Returns the list and the uids only theirs has.
    """
    theirs_by_uid = {i["uid"]: i for i in _dicts(theirs) if isinstance(i.get("uid"), str)}
    before_by_uid = {i["uid"]: i for i in _dicts(before) if isinstance(i.get("uid"), str)}
    ours_uids = {i.get("uid") for i in _dicts(ours)}
    merged: list[dict[str, Any]] = []
    for item in _dicts(ours):
        uid = item.get("uid")
        their_item = theirs_by_uid.get(uid, {})
        was = (before_by_uid.get(uid) if isinstance(uid, str) else None) or {}
        skip = (nested,) if nested else ()
        element = _merge_element(item, their_item, was, skip)
        if nested is not None:
            if nested in item:
                inner, _ = _merge_with_before(
                    item[nested], their_item.get(nested, []), was.get(nested, []),
                    _INSTANCE_ORDER, None,
                )
                element[nested] = inner
            elif nested in their_item:
                element[nested] = their_item[nested]
        merged.append(_ordered(element, order))
    foreign = [
        i for i in _dicts(theirs) if i.get("uid") not in ours_uids and i.get("uid") not in before_by_uid
    ]
    return merged + foreign, {i["uid"] for i in foreign if isinstance(i.get("uid"), str)}


def _merge_series_with_before(
    ours: list[Any], theirs: list[Any], before: list[Any]
) -> tuple[list[dict[str, Any]], set[str]]:
    series, foreign = _merge_with_before(ours, theirs, before, _SERIES_ORDER, "instance")
    ours_by_uid = {s.get("uid"): s for s in _dicts(ours)}
    for merged in series:
        mine = ours_by_uid.get(merged.get("uid"))
        if mine is not None and "instance" not in mine:
            if "numberOfInstances" in mine:  # include_instances = false: our count is exact
                merged["numberOfInstances"] = mine["numberOfInstances"]
        elif isinstance(merged.get("instance"), list):
            merged["numberOfInstances"] = len(merged["instance"])
    return series, foreign


def _merge_identifiers_with_before(ours: list[Any], theirs: list[Any], before: list[Any]) -> list[Any]:
    """Our study-UID and ACSN identifiers replace theirs; theirs that we wrote before and no longer have
    (a corrected Study ID) go; every other identifier is kept."""
    kept_theirs = [
        i for i in theirs
        if not (isinstance(i, dict) and _is_owned_identifier(i)) and not any(_same(i, b) for b in before)
    ]
    return _merge_identifiers(ours, kept_theirs)


def _patient(subject: Any) -> Any:
    """Who a subject names: its identifier (Patient ID and issuer), else its reference."""
    if not isinstance(subject, Mapping):
        return subject
    return subject.get("identifier") or subject.get("reference") or subject


def subject_conflict(
    ours: Mapping[str, Any], theirs: Mapping[str, Any] | None, before: Written | None
) -> str | None:
    """Why the subject cannot be written, or ``None``: ``ingest``'s subject changed (a corrected Patient
    ID) while another writer changed the backend's ``subject`` since ``ingest`` last wrote it."""
    if before is None or before.subject is None or theirs is None:
        return None
    their_subject, our_subject = theirs.get("subject"), ours.get("subject")
    if their_subject is None or our_subject is None or _names_nobody(our_subject):
        return None  # ours naming no patient never replaces theirs (_subject): nothing to refuse
    other_changed = not _same(their_subject, before.subject)
    ours_changed = not _same(_patient(our_subject), _patient(before.ours.get("subject")))
    if other_changed and ours_changed:
        return (
            "ImagingStudy.subject was changed by another writer since ingest last wrote it, and the "
            "study's Patient ID has changed since; not overwritten"
        )
    return None


def _names_nobody(subject: Any) -> bool:
    """A subject with neither a literal reference nor an identifier (display or data-absent-reason only)."""
    return not (isinstance(subject, Mapping) and ("reference" in subject or "identifier" in subject))


def _subject(
    our: Mapping[str, Any], their: Mapping[str, Any], before: Written | None
) -> Mapping[str, Any] | None:
    our_subject, their_subject = our.get("subject"), their.get("subject")
    if our_subject is None or (_names_nobody(our_subject) and not _names_nobody(their_subject)):
        return their_subject  # ours names no patient (no Patient ID): a subject that names one stays
    if before is not None and before.subject is not None and their_subject is not None:
        if not _same(_patient(our_subject), _patient(before.ours.get("subject"))):
            return our_subject  # type: ignore[no-any-return]  # a corrected Patient ID moves it
        if not _same(their_subject, before.subject):
            return their_subject  # type: ignore[no-any-return]  # another writer's subject stays
    their_literal = isinstance(their_subject, Mapping) and "reference" in their_subject
    our_literal = isinstance(our_subject, Mapping) and "reference" in our_subject
    return their_subject if their_literal and not our_literal else our_subject


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def merge(
    ours: Mapping[str, Any],
    theirs: Mapping[str, Any] | None,
    *,
    narrative: bool = False,
    before: Written | None = None,
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
    before:
        What ``ingest`` built at its last write (:class:`Written`), if known. With it, an owned value
        equal to what was written before is ours (replaced by today's, or removed when today has none),
        any other is another writer's and is kept: list items (an ``interpreter``, a ``modality``
        coding, an identifier), elements of our series and instances, and series or instances only
        they have. A series or instance ``ingest`` wrote before and no longer has is removed.
        ``None`` (no record: a fresh data dir, another node, an older version's write): nothing on
        the backend copy is known to be ours, so every value the mapping does not produce now is kept
        (a single value ours has still replaces theirs).

    Returns
    -------
    dict[str, Any]
        A new FHIR JSON dict (the inputs are not modified):

        - ``identifier``: our ``urn:dicom:uid`` and ACSN identifiers replace theirs; identifiers of
          other systems from both sides are kept.
        - ``modality``, ``started``, ``description``, ``referrer``, ``interpreter``,
          ``procedureCode``, ``reasonCode``: ours; a list plus theirs' items that were not ours
          before; without ours, theirs unless it is what ``ingest`` wrote before.
        - ``endpoint``: ours when ours has one (plus theirs' references that were not ours before),
          else theirs.
        - ``subject``: ours, except that a literal ``reference`` on theirs is never replaced by a
          logical one (theirs is kept then); theirs when ours has none.
        - ``status``: ours when theirs has none or ``registered``/``available``/``unknown``; a
          ``cancelled`` or ``entered-in-error`` on theirs is kept.
        - ``series`` and ``series.instance``: union by ``uid`` (less those ``ingest`` wrote before and
          no longer has); their owned elements as at the study level, theirs' other fields kept.
          ``series.numberOfInstances`` is the length of the merged instance list, or our
          count when ours carries no instance list (``include_instances = false``).
        - ``numberOfSeries`` / ``numberOfInstances``: recomputed over the merged series.
        - ``id``: theirs (ours only without a backend copy); ``meta`` keeps theirs' ``tag``,
          ``security`` and ``profile`` only (the rest is the server's).
        - ``text``: with ``narrative``, :func:`ingest.core.narrative.narrative` of the merged
          result, unless theirs is a narrative someone else wrote (any status but ``generated``,
          or ``generated`` without our marker), which is kept; without ``narrative``, a
          narrative of ours on theirs is removed (it would go stale), any other is kept.
        - Everything else: theirs when theirs has it, else ours.
    """
    our = _clean(ours)
    their = _clean(theirs)
    # what ours says the backend copy loses (rejected instances, notes; ingest.core.lifecycle)
    withdrawn = our.pop(WITHDRAWN_KEY, None)
    if withdrawn is not None:
        their = withdraw(their, withdrawn)
    result: dict[str, Any] = {**our, **their}  # not owned: theirs wins, ours fills gaps
    result["resourceType"] = "ImagingStudy"
    result.pop("meta", None)
    # Resource.meta: the server's bookkeeping goes; the labels other writers set (tag, security, profile)
    # are content and stay
    their_meta = their.get("meta")
    if isinstance(their_meta, Mapping):
        labels = {k: their_meta[k] for k in _CLIENT_META if k in their_meta}
        if labels:
            result["meta"] = labels
    if "id" not in their:
        result.pop("id", None)
        if "id" in our:
            result["id"] = our["id"]

    # What ingest wrote last time. Without a record of it (a fresh data dir, another node's state store,
    # a study written by an older version) nothing on the backend copy is known to be ours: every value
    # the mapping does not produce now is another writer's and stays.
    was = _clean(before.ours) if before is not None else {}

    # ImagingStudy.identifier
    identifiers = _merge_identifiers_with_before(
        our.get("identifier", []), their.get("identifier", []), was.get("identifier", [])
    )
    if identifiers:
        result["identifier"] = identifiers

    # owned elements: ours (lists: plus items that were never ours), or theirs unless it was ours
    for key in _OWNED_ALWAYS:
        result.pop(key, None)
        value = _owned_element(key, our, their, was)
        if value is not None:
            result[key] = value

    # ImagingStudy.basedOn / encounter: ours, another writer's references kept (docs/mapping.md "Order,
    # visit, referrer")
    based_on = _merge_references(our.get("basedOn"), their.get("basedOn"), was.get("basedOn"))
    result.pop("basedOn", None)
    if based_on:
        result["basedOn"] = based_on
    encounter = _merge_reference(our.get("encounter"), their.get("encounter"), was.get("encounter"))
    result.pop("encounter", None)
    if encounter is not None:
        result["encounter"] = encounter

    # ImagingStudy.endpoint: configured on our side (plus another writer's Endpoints), or kept as it is
    if "endpoint" in our:
        result["endpoint"] = _owned_element("endpoint", our, their, was)

    # ImagingStudy.subject: moves with a corrected Patient ID; another writer's change is kept; a literal
    # reference is never replaced by a logical one (plan() refuses when both changed: subject_conflict)
    subject = _subject(our, their, before)
    if subject is not None:
        result["subject"] = subject

    # ImagingStudy.status: never overwrite cancelled / entered-in-error
    their_status = their.get("status")
    if "status" in our and (their_status is None or their_status in _STATUS_OVERWRITABLE):
        result["status"] = our["status"]

    # ImagingStudy.series (+ instances), then the counts over the merged result
    series, _ = _merge_series_with_before(
        our.get("series", []), their.get("series", []), was.get("series", [])
    )
    if series:
        result["series"] = series
        result["numberOfSeries"] = len(series)
        counts = [s["numberOfInstances"] for s in series if isinstance(s.get("numberOfInstances"), int)]
        result["numberOfInstances"] = sum(counts)
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


def plan(
    ours: Mapping[str, Any],
    backend: BackendStudy | None,
    *,
    narrative: bool = False,
    before: Written | None = None,
) -> Plan:
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
    before:
        What ``ingest`` wrote last time (:class:`Written`), passed to :func:`merge`.

    Returns
    -------
    Plan
        :class:`Create` with ``merge(ours, None)`` (ours without ``meta``, empties removed) when there
        is no backend copy; :class:`NoChange` when the merged result has the same :func:`digest` as
        the backend copy; :class:`Refuse` (``subject_changed``) when :func:`subject_conflict` finds
        one; else :class:`Update` with the merged result and ``id`` = the backend id.
    """
    if backend is None:
        return Create(merge(ours, None, narrative=narrative))
    conflict = subject_conflict(_clean(ours), _clean(backend.resource), before)
    if conflict is not None:
        return Refuse("subject_changed", conflict)
    merged = merge(ours, backend.resource, narrative=narrative, before=before)
    if digest(merged) == digest(backend.resource):
        return NoChange(backend.id, backend.version_id)
    body = {k: v for k, v in merged.items() if k not in ("resourceType", "id")}
    return Update(backend.id, {"resourceType": "ImagingStudy", "id": backend.id, **body})
