"""The monitor's parts on their own: shadow comparisons, canary rollback retries, SLO checks, windows."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument, NotFound
from services.monitor.alerts import AlertHub
from services.monitor.canary_watch import CanaryWatch
from services.monitor.control import MemoryControlPlane
from services.monitor.entities import (
    SLO,
    AlertKind,
    AlertState,
    CanaryVerdict,
    Report,
    Request,
    ShadowDiff,
)
from services.monitor.metrics import RequestWindows, window_range
from services.monitor.settings import MonitorSettings
from services.monitor.shadows import ShadowWatch
from services.monitor.slos import check_slo
from services.monitor.windows import MemoryWindowStore

T0 = 1_800_000_000 * 10**9


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1e9)


def _diffs(n: int, mismatched: int, clock: Clock, shadow_version: int = 2) -> list[ShadowDiff]:
    return [ShadowDiff(model="m", live_version=1, shadow_version=shadow_version, max_abs_diff=0.5 if i < mismatched
                       else 0.0, mismatched=i < mismatched, time_ns=clock.now) for i in range(n)]


async def test_shadow_mismatch_fires_past_the_rate_and_resolves_when_it_falls() -> None:
    clock = Clock()
    settings = MonitorSettings(registry_url=None, shadow_window_s=10, shadow_min_samples=20,
                               shadow_mismatch_rate=0.05)
    alerts = AlertHub()
    watch = ShadowWatch(settings, MemoryWindowStore(), alerts, clock)
    await watch.ingest(_diffs(19, 19, clock), clock.now)
    await watch.evaluate()
    assert not alerts.active  # under shadow_min_samples: no judgement yet
    await watch.ingest(_diffs(21, 0, clock) + _diffs(30, 30, clock, shadow_version=3), clock.now)
    await watch.evaluate()
    assert sorted(alerts.active) == ["shadow:m:2", "shadow:m:3"]
    (alert,) = [a for a in alerts.active.values() if a.version == 2]
    assert alert.kind is AlertKind.SHADOW_MISMATCH and alert.value == pytest.approx(19 / 40)
    clock.advance(11)  # the bad comparisons leave the window
    await watch.ingest(_diffs(40, 1, clock) + _diffs(40, 1, clock, shadow_version=3), clock.now)
    await watch.evaluate()
    assert not alerts.active
    resolved = [a for a in alerts.history if a.state is AlertState.RESOLVED]
    assert sorted(a.id for a in resolved) == ["shadow:m:2", "shadow:m:3"]
    assert all(a.value == pytest.approx(1 / 40) for a in resolved)


def _req(clock: Clock, alias: str, status: str = "OK", version: int = 1) -> Request:
    return Request(source="gateway", model="m", version=version, alias=alias, status=status, latency_us=1000,
                   time_ns=clock.now)


async def test_canary_rollback_retries_when_the_route_changed_but_still_sends_canary_traffic() -> None:
    clock = Clock()
    settings = MonitorSettings(registry_url=None, canary_min_requests=30)
    control, alerts, store = MemoryControlPlane(), AlertHub(), MemoryWindowStore()
    windows = RequestWindows(settings, store, None, clock)
    watch = CanaryWatch(settings, control, alerts, windows, None, clock)
    control.put_route("m", [("production", 50), ("canary", 50)])
    watch.replace(list(control.routes.values()))
    stale = watch.routes["m"]
    await watch.evaluate(stale)  # watching starts now
    # An operator rewrites the route (new revision) and the canary still takes traffic.
    fresh = control.put_route("m", [("production", 60), ("canary", 40)])
    assert fresh.revision != stale.revision
    await windows.ingest(Report("gateway", [_req(clock, "production")] * 100
                                + [_req(clock, "canary", "INTERNAL", 2)] * 40), clock.now)
    await watch.evaluate(stale)
    status = watch.status("m")
    assert status.verdict is CanaryVerdict.ERROR_REGRESSION and status.rolled_back
    assert [(s.alias, s.weight) for s in control.routes["m"].splits] == [("production", 60), ("canary", 0)]
    assert watch.routes["m"] == control.routes["m"]
    (event,) = control.audit
    assert event["version"] == 2 and event["details"]["canary_requests"] == 40
    # The route is gone from the control plane: its canary is no longer under analysis.
    watch.replace([])
    with pytest.raises(NotFound):
        watch.status("m")


def test_slo_checks_window_and_min_requests() -> None:
    check_slo(SLO(model="m", p99_latency_ms=10, window_s=3600), retention_s=3600)
    with pytest.raises(InvalidArgument, match="window_seconds"):
        check_slo(SLO(model="m", p99_latency_ms=10, window_s=3601), retention_s=3600)
    with pytest.raises(InvalidArgument, match="min_requests"):
        check_slo(SLO(model="m", max_error_rate=0.1, min_requests=-1), retention_s=3600)


def test_window_range_covers_whole_buckets_and_starts_no_earlier_than_since() -> None:
    now = T0 + 500_000_000  # half-way through a 1 s bucket
    last = T0 // 10**9
    assert window_range(now, 1.0, 10) == (last - 9, last)
    assert window_range(now, 1.0, 0.2) == (last, last)  # at least one bucket
    assert window_range(now, 1.0, 10, since_ns=T0 - 3 * 10**9) == (last - 3, last)
    assert window_range(now, 5.0, 12) == (T0 // (5 * 10**9) - 2, T0 // (5 * 10**9))
