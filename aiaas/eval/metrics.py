"""Metric values of one slice, computed by scikit-learn (no metric math by hand).

Classification metrics read the labels, the predicted classes and (for ROC-AUC, log loss, ECE and
top-k) the class probabilities; regression metrics the labels and predicted values. A metric that
is undefined on a slice (ROC-AUC with one class present, R² on one example) is left out, and a
threshold on it fails as undefined.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from aiaas.eval.spec import CLASSIFICATION, EvalSpec


@dataclasses.dataclass(frozen=True)
class Predictions:
    """Everything the metrics need about some examples (all of them, or one slice's)."""

    labels: np.ndarray
    predicted: np.ndarray
    probabilities: np.ndarray | None = None

    def subset(self, rows: np.ndarray) -> Predictions:
        probs = None if self.probabilities is None else self.probabilities[rows]
        return Predictions(self.labels[rows], self.predicted[rows], probs)

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class SliceMetrics:
    values: dict[str, float]
    confusion: np.ndarray | None = None


def compute(spec: EvalSpec, data: Predictions, num_classes: int) -> SliceMetrics:
    """The spec's metrics on these examples."""
    with warnings.catch_warnings():
        # Undefined values (one class, one example) come back as NaN and are left out below.
        warnings.simplefilter("ignore")
        if spec.task == CLASSIFICATION:
            values, confusion = _classification(spec, data, num_classes)
        else:
            values, confusion = _regression(spec, data), None
    if spec.wants("example_count"):
        values["example_count"] = float(len(data))
    return SliceMetrics({k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}, confusion)


def _classification(spec: EvalSpec, data: Predictions, num_classes: int) -> tuple[dict[str, float | None],
                                                                                 np.ndarray | None]:
    from sklearn import metrics as skm

    y, predicted, probs = data.labels, data.predicted, data.probabilities
    classes = list(range(num_classes))
    values: dict[str, float | None] = {}
    if not len(y):
        return values, np.zeros((num_classes, num_classes), np.int64) if spec.wants("confusion_matrix") else None
    if spec.wants("accuracy"):
        values["accuracy"] = skm.accuracy_score(y, predicted)
    for average in ("macro", "micro"):
        if any(spec.wants(f"{m}_{average}") for m in ("precision", "recall", "f1")):
            # Over the classes present in the slice (labels or predictions), as scikit-learn defaults to.
            precision, recall, f1, _ = skm.precision_recall_fscore_support(y, predicted, average=average,
                                                                            zero_division=0)
            values.update({f"precision_{average}": precision, f"recall_{average}": recall, f"f1_{average}": f1})
    if probs is not None:
        values.update(_score_metrics(spec, y, probs, classes))
    confusion = skm.confusion_matrix(y, predicted, labels=classes) if spec.wants("confusion_matrix") else None
    return {k: v for k, v in values.items() if spec.wants(k) or k.startswith("top_")}, confusion


def _score_metrics(spec: EvalSpec, y: np.ndarray, probs: np.ndarray, classes: list[int]) -> dict[str, float | None]:
    from sklearn import metrics as skm

    values: dict[str, float | None] = {}
    for k in spec.top_k:
        if k >= len(classes):
            values[f"top_{k}_accuracy"] = 1.0
        elif len(classes) == 2:  # k == 1: scikit-learn scores binary top-k on one column
            values[f"top_{k}_accuracy"] = skm.accuracy_score(y, probs.argmax(axis=1))
        else:
            values[f"top_{k}_accuracy"] = skm.top_k_accuracy_score(y, probs, k=k, labels=classes)
    if spec.wants("roc_auc"):
        values["roc_auc"] = roc_auc(y, probs)
    if spec.wants("log_loss"):
        values["log_loss"] = skm.log_loss(y, probs, labels=classes)
    if spec.wants("ece"):
        values["ece"] = expected_calibration_error(y, probs, spec.ece_bins)
    return values


def roc_auc(y: np.ndarray, probs: np.ndarray) -> float | None:
    """Binary ROC-AUC, or the one-vs-rest macro average over the classes present in the slice."""
    from sklearn import metrics as skm

    present = np.unique(y)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return float(skm.roc_auc_score(y, probs[:, 1]))
    return float(np.mean([skm.roc_auc_score(y == c, probs[:, c]) for c in present]))


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, bins: int) -> float:
    """Top-label ECE: scikit-learn's calibration curve of "the predicted class is right" against the
    predicted class's probability, its bins weighted by how many examples they hold."""
    from sklearn.calibration import calibration_curve

    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.int64)
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=bins, strategy="uniform", pos_label=1)
    # The curve leaves empty bins out; count the examples of the others, binned as it bins them.
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=bins)
    weights = counts[counts > 0] / len(y)
    return float(np.sum(weights * np.abs(accuracy - mean_confidence)))


def _regression(spec: EvalSpec, data: Predictions) -> dict[str, float | None]:
    from sklearn import metrics as skm

    y, predicted = data.labels.astype(np.float64), data.predicted.astype(np.float64)
    values: dict[str, float | None] = {}
    if not len(y):
        return values
    if spec.wants("mse"):
        values["mse"] = skm.mean_squared_error(y, predicted)
    if spec.wants("mae"):
        values["mae"] = skm.mean_absolute_error(y, predicted)
    if spec.wants("r2"):
        values["r2"] = skm.r2_score(y, predicted) if len(y) > 1 else None
    return values


def latency_metrics(batch_latencies_ms: list[float]) -> dict[str, float]:
    if not batch_latencies_ms:
        return {}
    p50, p95, p99 = np.percentile(np.asarray(batch_latencies_ms), [50, 95, 99])
    return {"latency_ms_p50": float(p50), "latency_ms_p95": float(p95), "latency_ms_p99": float(p99)}
