"""Python SDK for the monitor: window metrics, SLOs, baselines and drift, canary status, alerts.

    from aiaas import MonitorClient

    with MonitorClient("localhost:50053") as mon:
        for s in mon.metrics(model="fraud", window_s=60):
            print(s["model"], s["version"], s["alias"], s["rate_per_second"], s["latency"]["p99_ms"])
        mon.set_slo("fraud", p99_latency_ms=50, max_error_rate=0.01, window_s=300)
        mon.set_baseline("fraud", 3, sample={"input[0]": [...], "input[1]": [...]})
        for alert in mon.watch_alerts():
            print(alert["state"], alert["summary"])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Self

import grpc
from google.protobuf import json_format

from aiaas.identity import ClientIdentity
from aiaas.monitor.v1 import monitor_pb2 as pb
from aiaas.monitor.v1 import monitor_pb2_grpc

DEFAULT_URL = "localhost:50053"


def to_dict(message: Any) -> dict[str, Any]:
    """A message as plain values with the proto's field names (zeros included)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def alert_to_dict(alert: pb.Alert) -> dict[str, Any]:
    data = to_dict(alert)
    data["kind"] = pb.AlertKind.Name(alert.kind).removeprefix("ALERT_KIND_").lower()
    data["state"] = pb.AlertState.Name(alert.state).removeprefix("ALERT_STATE_").lower()
    data["version"] = alert.version
    data["time_ns"] = alert.time_ns
    return data


def series_to_dict(series: pb.SeriesMetrics) -> dict[str, Any]:
    data = to_dict(series)
    data["version"] = series.version
    data["count"] = series.count
    data["errors"] = series.errors
    for name in ("class_labels", "correct", "value_labels", "scores"):
        data[name] = getattr(series, name)
    data["batch_sizes"] = {b.batch_size: b.count for b in series.batch_sizes}
    data["status_counts"] = {k: int(v) for k, v in series.status_counts.items()}
    return data


class MonitorClient:
    def __init__(self, url: str = DEFAULT_URL, *, timeout_s: float = 10.0,
                 credentials: grpc.ChannelCredentials | None = None, identity: ClientIdentity | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._channel = (grpc.secure_channel(url, credentials) if credentials is not None
                         else (identity or ClientIdentity.from_env()).channel(url))
        self.stub = monitor_pb2_grpc.MonitorStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def metrics(self, model: str = "", *, version: int = 0, alias: str = "", source: str = "",
                window_s: float = 0.0, merge: bool = False) -> list[dict[str, Any]]:
        reply = self.stub.QueryMetrics(pb.QueryMetricsRequest(
            model=model, version=version, alias=alias, source=source, window_seconds=window_s, merge=merge),
            timeout=self.timeout_s)
        return [series_to_dict(s) for s in reply.series]

    def set_slo(self, model: str, *, p99_latency_ms: float | None = None, max_error_rate: float | None = None,
                window_s: float = 0.0, min_requests: int = 0, source: str = "", actor: str = "",
                p99_ttft_ms: float | None = None, p99_inter_token_ms: float | None = None,
                min_accuracy: float | None = None, max_mean_abs_error: float | None = None,
                min_labels: int = 0) -> dict[str, Any]:
        """Latency / error-rate objectives judged on requests (p99 TTFT / inter-token latency on generative
        ones); `min_accuracy` / `max_mean_abs_error` on labels sent back through the gateway's Feedback
        (once the window holds `min_labels`)."""
        slo = pb.SLO(model=model, window_seconds=window_s, min_requests=min_requests, source=source,
                     min_accuracy=min_accuracy, max_mean_abs_error=max_mean_abs_error, min_labels=min_labels,
                     p99_ttft_ms=p99_ttft_ms, p99_inter_token_ms=p99_inter_token_ms)
        if p99_latency_ms is not None:
            slo.p99_latency_ms = p99_latency_ms
        if max_error_rate is not None:
            slo.max_error_rate = max_error_rate
        reply = self.stub.SetSLO(pb.SetSLORequest(slo=slo, actor=actor), timeout=self.timeout_s)
        return to_dict(reply.slo)

    def list_slos(self, model: str = "") -> list[dict[str, Any]]:
        reply = self.stub.ListSLOs(pb.ListSLOsRequest(model=model), timeout=self.timeout_s)
        return [to_dict(s) for s in reply.slos]

    def delete_slo(self, model: str, actor: str = "") -> None:
        self.stub.DeleteSLO(pb.DeleteSLORequest(model=model, actor=actor), timeout=self.timeout_s)

    def set_baseline(self, model: str, version: int, *, sample: Mapping[str, Sequence[float]] | None = None,
                     learn_from_requests: int = 0, bins: int = 0, actor: str = "") -> dict[str, Any]:
        """Baseline from a sample of each feature ("<input>" or "<input>[j]"), or learned from traffic."""
        request = pb.SetBaselineRequest(model=model, version=version, bins=bins, actor=actor)
        if sample is not None:
            request.sample.CopyFrom(pb.FeatureSample(features=[
                pb.FeatureValues(feature=f, values=[float(v) for v in values]) for f, values in sample.items()]))
        else:
            request.learn_from_requests = learn_from_requests
        return to_dict(self.stub.SetBaseline(request, timeout=self.timeout_s).baseline)

    def drift(self, model: str, version: int, window_s: float = 0.0) -> list[dict[str, Any]]:
        reply = self.stub.GetDrift(pb.GetDriftRequest(model=model, version=version, window_seconds=window_s),
                                   timeout=self.timeout_s)
        return [{"feature": f.feature, "psi": f.psi, "samples": f.samples, "drifted": f.drifted}
                for f in reply.features]

    def canary_status(self, model: str) -> dict[str, Any]:
        reply = self.stub.GetCanaryStatus(pb.GetCanaryStatusRequest(model=model), timeout=self.timeout_s)
        data = to_dict(reply.status)
        data["verdict"] = pb.CanaryVerdict.Name(reply.status.verdict).removeprefix("CANARY_VERDICT_").lower()
        return data

    def alerts(self, model: str = "", *, active_only: bool = False, limit: int = 0) -> list[dict[str, Any]]:
        reply = self.stub.ListAlerts(pb.ListAlertsRequest(model=model, active_only=active_only, limit=limit),
                                     timeout=self.timeout_s)
        return [alert_to_dict(a) for a in reply.alerts]

    def watch_alerts(self, model: str = "", *, include_active: bool = False) -> Iterator[dict[str, Any]]:
        """Alerts as they fire and resolve, until the caller stops iterating."""
        stream = self.stub.WatchAlerts(pb.WatchAlertsRequest(model=model, include_active=include_active))
        try:
            for reply in stream:
                data = alert_to_dict(reply.alert)
                data["missed"] = reply.missed
                yield data
        finally:
            stream.cancel()
