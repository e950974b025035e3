"""Pure analysis: PSI and baselines, the canary test, alert state and fan-out."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.monitor import drift
from services.monitor.alerts import AlertHub
from services.monitor.canary import CanaryPolicy, judge, two_proportion_p_value
from services.monitor.entities import (
    Alert,
    AlertKind,
    AlertState,
    Baseline,
    CanaryVerdict,
    Distribution,
    FeatureHistogram,
    InputSample,
    SeriesKey,
    SeriesMetrics,
)


def _sample(values: np.ndarray, name: str = "x") -> InputSample:
    block = np.ascontiguousarray(values.reshape(values.shape[0], -1), dtype="<f4")
    return InputSample(model="m", version=1, input=name, rows=block.shape[0], cols=block.shape[1],
                       values=block.tobytes())


def test_quantile_histogram_has_equal_shares() -> None:
    values = np.random.default_rng(0).normal(size=10_000)
    hist = drift.build_histogram("x", values, 10)
    assert len(hist.edges) == 9 and len(hist.fractions) == 10
    assert all(f == pytest.approx(0.1, abs=0.01) for f in hist.fractions)
    drift.validate_histogram(hist)


def test_psi_is_small_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(1)
    hist = drift.build_histogram("x", rng.normal(size=5000), 10)
    same = drift.bin_counts(hist.edges, rng.normal(size=2000))
    shifted = drift.bin_counts(hist.edges, rng.normal(loc=1.0, size=2000))
    assert drift.psi(hist.fractions, same) < 0.05
    assert drift.psi(hist.fractions, shifted) > 0.5


def test_constant_feature_and_bad_histograms() -> None:
    hist = drift.build_histogram("c", np.full(100, 3.0), 10)
    assert hist.edges == (3.0,) and sum(hist.fractions) == pytest.approx(1.0)
    with pytest.raises(InvalidArgument):
        drift.build_histogram("x", np.array([np.nan]), 10)
    with pytest.raises(InvalidArgument):
        drift.validate_histogram(FeatureHistogram("x", (1.0, 0.5), (0.3, 0.3, 0.4), 10))
    with pytest.raises(InvalidArgument):
        drift.validate_histogram(FeatureHistogram("x", (1.0,), (0.5, 0.4), 10))


def test_features_of_a_sample_and_live_increments() -> None:
    matrix = np.arange(12, dtype=np.float32).reshape(4, 3)
    features = dict(drift.sample_features(_sample(matrix)))
    assert sorted(features) == ["x[0]", "x[1]", "x[2]"]
    np.testing.assert_array_equal(features["x[1]"], [1, 4, 7, 10])
    assert list(dict(drift.sample_features(_sample(np.arange(5.0)))).keys()) == ["x"]
    baseline = Baseline("m", 1, (FeatureHistogram("x[1]", (5.0,), (0.5, 0.5), 10),))
    fields = drift.live_increments(baseline, [_sample(matrix)])
    assert fields == {"x[1]#0": 2, "x[1]#1": 2, "x[1]#n": 4}
    (report,) = drift.drift_report(baseline, fields, threshold=0.2, min_samples=4)
    assert report.samples == 4 and report.psi == pytest.approx(0.0) and not report.drifted


def test_learner_builds_histograms_after_n_rows() -> None:
    learner = drift.BaselineLearner(target_rows=100, bins=5)
    rng = np.random.default_rng(2)
    for _ in range(3):
        learner.add(_sample(rng.normal(size=(32, 2))))
    assert not learner.done and learner.learned_rows == 96
    learner.add(_sample(rng.normal(size=(32, 2))))
    assert learner.done and learner.learned_rows == 100
    hists = learner.histograms()
    assert [h.feature for h in hists] == ["x[0]", "x[1]"] and all(h.count == 100 for h in hists)


def _series(count: int, errors: int, p99_ms: float) -> SeriesMetrics:
    return SeriesMetrics(key=SeriesKey("m", 1, "a", "gateway"), window_s=60, count=count, errors=errors,
                         error_rate=errors / count if count else 0.0, latency=Distribution(p99_ms=p99_ms))


def test_two_proportion_test() -> None:
    assert two_proportion_p_value(50, 100, 1, 100) < 1e-6
    assert two_proportion_p_value(1, 100, 1, 100) == pytest.approx(0.5)
    assert two_proportion_p_value(0, 100, 0, 100) == 1.0
    assert two_proportion_p_value(1, 0, 0, 10) == 1.0


def test_canary_verdicts() -> None:
    policy = CanaryPolicy(min_requests=50, alpha=0.01, min_error_increase=0.02, max_p99_ratio=2.0,
                          min_p99_increase_ms=5)
    assert judge(_series(1000, 1, 10), _series(20, 10, 10), policy).verdict is CanaryVerdict.INSUFFICIENT_DATA
    bad = judge(_series(1000, 1, 10), _series(100, 30, 10), policy)
    assert bad.verdict is CanaryVerdict.ERROR_REGRESSION and bad.regressed and "30.0%" in bad.reason
    # significant but tiny increase: not a regression
    assert judge(_series(10**6, 0, 10), _series(10**6, 1000, 10), policy).verdict is CanaryVerdict.HEALTHY
    slow = judge(_series(1000, 0, 10), _series(100, 0, 80), policy)
    assert slow.verdict is CanaryVerdict.LATENCY_REGRESSION and slow.p99_ratio == pytest.approx(8.0)
    # ratio past the limit but a 3 ms gap: noise at these latencies
    assert judge(_series(1000, 0, 1), _series(100, 0, 4), policy).verdict is CanaryVerdict.HEALTHY


def _alert(i: int = 0, model: str = "m") -> Alert:
    return Alert(id=f"a{i}", kind=AlertKind.SLO_LATENCY, state=AlertState.FIRING, model=model, summary=f"s{i}")


async def test_alert_fires_once_and_resolves_once() -> None:
    hub = AlertHub()
    sub = hub.subscribe()
    assert hub.fire(_alert())
    assert not hub.fire(_alert())
    assert hub.resolve("a0")
    assert not hub.resolve("a0")
    first, missed = await asyncio.wait_for(sub.next(), 1)
    second, _ = await asyncio.wait_for(sub.next(), 1)
    assert (first.state, second.state, missed) == (AlertState.FIRING, AlertState.RESOLVED, 0)
    assert [a.state for a in hub.list()] == [AlertState.RESOLVED]
    sub.close()


async def test_slow_subscriber_loses_oldest_and_is_told() -> None:
    hub = AlertHub(subscriber_queue=3)
    sub = hub.subscribe(model="m")
    for i in range(5):
        hub.fire(_alert(i))
    hub.fire(_alert(9, model="other"))
    got = [await asyncio.wait_for(sub.next(), 1) for _ in range(3)]
    assert [a.id for a, _ in got] == ["a2", "a3", "a4"]
    assert got[0][1] == 2 and got[1][1] == 0
    late = hub.subscribe(include_active=True)
    got = [await asyncio.wait_for(late.next(), 1) for _ in range(3)]
    assert got[0][1] == 3  # six were firing; the queue holds three
    assert {a.id for a, _ in got} <= {"a0", "a1", "a2", "a3", "a4", "a9"}
    hub.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(sub.next(), 1)
