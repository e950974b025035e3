"""Check a spec's thresholds on every slice they cover: absolute bounds, and changes against the baseline.

One ThresholdResult per threshold and slice: PASSED, FAILED (outside the bound, or the metric is
undefined there), or SKIPPED (fewer examples than `min_examples`, or no baseline to compare with).
"""

from __future__ import annotations

from collections.abc import Sequence

from aiaas.eval.spec import EvalSpec, Threshold
from aiaas.registry.v1 import evaluation_pb2 as epb

PASSED = epb.THRESHOLD_OUTCOME_PASSED
FAILED = epb.THRESHOLD_OUTCOME_FAILED
SKIPPED = epb.THRESHOLD_OUTCOME_SKIPPED
# Float noise must not fail a bound met exactly (accuracy 0.9 >= 0.9 after summing).
TOLERANCE = 1e-12


def check(spec: EvalSpec, slices: Sequence[epb.SliceResult], *, baseline: str = "") -> list[epb.ThresholdResult]:
    """`baseline` describes the baseline version ("version 1 (production)"); empty when there is none."""
    out = []
    for threshold in spec.thresholds:
        for found in slices:
            if threshold.applies_to(found.slicing):
                out.append(_check_one(threshold, found, baseline))
    return out


def _where(found: epb.SliceResult) -> str:
    return f"on slice {found.slice} ({found.example_count} examples)"


def _check_one(threshold: Threshold, found: epb.SliceResult, baseline: str) -> epb.ThresholdResult:
    result = epb.ThresholdResult(threshold=threshold.describe(), metric=threshold.metric, slice=found.slice)
    if found.example_count < threshold.min_examples:
        result.outcome = SKIPPED
        result.message = (f"{threshold.describe()}: skipped {_where(found)}, fewer than min_examples "
                          f"{threshold.min_examples}")
        return result
    if threshold.metric not in found.metrics:
        result.outcome = FAILED
        result.message = f"{threshold.describe()} failed: {threshold.metric} is undefined {_where(found)}"
        return result
    value = found.metrics[threshold.metric]
    result.value = value
    if threshold.relative:
        return _relative(threshold, found, value, baseline, result)
    if threshold.min is not None:
        result.bound, ok, sign = threshold.min, value >= threshold.min - TOLERANCE, "<"
    else:
        result.bound = float(threshold.max if threshold.max is not None else "inf")
        ok, sign = value <= result.bound + TOLERANCE, ">"
    result.outcome = PASSED if ok else FAILED
    result.message = (f"{threshold.describe()} {'passed' if ok else 'failed'}: {threshold.metric} {value:.4f}"
                      f"{'' if ok else f' {sign} {result.bound:g}'} {_where(found)}")
    return result


def _relative(threshold: Threshold, found: epb.SliceResult, value: float, baseline: str,
              result: epb.ThresholdResult) -> epb.ThresholdResult:
    if not baseline:
        result.outcome = SKIPPED
        result.message = f"{threshold.describe()}: skipped {_where(found)}, there is no baseline"
        return result
    if threshold.metric not in found.baseline_metrics:
        result.outcome = FAILED
        result.message = (f"{threshold.describe()} failed: {threshold.metric} of the baseline is undefined "
                          f"{_where(found)}")
        return result
    base = found.baseline_metrics[threshold.metric]
    result.baseline_value = base
    if threshold.max_decrease is not None:
        limit, noun = threshold.max_decrease, "drop"
        result.bound = base - limit
        ok = value >= result.bound - TOLERANCE
    else:
        limit, noun = threshold.max_increase or 0.0, "rise"
        result.bound = base + limit
        ok = value <= result.bound + TOLERANCE
    result.outcome = PASSED if ok else FAILED
    result.message = (f"{threshold.describe()} {'passed' if ok else 'failed'}: {threshold.metric} {value:.4f} vs "
                      f"{base:.4f} for the baseline {baseline} (change {value - base:+.4f}, "
                      f"{'within' if ok else 'beyond'} the allowed {noun} of {limit:g}) {_where(found)}")
    return result
