"""OpenTelemetry set up once per process: tracer and meter providers, OTLP and Prometheus."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("aiaas.telemetry")
_configured = False
# `metrics_port` value for a process whose metrics another process of its service serves: an
# exporter on a free loopback port (`exported_port()`), scraped by that one (`add_process_metrics`).
LOOPBACK_METRICS = -1
_exported_port = 0
_process_sources: list[Callable[[], Iterable[tuple[str, int]]]] = []
SIBLING_SCRAPE_TIMEOUT_S = 1.0
# Largest exposition read from one other process (a few hundred KiB is typical).
SIBLING_SCRAPE_MAX_BYTES = 16 * 1024 * 1024


def exported_port() -> int:
    """The port this process's /metrics endpoint listens on (0: none)."""
    return _exported_port


def add_process_metrics(sources: Callable[[], Iterable[tuple[str, int]]]) -> None:
    """Serve, on this process's /metrics, the metrics of the service's other processes too:
    `sources()` names them (a `process` label value, the loopback port of its exporter), read at
    each scrape; every sample then carries `process` ("0" for this one). One endpoint per service,
    like Prometheus' multiprocess mode, without its shared files."""
    _process_sources.append(sources)


def _merged(own: Iterable[Any], others: list[tuple[str, int]]) -> Iterator[Any]:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Any] = {}

    def add(source: Iterable[Any], label: str) -> None:
        for family in source:
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            elif merged.type != family.type:
                continue
            merged.samples.extend(sample._replace(labels={**sample.labels, "process": label})
                                  for sample in family.samples)

    add(own, "0")
    for label, port in others:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SIBLING_SCRAPE_TIMEOUT_S) as reply:
                body = reply.read(SIBLING_SCRAPE_MAX_BYTES + 1)
            if len(body) > SIBLING_SCRAPE_MAX_BYTES:
                raise ValueError(f"over {SIBLING_SCRAPE_MAX_BYTES} bytes")
            parsed = list(text_string_to_metric_families(body.decode()))
        except (OSError, ValueError) as exc:  # restarting, gone or garbled: its series pause meanwhile
            log.debug("process %s's metrics on port %d: %s", label, port, exc)
            continue
        add(parsed, label)
    yield from families.values()


class _ServedMetrics:
    """What the /metrics endpoint serves: this process's registry, merged with its service's other
    processes when it has some (`add_process_metrics`)."""

    def restricted_registry(self, names: Iterable[str]) -> _ServedMetrics:
        """`?name[]=...` scrapes: the whole exposition (the filter is an optimisation)."""
        return self

    def collect(self) -> Iterator[Any]:
        from prometheus_client import REGISTRY

        others = [source for sources in _process_sources for source in sources()]
        if not others:
            yield from REGISTRY.collect()
        else:
            yield from _merged(REGISTRY.collect(), others)


def metrics_bind_address(host: str) -> str:
    """The address the /metrics endpoint binds: the service's own `--host` (gRPC spells IPv6 `[::1]`)."""
    return host.strip()[1:-1] if host.strip().startswith("[") else host.strip()


def configure_telemetry(service: str, *, otlp_endpoint: str | None, metrics_port: int, metrics_host: str) -> bool:
    """Install providers once. Returns True when traces are exported (so spans are worth making).

    The Prometheus endpoint listens on `metrics_host`, the address the service's gRPC port binds,
    so a service kept on loopback does not publish its metrics on every interface."""
    global _configured, _exported_port
    if _configured:
        return otlp_endpoint is not None
    _configured = True
    resource = Resource.create({"service.name": f"aiaas-{service}", "service.namespace": "aiaas"})
    readers: list[MetricReader] = []
    if metrics_port:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        if metrics_port == LOOPBACK_METRICS:
            server, _ = start_http_server(0, addr="127.0.0.1", registry=_ServedMetrics())  # type: ignore[arg-type]
        else:
            server, _ = start_http_server(metrics_port, addr=metrics_bind_address(metrics_host),
                                          registry=_ServedMetrics())  # type: ignore[arg-type]
        _exported_port = server.server_port
        readers.append(PrometheusMetricReader())
    tracer_provider = TracerProvider(resource=resource)
    if otlp_endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            log.error("otlp_endpoint is set but the exporter is missing: pip install 'aiaas[otlp]'")
        else:
            tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=otlp_endpoint, insecure=True)))
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    return otlp_endpoint is not None
