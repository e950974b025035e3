"""Cut the examples into slices: overall, by a feature's value, by a numeric feature's bucket, or by a
cross of two. Each slice is a key ("country=fr", "age=[18,30)", "country=fr, age=[18,30)") and the
rows it holds."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping

import numpy as np

from aiaas.errors import InvalidArgument
from aiaas.eval.spec import OVERALL, SliceFeature, Slicing


@dataclasses.dataclass(frozen=True)
class Slice:
    key: str
    slicing: str
    rows: np.ndarray


def _text(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "null"
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):g}"
    return str(value)


def _bound(value: float) -> str:
    return f"{value:g}"


def _codes(feature: SliceFeature, values: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(label of each distinct slice, in order; each row's index into them)."""
    name = feature.feature
    if feature.buckets:
        if values.dtype.kind not in "iuf":
            raise InvalidArgument(f"slice feature {name!r} has buckets but holds {values.dtype} values, "
                                  "not numbers")
        numbers = values.astype(np.float64)
        edges = feature.buckets
        labels = [f"{name}<{_bound(edges[0])}"]
        labels += [f"{name}=[{_bound(lo)},{_bound(hi)})" for lo, hi in itertools.pairwise(edges)]
        labels.append(f"{name}>={_bound(edges[-1])}")
        index = np.searchsorted(np.asarray(edges), numbers, side="right")
        missing = np.isnan(numbers)
        if missing.any():
            labels.append(f"{name}=null")
            index = np.where(missing, len(labels) - 1, index)
        return labels, index
    if values.dtype.kind in "iub":
        distinct, index = np.unique(values, return_inverse=True)
        return [f"{name}={_text(v.item())}" for v in distinct], index
    try:
        distinct, index = np.unique(values, return_inverse=True)
    except TypeError:  # values that do not compare (strings and nulls): compare their texts
        distinct, index = np.unique(np.array([_text(v) for v in values], dtype=object), return_inverse=True)
    labels = [f"{name}={_text(v)}" for v in distinct]
    if len(set(labels)) != len(labels):  # b"fr" and "fr" are one slice
        return _codes_by_text(name, labels, index)
    return labels, index


def _codes_by_text(name: str, labels: list[str], index: np.ndarray) -> tuple[list[str], np.ndarray]:
    merged = sorted(set(labels))
    position = np.array([merged.index(label) for label in labels])
    return merged, position[index]


def slices(slicing: Slicing, features: Mapping[str, np.ndarray], count: int, max_slices: int) -> list[Slice]:
    """The non-empty slices of one slicing, in value (or bucket) order."""
    if not slicing.features:
        return [Slice(OVERALL, OVERALL, np.arange(count))]
    parts = []
    for feature in slicing.features:
        values = features.get(feature.feature)
        if values is None:
            raise InvalidArgument(f"slice feature {feature.feature!r} is not a column of the data set "
                                  f"(slicing features: {', '.join(sorted(features)) or 'none'})")
        if values.ndim != 1:
            raise InvalidArgument(f"slice feature {feature.feature!r} holds {values.shape[1:]} values per row; "
                                  "slice by a column with one value per row")
        parts.append(_codes(feature, values))
    if len(parts) == 1:
        labels, code = parts[0]
    else:
        (labels_a, code_a), (labels_b, code_b) = parts
        code = code_a * len(labels_b) + code_b
        labels = [f"{a}, {b}" for a in labels_a for b in labels_b]
    used, index = np.unique(code, return_inverse=True)
    if len(used) > max_slices:
        raise InvalidArgument(f"slicing by {slicing.name} gives {len(used)} slices, more than max_slices "
                              f"{max_slices}: bucket the feature, or raise max_slices in the spec")
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(len(used) + 1))
    return [Slice(labels[int(c)], slicing.name, np.sort(order[bounds[i]:bounds[i + 1]])) for i, c in enumerate(used)]
