"""Metric values against independent computations (plain numpy loops) on known data."""

from __future__ import annotations

import numpy as np
import pytest

from aiaas.eval import metrics
from aiaas.eval.metrics import Predictions
from aiaas.eval.spec import parse_spec

CLASSIFY = parse_spec("""
name: all
task: classification
metrics: [accuracy, top_2_accuracy, precision_macro, recall_macro, f1_macro, precision_micro, recall_micro,
          f1_micro, roc_auc, log_loss, ece, confusion_matrix, example_count]
ece_bins: 10
""")
REGRESS = parse_spec("name: reg\ntask: regression\nmetrics: [mse, mae, r2, example_count]\n")


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def three_classes() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, 400)
    logits = rng.normal(size=(400, 3)) + 1.5 * np.eye(3)[labels]  # informative, not perfect
    return labels, softmax(logits)


def by_hand_macro(y: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    precisions, recalls, f1s = [], [], []
    for c in sorted(set(y.tolist()) | set(p.tolist())):
        tp = int(np.sum((p == c) & (y == c)))
        fp = int(np.sum((p == c) & (y != c)))
        fn = int(np.sum((p != c) & (y == c)))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        precisions.append(precision)
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return float(np.mean(precisions)), float(np.mean(recalls)), float(np.mean(f1s))


def by_hand_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a positive outscores a negative (ties count half): the Mann-Whitney form."""
    pos, neg = scores[positive], scores[~positive]
    wins = sum(float(np.sum(s > neg)) + 0.5 * float(np.sum(s == neg)) for s in pos)
    return wins / (len(pos) * len(neg))


def by_hand_ece(y: np.ndarray, probs: np.ndarray, bins: int) -> float:
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        inside = (confidence > lo) & (confidence <= hi) if b else (confidence <= hi)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def test_classification_metrics_match_by_hand(three_classes: tuple[np.ndarray, np.ndarray]) -> None:
    y, probs = three_classes
    predicted = probs.argmax(axis=1)
    found = metrics.compute(CLASSIFY, Predictions(y, predicted, probs), 3)
    values = found.values
    accuracy = float(np.mean(predicted == y))
    assert 0.5 < accuracy < 0.95  # the data is neither trivial nor noise
    assert values["accuracy"] == pytest.approx(accuracy)
    precision, recall, f1 = by_hand_macro(y, predicted)
    assert (values["precision_macro"], values["recall_macro"], values["f1_macro"]) == pytest.approx(
        (precision, recall, f1))
    # Single-label micro averages all equal the accuracy.
    assert values["precision_micro"] == values["recall_micro"] == pytest.approx(accuracy)
    assert values["f1_micro"] == pytest.approx(accuracy)
    top2 = np.mean([y[i] in np.argsort(-probs[i])[:2] for i in range(len(y))])
    assert values["top_2_accuracy"] == pytest.approx(top2)
    assert values["log_loss"] == pytest.approx(-np.mean(np.log(probs[np.arange(len(y)), y])), rel=1e-6)
    auc = np.mean([by_hand_auc(y == c, probs[:, c]) for c in range(3)])
    assert values["roc_auc"] == pytest.approx(auc)
    assert values["ece"] == pytest.approx(by_hand_ece(y, probs, 10))
    assert values["example_count"] == 400
    expected = np.zeros((3, 3), int)
    for t, p in zip(y, predicted, strict=True):
        expected[t, p] += 1
    assert found.confusion is not None and (found.confusion == expected).all()


def test_binary_scores_and_undefined_metrics() -> None:
    y = np.array([0, 1, 1, 0, 1, 0, 1, 1])
    p1 = np.array([0.2, 0.9, 0.6, 0.4, 0.3, 0.1, 0.8, 0.7])
    probs = np.stack([1 - p1, p1], axis=1)
    values = metrics.compute(CLASSIFY, Predictions(y, probs.argmax(axis=1), probs), 2).values
    assert values["roc_auc"] == pytest.approx(by_hand_auc(y == 1, p1))
    assert values["top_2_accuracy"] == 1.0
    # One class present: ROC-AUC is undefined and left out rather than reported as a number.
    ones = np.ones(4, dtype=int)
    only = metrics.compute(CLASSIFY, Predictions(ones, ones, np.tile([0.3, 0.7], (4, 1))), 2).values
    assert "roc_auc" not in only and only["accuracy"] == 1.0


def test_regression_metrics_match_by_hand() -> None:
    rng = np.random.default_rng(3)
    y = rng.normal(size=200)
    predicted = y + rng.normal(scale=0.3, size=200)
    values = metrics.compute(REGRESS, Predictions(y, predicted), 0).values
    assert values["mse"] == pytest.approx(np.mean((y - predicted) ** 2))
    assert values["mae"] == pytest.approx(np.mean(np.abs(y - predicted)))
    r2 = 1 - np.sum((y - predicted) ** 2) / np.sum((y - y.mean()) ** 2)
    assert values["r2"] == pytest.approx(r2)
    assert "r2" not in metrics.compute(REGRESS, Predictions(y[:1], predicted[:1]), 0).values


def test_latency_percentiles() -> None:
    found = metrics.latency_metrics([float(v) for v in range(1, 101)])
    assert found["latency_ms_p50"] == pytest.approx(50.5)
    assert found["latency_ms_p99"] == pytest.approx(99.01)
