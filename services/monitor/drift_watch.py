"""Input drift over time: baselines, learning them from live rows, live bins and drift alerts.

`DriftWatch` owns the baseline snapshot (written through the control plane, kept current by its
changes),
the learners of baselines still being learned, the drift namespace of the window store and the
`drift:<model>:<version>:<feature>` alerts. The math (histograms, PSI) lives in `drift`.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable

from services.common.errors import Aborted, InvalidArgument, NotFound
from services.monitor import drift as drift_math
from services.monitor.alerts import AlertHub
from services.monitor.control import ControlPlane, VersionKey
from services.monitor.entities import (
    Alert,
    AlertKind,
    AlertState,
    Baseline,
    FeatureDrift,
    FeatureHistogram,
    InputSample,
    Report,
)
from services.monitor.metrics import window_range
from services.monitor.prom import PrometheusExport
from services.monitor.settings import MonitorSettings
from services.monitor.windows import NS_DRIFT, WindowStore, bucket_of

log = logging.getLogger("aiaas.monitor")


class DriftWatch:
    def __init__(self, settings: MonitorSettings, store: WindowStore, control: ControlPlane, alerts: AlertHub,
                 prom: PrometheusExport | None, clock: Callable[[], int]) -> None:
        self.settings = settings
        self.store = store
        self.control = control
        self.alerts = alerts
        self.prom = prom
        self.clock = clock
        self.baselines: dict[VersionKey, tuple[Baseline, int]] = {}
        self._learners: dict[VersionKey, drift_math.BaselineLearner] = {}
        # Versions the gateway sends drift samples for: inference's samples of them are ignored,
        # since the same requests would otherwise be counted twice (once from each).
        self._gateway_sampled: set[VersionKey] = set()

    def replace(self, baselines: list[tuple[Baseline, int]]) -> None:
        """Take the control plane's baselines (with their revisions) as the current set."""
        self.baselines = {(b.model, b.version): (b, rev) for b, rev in baselines}
        for key in [k for k in self._learners if k not in self.baselines]:
            del self._learners[key]

    def changed(self, key: VersionKey, baseline: Baseline | None, revision: int) -> None:
        """One baseline written (or deleted: None) at `revision`; older news than ours is ignored."""
        held = self.baselines.get(key)
        if held is not None and held[1] > revision:
            return
        if baseline is None:
            self.baselines.pop(key, None)
            self._learners.pop(key, None)
        else:
            self.baselines[key] = (baseline, revision)

    def watched(self) -> list[Baseline]:
        """Baselines with histograms, whose drift can be evaluated."""
        return [b for b, _ in self.baselines.values() if b.histograms]

    # ---- ingest ---------------------------------------------------------------------------

    async def ingest(self, report: Report, now: int) -> None:
        by_version: dict[VersionKey, list[InputSample]] = defaultdict(list)
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

    async def _learn(self, baseline: Baseline, revision: int, samples: list[InputSample]) -> None:
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

    # ---- baselines ------------------------------------------------------------------------

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

    # ---- drift ----------------------------------------------------------------------------

    async def drift(self, model: str, version: int, window_s: float = 0.0) -> list[FeatureDrift]:
        baseline = await self.get_baseline(model, version)
        window = window_s or self.settings.drift_window_s
        first, last = window_range(self.clock(), self.store.bucket_s, window)
        sums = await self.store.read(NS_DRIFT, [f"{model}|{version}"], first, last)
        fields, _ = sums.get(f"{model}|{version}", (Counter(), -1))
        return drift_math.drift_report(baseline, fields, self.settings.drift_threshold,
                                       self.settings.drift_min_samples)

    async def evaluate(self, baseline: Baseline) -> None:
        report = await self.drift(baseline.model, baseline.version)
        threshold = self.settings.drift_threshold
        for feature in report:
            if self.prom is not None:
                self.prom.drift_psi.labels(baseline.model, str(baseline.version), feature.feature).set(feature.psi)
            if feature.samples < self.settings.drift_min_samples:
                continue
            self.alerts.set_condition(Alert(
                id=f"drift:{baseline.model}:{baseline.version}:{feature.feature}", kind=AlertKind.DRIFT,
                state=AlertState.FIRING if feature.drifted else AlertState.RESOLVED,
                model=baseline.model, version=baseline.version,
                summary=(f"{baseline.model}/{baseline.version}: input {feature.feature} PSI {feature.psi:.3f} "
                         f"{'past' if feature.drifted else 'within'} {threshold:g} ({feature.samples} values)"),
                value=feature.psi, threshold=threshold, details=(("feature", feature.feature),),
            ), feature.drifted)
