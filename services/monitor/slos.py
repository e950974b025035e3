"""Service-level objectives: keep each model's SLO and alert while its window breaches it.

`SLOWatch` owns the SLO snapshot (written through the control plane, kept current by its
changes) and the `slo:<model>:latency` / `slo:<model>:error_rate` alerts, resolved when the SLO
goes, whoever deleted it. Quality objectives (`min_accuracy`, `max_mean_abs_error`) are judged on
the labels clients sent back through the gateway's Feedback (`slo:<model>:accuracy`,
`slo:<model>:quality_error`), once the window holds `min_labels` of them.
"""

from __future__ import annotations

import math

from services.common.errors import InvalidArgument
from services.monitor.alerts import AlertHub
from services.monitor.control import ControlPlane
from services.monitor.entities import SLO, Alert, AlertKind, AlertState, MetricsFilter
from services.monitor.metrics import RequestWindows
from services.monitor.settings import MonitorSettings

_SOURCES = ("", "gateway", "inference")


def check_slo(slo: SLO, retention_s: float) -> None:
    """Raise InvalidArgument unless the SLO can be evaluated."""
    if not slo.model:
        raise InvalidArgument("an SLO needs a model")
    objectives = (slo.p99_latency_ms, slo.max_error_rate, slo.p99_ttft_ms, slo.p99_inter_token_ms,
                  slo.min_accuracy, slo.max_mean_abs_error)
    if all(o is None for o in objectives):
        raise InvalidArgument("an SLO needs at least one of p99_latency_ms, max_error_rate, p99_ttft_ms, "
                              "p99_inter_token_ms, min_accuracy, max_mean_abs_error")
    for name in ("p99_latency_ms", "p99_ttft_ms", "p99_inter_token_ms"):
        value = getattr(slo, name)
        if value is not None and not value > 0:
            raise InvalidArgument(f"{name} must be > 0")
    if slo.min_accuracy is not None and not 0 <= slo.min_accuracy <= 1:
        raise InvalidArgument("min_accuracy must be between 0 and 1")
    if slo.max_mean_abs_error is not None and not (slo.max_mean_abs_error >= 0 and math.isfinite(slo.max_mean_abs_error)):
        raise InvalidArgument("max_mean_abs_error must be a finite number >= 0")
    if slo.min_labels < 0:
        raise InvalidArgument("min_labels must be >= 0")
    if slo.max_error_rate is not None and not 0 <= slo.max_error_rate <= 1:
        raise InvalidArgument("max_error_rate must be between 0 and 1")
    if slo.window_s < 0 or slo.window_s > retention_s:
        raise InvalidArgument(f"window_seconds must be 0..{retention_s:g}")
    if slo.min_requests < 0:
        raise InvalidArgument("min_requests must be >= 0")
    if slo.source not in _SOURCES:
        raise InvalidArgument("source must be empty, 'gateway' or 'inference'")


class SLOWatch:
    def __init__(self, settings: MonitorSettings, control: ControlPlane, alerts: AlertHub,
                 windows: RequestWindows) -> None:
        self.settings = settings
        self.control = control
        self.alerts = alerts
        self.windows = windows
        self.slos: dict[str, SLO] = {}

    def replace(self, slos: list[SLO]) -> None:
        """Take the control plane's SLOs as the current set."""
        fresh = {slo.model: slo for slo in slos}
        for model in [m for m in self.slos if m not in fresh]:
            self._forget(model)
        self.slos = fresh

    def changed(self, model: str, slo: SLO | None) -> None:
        """One SLO written (or deleted: None) in the control plane."""
        if slo is None:
            self._forget(model)
        else:
            self.slos[model] = slo

    def _forget(self, model: str) -> None:
        self.slos.pop(model, None)
        for kind in ("latency", "error_rate", "ttft", "inter_token", "accuracy", "quality_error"):
            self.alerts.resolve(f"slo:{model}:{kind}", summary=f"SLO of {model} deleted")

    async def set(self, slo: SLO, actor: str) -> SLO:
        check_slo(slo, self.settings.retention_s)
        stored = await self.control.put_slo(slo, actor)
        self.slos[stored.model] = stored
        return stored

    def matching(self, model: str = "") -> list[SLO]:
        return [self.slos[m] for m in sorted(self.slos) if not model or m == model]

    async def delete(self, model: str, actor: str) -> None:
        await self.control.delete_slo(model, actor)
        self._forget(model)

    async def evaluate(self, slo: SLO) -> None:
        window = slo.window_s or self.settings.slo_window_s
        if slo.min_accuracy is not None or slo.max_mean_abs_error is not None:
            await self._evaluate_quality(slo, window)
        request_objectives = (slo.p99_latency_ms, slo.max_error_rate, slo.p99_ttft_ms, slo.p99_inter_token_ms)
        if all(o is None for o in request_objectives):
            return
        source = slo.source
        if not source:
            names = await self.windows.series_names(window)
            has_gateway = any(n.startswith(f"gateway|{slo.model}|") for n in names)
            source = "gateway" if has_gateway else "inference"
        (m,) = await self.windows.query(MetricsFilter(model=slo.model, source=source, window_s=window, merge=True))
        if m.count < (slo.min_requests or self.settings.slo_min_requests):
            return
        details = (("source", source), ("window_seconds", f"{window:g}"))
        if slo.p99_latency_ms is not None:
            breached = m.latency.p99_ms > slo.p99_latency_ms
            self.alerts.set_condition(Alert(
                id=f"slo:{slo.model}:latency", kind=AlertKind.SLO_LATENCY,
                state=AlertState.FIRING if breached else AlertState.RESOLVED, model=slo.model,
                summary=(f"{slo.model}: p99 latency {m.latency.p99_ms:.1f} ms "
                         f"{'above' if breached else 'within'} the SLO of {slo.p99_latency_ms:g} ms "
                         f"over {window:g}s ({m.count} requests)"),
                value=m.latency.p99_ms, threshold=slo.p99_latency_ms, details=details,
            ), breached)
        if slo.max_error_rate is not None:
            breached = m.error_rate > slo.max_error_rate
            self.alerts.set_condition(Alert(
                id=f"slo:{slo.model}:error_rate", kind=AlertKind.SLO_ERROR_RATE,
                state=AlertState.FIRING if breached else AlertState.RESOLVED, model=slo.model,
                summary=(f"{slo.model}: error rate {m.error_rate:.2%} "
                         f"{'above' if breached else 'within'} the SLO of {slo.max_error_rate:.2%} "
                         f"over {window:g}s ({m.count} requests)"),
                value=m.error_rate, threshold=slo.max_error_rate, details=details,
            ), breached)
        gen = m.generation
        for objective, kind, alert_kind, label in (
                (slo.p99_ttft_ms, "ttft", AlertKind.SLO_TTFT, "time to first token"),
                (slo.p99_inter_token_ms, "inter_token", AlertKind.SLO_INTER_TOKEN, "inter-token latency")):
            if objective is None or gen is None:
                continue
            dist = gen.ttft if kind == "ttft" else gen.inter_token
            breached = dist.p99_ms > objective
            self.alerts.set_condition(Alert(
                id=f"slo:{slo.model}:{kind}", kind=alert_kind,
                state=AlertState.FIRING if breached else AlertState.RESOLVED, model=slo.model,
                summary=(f"{slo.model}: p99 {label} {dist.p99_ms:.1f} ms "
                         f"{'above' if breached else 'within'} the SLO of {objective:g} ms "
                         f"over {window:g}s ({gen.count} generative requests)"),
                value=dist.p99_ms, threshold=objective, details=details,
            ), breached)

    async def _evaluate_quality(self, slo: SLO, window: float) -> None:
        # Labels come back through the gateway: its series carry them, whatever source the SLO names.
        (m,) = await self.windows.query(MetricsFilter(model=slo.model, source="gateway", window_s=window, merge=True))
        need = slo.min_labels or self.settings.slo_min_labels
        details = (("window_seconds", f"{window:g}"), ("min_labels", str(need)))
        if slo.min_accuracy is not None and m.class_labels >= need:
            breached = m.accuracy < slo.min_accuracy
            self.alerts.set_condition(Alert(
                id=f"slo:{slo.model}:accuracy", kind=AlertKind.SLO_ACCURACY,
                state=AlertState.FIRING if breached else AlertState.RESOLVED, model=slo.model,
                summary=(f"{slo.model}: online accuracy {m.accuracy:.2%} "
                         f"{'below' if breached else 'within'} the SLO of {slo.min_accuracy:.2%} "
                         f"over {window:g}s ({m.correct}/{m.class_labels} labels right)"),
                value=m.accuracy, threshold=slo.min_accuracy, details=details,
            ), breached)
        if slo.max_mean_abs_error is not None and m.value_labels >= need:
            breached = m.mean_abs_error > slo.max_mean_abs_error
            self.alerts.set_condition(Alert(
                id=f"slo:{slo.model}:quality_error", kind=AlertKind.SLO_QUALITY_ERROR,
                state=AlertState.FIRING if breached else AlertState.RESOLVED, model=slo.model,
                summary=(f"{slo.model}: online mean absolute error {m.mean_abs_error:.4g} "
                         f"{'above' if breached else 'within'} the SLO of {slo.max_mean_abs_error:g} "
                         f"over {window:g}s ({m.value_labels} labels)"),
                value=m.mean_abs_error, threshold=slo.max_mean_abs_error, details=details,
            ), breached)
