"""Canaries under analysis: judge each routed canary against production and roll a bad one back.

`CanaryWatch` owns the route snapshot, each model's latest `CanaryStatus`, when its canary
started being watched, and the `canary:<model>` alerts. The statistics live in `canary`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from services.common.errors import Aborted, AiaasError, NotFound, Unavailable
from services.common.outages import describe_error
from services.monitor.alerts import AlertHub
from services.monitor.canary import CanaryDecision, CanaryPolicy, judge
from services.monitor.control import ControlPlane
from services.monitor.entities import (
    Alert,
    AlertKind,
    AlertState,
    CanaryStatus,
    CanaryVerdict,
    MetricsFilter,
    RouteView,
    SeriesMetrics,
)
from services.monitor.metrics import RequestWindows
from services.monitor.prom import PrometheusExport
from services.monitor.settings import MonitorSettings

log = logging.getLogger("aiaas.monitor")

_ROLLBACK_TRIES = 3


def policy_of(settings: MonitorSettings) -> CanaryPolicy:
    return CanaryPolicy(
        min_requests=settings.canary_min_requests, alpha=settings.canary_alpha,
        min_error_increase=settings.canary_min_error_increase, max_p99_ratio=settings.canary_max_p99_ratio,
        min_p99_increase_ms=settings.canary_min_p99_increase_ms,
        max_ttft_p99_ratio=settings.canary_max_ttft_p99_ratio, min_ttft_increase_ms=settings.canary_min_ttft_increase_ms,
        min_labels=settings.canary_min_labels, max_accuracy_drop=settings.canary_max_accuracy_drop,
    )


class CanaryWatch:
    def __init__(self, settings: MonitorSettings, control: ControlPlane, alerts: AlertHub,
                 windows: RequestWindows, prom: PrometheusExport | None, clock: Callable[[], int]) -> None:
        self.settings = settings
        self.control = control
        self.alerts = alerts
        self.windows = windows
        self.prom = prom
        self.clock = clock
        self.policy = policy_of(settings)
        self.routes: dict[str, RouteView] = {}
        self.canaries: dict[str, CanaryStatus] = {}
        self._since: dict[str, int] = {}

    def replace(self, routes: list[RouteView]) -> None:
        """Take the control plane's routes as the current set; forget canaries of routes now gone."""
        models = {r.model for r in routes}
        for model in [m for m in list(self.canaries) if m not in models]:
            del self.canaries[model]
        self.routes = {r.model: r for r in routes}

    def changed(self, model: str, route: RouteView | None, revision: int) -> None:
        """One route written (or deleted: None) at `revision`; older news than ours is ignored."""
        held = self.routes.get(model)
        if held is not None and held.revision > revision:
            return
        if route is None:
            self.routes.pop(model, None)
            self.canaries.pop(model, None)
            self._since.pop(model, None)
        else:
            self.routes[model] = route

    def status(self, model: str) -> CanaryStatus:
        status = self.canaries.get(model)
        if status is None:
            raise NotFound(f"model {model!r} has no canary under analysis")
        return status

    async def evaluate(self, route: RouteView) -> None:
        s = self.settings
        weights = {split.alias: split.weight for split in route.splits if split.alias}
        alert_id = f"canary:{route.model}"
        if weights.get(s.canary_alias, 0) <= 0 or weights.get(s.production_alias, 0) <= 0:
            self._since.pop(route.model, None)
            return
        # The canary takes traffic (again): a past rollback alert is over.
        self.alerts.resolve(alert_id, summary=f"{route.model}: canary takes traffic again")
        now = self.clock()
        since = self._since.setdefault(route.model, now)
        window = MetricsFilter(model=route.model, source="gateway", window_s=s.canary_window_s, merge=True)
        (prod,) = await self.windows.query(_with_alias(window, s.production_alias), since_ns=since)
        per_version = await self.windows.query(_with_alias(window, s.canary_alias, merge=False), since_ns=since)
        (canary,) = await self.windows.query(_with_alias(window, s.canary_alias), since_ns=since)
        decision = judge(prod, canary, self.policy)
        canary_version = max(per_version, key=lambda m: m.count).key.version if per_version else 0
        status = CanaryStatus(model=route.model, verdict=decision.verdict, production=prod, canary=canary,
                              error_p_value=decision.error_p_value, p99_ratio=decision.p99_ratio,
                              ttft_p99_ratio=decision.ttft_p99_ratio, reason=decision.reason, time_ns=now,
                              accuracy_p_value=decision.accuracy_p_value)
        self.canaries[route.model] = status
        if not decision.regressed:
            return
        rolled_back = False
        if s.canary_rollback:
            rolled_back = await self._roll_back(route, canary_version, decision, status)
            if not rolled_back:
                return
        status.rolled_back = rolled_back
        self._alert_regression(route.model, canary_version, decision, canary, rolled_back)

    def _alert_regression(self, model: str, canary_version: int, decision: CanaryDecision, canary: SeriesMetrics,
                          rolled_back: bool) -> None:
        value, threshold = {
            CanaryVerdict.ERROR_REGRESSION: (canary.error_rate, self.policy.min_error_increase),
            CanaryVerdict.QUALITY_REGRESSION: (canary.accuracy, self.policy.max_accuracy_drop),
        }.get(decision.verdict, (decision.p99_ratio, self.policy.max_p99_ratio))
        if decision.verdict is CanaryVerdict.LATENCY_REGRESSION and decision.ttft_p99_ratio > self.policy.max_ttft_p99_ratio:
            value, threshold = decision.ttft_p99_ratio, self.policy.max_ttft_p99_ratio
        action = "set the canary's weight to 0" if rolled_back else "rollback disabled: route left as is"
        self.alerts.fire(Alert(
            id=f"canary:{model}", kind=AlertKind.CANARY_ROLLBACK, state=AlertState.FIRING, model=model,
            version=canary_version, alias=self.settings.canary_alias, summary=f"{model}: {decision.reason}; {action}",
            value=value, threshold=threshold,
            details=(("verdict", decision.verdict.value), ("rolled_back", str(rolled_back).lower())),
        ))

    async def _zero_canary_weight(self, route: RouteView) -> bool:
        """Set the canary's weight to 0; False when someone else did, or the route cannot be written."""
        alias = self.settings.canary_alias
        current = route
        for _ in range(_ROLLBACK_TRIES):
            try:
                self.routes[route.model] = await self.control.set_split_weight(
                    route.model, alias, 0, current.revision, "monitor")
                return True
            except Aborted:
                fresh = await self.control.get_route(route.model)
                if fresh is None or not any(sp.alias == alias and sp.weight > 0 for sp in fresh.splits):
                    return False  # someone (another replica, an operator) already took it out
                current = fresh
            except Unavailable as exc:  # the registry client has warned (once a minute at most)
                log.debug("canary rollback of %s waits for the registry: %s", route.model, exc.message)
                return False
            except AiaasError as exc:
                log.warning("canary rollback of %s failed: %s", route.model, describe_error(exc))
                return False
        return False

    async def _roll_back(self, route: RouteView, canary_version: int, decision: CanaryDecision,
                         status: CanaryStatus) -> bool:
        if not await self._zero_canary_weight(route):
            return False
        prod, canary = status.production, status.canary
        details: dict[str, Any] = {
            "reason": decision.reason, "verdict": decision.verdict.value, "alias": self.settings.canary_alias,
            "canary_requests": canary.count if canary else 0,
            "canary_error_rate": canary.error_rate if canary else 0.0,
            "canary_p99_ms": canary.latency.p99_ms if canary else 0.0,
            "production_requests": prod.count if prod else 0,
            "production_error_rate": prod.error_rate if prod else 0.0,
            "production_p99_ms": prod.latency.p99_ms if prod else 0.0,
            "error_p_value": status.error_p_value, "p99_ratio": status.p99_ratio,
            "canary_labels": canary.class_labels if canary else 0,
            "canary_accuracy": canary.accuracy if canary else 0.0,
            "production_labels": prod.class_labels if prod else 0,
            "production_accuracy": prod.accuracy if prod else 0.0,
            "accuracy_p_value": status.accuracy_p_value,
        }
        try:
            await self.control.append_audit("canary.rollback", route.model, canary_version, details, "monitor")
        except AiaasError as exc:
            log.warning("could not record the rollback of %s in the audit log: %s", route.model,
                        describe_error(exc))
        if self.prom is not None:
            self.prom.canary_rollbacks.labels(route.model).inc()
        self._since.pop(route.model, None)
        log.warning("rolled back the canary of %s (version %d): %s", route.model, canary_version, decision.reason)
        return True


def _with_alias(flt: MetricsFilter, alias: str, merge: bool = True) -> MetricsFilter:
    return MetricsFilter(model=flt.model, version=flt.version, alias=alias, source=flt.source,
                         window_s=flt.window_s, merge=merge)
