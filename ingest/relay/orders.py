"""``ImagingStudy.basedOn``, ``encounter`` and ``referrer`` as literal references (``[links]``).

The mapping writes the order and the visit as logical references by identifier (docs/mapping.md "Order,
visit, referrer"). With ``[links] based_on`` / ``encounter`` = ``"lookup"`` (and ``referrer`` =
``"lookup"`` for the Referring Physician Identification Sequence (0008,0096)), :class:`OrderLinks`
searches the backend by identifier before each push:

- exactly one match: the literal reference ``<Type>/<id>`` (the identifier is kept beside it);
- none: the logical reference stays; the next push of the study tries again (a late order is linked
  then, and ``ingest relink`` pushes studies whose references are still logical);
- several: the logical reference stays and a WARNING names the study (never a guess).

A match must carry the identifier searched for (a backend may ignore an argument): ``system|value``
when the system is known, the value alone otherwise. Names never decide a match. Answers are cached:
a found resource for the process's life (bounded), a miss for ``miss_ttl_s`` (the relay's next cycles),
so a batch of studies of one order costs one search. Identifiers are not logged above DEBUG.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

from ingest.core.linked import search_token
from ingest.core.records import InstanceRecord
from ingest.core.terminology import coding_system
from ingest.errors import ConfigError
from ingest.relay.links import _carries

__all__ = ["OrderLinks", "chain_links", "is_logical"]

LOGGER = logging.getLogger(__name__)

#: How many answers are kept (found ones and misses together).
_MAX_CACHED: Final = 10_000


def is_logical(reference: Any) -> bool:
    """A reference by identifier only (no literal ``reference``)."""
    if not isinstance(reference, Mapping):
        return False
    return not reference.get("reference") and bool(reference.get("identifier"))


class OrderLinks:
    """The relay's link step for ``basedOn`` / ``encounter`` / ``referrer`` (see the module docstring).

    Parameters
    ----------
    backend:
        The connected sink (:class:`ingest.relay.links.LinkedBackend`: ``supports``,
        ``search_resources``).
    based_on, encounter, referrer:
        ``[links]`` modes; only ``"lookup"`` searches.
    clock:
        Monotonic seconds (tests inject one).
    miss_ttl_s:
        How long a miss (no match, several) is remembered.
    """

    def __init__(
        self, backend: Any, *, based_on: str = "logical", encounter: str = "off", referrer: str = "display",
        clock: Callable[[], float] = time.monotonic, miss_ttl_s: float = 30.0,
    ) -> None:
        self.backend = backend
        self.based_on = based_on
        self.encounter = encounter
        self.referrer = referrer
        self.clock = clock
        self.miss_ttl_s = miss_ttl_s
        self._cache: OrderedDict[tuple[str, str], tuple[str | None, float]] = OrderedDict()
        self.searches = 0  # how many backend searches were made (tests, metrics)

    @property
    def active(self) -> bool:
        """Whether any lookup is configured (else the step does nothing)."""
        return "lookup" in (self.based_on, self.encounter, self.referrer)

    def types(self) -> list[str]:
        """The resource types this configuration searches."""
        wanted = []
        if self.based_on == "lookup":
            wanted.append("ServiceRequest")
        if self.encounter == "lookup":
            wanted.append("Encounter")
        if self.referrer == "lookup":
            wanted.append("Practitioner")
        return wanted

    def check(self) -> None:
        """Refuse a backend whose schema cannot search what the settings need.

        Raises
        ------
        ConfigError
            ``<Type>List(identifier:)`` is missing for a type a lookup needs.
        """
        for resource_type in self.types():
            if not self.backend.supports(resource_type):
                raise ConfigError(
                    f"[links] lookups need {resource_type}List(identifier:) on the backend, and its schema "
                    "has none; set the mode to \"logical\" (or \"display\" for the referrer)"
                )

    async def __call__(self, study: dict[str, Any], records: Sequence[InstanceRecord]) -> dict[str, Any]:
        """``study`` with the configured references made literal where the backend has exactly one match."""
        if not self.active:
            return study
        uid = records[0].study_uid if records else "?"
        out = dict(study)
        if self.based_on == "lookup" and isinstance(study.get("basedOn"), list):
            out["basedOn"] = [await self._literal(ref, "ServiceRequest", uid) for ref in study["basedOn"]]
        if self.encounter == "lookup" and is_logical(study.get("encounter")):
            out["encounter"] = await self._literal(study["encounter"], "Encounter", uid)
        if self.referrer == "lookup":
            referrer = await self._referrer(study.get("referrer"), records, uid)
            if referrer is not None:
                out["referrer"] = referrer
        return out

    async def _literal(self, reference: Any, resource_type: str, uid: str) -> Any:
        if not is_logical(reference):
            return reference
        ident = reference["identifier"]
        value = ident.get("value")
        if not isinstance(value, str) or not value:
            return reference
        system = ident.get("system") if isinstance(ident.get("system"), str) else None
        found = await self._find(resource_type, system, value, uid)
        if found is None:
            return reference
        literal = {"reference": f"{resource_type}/{found}", "type": resource_type, "identifier": ident}
        if reference.get("display"):
            literal["display"] = reference["display"]
        return literal

    async def _referrer(self, referrer: Any, records: Sequence[InstanceRecord], uid: str) -> Any:
        """``Practitioner/<id>`` when the (0008,0096) identifiers of the study lead to exactly one
        Practitioner (all of them to the same one); else ``None`` (the display-only referrer stays)."""
        ids = {(coding_system(c.designator), c.value) for r in records for c in r.referrer_ids}
        if not ids:
            return None
        found: set[str] = set()
        for system, value in sorted(ids, key=lambda i: (i[0] or "", i[1])):
            hit = await self._find("Practitioner", system, value, uid)
            if hit is not None:
                found.add(hit)
        if len(found) != 1:
            if len(found) > 1:
                LOGGER.warning("study %s: the referrer's identifiers name %d Practitioners: kept as display "
                               "only", uid, len(found))
            return None
        literal: dict[str, Any] = {"reference": f"Practitioner/{found.pop()}", "type": "Practitioner"}
        if isinstance(referrer, Mapping) and referrer.get("display"):
            literal["display"] = referrer["display"]
        return literal

    async def _find(self, resource_type: str, system: str | None, value: str, uid: str) -> str | None:
        # system|value when the system is known; else the value alone (any system)
        token = search_token(system or None, value)
        key = (resource_type, token)
        cached = self._cache.get(key)
        if cached is not None and (cached[0] is not None or cached[1] > self.clock()):
            self._cache.move_to_end(key)
            return cached[0]
        self.searches += 1
        found = await self.backend.search_resources(resource_type, identifier=token, count=3)
        matching = [r for r in found if _carries(r, system, value) and isinstance(r.get("id"), str)]
        ids = sorted({str(r["id"]) for r in matching})
        hit = ids[0] if len(ids) == 1 else None
        if len(ids) > 1:
            LOGGER.warning("study %s: %d %s resources carry the identifier of its %s reference: left as a "
                           "logical reference (no guess)", uid, len(ids), resource_type,
                           "order" if resource_type == "ServiceRequest" else resource_type.lower())
        LOGGER.debug("study %s: %s %s -> %s", uid, resource_type, token, hit)
        self._cache[key] = (hit, self.clock() + self.miss_ttl_s)
        self._cache.move_to_end(key)
        while len(self._cache) > _MAX_CACHED:
            self._cache.popitem(last=False)
        return hit


LinkStep = Callable[[dict[str, Any], Sequence[InstanceRecord]], Awaitable[dict[str, Any]]]


def chain_links(first: LinkStep | None, then: LinkStep) -> LinkStep:
    """One link step that runs ``first`` (the subject, endpoints, profile) and then ``then``."""
    if first is None:
        return then

    async def both(study: dict[str, Any], records: Sequence[InstanceRecord]) -> dict[str, Any]:
        return await then(await first(study, records), records)

    return both
