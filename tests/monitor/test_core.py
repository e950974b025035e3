"""MonitorCore with the in-memory window store and control plane, on a controlled clock."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from services.common.errors import InvalidArgument, NotFound
from services.monitor.control import ControlState, MemoryControlPlane
from services.monitor.core import MonitorCore
from services.monitor.entities import (
    SLO,
    AlertKind,
    AlertState,
    Baseline,
    CanaryVerdict,
    Generation,
    InputSample,
    MetricsFilter,
    ModelLoad,
    Report,
    Request,
    RouteView,
)
from services.monitor.prom import PrometheusExport
from services.monitor.settings import MonitorSettings
from services.monitor.windows import MemoryWindowStore

T0 = 1_800_000_000 * 10**9


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1e9)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def control() -> MemoryControlPlane:
    return MemoryControlPlane()


@pytest.fixture
def core(clock: Clock, control: MemoryControlPlane) -> MonitorCore:
    settings = MonitorSettings(registry_url=None, canary_min_requests=30, drift_min_samples=100)
    prom = PrometheusExport(CollectorRegistry())
    core = MonitorCore(settings, MemoryWindowStore(), control, prom=prom, clock=clock)
    core.follow_control()
    return core


def _req(clock: Clock, latency_us: int = 1000, status: str = "OK", alias: str = "production", version: int = 1,
         source: str = "gateway", model: str = "m") -> Request:
    return Request(source=source, model=model, version=version, alias=alias, status=status,
                   latency_us=latency_us, time_ns=clock.now)


async def test_query_counts_and_windows(core: MonitorCore, clock: Clock) -> None:
    await core.ingest(Report("gateway", [_req(clock, 1000 + i) for i in range(100)]))
    await core.ingest(Report("inference", [_req(clock, 500, source="inference", alias="")] * 40))
    clock.advance(30)
    await core.ingest(Report("gateway", [_req(clock, 2000, status="INTERNAL", version=2, alias="canary")] * 10))
    series = await core.query(MetricsFilter(model="m"))
    assert [(s.key.source, s.key.version, s.key.alias, s.count) for s in series] == [
        ("inference", 1, "", 40), ("gateway", 1, "production", 100), ("gateway", 2, "canary", 10)]
    merged, = await core.query(MetricsFilter(model="m", source="gateway", merge=True))
    assert merged.count == 110 and merged.errors == 10
    assert merged.rate_per_s == pytest.approx(110 / 31, rel=0.05)
    recent, = await core.query(MetricsFilter(model="m", source="gateway", window_s=10, merge=True))
    assert recent.count == 10 and recent.error_rate == 1.0
    assert await core.query(MetricsFilter(model="other")) == []
    with pytest.raises(InvalidArgument):
        await core.query(MetricsFilter(window_s=10**9))


async def test_time_to_first_response_after_load(core: MonitorCore, clock: Clock) -> None:
    load_at = clock.now
    await core.ingest(Report("inference", [], loads=[ModelLoad("m", 1, load_us=250_000, time_ns=load_at)]))
    clock.advance(0.5)
    await core.ingest(Report("inference", [_req(clock, source="inference")]))
    clock.advance(0.5)
    await core.ingest(Report("inference", [_req(clock, source="inference")]))
    (s,) = await core.query(MetricsFilter(model="m"))
    assert s.first_response_ms == pytest.approx(500.0) and s.load_ms == pytest.approx(250.0)


async def test_slo_breach_fires_and_recovery_resolves(core: MonitorCore, clock: Clock) -> None:
    sub = core.alerts.subscribe(model="m")
    await core.set_slo(SLO(model="m", p99_latency_ms=50, max_error_rate=0.1, window_s=5, min_requests=10), "me")
    await core.ingest(Report("gateway", [_req(clock, 10_000)] * 50))
    await core.evaluate()
    assert not core.alerts.active
    await core.ingest(Report("gateway", [_req(clock, 200_000)] * 50))
    await core.evaluate()
    alert, _ = await asyncio.wait_for(sub.next(), 1)
    assert (alert.kind, alert.state) == (AlertKind.SLO_LATENCY, AlertState.FIRING)
    assert alert.value == pytest.approx(200, rel=0.03) and alert.threshold == 50
    await core.evaluate()  # still breached: no second alert
    clock.advance(6)
    await core.ingest(Report("gateway", [_req(clock, 10_000)] * 50))
    await core.evaluate()
    alert, _ = await asyncio.wait_for(sub.next(), 1)
    assert (alert.kind, alert.state) == (AlertKind.SLO_LATENCY, AlertState.RESOLVED)
    assert not core.alerts.active


async def test_slo_validation_and_persistence(core: MonitorCore, control: MemoryControlPlane) -> None:
    for bad in (SLO(model="m"), SLO(model="", p99_latency_ms=1), SLO(model="m", max_error_rate=2),
                SLO(model="m", p99_latency_ms=-1), SLO(model="m", p99_latency_ms=1, source="x")):
        with pytest.raises(InvalidArgument):
            await core.set_slo(bad, "me")
    await core.set_slo(SLO(model="m", max_error_rate=0.01), "me")
    assert list(control.slos) == ["m"]
    core.slos.clear()
    core.follow_control()  # a fresh start reads the SLO back from the control plane
    assert [s.model for s in await core.list_slos()] == ["m"]
    await core.delete_slo("m", "me")
    with pytest.raises(NotFound):
        await core.delete_slo("m", "me")


def _sample(values: np.ndarray, version: int = 1) -> InputSample:
    block = np.ascontiguousarray(values.reshape(values.shape[0], -1), dtype="<f4")
    return InputSample(model="m", version=version, input="x", rows=block.shape[0], cols=block.shape[1],
                       values=block.tobytes())


async def test_drift_alert_for_shifted_inputs_only(core: MonitorCore) -> None:
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(2000, 2))
    await core.set_baseline("m", 1, sample={"x[0]": reference[:, 0].tolist(), "x[1]": reference[:, 1].tolist()})
    for _ in range(10):
        await core.ingest(Report("gateway", [], samples=[_sample(rng.normal(size=(32, 2)))]))
    await core.evaluate()
    assert not core.alerts.active
    report = await core.drift("m", 1)
    assert all(f.samples == 320 and f.psi < 0.1 for f in report)
    for _ in range(40):
        shifted = rng.normal(size=(32, 2))
        shifted[:, 1] += 1.5
        await core.ingest(Report("gateway", [], samples=[_sample(shifted)]))
    await core.evaluate()
    (alert,) = core.alerts.active.values()
    assert alert.kind is AlertKind.DRIFT and dict(alert.details)["feature"] == "x[1]" and alert.value > 0.2


async def test_inference_samples_are_not_counted_twice_once_the_gateway_samples(core: MonitorCore) -> None:
    rng = np.random.default_rng(5)
    reference = rng.normal(size=(2000, 1))
    await core.set_baseline("m", 1, sample={"x": reference[:, 0].tolist()})
    await core.ingest(Report("inference", [], samples=[_sample(rng.normal(size=(32, 1)))]))
    assert [f.samples for f in await core.drift("m", 1)] == [32]  # inference alone (no gateway): counted
    await core.ingest(Report("gateway", [], samples=[_sample(rng.normal(size=(32, 1)))]))
    await core.ingest(Report("inference", [], samples=[_sample(rng.normal(size=(32, 1)))]))
    assert [f.samples for f in await core.drift("m", 1)] == [64]  # the gateway's samples only from then on


async def test_baseline_learned_from_first_rows(core: MonitorCore, control: MemoryControlPlane) -> None:
    await core.set_baseline("m", 2, learn_from_requests=200)
    rng = np.random.default_rng(4)
    for _ in range(6):
        await core.ingest(Report("gateway", [], samples=[_sample(rng.normal(size=(32, 1)), version=2)]))
    assert (await core.get_baseline("m", 2)).learned_rows == 192
    await core.ingest(Report("gateway", [], samples=[_sample(rng.normal(size=(32, 1)), version=2)]))
    baseline, _ = control.baselines[("m", 2)]
    assert [h.feature for h in baseline.histograms] == ["x"] and baseline.histograms[0].count == 200
    with pytest.raises(NotFound):
        await core.get_baseline("m", 9)


async def test_broken_canary_is_rolled_back_once(core: MonitorCore, clock: Clock,
                                                 control: MemoryControlPlane) -> None:
    control.put_route("m", [("production", 50), ("canary", 50)])
    await core.evaluate()  # the canary starts being watched now
    await core.ingest(Report("gateway", [_req(clock)] * 100))
    await core.ingest(Report("gateway", [_req(clock, status="INTERNAL", alias="canary", version=2)] * 20
                             + [_req(clock, alias="canary", version=2)] * 20))
    await core.evaluate()
    status = core.canary_status("m")
    assert status.verdict is CanaryVerdict.ERROR_REGRESSION and status.rolled_back
    assert [(s.alias, s.weight) for s in control.routes["m"].splits] == [("production", 50), ("canary", 0)]
    (event,) = control.audit
    assert event["action"] == "canary.rollback" and event["version"] == 2 and "error rate" in event["details"]["reason"]
    (alert,) = core.alerts.active.values()
    assert alert.kind is AlertKind.CANARY_ROLLBACK and alert.version == 2
    await core.evaluate()
    assert len(control.audit) == 1


async def test_slow_canary_rolled_back_and_healthy_one_kept(core: MonitorCore, clock: Clock,
                                                           control: MemoryControlPlane) -> None:
    control.put_route("m", [("production", 90), ("canary", 10)])
    control.put_route("ok", [("production", 90), ("canary", 10)])
    await core.evaluate()
    await core.ingest(Report("gateway", [_req(clock, 5_000)] * 100 + [_req(clock, 60_000, alias="canary")] * 40
                             + [_req(clock, 5_000, model="ok")] * 100
                             + [_req(clock, 6_000, model="ok", alias="canary")] * 40))
    await core.evaluate()
    assert core.canary_status("m").verdict is CanaryVerdict.LATENCY_REGRESSION
    assert control.routes["m"].splits[1].weight == 0
    assert core.canary_status("ok").verdict is CanaryVerdict.HEALTHY
    assert control.routes["ok"].splits[1].weight == 10


async def test_rollback_loses_race_gracefully(core: MonitorCore, clock: Clock, control: MemoryControlPlane) -> None:
    control.put_route("m", [("production", 50), ("canary", 50)])
    await core.evaluate()
    # Another replica already zeroed it, and the change has not reached this one yet: its cached
    # revision is stale.
    stale = core.routes["m"]
    control.listener = None
    await control.set_split_weight("m", "canary", 0, stale.revision, "other")
    await core.ingest(Report("gateway", [_req(clock)] * 100 + [_req(clock, status="INTERNAL", alias="canary")] * 40))
    await core.evaluate()
    assert control.audit == [] and not core.alerts.active


async def test_canary_disabled_rollback_only_alerts(clock: Clock, control: MemoryControlPlane) -> None:
    settings = dataclasses.replace(MonitorSettings(registry_url=None, canary_min_requests=30), canary_rollback=False)
    core = MonitorCore(settings, MemoryWindowStore(), control, clock=clock)
    control.put_route("m", [("production", 50), ("canary", 50)])
    core.follow_control()
    await core.evaluate()
    await core.ingest(Report("gateway", [_req(clock)] * 100 + [_req(clock, status="INTERNAL", alias="canary")] * 40))
    await core.evaluate()
    assert control.routes["m"].splits[1].weight == 50
    (alert,) = core.alerts.active.values()
    assert dict(alert.details)["rolled_back"] == "false"


async def test_control_plane_changes_reach_the_parts_and_stale_news_is_ignored(
        core: MonitorCore, clock: Clock, control: MemoryControlPlane) -> None:
    # A breached SLO deleted elsewhere (the feed says so): its alert resolves here too.
    await core.set_slo(SLO(model="m", p99_latency_ms=50, window_s=5, min_requests=10), "me")
    await core.ingest(Report("gateway", [_req(clock, 200_000)] * 50))
    await core.evaluate()
    assert list(core.alerts.active) == ["slo:m:latency"]
    core.slo_changed("m", None)
    assert core.slos == {} and not core.alerts.active

    # Older news than the core holds (say, its own rollback's write came first) changes nothing.
    route = control.put_route("r", [("production", 50), ("canary", 50)])
    newer = RouteView(model="r", splits=route.splits[:1], revision=route.revision + 5)
    core.route_changed("r", newer, newer.revision)
    core.route_changed("r", route, route.revision)
    core.route_changed("r", None, route.revision)
    assert core.routes["r"] == newer
    core.route_changed("r", None, newer.revision + 1)
    assert "r" not in core.routes

    learned = Baseline(model="b", version=1, learn_from_requests=10)
    core.baseline_changed(("b", 1), learned, 9)
    core.baseline_changed(("b", 1), None, 8)
    assert core.baselines[("b", 1)] == (learned, 9)
    core.baseline_changed(("b", 1), None, 10)
    assert core.baselines == {}

    # A snapshot (a resync) replaces all of it.
    core.route_changed("r", route, 99)
    core.control_replaced(ControlState(slos={"x": SLO(model="x", max_error_rate=0.1)}))
    assert list(core.slos) == ["x"] and core.routes == {} and core.baselines == {}


def _gen(clock: Clock, ttft_ms: float, alias: str = "production", version: int = 1, model: str = "lm") -> Request:
    return Request(source="gateway", model=model, version=version, alias=alias, status="OK", latency_us=400_000,
                   time_ns=clock.now, generation=Generation(prompt_tokens=12, completion_tokens=32,
                                                            ttft_us=int(ttft_ms * 1000), itl_mean_us=20_000))


async def test_ttft_slo_fires_and_resolves_and_inter_token_slo_holds(core: MonitorCore, clock: Clock) -> None:
    sub = core.alerts.subscribe(model="lm")
    await core.set_slo(SLO(model="lm", p99_ttft_ms=300, p99_inter_token_ms=50, window_s=5, min_requests=10), "me")
    await core.ingest(Report("gateway", [_gen(clock, 100)] * 50))
    await core.evaluate()
    assert not core.alerts.active
    await core.ingest(Report("gateway", [_gen(clock, 900)] * 50))
    await core.evaluate()
    alert, _ = await asyncio.wait_for(sub.next(), 1)
    assert (alert.kind, alert.state, alert.id) == (AlertKind.SLO_TTFT, AlertState.FIRING, "slo:lm:ttft")
    assert alert.value == pytest.approx(900, rel=0.03) and alert.threshold == 300
    assert list(core.alerts.active) == ["slo:lm:ttft"]  # inter-token latency (20 ms) is within its 50 ms
    clock.advance(6)
    await core.ingest(Report("gateway", [_gen(clock, 100)] * 50))
    await core.evaluate()
    alert, _ = await asyncio.wait_for(sub.next(), 1)
    assert (alert.kind, alert.state) == (AlertKind.SLO_TTFT, AlertState.RESOLVED)
    with pytest.raises(InvalidArgument, match="p99_ttft_ms must be > 0"):
        await core.set_slo(SLO(model="lm", p99_ttft_ms=0), "me")


async def test_canary_with_slow_first_tokens_is_rolled_back(core: MonitorCore, clock: Clock,
                                                            control: MemoryControlPlane) -> None:
    control.put_route("lm", [("production", 90), ("canary", 10)])
    control.put_route("ok", [("production", 90), ("canary", 10)])
    await core.evaluate()
    # Same end-to-end latency on both sides: only the time to first token tells the canary apart.
    await core.ingest(Report("gateway", [_gen(clock, 100)] * 100 + [_gen(clock, 800, "canary", 2)] * 40
                             + [_gen(clock, 100, model="ok")] * 100 + [_gen(clock, 120, "canary", 2, "ok")] * 40))
    await core.evaluate()
    status = core.canary_status("lm")
    assert status.verdict is CanaryVerdict.LATENCY_REGRESSION and "first token" in status.reason
    assert status.ttft_p99_ratio == pytest.approx(8, rel=0.05)
    assert control.routes["lm"].splits[1].weight == 0
    healthy = core.canary_status("ok")
    assert healthy.verdict is CanaryVerdict.HEALTHY and healthy.ttft_p99_ratio == pytest.approx(1.2, rel=0.05)
    assert control.routes["ok"].splits[1].weight == 10
