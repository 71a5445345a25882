"""Error mapping: every foreign error of a backend exchange becomes :mod:`ingest.errors`, in one place.

:func:`map_errors` classifies gql, aiohttp, asyncio timeout and graphql-core validation errors (GraphQL
``errors[]``, HTTP status, FHIR OperationOutcome) as retryable or permanent (docs/reliability.md); this is
the only module of ``ingest`` that handles them.

Backend messages may quote the request, i.e. patient data (graphql-js "got invalid value", HAPI's
"Error was: ...", Jackson's "from String ...", servers that echo the query and its variables). They
reach a log line above DEBUG, an exception message (and so the state store's ``last_error`` and
``ingest status``) only through :func:`redact_backend_message`, an allow-list that keeps rule words,
codes, element paths and schema names and withholds everything else; the whole message is logged at
DEBUG only (see docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import email.utils
import html
import json
import logging
import re
import ssl
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
from gql.transport.exceptions import (
    TransportClosed,
    TransportConnectionFailed,
    TransportError,
    TransportProtocolError,
    TransportQueryError,
    TransportServerError,
)
from graphql import GraphQLError, GraphQLInputObjectType, GraphQLObjectType, GraphQLSchema

from ingest.errors import BackendStorageError, PermanentSinkError, RetryableSinkError, SinkError

__all__ = [
    "PLACEHOLDER",
    "Exchange",
    "QueryErrors",
    "UntrustedCertificateError",
    "describe",
    "http_error",
    "map_errors",
    "redact_backend_message",
    "request_words",
    "safe_id",
    "schema_names",
]

LOGGER = logging.getLogger(__name__)

_NOT_FOUND_RE: Final = re.compile(r"\b(not found|gone|deleted)\b", re.IGNORECASE)


@dataclass
class Exchange:
    """What one HTTP exchange showed us beyond what gql reports (filled in per request by the hooks of
    :func:`ingest.adapters.graphql.client.recording`)."""

    status: int | None = None
    retry_after: str | None = None
    body: Any = None


class QueryErrors(PermanentSinkError):
    """HTTP 200 with ``errors[]``: the backend executed the request and refused it."""

    def __init__(self, message: str, messages: tuple[str, ...]) -> None:
        super().__init__(message)
        self.messages = messages

    @property
    def not_found(self) -> bool:
        return bool(self.messages) and all(_NOT_FOUND_RE.search(m) for m in self.messages)


# --------------------------------------------------------------------------------------------------------
# Backend messages: an allow-list redaction (they may quote the request, i.e. patient data)

#: What stands in for everything in a backend message that is not known to be safe.
PLACEHOLDER: Final = "«…»"
_MAX_REDACTED: Final = 400  # characters of one redacted message (``ingest status`` shows 120)

# Words a backend's error wording is made of (compared lower-cased; an ALL-CAPS token must be in
# _UPPER_WORDS instead, so a DICOM name like DOE or a code like MRI never matches). Capitalised, a word
# counts only at the start of a sentence (a name like "Patient Can Field" does not pass), and never when
# the request that failed holds it (see request_words).
_RULE_WORDS_TEXT: Final = """
    a about accept accepted accepts after against allowed already also an and any are argument arguments
    array as at attribute attributes bad be been before body boolean both but by can can't cannot
    canonical cardinality character characters class code coding column comma constraint constraints
    contain contained contains content could data database date datetime decimal declared defined deleted
    deserialize did didn't directive disabled disk does doesn't either element elements empty encoded end
    endpoint entries enum error errors exceeds executing expected expecting expression extension
    extensions failed failure false field fields for forbidden format found from full gone got graphql has
    have id identifier imagingstudy in incorrect input instant integer internal introspection invalid
    invariant is isn't it its json later length line list match matches maximum mean met minimum missing
    more must mutation no non non-null not null number object of on one only operation operationoutcome or
    out parameter parse parsing path patient position positiveint processing profile property provided
    query reason reference referenced represent request requested required resource resourcetype retry
    rule schema separate server should source storage string structure such supported syntax than that the
    this time to token type types unavailable unexpected unknown unrecognized unsignedint unsupported
    unterminated uri url uuid valid validation value values variable variables was were when which while
    with without you
"""
_RULE_WORDS: Final = frozenset(_RULE_WORDS_TEXT.split())
_UPPER_WORDS: Final = frozenset({"FHIR", "HTTP", "ID", "JSON", "UNKNOWN", "URI", "URL", "UTF-8", "XML"})
# Type names a message may use mid-sentence ("from String", "Expected type Reference"): the GraphQL
# scalars, FHIR R4 data types and the resource types ingest reads or writes.
_TYPE_NAMES_TEXT: Final = """
    String Int Float Boolean ID DateTime Date Time Instant Uri Url Canonical Oid Uuid Id Code Markdown
    Decimal Integer PositiveInt UnsignedInt Base64Binary Element BackboneElement Resource DomainResource
    Extension Meta Narrative Reference Identifier Coding CodeableConcept Period Annotation Quantity
    Attachment HumanName ContactPoint Address ImagingStudy Patient Endpoint Device Organization
    Practitioner Provenance OperationOutcome Bundle
"""
_TYPE_NAMES: Final = frozenset(_TYPE_NAMES_TEXT.split())
# A quoted string right after one of these words names a part of the request (a field, a type, a path),
# not a value: kept when it also looks like a name.
_NAMING_WORDS: Final = frozenset(
    {
        "argument", "attribute", "class", "directive", "element", "enum", "field", "fields", "input",
        "mean", "operation", "parameter", "property", "type", "variable",
    }
)
_NUMBER_WORDS: Final = frozenset({"column", "line", "offset", "position"})  # "line: 1, column: 57"
# Java packages, for Jackson's "value of type `java.lang.String`" wording
_JAVA_ROOTS: Final = frozenset({"ca", "com", "io", "jakarta", "java", "javax", "org"})

_SEGMENT: Final = r"[^\W\d][\w^]*(?:-[\w^]+)*(?:\[(?:\d+|x|\*)?\])*"
_TOKEN_RE: Final = re.compile(
    r"(?P<ws>\s+)"
    r"|(?P<quoted>\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`|“[^”]*”|‘[^’]*’)"
    r"|(?P<open>[\"'`“‘].*)"  # an unterminated quote: everything after it is withheld
    r"|(?P<brace>\{)"
    rf"|(?P<word>\$?{_SEGMENT}(?:\.{_SEGMENT})*(?:'[a-z]{{1,2}}\b)?)"
    r"|(?P<number>\d[\w.:/+^-]*)"
    r"|(?P<punct>[.,;:!?()\[\]<>=|/+*&#%@~—–-])"
    r"|(?P<other>.)",
    re.DOTALL,
)
_NAME_RE: Final = re.compile(r"^\[*\$?[_A-Za-z][_0-9A-Za-z]*(?:\.[_A-Za-z][_0-9A-Za-z]*)*[!\]]*$")
_ELEMENT_RE: Final = re.compile(r"^[a-z][A-Za-z0-9]*(?:\[(?:\d+|x|\*)?\])*$")
# Where a path may start when the schema is not known yet (or in any case): GraphQL argument names
# ingest uses, the root types, and the resource types ingest writes
_PATH_HEADS: Final = frozenset(
    {"res", "input", "Query", "QueryType", "Mutation", "MutationType", "ImagingStudy", "Patient", "Endpoint"}
)
# FHIR invariant keys of the types ingest writes (a prefix of the type and one digit: ele-1, ext-1, dom-3,
# ref-1, img-3) and HAPI's message codes (HAPI-0450); an identifier such as ``mrn-42`` or ``ext-12`` is
# neither.
_RULE_KEY_RE: Final = re.compile(
    r"^(?:(?:ele|ext|dom|ref|per|qty|sqty|att|txt|img|pat|end|idf|cod|ann|rng|rat|tim|sig|inv)-\d|HAPI-\d{4})$"
)
# GraphQL ``extensions.code``: SCREAMING_SNAKE_CASE with at least one underscore, or one of these words
_GRAPHQL_CODE_RE: Final = re.compile(r"^[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+$")
_GRAPHQL_CODE_WORDS: Final = frozenset({"FORBIDDEN", "UNAUTHENTICATED", "UNAUTHORIZED", "INTERNAL"})
# OperationOutcome.issue.code: the FHIR R4 IssueType value set
_ISSUE_TYPES_TEXT: Final = """
    invalid structure required value invariant security login unknown expired forbidden suppressed
    processing not-supported duplicate multiple-matches not-found deleted too-long code-invalid extension
    too-costly business-rule conflict transient lock-error no-store exception timeout incomplete throttled
    informational
"""
_ISSUE_TYPES: Final = frozenset(_ISSUE_TYPES_TEXT.split())
_SEVERITIES: Final = frozenset({"fatal", "error", "warning", "information"})
_PLACEHOLDERS_RE: Final = re.compile(rf"{re.escape(PLACEHOLDER)}(?:[\s,;]*{re.escape(PLACEHOLDER)})+")


def _bare(segment: str) -> str:
    return segment.split("[", 1)[0]


# Keys of a request whose string values are structure, not data about a patient or a study: their words
# stay usable in a message (``ImagingStudy``, ``available``, a coding system, a modality code, a UID).
_STRUCTURAL_KEYS: Final = frozenset(
    {"resourceType", "status", "system", "code", "uid", "url", "profile", "use", "mode", "type", "version"}
)
_SPLIT_RE: Final = re.compile(r"[\W_]+")
_CELL_RE: Final = re.compile(r"<td\b[^>]*>(.*?)</td>", re.DOTALL)
_TAG_RE: Final = re.compile(r"<[^>]*>")


def _word_forms(value: str) -> Iterator[str]:
    """A value and its words, case-folded, as a message may quote them: whole (``doe^john``), without its
    separators (``19700412`` for ``1970-04-12``, ``mrn42``) and each word (``doe``, ``john``, ``mrn``).
    Numbers of one or two digits alone are left out (``0`` of a path index, ``1`` of ``line: 1``)."""
    folded = value.casefold().strip()
    if not folded:
        return
    yield folded
    yield _SPLIT_RE.sub("", folded)
    for part in _SPLIT_RE.split(folded):
        if part and not (part.isdigit() and len(part) < 3):
            yield part


def request_words(request: Any) -> frozenset[str]:
    """Every word of the string values of a request (its GraphQL variables or FHIR JSON body) but for
    structural keys (:data:`_STRUCTURAL_KEYS`), a Coding's ``display`` and a narrative's headings: what
    :func:`redact_backend_message` withholds even where it reads like a rule word or a schema name (a
    patient called "Patient Can Field", an id ``ext-12``)."""
    out: set[str] = set()

    def walk(value: Any, key: str | None) -> None:
        if isinstance(value, str):
            if key == "div":  # a narrative: its cells are data, its headings ingest's own labels
                for cell in _CELL_RE.findall(value):
                    out.update(_word_forms(html.unescape(_TAG_RE.sub(" ", cell))))
            elif key not in _STRUCTURAL_KEYS:
                out.update(_word_forms(value))
        elif isinstance(value, Mapping):
            coding = "system" in value and "code" in value  # a Coding's display is terminology
            for k, v in value.items():
                if not (coding and k == "display"):
                    walk(v, str(k))
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v, key)

    walk(request, None)
    out.discard("")
    return frozenset(out)


def _withheld(token: str, withhold: Collection[str]) -> bool:
    """Whether a token of a message is, holds or spells a value of the request (``withhold``)."""
    if not withhold:
        return False
    folded = token.casefold()
    if folded in withhold or _SPLIT_RE.sub("", folded) in withhold:
        return True
    return any(part in withhold for part in _SPLIT_RE.split(folded) if part)


def _is_path(token: str, names: Collection[str]) -> bool:
    """A FHIRPath / GraphQL path (``ImagingStudy.series[0].modality``, ``res.started``) or a qualified name
    (``MutationType.ImagingStudyUpdate``, ``java.lang.String``): made of names only, never of values."""
    segments = token.lstrip("$").split(".")
    if len(segments) < 2:
        return False
    head, rest = _bare(segments[0]), segments[1:]
    if head in _JAVA_ROOTS and all(_NAME_RE.match(s) for s in rest):
        return True
    if head not in names and head not in _PATH_HEADS:
        return False
    return all(_bare(s) in names or _ELEMENT_RE.match(s) for s in rest)


def _keep_word(token: str, names: Collection[str], *, mid_sentence: bool) -> bool:
    """Whether an unquoted token of a backend message is a rule word, a name or a path (never a value).

    A capitalised rule word right after another word (``Patient Can Field``) is a name, not wording:
    error messages capitalise only the first word of a sentence.
    """
    if "." in token:
        return _is_path(token, names)
    base = token.lstrip("$")
    if token.startswith("$"):
        return bool(_NAME_RE.match(base))  # a GraphQL variable: ingest named it
    if _RULE_KEY_RE.match(token) or token in names or token in _UPPER_WORDS or token in _TYPE_NAMES:
        return True
    if len(token) > 1 and token.isupper():
        return False  # DOE, MRI, ACC123: only the ALL-CAPS words above
    if mid_sentence and token[:1].isupper():
        return False
    return _bare(token).lower() in _RULE_WORDS


def _keep_quoted(content: str, previous: str, names: Collection[str]) -> bool:
    """Whether a quoted part of a backend message names something (``Field "subject"``) or is a path."""
    if not _NAME_RE.match(content) and not _is_path(content, names):
        return False
    if content.startswith("$") or content in names or _is_path(content, names):
        return True
    if previous not in _NAMING_WORDS:
        return False
    bare = content.strip("[]!")
    # an element or argument name (``"subject"``, ``"ifMatch"``), a qualified field name
    # (``"MutationType.ImagingStudyUpdate"``) or a type (``type "ReferenceCreate!"``); a capitalised word
    # after another naming word (``field "Doe"``) is withheld
    return bare[:1].islower() or "." in bare or previous == "type" or bare in _TYPE_NAMES or bare in names


def _brace_end(text: str, start: int) -> int:
    """The index after the ``}`` that closes the ``{`` at ``start`` (quotes respected), or ``len(text)``."""
    depth, i, quote = 0, start, ""
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(text)


def redact_backend_message(
    text: str, *, names: Collection[str] = (), withhold: Collection[str] = ()
) -> str:
    """A backend's error message with every value withheld: safe for a log line above DEBUG, an
    exception message and the state store's ``last_error``.

    An allow-list, not a deny-list: rule words (``Invalid``, ``Constraint``, ``not``, ``met``, ...), rule
    keys (``ext-1``, ``HAPI-0450``), GraphQL variables (``$res``), paths made of names
    (``ImagingStudy.series[0].modality``) and quoted names after a naming word (``Field "subject"``) are
    kept; every other quoted string, JSON or GraphQL ``{...}`` fragment, number (unless a line or column)
    and word becomes ``«…»``, and so does a capitalised rule word after another word, and any token that
    holds a word of ``withhold`` (the request's values). Whitespace (line breaks included) becomes one
    space, so the result is one line without control characters.

    Parameters
    ----------
    text:
        The backend's message (GraphQL ``errors[].message``, OperationOutcome ``details.text`` /
        ``diagnostics``, ...).
    names:
        Names of the backend schema (types, fields, arguments): kept wherever they appear, unless
        withheld.
    withhold:
        The words of the request that failed (:func:`request_words`): withheld wherever they appear,
        even as a rule word, a schema name, a rule key or part of a path.

    Returns
    -------
    str
        At most 400 characters.

    Examples
    --------
    >>> redact_backend_message("Invalid dateTime format (ImagingStudy.started): 'May 1st 2024'")
    'Invalid dateTime format (ImagingStudy.started): «…»'
    """
    out: list[str] = []
    previous = ""  # the last word (lower-cased) before the current token, "" after punctuation
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        assert m is not None  # the last alternative matches any character
        kind, token = m.lastgroup, m.group()
        pos = m.end()
        if kind == "ws":
            out.append(" ")
            continue
        if kind == "quoted":
            content = token[1:-1]
            keep = _keep_quoted(content, previous, names) and not _withheld(content, withhold)
            out.append(token if keep else PLACEHOLDER)
        elif kind == "brace":
            pos = _brace_end(text, m.start())
            out.append(PLACEHOLDER)
        elif kind == "word":
            keep = _keep_word(token, names, mid_sentence=bool(previous)) and not _withheld(token, withhold)
            out.append(token if keep else PLACEHOLDER)
        elif kind == "number":
            keep = previous in _NUMBER_WORDS and token.isdigit() and not _withheld(token, withhold)
            out.append(token if keep else PLACEHOLDER)
        elif kind == "punct":
            out.append(token)
            if (token == ":" and previous in _NUMBER_WORDS) or (token == "=" and previous in _NAMING_WORDS):
                continue  # "line: 1", HAPI's [element="family"]
        else:  # "open" (the rest of the text) and any other character
            out.append(PLACEHOLDER)
        previous = token.lower() if kind == "word" else ""
    redacted = _PLACEHOLDERS_RE.sub(PLACEHOLDER, "".join(out)).strip()
    if len(redacted) > _MAX_REDACTED:
        redacted = redacted[: _MAX_REDACTED - 1].rstrip() + "…"
    return redacted


def schema_names(schema: GraphQLSchema) -> frozenset[str]:
    """The names a backend schema defines (types, their fields and arguments, input fields): the
    vocabulary :func:`redact_backend_message` keeps, so messages still say which element failed."""
    out: set[str] = set()
    for tname, t in schema.type_map.items():
        if tname.startswith("__"):
            continue
        out.add(tname)
        if isinstance(t, GraphQLObjectType):
            for fname, fdef in t.fields.items():
                out.add(fname)
                out.update(fdef.args)
        elif isinstance(t, GraphQLInputObjectType):
            out.update(t.fields)
    return frozenset(out)


def _path_text(path: Any, withhold: Collection[str] = ()) -> str | None:
    """A GraphQL error ``path`` (response keys and list indices) as ``ImagingStudyCreate.series[0]``."""
    if not isinstance(path, list) or not path:
        return None
    text = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        elif isinstance(part, str) and _NAME_RE.match(part) and not _withheld(part, withhold):
            text += f".{part}" if text else part
        else:
            text += f".{PLACEHOLDER}"
    return text


def _graphql_code(code: Any, withhold: Collection[str]) -> str | None:
    """A GraphQL ``extensions.code`` when it is a code (``BAD_USER_INPUT``), not a word of the request."""
    if not isinstance(code, str) or _withheld(code, withhold):
        return None
    return code if _GRAPHQL_CODE_RE.match(code) or code in _GRAPHQL_CODE_WORDS else None


def _graphql_messages(
    errors: Any, names: Collection[str] = (), withhold: Collection[str] = ()
) -> tuple[str, ...]:
    """Each GraphQL error redacted, with its ``extensions.code`` and ``path`` (names only)."""
    out: list[str] = []
    for err in errors if isinstance(errors, list) else [errors]:
        if not isinstance(err, Mapping):
            out.append(redact_backend_message(str(err), names=names, withhold=withhold))
            continue
        text = redact_backend_message(
            str(err.get("message") or "no message"), names=names, withhold=withhold
        )
        extras: list[str] = []
        extensions = err.get("extensions")
        if isinstance(extensions, Mapping):
            code = _graphql_code(extensions.get("code"), withhold)
            if code:
                extras.append(f"code {code}")
            outcome = _outcome_text(extensions.get("outcome"), names, withhold)
            if outcome:
                extras.append(outcome)
        path = _path_text(err.get("path"), withhold)
        if path:
            extras.append(f"path {path}")
        out.append(f"{text} [{'; '.join(extras)}]" if extras else text)
    return tuple(out)


def _outcome_text(body: Any, names: Collection[str] = (), withhold: Collection[str] = ()) -> str | None:
    """The issues of a FHIR OperationOutcome body, redacted, or ``None`` if it is not one.

    Each issue as ``<severity> <code> at <expression>: <details.text or diagnostics>``: severity and
    code are kept when they are FHIR codes, expressions when they are paths, the texts are redacted.
    """
    if not isinstance(body, Mapping) or body.get("resourceType") != "OperationOutcome":
        return None
    texts: list[str] = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, Mapping):
            continue
        head: list[str] = []
        severity, code = issue.get("severity"), issue.get("code")
        if isinstance(severity, str) and severity in _SEVERITIES:
            head.append(severity)
        if isinstance(code, str) and code in _ISSUE_TYPES:
            head.append(code)
        expressions = issue.get("expression") or issue.get("location") or []
        paths = [
            redact_backend_message(e, names=names, withhold=withhold)
            for e in (expressions if isinstance(expressions, list) else [expressions])
            if isinstance(e, str)
        ]
        if paths:
            head.append("at " + ", ".join(paths))
        details = issue.get("details")
        text = (details.get("text") if isinstance(details, Mapping) else None) or issue.get("diagnostics")
        body_text = redact_backend_message(str(text), names=names, withhold=withhold) if text else ""
        summary = " ".join(head) or "issue"
        texts.append(f"{summary}: {body_text}" if body_text else summary)
    return "; ".join(texts) or "OperationOutcome without issues"


def _retry_after(value: str | None) -> float | None:
    """HTTP Retry-After: delta-seconds or an HTTP-date (RFC 9110 10.2.3), as seconds from now."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _no_store(body: Any) -> bool:
    """An OperationOutcome saying the backend's persistent store is unavailable (issue code ``no-store``:
    its database or disk is full), not that this request is wrong."""
    if not isinstance(body, Mapping) or body.get("resourceType") != "OperationOutcome":
        return False
    issues = body.get("issue")
    return isinstance(issues, list) and any(
        isinstance(i, Mapping) and i.get("code") == "no-store" for i in issues
    )


def _http_error(
    what: str, code: int, exchange: Exchange, names: Collection[str], withhold: Collection[str] = ()
) -> SinkError:
    outcome = _outcome_text(exchange.body, names, withhold)
    if exchange.body is not None:
        LOGGER.debug("%s: HTTP %d body (unredacted): %s", what, code, _debug_json(exchange.body))
    detail = f": {outcome}" if outcome else ""
    if code == 401:
        return RetryableSinkError(f"{what}: backend answered HTTP 401 (unauthorized)", code=code)
    if code == 429 or code == 408 or code >= 500:
        hint = _retry_after(exchange.retry_after)
        kind = BackendStorageError if code == 503 and _no_store(exchange.body) else RetryableSinkError
        return kind(f"{what}: backend answered HTTP {code}{detail}", code=code, retry_after=hint)
    return PermanentSinkError(f"{what}: backend refused the request (HTTP {code}){detail}", code=code)


def http_error(
    what: str,
    code: int,
    body: Any,
    retry_after: str | None,
    *,
    names: Collection[str] = (),
    withhold: Collection[str] = (),
) -> SinkError:
    """The error for an HTTP status outside 2xx of a request that is not GraphQL (FHIR REST): retryable
    for 401, 408, 429 and 5xx, permanent otherwise; an OperationOutcome body is redacted into it
    (``withhold``: :func:`request_words` of the request)."""
    exchange = Exchange(status=code, retry_after=retry_after, body=body)
    return _http_error(what, code, exchange, names, withhold)


def _debug_json(value: Any) -> str:
    """``value`` as one escaped line for a DEBUG record (the only place a backend message is kept whole)."""
    try:
        return json.dumps(value, ensure_ascii=True, default=str)[:8000]
    except (TypeError, ValueError):
        return repr(value)[:8000]


class UntrustedCertificateError(RetryableSinkError):
    """The backend's TLS certificate does not verify (at :meth:`GraphQLSink.connect`: a ConfigError)."""


def _certificate_error(what: str, cause: BaseException, ca: Path | None) -> UntrustedCertificateError:
    cert = getattr(cause, "certificate_error", cause)  # aiohttp.ClientConnectorCertificateError
    reason = str(getattr(cert, "verify_message", None) or getattr(cert, "reason", None) or "unverified")
    reason = "".join(ch if ch.isprintable() else "?" for ch in reason)[:200]  # OpenSSL's words, one line
    if ca is None:
        hint = (
            "verified against the system CA store; if the backend's certificate comes from a private CA, "
            "set [backend] ca to that CA's PEM bundle"
        )
    else:
        hint = f"verified against [backend] ca {ca} only; is it the CA that signed the backend's certificate?"
    return UntrustedCertificateError(
        f"{what}: the backend's TLS certificate is not trusted ({reason}): {hint}"
    )


def _is_certificate_error(exc: BaseException | None) -> bool:
    return isinstance(exc, aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError)


@contextlib.contextmanager
def map_errors(
    what: str,
    exchange: Exchange,
    timeout_s: float,
    *,
    names: Collection[str] = (),
    withhold: Collection[str] = (),
    ca: Path | None = None,
) -> Iterator[None]:
    """Turn every gql / aiohttp / asyncio / graphql-core error into :mod:`ingest.errors`.

    The one place where foreign errors are classified. Retryable: connection refused/reset, DNS,
    timeouts, HTTP 401/408/429/5xx, an untrusted TLS certificate (a :class:`UntrustedCertificateError`).
    Permanent: GraphQL ``errors[]``, HTTP 400 (OperationOutcome) and other 4xx, non-GraphQL answers,
    documents that do not validate locally.

    Backend messages only reach an exception message through :func:`redact_backend_message` (``names``:
    the schema's names it keeps; ``withhold``: :func:`request_words` of the request, withheld wherever
    they appear); the whole message is logged at DEBUG only. Exceptions that carry the
    backend's words are not chained, so no traceback shows them either.
    """
    try:
        yield
    except SinkError:
        raise
    except TransportQueryError as exc:
        raw = exc.errors if exc.errors is not None else str(exc)
        LOGGER.debug("%s: backend errors (unredacted): %s", what, _debug_json(raw))
        messages = _graphql_messages(raw, names, withhold)
        raise QueryErrors(f"{what}: backend rejected the request: {'; '.join(messages)}", messages) from None
    except TransportServerError as exc:
        code = exc.code if exc.code is not None else exchange.status
        if code is None:
            raise RetryableSinkError(f"{what}: backend failed without an HTTP status") from None
        raise _http_error(what, code, exchange, names, withhold) from None
    except TransportProtocolError as exc:
        LOGGER.debug("%s: not a GraphQL answer (unredacted): %s", what, _debug_json(str(exc)))
        status = exchange.status if exchange.status is not None else "?"
        raise PermanentSinkError(
            f"{what}: the backend's answer is not a GraphQL response (HTTP {status}); is the URL right?",
            code=exchange.status,
        ) from None
    except TransportConnectionFailed as exc:
        cause = exc.__cause__
        if isinstance(cause, TimeoutError):
            raise RetryableSinkError(f"{what}: no answer within {timeout_s:g} s") from exc
        if _is_certificate_error(cause):
            assert cause is not None
            raise _certificate_error(what, cause, ca) from exc
        if cause is None or isinstance(cause, aiohttp.ClientError | OSError):
            raise RetryableSinkError(f"{what}: connection failed: {describe(cause or exc)}") from exc
        raise PermanentSinkError(f"{what}: could not send the request: {type(cause).__name__}") from exc
    except TransportClosed as exc:
        raise RetryableSinkError(f"{what}: the backend session is closed") from exc
    except TransportError as exc:
        raise RetryableSinkError(f"{what}: transport failed: {type(exc).__name__}") from None
    except TimeoutError as exc:  # gql's execute_timeout (anyio.fail_after) and asyncio timeouts
        raise RetryableSinkError(f"{what}: no answer within {timeout_s:g} s") from exc
    except (aiohttp.ClientError, OSError) as exc:
        if _is_certificate_error(exc):
            raise _certificate_error(what, exc, ca) from exc
        raise RetryableSinkError(f"{what}: connection failed: {describe(exc)}") from exc
    except GraphQLError as exc:  # local validation of the document against the backend schema
        raise PermanentSinkError(
            f"{what}: the document does not validate against the backend schema: {exc.message}"
        ) from exc


def describe(exc: BaseException) -> str:
    """A connection failure in a sentence: ``cannot connect to host:port (connection refused)`` for
    aiohttp's connector errors (whose own text names TLS settings even for an http URL), else the
    exception's type and text."""
    if isinstance(exc, aiohttp.ClientConnectorError) and not _is_certificate_error(exc):
        os_error = exc.os_error
        why = (os_error.strerror or str(os_error)) if os_error is not None else ""
        return f"cannot connect to {exc.host}:{exc.port} ({why.lower() or 'unreachable'})"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_FHIR_ID_RE: Final = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")  # FHIR R4 id datatype


def safe_id(value: Any) -> str:
    """A resource id the backend answered, for a message: only when it is a FHIR id (untrusted text)."""
    return value if isinstance(value, str) and _FHIR_ID_RE.match(value) else PLACEHOLDER
