"""The FHIR narrative (``ImagingStudy.text``) that ``ingest`` writes, per docs/mapping.md "Narrative".

Pure and deterministic: the same ImagingStudy JSON (and rejected-instance summaries) always give the
same string. It is built from FHIR JSON, not from :mod:`ingest.core.fhir` models, so that it works on
the merged result too (series only the backend has, elements we do not model).

The ``div`` follows the FHIR R4 Narrative rules (xhtml datatype, invariants txt-1 and txt-2): one root
``<div xmlns="http://www.w3.org/1999/xhtml">`` holding only simple formatting elements (``p``, ``b``,
``table``, ``thead``, ``tbody``, ``tr``, ``th``, ``td``, ``ul``, ``li``), no scripts, no event
attributes, no links or images, and always some text. Every value that comes from DICOM or from the
backend copy is escaped (``html.escape`` with ``quote=True``); characters XML 1.0 cannot carry are
removed and a carriage return is written as ``&#13;``, so that an XML parser gives back each value
exactly.

The root carries ``class="ingest-narrative"`` (``class`` is one of the HTML 4.0 core attributes
txt-1 allows; ``data-*`` attributes are not): together with ``status: "generated"`` it marks the
narrative as the one ``ingest`` owns and recomputes (:func:`is_ingest_narrative`); any other narrative
is left as its writer made it.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ingest.core.terminology import V2_0203_SYSTEM

__all__ = ["MARKER_CLASS", "XHTML_NS", "RejectedInstance", "is_ingest_narrative", "narrative"]

XHTML_NS: Final = "http://www.w3.org/1999/xhtml"
#: The class on the root ``div`` that marks a narrative as written by ``ingest``.
MARKER_CLASS: Final = "ingest-narrative"

# Characters XML 1.0 does not allow (its Char production): C0 controls other than tab, LF and CR,
# surrogates, U+FFFE and U+FFFF. FHIR strings should not hold them; a backend copy might.
_NOT_XML: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
# The root start tag of a div, and a class attribute in it (either quote style).
_ROOT_TAG: Final = re.compile(r"\s*<div(?=[\s>/])([^>]*)>", re.DOTALL)
_CLASS_ATTR: Final = re.compile(r"""(?:^|\s)class\s*=\s*(?:"([^"]*)"|'([^']*)')""")


@dataclass(frozen=True)
class RejectedInstance:
    """One instance of the study that ``ingest`` did not accept, as the narrative shows it.

    Parameters
    ----------
    reason:
        Why it was rejected, in words (e.g. ``"same SOP Instance UID with other content"``).
    sop_instance_uid:
        Its SOP Instance UID (0008,0018), when known.
    series_uid:
        Its Series Instance UID (0020,000E), when known.
    """

    reason: str
    sop_instance_uid: str | None = None
    series_uid: str | None = None


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    """``value`` as XHTML character data: escaped, XML-safe, CR kept as a character reference."""
    text = _NOT_XML.sub("", str(value))
    return html.escape(text, quote=True).replace("\r", "&#13;")


def _present(value: Any) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def _dicts(value: Any) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _coding_text(coding: Any) -> str | None:
    """A Coding for reading: its code (``CT``), else its display."""
    if not isinstance(coding, Mapping):
        return None
    for key in ("code", "display"):
        if _present(coding.get(key)):
            return str(coding[key])
    return None


def _body_site_text(coding: Any) -> str | None:
    """A body site Coding for reading: its display (``Thorax``), else its code."""
    if not isinstance(coding, Mapping):
        return None
    for key in ("display", "code"):
        if _present(coding.get(key)):
            return str(coding[key])
    return None


def _accessions(study: Mapping[str, Any]) -> list[str]:
    """The values of ImagingStudy.identifier with type v2-0203#ACSN, <- Accession Number (0008,0050)."""
    values = []
    for identifier in _dicts(study.get("identifier")):
        type_ = identifier.get("type")
        codings = _dicts(type_.get("coding")) if isinstance(type_, Mapping) else []
        is_acsn = any(c.get("system") == V2_0203_SYSTEM and c.get("code") == "ACSN" for c in codings)
        if is_acsn and _present(identifier.get("value")):
            values.append(str(identifier["value"]))
    return values


def _series_key(series: Mapping[str, Any]) -> tuple[bool, int, str]:
    """Series Number (0020,0011) first (series without a usable number after), then Series UID."""
    number = series.get("number")
    uid = series.get("uid")
    uid_key = uid if isinstance(uid, str) else ""
    if isinstance(number, int) and not isinstance(number, bool):
        return (False, number, uid_key)
    return (True, 0, uid_key)


def _instance_count(series: Mapping[str, Any]) -> Any:
    count = series.get("numberOfInstances")
    if _present(count):
        return count
    instances = series.get("instance")
    return len(instances) if isinstance(instances, list) else None


def _cell(value: Any, tag: str = "td") -> str:
    return f"<{tag}>{_esc(value) if _present(value) else ''}</{tag}>"


def _row(label: str, value: Any) -> str:
    return f"<tr><th>{_esc(label)}</th>{_cell(value)}</tr>"


def _study_rows(study: Mapping[str, Any]) -> list[str]:
    modalities = [m for m in (_coding_text(c) for c in _dicts(study.get("modality"))) if m]
    accessions = _accessions(study)
    counts = (study.get("numberOfSeries"), study.get("numberOfInstances"))
    fields: list[tuple[str, Any]] = [
        ("Started", study.get("started")),  # ImagingStudy.started
        ("Modality", ", ".join(modalities)),  # ImagingStudy.modality
        ("Description", study.get("description")),  # ImagingStudy.description
        ("Accession", ", ".join(accessions)),  # ImagingStudy.identifier (ACSN)
        ("Series", counts[0]),  # ImagingStudy.numberOfSeries
        ("Instances", counts[1]),  # ImagingStudy.numberOfInstances
    ]
    return [_row(label, value) for label, value in fields if _present(value)]


def _series_table(study: Mapping[str, Any]) -> str:
    series = sorted(_dicts(study.get("series")), key=_series_key)
    if not series:
        return ""
    head = "".join(
        f"<th>{label}</th>" for label in ("Number", "Modality", "Body site", "Description", "Instances")
    )
    rows = [
        "<tr>"
        + _cell(s.get("number"))
        + _cell(_coding_text(s.get("modality")))
        + _cell(_body_site_text(s.get("bodySite")))
        + _cell(s.get("description"))
        + _cell(_instance_count(s))
        + "</tr>"
        for s in series
    ]
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _rejected_list(rejected: Iterable[RejectedInstance]) -> str:
    def key(item: RejectedInstance) -> tuple[str, str, str]:
        return (item.series_uid or "", item.sop_instance_uid or "", item.reason)

    items = []
    for item in sorted(rejected, key=key):
        where = " ".join(
            f"{label} {_esc(uid)}"
            for label, uid in (("series", item.series_uid), ("instance", item.sop_instance_uid))
            if uid
        )
        items.append(f"<li>{where + ': ' if where else ''}{_esc(item.reason)}</li>")
    if not items:
        return ""
    return f"<p><b>Rejected instances</b></p><ul>{''.join(items)}</ul>"


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def narrative(study: Mapping[str, Any], rejected: Sequence[RejectedInstance] = ()) -> dict[str, str]:
    """The generated narrative of an ImagingStudy, per docs/mapping.md "Narrative".

    Parameters
    ----------
    study:
        FHIR JSON of the ImagingStudy (as the mapping builds it, or the merged result). Its own
        ``text`` is ignored.
    rejected:
        Instances of the study that were not accepted; listed under "Rejected instances" when any.

    Returns
    -------
    dict[str, str]
        ``{"status": "generated", "div": "<div xmlns=... class=\\"ingest-narrative\\">...</div>"}``:
        a table of started, modality, description, accession and the counts (each row only when
        the resource has the element), a table of the series (number, modality, body site,
        description, instance count) ordered by series number, then UID, and the rejected
        instances.
    """
    parts = ["<p><b>Imaging study</b></p>"]
    rows = _study_rows(study)
    if rows:
        parts.append(f"<table><tbody>{''.join(rows)}</tbody></table>")
    parts.append(_series_table(study))
    parts.append(_rejected_list(rejected))
    body = "".join(parts)
    return {"status": "generated", "div": f'<div xmlns="{XHTML_NS}" class="{MARKER_CLASS}">{body}</div>'}


def is_ingest_narrative(text: Any) -> bool:
    """Whether ``text`` (an ImagingStudy.text value) is a narrative ``ingest`` owns.

    True only for ``status: "generated"`` with a ``div`` whose root element carries the class
    :data:`MARKER_CLASS`. Anything else (another status, a generated narrative without the marker,
    a malformed value) belongs to whoever wrote it. Only the root start tag is looked at; the
    ``div`` is never parsed as XML.
    """
    if not isinstance(text, Mapping) or text.get("status") != "generated":
        return False
    div = text.get("div")
    if not isinstance(div, str):
        return False
    root = _ROOT_TAG.match(div)
    if root is None:
        return False
    attr = _CLASS_ATTR.search(root.group(1))
    if attr is None:
        return False
    classes = (attr.group(1) if attr.group(1) is not None else attr.group(2)).split()
    return MARKER_CLASS in classes
