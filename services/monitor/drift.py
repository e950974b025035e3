"""Input drift: per-feature histogram baselines and the population stability index (PSI).

A baseline fixes each feature's bin edges (quantiles of a reference sample), so live values
can be binned as they arrive and summed over any window, in Redis or in memory, like the
request counters. PSI = sum((a - e) * ln(a / e)) over bins, with a the live and e the baseline
fractions; the usual reading: < 0.1 stable, 0.1 to 0.25 moderate shift, > 0.25 large shift.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterator, Mapping

import numpy as np

from services.common.errors import InvalidArgument
from services.monitor.entities import Baseline, FeatureDrift, FeatureHistogram, InputSample

DEFAULT_BINS = 10
MAX_BINS = 100
# Empty bins would make PSI infinite; both sides are floored at this fraction.
_EPSILON = 1e-4
MAX_FEATURES = 256


def sample_features(sample: InputSample) -> Iterator[tuple[str, np.ndarray]]:
    """The features of one input sample: "<input>" for one column, "<input>[j]" for several."""
    if sample.rows <= 0 or sample.cols <= 0 or len(sample.values) != sample.rows * sample.cols * 4:
        return
    matrix = np.frombuffer(sample.values, dtype="<f4").reshape(sample.rows, sample.cols)
    if sample.cols == 1:
        yield sample.input, matrix[:, 0]
        return
    for j in range(min(sample.cols, MAX_FEATURES)):
        yield f"{sample.input}[{j}]", matrix[:, j]


def build_histogram(feature: str, values: np.ndarray, bins: int = DEFAULT_BINS) -> FeatureHistogram:
    """Quantile bins of a reference sample, so each holds about the same share of it."""
    if not 2 <= bins <= MAX_BINS:
        raise InvalidArgument(f"bins must be 2..{MAX_BINS}, got {bins}")
    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    if data.size == 0:
        raise InvalidArgument(f"feature {feature!r}: no finite values to build a histogram from")
    edges = np.unique(np.quantile(data, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    if edges.size == 0:
        edges = np.array([data[0]])
    counts = bin_counts(tuple(float(e) for e in edges), data)
    fractions = tuple(c / data.size for c in counts)
    return FeatureHistogram(feature=feature, edges=tuple(float(e) for e in edges), fractions=fractions,
                            count=int(data.size))


def bin_counts(edges: tuple[float, ...], values: np.ndarray) -> list[int]:
    """Counts per bin: (-inf, e0), [e0, e1), ..., [e_last, +inf). Non-finite values are skipped."""
    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), data, side="right")
    return np.bincount(index, minlength=len(edges) + 1).tolist()


def validate_histogram(hist: FeatureHistogram) -> None:
    if not hist.feature:
        raise InvalidArgument("a baseline histogram needs a feature name")
    if len(hist.fractions) != len(hist.edges) + 1:
        raise InvalidArgument(f"feature {hist.feature!r}: fractions must number len(edges) + 1")
    if any(b <= a for a, b in itertools.pairwise(hist.edges)):
        raise InvalidArgument(f"feature {hist.feature!r}: edges must be strictly ascending")
    if any(f < 0 for f in hist.fractions) or not math.isclose(sum(hist.fractions), 1.0, abs_tol=1e-3):
        raise InvalidArgument(f"feature {hist.feature!r}: fractions must be >= 0 and sum to 1")


def psi(expected: tuple[float, ...], actual_counts: list[int]) -> float:
    total = sum(actual_counts)
    if total <= 0:
        return 0.0
    value = 0.0
    for e, count in zip(expected, actual_counts, strict=False):  # extra counts (if any) are ignored
        e = max(e, _EPSILON)
        a = max(count / total, _EPSILON)
        value += (a - e) * math.log(a / e)
    return value


def live_increments(baseline: Baseline, samples: list[InputSample]) -> Counter[str]:
    """Counter fields for the live bins of these samples: "<feature>#<bin>" and "<feature>#n"."""
    by_feature = {h.feature: h for h in baseline.histograms}
    fields: Counter[str] = Counter()
    for sample in samples:
        for feature, values in sample_features(sample):
            hist = by_feature.get(feature)
            if hist is None:
                continue
            for index, count in enumerate(bin_counts(hist.edges, values)):
                if count:
                    fields[f"{feature}#{index}"] += count
                    fields[f"{feature}#n"] += count
    return fields


def drift_report(baseline: Baseline, live: Mapping[str, int], threshold: float, min_samples: int
                 ) -> list[FeatureDrift]:
    out = []
    for hist in sorted(baseline.histograms, key=lambda h: h.feature):
        counts = [int(live.get(f"{hist.feature}#{i}", 0)) for i in range(len(hist.fractions))]
        n = sum(counts)
        value = psi(hist.fractions, counts) if n else 0.0
        out.append(FeatureDrift(feature=hist.feature, psi=value, samples=n,
                                drifted=n >= min_samples and value > threshold))
    return out


class BaselineLearner:
    """Gathers a version's first N sampled rows per feature, then builds its histograms."""

    def __init__(self, target_rows: int, bins: int = DEFAULT_BINS) -> None:
        self.target_rows = target_rows
        self.bins = bins
        self.values: dict[str, list[np.ndarray]] = {}
        self.rows: dict[str, int] = {}

    def add(self, sample: InputSample) -> None:
        for feature, values in sample_features(sample):
            have = self.rows.get(feature, 0)
            if have >= self.target_rows:
                continue
            take = values[: self.target_rows - have].astype(np.float64)
            self.values.setdefault(feature, []).append(take)
            self.rows[feature] = have + take.size

    @property
    def learned_rows(self) -> int:
        return min(self.rows.values()) if self.rows else 0

    @property
    def done(self) -> bool:
        return bool(self.rows) and self.learned_rows >= self.target_rows

    def histograms(self) -> tuple[FeatureHistogram, ...]:
        return tuple(build_histogram(f, np.concatenate(parts), self.bins)
                     for f, parts in sorted(self.values.items()))
