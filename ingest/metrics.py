"""Prometheus metrics, one registry per process (never the global default registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

__all__ = ["Metrics"]


class Metrics:
    """Counters and gauges that ``/metrics`` exposes; the pipeline's parts increment them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.associations = Counter(
            "ingest_associations", "DICOM associations by outcome", ["outcome"], registry=r
        )
        self.instances_received = Counter(
            "ingest_instances_received", "Instances received, by source kind", ["source"], registry=r
        )
        self.instances_accepted = Counter(
            "ingest_instances_accepted", "Instances durably accepted", ["source"], registry=r
        )
        self.instances_duplicate = Counter(
            "ingest_instances_duplicate", "Identical duplicates acknowledged without a new row", registry=r
        )
        self.instances_rejected = Counter(
            "ingest_instances_rejected", "Instances rejected, by reason", ["reason"], registry=r
        )
        self.studies = Counter(
            "ingest_studies",
            "Study pushes by result (created, updated, unchanged, retried, dead, unrecorded, lease_lost)",
            ["result"], registry=r,
        )
        self.backend_requests = Counter(
            "ingest_backend_requests", "Requests sent to the FHIR backend", ["operation"], registry=r
        )
        self.relay_queue_depth = Gauge(
            "ingest_relay_queue_depth", "Studies with instances not yet pushed", registry=r
        )
        self.intake_depth = Gauge("ingest_intake_depth", "Instances waiting in the intake queue", registry=r)
        self.spool_bytes = Gauge("ingest_spool_bytes", "Bytes held in the spool", registry=r)
        self.patient_fallbacks = Counter(
            "ingest_patient_fallbacks",
            "Patient lookups that fell back to a logical reference, by cause", ["cause"], registry=r,
        )
        self.connections_refused = Counter(
            "ingest_connections_refused",
            "Listener connections refused or closed before the AE check, by reason", ["reason"], registry=r,
        )
        self.presentation_contexts_refused = Counter(
            "ingest_presentation_contexts_refused",
            "Presentation contexts the listener refused at association negotiation, by reason",
            ["reason"], registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
