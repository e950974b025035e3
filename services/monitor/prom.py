"""Prometheus series the monitor exports on its metrics port, per model, version and alias.

Counters and histograms count what this replica ingested (sum them across replicas); the
gauges carry the window figures every replica computes alike from the shared windows.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from services.monitor.entities import Request, SeriesMetrics

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LABELS = ("source", "model", "version", "alias")


class PrometheusExport:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry if registry is not None else REGISTRY
        self.requests = Counter("aiaas_model_requests", "Requests served, by status",
                                (*_LABELS, "status"), registry=reg)
        self.latency = Histogram("aiaas_model_request_latency_seconds", "Request latency",
                                 _LABELS, buckets=_LATENCY_BUCKETS, registry=reg)
        self.queue = Histogram("aiaas_model_queue_seconds", "Time in the batch queue",
                               _LABELS, buckets=_LATENCY_BUCKETS, registry=reg)
        self.compute = Histogram("aiaas_model_compute_seconds", "Time running the model",
                                 _LABELS, buckets=_LATENCY_BUCKETS, registry=reg)
        self.batch = Histogram("aiaas_model_batch_size", "Size of the batch a request ran in",
                               _LABELS, buckets=_BATCH_BUCKETS, registry=reg)
        self.window_p99 = Gauge("aiaas_model_window_latency_p99_seconds", "p99 latency over the default window",
                                _LABELS, registry=reg)
        self.window_error_rate = Gauge("aiaas_model_window_error_rate", "Error rate over the default window",
                                       _LABELS, registry=reg)
        self.window_rate = Gauge("aiaas_model_window_requests_per_second", "Request rate over the default window",
                                 _LABELS, registry=reg)
        self.drift_psi = Gauge("aiaas_model_drift_psi", "Population stability index of live inputs",
                               ("model", "version", "feature"), registry=reg)
        self.alerts_firing = Gauge("aiaas_alerts_firing", "Alerts firing", ("kind",), registry=reg)
        self.canary_rollbacks = Counter("aiaas_canary_rollbacks", "Canaries rolled back by the monitor",
                                        ("model",), registry=reg)
        self.telemetry_dropped = Counter("aiaas_telemetry_dropped_records",
                                         "Records reporters said they dropped", ("source",), registry=reg)
        self.reports = Counter("aiaas_monitor_reports", "Report batches received", ("source",), registry=reg)

    def observe(self, req: Request) -> None:
        labels = (req.source, req.model, str(req.version), req.alias)
        self.requests.labels(*labels, req.status).inc()
        self.latency.labels(*labels).observe(req.latency_us / 1e6)
        if req.queue_us > 0 or req.compute_us > 0:
            self.queue.labels(*labels).observe(req.queue_us / 1e6)
            self.compute.labels(*labels).observe(req.compute_us / 1e6)
        if req.batch_size > 0:
            self.batch.labels(*labels).observe(req.batch_size)

    def window(self, metrics: SeriesMetrics) -> None:
        k = metrics.key
        labels = (k.source, k.model, str(k.version), k.alias)
        self.window_p99.labels(*labels).set(metrics.latency.p99_ms / 1000.0)
        self.window_error_rate.labels(*labels).set(metrics.error_rate)
        self.window_rate.labels(*labels).set(metrics.rate_per_s)
