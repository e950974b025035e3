"""OpenTelemetry set up once per process: tracer and meter providers, OTLP and Prometheus."""

from __future__ import annotations

import logging

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("aiaas.telemetry")
_configured = False


def metrics_bind_address(host: str) -> str:
    """The address the /metrics endpoint binds: the service's own `--host` (gRPC spells IPv6 `[::1]`)."""
    return host.strip()[1:-1] if host.strip().startswith("[") else host.strip()


def configure_telemetry(service: str, *, otlp_endpoint: str | None, metrics_port: int, metrics_host: str) -> bool:
    """Install providers once. Returns True when traces are exported (so spans are worth making).

    The Prometheus endpoint listens on `metrics_host`, the address the service's gRPC port binds,
    so a service kept on loopback does not publish its metrics on every interface."""
    global _configured
    if _configured:
        return otlp_endpoint is not None
    _configured = True
    resource = Resource.create({"service.name": f"aiaas-{service}", "service.namespace": "aiaas"})
    readers: list[MetricReader] = []
    if metrics_port:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=metrics_bind_address(metrics_host))
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
