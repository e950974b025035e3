"""Canary analysis: is the canary significantly worse than production?

Generative models add time to first token: the canary's p99 TTFT over production's past a ratio,
plus a minimum absolute gap, judged like latency (a LATENCY_REGRESSION whose reason says TTFT).

Errors: a one-sided two-proportion z-test (canary error rate greater than production's) at
`alpha`, plus a minimum absolute increase so a tiny but "significant" difference on a huge
sample does not roll anything back. Latency: the canary's p99 over production's past a ratio,
plus a minimum absolute gap. Both need a minimum number of requests on each side. Quality: once
both sides have `min_labels` class labels from Feedback, the same one-sided test on wrong
predictions, plus a least accuracy drop (`max_accuracy_drop`).
"""

from __future__ import annotations

import dataclasses
import math

from services.monitor.entities import CanaryVerdict, SeriesMetrics


@dataclasses.dataclass(frozen=True, slots=True)
class CanaryPolicy:
    min_requests: int = 50
    alpha: float = 0.01
    min_error_increase: float = 0.02
    max_p99_ratio: float = 2.0
    min_p99_increase_ms: float = 5.0
    max_ttft_p99_ratio: float = 2.0
    min_ttft_increase_ms: float = 20.0
    min_labels: int = 100
    max_accuracy_drop: float = 0.05


@dataclasses.dataclass(frozen=True, slots=True)
class CanaryDecision:
    verdict: CanaryVerdict
    error_p_value: float
    p99_ratio: float
    reason: str
    ttft_p99_ratio: float = 0.0
    accuracy_p_value: float = 1.0

    @property
    def regressed(self) -> bool:
        return self.verdict in (CanaryVerdict.ERROR_REGRESSION, CanaryVerdict.LATENCY_REGRESSION,
                                CanaryVerdict.QUALITY_REGRESSION)


def two_proportion_p_value(errors_a: int, n_a: int, errors_b: int, n_b: int) -> float:
    """One-sided p-value that proportion a exceeds proportion b (pooled z-test)."""
    if n_a <= 0 or n_b <= 0:
        return 1.0
    p_a, p_b = errors_a / n_a, errors_b / n_b
    pooled = (errors_a + errors_b) / (n_a + n_b)
    variance = pooled * (1.0 - pooled) * (1.0 / n_a + 1.0 / n_b)
    if variance <= 0.0:
        return 1.0 if p_a <= p_b else 0.0
    z = (p_a - p_b) / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def judge(production: SeriesMetrics, canary: SeriesMetrics, policy: CanaryPolicy) -> CanaryDecision:
    p_value = two_proportion_p_value(canary.errors, canary.count, production.errors, production.count)
    prod_p99 = production.latency.p99_ms
    ratio = canary.latency.p99_ms / prod_p99 if prod_p99 > 0 else 0.0
    if canary.count < policy.min_requests or production.count < policy.min_requests:
        return CanaryDecision(
            CanaryVerdict.INSUFFICIENT_DATA, p_value, ratio,
            f"need {policy.min_requests} requests on each side (canary {canary.count}, "
            f"production {production.count})",
        )
    increase = canary.error_rate - production.error_rate
    if p_value < policy.alpha and increase >= policy.min_error_increase:
        return CanaryDecision(
            CanaryVerdict.ERROR_REGRESSION, p_value, ratio,
            f"canary error rate {canary.error_rate:.1%} vs production {production.error_rate:.1%} "
            f"over {canary.count}/{production.count} requests (p={p_value:.2g} < {policy.alpha})",
        )
    if (prod_p99 > 0 and ratio > policy.max_p99_ratio
            and canary.latency.p99_ms - prod_p99 >= policy.min_p99_increase_ms):
        return CanaryDecision(
            CanaryVerdict.LATENCY_REGRESSION, p_value, ratio,
            f"canary p99 {canary.latency.p99_ms:.1f} ms is {ratio:.1f}x production's {prod_p99:.1f} ms "
            f"(limit {policy.max_p99_ratio:g}x)",
        )
    ttft_ratio, prod_ttft, canary_ttft = 0.0, 0.0, 0.0
    if production.generation is not None and canary.generation is not None:
        prod_ttft, canary_ttft = production.generation.ttft.p99_ms, canary.generation.ttft.p99_ms
        ttft_ratio = canary_ttft / prod_ttft if prod_ttft > 0 else 0.0
        enough = min(production.generation.count, canary.generation.count) >= policy.min_requests
        if (enough and prod_ttft > 0 and ttft_ratio > policy.max_ttft_p99_ratio
                and canary_ttft - prod_ttft >= policy.min_ttft_increase_ms):
            return CanaryDecision(
                CanaryVerdict.LATENCY_REGRESSION, p_value, ratio,
                f"canary p99 time to first token {canary_ttft:.1f} ms is {ttft_ratio:.1f}x production's "
                f"{prod_ttft:.1f} ms (limit {policy.max_ttft_p99_ratio:g}x)", ttft_p99_ratio=ttft_ratio)
    if canary.class_labels < policy.min_labels or production.class_labels < policy.min_labels:
        return CanaryDecision(CanaryVerdict.HEALTHY, p_value, ratio,
                              f"no significant regression (quality not judged: need {policy.min_labels} labels "
                              f"on each side, canary {canary.class_labels}, production {production.class_labels})",
                              ttft_p99_ratio=ttft_ratio)
    wrong_p = two_proportion_p_value(canary.class_labels - canary.correct, canary.class_labels,
                                     production.class_labels - production.correct, production.class_labels)
    drop = production.accuracy - canary.accuracy
    if wrong_p < policy.alpha and drop > policy.max_accuracy_drop:
        return CanaryDecision(
            CanaryVerdict.QUALITY_REGRESSION, p_value, ratio,
            f"canary online accuracy {canary.accuracy:.1%} vs production {production.accuracy:.1%} over "
            f"{canary.class_labels}/{production.class_labels} labels (drop {drop:.1%} > "
            f"{policy.max_accuracy_drop:.1%}, p={wrong_p:.2g} < {policy.alpha})",
            ttft_p99_ratio=ttft_ratio, accuracy_p_value=wrong_p,
        )
    return CanaryDecision(CanaryVerdict.HEALTHY, p_value, ratio, "no significant regression",
                          ttft_p99_ratio=ttft_ratio, accuracy_p_value=wrong_p)
