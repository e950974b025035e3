"""The evaluation spec: what to measure, on which slices, and what must hold (TFMA's EvalConfig, in YAML).

    name: holdout                    # results are stored on the version under this name
    task: classification             # or regression
    label: label                     # label column (default: the data set's only one)
    output: logits                   # model output scored (default: the first)
    scores: logits                   # logits (softmax; one column: sigmoid) | probabilities | class
    metrics: [accuracy, top_5_accuracy, f1_macro, roc_auc, log_loss, ece, confusion_matrix, latency]
    slices:
      - overall
      - feature: country                       # one slice per value
      - feature: age
        buckets: [18, 30, 50]                  # (-inf,18) [18,30) [30,50) [50,inf)
      - cross: [country, {feature: age, buckets: [30]}]
    thresholds:
      - {metric: accuracy, min: 0.9, min_examples: 50}           # on every slice with >= 50 examples
      - {metric: accuracy, max_decrease: 0.01, slices: [overall]}  # vs the baseline version
    baseline: production             # default baseline of relative thresholds (--baseline wins)

Parsing refuses unknown keys and metrics with InvalidArgument naming where they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from aiaas.errors import InvalidArgument

CLASSIFICATION = "classification"
REGRESSION = "regression"
TASKS = (CLASSIFICATION, REGRESSION)
SCORE_KINDS = ("logits", "probabilities", "class")
TOP_K = re.compile(r"top_(\d+)_accuracy")
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")

# Metrics a spec may ask for, by task; "latency" adds latency_ms_p50/_p95/_p99 to the overall slice.
CLASSIFICATION_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_micro",
                          "recall_micro", "f1_micro", "roc_auc", "log_loss", "ece", "confusion_matrix",
                          "example_count", "latency")
REGRESSION_METRICS = ("mse", "mae", "r2", "example_count", "latency")
# These read class scores, not only the predicted class.
SCORE_METRICS = frozenset({"roc_auc", "log_loss", "ece"})
LATENCY_METRICS = ("latency_ms_p50", "latency_ms_p95", "latency_ms_p99")
DEFAULT_METRICS = {
    CLASSIFICATION: ("accuracy", "f1_macro", "example_count"),
    REGRESSION: ("mse", "mae", "r2", "example_count"),
}
OVERALL = "overall"


@dataclasses.dataclass(frozen=True)
class SliceFeature:
    """A feature a slice is cut by: its value, or the bucket between sorted boundaries it falls in."""

    feature: str
    buckets: tuple[float, ...] = ()

    @property
    def label(self) -> str:
        return self.feature


@dataclasses.dataclass(frozen=True)
class Slicing:
    """One way to cut the data set: no feature (overall), one feature, or a cross of two."""

    features: tuple[SliceFeature, ...] = ()

    @property
    def name(self) -> str:
        return " x ".join(f.label for f in self.features) or OVERALL


@dataclasses.dataclass(frozen=True)
class Threshold:
    """A bound on a metric: absolute (`min` / `max`) or relative to the baseline (`max_decrease` /
    `max_increase`), on the slices of `slicings` (None: all) holding at least `min_examples`."""

    metric: str
    min: float | None = None
    max: float | None = None
    max_decrease: float | None = None
    max_increase: float | None = None
    min_examples: int = 1
    slicings: tuple[str, ...] | None = None

    @property
    def relative(self) -> bool:
        return self.max_decrease is not None or self.max_increase is not None

    def describe(self) -> str:
        if self.min is not None:
            return f"{self.metric} >= {self.min:g}"
        if self.max is not None:
            return f"{self.metric} <= {self.max:g}"
        if self.max_decrease is not None:
            return f"{self.metric} drop <= {self.max_decrease:g} vs baseline"
        return f"{self.metric} rise <= {self.max_increase:g} vs baseline"

    def applies_to(self, slicing: str) -> bool:
        return self.slicings is None or slicing in self.slicings


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    name: str
    task: str
    text: str
    label: str | None = None
    output: str | None = None
    scores: str = "logits"
    num_classes: int | None = None
    class_names: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    ece_bins: int = 15
    slicings: tuple[Slicing, ...] = (Slicing(),)
    thresholds: tuple[Threshold, ...] = ()
    baseline: str | None = None
    batch_size: int = 256
    max_slices: int = 100

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def wants(self, metric: str) -> bool:
        return metric in self.metrics

    @property
    def top_k(self) -> tuple[int, ...]:
        return tuple(int(m[4:-9]) for m in self.metrics if TOP_K.fullmatch(m))

    @property
    def needs_scores(self) -> bool:
        return bool(self.top_k) or any(m in SCORE_METRICS for m in self.metrics)

    def metric_names(self) -> set[str]:
        """The scalar metric names results may hold (what thresholds may name)."""
        names = {m for m in self.metrics if m not in ("confusion_matrix", "latency")}
        if "latency" in self.metrics:
            names.update(LATENCY_METRICS)
        return names


class _Fields:
    """A YAML mapping read key by key; `done` refuses keys nobody asked for."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise InvalidArgument(f"{where}: expected a mapping, got {type(data).__name__}")
        self.data = dict(data)
        self.where = where
        self.read: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.read.add(key)
        value = self.data.get(key, default)
        if value is None or value is default:
            return value
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise InvalidArgument(f"{self.where}: {key} must be {_kind_name(kind)}, got {value!r}")
        if not isinstance(value, kind):
            raise InvalidArgument(f"{self.where}: {key} must be {_kind_name(kind)}, got {value!r}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            raise InvalidArgument(f"{self.where}: unknown key(s) {', '.join(map(str, unknown))}; "
                                  f"known: {', '.join(sorted(self.read))}")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if set(kinds) == {int, float}:
        return "a number"
    names = {int: "a whole number", float: "a number", str: "a string", list: "a list", bool: "true or false",
             dict: "a mapping"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _slice_feature(item: Any, where: str) -> SliceFeature:
    if isinstance(item, str) and item:
        return SliceFeature(item)
    fields = _Fields(item, where)
    feature = fields.get("feature", str)
    if not feature:
        raise InvalidArgument(f"{where}: feature is required")
    raw = fields.get("buckets", list, [])
    fields.done()
    buckets = tuple(_number(b, f"{where}.buckets[{i}]") for i, b in enumerate(raw))
    if list(buckets) != sorted(set(buckets)):
        raise InvalidArgument(f"{where}: buckets must be increasing boundaries, got {list(raw)}")
    return SliceFeature(feature, buckets)


def _slicing(item: Any, where: str) -> Slicing:
    if item == OVERALL:
        return Slicing()
    if isinstance(item, Mapping) and "cross" in item:
        fields = _Fields(item, where)
        cross = fields.get("cross", list)
        fields.done()
        if len(cross) != 2:
            raise InvalidArgument(f"{where}: cross takes exactly two features, got {len(cross)}")
        features = tuple(_slice_feature(f, f"{where}.cross[{i}]") for i, f in enumerate(cross))
        if features[0].feature == features[1].feature:
            raise InvalidArgument(f"{where}: cross needs two different features")
        return Slicing(features)
    if isinstance(item, str) and item.strip() and " " not in item.strip():
        return Slicing((SliceFeature(item),))
    return Slicing((_slice_feature(item, where),))


def _threshold(item: Any, where: str, slicing_names: set[str]) -> Threshold:
    fields = _Fields(item, where)
    metric = fields.get("metric", str)
    if not metric:
        raise InvalidArgument(f"{where}: metric is required")
    bounds = {key: fields.get(key, (int, float)) for key in ("min", "max", "max_decrease", "max_increase")}
    given = {k: _number(v, f"{where}.{k}") for k, v in bounds.items() if v is not None}
    if len(given) != 1:
        raise InvalidArgument(f"{where}: give exactly one of min, max (absolute) or max_decrease, max_increase "
                              f"(vs the baseline), got {sorted(given) or 'none'}")
    for key in ("max_decrease", "max_increase"):
        if key in given and given[key] < 0:
            raise InvalidArgument(f"{where}: {key} must be >= 0, got {given[key]:g}")
    min_examples = fields.get("min_examples", int, 1)
    if min_examples < 1:
        raise InvalidArgument(f"{where}: min_examples must be at least 1, got {min_examples}")
    slices = fields.get("slices", (list, str))
    fields.done()
    chosen: tuple[str, ...] | None = None
    if slices is not None and slices != "all":
        chosen = (slices,) if isinstance(slices, str) else tuple(str(s) for s in slices)
        unknown = [s for s in chosen if s not in slicing_names]
        if unknown:
            raise InvalidArgument(f"{where}: slices {unknown} are not slicings of this spec; it has "
                                  f"{', '.join(sorted(slicing_names))} (or 'all')")
    return Threshold(metric, min_examples=min_examples, slicings=chosen, **given)


def _metrics(raw: list[Any], task: str) -> tuple[str, ...]:
    known = CLASSIFICATION_METRICS if task == CLASSIFICATION else REGRESSION_METRICS
    out: list[str] = []
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            raise InvalidArgument(f"spec metrics[{i}]: expected a metric name, got {item!r}")
        match = TOP_K.fullmatch(item)
        if task == CLASSIFICATION and match and int(match.group(1)) >= 1 or item in known:
            out.append(item)
        else:
            extra = ", top_<k>_accuracy" if task == CLASSIFICATION else ""
            raise InvalidArgument(f"spec metrics[{i}]: unknown {task} metric {item!r}; use {', '.join(known)}{extra}")
    return tuple(dict.fromkeys(out))


def parse_spec(text: str, source: str = "spec") -> EvalSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{source} is not valid YAML: {str(exc).splitlines()[0]}") from None
    fields = _Fields(data, source)
    name = fields.get("name", str)
    if not name or not NAME.fullmatch(name):
        raise InvalidArgument(f"{source}: name {name!r} is required: 1 to 63 characters from a-z, 0-9, '.', '_', "
                              "'-' (results are stored on the version under it)")
    task = fields.get("task", str)
    if task not in TASKS:
        raise InvalidArgument(f"{source}: task must be {' or '.join(TASKS)}, got {task!r}")
    scores = fields.get("scores", str, "logits")
    if scores not in SCORE_KINDS:
        raise InvalidArgument(f"{source}: scores must be one of {', '.join(SCORE_KINDS)}, got {scores!r}")
    metrics = _metrics(fields.get("metrics", list) or list(DEFAULT_METRICS[task]), task)
    slicings = tuple(_slicing(s, f"{source}.slices[{i}]") for i, s in enumerate(fields.get("slices", list) or
                                                                                   [OVERALL]))
    if slicings[0].features:
        slicings = (Slicing(), *slicings)
    names = [s.name for s in slicings]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"{source}: slices repeat a slicing ({', '.join(names)})")
    thresholds = tuple(_threshold(t, f"{source}.thresholds[{i}]", set(names))
                       for i, t in enumerate(fields.get("thresholds", list) or []))
    num_classes = fields.get("num_classes", int)
    if num_classes is not None and num_classes < 2:
        raise InvalidArgument(f"{source}: num_classes must be at least 2, got {num_classes}")
    class_names = tuple(str(c) for c in fields.get("class_names", list) or [])
    if class_names and num_classes is not None and len(class_names) != num_classes:
        raise InvalidArgument(f"{source}: {len(class_names)} class_names for num_classes {num_classes}")
    spec = EvalSpec(
        name=name, task=task, text=text, label=fields.get("label", str), output=fields.get("output", str),
        scores=scores, num_classes=num_classes, class_names=class_names, metrics=metrics,
        ece_bins=_positive(fields.get("ece_bins", int, 15), "ece_bins", source),
        slicings=slicings, thresholds=thresholds, baseline=_baseline(fields.get("baseline", (str, int))),
        batch_size=_positive(fields.get("batch_size", int, 256), "batch_size", source),
        max_slices=_positive(fields.get("max_slices", int, 100), "max_slices", source),
    )
    fields.done()
    _check_consistency(spec, source)
    return spec


def _positive(value: int, key: str, source: str) -> int:
    if value < 1:
        raise InvalidArgument(f"{source}: {key} must be at least 1, got {value}")
    return value


def _baseline(value: str | int | None) -> str | None:
    return None if value is None else str(value)


def _check_consistency(spec: EvalSpec, source: str) -> None:
    if spec.task == CLASSIFICATION and spec.scores == "class" and spec.needs_scores:
        wanting = [m for m in spec.metrics if m in SCORE_METRICS or TOP_K.fullmatch(m)]
        raise InvalidArgument(f"{source}: {', '.join(wanting)} need class scores; with scores: class the model "
                              "gives only the predicted class")
    available = spec.metric_names()
    for i, threshold in enumerate(spec.thresholds):
        if threshold.metric not in available:
            raise InvalidArgument(f"{source}.thresholds[{i}]: metric {threshold.metric!r} is not computed by this "
                                  f"spec; add it to metrics (computed: {', '.join(sorted(available))})")


def load_spec(path: str | Path) -> EvalSpec:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidArgument(f"cannot read spec {path}: {exc.strerror or exc}") from None
    return parse_spec(text, str(path))
