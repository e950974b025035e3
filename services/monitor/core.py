"""The monitor's domain: ingest telemetry, answer window queries, keep SLOs, drift and canaries.

No grpc here: the servicer converts protobuf to the types in `entities` and calls one method.
Windows live in a `WindowStore` (Redis or memory), control-plane state behind a `ControlPlane`
(the registry or memory), alerts in an `AlertHub`. `run()` evaluates SLOs, drift, shadows and
canaries every `evaluation_interval_s`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from services.common.errors import Aborted, AiaasError, InvalidArgument, NotFound
from services.monitor import drift as drift_math
from services.monitor.alerts import AlertHub
from services.monitor.canary import CanaryPolicy, judge
from services.monitor.control import ControlPlane
from services.monitor.entities import (
    SLO,
    Alert,
    AlertKind,
    AlertState,
    Baseline,
    CanaryStatus,
    CanaryVerdict,
    FeatureDrift,
    FeatureHistogram,
    MetricsFilter,
    Report,
    RouteView,
    SeriesKey,
    SeriesMetrics,
)
from services.monitor.prom import PrometheusExport
from services.monitor.settings import MonitorSettings
from services.monitor.windows import NS_DRIFT, NS_REQUESTS, WindowStore, add_request, bucket_of, summarize

log = logging.getLogger("aiaas.monitor")

NS_SHADOW = "shadow"
_NS = 1_000_000_000


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
        self.policy = CanaryPolicy(
            min_requests=settings.canary_min_requests, alpha=settings.canary_alpha,
            min_error_increase=settings.canary_min_error_increase, max_p99_ratio=settings.canary_max_p99_ratio,
            min_p99_increase_ms=settings.canary_min_p99_increase_ms,
        )
        self.slos: dict[str, SLO] = {}
        self.baselines: dict[tuple[str, int], tuple[Baseline, int]] = {}
        self.routes: dict[str, RouteView] = {}
        self.canaries: dict[str, CanaryStatus] = {}
        self._canary_since: dict[str, int] = {}
        self._learners: dict[tuple[str, int], drift_math.BaselineLearner] = {}
        self._first_known: set[tuple[str, int]] = set()
        # Versions the gateway sends drift samples for: inference's samples of them are ignored,
        # since the same requests would otherwise be counted twice (once from each).
        self._gateway_sampled: set[tuple[str, int]] = set()
        self._last_refresh = 0.0

    # ---- ingest ---------------------------------------------------------------------------

    async def ingest(self, report: Report) -> int:
        bucket_s = self.store.bucket_s
        now = self.clock()
        increments: dict[tuple[str, int], Counter[str]] = {}
        first_ok: dict[tuple[str, int], int] = {}
        for req in report.requests:
            if not req.model:
                continue
            req.source = req.source or report.source
            req.time_ns = req.time_ns or now
            add_request(increments, req, bucket_s)
            key = (req.model, req.version)
            if req.status == "OK" and req.version and key not in self._first_known:
                first_ok[key] = min(req.time_ns, first_ok.get(key, req.time_ns))
        await self.store.add(NS_REQUESTS, increments)
        if self.prom is not None:
            self.prom.add(increments)
        for load in report.loads:
            await self.store.put_meta(f"load:{load.model}|{load.version}",
                                      {"loaded_ns": load.time_ns or now, "load_us": load.load_us})
            await self.store.delete_meta_field(f"load:{load.model}|{load.version}", "first_ns")
            self._first_known.discard((load.model, load.version))
        for (model, version), t in first_ok.items():
            await self.store.put_meta(f"load:{model}|{version}", {"first_ns": t}, only_if_absent=True)
            self._first_known.add((model, version))
        if report.samples:
            await self._ingest_samples(report, now)
        if report.shadow_diffs:
            shadow: dict[tuple[str, int], Counter[str]] = {}
            for diff in report.shadow_diffs:
                fields = shadow.setdefault(
                    (f"{diff.model}|{diff.shadow_version}", bucket_of(diff.time_ns or now, bucket_s)), Counter())
                fields["n"] += 1
                fields["mm"] += int(diff.mismatched)
            await self.store.add(NS_SHADOW, shadow)
        if self.prom is not None:
            self.prom.reports.labels(report.source or "unknown").inc()
            if report.dropped:
                self.prom.telemetry_dropped.labels(report.source or "unknown").inc(report.dropped)
        return len(report.requests)

    async def _ingest_samples(self, report: Report, now: int) -> None:
        by_version: dict[tuple[str, int], list[Any]] = defaultdict(list)
        for sample in report.samples:
            by_version[(sample.model, sample.version)].append(sample)
        if report.source == "gateway":
            self._gateway_sampled.update(by_version)
        elif report.source == "inference":
            for key in self._gateway_sampled.intersection(by_version):
                del by_version[key]
        increments: dict[tuple[str, int], Counter[str]] = {}
        for key, samples in by_version.items():
            entry = self.baselines.get(key)
            if entry is None:
                continue
            baseline, revision = entry
            if baseline.learning:
                await self._learn(baseline, revision, samples)
                continue
            fields = drift_math.live_increments(baseline, samples)
            if fields:
                increments[(f"{key[0]}|{key[1]}", bucket_of(now, self.store.bucket_s))] = fields
        await self.store.add(NS_DRIFT, increments)

    async def _learn(self, baseline: Baseline, revision: int, samples: list[Any]) -> None:
        key = (baseline.model, baseline.version)
        learner = self._learners.get(key)
        if learner is None:
            learner = self._learners[key] = drift_math.BaselineLearner(
                baseline.learn_from_requests, self.settings.drift_bins)
        for sample in samples:
            learner.add(sample)
        if not learner.done:
            return
        learned = Baseline(model=baseline.model, version=baseline.version, histograms=learner.histograms(),
                           learn_from_requests=baseline.learn_from_requests, learned_rows=learner.learned_rows)
        del self._learners[key]
        try:
            new_revision = await self.control.put_baseline(learned, revision, "monitor")
        except Aborted:
            # Another replica finished first (or someone set a baseline): read theirs.
            current = await self.control.get_baseline(*key)
            if current is not None:
                self.baselines[key] = current
            return
        self.baselines[key] = (learned, new_revision)
        log.info("learned a baseline for %s/%d from %d rows", key[0], key[1], learned.learned_rows)

    # ---- queries --------------------------------------------------------------------------

    def _range(self, window_s: float, since_ns: int = 0) -> tuple[int, int]:
        bucket_s = self.store.bucket_s
        now_b = bucket_of(self.clock(), bucket_s)
        first = now_b - max(1, math.ceil(window_s / bucket_s)) + 1
        if since_ns:
            first = max(first, bucket_of(since_ns, bucket_s))
        return first, now_b

    async def query(self, flt: MetricsFilter, since_ns: int = 0) -> list[SeriesMetrics]:
        window_s = flt.window_s or self.settings.default_window_s
        if window_s < 0 or window_s > self.settings.retention_s:
            raise InvalidArgument(f"window must be 0..{self.settings.retention_s:g} seconds, got {window_s:g}")
        first, last = self._range(window_s, since_ns)
        names = [n for n in await self.store.series(NS_REQUESTS, first) if flt.matches(SeriesKey.decode(n))]
        sums = await self.store.read(NS_REQUESTS, names, first, last)
        now = self.clock()
        bucket_ns = int(self.store.bucket_s * _NS)

        def span(first_bucket: int) -> float:
            if first_bucket < 0:
                return window_s
            return min(window_s, max(self.store.bucket_s, (now - first_bucket * bucket_ns) / _NS))

        if flt.merge:
            total: Counter[str] = Counter()
            earliest = -1
            for fields, first_bucket in sums.values():
                total.update(fields)
                if first_bucket >= 0:
                    earliest = first_bucket if earliest < 0 else min(earliest, first_bucket)
            key = SeriesKey(model=flt.model, version=flt.version, alias=flt.alias, source=flt.source)
            out = [summarize(key, total, window_s, span(earliest))]
        else:
            out = [summarize(SeriesKey.decode(n), fields, window_s, span(fb))
                   for n, (fields, fb) in sums.items() if fields.get("n")]
            out.sort(key=lambda m: m.key)
        await self._add_load_figures(out)
        return out

    async def _add_load_figures(self, series: list[SeriesMetrics]) -> None:
        wanted = sorted({f"load:{m.key.model}|{m.key.version}" for m in series if m.key.model and m.key.version})
        if not wanted:
            return
        meta = await self.store.get_meta(wanted)
        for m in series:
            fields = meta.get(f"load:{m.key.model}|{m.key.version}", {})
            loaded, first = fields.get("loaded_ns", 0), fields.get("first_ns", 0)
            if loaded and first >= loaded:
                m.first_response_ms = (first - loaded) / 1e6
            m.load_ms = fields.get("load_us", 0) / 1000.0

    # ---- SLOs -----------------------------------------------------------------------------

    async def set_slo(self, slo: SLO, actor: str) -> SLO:
        if not slo.model:
            raise InvalidArgument("an SLO needs a model")
        if slo.p99_latency_ms is None and slo.max_error_rate is None:
            raise InvalidArgument("an SLO needs p99_latency_ms, max_error_rate or both")
        if slo.p99_latency_ms is not None and slo.p99_latency_ms <= 0:
            raise InvalidArgument("p99_latency_ms must be > 0")
        if slo.max_error_rate is not None and not 0 <= slo.max_error_rate <= 1:
            raise InvalidArgument("max_error_rate must be between 0 and 1")
        if slo.window_s < 0 or slo.window_s > self.settings.retention_s:
            raise InvalidArgument(f"window_seconds must be 0..{self.settings.retention_s:g}")
        if slo.min_requests < 0:
            raise InvalidArgument("min_requests must be >= 0")
        if slo.source not in ("", "gateway", "inference"):
            raise InvalidArgument("source must be empty, 'gateway' or 'inference'")
        stored = await self.control.put_slo(slo, actor)
        self.slos[stored.model] = stored
        return stored

    async def list_slos(self, model: str = "") -> list[SLO]:
        return [self.slos[m] for m in sorted(self.slos) if not model or m == model]

    async def delete_slo(self, model: str, actor: str) -> None:
        await self.control.delete_slo(model, actor)
        self.slos.pop(model, None)
        for kind in ("latency", "error_rate"):
            self.alerts.resolve(f"slo:{model}:{kind}", summary=f"SLO of {model} deleted")

    async def _evaluate_slo(self, slo: SLO) -> None:
        window = slo.window_s or self.settings.slo_window_s
        source = slo.source
        if not source:
            names = await self.store.series(NS_REQUESTS, self._range(window)[0])
            has_gateway = any(n.startswith(f"gateway|{slo.model}|") for n in names)
            source = "gateway" if has_gateway else "inference"
        (m,) = await self.query(MetricsFilter(model=slo.model, source=source, window_s=window, merge=True))
        if m.count < (slo.min_requests or self.settings.slo_min_requests):
            return
        if slo.p99_latency_ms is not None:
            breached = m.latency.p99_ms > slo.p99_latency_ms
            self.alerts.set_condition(Alert(
                id=f"slo:{slo.model}:latency", kind=AlertKind.SLO_LATENCY, state=_firing(breached), model=slo.model,
                summary=(f"{slo.model}: p99 latency {m.latency.p99_ms:.1f} ms "
                         f"{'above' if breached else 'within'} the SLO of {slo.p99_latency_ms:g} ms "
                         f"over {window:g}s ({m.count} requests)"),
                value=m.latency.p99_ms, threshold=slo.p99_latency_ms,
                details=(("source", source), ("window_seconds", f"{window:g}")),
            ), breached)
        if slo.max_error_rate is not None:
            breached = m.error_rate > slo.max_error_rate
            self.alerts.set_condition(Alert(
                id=f"slo:{slo.model}:error_rate", kind=AlertKind.SLO_ERROR_RATE, state=_firing(breached),
                model=slo.model,
                summary=(f"{slo.model}: error rate {m.error_rate:.2%} "
                         f"{'above' if breached else 'within'} the SLO of {slo.max_error_rate:.2%} "
                         f"over {window:g}s ({m.count} requests)"),
                value=m.error_rate, threshold=slo.max_error_rate,
                details=(("source", source), ("window_seconds", f"{window:g}")),
            ), breached)

    # ---- drift ----------------------------------------------------------------------------

    async def set_baseline(self, model: str, version: int, *, histograms: list[FeatureHistogram] | None = None,
                           sample: dict[str, list[float]] | None = None, learn_from_requests: int = 0,
                           bins: int = 0, actor: str = "") -> Baseline:
        if not model or version <= 0:
            raise InvalidArgument("a baseline needs a model and a version >= 1")
        bins = bins or self.settings.drift_bins
        if histograms:
            for hist in histograms:
                drift_math.validate_histogram(hist)
            baseline = Baseline(model=model, version=version, histograms=tuple(histograms))
        elif sample:
            import numpy as np

            baseline = Baseline(model=model, version=version, histograms=tuple(
                drift_math.build_histogram(f, np.asarray(v, dtype=np.float64), bins) for f, v in sorted(sample.items())))
        elif learn_from_requests > 0:
            baseline = Baseline(model=model, version=version, learn_from_requests=learn_from_requests)
        else:
            raise InvalidArgument("give histograms, a sample, or learn_from_requests > 0")
        revision = await self.control.put_baseline(baseline, -1, actor)
        self.baselines[(model, version)] = (baseline, revision)
        self._learners.pop((model, version), None)
        return baseline

    async def get_baseline(self, model: str, version: int) -> Baseline:
        entry = self.baselines.get((model, version)) or await self.control.get_baseline(model, version)
        if entry is None:
            raise NotFound(f"no baseline for {model}/{version}")
        baseline, _ = entry
        learner = self._learners.get((model, version))
        if baseline.learning and learner is not None:
            return Baseline(model=model, version=version, learn_from_requests=baseline.learn_from_requests,
                            learned_rows=learner.learned_rows)
        return baseline

    async def drift(self, model: str, version: int, window_s: float = 0.0) -> list[FeatureDrift]:
        baseline = await self.get_baseline(model, version)
        window = window_s or self.settings.drift_window_s
        first, last = self._range(window)
        sums = await self.store.read(NS_DRIFT, [f"{model}|{version}"], first, last)
        fields, _ = sums.get(f"{model}|{version}", (Counter(), -1))
        return drift_math.drift_report(baseline, fields, self.settings.drift_threshold,
                                       self.settings.drift_min_samples)

    async def _evaluate_drift(self, baseline: Baseline) -> None:
        report = await self.drift(baseline.model, baseline.version)
        threshold = self.settings.drift_threshold
        for feature in report:
            if self.prom is not None:
                self.prom.drift_psi.labels(baseline.model, str(baseline.version), feature.feature).set(feature.psi)
            if feature.samples < self.settings.drift_min_samples:
                continue
            self.alerts.set_condition(Alert(
                id=f"drift:{baseline.model}:{baseline.version}:{feature.feature}", kind=AlertKind.DRIFT,
                state=_firing(feature.drifted), model=baseline.model, version=baseline.version,
                summary=(f"{baseline.model}/{baseline.version}: input {feature.feature} PSI {feature.psi:.3f} "
                         f"{'past' if feature.drifted else 'within'} {threshold:g} ({feature.samples} values)"),
                value=feature.psi, threshold=threshold, details=(("feature", feature.feature),),
            ), feature.drifted)

    # ---- shadows ----------------------------------------------------------------------------

    async def _evaluate_shadows(self) -> None:
        first, last = self._range(self.settings.shadow_window_s)
        names = await self.store.series(NS_SHADOW, first)
        for name, (fields, _) in (await self.store.read(NS_SHADOW, names, first, last)).items():
            n = fields.get("n", 0)
            if n < self.settings.shadow_min_samples:
                continue
            model, version = name.rsplit("|", 1)
            rate = fields.get("mm", 0) / n
            bad = rate > self.settings.shadow_mismatch_rate
            self.alerts.set_condition(Alert(
                id=f"shadow:{model}:{version}", kind=AlertKind.SHADOW_MISMATCH, state=_firing(bad), model=model,
                version=int(version), value=rate, threshold=self.settings.shadow_mismatch_rate,
                summary=f"{model}/{version}: shadow outputs differ from live in {rate:.1%} of {n} comparisons",
            ), bad)

    # ---- canary ---------------------------------------------------------------------------

    def canary_status(self, model: str) -> CanaryStatus:
        status = self.canaries.get(model)
        if status is None:
            raise NotFound(f"model {model!r} has no canary under analysis")
        return status

    async def _evaluate_canary(self, route: RouteView) -> None:
        s = self.settings
        weights = {split.alias: split.weight for split in route.splits if split.alias}
        alert_id = f"canary:{route.model}"
        if weights.get(s.canary_alias, 0) <= 0 or weights.get(s.production_alias, 0) <= 0:
            self._canary_since.pop(route.model, None)
            return
        # The canary takes traffic (again): a past rollback alert is over.
        self.alerts.resolve(alert_id, summary=f"{route.model}: canary takes traffic again")
        now = self.clock()
        since = self._canary_since.setdefault(route.model, now)
        window = MetricsFilter(model=route.model, source="gateway", window_s=s.canary_window_s, merge=True)
        (prod,) = await self.query(_with_alias(window, s.production_alias), since_ns=since)
        per_version = await self.query(_with_alias(window, s.canary_alias, merge=False), since_ns=since)
        (canary,) = await self.query(_with_alias(window, s.canary_alias), since_ns=since)
        decision = judge(prod, canary, self.policy)
        canary_version = max(per_version, key=lambda m: m.count).key.version if per_version else 0
        status = CanaryStatus(model=route.model, verdict=decision.verdict, production=prod, canary=canary,
                              error_p_value=decision.error_p_value, p99_ratio=decision.p99_ratio,
                              reason=decision.reason, time_ns=now)
        self.canaries[route.model] = status
        if not decision.regressed:
            return
        rolled_back = False
        if s.canary_rollback:
            rolled_back = await self._roll_back(route, canary_version, decision.verdict, decision.reason, status)
            if not rolled_back:
                return
        status.rolled_back = rolled_back
        action = "set the canary's weight to 0" if rolled_back else "rollback disabled: route left as is"
        self.alerts.fire(Alert(
            id=alert_id, kind=AlertKind.CANARY_ROLLBACK, state=_firing(True), model=route.model,
            version=canary_version, alias=s.canary_alias, summary=f"{route.model}: {decision.reason}; {action}",
            value=canary.error_rate if decision.verdict is CanaryVerdict.ERROR_REGRESSION else decision.p99_ratio,
            threshold=(self.policy.min_error_increase if decision.verdict is CanaryVerdict.ERROR_REGRESSION
                       else self.policy.max_p99_ratio),
            details=(("verdict", decision.verdict.value), ("rolled_back", str(rolled_back).lower())),
        ))

    async def _roll_back(self, route: RouteView, canary_version: int, verdict: CanaryVerdict, reason: str,
                         status: CanaryStatus) -> bool:
        s = self.settings
        current = route
        for _ in range(3):
            try:
                self.routes[route.model] = await self.control.set_split_weight(
                    route.model, s.canary_alias, 0, current.revision, "monitor")
                break
            except Aborted:
                fresh = {r.model: r for r in await self.control.list_routes()}.get(route.model)
                if fresh is None or not any(sp.alias == s.canary_alias and sp.weight > 0 for sp in fresh.splits):
                    return False  # someone (another replica, an operator) already took it out
                current = fresh
            except AiaasError:
                log.exception("canary rollback of %s failed", route.model)
                return False
        else:
            return False
        prod, canary = status.production, status.canary
        details: dict[str, Any] = {
            "reason": reason, "verdict": verdict.value, "alias": s.canary_alias,
            "canary_requests": canary.count if canary else 0,
            "canary_error_rate": canary.error_rate if canary else 0.0,
            "canary_p99_ms": canary.latency.p99_ms if canary else 0.0,
            "production_requests": prod.count if prod else 0,
            "production_error_rate": prod.error_rate if prod else 0.0,
            "production_p99_ms": prod.latency.p99_ms if prod else 0.0,
            "error_p_value": status.error_p_value, "p99_ratio": status.p99_ratio,
        }
        try:
            await self.control.append_audit("canary.rollback", route.model, canary_version, details, "monitor")
        except AiaasError:
            log.exception("could not record the rollback of %s in the audit log", route.model)
        if self.prom is not None:
            self.prom.canary_rollbacks.labels(route.model).inc()
        self._canary_since.pop(route.model, None)
        log.warning("rolled back the canary of %s (version %d): %s", route.model, canary_version, reason)
        return True

    # ---- loop -----------------------------------------------------------------------------

    async def refresh_control(self) -> None:
        slos = await self.control.list_slos()
        baselines = await self.control.list_baselines()
        routes = await self.control.list_routes()
        self.slos = {slo.model: slo for slo in slos}
        for model in [m for m in list(self.canaries) if m not in {r.model for r in routes}]:
            del self.canaries[model]
        self.baselines = {(b.model, b.version): (b, rev) for b, rev in baselines}
        self.routes = {r.model: r for r in routes}
        self._last_refresh = time.monotonic()

    async def evaluate(self) -> None:
        """One pass: refresh control-plane state when due, then every check; one failure spares the rest."""
        if time.monotonic() - self._last_refresh >= self.settings.control_refresh_s:
            try:
                await self.refresh_control()
            except Exception:  # keep judging with the state we have
                log.warning("could not refresh SLOs, baselines and routes", exc_info=True)
        checks: list[tuple[str, Any]] = [(f"SLO of {m}", self._evaluate_slo(slo)) for m, slo in self.slos.items()]
        checks += [(f"drift of {b.model}/{b.version}", self._evaluate_drift(b))
                   for b, _ in self.baselines.values() if b.histograms]
        checks += [(f"canary of {r.model}", self._evaluate_canary(r)) for r in list(self.routes.values())]
        checks.append(("shadows", self._evaluate_shadows()))
        if self.prom is not None:
            checks.append(("prometheus gauges", self._export_windows()))
        for what, check in checks:
            try:
                await check
            except Exception:  # one broken check must not stop the others
                log.exception("evaluating %s failed", what)
        if self.prom is not None:
            firing = Counter(a.kind.value for a in self.alerts.active.values())
            for kind in AlertKind:
                self.prom.alerts_firing.labels(kind.value).set(firing.get(kind.value, 0))

    async def _export_windows(self) -> None:
        if self.prom is None:
            return
        for m in await self.query(MetricsFilter()):
            self.prom.window(m)

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


def _firing(flag: bool) -> AlertState:
    return AlertState.FIRING if flag else AlertState.RESOLVED


def _with_alias(flt: MetricsFilter, alias: str, merge: bool = True) -> MetricsFilter:
    return MetricsFilter(model=flt.model, version=flt.version, alias=alias, source=flt.source,
                         window_s=flt.window_s, merge=merge)
