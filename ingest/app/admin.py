"""The status page on the admin port: ``/`` (studies with search and filters, dead letters, the last hour),
``/study/<uid>`` (its series, one page of its instances, its quarantine side files, its ImagingStudy),
``/study/<uid>/imagingstudy.json``, ``/quarantine`` (the side files, newest first), ``/commitments``
(Storage Commitment requests and their reports), ``/summary.json`` (the header's numbers), and the POSTs
``/retry`` and ``/retry-all``.

Pages are built in the page's own small thread pool (:class:`StatusPage`), never on the event loop that
``ingest serve`` shares with the listener's hand-off and the relay; every list is paged or capped, and
quarantine side files are found through :class:`QuarantineIndex`, which reads each side file once.

Server-rendered HTML, every value through :func:`html.escape`; one small script (``/admin.js``, served
here, no CDN) updates the header's numbers every 5 s from ``/summary.json``, in place (no reload).
``/healthz`` and ``/metrics`` (``ingest.app.serve``) are not touched by anything here.

Security (``README.md`` "Status page"):

- Patient names, IDs and birth dates are shown, and searched, only with ``[admin] show_patient = true``;
  the ImagingStudy JSON on a study page has its ``subject`` replaced otherwise.
- Every state-changing action is a POST that needs an ``Origin`` (or, without one, a ``Referer``) whose
  host equals the ``Host`` header, and this process's CSRF token from the form (``hmac.compare_digest``).
- With ``[admin] token_env`` / ``token_file`` set, the page, its assets with data and its actions need
  the token: ``Authorization: Bearer <token>``, or ``?token=`` on a GET, or the form's ``token`` field on
  a POST. A non-loopback ``[admin] host`` without a token is a configuration error (serve refuses to
  start). Without a token (loopback only) requests whose ``Host`` is not a loopback name are refused
  (DNS rebinding). Both checks apply to every method (``HEAD`` too), before a method a route does not
  take is answered 405.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import html
import ipaddress
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence, Set
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

from aiohttp import web

import ingest
from ingest.app.status import source_text
from ingest.clock import utcnow
from ingest.config import Settings
from ingest.core.records import InstanceRecord, PersonName
from ingest.core.terminology import is_acquisition_modality
from ingest.errors import ConfigError
from ingest.metrics import Metrics
from ingest.ports import SeriesGroup, StateStore, StudyRow, StudyState

__all__ = ["PAGE_SIZE", "StatusPage", "admin_token", "mount_status"]

LOGGER = logging.getLogger(__name__)

PAGE_SIZE = 50
#: Dead letters listed on the page (the oldest first by UID); ``ingest status`` lists them all.
_DEAD_SHOWN = 200
#: Series rows and quarantine side files listed on a study page (instances: ``PAGE_SIZE`` a page).
_SERIES_SHOWN = 200
_QUARANTINE_SHOWN = 50
#: Up to this many instances, a study page shows its ImagingStudy inline; past it, a link to the JSON.
_JSON_INLINE_MAX = 500
#: Pages built at once (worker threads), and pages waiting for one before the answer is 503.
_BUILDERS = 2
_QUEUED = 16
_RETRY_AFTER_S = 2
#: A study's loaded instance rows are reused while it is unchanged, for at most this long; this many kept.
_STUDY_CACHE_S = 30.0
_STUDY_VIEWS = 4
#: The header's health report (the ``/healthz`` checks, which probe the spool folder) is reused this long.
_REPORT_CACHE_S = 2.0
#: The quarantine folder is looked at at most this often; a side file larger than this is not parsed.
_INDEX_RESCAN_S = 2.0
_SIDE_MAX_BYTES = 64 * 1024
_PAGE_RE = re.compile(r"^[0-9]{1,9}$")
_UID_WORD_RE = re.compile(r"[0-9][0-9.]*[0-9]")
_CHART_MINUTES = 60
#: A search that needs instance rows (accession, source, AE title, modality, patient) looks at the newest
#: ``_SCAN_MAX`` studies (of the state and dates asked for), ``_SCAN_CHUNK`` at a time, no further once it
#: took ``_SCAN_BUDGET_S``, and its result is reused ``_SCAN_CACHE_S`` for paging; this many are kept.
_SCAN_MAX = 5000
_SCAN_CHUNK = 250
_SCAN_CACHE_S = 15.0
_SCAN_BUDGET_S = 5.0
_SCANS_KEPT = 8
#: Storage Commitment requests: 50 a page, the newest 1,000 (``ingest status`` lists them all).
_COMMITMENT_PAGES = 20
_COMMITMENT_STATES = ("pending", "reported", "abandoned")
_CHART_CACHE_S = 4.0  # bounds the instance scan to one per 4 s, whatever the number of viewers
_UID_RE = re.compile(r"^[0-9.]{1,64}$")
_CURRENT = ' aria-current="page"'
_HIDDEN = "«hidden: [admin] show_patient = false»"

Builder = Callable[[Sequence[InstanceRecord]], dict[str, Any]]
_T = TypeVar("_T")


def admin_token(settings: Settings) -> str | None:
    """The status page's token from ``[admin] token_env`` or ``token_file``; ``None`` when neither is set.

    Raises
    ------
    ConfigError
        When a named variable is unset or empty, or the file cannot be read or is empty: a token was asked
        for, so the page never starts open instead.
    """
    admin = settings.admin
    if admin.token_env:
        value = (os.environ.get(admin.token_env) or "").strip()
        if not value:
            raise ConfigError(f"[admin] token_env names {admin.token_env}, which is not set or empty")
        return value
    if admin.token_file is not None:
        try:
            value = admin.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"[admin] token_file {admin.token_file}: {exc.strerror or exc}") from exc
        if not value:
            raise ConfigError(f"[admin] token_file {admin.token_file} is empty")
        return value
    return None


def _loopback_name(host: str) -> bool:
    name = host.strip().lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_only(authority: str) -> str:
    """``127.0.0.1`` from ``127.0.0.1:9100``, ``::1`` from ``[::1]:9100``."""
    try:
        return urlsplit(f"//{authority}").hostname or ""
    except ValueError:
        return ""


def e(value: object) -> str:
    """``value`` as HTML text (quotes escaped too: safe in attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _when(dt: datetime | None) -> str:
    return "—" if dt is None else dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _bytes(n: float | None) -> str:
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d {h:02d}:{m:02d}:{s:02d}" if d else f"{h:02d}:{m:02d}:{s:02d}"


def _person(name: PersonName | None) -> str:
    if name is None:
        return ""
    return name.alphabetic or name.ideographic or name.phonetic


def _short(text: str, limit: int = 96) -> str:
    """``text``, its middle elided past ``limit`` characters (a long folder name stays one line)."""
    return text if len(text) <= limit else f"{text[: limit // 2 - 1]}…{text[-(limit // 2) :]}"


@dataclass
class _Sources:
    """Where a study's (or a series') instances came from, kept small: counts by AE title / kind, and
    for ``file:<path>`` sources (``ingest replay``) only the least and greatest path and how many."""

    labels: dict[str, int] = field(default_factory=dict)
    first_path: str | None = None
    last_path: str | None = None
    files: int = 0

    def add(self, group: SeriesGroup) -> None:
        if group.source.startswith("file:"):
            low = group.source[5:]
            high = (group.source_last or group.source)[5:]
            self.first_path = low if self.first_path is None else min(self.first_path, low)
            self.last_path = high if self.last_path is None else max(self.last_path, high)
            self.files += group.instances
        else:
            label = source_text(group.source)
            self.labels[label] = self.labels.get(label, 0) + group.instances

    def kinds(self) -> set[str]:
        """``dimse`` / ``watch`` / ``replay`` / other sources as recorded, for the source filter."""
        out = {"replay"} if self.files else set()
        for label in self.labels:
            out.add("dimse" if label.startswith("AE ") else label)
        return out

    def text(self) -> str:
        """``AE <title>``, ``watch``, ``replay of <folder>, N files``, joined with ``; ``."""
        parts = sorted(self.labels)
        if self.files and self.first_path is not None and self.last_path is not None:
            # sorted paths: the folder the least and the greatest share holds every path between too
            try:
                folder = os.path.commonpath([self.first_path, self.last_path]) or "several folders"
            except ValueError:  # one relative, one absolute
                folder = "several folders"
            if self.first_path == self.last_path:
                folder = os.path.dirname(self.first_path) or self.first_path
            parts.append(f"replay of {_short(folder)}, {self.files} file{'s' if self.files != 1 else ''}")
        return "; ".join(parts)


def _side_source(value: object) -> str:
    """A side file's ``source``: ``AE <title>`` for the listener, a drop-folder path as recorded."""
    if value is None or value == "":
        return "—"
    return _short(source_text(str(value)))


def _side_time(value: object) -> str:
    """A side file's ``time`` (ISO 8601) as the page shows times; as written when it is not one."""
    if not isinstance(value, str) or not value:
        return "—"
    try:
        return _when(datetime.fromisoformat(value))
    except ValueError:
        return value


def _yes_no(value: object) -> str:
    return "yes" if value is True else "no" if value is False else "—"


def _study_modalities(modalities: Set[str]) -> str:
    """The study's modality as its ImagingStudy has it: the acquisition modalities (DICOM CID 29) of its
    series, sorted (``ingest.core.mapping``); SR, KO, PR... stay on their series."""
    return ", ".join(sorted(m for m in modalities if is_acquisition_modality(m)))


@dataclass
class _Summary:
    """One study's fields for the list, aggregated from its series groups."""

    received: datetime | None = None
    sources: _Sources = field(default_factory=_Sources)
    series: set[str] = field(default_factory=set)
    modalities: set[str] = field(default_factory=set)
    accession: str | None = None
    description: str | None = None
    patient_name: str | None = None
    patient_id: str | None = None
    birth_date: str | None = None


def _summaries(groups: Sequence[SeriesGroup]) -> dict[str, _Summary]:
    out: dict[str, _Summary] = {}
    for g in groups:
        s = out.setdefault(g.study_uid, _Summary())
        if g.first_added is not None and (s.received is None or g.first_added < s.received):
            s.received = g.first_added
        s.sources.add(g)
        s.series.add(g.series_uid)
        r = g.sample
        if r.modality:
            s.modalities.add(r.modality.strip())
        s.accession = s.accession or r.accession_number
        s.description = s.description or r.study_description
        s.patient_name = s.patient_name or _person(r.patient_name) or None
        s.patient_id = s.patient_id or r.patient_id
        s.birth_date = s.birth_date or r.patient_birth_date
    return out


def _state(row: StudyRow) -> tuple[str, str]:
    """(CSS class, text) of a study's state: pending / pushed / retrying (next attempt) / dead (reason)."""
    if row.state is StudyState.DEAD:
        reason = row.dead_reason or "dead"
        return "dead", f"dead: {reason}" + (f" — {row.last_error}" if row.last_error else "")
    if row.state is StudyState.PENDING and row.attempts > 0:
        nxt = _when(row.next_attempt_at) if row.next_attempt_at else "soon"
        last = f" — last: {row.last_error}" if row.last_error else ""
        return "retrying", f"retrying (attempt {row.attempts + 1}, next {nxt}){last}"
    if row.state is StudyState.PENDING:
        return "pending", "pending"
    return "pushed", f"pushed {_when(row.pushed_at)}"


_CSS = """\
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1b1b1b;background:#fafafa}
header{background:#203040;color:#fff;padding:8px 16px}
header h1{font-size:18px;margin:0 0 4px}
header dl{display:flex;flex-wrap:wrap;gap:4px 18px;margin:0}
header dt{opacity:.7}header dd{margin:0 0 0 4px;font-weight:600}
header div{display:flex}
main{padding:8px 16px}
table{border-collapse:collapse;width:100%;background:#fff;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#eef1f4}
td.uid{font-family:monospace;font-size:12px;word-break:break-all;min-width:24ch}
td.when{white-space:nowrap}td.state{max-width:40ch}
.ok{color:#17692b}.bad{color:#a31515}.warn{color:#8a5a00}
.dead{color:#a31515}.retrying{color:#8a5a00}.pending{color:#1f4e99}.pushed{color:#17692b}
pre{background:#fff;border:1px solid #ddd;padding:8px;overflow:auto;max-height:600px}
svg{background:#fff;border:1px solid #ddd}
.bar{fill:#6a9fd8}.line{fill:none;stroke:#c0392b;stroke-width:2}.axis{stroke:#999}
nav a{margin-right:12px}
nav.views{background:#2c4257;padding:4px 16px}nav.views a{color:#fff}
nav.views a[aria-current]{font-weight:700;text-decoration:none}
.note{color:#555;font-style:italic}
form.search{display:flex;flex-wrap:wrap;gap:6px 10px;align-items:end;background:#fff;border:1px solid #ddd;
padding:6px 8px;margin:8px 0}
form.search label{display:flex;flex-direction:column;font-size:12px;color:#444}
form.search input,form.search select{font:inherit;padding:2px 4px}
form.inline{display:inline}
"""

_JS = """\
// ingest status page: the header's numbers from /summary.json every 5 s, in place (no reload, no
// third-party code); the rest of the page changes only when the administrator reloads or follows a link.
(function () {
  "use strict";
  var busy = false;
  function url() {
    var token = new URLSearchParams(window.location.search).get("token");
    return "/summary.json" + (token ? "?token=" + encodeURIComponent(token) : "");
  }
  function apply(summary) {
    var fields = summary.fields || {}, parts = summary.parts || {};
    Object.keys(fields).forEach(function (key) {
      var el = document.querySelector('header [data-key="' + key + '"]');
      if (el && el.textContent !== String(fields[key])) { el.textContent = String(fields[key]); }
    });
    Object.keys(parts).forEach(function (part) {
      var el = document.querySelector('header [data-part="' + part + '"]');
      if (el) {
        el.textContent = String(parts[part]);
        el.className = parts[part] === "ok" ? "ok" : "bad";
      }
    });
    document.documentElement.setAttribute("data-refreshed", String(Date.now()));
  }
  function refresh() {
    if (busy || document.hidden) { return; }
    busy = true;
    fetch(url(), {credentials: "same-origin", cache: "no-store"})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (summary) { if (summary) { apply(summary); } })
      .catch(function () { /* the next tick tries again */ })
      .then(function () { busy = false; });
  }
  window.setInterval(refresh, 5000);
})();
"""

_FAVICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    '<rect width="16" height="16" rx="3" fill="#203040"/><path d="M4 11l3-4 2 2 3-5" stroke="#6a9fd8" '
    'stroke-width="2" fill="none"/></svg>'
)

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class _Answer(Exception):
    """A plain-text answer (400, 404, 503...) decided while a page is built."""

    def __init__(self, status: int, text: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = dict(headers or {})


def _page_number(query: Mapping[str, str]) -> int:
    """``?page=`` as a number from 1 (1 when absent); anything else is a 400."""
    raw = query.get("page")
    if raw is None:
        return 1
    if not _PAGE_RE.match(raw) or int(raw) < 1:
        raise _Answer(400, "bad request: page must be a whole number from 1 to the last page")
    return int(raw)


def _check_page(page: int, pages: int) -> None:
    if page > pages:
        raise _Answer(400, f"bad request: page {page} is past the last page ({pages})")


_SOURCES = ("dimse", "watch", "replay")
_STATES = {state.value: state for state in StudyState}
_MODALITY_RE = re.compile(r"^[A-Z0-9_]{1,16}$")
_DATE_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_TEXT_MAX = 64


@dataclass(frozen=True)
class _Filter:
    """The index page's search (``?q=``) and filters, checked (``_filter``)."""

    q: str = ""
    state: StudyState | None = None
    source: str = ""  # dimse / watch / replay
    ae: str = ""
    modality: str = ""
    seen_from: date | None = None
    seen_to: date | None = None  # inclusive

    @property
    def active(self) -> bool:
        return self != _Filter()

    @property
    def scans(self) -> bool:
        """Whether the filter needs the instance rows (scanned newest first, bounded)."""
        return bool(self.q or self.source or self.ae or self.modality)

    def window(self) -> tuple[datetime | None, datetime | None]:
        """[from, to + 1 day) as UTC instants (dates are UTC days, as the page shows times)."""
        start = None if self.seen_from is None else datetime.combine(self.seen_from, dtime(), UTC)
        end = None
        if self.seen_to is not None:
            end = datetime.combine(self.seen_to + timedelta(days=1), dtime(), UTC)
        return start, end

    def params(self) -> dict[str, str]:
        """The filter as query parameters (for the pager's links)."""
        out = {"q": self.q, "state": self.state.value if self.state else "", "source": self.source,
               "ae": self.ae, "modality": self.modality,
               "from": self.seen_from.isoformat() if self.seen_from else "",
               "to": self.seen_to.isoformat() if self.seen_to else ""}
        return {k: v for k, v in out.items() if v}


def _date_param(query: Mapping[str, str], name: str) -> date | None:
    raw = query.get(name, "").strip()
    if not raw:
        return None
    try:
        if not _DATE_RE.match(raw):
            raise ValueError(raw)
        return date.fromisoformat(raw)
    except ValueError:
        raise _Answer(400, f"bad request: {name} must be a date YYYY-MM-DD") from None


def _filter(query: Mapping[str, str]) -> _Filter:
    """The search and filters of ``query``; a value out of its form is a 400 naming the parameter."""
    texts = {}
    for name in ("q", "ae"):
        value = query.get(name, "").strip()
        if len(value) > _TEXT_MAX or any(ord(c) < 32 for c in value):
            raise _Answer(400, f"bad request: {name} must be at most {_TEXT_MAX} printable characters")
        texts[name] = value
    state_raw = query.get("state", "").strip()
    if state_raw and state_raw not in _STATES:
        raise _Answer(400, f"bad request: state must be one of {', '.join(_STATES)}")
    source = query.get("source", "").strip()
    if source and source not in _SOURCES:
        raise _Answer(400, f"bad request: source must be one of {', '.join(_SOURCES)}")
    modality = query.get("modality", "").strip().upper()
    if modality and not _MODALITY_RE.match(modality):
        raise _Answer(400, "bad request: modality must be a Modality code (CT, MR, KO...)")
    seen_from, seen_to = _date_param(query, "from"), _date_param(query, "to")
    if seen_from and seen_to and seen_to < seen_from:
        raise _Answer(400, "bad request: to is before from")
    return _Filter(texts["q"], _STATES.get(state_raw), source, texts["ae"], modality, seen_from, seen_to)


@dataclass
class _Side:
    """One quarantine side file as the index keeps it."""

    mtime: float
    fields: dict[str, object]
    words: frozenset[str]


class QuarantineIndex:
    """The quarantine side files by the UIDs their ``detail`` names, read once each.

    :meth:`refresh` looks at the folder at most every ``rescan_s`` seconds, and lists it only when its
    modification time changed since the last listing (a side file written or removed changes it); each
    side file is read once, when it is first listed, and dropped when it is gone. A study page then
    finds its side files by dictionary look-ups instead of reading the folder. Thread-safe.

    Parameters
    ----------
    folder:
        ``data_dir/quarantine``.
    rescan_s:
        The least time between two looks at the folder.
    """

    def __init__(self, folder: Path, *, rescan_s: float = _INDEX_RESCAN_S) -> None:
        self.folder = folder
        self.rescan_s = rescan_s
        self._lock = threading.Lock()
        self._looked: float | None = None
        self._mtime_ns: int | None = None
        self._sides: dict[str, _Side] = {}
        self._by_word: dict[str, set[str]] = {}
        self._order: list[str] | None = None  # names newest first, made again after a change
        #: side files read since the index was made (each at most once while it exists)
        self.reads = 0

    def __len__(self) -> int:
        return len(self._sides)

    def refresh(self) -> None:
        """Bring the index up to date with the folder (see the class)."""
        with self._lock:
            now = time.monotonic()
            if self._looked is not None and now - self._looked < self.rescan_s:
                return
            self._looked = now
            try:
                mtime_ns = os.stat(self.folder).st_mtime_ns
            except OSError:
                self._forget(set(self._sides))
                self._mtime_ns = None
                return
            if mtime_ns == self._mtime_ns:
                return
            # a change within the folder's timestamp granularity may not move it: look again next time
            recent = time.time_ns() - mtime_ns < 2_000_000_000
            self._mtime_ns = None if recent else mtime_ns
            try:
                with os.scandir(self.folder) as entries:
                    listed = {entry.name: entry for entry in entries if entry.name.endswith(".json")}
            except OSError:
                self._mtime_ns = None
                return
            self._forget(self._sides.keys() - listed.keys())
            for name in listed.keys() - self._sides.keys():
                side = self._read(listed[name])
                if side is None:
                    self._mtime_ns = None  # gone or unreadable now: read it again next time
                    continue
                self._sides[name] = side
                self._order = None
                for word in side.words:
                    self._by_word.setdefault(word, set()).add(name)

    def _forget(self, names: set[str]) -> None:
        for name in names:
            side = self._sides.pop(name)
            self._order = None
            for word in side.words:
                holders = self._by_word.get(word)
                if holders is not None:
                    holders.discard(name)
                    if not holders:
                        del self._by_word[word]

    def _read(self, entry: os.DirEntry[str]) -> _Side | None:
        self.reads += 1
        try:
            mtime = entry.stat().st_mtime
            with open(entry.path, "rb") as fh:
                data = fh.read(_SIDE_MAX_BYTES + 1)
        except OSError:
            return None
        # side files appear whole (written aside, then renamed): one too large or not a JSON object is
        # not ingest's, and is kept as seen and naming nothing rather than read again
        if len(data) > _SIDE_MAX_BYTES:
            return _Side(mtime, {}, frozenset())
        try:
            side = json.loads(data)
        except ValueError:
            return _Side(mtime, {}, frozenset())
        if not isinstance(side, dict):
            return _Side(mtime, {}, frozenset())
        fields = {key: side.get(key) for key in ("time", "reason", "rule", "detail", "source", "kept")}
        words = frozenset(_UID_WORD_RE.findall(str(side.get("detail", ""))))
        return _Side(mtime, fields, words)

    def newest(self, offset: int, limit: int) -> tuple[int, list[dict[str, object]]]:
        """How many side files there are, and ``limit`` of them from ``offset``, newest first (by the side
        file's modification time: each is written once, when its input was refused)."""
        with self._lock:
            if self._order is None:
                self._order = sorted(self._sides, key=lambda n: (self._sides[n].mtime, n), reverse=True)
            names = self._order[offset : offset + limit]
            return len(self._order), [self._sides[n].fields for n in names]

    def naming(self, study_uid: str, sop_uids: Set[str]) -> list[dict[str, object]]:
        """The side files whose detail names ``study_uid`` or one of ``sop_uids``, newest first."""
        with self._lock:
            names = set(self._by_word.get(study_uid, ()))
            if len(sop_uids) <= len(self._by_word):
                for sop in sop_uids:
                    names.update(self._by_word.get(sop, ()))
            else:
                for word, holders in self._by_word.items():
                    if word in sop_uids:
                        names.update(holders)
            sides = sorted((self._sides[n] for n in names), key=lambda s: s.mtime, reverse=True)
        return [side.fields for side in sides]


@dataclass
class _StudyView:
    """What a study page needs from the store, loaded once per change of the study (see ``_study``)."""

    key: tuple[int, datetime | None]
    loaded: float
    records: list[InstanceRecord]
    sources: dict[str, _Sources]
    sops: frozenset[str]
    json_html: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class StatusPage:
    """The status page's routes, mounted on the admin app by :func:`mount_status`.

    Every page is built in a worker thread of its own small pool (``builders`` threads; store queries,
    the quarantine index and the HTML), never on the event loop: at most ``builders`` pages are built at
    once, up to ``queued`` more wait, and past that the answer is 503 with ``Retry-After``. A study's
    instance rows are loaded once per change of the study (its instance count and last instance
    received), and at most ``_STUDY_CACHE_S`` seconds old; a page shows one page of them.

    Parameters
    ----------
    settings:
        ``data_dir`` (quarantine side files), ``[admin]`` (``show_patient``, token, host).
    store:
        The state store; every query runs in a worker thread.
    health:
        The :class:`ingest.app.serve.Health` that ``/healthz`` uses (its ``report()``).
    metrics:
        For the intake depth and spool bytes gauges.
    node:
        This node's name (the relay's).
    builder:
        Instance records -> ImagingStudy JSON (the relay's ``StudyBuilder``), for the study page.
    token:
        The required token, or ``None`` (loopback only).
    clock:
        Now, timezone-aware.
    builders, queued:
        Pages built at once, and pages waiting for a builder before the answer is 503.
    """

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        health: Any,
        metrics: Metrics,
        *,
        node: str,
        builder: Builder | None = None,
        token: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        builders: int = _BUILDERS,
        queued: int = _QUEUED,
    ) -> None:
        self.settings = settings
        self.store = store
        self.health = health
        self.metrics = metrics
        self.node = node
        self.builder = builder
        self.token = token
        self.clock = clock
        self.show_patient = settings.admin.show_patient
        self.csrf = secrets.token_urlsafe(32)
        self.started = time.monotonic()
        self.quarantine = QuarantineIndex(settings.data_dir / "quarantine")
        self.builders = builders
        self.queued = queued
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight = 0
        self._chart: tuple[float, tuple[list[int], list[int]], datetime] | None = None
        self._report: tuple[float, Mapping[str, Any]] | None = None
        self._report_lock = asyncio.Lock()
        self._studies: OrderedDict[str, _StudyView] = OrderedDict()
        self._studies_lock = threading.Lock()
        self._study_locks: dict[str, threading.Lock] = {}
        self._scans: OrderedDict[_Filter, tuple[float, tuple[list[tuple[StudyRow, _Summary]], int, bool]]] = (
            OrderedDict()
        )
        self._scans_lock = threading.Lock()

    def mount(self, app: web.Application) -> None:
        app.router.add_route("*", "/", self._guard(self.index, ("GET", "HEAD")))
        app.router.add_route("*", "/study/{uid}", self._guard(self.study_page, ("GET", "HEAD")))
        app.router.add_route(
            "*", "/study/{uid}/imagingstudy.json", self._guard(self.study_json, ("GET", "HEAD"))
        )
        app.router.add_route("*", "/retry", self._guard(self.retry, ("POST",)))
        app.router.add_route("*", "/retry-all", self._guard(self.retry_all, ("POST",)))
        app.router.add_route("*", "/summary.json", self._guard(self.summary_json, ("GET", "HEAD")))
        app.router.add_route("*", "/quarantine", self._guard(self.quarantine_page, ("GET", "HEAD")))
        app.router.add_route("*", "/commitments", self._guard(self.commitments_page, ("GET", "HEAD")))
        app.router.add_get("/admin.js", self._asset(_JS, "text/javascript"))
        app.router.add_get("/admin.css", self._asset(_CSS, "text/css"))
        app.router.add_get("/favicon.svg", self._asset(_FAVICON, "image/svg+xml"))
        app.router.add_get("/favicon.ico", self._asset(_FAVICON, "image/svg+xml"))
        app.on_cleanup.append(self._close)

    async def _close(self, _: web.Application) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- building off the loop ---------------------------------------------------------------------------

    async def _health(self) -> Mapping[str, Any]:
        """The health report for the header: one check at a time, reused for ``_REPORT_CACHE_S``."""
        async with self._report_lock:
            cached = self._report
            if cached is not None and time.monotonic() - cached[0] < _REPORT_CACHE_S:
                return cached[1]
            report: Mapping[str, Any]
            _, report = await self.health.report()
            self._report = (time.monotonic(), report)
            return report

    async def _off_loop(self, fn: Callable[..., _T], *args: Any, report: bool = False) -> _T:
        """``fn(*args)`` in the page pool (with the header's health report as a last argument when
        ``report``); 503 when ``builders + queued`` pages are already asked for, before anything is done."""
        if self._in_flight >= self.builders + self.queued:
            raise _Answer(503, "busy: too many status pages being built; try again shortly",
                          {"Retry-After": str(_RETRY_AFTER_S)})
        self._in_flight += 1
        try:
            if report:
                args = (*args, await self._health())
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.builders, thread_name_prefix="ingest-admin-page")
            return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))
        finally:
            self._in_flight -= 1

    # -- access ------------------------------------------------------------------------------------------

    def _asset(self, text: str, content_type: str) -> Callable[[web.Request], Any]:
        body = text.encode()

        async def handler(_: web.Request) -> web.Response:
            resp = web.Response(body=body, content_type=content_type, charset="utf-8")
            resp.headers.update(_SECURITY_HEADERS)
            resp.headers["Cache-Control"] = "max-age=300"
            return resp

        return handler

    def _presented_token(self, request: web.Request, form: Any = None) -> str | None:
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip()
        if request.method in ("GET", "HEAD"):
            return request.query.get("token")
        if form is not None:
            value = form.get("token")
            return value if isinstance(value, str) else None
        return None

    def _refusal(self, request: web.Request, form: Any = None) -> web.Response | None:
        if self.token is None:
            if not _loopback_name(_host_only(request.host)):
                return self._plain(403, "forbidden: Host is not a loopback name")
            return None
        presented = self._presented_token(request, form)
        if presented is None or not hmac.compare_digest(presented.encode(), self.token.encode()):
            resp = self._plain(401, "unauthorized: Authorization: Bearer <token> or ?token=")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="ingest admin"'
            return resp
        return None

    def _guard(
        self, handler: Callable[[web.Request], Any], methods: tuple[str, ...]
    ) -> Callable[[web.Request], Any]:
        """Every method is checked (``Host`` without a token, the token with one) before anything else;
        a method the route does not take is then a 405."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            form = await request.post() if request.method == "POST" and "POST" in methods else None
            refused = self._refusal(request, form)
            if refused is not None:
                return refused
            if request.method not in methods:
                resp = self._plain(405, f"method not allowed: {', '.join(methods)} only")
                resp.headers["Allow"] = ", ".join(methods)
                return resp
            try:
                result: web.StreamResponse = await handler(request)
            except _Answer as answer:
                resp = self._plain(answer.status, answer.text)
                resp.headers.update(answer.headers)
                return resp
            return result

        return guarded

    @staticmethod
    def _plain(status: int, text: str) -> web.Response:
        resp = web.Response(status=status, text=text + "\n", content_type="text/plain")
        resp.headers.update(_SECURITY_HEADERS)
        return resp

    def _link(self, query: Mapping[str, str], path: str, **params: object) -> str:
        """``path`` with ``params``, carrying ``?token=`` when the request came with it."""
        out = {k: str(v) for k, v in params.items() if v is not None}
        if self.token is not None and "token" in query:
            out["token"] = query["token"]
        return path + ("?" + urlencode(out) if out else "")

    # -- actions -----------------------------------------------------------------------------------------

    def _same_origin(self, request: web.Request) -> bool:
        """``Origin`` (or, without one, ``Referer``) names the host the request was sent to."""
        host = request.host.lower()
        origin = request.headers.get("Origin")
        if origin is not None and origin != "null":
            return urlsplit(origin).netloc.lower() == host
        referer = request.headers.get("Referer")
        if referer:
            return urlsplit(referer).netloc.lower() == host
        return False

    def _action_refusal(self, request: web.Request, form: Any) -> web.Response | None:
        """A state-changing POST needs the same origin and this process's CSRF token (the guard has
        checked the token and ``Host``)."""
        if not self._same_origin(request):
            return self._plain(403, "forbidden: cross-site request (Origin/Referer host differs from Host)")
        csrf = form.get("csrf")
        if not isinstance(csrf, str) or not hmac.compare_digest(csrf.encode(), self.csrf.encode()):
            return self._plain(403, "forbidden: missing or wrong CSRF token (reload the page)")
        return None

    def _back(self, form: Any, n: int) -> web.HTTPSeeOther:
        query: dict[str, str] = {"retried": str(n)}
        token = form.get("token")
        if self.token is not None and isinstance(token, str):
            query["token"] = token
        return web.HTTPSeeOther("/?" + urlencode(query))

    async def retry(self, request: web.Request) -> web.StreamResponse:
        """POST /retry (``uid``, ``csrf``): same as ``ingest retry --study UID`` (the guard has checked the
        token)."""
        form = await request.post()
        refused = self._action_refusal(request, form)
        if refused is not None:
            return refused
        uid = form.get("uid")
        if not isinstance(uid, str) or not _UID_RE.match(uid):
            return self._plain(400, "bad request: uid must be a Study Instance UID")
        n = await asyncio.to_thread(self.store.retry_dead, uid, self.clock())
        LOGGER.info("status page: retry of study %s re-queued %d dead letter(s)", uid, n)
        raise self._back(form, n)

    async def retry_all(self, request: web.Request) -> web.StreamResponse:
        """POST /retry-all (``csrf``): every dead letter back to pending, due now; same as ``ingest retry
        --all``, with the same checks as :meth:`retry`."""
        form = await request.post()
        refused = self._action_refusal(request, form)
        if refused is not None:
            return refused
        n = await asyncio.to_thread(self.store.retry_dead, None, self.clock())
        LOGGER.info("status page: retry of all dead letters re-queued %d", n)
        raise self._back(form, n)

    # -- pages -------------------------------------------------------------------------------------------

    @staticmethod
    def _document(title: str, header: str, main: str) -> bytes:
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{e(title)}</title><link rel=\"stylesheet\" href=\"/admin.css\">"
            "<link rel=\"icon\" href=\"/favicon.svg\" type=\"image/svg+xml\">"
            "<script src=\"/admin.js\" defer></script></head>"
            f"<body>{header}<main>{main}</main></body></html>\n"
        ).encode()

    @staticmethod
    def _html(body: bytes) -> web.Response:
        resp = web.Response(body=body, content_type="text/html", charset="utf-8")
        resp.headers.update(_SECURITY_HEADERS)
        return resp

    _PARTS = ("listener", "watcher", "relay", "backend", "store", "disk")

    def _summary(self, report: Mapping[str, Any], counts: Mapping[StudyState, int]) -> dict[str, Any]:
        """The header's values as text: ``fields`` (key -> text) and the ``/healthz`` ``parts``."""
        reg = self.metrics.registry
        intake = reg.get_sample_value("ingest_intake_depth")
        spool = reg.get_sample_value("ingest_spool_bytes")
        fields = {
            "node": str(self.node),
            "version": ingest.__version__,
            "uptime": _duration(time.monotonic() - self.started),
            "status": str(report.get("status")),
            "studies": str(sum(counts.values())),
            "relay-queue": str(counts.get(StudyState.PENDING, 0)),
            "dead": str(counts.get(StudyState.DEAD, 0)),
            "intake-depth": "—" if intake is None else str(int(intake)),
            "spool": _bytes(spool),
            "free-disk": _bytes(report.get("disk_free_bytes")),
        }
        parts = {part: str(report[part]) for part in self._PARTS if part in report}
        return {"fields": fields, "parts": parts}

    def _header(self, report: Mapping[str, Any], counts: Mapping[StudyState, int],
                query: Mapping[str, str] | None = None, current: str = "") -> str:
        summary = self._summary(report, counts)
        fields: dict[str, str] = summary["fields"]
        labels = {"relay-queue": "relay queue", "intake-depth": "intake depth", "free-disk": "free disk"}

        def item(key: str) -> str:
            label = labels.get(key, key)
            return f'<div><dt>{e(label)}</dt><dd data-key="{e(key)}">{e(fields[key])}</dd></div>'

        dl = "".join(item(k) for k in ("node", "version", "uptime", "status"))
        for part, value in summary["parts"].items():
            cls = "ok" if value == "ok" else "bad"
            dl += f'<div><dt>{e(part)}</dt><dd class="{cls}" data-part="{e(part)}">{e(value)}</dd></div>'
        dl += "".join(
            item(k) for k in ("studies", "relay-queue", "dead", "intake-depth", "spool", "free-disk")
        )
        q = query or {}
        views = "".join(
            f'<a href="{e(self._link(q, path))}"{_CURRENT if path == current else ""}>{e(name)}</a>'
            for path, name in (("/", "studies"), ("/quarantine", "quarantine"),
                               ("/commitments", "storage commitment"))
        )
        return (f'<header><h1>ingest status</h1><dl>{dl}</dl></header>'
                f'<nav class="views">{views}</nav>')

    async def summary_json(self, request: web.Request) -> web.Response:
        """``/summary.json``: the header's values, for ``admin.js`` to update them in place."""
        body = await self._off_loop(self._summary_body, report=True)
        resp = web.Response(body=body, content_type="application/json", charset="utf-8")
        resp.headers.update(_SECURITY_HEADERS)
        return resp

    def _summary_body(self, report: Mapping[str, Any]) -> bytes:
        return json.dumps(self._summary(report, self.store.study_counts()), ensure_ascii=False).encode()

    def _csrf_form(self, query: Mapping[str, str], uid: str | None) -> str:
        """The Retry button of one dead letter (``uid``), or with ``None`` the Retry all button."""
        token = ""
        if self.token is not None and "token" in query:
            token = f'<input type="hidden" name="token" value="{e(query["token"])}">'
        if uid is None:
            return (
                f'<form class="inline" method="post" action="/retry-all"><input type="hidden" name="csrf" '
                f'value="{e(self.csrf)}">{token}<button type="submit" id="retry-all">Retry all dead '
                "letters</button></form>"
            )
        return (
            f'<form method="post" action="/retry"><input type="hidden" name="csrf" value="{e(self.csrf)}">'
            f'<input type="hidden" name="uid" value="{e(uid)}">{token}'
            f'<button type="submit" data-retry="{e(uid)}">Retry</button></form>'
        )

    async def index(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        page = _page_number(query)
        flt = _filter(query)
        return self._html(await self._off_loop(self._index_body, query, page, flt, report=True))

    # -- search ------------------------------------------------------------------------------------------

    def _match(self, flt: _Filter, s: _Summary) -> bool:
        """Whether a study's summary passes the filters that need its instance rows."""
        if flt.q:
            q = flt.q.casefold()
            hit = (s.accession or "").strip().casefold() == q
            if not hit and self.show_patient:  # never an oracle for hidden patient fields
                hit = (s.patient_id or "").strip().casefold() == q or q in (s.patient_name or "").casefold()
            if not hit:
                return False
        if flt.source and flt.source not in s.sources.kinds():
            return False
        if flt.ae:
            titles = {label[3:].strip().casefold() for label in s.sources.labels if label.startswith("AE ")}
            if flt.ae.casefold() not in titles:
                return False
        return not flt.modality or flt.modality in s.modalities

    def _scan(self, flt: _Filter) -> tuple[list[tuple[StudyRow, _Summary]], int, bool]:
        """The studies passing ``flt`` among the newest ``_SCAN_MAX`` (in the state and dates asked for),
        read ``_SCAN_CHUNK`` at a time; with how many were looked at and whether older ones were left.
        Reused for ``_SCAN_CACHE_S`` (paging through the results does not scan again)."""
        with self._scans_lock:
            hit = self._scans.get(flt)
            if hit is not None and time.monotonic() - hit[0] < _SCAN_CACHE_S:
                return hit[1]
        seen_from, seen_before = flt.window()
        # one ordered read of the window's study rows; their instance rows a chunk at a time
        rows = self.store.find_studies(_SCAN_MAX + 1, 0, state=flt.state, seen_from=seen_from,
                                       seen_before=seen_before)
        more = len(rows) > _SCAN_MAX
        rows = rows[:_SCAN_MAX]
        matched: list[tuple[StudyRow, _Summary]] = []
        began = time.monotonic()
        for start in range(0, len(rows), _SCAN_CHUNK):
            if start and time.monotonic() - began > _SCAN_BUDGET_S:  # very large studies: stop, say so
                rows, more = rows[:start], True
                break
            chunk = rows[start : start + _SCAN_CHUNK]
            summaries = _summaries(self.store.study_series([r.study_uid for r in chunk]))
            for r in chunk:
                summary = summaries.get(r.study_uid, _Summary())
                if self._match(flt, summary):
                    matched.append((r, summary))
        scanned = len(rows)
        result = (matched, scanned, more)
        with self._scans_lock:
            self._scans[flt] = (time.monotonic(), result)
            while len(self._scans) > _SCANS_KEPT:
                self._scans.popitem(last=False)
        return result

    def _search(self, flt: _Filter, page: int) -> tuple[list[StudyRow], dict[str, _Summary], int, int, str]:
        """One page of the studies ``flt`` asks for: rows, summaries, total, pages, and a note on how
        they were found."""
        if flt.q and _UID_RE.match(flt.q) and (row := self.store.study(flt.q)) is not None:
            _check_page(page, 1)
            return [row], _summaries(self.store.study_series([row.study_uid])), 1, 1, (
                "Found by its Study Instance UID.")
        if not flt.scans:
            seen_from, seen_before = flt.window()
            total = self.store.count_studies(state=flt.state, seen_from=seen_from, seen_before=seen_before)
            pages = max(1, -(-total // PAGE_SIZE))
            _check_page(page, pages)
            rows = self.store.find_studies(PAGE_SIZE, (page - 1) * PAGE_SIZE, state=flt.state,
                                           seen_from=seen_from, seen_before=seen_before)
            return rows, _summaries(self.store.study_series([r.study_uid for r in rows])), total, pages, ""
        matched, scanned, more = self._scan(flt)
        pages = max(1, -(-len(matched) // PAGE_SIZE))
        _check_page(page, pages)
        shown = matched[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        asked = [f"{name} {value}" for name, value in flt.params().items() if name != "q"]
        note = f"Searched the newest {scanned} studies" + (f" ({'; '.join(asked)})" if asked else "") + "."
        if flt.modality:
            note += " Modality: the studies with a series of it (the column shows the ImagingStudy's)."
        if more:
            note += (
                f" The scan stops at the newest {_SCAN_MAX} studies or after {_SCAN_BUDGET_S:.0f} s: older "
                "studies were not searched (narrow the dates or the state, or search by Study Instance UID)."
            )
        return [r for r, _ in shown], {r.study_uid: s for r, s in shown}, len(matched), pages, note

    def _search_form(self, query: Mapping[str, str], flt: _Filter) -> str:
        token = ""
        if self.token is not None and "token" in query:
            token = f'<input type="hidden" name="token" value="{e(query["token"])}">'
        what = "Study UID, accession, patient ID or name" if self.show_patient else "Study UID or accession"

        def select(name: str, current: str, options: Sequence[tuple[str, str]]) -> str:
            opts = "".join(
                f'<option value="{e(v)}"{" selected" if v == current else ""}>{e(t)}</option>'
                for v, t in options
            )
            return f'<select name="{name}">{opts}</select>'

        states = [("", "any"), *((v, v) for v in _STATES)]
        sources = [("", "any"), ("dimse", "listener (AE)"), ("watch", "drop folder"), ("replay", "replay")]
        return (
            f'<form class="search" id="search" method="get" action="/" role="search">{token}'
            f'<label>{e(what)}<input name="q" value="{e(flt.q)}" maxlength="{_TEXT_MAX}" size="34"></label>'
            f'<label>state{select("state", flt.state.value if flt.state else "", states)}</label>'
            f'<label>source{select("source", flt.source, sources)}</label>'
            f'<label>AE title<input name="ae" value="{e(flt.ae)}" maxlength="16" size="12"></label>'
            f'<label>modality<input name="modality" value="{e(flt.modality)}" maxlength="16" '
            'size="6"></label><label>last received from<input type="date" name="from" value="'
            f'{e(flt.seen_from.isoformat() if flt.seen_from else "")}"></label><label>to<input type="date" '
            f'name="to" value="{e(flt.seen_to.isoformat() if flt.seen_to else "")}"></label>'
            '<button type="submit">Search</button>'
            f'<a href="{e(self._link(query, "/"))}">clear</a></form>'
        )

    def _index_body(
        self, query: Mapping[str, str], page: int, flt: _Filter, report: Mapping[str, Any]
    ) -> bytes:
        counts = self.store.study_counts()
        recent, summaries, total, pages, note = self._search(flt, page)

        out: list[str] = []
        if "retried" in query:
            out.append(f'<p class="note">Retry: {e(query["retried"])} dead letter(s) re-queued.</p>')
        out.append(self._search_form(query, flt))
        if not flt.active:
            out.append("<h2>Last hour</h2>")
            out.append(self._chart_svg())
            dead = self.store.studies(StudyState.DEAD)
            retry_all = f" {self._csrf_form(query, None)}" if dead else ""
            out.append(f"<h2>Dead letters ({len(dead)}){retry_all}</h2>")
            if dead:
                out.append(
                    "<table id=\"dead\"><tr><th>study UID</th><th>last seen</th><th>reason</th>"
                    "<th>backend message (redacted)</th><th></th></tr>"
                )
                for row in dead[:_DEAD_SHOWN]:
                    out.append(
                        f'<tr data-study="{e(row.study_uid)}"><td class="uid"><a href="'
                        f'{e(self._link(query, "/study/" + row.study_uid))}">{e(row.study_uid)}</a></td>'
                        f'<td class="when">{e(_when(row.last_seen))}</td>'
                        f"<td>{e(row.dead_reason or '')}</td>"
                        f"<td>{e(row.last_error or '')}</td>"
                        f"<td>{self._csrf_form(query, row.study_uid)}</td></tr>"
                    )
                out.append("</table>")
                if len(dead) > _DEAD_SHOWN:
                    out.append(f'<p class="note">{len(dead) - _DEAD_SHOWN} more: see ingest status.</p>')
            else:
                out.append('<p class="note">none</p>')

        title = "Search results" if flt.active else "Recent studies"
        out.append(f'<h2 id="results">{title} ({total}; page {page} of {pages})</h2>')
        if note:
            out.append(f'<p class="note" id="search-note">{e(note)}</p>')
        patient_th = "<th>patient</th><th>patient ID</th><th>birth date</th>" if self.show_patient else ""
        out.append(
            "<table id=\"studies\"><tr><th>last received</th><th>source</th><th>study UID</th>"
            f"<th>accession</th><th>modality</th><th>description</th>{patient_th}<th>series / instances</th>"
            "<th>state</th><th>backend id</th></tr>"
        )
        for row in recent:
            s = summaries.get(row.study_uid, _Summary())
            cls, state = _state(row)
            patient_td = (
                f"<td>{e(s.patient_name)}</td><td>{e(s.patient_id)}</td><td>{e(s.birth_date)}</td>"
                if self.show_patient
                else ""
            )
            out.append(
                f'<tr data-study="{e(row.study_uid)}" data-state="{e(row.state.value)}">'
                f'<td class="when">{e(_when(row.last_seen or s.received))}</td><td>{e(s.sources.text())}</td>'
                f'<td class="uid"><a href="{e(self._link(query, "/study/" + row.study_uid))}">'
                f"{e(row.study_uid)}</a></td><td>{e(s.accession)}</td>"
                f"<td>{e(_study_modalities(s.modalities))}</td><td>{e(s.description)}</td>{patient_td}"
                f"<td>{len(s.series)} / {row.instances}</td>"
                f'<td class="{cls} state">{e(_short(state, 160))}</td><td>{e(row.backend_id)}</td></tr>'
            )
        out.append("</table>")
        if not recent:
            out.append('<p class="note">no studies found</p>')
        out.append(self._pager(query, "/", page, pages, "newer", "older", flt.params()))
        return self._document("ingest status", self._header(report, counts, query, "/"), "".join(out))

    def _pager(
        self, query: Mapping[str, str], path: str, page: int, pages: int, back: str, on: str,
        extra: Mapping[str, str] | None = None,
    ) -> str:
        nav = []
        more = dict(extra or {})
        if page > 1:
            link = self._link(query, path, page=page - 1, **more)
            nav.append(f'<a rel="prev" href="{e(link)}">{e(back)}</a>')
        if page < pages:
            link = self._link(query, path, page=page + 1, **more)
            nav.append(f'<a rel="next" href="{e(link)}">{e(on)}</a>')
        return f"<nav>{''.join(nav)}</nav>"

    def _chart_svg(self) -> str:
        now = self.clock()
        cached = self._chart
        if cached is None or time.monotonic() - cached[0] > _CHART_CACHE_S:
            since = now.replace(second=0, microsecond=0) - timedelta(minutes=_CHART_MINUTES - 1)
            counts = self.store.minute_counts(since, _CHART_MINUTES)
            self._chart = cached = (time.monotonic(), counts, since)
        _, (received, pushed), since = cached
        w, h, pad = 720, 160, 24
        step = (w - 2 * pad) / _CHART_MINUTES
        top = max([1, *received, *pushed])
        bars: list[str] = []
        points: list[str] = []
        for i, (n_in, n_out) in enumerate(zip(received, pushed, strict=True)):
            x = pad + i * step
            bh = (h - 2 * pad) * n_in / top
            if n_in:
                minute = (since + timedelta(minutes=i)).strftime("%H:%M")
                bars.append(
                    f'<rect class="bar" x="{x + 1:.1f}" y="{h - pad - bh:.1f}" '
                    f'width="{max(step - 2, 1):.1f}" '
                    f'height="{bh:.1f}"><title>{e(minute)}: {n_in} instances</title></rect>'
                )
            y = h - pad - (h - 2 * pad) * n_out / top
            points.append(f"{x + step / 2:.1f},{y:.1f}")
        first = since.strftime("%H:%M")
        last = (since + timedelta(minutes=_CHART_MINUTES - 1)).strftime("%H:%M")
        return (
            f'<svg id="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
            f'aria-label="instances received (bars) and studies pushed (line) per minute, last hour">'
            f'<line class="axis" x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}"/>'
            f'<text x="{pad}" y="{h - 6}" font-size="11">{e(first)}</text>'
            f'<text x="{w - pad - 32}" y="{h - 6}" font-size="11">{e(last)} UTC</text>'
            f'<text x="{pad}" y="14" font-size="11">max {top}/min; bars: instances received, '
            f"line: studies pushed</text>"
            f'{"".join(bars)}<polyline class="line" points="{" ".join(points)}"/></svg>'
            f'<p class="note">Received: {sum(received)} instances; pushed: {sum(pushed)} studies '
            "(a study counts in the minute of its last push).</p>"
        )

    # -- a study -----------------------------------------------------------------------------------------

    def _study(self, uid: str) -> tuple[StudyRow, _StudyView]:
        """The study's row and its instance rows: loaded again only when the study changed (instance count,
        last instance received) or the loaded copy is older than ``_STUDY_CACHE_S``; one load per study at
        a time (a second builder waits for the first)."""
        row = self.store.study(uid)
        if row is None:
            raise _Answer(404, "no such study in the state store")
        key = (row.instances, row.last_seen)
        with self._studies_lock:
            lock = self._study_locks.setdefault(uid, threading.Lock())
        with lock:
            with self._studies_lock:
                view = self._studies.get(uid)
            if view is None or view.key != key or time.monotonic() - view.loaded > _STUDY_CACHE_S:
                records = sorted(  # series, then instance number (none last), then SOP Instance UID
                    self.store.instances(uid),
                    key=lambda r: (r.series_number is None, r.series_number or 0, r.series_uid,
                                   r.instance_number is None, r.instance_number or 0, r.sop_uid),
                )
                sources: dict[str, _Sources] = {}
                for g in self.store.study_series([uid]):
                    sources.setdefault(g.series_uid, _Sources()).add(g)
                view = _StudyView(key, time.monotonic(), records, sources,
                                  frozenset(r.sop_uid for r in records))
            with self._studies_lock:
                self._studies[uid] = view
                self._studies.move_to_end(uid)
                while len(self._studies) > _STUDY_VIEWS:
                    gone, _ = self._studies.popitem(last=False)
                    self._study_locks.pop(gone, None)
        return row, view

    def _imaging_study(self, uid: str, view: _StudyView) -> dict[str, Any] | str:
        """The ImagingStudy as the mapping builds it now, or why it is not shown."""
        if self.builder is None or not view.records:
            return "not available"
        try:
            resource = self.builder(view.records)
        except Exception as exc:  # the page shows why instead of failing
            LOGGER.debug("status page: building study %s failed", uid, exc_info=True)
            return f"could not build: {type(exc).__name__}"
        if not self.show_patient and "subject" in resource:
            resource = {**resource, "subject": _HIDDEN}
        return resource

    def _json_html(self, uid: str, view: _StudyView, query: Mapping[str, str]) -> str:
        if len(view.records) > _JSON_INLINE_MAX:
            link = self._link(query, f"/study/{uid}/imagingstudy.json")
            return (f'<p class="note">{len(view.records)} instances: the ImagingStudy is not shown inline '
                    f'(more than {_JSON_INLINE_MAX}); <a id="imagingstudy-link" href="{e(link)}">open it '
                    "as JSON</a>.</p>")
        with view.lock:
            if view.json_html is None:
                resource = self._imaging_study(uid, view)
                if isinstance(resource, str):
                    cls = "bad" if resource.startswith("could not") else "note"
                    view.json_html = f'<p class="{cls}">{e(resource)}</p>'
                else:
                    text = json.dumps(resource, indent=2, ensure_ascii=False)
                    view.json_html = (
                        '<p class="note">Built now from the stored instance rows by the current mapping. '
                        "The state store does not keep the JSON last written; the backend copy also holds "
                        "what the merge kept from other writers (notes, status, series it alone knows).</p>"
                        f'<pre id="imagingstudy">{e(text)}</pre>'
                    )
            return view.json_html

    async def study_page(self, request: web.Request) -> web.Response:
        uid = request.match_info["uid"]
        if not _UID_RE.match(uid):
            return self._plain(400, "bad request: not a Study Instance UID")
        query = dict(request.query)
        page = _page_number(query)
        return self._html(await self._off_loop(self._study_body, uid, query, page, report=True))

    def _study_body(self, uid: str, query: Mapping[str, str], page: int, report: Mapping[str, Any]) -> bytes:
        row, view = self._study(uid)
        records = view.records
        pages = max(1, -(-len(records) // PAGE_SIZE))
        _check_page(page, pages)
        counts = self.store.study_counts()
        cls, state = _state(row)
        out = [
            f'<nav><a href="{e(self._link(query, "/"))}">all studies</a></nav>',
            f'<h2>Study <span class="uid">{e(uid)}</span></h2>',
            f'<p>State: <span class="{cls}">{e(state)}</span>; backend id: {e(row.backend_id or "—")}; '
            f"version: {e(row.version_id or '—')}; last instance received {e(_when(row.last_seen))}.</p>",
        ]
        if row.state is StudyState.DEAD:
            out.append(self._csrf_form(query, uid))

        series: dict[str, tuple[InstanceRecord, int]] = {}
        for r in records:
            first, n = series.get(r.series_uid, (r, 0))
            series[r.series_uid] = (first, n + 1)
        modalities = {m.strip() for first, _ in series.values() if (m := first.modality)}
        out.append(f'<p>Modality (as the ImagingStudy has it): <span id="study-modality">'
                   f'{e(_study_modalities(modalities) or "—")}</span>; series modalities: '
                   f"{e(', '.join(sorted(modalities)) or '—')}.</p>")
        # in series-number order (a series without a number last), then by Series Instance UID
        ordered = sorted(series.items(), key=lambda item: (item[1][0].series_number is None,
                                                            item[1][0].series_number or 0, item[0]))
        out.append(
            f"<h3>Series ({len(series)})</h3><table id=\"series\"><tr><th>#</th><th>series UID</th>"
            "<th>modality</th><th>description</th><th>body part</th><th>instances</th><th>source</th></tr>"
        )
        for series_uid, (first, n) in ordered[:_SERIES_SHOWN]:
            out.append(
                f"<tr><td>{e(first.series_number)}</td><td class=\"uid\">{e(series_uid)}</td>"
                f"<td>{e(first.modality)}</td><td>{e(first.series_description)}</td>"
                f"<td>{e(first.body_part)}</td><td>{n}</td>"
                f"<td>{e(view.sources.get(series_uid, _Sources()).text())}</td></tr>"
            )
        out.append("</table>")
        if len(series) > _SERIES_SHOWN:
            out.append(f'<p class="note">{len(series) - _SERIES_SHOWN} more series: see ingest status.</p>')

        shown = records[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
        out.append(
            f"<h3>Instances ({len(records)}; page {page} of {pages})</h3><table id=\"instances\"><tr>"
            "<th>series #</th><th>instance #</th><th>SOP Instance UID</th><th>SOP Class UID</th></tr>"
        )
        for r in shown:
            out.append(
                f'<tr data-sop="{e(r.sop_uid)}"><td>{e(r.series_number)}</td><td>{e(r.instance_number)}</td>'
                f'<td class="uid">{e(r.sop_uid)}</td><td class="uid">{e(r.sop_class_uid)}</td></tr>'
            )
        out.append("</table>")
        out.append(self._pager(query, f"/study/{uid}", page, pages, "previous", "next"))

        self.quarantine.refresh()
        rejected = self.quarantine.naming(uid, view.sops)
        out.append(f"<h3>Rejected / quarantined ({len(rejected)})</h3>")
        out.append(
            '<p class="note">Quarantine side files whose detail names this study or one of its SOP Instance '
            "UIDs (the side files record no study UID of their own, so rejections that name neither are not "
            f"found here); the newest {_QUARANTINE_SHOWN} are listed.</p>"
        )
        if rejected:
            out.append(
                "<table id=\"quarantine\"><tr><th>time</th><th>reason</th><th>rule</th><th>detail</th>"
                "<th>source</th><th>kept</th></tr>"
            )
            for side in rejected[:_QUARANTINE_SHOWN]:
                out.append(
                    f'<tr><td class="when">{e(_side_time(side.get("time")))}</td>'
                    f"<td>{e(side.get('reason'))}</td>"
                    f"<td>{e(side.get('rule'))}</td><td>{e(side.get('detail'))}</td>"
                    f"<td>{e(_side_source(side.get('source')))}</td><td>{e(_yes_no(side.get('kept')))}</td></tr>"
                )
            out.append("</table>")
        else:
            out.append('<p class="note">none found</p>')

        out.append("<h3>ImagingStudy</h3>")
        out.append(self._json_html(uid, view, query))
        return self._document(f"study {uid}", self._header(report, counts, query), "".join(out))

    # -- quarantine and Storage Commitment --------------------------------------------------------------

    async def quarantine_page(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        page = _page_number(query)
        return self._html(await self._off_loop(self._quarantine_body, query, page, report=True))

    def _quarantine_body(self, query: Mapping[str, str], page: int, report: Mapping[str, Any]) -> bytes:
        counts = self.store.study_counts()
        self.quarantine.refresh()
        total, sides = self.quarantine.newest((page - 1) * PAGE_SIZE, PAGE_SIZE)
        pages = max(1, -(-total // PAGE_SIZE))
        _check_page(page, pages)
        out = [
            f"<h2>Quarantine ({total}; page {page} of {pages})</h2>",
            '<p class="note">Inputs refused or replaced, newest first, from the side files in the quarantine '
            "folder (looked at at most every 2 s). Kept: whether the input's bytes are in the quarantine "
            "(no: past <code>[quarantine] max_bytes</code> or the size cap; only the side file).</p>",
            '<table id="quarantine-list"><tr><th>time</th><th>reason</th><th>rule</th><th>source</th>'
            "<th>kept</th><th>detail</th></tr>",
        ]
        for side in sides:
            out.append(
                f'<tr><td class="when">{e(_side_time(side.get("time")))}</td>'
                f"<td>{e(side.get('reason') or '—')}</td>"
                f"<td>{e(side.get('rule') or '')}</td><td>{e(_side_source(side.get('source')))}</td>"
                f"<td>{e(_yes_no(side.get('kept')))}</td><td>{e(side.get('detail') or '')}</td></tr>"
            )
        out.append("</table>")
        if not sides:
            out.append('<p class="note">none</p>')
        out.append(self._pager(query, "/quarantine", page, pages, "newer", "older"))
        header = self._header(report, counts, query, "/quarantine")
        return self._document("ingest quarantine", header, "".join(out))

    async def commitments_page(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        page = _page_number(query)
        state = query.get("state", "").strip()
        if state and state not in _COMMITMENT_STATES:
            raise _Answer(400, f"bad request: state must be one of {', '.join(_COMMITMENT_STATES)}")
        return self._html(await self._off_loop(self._commitments_body, query, page, state, report=True))

    def _commitments_body(
        self, query: Mapping[str, str], page: int, state: str, report: Mapping[str, Any]
    ) -> bytes:
        counts = self.store.study_counts()
        by_state = self.store.commitment_counts()
        total = by_state.get(state, 0) if state else sum(by_state.values())
        pages = max(1, min(_COMMITMENT_PAGES, -(-total // PAGE_SIZE)))
        _check_page(page, pages)
        rows = self.store.commitments(state or None, page * PAGE_SIZE)[(page - 1) * PAGE_SIZE :]
        tabs = [f'<a href="{e(self._link(query, "/commitments"))}">all ({sum(by_state.values())})</a>']
        tabs += [
            f'<a href="{e(self._link(query, "/commitments", state=name))}">{e(name)} '
            f"({by_state.get(name, 0)})</a>"
            for name in _COMMITMENT_STATES
        ]
        out = [
            f"<h2>Storage Commitment ({e(state or 'all')}: {total}; page {page} of {pages})</h2>",
            f"<nav>{''.join(tabs)}</nav>",
            '<p class="note">Requests (N-ACTION) newest first, and their reports (N-EVENT-REPORT): committed '
            f"and failed are known once the result is decided. The newest {_COMMITMENT_PAGES * PAGE_SIZE} "
            "are listed; <code>ingest status</code> lists them all.</p>",
            '<table id="commitments"><tr><th>received</th><th>transaction UID</th><th>requester AE</th>'
            "<th>state</th><th>instances</th><th>committed</th><th>failed</th><th>attempts</th>"
            "<th>next attempt</th><th>reported</th><th>last error</th></tr>",
        ]
        for c in rows:
            cls = {"reported": "pushed", "abandoned": "dead", "pending": "pending"}.get(c.state, "")
            out.append(
                f'<tr data-transaction="{e(c.transaction_uid)}" data-state="{e(c.state)}">'
                f'<td class="when">{e(_when(c.received_at))}</td>'
                f'<td class="uid">{e(c.transaction_uid)}</td>'
                f"<td>{e(c.calling_ae)}</td><td class=\"{cls}\">{e(c.state)}</td><td>{c.instances}</td>"
                f"<td>{e('—' if c.committed is None else c.committed)}</td>"
                f"<td>{e('—' if c.failed is None else c.failed)}</td><td>{c.attempts}</td>"
                f'<td class="when">{e(_when(c.next_attempt_at) if c.state == "pending" else "—")}</td>'
                f'<td class="when">{e(_when(c.reported_at))}</td><td>{e(c.last_error or "")}</td></tr>'
            )
        out.append("</table>")
        if not rows:
            out.append('<p class="note">none</p>')
        extra = {"state": state} if state else {}
        out.append(self._pager(query, "/commitments", page, pages, "newer", "older", extra))
        header = self._header(report, counts, query, "/commitments")
        return self._document("ingest storage commitment", header, "".join(out))

    async def study_json(self, request: web.Request) -> web.Response:
        """``/study/<uid>/imagingstudy.json``: the ImagingStudy as the mapping builds it now (any size)."""
        uid = request.match_info["uid"]
        if not _UID_RE.match(uid):
            return self._plain(400, "bad request: not a Study Instance UID")
        body = await self._off_loop(self._study_json_body, uid)
        resp = web.Response(body=body, content_type="application/json", charset="utf-8")
        resp.headers.update(_SECURITY_HEADERS)
        return resp

    def _study_json_body(self, uid: str) -> bytes:
        _, view = self._study(uid)
        resource = self._imaging_study(uid, view)
        if isinstance(resource, str):
            raise _Answer(404 if resource == "not available" else 500, resource)
        return json.dumps(resource, indent=2, ensure_ascii=False).encode()


def mount_status(
    app: web.Application,
    settings: Settings,
    store: StateStore,
    health: Any,
    metrics: Metrics,
    *,
    node: str,
    builder: Builder | None = None,
) -> StatusPage:
    """Add the status page's routes to the admin ``app`` (before it is set up).

    Raises
    ------
    ConfigError
        When the configured ``[admin]`` token cannot be read (see :func:`admin_token`).
    """
    token = admin_token(settings)
    page = StatusPage(settings, store, health, metrics, node=node, builder=builder, token=token)
    page.mount(app)
    return page
