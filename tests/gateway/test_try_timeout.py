"""The per-try timeout estimator: a replica's recent p99, the policy's floor, factor, fixed and off
modes, the pool's estimate for a replica with too few answers, and the caller's deadline."""

from __future__ import annotations

import random

import pytest

from services.common.errors import InvalidArgument
from services.gateway.settings import GatewaySettings
from services.gateway.try_timeout import LatencyWindow, TryTimeouts


def filled(values: list[float], size: int = 128, refresh: int = 16) -> LatencyWindow:
    window = LatencyWindow(size=size, refresh=refresh)
    for value in values:
        window.observe(value)
    return window


def test_p99_of_the_last_answers_refreshed_every_few() -> None:
    window = LatencyWindow(size=100, refresh=10)
    for _ in range(9):
        window.observe(0.01)
    assert window.p99() is None  # too few to judge
    window.observe(0.01)
    assert window.p99() == 0.01
    values = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms
    random.Random(7).shuffle(values)
    window = filled(values, size=100, refresh=10)
    assert window.p99() == pytest.approx(0.099)


def test_the_window_forgets_old_answers() -> None:
    window = filled([1.0] * 128 + [0.01] * 112)
    assert window.p99() == 1.0  # 16 slow ones are still inside the last 128
    for _ in range(16):
        window.observe(0.01)
    assert window.p99() == 0.01


def test_one_outlier_does_not_move_the_p99_two_do() -> None:
    window = filled([0.01] * 127 + [5.0])
    assert window.p99() == 0.01
    window = filled([0.01] * 126 + [5.0, 5.0])
    assert window.p99() == 5.0


def test_auto_is_the_factor_times_p99_above_the_floor() -> None:
    policy = TryTimeouts(floor_s=0.25, p99_factor=3.0)
    pool = LatencyWindow()
    assert policy.for_try(filled([0.2] * 16), pool, 30.0) == pytest.approx(0.6)
    assert policy.for_try(filled([0.01] * 16), pool, 30.0) == 0.25  # 30 ms would hedge on any hiccup


def test_a_replica_with_too_few_answers_uses_the_pool_and_none_without_any() -> None:
    policy = TryTimeouts(floor_s=0.1, p99_factor=2.0)
    fresh = LatencyWindow()
    fresh.observe(0.3)
    assert policy.for_try(fresh, filled([0.5] * 16), 30.0) == pytest.approx(1.0)
    assert policy.for_try(fresh, LatencyWindow(), 30.0) is None  # no ground to call a try slow


def test_bounded_by_the_callers_deadline() -> None:
    policy = TryTimeouts(floor_s=0.25, p99_factor=3.0)
    window, pool = filled([0.2] * 16), LatencyWindow()
    assert policy.for_try(window, pool, 0.86) == pytest.approx(0.6)  # a hedge would still have 0.26 s
    assert policy.for_try(window, pool, 0.84) is None  # too little left after the try for a hedge
    assert policy.for_try(window, pool, 0.3) is None


def test_fixed_and_off() -> None:
    window, pool = filled([5.0] * 16), LatencyWindow()
    fixed = TryTimeouts.parse("0.4")
    assert fixed.for_try(window, pool, 30.0) == 0.4 and fixed.for_try(LatencyWindow(), pool, 30.0) == 0.4
    assert fixed.for_try(window, pool, 0.5) is None
    off = TryTimeouts.parse("off")
    assert not off.enabled and off.for_try(window, pool, 30.0) is None
    assert TryTimeouts.parse(" AUTO ").adaptive


@pytest.mark.parametrize("text", ["", "soon", "0", "-1", "inf", "nan"])
def test_bad_settings_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument, match="per_try_timeout"):
        TryTimeouts.parse(text)
    with pytest.raises(InvalidArgument, match="per_try_timeout"):
        GatewaySettings(key_pepper="p", per_try_timeout=text).validate()


def test_bad_floor_or_factor_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="floor"):
        GatewaySettings(key_pepper="p", per_try_timeout_floor_s=0).validate()
    with pytest.raises(InvalidArgument, match="factor"):
        TryTimeouts(p99_factor=0.5)
    with pytest.raises(InvalidArgument, match="health_check"):
        GatewaySettings(key_pepper="p", health_check_timeout_s=0).validate()
    with pytest.raises(InvalidArgument, match="refresh"):
        LatencyWindow(size=4, refresh=8)
