"""Slicing (overall, by value, bucketed, crossed) and thresholds (absolute, min_examples, vs the baseline)
on predictions whose per-slice accuracy is known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from aiaas.errors import InvalidArgument
from aiaas.eval import runner
from aiaas.eval.metrics import Predictions
from aiaas.eval.runner import ModelRun, Runs
from aiaas.eval.spec import parse_spec
from aiaas.registry.v1 import evaluation_pb2 as epb

SPEC = """
name: sliced
task: classification
metrics: [accuracy, example_count, confusion_matrix]
slices:
  - feature: country
  - {feature: age, buckets: [30]}
  - cross: [country, {feature: age, buckets: [30]}]
thresholds:
  - {metric: accuracy, min: 0.9, min_examples: 50}
  - {metric: accuracy, max_decrease: 0.01, slices: [overall, country]}
"""


def _answers(correct_by_country: dict[str, int], counts: dict[str, int]) -> tuple[np.ndarray, np.ndarray,
                                                                                    np.ndarray]:
    """Labels, predictions and the country column: the first `correct` rows of each country are right."""
    labels, predicted, country = [], [], []
    for name, count in counts.items():
        for i in range(count):
            label = i % 2
            labels.append(label)
            predicted.append(label if i < correct_by_country[name] else 1 - label)
            country.append(name)
    return np.array(labels), np.array(predicted), np.array(country, dtype=object)


COUNTS = {"fr": 120, "de": 60, "us": 10}


def _runs(candidate_correct: dict[str, int], baseline_correct: dict[str, int] | None) -> Runs:
    labels, predicted, country = _answers(candidate_correct, COUNTS)
    age = np.where(np.arange(len(labels)) % 3 == 0, 25.0, 40.0)
    baseline = None
    if baseline_correct is not None:
        base_labels, base_predicted, _ = _answers(baseline_correct, COUNTS)
        baseline = ModelRun(Predictions(base_labels, base_predicted), 2, [])
    return Runs(ModelRun(Predictions(labels, predicted), 2, [1.0, 3.0]), baseline,
                {"country": country, "age": age}, len(labels), 0.5)


def by_slice(result: epb.EvaluationResult) -> dict[str, epb.SliceResult]:
    return {s.slice: s for s in result.slices}


def outcomes(result: epb.EvaluationResult, threshold: str) -> dict[str, int]:
    return {t.slice: t.outcome for t in result.thresholds if t.threshold == threshold}


def test_slices_and_absolute_thresholds() -> None:
    spec = parse_spec(SPEC)
    result = runner.evaluate(spec, _runs({"fr": 102, "de": 60, "us": 5}, None))
    slices = by_slice(result)
    assert list(slices)[:4] == ["overall", "country=de", "country=fr", "country=us"]
    assert {k: s.example_count for k, s in slices.items() if k.startswith("age")} == {"age<30": 64, "age>=30": 126}
    assert slices["country=fr, age<30"].example_count == 40 and slices["country=us, age>=30"].example_count == 6
    assert slices["overall"].metrics["accuracy"] == pytest.approx(167 / 190)
    assert slices["country=fr"].metrics["accuracy"] == pytest.approx(0.85)
    assert slices["country=de"].metrics["accuracy"] == 1.0
    assert list(slices["overall"].confusion_matrix.counts) == [84, 11, 12, 83]
    absolute = outcomes(result, "accuracy >= 0.9")
    assert absolute["overall"] == epb.THRESHOLD_OUTCOME_FAILED
    assert absolute["country=fr"] == epb.THRESHOLD_OUTCOME_FAILED
    assert absolute["country=de"] == epb.THRESHOLD_OUTCOME_PASSED
    assert absolute["country=us"] == epb.THRESHOLD_OUTCOME_SKIPPED  # 10 examples < min_examples 50
    # No baseline: the relative threshold is skipped, not failed.
    assert set(outcomes(result, "accuracy drop <= 0.01 vs baseline").values()) == {epb.THRESHOLD_OUTCOME_SKIPPED}
    assert result.passed is False
    failed = [t.message for t in runner.failures(result)]
    assert "accuracy >= 0.9 failed: accuracy 0.8500 < 0.9 on slice country=fr (120 examples)" in failed


def test_thresholds_against_the_baseline() -> None:
    spec = parse_spec(SPEC.replace("min: 0.9", "min: 0.5"))
    # The candidate loses 6 right answers in fr (0.95 -> 0.90) and gains one in us.
    result = runner.evaluate(spec, _runs({"fr": 108, "de": 60, "us": 6}, {"fr": 114, "de": 60, "us": 5}),
                             baseline="version 1 (production)")
    relative = outcomes(result, "accuracy drop <= 0.01 vs baseline")
    assert relative == {"overall": epb.THRESHOLD_OUTCOME_FAILED, "country=de": epb.THRESHOLD_OUTCOME_PASSED,
                        "country=fr": epb.THRESHOLD_OUTCOME_FAILED, "country=us": epb.THRESHOLD_OUTCOME_PASSED}
    fr = by_slice(result)["country=fr"]
    assert fr.baseline_metrics["accuracy"] == pytest.approx(0.95) and fr.metrics["accuracy"] == pytest.approx(0.9)
    message = next(t.message for t in result.thresholds if t.slice == "country=fr" and t.baseline_value)
    assert "0.9000 vs 0.9500 for the baseline version 1 (production) (change -0.0500, beyond the allowed drop of 0.01)" \
        in message
    assert result.passed is False
    # A looser bound passes everywhere.
    loose = parse_spec(SPEC.replace("min: 0.9", "min: 0.5").replace("max_decrease: 0.01", "max_decrease: 0.06"))
    assert runner.evaluate(loose, _runs({"fr": 108, "de": 60, "us": 6}, {"fr": 114, "de": 60, "us": 5}),
                           baseline="version 1").passed is True


def test_too_many_slices_and_unknown_features_are_refused() -> None:
    spec = parse_spec("name: s\ntask: classification\nslices: [country]\nmax_slices: 2\n")
    with pytest.raises(InvalidArgument, match="slicing by country gives 3 slices, more than max_slices 2"):
        runner.evaluate(spec, _runs({"fr": 1, "de": 1, "us": 1}, None))
    missing = parse_spec("name: s\ntask: classification\nslices: [city]\n")
    with pytest.raises(InvalidArgument, match="slice feature 'city' is not a column"):
        runner.evaluate(missing, _runs({"fr": 1, "de": 1, "us": 1}, None))
