"""``ingest replay --dry-run [--bundle plain|mado]``: one study's records -> what a first push writes, or
its manifest Bundle (docs/mapping.md "Imaging profiles"), with nothing written anywhere.

Without a backend there are no resource ids: the Endpoints, the Patient and the Device get the
name-based ``urn:uuid:`` full URLs of :func:`ingest.core.profiles.manifest`. Replayed files carry no
calling AE, so only the study-level Endpoint applies here (``[endpoint] series_wado_rs_urls`` needs
instances received over DIMSE).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from ingest import __version__
from ingest.config import Settings
from ingest.core.records import InstanceRecord

if TYPE_CHECKING:
    from ingest.core.profiles import ProfileName

__all__ = ["BundleKind", "dry_run_study", "study_bundle"]

BundleKind = Literal["plain", "mado"]

LOGGER = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def dry_run_study(
    settings: Settings,
    records: Sequence[InstanceRecord],
    *,
    profile: ProfileName | None = None,
    placeholders: bool = False,
) -> dict[str, Any]:
    """The ImagingStudy a first push of ``records`` writes: mapped, the profile applied, with its
    narrative (``[mapping] narrative``).

    Without a backend the Endpoints have no ids: they are referenced logically, by the identifier
    ``ingest`` finds them by (``urn:ietf:rfc:3986`` + the URL), or with ``placeholders`` by the
    ``Endpoint/<url>`` placeholders :func:`ingest.core.profiles.manifest` resolves.
    """
    from ingest.app.wiring import mapping_options
    from ingest.core.lifecycle import WITHDRAWN_KEY
    from ingest.core.narrative import narrative
    from ingest.core.profiles import SeriesEndpoints, apply_profile, endpoint_placeholder
    from ingest.relay.build import StudyBuilder

    url = settings.endpoint.wado_rs_url
    study_ref = endpoint_placeholder(url) if url else None
    options = mapping_options(settings, endpoint_reference=study_ref, profile=profile)
    # the relay's build step: rejection notes among the records leave out what they reject
    built = StudyBuilder(options, all_rejected_status=settings.intake.all_rejected_status)(records)
    built.pop(WITHDRAWN_KEY, None)  # a first push has no backend copy to take anything out of
    endpoints = SeriesEndpoints(
        study=study_ref,
        by_source={ae: endpoint_placeholder(u) for ae, u in settings.endpoint.series_wado_rs_urls.items()},
    )
    name = profile or settings.profile.name
    study, problems = apply_profile(built, name, endpoints)
    for problem in problems:  # rule names and UIDs only, never patient data
        LOGGER.info("study %s does not meet the %s profile: %s", records[0].study_uid, name, problem)
    if not placeholders:
        _logical_endpoints(study)
    if settings.mapping.narrative:  # what a first push would write (docs/mapping.md "Narrative")
        study["text"] = narrative(study)
    return study


def _logical_endpoints(study: dict[str, Any]) -> None:
    from ingest.core.terminology import URI_SYSTEM

    for holder in [study, *study.get("series", [])]:
        for ref in holder.get("endpoint", []):
            url = str(ref.get("reference", "")).removeprefix("Endpoint/")
            ref.pop("reference", None)
            ref.update({"type": "Endpoint", "identifier": {"system": URI_SYSTEM, "value": url}})


def study_bundle(
    settings: Settings, records: Sequence[InstanceRecord], kind: BundleKind, *, timestamp: str | None = None
) -> dict[str, Any]:
    """The ``collection`` Bundle of one study.

    Parameters
    ----------
    settings:
        ``[mapping]``, ``[patient]``, ``[endpoint]`` and ``[profile]``.
    records:
        The study's instance records.
    kind:
        ``plain``: the ImagingStudy as ``[profile] name`` builds it, with its Patient and Endpoints;
        ``mado``: the MADO profile's ImagingStudy, its Patient and Endpoints, the creator Device, the
        Organization (``[profile] organization``) and the Provenance.
    timestamp:
        ``Bundle.timestamp`` (default: now, UTC).
    """
    from ingest.core.linked import (
        device_resource,
        endpoint_resource,
        organization_resource,
        patient_resource,
    )
    from ingest.core.profiles import Linked, manifest

    profile: ProfileName = "mado" if kind == "mado" else settings.profile.name
    study = dry_run_study(settings, records, profile=profile, placeholders=True)
    referenced = {
        ref.get("reference")
        for holder in [study, *study.get("series", [])]
        for ref in holder.get("endpoint", [])
    }
    urls = [settings.endpoint.wado_rs_url, *settings.endpoint.series_wado_rs_urls.values()]
    endpoints = {
        url: endpoint_resource(
            url, requires_access_token=settings.endpoint.requires_access_token, mado=profile == "mado"
        )
        for url in urls
        if url and f"Endpoint/{url}" in referenced
    }
    subject = study.get("subject") or {}
    ident = subject.get("identifier") or {}
    patient = None
    if ident.get("value"):  # ImagingStudy.subject -> Patient (identifier, names, gender, birth date)
        patient = patient_resource(ident.get("system"), ident["value"], records)
    cfg = settings.profile
    linked = Linked(
        patient=patient,
        endpoints=endpoints,
        device=device_resource(cfg.device_name, __version__, manufacturer=cfg.manufacturer),
        organization=organization_resource(cfg.organization) if cfg.organization else None,
    )
    return manifest(study, linked, profile=profile, timestamp=timestamp or _now())
