"""The status page on the admin port: ``/`` (studies, dead letters, the last hour), ``/study/<uid>``
(one page of its instances, its quarantine side files, its ImagingStudy), ``/study/<uid>/imagingstudy.json``.

Pages are built in the page's own small thread pool (:class:`StatusPage`), never on the event loop that
``ingest serve`` shares with the listener's hand-off and the relay; every list is paged or capped, and
quarantine side files are found through :class:`QuarantineIndex`, which reads each side file once.

Server-rendered HTML, every value through :func:`html.escape`; one small script (``/admin.js``, served
here, no CDN) swaps the page's ``<main>`` every 5 s. ``/healthz`` and ``/metrics`` (``ingest.app.serve``)
are not touched by anything here.

Security (``README.md`` "Status page"):

- Patient names, IDs and birth dates are shown only with ``[admin] show_patient = true``; the
  ImagingStudy JSON on a study page has its ``subject`` replaced otherwise.
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

from aiohttp import web

import ingest
from ingest.config import Settings
from ingest.core.records import InstanceRecord, PersonName
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
_CHART_CACHE_S = 4.0  # bounds the instance scan to one per 4 s, whatever the number of viewers
_UID_RE = re.compile(r"^[0-9.]{1,64}$")
_HIDDEN = "«hidden: [admin] show_patient = false»"

Builder = Callable[[Sequence[InstanceRecord]], dict[str, Any]]
_T = TypeVar("_T")


def utcnow() -> datetime:
    return datetime.now(UTC)


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


def _source(source: str) -> str:
    """``AE <title>`` for ``dimse:<title>``, else the source as recorded (``watch``, ``replay``...)."""
    return f"AE {source[6:]}" if source.startswith("dimse:") else source


@dataclass
class _Summary:
    """One study's fields for the list, aggregated from its series groups."""

    received: datetime | None = None
    sources: set[str] = field(default_factory=set)
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
        s.sources.add(_source(g.source))
        s.series.add(g.series_uid)
        r = g.sample
        if r.modality:
            s.modalities.add(r.modality)
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
td.uid{font-family:monospace;font-size:12px;word-break:break-all}
.ok{color:#17692b}.bad{color:#a31515}.warn{color:#8a5a00}
.dead{color:#a31515}.retrying{color:#8a5a00}.pending{color:#1f4e99}.pushed{color:#17692b}
pre{background:#fff;border:1px solid #ddd;padding:8px;overflow:auto;max-height:600px}
svg{background:#fff;border:1px solid #ddd}
.bar{fill:#6a9fd8}.line{fill:none;stroke:#c0392b;stroke-width:2}.axis{stroke:#999}
nav a{margin-right:12px}
.note{color:#555;font-style:italic}
"""

_JS = """\
// ingest status page: refresh <main> every 5 s from the same URL (no third-party code).
(function () {
  "use strict";
  var busy = false;
  function refresh() {
    if (busy || document.hidden) { return; }
    var active = document.activeElement;
    if (active && active.form) { return; }  // do not swap a form being used
    busy = true;
    fetch(window.location.href, {credentials: "same-origin", cache: "no-store",
                                 headers: {"X-Requested-With": "ingest-admin"}})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (text === null) { return; }
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.querySelector("main"), old = document.querySelector("main");
        var head = doc.querySelector("header"), oldHead = document.querySelector("header");
        if (fresh && old) { old.replaceWith(fresh); }
        if (head && oldHead) { oldHead.replaceWith(head); }
        document.documentElement.setAttribute("data-refreshed", String(Date.now()));
      })
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
                for word in side.words:
                    self._by_word.setdefault(word, set()).add(name)

    def _forget(self, names: set[str]) -> None:
        for name in names:
            side = self._sides.pop(name)
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
    sources: dict[str, set[str]]
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

    def mount(self, app: web.Application) -> None:
        app.router.add_route("*", "/", self._guard(self.index, ("GET", "HEAD")))
        app.router.add_route("*", "/study/{uid}", self._guard(self.study_page, ("GET", "HEAD")))
        app.router.add_route(
            "*", "/study/{uid}/imagingstudy.json", self._guard(self.study_json, ("GET", "HEAD"))
        )
        app.router.add_route("*", "/retry", self._guard(self.retry, ("POST",)))
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

    async def retry(self, request: web.Request) -> web.StreamResponse:
        """POST /retry (``uid``, ``csrf``): same as ``ingest retry --study UID`` (the guard has checked the
        token)."""
        form = await request.post()
        if not self._same_origin(request):
            return self._plain(403, "forbidden: cross-site request (Origin/Referer host differs from Host)")
        csrf = form.get("csrf")
        if not isinstance(csrf, str) or not hmac.compare_digest(csrf.encode(), self.csrf.encode()):
            return self._plain(403, "forbidden: missing or wrong CSRF token (reload the page)")
        uid = form.get("uid")
        if not isinstance(uid, str) or not _UID_RE.match(uid):
            return self._plain(400, "bad request: uid must be a Study Instance UID")
        n = await asyncio.to_thread(self.store.retry_dead, uid, self.clock())
        LOGGER.info("status page: retry of study %s re-queued %d dead letter(s)", uid, n)
        query: dict[str, str] = {"retried": str(n)}
        token = form.get("token")
        if self.token is not None and isinstance(token, str):
            query["token"] = token
        raise web.HTTPSeeOther("/?" + urlencode(query))

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

    def _header(self, report: Mapping[str, Any], counts: Mapping[StudyState, int]) -> str:
        reg = self.metrics.registry
        intake = reg.get_sample_value("ingest_intake_depth")
        spool = reg.get_sample_value("ingest_spool_bytes")
        items = [
            ("node", self.node),
            ("version", ingest.__version__),
            ("uptime", _duration(time.monotonic() - self.started)),
            ("status", report.get("status")),
        ]
        parts = ""
        for part in ("listener", "watcher", "relay", "backend", "store", "disk"):
            if part in report:
                value = str(report[part])
                cls = "ok" if value == "ok" else "bad"
                parts += (
                    f'<div><dt>{e(part)}</dt><dd class="{cls}" data-part="{e(part)}">{e(value)}</dd></div>'
                )
        more = [
            ("relay queue", counts.get(StudyState.PENDING, 0)),
            ("dead", counts.get(StudyState.DEAD, 0)),
            ("intake depth", "—" if intake is None else int(intake)),
            ("spool", _bytes(spool)),
            ("free disk", _bytes(report.get("disk_free_bytes"))),
        ]
        dl = "".join(f"<div><dt>{e(k)}</dt><dd>{e(v)}</dd></div>" for k, v in items)
        dl += parts
        dl += "".join(f"<div><dt>{e(k)}</dt><dd>{e(v)}</dd></div>" for k, v in more)
        return f'<header><h1>ingest status</h1><dl>{dl}</dl></header>'

    def _csrf_form(self, query: Mapping[str, str], uid: str) -> str:
        token = ""
        if self.token is not None and "token" in query:
            token = f'<input type="hidden" name="token" value="{e(query["token"])}">'
        return (
            f'<form method="post" action="/retry"><input type="hidden" name="csrf" value="{e(self.csrf)}">'
            f'<input type="hidden" name="uid" value="{e(uid)}">{token}'
            f'<button type="submit" data-retry="{e(uid)}">Retry</button></form>'
        )

    async def index(self, request: web.Request) -> web.Response:
        query = dict(request.query)
        page = _page_number(query)
        return self._html(await self._off_loop(self._index_body, query, page, report=True))

    def _index_body(self, query: Mapping[str, str], page: int, report: Mapping[str, Any]) -> bytes:
        counts = self.store.study_counts()
        total = sum(counts.values())
        pages = max(1, -(-total // PAGE_SIZE))
        _check_page(page, pages)
        recent = self.store.recent_studies(PAGE_SIZE, (page - 1) * PAGE_SIZE)
        summaries = _summaries(self.store.series_groups([r.study_uid for r in recent]))
        dead = self.store.studies(StudyState.DEAD)
        reasons = {row.study_uid: row.dead_reason for row in dead[:_DEAD_SHOWN]}
        chart = self._chart_svg()

        out: list[str] = []
        if "retried" in query:
            out.append(f'<p class="note">Retry: {e(query["retried"])} dead letter(s) re-queued.</p>')
        out.append("<h2>Last hour</h2>")
        out.append(chart)

        out.append(f'<h2>Dead letters ({len(dead)})</h2>')
        if dead:
            out.append(
                "<table id=\"dead\"><tr><th>study UID</th><th>last seen</th><th>reason</th>"
                "<th>backend message (redacted)</th><th></th></tr>"
            )
            for row in dead[:_DEAD_SHOWN]:
                out.append(
                    f'<tr data-study="{e(row.study_uid)}"><td class="uid"><a href="'
                    f'{e(self._link(query, "/study/" + row.study_uid))}">{e(row.study_uid)}</a></td>'
                    f"<td>{e(_when(row.last_seen))}</td><td>{e(reasons.get(row.study_uid) or '')}</td>"
                    f"<td>{e(row.last_error or '')}</td>"
                    f"<td>{self._csrf_form(query, row.study_uid)}</td></tr>"
                )
            out.append("</table>")
            if len(dead) > _DEAD_SHOWN:
                out.append(f'<p class="note">{len(dead) - _DEAD_SHOWN} more: see ingest status.</p>')
        else:
            out.append('<p class="note">none</p>')

        out.append(f"<h2>Recent studies ({total}; page {page} of {pages})</h2>")
        patient_th = "<th>patient</th><th>patient ID</th><th>birth date</th>" if self.show_patient else ""
        out.append(
            "<table id=\"studies\"><tr><th>received</th><th>source</th><th>study UID</th><th>accession</th>"
            f"<th>modality</th><th>description</th>{patient_th}<th>series / instances</th><th>state</th>"
            "<th>backend id</th></tr>"
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
                f"<td>{e(_when(s.received or row.last_seen))}</td><td>{e(', '.join(sorted(s.sources)))}</td>"
                f'<td class="uid"><a href="{e(self._link(query, "/study/" + row.study_uid))}">'
                f"{e(row.study_uid)}</a></td><td>{e(s.accession)}</td>"
                f"<td>{e(', '.join(sorted(s.modalities)))}</td><td>{e(s.description)}</td>{patient_td}"
                f"<td>{len(s.series)} / {row.instances}</td>"
                f'<td class="{cls}">{e(state)}</td><td>{e(row.backend_id)}</td></tr>'
            )
        out.append("</table>")
        out.append(self._pager(query, "/", page, pages, "newer", "older"))
        return self._document("ingest status", self._header(report, counts), "".join(out))

    def _pager(self, query: Mapping[str, str], path: str, page: int, pages: int, back: str, on: str) -> str:
        nav = []
        if page > 1:
            nav.append(f'<a href="{e(self._link(query, path, page=page - 1))}">{e(back)}</a>')
        if page < pages:
            nav.append(f'<a href="{e(self._link(query, path, page=page + 1))}">{e(on)}</a>')
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
                records = self.store.instances(uid)
                sources: dict[str, set[str]] = {}
                for g in self.store.series_groups([uid]):
                    sources.setdefault(g.series_uid, set()).add(_source(g.source))
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
        out.append(
            f"<h3>Series ({len(series)})</h3><table id=\"series\"><tr><th>#</th><th>series UID</th>"
            "<th>modality</th><th>description</th><th>body part</th><th>instances</th><th>source</th></tr>"
        )
        for series_uid, (first, n) in list(series.items())[:_SERIES_SHOWN]:
            out.append(
                f"<tr><td>{e(first.series_number)}</td><td class=\"uid\">{e(series_uid)}</td>"
                f"<td>{e(first.modality)}</td><td>{e(first.series_description)}</td>"
                f"<td>{e(first.body_part)}</td><td>{n}</td>"
                f"<td>{e(', '.join(sorted(view.sources.get(series_uid, set()))))}</td></tr>"
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
                    f"<tr><td>{e(side.get('time'))}</td><td>{e(side.get('reason'))}</td>"
                    f"<td>{e(side.get('rule'))}</td><td>{e(side.get('detail'))}</td>"
                    f"<td>{e(side.get('source'))}</td><td>{e(side.get('kept'))}</td></tr>"
                )
            out.append("</table>")
        else:
            out.append('<p class="note">none found</p>')

        out.append("<h3>ImagingStudy</h3>")
        out.append(self._json_html(uid, view, query))
        return self._document(f"study {uid}", self._header(report, counts), "".join(out))

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
