"""Per-model, per-version request metrics as OpenTelemetry instruments.

They reach Prometheus (a service's `--metrics-port`) and OTLP collectors (`--otlp-endpoint`)
through the providers `services.common.telemetry` installs, labelled by source, model, version,
alias and gRPC status, so dashboards can split any figure by version.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import metrics

# Latency buckets in ms: sub-millisecond serving up to multi-second batches.
LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ModelMetrics:
    def __init__(self, source: str) -> None:
        self.source = source
        meter = metrics.get_meter("aiaas.models")
        self._duration = meter.create_histogram(
            "aiaas.model.request.duration", unit="ms", description="Request latency per model version",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_MS,
        )
        self._batch = meter.create_histogram(
            "aiaas.model.batch.size", unit="{row}", description="Rows in the batch a request ran in",
            explicit_bucket_boundaries_advisory=BATCH_BUCKETS,
        )
        # Attribute dicts are reused per label set: building one per request costs more than the record.
        self._attributes: dict[tuple[str, int, str, str], dict[str, Any]] = {}

    def observe(self, model: str, version: int, alias: str, status: str, latency_us: int, batch_size: int) -> None:
        key = (model, version, alias, status)
        attributes = self._attributes.get(key)
        if attributes is None:
            if len(self._attributes) >= 10_000:  # bound label cardinality
                self._attributes.clear()
            attributes = self._attributes[key] = {
                "source": self.source, "model": model, "version": str(version), "alias": alias, "status": status,
            }
        self._duration.record(latency_us / 1000.0, attributes)
        if batch_size:
            self._batch.record(batch_size, attributes)
