"""Run a version (and its baseline) over a data set once, batch by batch, then measure every slice.

Only what the metrics need is kept per example (label, predicted class or value, class
probabilities, slicing features): model inputs live one batch at a time, so memory grows with
rows x classes, not with the size of the inputs. The serving path keeps several batches in flight.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from aiaas.errors import InvalidArgument
from aiaas.eval import metrics, slicing, thresholds
from aiaas.eval.metrics import Predictions
from aiaas.eval.predictors import Predictor
from aiaas.eval.reader import Batch, DatasetReader
from aiaas.eval.spec import CLASSIFICATION, OVERALL, EvalSpec
from aiaas.registry.v1 import evaluation_pb2 as epb

# (rows done, rows in all, seconds since the start)
Progress = Callable[[int, int, float], None]
# Per-slice confusion matrices are kept up to this many classes (the overall one up to MAX_CONFUSION_CLASSES).
SLICE_CONFUSION_CLASSES = 32
MAX_CONFUSION_CLASSES = 200


@dataclasses.dataclass
class ModelRun:
    """One version's answers on every example."""

    predictions: Predictions
    num_classes: int
    latencies_ms: list[float]


class Filled:
    """An array filled batch by batch in place: sized once for the rows the data set announces (no
    list of chunks concatenated at the end, which would hold everything twice); grows if more come."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 1)
        self.data: np.ndarray | None = None
        self.size = 0

    def add(self, values: np.ndarray) -> None:
        if self.data is None:
            self.data = np.empty((self.capacity, *values.shape[1:]), values.dtype)
        if values.dtype != self.data.dtype and np.result_type(self.data.dtype, values.dtype) != self.data.dtype:
            self.data = self.data.astype(np.result_type(self.data.dtype, values.dtype))  # e.g. ints, then a null
        end = self.size + len(values)
        if end > len(self.data):
            grown = np.empty((max(2 * len(self.data), end), *self.data.shape[1:]), self.data.dtype)
            grown[:self.size] = self.data[:self.size]
            self.data = grown
        self.data[self.size:end] = values
        self.size = end

    def array(self) -> np.ndarray:
        return self.data[:self.size] if self.data is not None else np.empty(0)


class _Answers:
    def __init__(self, rows: int) -> None:
        self.labels = Filled(rows)
        self.predicted = Filled(rows)
        self.probabilities = Filled(rows)
        self.latencies_ms: list[float] = []


def _interned(values: np.ndarray, pool: dict[object, object]) -> np.ndarray:
    """Strings as references to one object per distinct value: 8 bytes a row, not a string each."""
    if values.dtype != object:
        return values
    return np.array([None if v is None else pool.setdefault(v, v) for v in values], dtype=object)


class Scorer:
    """Turns a model's output tensor and the label column into predictions, as the spec reads them."""

    def __init__(self, spec: EvalSpec, output: str, label: str) -> None:
        self.spec = spec
        self.output = output
        self.label = label
        self.class_index = {name: i for i, name in enumerate(spec.class_names)}

    def labels(self, values: np.ndarray) -> np.ndarray:
        if self.spec.task != CLASSIFICATION:
            if values.dtype.kind not in "iuf":
                raise InvalidArgument(f"label column {self.label!r} must hold numbers for regression, "
                                      f"got {values.dtype}")
            return values.astype(np.float64)
        if values.dtype.kind in "OSU":
            if not self.class_index:
                raise InvalidArgument(f"label column {self.label!r} holds strings: give class_names in the spec "
                                      "(in class index order) to map them")
            texts = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
            unknown = sorted({t for t in texts if t not in self.class_index})
            if unknown:
                raise InvalidArgument(f"label column {self.label!r} holds {unknown[:5]}, not in class_names")
            return np.array([self.class_index[t] for t in texts], dtype=np.int32)
        if values.dtype.kind == "f" and not np.all(np.mod(values, 1) == 0):
            raise InvalidArgument(f"label column {self.label!r} holds non-integer values for classification")
        if values.size and (values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max):
            raise InvalidArgument(f"label column {self.label!r} holds class ids beyond 32 bits")
        return values.astype(np.int32)

    def predictions(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(predicted class or value per example, class probabilities or None)."""
        rows = raw.shape[0] if raw.ndim else 1
        table = raw.reshape(rows, -1)
        if self.spec.task != CLASSIFICATION:
            if table.shape[1] != 1:
                raise InvalidArgument(f"regression needs one value per example; output {self.output!r} gives "
                                      f"{table.shape[1]}")
            return table[:, 0].astype(np.float64), None
        if self.spec.scores == "class":
            return _class_ids(table, self.output), None
        from scipy.special import expit, softmax

        scores = table.astype(np.float64)
        if scores.shape[1] == 1:
            positive = expit(scores[:, 0]) if self.spec.scores == "logits" else scores[:, 0]
            probs = np.stack([1.0 - positive, positive], axis=1)
        else:
            probs = softmax(scores, axis=1) if self.spec.scores == "logits" else scores
        return probs.argmax(axis=1).astype(np.int32), probs.astype(np.float32)


def _class_ids(table: np.ndarray, output: str) -> np.ndarray:
    if table.shape[1] != 1:
        raise InvalidArgument(f"scores: class needs one class index per example; output {output!r} gives "
                              f"{table.shape[1]} values (use scores: logits or probabilities)")
    values = table[:, 0]
    if values.dtype.kind == "f" and not np.all(np.mod(values, 1) == 0):
        raise InvalidArgument(f"output {output!r} gives non-integer class indices")
    return values.astype(np.int32)


def _in_order(batches: Iterator[Batch], predictors: Sequence[Predictor]) -> Iterator[tuple[Batch, list[
        dict[str, np.ndarray]], float]]:
    """Each batch with every predictor's outputs and the first one's latency, in data set order; up to the
    first predictor's `concurrency` batches in flight."""
    window = max(p.concurrency for p in predictors)

    def call(batch: Batch) -> tuple[list[dict[str, np.ndarray]], float]:
        started = time.perf_counter()
        first = predictors[0].predict(batch.inputs)
        latency = (time.perf_counter() - started) * 1000.0
        return [first, *(p.predict(batch.inputs) for p in predictors[1:])], latency

    pending: collections.deque[tuple[Batch, concurrent.futures.Future[tuple[list[dict[str, np.ndarray]],
                                                                            float]]]] = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(max_workers=window, thread_name_prefix="aiaas-eval") as pool:
        try:
            for batch in batches:
                pending.append((batch, pool.submit(call, batch)))
                while len(pending) >= window:
                    done, future = pending.popleft()
                    yield done, *future.result()
            while pending:
                done, future = pending.popleft()
                yield done, *future.result()
        finally:
            for _, future in pending:
                future.cancel()


@dataclasses.dataclass
class Runs:
    candidate: ModelRun
    baseline: ModelRun | None
    features: dict[str, np.ndarray]
    rows: int
    duration_s: float


def run(spec: EvalSpec, reader: DatasetReader, scorer: Scorer, predictors: Sequence[Predictor], *,
        batch_rows: int, total_rows: int, progress: Progress | None = None) -> Runs:
    """Every example through each predictor (the candidate first, then the baseline if any)."""
    answers = [_Answers(total_rows) for _ in predictors]
    features = {c.name: Filled(total_rows) for c in reader.fit.features}
    pools: dict[str, dict[object, object]] = {name: {} for name in features}
    started = time.perf_counter()
    rows = 0
    for batch, outputs, latency in _in_order(reader.batches(batch_rows), predictors):
        labels = scorer.labels(batch.labels[scorer.label])
        for answer, output in zip(answers, outputs, strict=True):
            if scorer.output not in output:
                raise InvalidArgument(f"the model returned no output {scorer.output!r}")
            predicted, probs = scorer.predictions(output[scorer.output])
            if len(predicted) != batch.rows:
                raise InvalidArgument(f"output {scorer.output!r} has {len(predicted)} rows for a batch of "
                                      f"{batch.rows} examples")
            answer.labels.add(labels)
            answer.predicted.add(predicted)
            if probs is not None:
                answer.probabilities.add(probs)
        answers[0].latencies_ms.append(latency)
        for name, values in batch.features.items():
            features[name].add(_interned(values, pools[name]))
        rows += batch.rows
        if progress is not None:
            progress(rows, total_rows, time.perf_counter() - started)
    duration = time.perf_counter() - started
    model_runs = [_model_run(spec, a) for a in answers]
    joined = {name: found.array() for name, found in features.items()}
    return Runs(model_runs[0], model_runs[1] if len(model_runs) > 1 else None, joined, rows, duration)


def _model_run(spec: EvalSpec, answers: _Answers) -> ModelRun:
    labels, predicted = answers.labels.array(), answers.predicted.array()
    probs = answers.probabilities.array() if answers.probabilities.size else None
    num_classes = 0
    if spec.task == CLASSIFICATION:
        num_classes = _num_classes(spec, labels, predicted, probs)
    return ModelRun(Predictions(labels, predicted, probs), num_classes, answers.latencies_ms)


def _num_classes(spec: EvalSpec, labels: np.ndarray, predicted: np.ndarray, probs: np.ndarray | None) -> int:
    width = probs.shape[1] if probs is not None else 0
    if spec.num_classes is not None and width and width != spec.num_classes:
        raise InvalidArgument(f"the spec says num_classes {spec.num_classes}, the model scores {width} classes")
    count = spec.num_classes or width or len(spec.class_names) or int(max(labels.max(initial=0),
                                                                         predicted.max(initial=0)) + 1)
    bad = labels[(labels < 0) | (labels >= count)]
    if len(bad):
        raise InvalidArgument(f"label {int(bad[0])} is not a class of the model (0..{count - 1})")
    return max(count, 2)


def _confusion(matrix: np.ndarray, class_names: Sequence[str]) -> epb.ConfusionMatrix:
    count = matrix.shape[0]
    names = list(class_names) if len(class_names) == count else [str(i) for i in range(count)]
    return epb.ConfusionMatrix(labels=names, counts=[int(v) for v in matrix.reshape(-1)])


def measure(spec: EvalSpec, runs: Runs) -> list[epb.SliceResult]:
    """Every slice of every slicing, with its metrics (and the baseline's)."""
    out = []
    candidate, baseline = runs.candidate, runs.baseline
    classes = max(candidate.num_classes, baseline.num_classes if baseline else 0)
    for cut in spec.slicings:
        for found in slicing.slices(cut, runs.features, runs.rows, spec.max_slices):
            result = epb.SliceResult(slice=found.key, slicing=found.slicing, example_count=len(found.rows))
            whole = found.key == OVERALL  # every row: no copy
            values = metrics.compute(spec, candidate.predictions if whole else candidate.predictions.subset(found.rows),
                                     classes)
            result.metrics.update(values.values)
            limit = MAX_CONFUSION_CLASSES if found.key == OVERALL else SLICE_CONFUSION_CLASSES
            if values.confusion is not None and classes <= limit:
                result.confusion_matrix.CopyFrom(_confusion(values.confusion, spec.class_names))
            if baseline is not None:
                base = baseline.predictions if whole else baseline.predictions.subset(found.rows)
                result.baseline_metrics.update(metrics.compute(spec, base, classes).values)
            if found.key == OVERALL and spec.wants("latency"):
                result.metrics.update(metrics.latency_metrics(candidate.latencies_ms))
            out.append(result)
    return out


def evaluate(spec: EvalSpec, runs: Runs, *, baseline: str = "") -> epb.EvaluationResult:
    """The result of a run: slices, thresholds checked (against `baseline`, described for people), passed."""
    slices = measure(spec, runs)
    checked = thresholds.check(spec, slices, baseline=baseline if runs.baseline is not None else "")
    return epb.EvaluationResult(
        name=spec.name, spec_yaml=spec.text, spec_sha256=spec.sha256, task=spec.task, slices=slices,
        thresholds=checked, passed=all(t.outcome != thresholds.FAILED for t in checked),
        duration_s=runs.duration_s, rows_per_s=runs.rows / runs.duration_s if runs.duration_s > 0 else 0.0,
    )


def failures(result: epb.EvaluationResult) -> list[epb.ThresholdResult]:
    return [t for t in result.thresholds if t.outcome == thresholds.FAILED]
