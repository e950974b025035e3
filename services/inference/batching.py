"""Tensor merge and split for the dynamic batcher: pure numpy, no asyncio.

A request's inputs are `{name: array}` with the batch on dim 0. Requests are compatible (may be
concatenated) when their inputs agree on names, dtypes and every non-batch dimension: that is
the `key` of `rows_and_key`. `merge` concatenates compatible requests along dim 0; `split` cuts
the model's outputs back into one part per request, checking the model returned one row per
input row.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from services.common.errors import Internal, InvalidArgument


def rows_and_key(inputs: dict[str, np.ndarray], batching: bool) -> tuple[int, Hashable]:
    """The request's batch rows and its compatibility key (None without batching)."""
    if not inputs:
        raise InvalidArgument("request has no inputs")
    if not batching:
        return 1, None
    rows = -1
    key = []
    for name, array in inputs.items():
        if array.ndim == 0:
            raise InvalidArgument(f"input '{name}' has no batch dimension (shape [])")
        if rows < 0:
            rows = array.shape[0]
        elif array.shape[0] != rows:
            dims = {n: a.shape[0] for n, a in inputs.items()}
            raise InvalidArgument(f"inputs disagree on the batch dimension: {dims}")
        key.append((name, array.dtype.str, array.shape[1:]))
    if rows < 1:
        raise InvalidArgument("request batch size must be >= 1, got 0")
    key.sort()
    return rows, tuple(key)


def merge(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Compatible requests' inputs concatenated along dim 0 (a lone request passes untouched)."""
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def split(outputs: dict[str, np.ndarray], rows_per_request: Sequence[int], rows: int) -> list[dict[str, np.ndarray]]:
    """The batch's outputs cut into one dict per request, as views (no copy)."""
    if len(rows_per_request) == 1:
        return [outputs]
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise Internal(
                f"model returned output '{name}' with shape {list(array.shape)} for a batch of {rows} rows"
            )
    parts = []
    start = 0
    for count in rows_per_request:
        end = start + count
        parts.append({name: array[start:end] for name, array in outputs.items()})
        start = end
    return parts
