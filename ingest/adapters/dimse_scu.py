"""Storage Commitment reports on a new association (PS3.4 J.3.3; docs/architecture.md "Storage
Commitment").

:class:`DimseReportSCU` is the :class:`ingest.ports.ReportChannel` that opens an association to the
``host`` / ``port`` of the requester's ``[listener] allowed_calling_aes`` entry, proposing the SCP role
for the Storage Commitment Push Model class (SCP/SCU Role Selection, PS3.7 D.3.3.4), sends one
N-EVENT-REPORT and releases. The whole delivery (connect, association, report, answer) ends within the
``timeout_s`` it is given: each pynetdicom timeout is cut to what is left, and whatever is still open
then is aborted and its socket closed, so a requester that accepts the connection and never answers
holds one connection for at most ``timeout_s``.

The N-EVENT-REPORT's content (:func:`event_information`) and the Storage Commitment UIDs are shared
with the N-ACTION SCP (``ingest.sources.dimse.commitment``), which reports on the requester's own
association when it is still open.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Mapping
from typing import Any, Final

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role

from ingest.config import ListenerSettings, TLSSettings
from ingest.errors import ReportDeliveryError
from ingest.ports import CommitmentReport

__all__ = [
    "STORAGE_COMMITMENT_INSTANCE",
    "STORAGE_COMMITMENT_PUSH",
    "TRANSFER_SYNTAXES",
    "DimseReportSCU",
    "check_status",
    "event_information",
    "tls_client_context",
]

LOGGER = logging.getLogger(__name__)

#: Storage Commitment Push Model SOP Class and its well-known SOP Instance (PS3.4 J.3.4, PS3.6 Annex A).
STORAGE_COMMITMENT_PUSH: Final = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE: Final = "1.2.840.10008.1.20.1.1"

TRANSFER_SYNTAXES: Final = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def event_information(report: CommitmentReport) -> Dataset:
    """The N-EVENT-REPORT Event Information of ``report`` (PS3.4 J.3.3, Table J.3-2).

    Transaction UID (0008,1195); Referenced SOP Sequence (0008,1199) of the committed instances (present
    when there is one); Failed SOP Sequence (0008,1198) with each Failure Reason (0008,1197) (Event Type
    2 only).
    """
    ds = Dataset()
    ds.TransactionUID = report.transaction_uid
    if report.committed:
        ds.ReferencedSOPSequence = DicomSequence([_item(cls, uid) for cls, uid in report.committed])
    if report.failed:
        failed = []
        for cls, uid, reason in report.failed:
            item = _item(cls, uid)
            item.FailureReason = reason
            failed.append(item)
        ds.FailedSOPSequence = DicomSequence(failed)
    return ds


def _item(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item


def check_status(status: Dataset) -> None:
    """Raise :class:`ReportDeliveryError` unless ``status`` is an N-EVENT-REPORT answer of Success."""
    code = getattr(status, "Status", None)
    if code is None:
        raise ReportDeliveryError("no answer to the N-EVENT-REPORT (timeout or abort)")
    if int(code) != 0x0000:
        raise ReportDeliveryError(f"the requester answered the N-EVENT-REPORT with 0x{int(code):04X}")


def tls_client_context(tls: TLSSettings) -> ssl.SSLContext:
    """The client side of ``[listener.tls]`` for report associations: TLS 1.2+, this node's certificate
    and key, and the peer verified against ``ca`` when it is set (the system store otherwise). Peers are
    addressed by configured host, which is not checked against their certificate's names."""
    ctx = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert is not None and tls.key is not None:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


class DimseReportSCU:
    """Reports on a new association to the requester's configured address (module doc).

    Parameters
    ----------
    ae_title:
        This node's AE title (the calling AE of the report association).
    routes:
        Calling AE of a requester -> (host, port) its reports go to.
    acse_timeout_s, dimse_timeout_s, network_timeout_s:
        ``[listener]``'s timeouts; each is cut to what is left of a delivery's ``timeout_s``.
    tls:
        The client TLS context (``[listener.tls]`` enabled), or ``None``.
    """

    def __init__(
        self,
        ae_title: str,
        routes: Mapping[str, tuple[str, int]],
        *,
        acse_timeout_s: float,
        dimse_timeout_s: float,
        network_timeout_s: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.routes = dict(routes)
        self.acse_timeout_s = acse_timeout_s
        self.dimse_timeout_s = dimse_timeout_s
        self.network_timeout_s = network_timeout_s
        self.tls = tls

    @classmethod
    def from_settings(cls, cfg: ListenerSettings) -> DimseReportSCU:
        """Routes from ``[listener] allowed_calling_aes`` entries with a ``host`` and ``port``."""
        routes = {e.ae: (e.host, e.port) for e in cfg.allowed_calling_aes if e.host is not None and e.port}
        return cls(
            cfg.ae_title, routes, acse_timeout_s=cfg.acse_timeout_s, dimse_timeout_s=cfg.dimse_timeout_s,
            network_timeout_s=cfg.network_timeout_s,
            tls=tls_client_context(cfg.tls) if cfg.tls.enabled else None,
        )

    def send_report(self, report: CommitmentReport, *, timeout_s: float) -> str | None:
        """A new association to the requester (we propose the SCP role), one N-EVENT-REPORT, release;
        ``None`` when no address is configured for the requester."""
        route = self.routes.get(report.calling_ae)
        if route is None:
            return None
        host, port = route
        try:
            self._deliver(host, port, report, time.monotonic() + timeout_s)
        except ReportDeliveryError as exc:
            raise ReportDeliveryError(f"to {host}:{port}: {exc}") from exc
        return f"to {host}:{port}"

    def _deliver(self, host: str, port: int, report: CommitmentReport, deadline: float) -> None:
        def left(limit: float) -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReportDeliveryError("no answer within the report timeout")
            return min(limit, remaining)

        try:  # a refused connection is found here: pynetdicom would leave its socket open
            with socket.create_connection((host, port), timeout=left(self.acse_timeout_s)):
                pass
        except OSError as exc:
            raise ReportDeliveryError(f"cannot connect: {exc.strerror or exc}") from exc
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = left(self.acse_timeout_s)
        ae.dimse_timeout = left(self.dimse_timeout_s)
        ae.network_timeout = left(self.network_timeout_s)
        ae.connection_timeout = left(self.acse_timeout_s)
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH, TRANSFER_SYNTAXES)
        role = build_role(STORAGE_COMMITMENT_PUSH, scp_role=True)
        tls_args = (self.tls, host) if self.tls is not None else None
        assoc = ae.associate(host, port, ae_title=report.calling_ae, ext_neg=[role], tls_args=tls_args)
        try:
            if not assoc.is_established:
                if time.monotonic() >= deadline - 0.5:
                    raise ReportDeliveryError(
                        "no answer to the association request within the report timeout"
                    )
                raise ReportDeliveryError(
                    "association rejected or aborted"
                    if assoc.is_rejected or assoc.is_aborted
                    else "association not established"
                )
            assoc.dimse_timeout = left(self.dimse_timeout_s)
            try:
                status, _ = assoc.send_n_event_report(
                    event_information(report),
                    report.event_type,
                    STORAGE_COMMITMENT_PUSH,
                    STORAGE_COMMITMENT_INSTANCE,
                )
            except (RuntimeError, ValueError) as exc:
                raise ReportDeliveryError(str(exc)) from exc
            check_status(status)
            with contextlib.suppress(Exception):
                assoc.release()
        finally:
            _close(assoc)


def _close(assoc: Any) -> None:
    """Abort ``assoc`` if it is still open and close its socket (a peer that never answers keeps
    nothing of ours open)."""
    with contextlib.suppress(Exception):
        if assoc.is_alive() and not (assoc.is_released or assoc.is_aborted):
            assoc.abort()
    with contextlib.suppress(Exception):
        sock = assoc.dul.socket
        if sock is not None:
            sock.close()
