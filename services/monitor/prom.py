"""Prometheus series the monitor exports on its metrics port, per source, model, version and alias.

Request counters and latency / queue / compute / batch-size histograms are rendered at scrape
time from running totals of the same counters the windows use (one dict update per field and
batch at ingest, nothing per record). A latency bin is counted under the first Prometheus
bucket at or above its upper edge, so a bucket boundary is exact to within one bin (4%).
Counters count what this replica ingested (sum them across replicas); the gauges carry the
window figures every replica computes alike from the shared windows.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from services.monitor.entities import SeriesKey, SeriesMetrics
from services.monitor.windows import GAMMA

_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LABELS = ["source", "model", "version", "alias"]
_HISTOGRAMS = (
    ("aiaas_model_request_latency_seconds", "Request latency", "l:", "ls", "n"),
    ("aiaas_model_queue_seconds", "Time in the batch queue", "q:", "qs", "qn"),
    ("aiaas_model_compute_seconds", "Time running the model", "c:", "cs", "qn"),
    ("aiaas_model_time_to_first_token_seconds", "Generative requests: arrival to first token", "t:", "ts", "tn"),
    ("aiaas_model_inter_token_seconds", "Generative requests: mean gap between tokens, per request", "i:", "is", "in"),
)
# Running token and preemption totals of generative requests: (family, doc, field).
_GENERATION_COUNTERS = (
    ("aiaas_model_prompt_tokens", "Prompt tokens of generative requests", "pt"),
    ("aiaas_model_completion_tokens", "Tokens generated", "ot"),
    ("aiaas_model_preemptions", "Times a generative request's KV cache was taken back and recomputed", "pe"),
)


def _bin_upper_s(index: int) -> float:
    return 0.0 if index <= 0 else GAMMA**index / 1e6


class _TotalsCollector:
    """Renders running totals per series as Prometheus counters and histograms."""

    def __init__(self) -> None:
        self.totals: dict[str, Counter[str]] = {}
        self._lock = threading.Lock()  # the HTTP server scrapes from its own thread

    def add(self, increments: Iterable[tuple[str, Counter[str]]]) -> None:
        with self._lock:
            for series, fields in increments:
                self.totals.setdefault(series, Counter()).update(fields)

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        with self._lock:
            snapshot = {s: Counter(f) for s, f in self.totals.items()}
        requests = CounterMetricFamily("aiaas_model_requests", "Requests served, by status", labels=[*_LABELS, "status"])
        labels_back = CounterMetricFamily("aiaas_model_feedback_labels", "Labels sent back through Feedback, by kind",
                                          labels=[*_LABELS, "kind"])
        correct = CounterMetricFamily("aiaas_model_feedback_correct",
                                      "Class labels (Feedback) the prediction had right", labels=_LABELS)
        families = {name: HistogramMetricFamily(name, doc, labels=_LABELS) for name, doc, *_ in _HISTOGRAMS}
        batch = HistogramMetricFamily("aiaas_model_batch_size", "Size of the batch a request ran in", labels=_LABELS)
        counters = {name: CounterMetricFamily(name, doc, labels=_LABELS) for name, doc, _ in _GENERATION_COUNTERS}
        for series, fields in sorted(snapshot.items()):
            key = SeriesKey.decode(series)
            labels = [key.source, key.model, str(key.version), key.alias]
            for name, n in fields.items():
                if name.startswith("s:"):
                    requests.add_metric([*labels, name[2:]], n)
            for kind, field in (("class", "fk"), ("value", "fv"), ("score", "fq")):
                if fields.get(field, 0):
                    labels_back.add_metric([*labels, kind], fields[field])
            if fields.get("fk", 0):
                correct.add_metric(labels, fields.get("fc", 0))
            for family, _, prefix, total, count in _HISTOGRAMS:
                if fields.get(count, 0):
                    buckets = self._buckets(fields, prefix, _LATENCY_BUCKETS_S, _bin_upper_s)
                    families[family].add_metric(labels, buckets, fields.get(total, 0) / 1e6)
            if fields.get("gn", 0):
                for name, _, field in _GENERATION_COUNTERS:
                    counters[name].add_metric(labels, fields.get(field, 0))
            sizes = {int(k[2:]): n for k, n in fields.items() if k.startswith("b:")}
            if sizes:
                buckets = self._buckets({f"b:{k}": v for k, v in sizes.items()}, "b:", _BATCH_BUCKETS, float)
                batch.add_metric(labels, buckets, float(sum(k * v for k, v in sizes.items())))
        yield requests
        yield labels_back
        yield correct
        yield from families.values()
        yield batch
        yield from counters.values()

    @staticmethod
    def _buckets(fields: Mapping[str, int], prefix: str, bounds: tuple[float, ...], upper: Any) -> list[tuple[str, float]]:
        counts = [0] * (len(bounds) + 1)
        for name, n in fields.items():
            if name.startswith(prefix):
                counts[bisect.bisect_left(bounds, upper(int(name[len(prefix):])) * (1 - 1e-9))] += n
        out, running = [], 0
        for bound, n in zip(bounds, counts, strict=False):  # the +Inf bucket is counts[-1], added below
            running += n
            out.append((repr(float(bound)), float(running)))
        out.append(("+Inf", float(running + counts[-1])))
        return out


class PrometheusExport:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry if registry is not None else REGISTRY
        self.totals = _TotalsCollector()
        reg.register(self.totals)  # type: ignore[arg-type]
        self.window_p99 = Gauge("aiaas_model_window_latency_p99_seconds", "p99 latency over the default window",
                                _LABELS, registry=reg)
        self.window_error_rate = Gauge("aiaas_model_window_error_rate", "Error rate over the default window",
                                       _LABELS, registry=reg)
        self.window_rate = Gauge("aiaas_model_window_requests_per_second", "Request rate over the default window",
                                 _LABELS, registry=reg)
        self.window_output_tokens = Gauge(
            "aiaas_model_window_output_tokens_per_second", "Tokens generated per second over the default window",
            _LABELS, registry=reg)
        self.window_ttft_p99 = Gauge("aiaas_model_window_ttft_p99_seconds",
                                     "p99 time to first token over the default window", _LABELS, registry=reg)
        self.window_kv_cache_usage = Gauge(
            "aiaas_model_window_kv_cache_usage", "Mean fraction of KV-cache blocks in use as generative requests "
            "finished, over the default window", _LABELS, registry=reg)
        self.window_accuracy = Gauge("aiaas_model_window_accuracy",
                                     "Online accuracy over the default window (class labels from Feedback)",
                                     _LABELS, registry=reg)
        self.window_mean_abs_error = Gauge("aiaas_model_window_mean_abs_error",
                                           "Online mean absolute error over the default window (numeric labels "
                                           "from Feedback)", _LABELS, registry=reg)
        self.drift_psi = Gauge("aiaas_model_drift_psi", "Population stability index of live inputs",
                               ("model", "version", "feature"), registry=reg)
        self.alerts_firing = Gauge("aiaas_alerts_firing", "Alerts firing", ("kind",), registry=reg)
        self.canary_rollbacks = PromCounter("aiaas_canary_rollbacks", "Canaries rolled back by the monitor",
                                            ("model",), registry=reg)
        self.telemetry_dropped = PromCounter("aiaas_telemetry_dropped_records",
                                             "Records reporters said they dropped", ("source",), registry=reg)
        self.reports = PromCounter("aiaas_monitor_reports", "Report batches received", ("source",), registry=reg)
        self.records_refused = PromCounter(
            "aiaas_monitor_records_refused", "Request records not kept: a new model name or series over its cap "
            "(max_models, max_series_per_model), or a name that cannot be a label", ("reason",), registry=reg)

    def add(self, increments: dict[tuple[str, int], Counter[str]]) -> None:
        self.totals.add((series, fields) for (series, _), fields in increments.items())

    def window(self, metrics: SeriesMetrics) -> None:
        k = metrics.key
        labels = (k.source, k.model, str(k.version), k.alias)
        self.window_p99.labels(*labels).set(metrics.latency.p99_ms / 1000.0)
        self.window_error_rate.labels(*labels).set(metrics.error_rate)
        self.window_rate.labels(*labels).set(metrics.rate_per_s)
        gen = metrics.generation
        if gen is not None:
            self.window_output_tokens.labels(*labels).set(gen.output_tokens_per_s)
            self.window_ttft_p99.labels(*labels).set(gen.ttft.p99_ms / 1000.0)
            self.window_kv_cache_usage.labels(*labels).set(gen.mean_kv_cache_usage)
        if metrics.class_labels:
            self.window_accuracy.labels(*labels).set(metrics.accuracy)
        if metrics.value_labels:
            self.window_mean_abs_error.labels(*labels).set(metrics.mean_abs_error)
