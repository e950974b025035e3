"""The parity gate: run parent and candidate on the same inputs, measure how far apart they are,
compare their size and latency, and decide whether the candidate may become a version.

An element passes when `|candidate - parent| <= atol + rtol * |parent|` (numpy's `allclose` rule);
the gate also needs a minimum cosine similarity per output and, for outputs that look like class
scores (float, shape [batch, classes]), a minimum top-1 agreement.

Exact steps (export, convert, graph optimization) are held to all three. Lossy steps (int8, fp16,
bf16) change every element a little, by an amount that scales with the output's magnitude, so by
default they are held to cosine and top-1 only (atol/rtol None); errors are still reported, and a
user can ask for an element-wise bound too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from aiaas.errors import FailedPrecondition
from aiaas.pipeline.artifacts import Runner, first_line

_EPS = 1e-12
# Latency is compared on one thread: a shared or busy machine stalls multi-threaded kernels at
# random, which swamps the difference between parent and candidate.
LATENCY_THREADS = 1
_WARMUP_MIN_CALLS = 5
_WARMUP_MAX_CALLS = 20
# Elements smaller than this share of an output's largest magnitude count against it in max_rel_err.
_REL_FLOOR = 1e-2


@dataclasses.dataclass(frozen=True)
class Tolerances:
    # None for both: no element-wise bound (the default for lossy steps).
    atol: float | None
    rtol: float | None
    min_cosine: float
    min_top1: float

    @property
    def elementwise(self) -> bool:
        return self.atol is not None or self.rtol is not None

    def with_overrides(self, **overrides: float | None) -> Tolerances:
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


# Per kind of step: an export should be exact up to float reordering; lower precisions are not.
DEFAULT_TOLERANCES: dict[str, Tolerances] = {
    "export": Tolerances(atol=1e-4, rtol=1e-3, min_cosine=0.99999, min_top1=0.99),
    "convert": Tolerances(atol=1e-4, rtol=1e-3, min_cosine=0.99999, min_top1=0.99),
    "ort-optimize": Tolerances(atol=1e-4, rtol=1e-3, min_cosine=0.99999, min_top1=0.99),
    "cast:fp16": Tolerances(atol=None, rtol=None, min_cosine=0.999, min_top1=0.97),
    "cast:bf16": Tolerances(atol=None, rtol=None, min_cosine=0.995, min_top1=0.95),
    "quantize": Tolerances(atol=None, rtol=None, min_cosine=0.99, min_top1=0.9),
}


def default_tolerances(transformation: str) -> Tolerances:
    """`quantize:int8-dynamic` -> the `quantize` entry, `cast:fp16` -> its own, `export:onnx` -> `export`."""
    if transformation in DEFAULT_TOLERANCES:
        return DEFAULT_TOLERANCES[transformation]
    return DEFAULT_TOLERANCES.get(transformation.split(":", 1)[0], DEFAULT_TOLERANCES["export"])


class ParityRefused(FailedPrecondition):
    """The candidate is outside its tolerances; `report` says by how much."""

    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__("parity gate refused the candidate: " + "; ".join(report.get("failures", [])))
        self.report = report


def _output_metrics(ref: np.ndarray, got: np.ndarray, tol: Tolerances) -> dict[str, Any]:
    ref64 = ref.astype(np.float64)
    got64 = got.astype(np.float64)
    if ref64.shape != got64.shape:
        return {"shape_mismatch": f"{list(ref.shape)} vs {list(got.shape)}", "cosine": 0.0,
                "max_abs_err": float("inf"), "max_rel_err": float("inf"), "violations": int(ref.size)}
    finite = np.isfinite(ref64) == np.isfinite(got64)
    diff = np.abs(np.nan_to_num(got64 - ref64, nan=np.inf))
    scale = np.abs(ref64)
    # Relative error against each element, floored at 1% of the output's largest magnitude so
    # that elements near zero do not dominate it.
    floor = max(float(scale.max(initial=0.0)) * _REL_FLOOR, _EPS)
    violations = int(np.count_nonzero(~finite))
    if tol.elementwise:
        violations += int(np.count_nonzero(diff > (tol.atol or 0.0) + (tol.rtol or 0.0) * scale))
    flat_ref, flat_got = ref64.reshape(len(ref64), -1), got64.reshape(len(got64), -1)
    norms = np.linalg.norm(flat_ref) * np.linalg.norm(flat_got)
    cosine = float(np.sum(flat_ref * flat_got) / norms) if norms > _EPS else float(np.allclose(flat_ref, flat_got))
    metrics: dict[str, Any] = {
        "max_abs_err": float(diff.max(initial=0.0)),
        "max_rel_err": float((diff / np.maximum(scale, floor)).max(initial=0.0)),
        "cosine": cosine if np.isfinite(cosine) else 0.0,
        "violations": violations,
    }
    if ref.dtype.kind == "f" and ref.ndim == 2 and ref.shape[1] >= 2:
        metrics["top1_agreement"] = float(np.mean(np.argmax(ref64, axis=1) == np.argmax(got64, axis=1)))
    return metrics


def compare_outputs(
    names: Sequence[str], parent: Sequence[np.ndarray], candidate: Sequence[np.ndarray], tol: Tolerances
) -> dict[str, Any]:
    """Numerical part of the report: worst case over outputs, per-output detail, failures."""
    failures: list[str] = []
    if len(parent) != len(candidate):
        failures.append(f"parent returns {len(parent)} outputs, candidate {len(candidate)}")
    per_output = {
        name: _output_metrics(ref, got, tol) for name, ref, got in zip(names, parent, candidate, strict=False)
    }
    worst: dict[str, Any] = {
        "max_abs_err": max((m["max_abs_err"] for m in per_output.values()), default=0.0),
        "max_rel_err": max((m["max_rel_err"] for m in per_output.values()), default=0.0),
        "cosine": min((m["cosine"] for m in per_output.values()), default=0.0),
        "violations": sum(m["violations"] for m in per_output.values()),
    }
    top1 = [m["top1_agreement"] for m in per_output.values() if "top1_agreement" in m]
    worst["top1_agreement"] = min(top1) if top1 else None
    for name, m in per_output.items():
        if "shape_mismatch" in m:
            failures.append(f"{name}: shape {m['shape_mismatch']}")
        elif m["violations"] and not tol.elementwise:
            failures.append(f"{name}: {m['violations']} elements are not finite where the parent's are")
        elif m["violations"]:
            failures.append(
                f"{name}: {m['violations']} elements outside atol={tol.atol or 0:g} + rtol={tol.rtol or 0:g}*|parent| "
                f"(max abs err {m['max_abs_err']:.3g})"
            )
        if m["cosine"] < tol.min_cosine:
            failures.append(f"{name}: cosine {m['cosine']:.6f} < {tol.min_cosine:g}")
        if "top1_agreement" in m and m["top1_agreement"] < tol.min_top1:
            failures.append(f"{name}: top-1 agreement {m['top1_agreement']:.3f} < {tol.min_top1:g}")
    return {**worst, "outputs": per_output, "failures": failures, "passed": not failures}


def _batch_of(inputs: Sequence[np.ndarray], batch: int) -> list[np.ndarray]:
    out = []
    for a in inputs:
        reps = -(-batch // len(a))
        out.append(np.ascontiguousarray(np.concatenate([a] * reps)[:batch]) if reps > 1 else a[:batch])
    return out


def _time_ms(runner: Runner, inputs: Sequence[np.ndarray]) -> float:
    start = time.perf_counter()
    runner(inputs)
    return (time.perf_counter() - start) * 1000.0


def measure_latency_ms(runners: Sequence[Runner], inputs: Sequence[np.ndarray], *, budget_s: float = 0.5,
                       max_rounds: int = 50) -> list[float]:
    """Median wall time of one call for each runner, measured in alternating rounds so that a
    noisy neighbour slows all of them alike; after a warm-up (TorchScript's profiling executor
    recompiles during its first few calls), within a time budget."""
    warm_until = time.perf_counter() + budget_s / 5
    for i in range(_WARMUP_MAX_CALLS):
        for runner in runners:
            runner(inputs)
        if i + 1 >= _WARMUP_MIN_CALLS and time.perf_counter() >= warm_until:
            break
    timings: list[list[float]] = [[] for _ in runners]
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < 3 or (rounds < max_rounds and time.perf_counter() < deadline):
        for runner, samples in zip(runners, timings, strict=True):
            samples.append(_time_ms(runner, inputs))
        rounds += 1
    return [statistics.median(samples) for samples in timings]


def run_parity(
    parent: Runner,
    candidate: Runner,
    inputs: Sequence[np.ndarray],
    output_names: Sequence[str],
    tolerances: Tolerances,
    *,
    transformation: str,
    sample_source: str,
    parent_size: int,
    candidate_size: int,
    latency_batches: Sequence[int] = (1, 32),
    measure_latency: bool = True,
) -> dict[str, Any]:
    """The whole report, JSON-shaped (stored as the version's `parity` report)."""
    try:
        got = candidate(inputs)
    except Exception as exc:  # noqa: BLE001 - a candidate that cannot run fails the gate, with why
        got = []
        failure = f"candidate failed to run: {first_line(exc)}"
    else:
        failure = ""
    expected = parent(inputs)
    numbers = compare_outputs(output_names, expected, got, tolerances) if got else {
        "max_abs_err": None, "max_rel_err": None, "cosine": None, "top1_agreement": None, "violations": None,
        "outputs": {}, "failures": [failure], "passed": False,
    }
    report: dict[str, Any] = {
        "transformation": transformation,
        **numbers,
        "forced": False,
        "samples": len(inputs[0]) if inputs else 0,
        "sample_source": sample_source,
        "tolerances": dataclasses.asdict(tolerances),
        "size_bytes": {"parent": parent_size, "candidate": candidate_size,
                       "ratio": candidate_size / parent_size if parent_size else None},
        "latency_ms": {},
    }
    if measure_latency and got:
        report["latency_threads"] = LATENCY_THREADS
        with _torch_threads(LATENCY_THREADS):
            report["latency_ms"] = _latencies(parent, candidate, inputs, latency_batches)
    return report


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _latencies(parent: Runner, candidate: Runner, inputs: Sequence[np.ndarray],
               latency_batches: Sequence[int]) -> dict[str, Any]:
    latency: dict[str, Any] = {}
    for batch in sorted(set(latency_batches)):
        batch_inputs = _batch_of(inputs, batch)
        p, c = measure_latency_ms([parent, candidate], batch_inputs)
        latency[str(batch)] = {"parent": p, "candidate": c, "speedup": p / c if c > 0 else None}
    return latency


def gate(report: dict[str, Any], *, force: bool) -> dict[str, Any]:
    """Refuse a failed candidate unless forced; a forced one is marked so in its report."""
    if report["passed"]:
        return report
    if not force:
        raise ParityRefused(report)
    return {**report, "forced": True}
