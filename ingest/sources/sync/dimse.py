"""The C-FIND SCU of ``ingest sync --from dimse://CALLED_AE@HOST:PORT`` (Study Root).

Each querying thread keeps one association open and asks its queries on it, one after the other (the
run bounds how many threads query at once); a query that fails aborts it (the next one opens another),
and :meth:`DimseFinder.close` releases them all.

The association is ``ingest``'s own requestor on a plain blocking socket (one per querying thread,
``TCP_NODELAY``, TLS through the source's ``ssl.SSLContext``): the A-ASSOCIATE-RQ/AC/RJ, A-RELEASE and
A-ABORT PDUs are encoded and decoded with pynetdicom's public PDU codec (``pynetdicom.pdu``), the
P-DATA-TF framing and the DIMSE command sets with the edge's (:mod:`ingest.sources.dimse.framing`), the
identifiers with pydicom (Implicit VR Little Endian, the one transfer syntax proposed). No thread of a
DICOM library runs beside it, so a query costs its round trips and its decoding, nothing else, and no
answer can be taken by anyone else.

Answers with a pending status (0xFF00 / 0xFF01) are the matches; the final status decides the rest:
success (0x0000) is a complete answer; cancel (0xFE00, what Orthanc ends an answer cut at
``LimitFindResults`` with) or a warning (0x0001, 0xBxxx) is an answer cut short (the study level splits
its window); anything else, a refused association, a timeout or a lost connection raises
:class:`~ingest.errors.SyncSourceError` naming the source and the query. Never C-MOVE, C-GET.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from typing import Final

from pydicom.dataset import Dataset
from pydicom.uid import UID, ImplicitVRLittleEndian

from ingest.errors import SyncSourceError
from ingest.logs import printable
from ingest.sources.dimse.framing import (
    A_ABORT,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_RELEASE_RP,
    ABORT_NOT_SPECIFIED,
    P_DATA_TF,
    PDU_HEADER,
    FramingError,
    abort_pdu,
    decode_command,
    decode_data_set,
    encode_command,
    encode_data_set,
    p_data_pdus,
    release_rq_pdu,
    split_pdvs,
)
from ingest.sources.sync.answers import identifier

__all__ = ["DimseFinder", "parse_dimse_url"]

LOGGER = logging.getLogger(__name__)

#: Study Root Query/Retrieve Information Model - FIND (PS3.4 C.6.2).
STUDY_ROOT_FIND: Final = "1.2.840.10008.5.1.4.1.2.2.1"
_APPLICATION_CONTEXT: Final = "1.2.840.10008.3.1.1.1"
_CONTEXT_ID: Final = 1
_C_FIND_RQ: Final = 0x0020
_C_FIND_RSP: Final = 0x8020
_PENDING: Final = frozenset({0xFF00, 0xFF01})
#: The most bytes this SCU accepts in one PDU (announced as its Maximum Length) and in one answer.
MAX_PDU: Final = 1024 * 1024
MAX_ANSWER_BYTES: Final = 16 * 1024 * 1024


def parse_dimse_url(url: str) -> tuple[str, str, int]:
    """``dimse://CALLED_AE@HOST:PORT`` -> (called AE, host, port).

    Raises
    ------
    ValueError
        When ``url`` is not of that form.
    """
    rest = url.removeprefix("dimse://")
    ae, sep, hostport = rest.rpartition("@")
    host, colon, port = hostport.rpartition(":")
    if not url.startswith("dimse://") or not sep or not colon or not ae or not host or not port.isdigit():
        raise ValueError(f"{url!r} is not dimse://CALLED_AE@HOST:PORT")
    if not 0 < int(port) < 65536 or len(ae) > 16 or "\\" in ae:
        raise ValueError(f"{url!r}: bad port or AE title")
    return ae, host.strip("[]"), int(port)


def _query_text(query: Dataset) -> str:
    """The matching keys of ``query`` (no return keys, no patient values: the level, UIDs and dates)."""
    shown = [
        f"{key}={query.get(key)}"
        for key in ("QueryRetrieveLevel", "StudyInstanceUID", "SeriesInstanceUID", "StudyDate")
        if query.get(key)
    ]
    return printable(" ".join(shown))


class _Lost(Exception):
    """The association cannot go on (the peer aborted, closed, answered out of turn, or timed out)."""


class _Association:
    """One open association: a socket, the peer's Maximum Length and the next Message ID."""

    def __init__(self, sock: socket.socket, peer_max: int) -> None:
        self.sock = sock
        self.peer_max = peer_max
        self.message_id = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, n: int) -> bytes:
        chunks: list[bytes] = []
        while n:
            chunk = self.sock.recv(min(n, 1024 * 1024))
            if not chunk:
                raise _Lost("the connection was closed")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def read_pdu(self) -> tuple[int, bytes]:
        """One PDU: (type, the whole PDU's bytes)."""
        header = self._exactly(PDU_HEADER.size)
        pdu_type, _, length = PDU_HEADER.unpack(header)
        if length > MAX_PDU + 16:
            raise _Lost(f"a PDU of {length} bytes, over the {MAX_PDU} announced")
        return pdu_type, header + self._exactly(length)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.send(abort_pdu(ABORT_NOT_SPECIFIED, source=0x00))
        self.close()

    def release(self) -> None:
        try:
            self.send(release_rq_pdu())
            for _ in range(64):  # answers still in flight come first
                pdu_type, _ = self.read_pdu()
                if pdu_type in (A_RELEASE_RP, A_ABORT):
                    break
        except (OSError, _Lost):
            pass
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _request_pdu(calling_ae: str, called_ae: str) -> bytes:
    """The A-ASSOCIATE-RQ: Study Root FIND, Implicit VR Little Endian, SCU role (pynetdicom's codec)."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE
    from pynetdicom.presentation import PresentationContext

    from ingest.sources.dimse.associate import implementation_items

    cx = PresentationContext()
    cx.context_id = _CONTEXT_ID
    cx.abstract_syntax = UID(STUDY_ROOT_FIND)
    cx.transfer_syntax = [ImplicitVRLittleEndian]
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(_APPLICATION_CONTEXT)
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    primitive.presentation_context_definition_list = [cx]
    primitive.user_information = implementation_items(MAX_PDU)
    rq = AssociateRQ()
    rq.from_primitive(primitive)
    return bytes(rq.encode())


def _accepted(pdu: bytes) -> int:
    """The peer's Maximum Length (0: unlimited) from an A-ASSOCIATE-AC that accepted our context.

    Raises
    ------
    _Lost
        When the context was refused or the AC cannot be decoded.
    """
    from pynetdicom.pdu import A_ASSOCIATE_AC as AssociateAC
    from pynetdicom.pdu_primitives import MaximumLengthNotification

    try:
        ac = AssociateAC()
        ac.decode(pdu)
        primitive = ac.to_primitive()
    except Exception as exc:
        raise _Lost(f"an A-ASSOCIATE-AC that cannot be decoded ({printable(str(exc)[:120])})") from None
    results = primitive.presentation_context_definition_results_list or []
    if not any(cx.context_id == _CONTEXT_ID and cx.result == 0x00 for cx in results):
        raise _Lost("Study Root FIND (Implicit VR Little Endian) not accepted")
    for item in primitive.user_information or []:
        if isinstance(item, MaximumLengthNotification):
            return int(item.maximum_length_received or 0)
    return 0


class DimseFinder:
    """C-FIND at study, series and image level against one PACS."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        calling_ae: str,
        timeout_s: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.name = name
        self.called_ae, self.host, self.port = parse_dimse_url(url)
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s
        self._tls = tls
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[_Association] = []

    def where(self) -> str:
        return f"{printable(self.called_ae)}@{self.host}:{self.port}"

    def _association(self, what: str) -> _Association:
        """This thread's open association (one per querying thread, reused), opened when needed."""
        assoc: _Association | None = getattr(self._local, "assoc", None)
        if assoc is not None:
            return assoc
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        except OSError as exc:
            raise SyncSourceError(f"{what}: cannot connect: {printable(str(exc))}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:  # the certificate must name the host; the handshake is timed too
                sock = self._tls.wrap_socket(sock, server_hostname=self.host)
            sock.sendall(_request_pdu(self.calling_ae, self.called_ae))
            pending = _Association(sock, 0)
            pdu_type, pdu = pending.read_pdu()
            if pdu_type == A_ASSOCIATE_RJ:
                raise SyncSourceError(f"{what}: association rejected")
            if pdu_type != A_ASSOCIATE_AC:
                raise SyncSourceError(f"{what}: association aborted (PDU type 0x{pdu_type:02X})")
            pending.peer_max = _accepted(pdu)
        except SyncSourceError:
            with contextlib.suppress(OSError):
                sock.close()
            raise
        except (OSError, _Lost) as exc:
            with contextlib.suppress(OSError):
                sock.close()
            raise SyncSourceError(f"{what}: association not established: {printable(str(exc))}") from exc
        self._local.assoc = pending
        with self._lock:
            self._open.append(pending)
        return pending

    def ask(self, level: str, keys: tuple[str, ...], matching: dict[str, str], limit: int | None
            ) -> tuple[list[Dataset], bool]:
        """:class:`~ingest.sources.sync.run.Finder`: C-FIND ``level`` for ``keys`` (``limit`` is the
        PACS's own: C-FIND has none)."""
        return self.find(identifier(level, keys, **matching))

    def find(self, query: Dataset) -> tuple[list[Dataset], bool]:
        """Ask ``query``; (the matches, whether the answer was complete)."""
        what = f"source {self.name}: C-FIND {_query_text(query)} at {self.where()}"
        assoc = self._association(what)
        try:
            answers, final = self._exchange(assoc, query)
        except BaseException as exc:
            self._forget(assoc)
            assoc.abort()
            if isinstance(exc, socket.timeout | TimeoutError):
                raise SyncSourceError(f"{what}: no answer within {self.timeout_s:g} s") from exc
            if isinstance(exc, OSError | _Lost | FramingError):
                raise SyncSourceError(f"{what}: {printable(str(exc)) or type(exc).__name__}") from exc
            raise
        if final == 0x0000:
            return answers, True
        if final == 0xFE00 or final == 0x0001 or 0xB000 <= final <= 0xBFFF:
            LOGGER.info("%s: answer cut short (status 0x%04X) after %d matches", what, final, len(answers))
            return answers, False
        raise SyncSourceError(f"{what}: failed with status 0x{final:04X}")

    def _exchange(self, assoc: _Association, query: Dataset) -> tuple[list[Dataset], int]:
        """Send one C-FIND-RQ and read its answers up to the final status."""
        assoc.message_id = assoc.message_id % 0xFFFF + 1
        command = encode_command({
            0x0002: STUDY_ROOT_FIND, 0x0100: _C_FIND_RQ, 0x0110: assoc.message_id, 0x0700: 0x0000,
            0x0800: 0x0000,
        })
        body = encode_data_set(query, ImplicitVRLittleEndian)
        for pdu in p_data_pdus(_CONTEXT_ID, command, body, assoc.peer_max):
            assoc.send(pdu)
        answers: list[Dataset] = []
        command_bytes = bytearray()
        data = bytearray()
        status: int | None = None
        while True:
            pdu_type, pdu = assoc.read_pdu()
            if pdu_type != P_DATA_TF:
                raise _Lost("the association was aborted" if pdu_type == A_ABORT
                            else f"a PDU of type 0x{pdu_type:02X} in the middle of a C-FIND")
            for cx_id, control, fragment in split_pdvs(memoryview(pdu)[PDU_HEADER.size:]):
                if cx_id != _CONTEXT_ID:
                    raise _Lost(f"a PDV on presentation context {cx_id}")
                if control & 0x01:  # command
                    command_bytes += fragment
                    if not control & 0x02:
                        continue
                    rsp = decode_command(command_bytes)
                    command_bytes.clear()
                    if rsp.command_field != _C_FIND_RSP or rsp.us(0x0120) != assoc.message_id:
                        raise _Lost(f"an unexpected response 0x{rsp.command_field:04X}")
                    status = rsp.us(0x0900)
                    if status is None:
                        raise _Lost("a C-FIND-RSP without a Status")
                    if not rsp.has_data_set:
                        if status in _PENDING:  # a match without its identifier: nothing to list
                            continue
                        return answers, status
                else:  # the identifier of the response just read
                    data += fragment
                    if len(data) > MAX_ANSWER_BYTES:
                        raise _Lost(f"an answer over {MAX_ANSWER_BYTES} bytes")
                    if not control & 0x02:
                        continue
                    if status in _PENDING:
                        answers.append(decode_data_set(bytes(data), ImplicitVRLittleEndian))
                    data.clear()
                    if status is not None and status not in _PENDING:
                        return answers, status

    def _forget(self, assoc: _Association) -> None:
        self._local.assoc = None
        with self._lock, contextlib.suppress(ValueError):
            self._open.remove(assoc)

    def close(self) -> None:
        """Release every association the querying threads opened."""
        with self._lock:
            opened, self._open = self._open, []
        for assoc in opened:
            assoc.release()
