"""Association negotiation and policy of the DICOM edge (PS3.8 9.3.2-9.3.4, PS3.7 D.3.3).

- :func:`check_associate_rq` validates an A-ASSOCIATE-RQ byte by byte before it is decoded: an invalid
  calling / called AE title gets A-ASSOCIATE-RJ (1,1,3) / (1,1,7), an even presentation context ID or
  an invalid UID (1,2,1), broken item framing an A-ABORT; log lines show escaped values.
- :func:`read_associate_rq` reads the first PDU of a connection against an absolute deadline and a
  size cap (a trickle does not extend the deadline; a larger declared length is refused unread).
- :class:`Negotiator` decodes the request with pynetdicom's public PDU codec (``pynetdicom.pdu``),
  applies the AE policy (calling AE allowlist with pinned hosts, called AE), negotiates presentation
  contexts and SCP/SCU roles with ``pynetdicom.presentation.negotiate_as_acceptor`` and encodes the
  A-ASSOCIATE-AC (or -RJ). Extended negotiation items get the standard answers: SOP class (common)
  extended negotiation and user identity are accepted without a response item, the asynchronous
  operations window is answered 1/1.
- :func:`tls_context` builds the server TLS context.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC as AssociateAC
from pynetdicom.pdu import A_ASSOCIATE_RJ as AssociateRJ
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from ingest.config import TLSSettings
from ingest.errors import ConfigError
from ingest.logs import printable
from ingest.sources.dimse.framing import (
    A_ABORT,
    A_ASSOCIATE_RQ,
    ABORT_INVALID_PARAMETER,
    ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNIZED_PARAMETER,
    ABORT_UNRECOGNIZED_PDU,
    PDU_HEADER,
    abort_pdu,
    decodable_uid,
    valid_ae,
)

__all__ = [
    "REJECT_BUSY",
    "REJECT_CALLED_AE",
    "REJECT_CALLING_AE",
    "REJECT_NO_REASON",
    "AEPolicy",
    "Negotiated",
    "Negotiator",
    "Refusal",
    "Request",
    "abort_pdu",
    "check_associate_rq",
    "context",
    "decode_associate_rq",
    "escaped",
    "implementation_items",
    "read_associate_rq",
    "reject_pdu",
    "tls_context",
]

APPLICATION_CONTEXT: Final = "1.2.840.10008.3.1.1.1"
_PDU_HEADER: Final = PDU_HEADER
_A_ASSOCIATE_RQ: Final = A_ASSOCIATE_RQ
_A_ABORT: Final = A_ABORT
_PDU_TYPES: Final = frozenset(range(0x01, 0x08))  # A-ASSOCIATE-RQ .. A-ABORT (PS3.8 9.3.1)
_RQ_FIXED: Final = 68  # A-ASSOCIATE-RQ body bytes before the variable items (PS3.8 Table 9-11)
_ITEM_HEADER: Final = struct.Struct(">BBH")  # item type, reserved, item length (PS3.8 9.3.2)
_CONTEXT_SUB_ITEMS: Final = frozenset({0x30, 0x40})
_USER_SUB_ITEMS: Final = frozenset(range(0x51, 0x59))

REJECT_CALLING_AE: Final = (0x01, 0x01, 0x03)
REJECT_CALLED_AE: Final = (0x01, 0x01, 0x07)
REJECT_NO_REASON: Final = (0x01, 0x02, 0x01)
REJECT_BUSY: Final = (0x02, 0x03, 0x02)  # rejected-transient, presentation related, local limit exceeded


class Refusal(Exception):
    """Why a connection is refused before pynetdicom sees its A-ASSOCIATE-RQ.

    Parameters
    ----------
    reason:
        A short metric label (``rq_timeout``, ``rq_too_large``, ``invalid_calling_ae``, ...).
    message:
        What happened, for the log (untrusted values already escaped).
    reject:
        ``(result, source, reason)`` of an A-ASSOCIATE-RJ to send, or ``None``.
    abort:
        The reason of an A-ABORT (source 2) to send, or ``None``; neither: the connection is closed.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        reject: tuple[int, int, int] | None = None,
        abort: int | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.reject = reject
        self.abort = abort

    def answer(self) -> bytes:
        """The PDU to send before closing: A-ASSOCIATE-RJ (PS3.8 9.3.4), A-ABORT (9.3.8) or nothing."""
        if self.reject is not None:
            return reject_pdu(*self.reject)
        if self.abort is not None:
            return abort_pdu(self.abort)
        return b""


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4), encoded by pynetdicom's public codec."""
    primitive = A_ASSOCIATE()
    primitive.result = result
    primitive.result_source = source
    primitive.diagnostic = reason
    rj = AssociateRJ()
    rj.from_primitive(primitive)
    return bytes(rj.encode())


def escaped(raw: bytes | bytearray) -> str:
    """``raw`` as a quoted, escaped string for a log line: control characters never appear raw."""
    return ascii(bytes(raw).decode("latin-1"))


def _items(data: bytes, start: int, where: str) -> list[tuple[int, bytes]]:
    """Split ``data[start:]`` into ``(item type, item value)`` pairs; broken framing is refused."""
    items: list[tuple[int, bytes]] = []
    pos = start
    end = len(data)
    while pos < end:
        if pos + _ITEM_HEADER.size > end:
            raise Refusal("malformed_rq", f"{where}: truncated item header", abort=ABORT_INVALID_PARAMETER)
        item_type, _, length = _ITEM_HEADER.unpack_from(data, pos)
        pos += _ITEM_HEADER.size
        if pos + length > end:
            raise Refusal(
                "malformed_rq", f"{where}: item 0x{item_type:02X} runs past its parent",
                abort=ABORT_INVALID_PARAMETER,
            )
        items.append((item_type, data[pos : pos + length]))
        pos += length
    return items


def _uid_or_refuse(raw: bytes, what: str, *, allow_empty: bool = True) -> None:
    if not decodable_uid(raw, allow_empty=allow_empty):
        raise Refusal(
            "invalid_uid", f"{what} {escaped(raw[:80])} is not a valid UID", reject=REJECT_NO_REASON
        )


def _check_context(value: bytes) -> None:
    """A presentation context item (PS3.8 9.3.2.2): odd ID (PS3.8 9.3.2.2 note), one abstract syntax."""
    if len(value) < 4:
        raise Refusal("malformed_rq", "presentation context item too short", abort=ABORT_INVALID_PARAMETER)
    cx_id = value[0]
    if cx_id % 2 == 0:
        # stands in for pynetdicom.presentation.PresentationContext.context_id (its setter raises)
        raise Refusal(
            "even_context_id", f"presentation context ID {cx_id} is even (must be odd, PS3.8 9.3.2.2)",
            reject=REJECT_NO_REASON,
        )
    abstract = 0
    for sub_type, sub in _items(value, 4, f"presentation context {cx_id}"):
        if sub_type not in _CONTEXT_SUB_ITEMS:
            raise Refusal(
                "malformed_rq", f"presentation context {cx_id}: unknown sub-item 0x{sub_type:02X}",
                abort=ABORT_UNRECOGNIZED_PARAMETER,
            )
        abstract += sub_type == 0x30
        _uid_or_refuse(sub, "abstract syntax" if sub_type == 0x30 else "transfer syntax")
    if abstract != 1:
        raise Refusal(
            "malformed_rq", f"presentation context {cx_id} has {abstract} abstract syntaxes",
            reject=REJECT_NO_REASON,
        )


def _uid_field(value: bytes, pos: int, what: str) -> int:
    """Check a 2-byte-length-prefixed UID at ``pos`` (user information sub-items); returns its end."""
    if pos + 2 > len(value):
        raise Refusal("malformed_rq", f"{what}: truncated", abort=ABORT_INVALID_PARAMETER)
    (length,) = struct.unpack_from(">H", value, pos)
    end = pos + 2 + int(length)
    if end > len(value):
        raise Refusal("malformed_rq", f"{what}: UID runs past the sub-item", abort=ABORT_INVALID_PARAMETER)
    _uid_or_refuse(value[pos + 2 : end], what)
    return end


def _check_user_info(value: bytes) -> None:
    """The user information item (PS3.8 9.3.2.3, PS3.7 D.3.3): known sub-items, valid UIDs and names."""
    for sub_type, sub in _items(value, 0, "user information"):
        if sub_type not in _USER_SUB_ITEMS:
            raise Refusal(
                "malformed_rq", f"user information: unknown sub-item 0x{sub_type:02X}",
                abort=ABORT_UNRECOGNIZED_PARAMETER,
            )
        if sub_type in (0x51, 0x53) and len(sub) != 4:  # maximum length, asynchronous operations window
            raise Refusal(
                "malformed_rq", f"user information: sub-item 0x{sub_type:02X} is not 4 bytes",
                abort=ABORT_INVALID_PARAMETER,
            )
        if sub_type == 0x52:  # implementation class UID
            _uid_or_refuse(sub, "implementation class UID")
        elif sub_type == 0x55 and not valid_ae(sub):  # implementation version name: AE-like (1-16)
            raise Refusal(
                "invalid_rq", f"implementation version name {escaped(sub[:80])} is invalid",
                reject=REJECT_NO_REASON,
            )
        elif sub_type in (0x54, 0x56, 0x57):  # role selection, SOP class (common) extended negotiation
            end = _uid_field(sub, 0, "SOP class UID of a negotiation sub-item")
            if sub_type == 0x54 and (len(sub) != end + 2 or sub[end] > 1 or sub[end + 1] > 1):
                raise Refusal(
                    "malformed_rq", "role selection sub-item: SCU/SCP roles must be 0 or 1",
                    abort=ABORT_INVALID_PARAMETER,
                )
            if sub_type == 0x57:
                end = _uid_field(sub, end, "service class UID")
                if end + 2 > len(sub):
                    raise Refusal(
                        "malformed_rq", "common extended negotiation sub-item truncated",
                        abort=ABORT_INVALID_PARAMETER,
                    )
                (related,) = struct.unpack_from(">H", sub, end)
                pos, stop = end + 2, end + 2 + related
                if stop > len(sub):
                    raise Refusal(
                        "malformed_rq", "related general SOP classes run past the sub-item",
                        abort=ABORT_INVALID_PARAMETER,
                    )
                while pos < stop:
                    pos = _uid_field(sub[:stop], pos, "related general SOP class UID")


def check_associate_rq(pdu: bytes) -> None:
    """Validate an A-ASSOCIATE-RQ PDU (header included) before pynetdicom decodes it.

    Checks what pynetdicom 3.0.x would otherwise raise on in its reader thread (an abort with a
    logged traceback and the raw value): the calling and called AE titles (PS3.5 AE VR; checked here
    even when any calling AE is accepted), the item framing (PS3.8 9.3.2), odd presentation context
    IDs, UIDs of at most 64 printable characters, and the user information sub-items.

    Parameters
    ----------
    pdu:
        The whole PDU: the 6-byte header and the body it declares.

    Raises
    ------
    Refusal
        With the A-ASSOCIATE-RJ or A-ABORT to answer: calling AE invalid (1,1,3), called AE invalid
        (1,1,7), an even presentation context ID or an invalid UID (1,2,1), broken framing A-ABORT.
    """
    body = pdu[_PDU_HEADER.size :]
    if len(body) < _RQ_FIXED:
        raise Refusal(
            "malformed_rq", "A-ASSOCIATE-RQ shorter than its fixed fields", abort=ABORT_INVALID_PARAMETER
        )
    called, calling = body[4:20], body[20:36]
    if not valid_ae(calling):
        # stands in for pynetdicom.pdu.A_ASSOCIATE_RQ.calling_ae_title (pynetdicom.utils.set_ae raises)
        raise Refusal(
            "invalid_calling_ae", f"calling AE title {escaped(calling.rstrip(b' '))} is not a valid AE title",
            reject=REJECT_CALLING_AE,
        )
    if not valid_ae(called):
        raise Refusal(
            "invalid_called_ae", f"called AE title {escaped(called.rstrip(b' '))} is not a valid AE title",
            reject=REJECT_CALLED_AE,
        )
    contexts = 0
    for item_type, value in _items(body, _RQ_FIXED, "A-ASSOCIATE-RQ"):
        if item_type == 0x10:  # application context name (PS3.8 9.3.2.1)
            _uid_or_refuse(value, "application context name", allow_empty=False)
        elif item_type == 0x20:
            contexts += 1
            _check_context(value)
        elif item_type == 0x50:
            _check_user_info(value)
        else:  # stands in for pynetdicom.pdu.PDU._wrap_generate_items (KeyError on an unknown type)
            raise Refusal(
                "malformed_rq", f"A-ASSOCIATE-RQ: unknown item 0x{item_type:02X}",
                abort=ABORT_UNRECOGNIZED_PARAMETER,
            )
    if contexts == 0:
        raise Refusal("malformed_rq", "A-ASSOCIATE-RQ without presentation contexts", reject=REJECT_NO_REASON)



def tls_context(tls: TLSSettings) -> ssl.SSLContext:
    """The server-side TLS context for ``[listener.tls]`` (DICOM TLS, PS3.15 B.1).

    Parameters
    ----------
    tls:
        The TLS settings; ``cert`` and ``key`` are required, ``ca`` when client certificates are.

    Returns
    -------
    ssl.SSLContext
        TLS 1.2 minimum; ``CERT_REQUIRED`` when ``require_client_cert``, else ``CERT_OPTIONAL`` when a
        ``ca`` is given (a presented certificate is verified), else no client certificate.

    Raises
    ------
    ConfigError
        When the certificate, key or CA bundle cannot be loaded.
    """
    if tls.cert is None or tls.key is None:
        raise ConfigError("[listener.tls] enabled needs cert and key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=Path(tls.cert), keyfile=Path(tls.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"[listener.tls] cert {printable(str(tls.cert))} and key {printable(str(tls.key))}: not a PEM "
            f"certificate and its private key ({printable(getattr(exc, 'reason', None) or exc)})"
        ) from exc
    if tls.ca is None:
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        ctx.load_verify_locations(cafile=Path(tls.ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"[listener.tls] ca {printable(str(tls.ca))}: not a PEM CA bundle "
            f"({printable(getattr(exc, 'reason', None) or exc)})"
        ) from exc
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


async def read_associate_rq(reader: asyncio.StreamReader, *, deadline: float, max_bytes: int) -> bytes:
    """Read and check the first PDU of a connection: a complete A-ASSOCIATE-RQ before ``deadline``.

    Parameters
    ----------
    reader:
        The connection's stream (after the TLS handshake, with TLS).
    deadline:
        Event-loop time (``loop.time()``) by which the whole PDU must have arrived; a trickle of bytes
        does not extend it.
    max_bytes:
        Largest A-ASSOCIATE-RQ body accepted; a longer declared length is refused unread.

    Returns
    -------
    bytes
        The whole PDU (header and body), checked by :func:`check_associate_rq`.

    Raises
    ------
    Refusal
        When the connection must be answered (A-ASSOCIATE-RJ / A-ABORT) or closed instead.
    """
    try:
        async with asyncio.timeout_at(deadline):
            header = await reader.readexactly(_PDU_HEADER.size)
            pdu_type, _, length = _PDU_HEADER.unpack(header)
            if pdu_type == _A_ABORT:
                raise Refusal("not_associate_rq", "aborted before associating")
            if pdu_type != _A_ASSOCIATE_RQ:  # PS3.8 9.2 state Sta2: anything else -> AA-1
                known = pdu_type in _PDU_TYPES
                raise Refusal(
                    "not_associate_rq",
                    f"first PDU is of type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ",
                    abort=ABORT_UNEXPECTED_PDU if known else ABORT_UNRECOGNIZED_PDU,
                )
            if length > max_bytes:
                raise Refusal("rq_too_large", f"A-ASSOCIATE-RQ of {length} bytes declared (cap {max_bytes})")
            body = await reader.readexactly(length)
    except TimeoutError:
        raise Refusal("rq_timeout", "no complete A-ASSOCIATE-RQ before the deadline") from None
    except asyncio.IncompleteReadError as exc:
        what = "before sending" if not exc.partial else "in the middle of"
        raise Refusal("closed", f"closed {what} its A-ASSOCIATE-RQ") from None
    except (OSError, ssl.SSLError) as exc:
        raise Refusal("closed", f"connection failed before the A-ASSOCIATE-RQ: {exc}") from None
    pdu = header + body
    check_associate_rq(pdu)
    return pdu


def _uid(value: object) -> str:
    return str(value or "").strip()


@dataclass
class Negotiated:
    """An accepted association: who, which contexts, and the A-ASSOCIATE-AC to send."""

    calling: str
    called: str
    accepted: dict[int, PresentationContext]  # by presentation context ID
    rejected: list[PresentationContext]
    peer_max_pdu: int  # the requestor's Maximum Length (0: unlimited)
    ac_pdu: bytes


@dataclass(frozen=True)
class Request:
    """A decoded A-ASSOCIATE-RQ (pynetdicom's primitive) with what the policy needs."""

    primitive: Any
    calling: str
    called: str
    raw: bytes = b""  # the PDU as received

    @property
    def abstract_syntaxes(self) -> list[str]:
        """The requested abstract syntaxes, in order, once each."""
        contexts = self.primitive.presentation_context_definition_list or []
        return list(dict.fromkeys(_uid(cx.abstract_syntax) for cx in contexts))


def decode_associate_rq(pdu: bytes) -> Request:
    """Decode a checked A-ASSOCIATE-RQ with pynetdicom's public codec.

    Raises
    ------
    Refusal
        (A-ABORT, invalid parameter) when the codec cannot decode it.
    """
    try:
        rq = AssociateRQ()
        rq.decode(pdu)
        primitive = rq.to_primitive()
        calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
    except Exception as exc:
        raise Refusal(
            "malformed_rq", f"A-ASSOCIATE-RQ cannot be decoded: {escaped(str(exc)[:120].encode())}",
            abort=ABORT_INVALID_PARAMETER,
        ) from None
    return Request(primitive, calling, called, pdu)


class Negotiator:
    """Presentation contexts, roles and the A-ASSOCIATE-AC of the edge (module doc).

    Parameters
    ----------
    ae_title:
        Our AE title (the called AE the AC repeats is the requestor's).
    max_pdu:
        Our Maximum Length (the largest P-DATA-TF we accept, told to the requestor).
    supported:
        The presentation contexts supported, with their SCU/SCP roles (``scu_role``/``scp_role`` set
        where a requestor may propose roles).
    """

    def __init__(self, ae_title: str, max_pdu: int, supported: Iterable[PresentationContext]) -> None:
        self.ae_title = ae_title
        self.max_pdu = max_pdu
        self.supported = list(supported)

    def accept(self, request: Request, extra: Iterable[PresentationContext] = ()) -> Negotiated:
        """Negotiate ``request`` against the supported contexts (and ``extra``, this association's own).

        Raises
        ------
        Refusal
            (A-ABORT, invalid parameter) when pynetdicom's negotiation or encoding fails on it.
        """
        rq = request.primitive
        try:
            roles: dict[UID, tuple[bool | None, bool | None]] = {}
            peer_max = 0
            wants_async = False
            for item in rq.user_information or []:
                if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
                    roles[UID(item.sop_class_uid)] = (item.scu_role, item.scp_role)
                elif isinstance(item, MaximumLengthNotification):
                    peer_max = int(item.maximum_length_received or 0)
                elif isinstance(item, AsynchronousOperationsWindowNegotiation):
                    wants_async = True
            result, ac_roles = negotiate_as_acceptor(
                rq.presentation_context_definition_list, [*self.supported, *extra], roles or None
            )
            accepted = {int(cx.context_id or 0): cx for cx in result if cx.result == 0x00}
            rejected = [cx for cx in result if cx.result != 0x00]
            primitive = A_ASSOCIATE()
            primitive.application_context_name = UID(APPLICATION_CONTEXT)
            primitive.calling_ae_title = rq.calling_ae_title
            primitive.called_ae_title = rq.called_ae_title
            primitive.result = 0x00
            primitive.result_source = 0x01
            primitive.presentation_context_definition_results_list = [*accepted.values(), *rejected]
            info: list[Any] = implementation_items(self.max_pdu)
            info.extend(ac_roles)
            if wants_async:  # one operation at a time each way (PS3.7 D.3.3.3)
                window = AsynchronousOperationsWindowNegotiation()
                window.maximum_number_operations_invoked = 1
                window.maximum_number_operations_performed = 1
                info.append(window)
            primitive.user_information = info
            ac = AssociateAC()
            ac.from_primitive(primitive)
            ac_pdu = bytes(ac.encode())
        except Refusal:
            raise
        except Exception as exc:
            raise Refusal(
                "malformed_rq", f"A-ASSOCIATE-RQ cannot be negotiated: {escaped(str(exc)[:120].encode())}",
                abort=ABORT_INVALID_PARAMETER,
            ) from None
        return Negotiated(request.calling, request.called, accepted, rejected, peer_max, ac_pdu)


def implementation_items(max_pdu: int) -> list[Any]:
    """The user information items every association of ``ingest`` announces (PS3.7 D.3.3): its Maximum
    Length ``max_pdu`` (0: unlimited) and the implementation class UID and version name (pynetdicom's)."""
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    return [length, impl, version]


@dataclass
class AEPolicy:
    """The association checks of PS3.8 9.3.4 that need the configuration and the peer's address.

    ``allowed``: calling AE -> hosts it may come from (``None`` in the set: any host); ``None`` for
    the whole policy accepts any calling AE. ``called``: our AE title, or ``None`` when the called AE
    is not checked.
    """

    allowed: dict[str, set[str | None]] | None
    called: str | None

    def check(self, calling: str, called: str, host: str) -> tuple[tuple[int, int, int], str] | None:
        """The A-ASSOCIATE-RJ reason and why, or ``None`` when the association may go on."""
        if self.allowed is not None:
            hosts = self.allowed.get(calling)
            if hosts is None:
                return REJECT_CALLING_AE, "calling AE not allowed"
            if None not in hosts and host not in hosts:
                return REJECT_CALLING_AE, "calling AE not allowed from this host"
        if self.called is not None and called != self.called:
            return REJECT_CALLED_AE, f"called AE {escaped(called.encode())} is not {self.called!r}"
        return None


def context(
    abstract_syntax: str, transfer_syntaxes: Iterable[str], *, roles: bool = False
) -> PresentationContext:
    """A supported presentation context; ``roles``: a requestor may propose SCU and SCP roles."""
    cx = PresentationContext()
    cx.abstract_syntax = abstract_syntax
    cx.transfer_syntax = list(transfer_syntaxes)
    if roles:
        cx.scu_role = True
        cx.scp_role = True
    return cx

