"""Prometheus metrics, one registry per process (never the global default registry)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

__all__ = ["Metrics"]

# prometheus_client exports a ``<name>_created`` sample (a Unix time) beside every counter and histogram;
# in a scrape it reads like a count (``ingest_studies_created{...} 1.79e+09``) and no dashboard of ingest
# needs it, so it is not exported (the switch is process-wide and only affects those samples).
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Latency buckets in seconds, from a fast C-STORE (a few ms) to a slow backend write (minutes).
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            120.0, 300.0, 600.0)


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
        self.spool_bytes = Gauge(
            "ingest_spool_bytes", "Bytes of accepted instances held: spool files and in-row bytes", registry=r
        )
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
        # [spool] retention and the disk budget (ingest.intake.retention)
        self.spool_refusals = Counter(
            "ingest_spool_refusals",
            "Instances refused before their bytes were written because the spool is full, by reason "
            "(max_bytes, min_free_bytes)", ["reason"], registry=r,
        )
        self.spool_released = Counter(
            "ingest_spool_released",
            "Instances (or quarantined inputs) whose bytes were removed, by reason", ["reason"], registry=r,
        )
        self.spool_released_bytes = Counter(
            "ingest_spool_released_bytes", "Bytes of accepted instances removed, by reason", ["reason"],
            registry=r,
        )
        # Storage Commitment (ingest.sources.dimse.commitment, ingest.relay.reports)
        self.commitments = Counter(
            "ingest_commitments",
            "Storage Commitment: requests (requested, repeated, refused) and reports (committed: every "
            "instance; partial: some failed; retried; abandoned)", ["result"], registry=r,
        )
        self.commitments_pending = Gauge(
            "ingest_commitments_pending", "Storage Commitment reports not yet delivered", registry=r
        )

        # study lifecycle (ingest.intake.admit, ingest reject): IOCM rejections and replaced versions
        self.rejections = Counter(
            "ingest_rejections", "IOCM rejections recorded (notes and ingest reject), by rejection code",
            ["code"], registry=r,
        )
        self.instances_replaced = Counter(
            "ingest_instances_replaced",
            "Stored instances replaced by a newer version ([intake] on_conflict = \"replace\")", registry=r,
        )
        # ingest sync (ingest.sources.sync.run)
        self.sync_runs = Counter("ingest_sync_runs", "Sync runs by source and outcome", ["source", "outcome"],
                                 registry=r)
        self.sync_queries = Counter(
            "ingest_sync_queries", "C-FIND / QIDO-RS queries asked, by source and level", ["source", "level"],
            registry=r,
        )
        self.sync_instances = Counter(
            "ingest_sync_instances",
            "Instances listed by a sync, by source and result (added, unchanged, withdrawn, restored)",
            ["source", "result"], registry=r,
        )

        # latency histograms (seconds)
        self.cstore_seconds = Histogram(
            "ingest_cstore_seconds",
            "C-STORE handling time: data set received to response sent (durable first)", registry=r,
            buckets=_SECONDS,
        )
        self.push_seconds = Histogram(
            "ingest_push_seconds", "Duration of one study push (find, read, merge, write)", registry=r,
            buckets=_SECONDS,
        )
        self.pushed_latency_seconds = Histogram(
            "ingest_pushed_latency_seconds",
            "From the study's last instance received to its ImagingStudy written", registry=r,
            buckets=_SECONDS,
        )
        # the process itself: CPU, memory, open files, start time; Python's GC and version
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
