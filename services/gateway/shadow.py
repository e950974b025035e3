"""Shadow traffic: a sampled copy of a request goes to another version off the response path,
and its answer is compared with the live one (the difference is reported per version pair)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from services.gateway.limits import ELEMENT_BYTES

NUMPY_DTYPES = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


@dataclasses.dataclass(frozen=True)
class Comparison:
    max_abs_diff: float
    mismatched: bool
    reason: str = ""


def _output_arrays(response: Any) -> dict[str, tuple[str, tuple[int, ...], Any]]:
    found = {}
    raw = response.raw_output_contents
    for index, output in enumerate(response.outputs):
        data = raw[index] if index < len(raw) else b""
        found[output.name] = (output.datatype, tuple(output.shape), data)
    return found


def compare_responses(live: Any, shadow: Any, tolerance: float) -> Comparison:
    """Compare two ModelInferResponses output by output (numbers within `tolerance`, bytes exactly)."""
    live_outputs = _output_arrays(live)
    shadow_outputs = _output_arrays(shadow)
    if set(live_outputs) != set(shadow_outputs):
        return Comparison(float("inf"), True, "different outputs")
    worst = 0.0
    mismatched = False
    for name, (datatype, shape, data) in live_outputs.items():
        other_type, other_shape, other_data = shadow_outputs[name]
        if datatype != other_type or shape != other_shape:
            return Comparison(float("inf"), True, f"output {name!r} differs in datatype or shape")
        dtype = NUMPY_DTYPES.get(datatype)
        if dtype is None or datatype not in ELEMENT_BYTES:
            if data != other_data:
                mismatched = True
                worst = float("inf")
            continue
        a = np.frombuffer(data, dtype=dtype).astype(np.float64)
        b = np.frombuffer(other_data, dtype=dtype).astype(np.float64)
        if a.shape != b.shape:
            return Comparison(float("inf"), True, f"output {name!r} differs in size")
        if a.size:
            diff = float(np.max(np.abs(a - b)))
            if np.isnan(diff):
                diff = 0.0 if np.array_equal(a, b, equal_nan=True) else float("inf")
            worst = max(worst, diff)
            if not np.allclose(a, b, rtol=tolerance, atol=tolerance, equal_nan=True):
                mismatched = True
    return Comparison(worst, mismatched)
