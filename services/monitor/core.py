"""The monitor's domain: ingest telemetry, answer window queries, keep SLOs, drift and canaries.

No grpc here: the servicer converts protobuf to the types in `entities` and calls one method.
`MonitorCore` composes the parts, each owning its own state: `RequestWindows` (request counters,
loads, queries), `SLOWatch`, `DriftWatch` (baselines and drift), `ShadowWatch` and `CanaryWatch`
(judgement and rollback). Windows live in a `WindowStore` (Redis or memory), control-plane
state behind a `ControlPlane` (the registry or memory), alerts in an `AlertHub`. The core
follows the control plane (`follow_control`): it is the `ControlListener` that hands each SLO,
baseline and route change to the part that owns it, as the change happens. `run()` evaluates
every check each `evaluation_interval_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from services.common.errors import Unavailable
from services.monitor.alerts import AlertHub
from services.monitor.canary_watch import CanaryWatch
from services.monitor.control import ControlPlane, ControlState, VersionKey
from services.monitor.drift_watch import DriftWatch
from services.monitor.entities import (
    SLO,
    AlertKind,
    Baseline,
    CanaryStatus,
    FeatureDrift,
    FeatureHistogram,
    MetricsFilter,
    Report,
    RouteView,
    SeriesMetrics,
)
from services.monitor.metrics import RequestWindows
from services.monitor.prom import PrometheusExport
from services.monitor.settings import MonitorSettings
from services.monitor.shadows import ShadowWatch
from services.monitor.slos import SLOWatch
from services.monitor.windows import WindowStore

log = logging.getLogger("aiaas.monitor")


class MonitorCore:
    def __init__(self, settings: MonitorSettings, store: WindowStore, control: ControlPlane,
                 alerts: AlertHub | None = None, prom: PrometheusExport | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.settings = settings
        self.store = store
        self.control = control
        self.alerts = alerts or AlertHub(settings.alert_history, settings.subscriber_queue)
        self.prom = prom
        self.clock = clock
        self.windows = RequestWindows(settings, store, prom, clock)
        self.slo_watch = SLOWatch(settings, control, self.alerts, self.windows)
        self.drift_watch = DriftWatch(settings, store, control, self.alerts, prom, clock)
        self.shadow_watch = ShadowWatch(settings, store, self.alerts, clock)
        self.canary_watch = CanaryWatch(settings, control, self.alerts, self.windows, prom, clock)

    # The control-plane snapshots, as each part holds them.
    @property
    def slos(self) -> dict[str, SLO]:
        return self.slo_watch.slos

    @property
    def baselines(self) -> dict[tuple[str, int], tuple[Baseline, int]]:
        return self.drift_watch.baselines

    @property
    def routes(self) -> dict[str, RouteView]:
        return self.canary_watch.routes

    @property
    def canaries(self) -> dict[str, CanaryStatus]:
        return self.canary_watch.canaries

    # ---- what the servicer calls ----------------------------------------------------------

    async def ingest(self, report: Report) -> int:
        now = self.clock()
        accepted = await self.windows.ingest(report, now)
        if report.samples:
            await self.drift_watch.ingest(report, now)
        if report.shadow_diffs:
            await self.shadow_watch.ingest(report.shadow_diffs, now)
        self.windows.count_report(report)
        return accepted

    async def query(self, flt: MetricsFilter, since_ns: int = 0) -> list[SeriesMetrics]:
        return await self.windows.query(flt, since_ns)

    async def set_slo(self, slo: SLO, actor: str) -> SLO:
        return await self.slo_watch.set(slo, actor)

    async def list_slos(self, model: str = "") -> list[SLO]:
        return self.slo_watch.matching(model)

    async def delete_slo(self, model: str, actor: str) -> None:
        await self.slo_watch.delete(model, actor)

    async def set_baseline(self, model: str, version: int, *, histograms: list[FeatureHistogram] | None = None,
                           sample: dict[str, list[float]] | None = None, learn_from_requests: int = 0,
                           bins: int = 0, actor: str = "") -> Baseline:
        return await self.drift_watch.set_baseline(model, version, histograms=histograms, sample=sample,
                                                   learn_from_requests=learn_from_requests, bins=bins, actor=actor)

    async def get_baseline(self, model: str, version: int) -> Baseline:
        return await self.drift_watch.get_baseline(model, version)

    async def drift(self, model: str, version: int, window_s: float = 0.0) -> list[FeatureDrift]:
        return await self.drift_watch.drift(model, version, window_s)

    def canary_status(self, model: str) -> CanaryStatus:
        return self.canary_watch.status(model)

    # ---- the control plane's changes (ControlListener) --------------------------------------

    def follow_control(self) -> None:
        """Start following the control plane: its state now, then each change (inside the event loop)."""
        self.control.follow(self)

    def control_replaced(self, state: ControlState) -> None:
        self.slo_watch.replace(list(state.slos.values()))
        self.drift_watch.replace(list(state.baselines.values()))
        self.canary_watch.replace(list(state.routes.values()))

    def slo_changed(self, model: str, slo: SLO | None) -> None:
        self.slo_watch.changed(model, slo)

    def baseline_changed(self, key: VersionKey, baseline: Baseline | None, revision: int) -> None:
        self.drift_watch.changed(key, baseline, revision)

    def route_changed(self, model: str, route: RouteView | None, revision: int) -> None:
        self.canary_watch.changed(model, route, revision)

    # ---- loop -----------------------------------------------------------------------------

    async def evaluate(self) -> None:
        """One pass of every check; one failure spares the rest."""
        checks: list[tuple[str, Awaitable[None]]] = [
            (f"SLO of {m}", self.slo_watch.evaluate(slo)) for m, slo in self.slos.items()]
        checks += [(f"drift of {b.model}/{b.version}", self.drift_watch.evaluate(b))
                   for b in self.drift_watch.watched()]
        checks += [(f"canary of {r.model}", self.canary_watch.evaluate(r)) for r in list(self.routes.values())]
        checks.append(("shadows", self.shadow_watch.evaluate()))
        if self.prom is not None:
            checks.append(("prometheus gauges", self.windows.export_gauges()))
        for what, check in checks:
            try:
                await check
            except Unavailable as exc:  # a dependency is down: its client has warned, once a minute at most
                log.debug("evaluating %s skipped: %s", what, exc.message)
            except Exception:  # one broken check must not stop the others
                log.exception("evaluating %s failed", what)
        if self.prom is not None:
            firing = Counter(a.kind.value for a in self.alerts.active.values())
            for kind in AlertKind:
                self.prom.alerts_firing.labels(kind.value).set(firing.get(kind.value, 0))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            await self.evaluate()
            delay = max(0.0, self.settings.evaluation_interval_s - (time.monotonic() - started))
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass

    async def close(self) -> None:
        self.alerts.close()
        await self.store.close()
        await self.control.close()
