"""Shadow traffic: a copy of a request goes to another version off the response path, and its
answer is compared with the live one (the difference is reported per version pair).

`ShadowMirror` owns the copies in flight (bounded: beyond `max_concurrency` copies are dropped
and counted), their comparison (off the loop for large answers), per-pair statistics and metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from opentelemetry import metrics
from tritonclient.grpc import service_pb2 as pb

from services.common.errors import AiaasError
from services.common.reporting import TelemetryReporter
from services.gateway.limits import ELEMENT_BYTES
from services.gateway.wire import response_version, retarget

if TYPE_CHECKING:
    from services.gateway.router import Resolution, ShadowCopy

log = logging.getLogger("aiaas.gateway.shadow")

# Answers larger than this (live + shadow) are compared in a thread.
INLINE_COMPARE_BYTES = 256 * 1024

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


@dataclasses.dataclass
class ShadowStats:
    compared: int = 0
    mismatched: int = 0
    max_abs_diff: float = 0.0


Call = Callable[..., Awaitable[bytes]]


class ShadowMirror:
    def __init__(self, call: Call, reporter: TelemetryReporter | None, *, max_concurrency: int,
                 tolerance: float, timeout_s: float) -> None:
        self._call = call
        self.reporter = reporter
        self.max_concurrency = max_concurrency
        self.tolerance = tolerance
        self.timeout_s = timeout_s
        self.stats: dict[tuple[str, int, int], ShadowStats] = {}
        self.dropped = 0
        self._tasks: set[asyncio.Task[None]] = set()
        meter = metrics.get_meter("aiaas.gateway")
        self._diff = meter.create_histogram(
            "gateway.shadow.max_abs_diff", description="Largest output difference, shadow vs live"
        )
        self._mismatch = meter.create_counter(
            "gateway.shadow.mismatches", description="Shadow answers that differ from the live one"
        )

    def mirror(self, raw: bytes, resolution: Resolution, live: bytes) -> None:
        for copy in resolution.shadows:
            if len(self._tasks) >= self.max_concurrency:
                self.dropped += 1
                continue
            task = asyncio.get_running_loop().create_task(
                self._shadow(retarget(raw, *copy.forward(resolution.model)), resolution, copy, live)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _shadow(self, request: bytes, resolution: Resolution, copy: ShadowCopy, live: bytes) -> None:
        shadow_version = copy.version
        try:
            answer = await self._call("ModelInfer", request, timeout=self.timeout_s)
            served = response_version(answer)
            shadow_version = int(served) if served.isdigit() else shadow_version
            if shadow_version == resolution.version:
                return
            live_response = pb.ModelInferResponse.FromString(live)
            shadow_response = pb.ModelInferResponse.FromString(answer)
            if len(live) + len(answer) > INLINE_COMPARE_BYTES:
                result = await asyncio.to_thread(compare_responses, live_response, shadow_response, self.tolerance)
            else:
                result = compare_responses(live_response, shadow_response, self.tolerance)
            diff, mismatched = result.max_abs_diff, result.mismatched
        except AiaasError as exc:
            log.info("shadow request to %s version %d failed: %s", resolution.model, copy.version, exc.message)
            diff, mismatched = float("inf"), True
        except Exception:
            log.exception("shadow comparison failed")
            return
        key = (resolution.model, resolution.version, shadow_version)
        stats = self.stats.setdefault(key, ShadowStats())
        stats.compared += 1
        stats.mismatched += int(mismatched)
        stats.max_abs_diff = max(stats.max_abs_diff, diff)
        attributes = {"model": resolution.model, "live_version": str(resolution.version),
                      "shadow_version": str(shadow_version)}
        if diff != float("inf"):
            self._diff.record(diff, attributes)
        if mismatched:
            self._mismatch.add(1, attributes)
        if self.reporter is not None:
            self.reporter.report_shadow_diff(resolution.model, resolution.version, shadow_version, diff, mismatched)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
