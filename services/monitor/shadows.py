"""Shadow comparisons: count how often a shadow version's outputs differ from live, alert past a rate.

`ShadowWatch` owns the shadow namespace of the window store and the `shadow:<model>:<version>`
alerts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from services.monitor.alerts import AlertHub
from services.monitor.entities import Alert, AlertKind, AlertState, ShadowDiff
from services.monitor.metrics import window_range
from services.monitor.settings import MonitorSettings
from services.monitor.windows import WindowStore, bucket_of

NS_SHADOW = "shadow"


class ShadowWatch:
    def __init__(self, settings: MonitorSettings, store: WindowStore, alerts: AlertHub,
                 clock: Callable[[], int]) -> None:
        self.settings = settings
        self.store = store
        self.alerts = alerts
        self.clock = clock

    async def ingest(self, diffs: list[ShadowDiff], now: int) -> None:
        bucket_s = self.store.bucket_s
        shadow: dict[tuple[str, int], Counter[str]] = {}
        for diff in diffs:
            fields = shadow.setdefault(
                (f"{diff.model}|{diff.shadow_version}", bucket_of(diff.time_ns or now, bucket_s)), Counter())
            fields["n"] += 1
            fields["mm"] += int(diff.mismatched)
        await self.store.add(NS_SHADOW, shadow)

    async def evaluate(self) -> None:
        first, last = window_range(self.clock(), self.store.bucket_s, self.settings.shadow_window_s)
        names = await self.store.series(NS_SHADOW, first)
        for name, (fields, _) in (await self.store.read(NS_SHADOW, names, first, last)).items():
            n = fields.get("n", 0)
            if n < self.settings.shadow_min_samples:
                continue
            model, version = name.rsplit("|", 1)
            rate = fields.get("mm", 0) / n
            bad = rate > self.settings.shadow_mismatch_rate
            self.alerts.set_condition(Alert(
                id=f"shadow:{model}:{version}", kind=AlertKind.SHADOW_MISMATCH,
                state=AlertState.FIRING if bad else AlertState.RESOLVED, model=model,
                version=int(version), value=rate, threshold=self.settings.shadow_mismatch_rate,
                summary=f"{model}/{version}: shadow outputs differ from live in {rate:.1%} of {n} comparisons",
            ), bad)
