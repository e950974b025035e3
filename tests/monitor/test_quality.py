"""Online quality in the monitor: labels from Feedback counted per model, version and alias; exact
accuracy and error over windows (memory and Redis), quality SLOs, quality canary rollback, Prometheus."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from aiaas.monitor.v1 import monitor_pb2 as pb
from services.common.errors import InvalidArgument
from services.monitor.alerts import AlertHub
from services.monitor.canary_watch import CanaryWatch
from services.monitor.control import MemoryControlPlane
from services.monitor.convert import report_from_proto, series_to_proto, slo_from_proto, slo_to_proto
from services.monitor.core import MonitorCore
from services.monitor.entities import (
    SLO,
    AlertKind,
    AlertState,
    CanaryVerdict,
    MetricsFilter,
    QualitySample,
    Report,
    Request,
)
from services.monitor.metrics import BAD_QUALITY, RequestWindows
from services.monitor.prom import PrometheusExport
from services.monitor.settings import MonitorSettings
from services.monitor.slos import check_slo
from services.monitor.windows import MemoryWindowStore, RedisWindowStore
from tests.monitor.test_watches import Clock


def _class_samples(clock: Clock, outcomes: list[bool], alias: str = "production", version: int = 1,
                   rows: int = 1) -> list[QualitySample]:
    """One sample per outcome; `rows` labels each, all right or all wrong."""
    return [QualitySample(model="m", version=version, alias=alias, class_labels=rows, correct=rows if ok else 0,
                          time_ns=clock.now) for ok in outcomes]


@pytest.fixture(params=["memory", "redis"])
async def windows(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RequestWindows, Clock]]:
    clock = Clock()
    settings = MonitorSettings(registry_url=None)
    store: MemoryWindowStore | RedisWindowStore
    if request.param == "memory":
        store = MemoryWindowStore(bucket_s=1.0, retention_s=3600)
    else:
        redis_server = request.getfixturevalue("redis_server")
        store = RedisWindowStore(redis_server.url, bucket_s=1.0, retention_s=3600,
                                 prefix=f"test-quality-{np.random.default_rng().integers(1 << 30)}")
    yield RequestWindows(settings, store, None, clock), clock
    await store.close()


async def test_accuracy_and_errors_are_exact_per_version_and_alias(windows: tuple[RequestWindows, Clock]) -> None:
    win, clock = windows
    rng = np.random.default_rng(7)
    predicted = rng.integers(0, 5, 300)
    truth = np.where(rng.random(300) < 0.8, predicted, (predicted + 1) % 5)
    values = rng.normal(10, 3, 120)
    labels = values + rng.normal(0, 0.7, 120)
    samples = []
    for i in range(0, 300, 3):  # feedback calls of 3 rows each
        right = int((predicted[i:i + 3] == truth[i:i + 3]).sum())
        samples.append(QualitySample(model="m", version=2, alias="production", class_labels=3, correct=right,
                                     time_ns=clock.now))
    for i in range(0, 120, 4):
        err = values[i:i + 4] - labels[i:i + 4]
        samples.append(QualitySample(model="m", version=2, alias="production", value_labels=4,
                                     abs_error_sum=float(np.abs(err).sum()), squared_error_sum=float((err**2).sum()),
                                     time_ns=clock.now))
    samples += [QualitySample(model="m", version=2, alias="production", score=s, time_ns=clock.now)
                for s in (0.25, 0.5, 1.0)]
    # Another alias of the same model: its own series.
    samples += _class_samples(clock, [False] * 10, alias="canary", version=3)
    await win.ingest(Report("gateway", [], quality=samples), clock.now)
    clock.advance(5)
    by_alias = {m.key.alias: m for m in await win.query(MetricsFilter(model="m", window_s=60))}
    prod, canary = by_alias["production"], by_alias["canary"]
    assert prod.key.source == "gateway" and prod.key.version == 2 and prod.count == 0
    assert prod.class_labels == 300 and prod.correct == int((predicted == truth).sum())
    assert prod.accuracy == pytest.approx(float((predicted == truth).mean()), abs=1e-12)
    assert prod.value_labels == 120
    assert prod.mean_abs_error == pytest.approx(float(np.abs(values - labels).mean()), rel=1e-6)
    assert prod.rmse == pytest.approx(math.sqrt(float(((values - labels) ** 2).mean())), rel=1e-6)
    assert prod.scores == 3 and prod.mean_score == pytest.approx(1.75 / 3)
    assert (canary.class_labels, canary.correct, canary.accuracy) == (10, 0, 0.0)
    # Labels older than the window no longer count.
    clock.advance(60)
    assert [m for m in await win.query(MetricsFilter(model="m", window_s=30))] == []


async def test_quality_joins_the_request_series_and_bad_samples_are_refused() -> None:
    clock = Clock()
    win = RequestWindows(MonitorSettings(registry_url=None), MemoryWindowStore(), None, clock)
    requests = [Request(source="gateway", model="m", version=1, alias="production", status="OK", latency_us=900,
                        time_ns=clock.now)] * 8
    bad = [
        QualitySample(model="m", version=1, alias="production", class_labels=2, correct=3),  # more right than labels
        QualitySample(model="m", version=1, alias="production", value_labels=1, abs_error_sum=float("nan")),
        QualitySample(model="m", version=1, alias="production", score=1.5),
        QualitySample(model="m", version=1, alias="production"),  # says nothing
        QualitySample(model="m", version=1, alias="production", class_labels=10**6, correct=0),
    ]
    await win.ingest(Report("gateway", requests, quality=[*bad, *_class_samples(clock, [True, False, True])]),
                     clock.now)
    # Only the gateway joins labels to predictions: quality from another reporter is refused.
    await win.ingest(Report("inference", [], quality=_class_samples(clock, [True] * 5)), clock.now)
    (m,) = await win.query(MetricsFilter(model="m", window_s=60))
    assert (m.count, m.class_labels, m.correct) == (8, 3, 2)
    assert win.cap.refused[BAD_QUALITY] == len(bad) + 5


async def test_accuracy_slo_fires_with_enough_labels_and_resolves() -> None:
    clock = Clock()
    settings = MonitorSettings(registry_url=None, slo_min_labels=1000)
    core = MonitorCore(settings, MemoryWindowStore(), MemoryControlPlane(), clock=clock)
    with pytest.raises(InvalidArgument, match="min_accuracy"):
        await core.set_slo(SLO(model="m", min_accuracy=1.5), "me")
    with pytest.raises(InvalidArgument, match="at least one"):
        await core.set_slo(SLO(model="m", min_labels=5), "me")
    await core.set_slo(SLO(model="m", min_accuracy=0.9, max_mean_abs_error=2.0, window_s=60, min_labels=50), "me")
    await core.ingest(Report("gateway", [], quality=_class_samples(clock, [True] * 40 + [False] * 9)))
    await core.evaluate()
    assert not core.alerts.active  # 49 labels < min_labels: not judged
    await core.ingest(Report("gateway", [], quality=_class_samples(clock, [False])))
    await core.evaluate()
    alert = core.alerts.active["slo:m:accuracy"]
    assert alert.kind is AlertKind.SLO_ACCURACY and alert.value == pytest.approx(0.8) and alert.threshold == 0.9
    assert "40/50" in alert.summary
    # Regression labels: mean absolute error 3.0 over 50 labels breaches max 2.0.
    await core.ingest(Report("gateway", [], quality=[QualitySample(
        model="m", version=1, alias="production", value_labels=50, abs_error_sum=150.0, squared_error_sum=450.0,
        time_ns=clock.now)]))
    await core.evaluate()
    assert core.alerts.active["slo:m:quality_error"].value == pytest.approx(3.0)
    clock.advance(61)  # the bad labels leave the window; good ones come
    await core.ingest(Report("gateway", [], quality=_class_samples(clock, [True] * 60)))
    await core.evaluate()
    assert "slo:m:accuracy" not in core.alerts.active
    resolved = [a for a in core.alerts.history if a.id == "slo:m:accuracy" and a.state is AlertState.RESOLVED]
    assert resolved and resolved[-1].value == 1.0


def test_quality_slo_round_trips_and_is_checked() -> None:
    slo = SLO(model="m", min_accuracy=0.9, window_s=3600, min_labels=200)
    assert slo_from_proto(pb.SLO.FromString(slo_to_proto(slo).SerializeToString())) == slo
    assert slo_from_proto(slo_to_proto(SLO(model="m", p99_latency_ms=5))).min_accuracy is None
    for bad in (SLO(model="m", max_mean_abs_error=-1), SLO(model="m", min_accuracy=0.5, min_labels=-1)):
        with pytest.raises(InvalidArgument):
            check_slo(bad, 3600)


def test_report_carries_quality_samples() -> None:
    msg = pb.ReportRequest(source="gateway", quality=[
        pb.QualitySample(model="m", version=2, alias="canary", class_labels=4, correct=3, time_ns=5),
        pb.QualitySample(model="m", version=2, alias="canary", value_labels=1, abs_error_sum=0.5,
                         squared_error_sum=0.25, score=0.0),
    ])
    first, second = report_from_proto(pb.ReportRequest.FromString(msg.SerializeToString())).quality
    assert (first.class_labels, first.correct, first.score, first.time_ns) == (4, 3, None, 5)
    assert (second.value_labels, second.abs_error_sum, second.score) == (1, 0.5, 0.0)


async def _canary(settings: MonitorSettings, prod_ok: int, canary_ok: int, labels: int
                  ) -> tuple[CanaryWatch, MemoryControlPlane, AlertHub]:
    clock = Clock()
    control, alerts = MemoryControlPlane(), AlertHub()
    windows = RequestWindows(settings, MemoryWindowStore(), None, clock)
    watch = CanaryWatch(settings, control, alerts, windows, None, clock)
    control.put_route("m", [("production", 50), ("canary", 50)])
    watch.replace(list(control.routes.values()))
    await watch.evaluate(watch.routes["m"])  # watching starts now
    requests = ([Request("gateway", "m", 1, "production", "OK", 1000, time_ns=clock.now)] * 100
                + [Request("gateway", "m", 2, "canary", "OK", 1000, time_ns=clock.now)] * 100)
    quality = (_class_samples(clock, [True] * prod_ok + [False] * (labels - prod_ok))
               + _class_samples(clock, [True] * canary_ok + [False] * (labels - canary_ok), "canary", 2))
    await windows.ingest(Report("gateway", requests, quality=quality), clock.now)
    await watch.evaluate(watch.routes["m"])
    return watch, control, alerts


async def test_canary_with_worse_online_accuracy_is_rolled_back() -> None:
    settings = MonitorSettings(registry_url=None, canary_min_requests=50, canary_min_labels=100,
                               canary_max_accuracy_drop=0.05)
    watch, control, alerts = await _canary(settings, prod_ok=190, canary_ok=150, labels=200)
    status = watch.status("m")
    assert status.verdict is CanaryVerdict.QUALITY_REGRESSION and status.rolled_back
    assert status.canary is not None and status.canary.accuracy == 0.75 and status.accuracy_p_value < 0.01
    assert [(s.alias, s.weight) for s in control.routes["m"].splits] == [("production", 50), ("canary", 0)]
    (event,) = control.audit
    assert event["details"]["canary_accuracy"] == 0.75 and event["details"]["production_accuracy"] == 0.95
    alert = alerts.active["canary:m"]
    assert alert.kind is AlertKind.CANARY_ROLLBACK and alert.value == 0.75 and "online accuracy" in alert.summary
    assert series_to_proto(status.canary).accuracy == 0.75


@pytest.mark.parametrize(("prod_ok", "canary_ok", "labels", "why"), [
    (95, 60, 99, "need 100 labels"),           # too few labels on each side: quality not judged
    (190, 184, 200, "no significant"),        # a 3-point drop: within the allowed 5
])
async def test_canary_quality_within_bounds_or_unjudged_stays(prod_ok: int, canary_ok: int, labels: int,
                                                              why: str) -> None:
    settings = MonitorSettings(registry_url=None, canary_min_requests=50, canary_min_labels=100)
    watch, control, alerts = await _canary(settings, prod_ok, canary_ok, labels)
    status = watch.status("m")
    assert status.verdict is CanaryVerdict.HEALTHY and not status.rolled_back and why in status.reason
    assert {s.alias: s.weight for s in control.routes["m"].splits}["canary"] == 50
    assert not alerts.active


async def test_prometheus_exports_labels_and_window_accuracy() -> None:
    clock = Clock()
    registry = CollectorRegistry()
    prom = PrometheusExport(registry)
    core = MonitorCore(MonitorSettings(registry_url=None, default_window_s=60), MemoryWindowStore(),
                       MemoryControlPlane(), prom=prom, clock=clock)
    await core.ingest(Report("gateway", [], quality=_class_samples(clock, [True, True, True, False], rows=2) + [
        QualitySample(model="m", version=1, alias="production", value_labels=2, abs_error_sum=3.0,
                      squared_error_sum=5.0, time_ns=clock.now)]))
    await core.evaluate()
    labels = {"source": "gateway", "model": "m", "version": "1", "alias": "production"}
    assert registry.get_sample_value("aiaas_model_feedback_labels_total", {**labels, "kind": "class"}) == 8
    assert registry.get_sample_value("aiaas_model_feedback_labels_total", {**labels, "kind": "value"}) == 2
    assert registry.get_sample_value("aiaas_model_feedback_correct_total", labels) == 6
    assert registry.get_sample_value("aiaas_model_window_accuracy", labels) == 0.75
    assert registry.get_sample_value("aiaas_model_window_mean_abs_error", labels) == 1.5
