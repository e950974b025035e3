"""Linear layers on the kernel measured fastest here (CPU, fp32 and bf16), and the compute dtype.

`nn.Linear` on CPU hands oneDNN a plain row-major weight, which it re-blocks on every call; for
the small batches of decode steps that can cost more than the multiplication. This is what
torch.compile's freezing does for CPU: reorder once (`mkldnn._reorder_linear_weight`) and call the
packed kernel (`mkldnn._linear_pointwise`), `PackedLinear`. The outputs are the same bits as
`nn.Linear`'s in bf16, equal within float rounding in fp32. Measured on 2 EPYC cores with AVX-512
bf16, one thread, the tiny Llama's output layer (256 -> 32000) takes 0.43 ms instead of 2.1 ms for
one row and 1.1 ms instead of 2.5 ms for eight.

Which kernel wins depends on the CPU, the dtype, the shape and the row count: on an AVX2-only EPYC
in fp32, oneDNN's packed call costs ~60 us more than a plain GEMM for the small layers, and the
output layer at one row runs 2x faster as a GEMM on the transposed weight, while packing still
wins it from 4 rows on. So `tune_linears` times, once per distinct shape at load, the plain layer,
the packed weight and (fp32) `addmm` on a transposed contiguous copy at 1, 4, 16 and 64 rows, and
each `TunedLinear` calls the fastest for the rows of each call (tests/generative/test_packing.py).

The price: a packed or transposed weight is a private copy per instance, where the checkpoint's own
tensors are memory-mapped pages the instances of a version share. `EngineConfig.pack_weights` turns
it off.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from services.inference.generative.config import COMPUTE_DTYPES

log = logging.getLogger("aiaas.inference.generative")



def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") \
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def packable_dtypes() -> tuple[torch.dtype, ...]:
    """fp32 wherever oneDNN is; bf16 only on CPUs whose oneDNN has a bf16 path (AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT): on an AVX2-only CPU the reorder refuses bf16 and the layers stay plain."""
    if not packing_available():
        return ()
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return (torch.bfloat16, torch.float32) if bf16 is not None and bf16() else (torch.float32,)


_NAMED = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_half(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` (bf16 or fp16) natively in oneDNN (AVX-512 BF16/FP16, AMX,
    AVX-NE-CONVERT); without it every 16-bit GEMM is widened on the fly, 3-5x slower than fp32."""
    if not torch.backends.mkldnn.is_available():
        return False
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    check = getattr(torch.ops.mkldnn, probe, None) if probe else None
    return bool(check is not None and check())


def compute_dtype(checkpoint: torch.dtype, setting: str = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype a generative model computes in, given its checkpoint's dtype and the `compute_dtype` setting.

    "auto" keeps the checkpoint's dtype, except a bf16 or fp16 checkpoint on a CPU that has no
    native path for it (an AVX2-only x86, for one), which computes in fp32: there the widened 16-bit
    GEMMs are 3-5x slower than fp32 ones (docs/generative.md, "Compute dtype"). "checkpoint" keeps
    it always; "float32", "bfloat16" and "float16" force one.
    """
    if setting not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {setting!r}")
    if setting in _NAMED:
        return _NAMED[setting]
    if setting == "checkpoint" or torch.device(device).type != "cpu":
        return checkpoint
    if checkpoint in (torch.bfloat16, torch.float16) and not native_half(checkpoint):
        return torch.float32
    return checkpoint


def pack_linears(model: torch.nn.Module, *, batch_hint: int = 16) -> int:
    """Replace every `nn.Linear` of a CPU model in bf16 or fp32 by a `PackedLinear`; how many were replaced.

    Nothing is replaced (0) on another device or dtype, or where this torch or CPU lacks the oneDNN
    path for the dtype (`packable_dtypes`).
    """
    params = next(model.parameters(), None)
    dtypes = packable_dtypes()
    if params is None or params.device.type != "cpu" or params.dtype not in dtypes:
        if params is not None and params.device.type == "cpu" and params.dtype == torch.bfloat16:
            log.info("bf16 linear layers stay unpacked: this CPU's oneDNN has no bf16 path")
        return 0
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is torch.nn.Linear and child.weight.dtype in dtypes]
    replaced = 0
    for parent, name, child in targets:
        try:
            packed = PackedLinear(child, batch_hint)
        except RuntimeError as exc:  # an unusual shape or build: keep the plain layer
            log.warning("could not pack linear layer %s (%s); it stays unpacked", name, exc)
            continue
        setattr(parent, name, packed)
        replaced += 1
    return replaced


# Row counts a layer's kernels are timed at: a decode step has one row per running sequence, a
# prefill chunk one per prompt token.
TUNE_ROWS = (1, 4, 16, 64)
_TUNE_BUDGET_S = 0.03  # per kernel and row count: at least one timed call, at most 3, within this


@dataclasses.dataclass(frozen=True)
class LinearPlan:
    """The kernel a layer of one shape uses below `cut` rows (`small`) and from `cut` rows on (`large`),
    as measured on this machine; `timings_us[kernel]` holds the times at `TUNE_ROWS`."""

    small: str
    large: str
    cut: int
    timings_us: dict[str, tuple[float, ...]]

    def kernels(self) -> set[str]:
        return {self.small, self.large}

    def describe(self) -> str:
        if self.small == self.large:
            return self.small
        return f"{self.small} below {self.cut} rows, {self.large} from {self.cut}"


def candidate_kernels(dtype: torch.dtype) -> tuple[str, ...]:
    """fp32: the plain layer, oneDNN's packed weight and a plain GEMM on the transposed weight. bf16:
    the plain layer and the packed one only (where the CPU packs bf16): both give the same bits."""
    packs = dtype in packable_dtypes()
    if dtype == torch.float32:
        return ("linear", "packed", "mm") if packs else ("linear", "mm")
    return ("linear", "packed") if packs else ("linear",)


def _time_us(fn: Callable[[], Any]) -> float:
    fn()  # warm-up: first-call allocations and oneDNN primitive creation
    best = float("inf")
    spent = 0.0
    for _ in range(3):
        started = time.perf_counter()
        fn()
        took = time.perf_counter() - started
        best = min(best, took)
        spent += took
        if spent > _TUNE_BUDGET_S:
            break
    return best * 1e6


def plan_linear(linear: torch.nn.Linear, batch_hint: int = 16) -> LinearPlan:
    """Time each candidate kernel of this layer at `TUNE_ROWS` rows and pick one for small and one
    for large row counts (the one faster at 1 row, the one faster at the most rows, and the row
    count from which the latter stays the fastest)."""
    candidates = candidate_kernels(linear.weight.dtype)
    probe = TunedLinear(linear, LinearPlan("linear", "linear", 0, {}), kernels=set(candidates),
                        batch_hint=batch_hint)
    timings: dict[str, list[float]] = {k: [] for k in candidates}
    with torch.inference_mode():
        for rows in TUNE_ROWS:
            x = torch.randn(rows, linear.in_features, dtype=linear.weight.dtype)
            for kernel in candidates:
                timings[kernel].append(_time_us(functools.partial(probe.run, kernel, x)))
    best = [min(candidates, key=lambda k: timings[k][i]) for i in range(len(TUNE_ROWS))]
    small, large = best[0], best[-1]
    cut_index = len(best) - 1
    while cut_index > 0 and best[cut_index - 1] == large:
        cut_index -= 1
    cut = TUNE_ROWS[cut_index] if small != large else 0
    return LinearPlan(small, large, cut, {k: tuple(round(t, 1) for t in v) for k, v in timings.items()})


class TunedLinear(torch.nn.Module):
    """An `nn.Linear` computed by the kernel its plan measured fastest for the call's row count:
    the plain layer, oneDNN's packed weight (`mkldnn._linear_pointwise`) or a GEMM on a transposed
    contiguous copy of the weight (`torch.addmm`). Only the weights its kernels need are kept."""

    def __init__(self, linear: torch.nn.Linear, plan: LinearPlan, *, kernels: set[str] | None = None,
                 batch_hint: int = 16) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.plan = plan
        kernels = kernels or plan.kernels()
        weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        unused = torch.empty(0, dtype=weight.dtype)  # a kernel this layer never runs keeps no weight
        self.weight = weight if "linear" in kernels else unused
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint) if "packed" in kernels else unused
        self.weight_t = weight.t().contiguous() if "mm" in kernels else unused
        self._small, self._large, self._cut = plan.small, plan.large, plan.cut

    def run(self, kernel: str, x: torch.Tensor) -> torch.Tensor:
        if kernel == "packed":
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if kernel == "mm":
            flat = x.reshape(-1, self.in_features)
            out = torch.mm(flat, self.weight_t) if self.bias is None else torch.addmm(self.bias, flat, self.weight_t)
            return out.view(*x.shape[:-1], self.out_features)
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        return self.run(self._small if rows < self._cut else self._large, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernels={self.plan.describe()}")


def tune_linears(model: torch.nn.Module, *, batch_hint: int = 16) -> dict[tuple[int, int, bool], LinearPlan]:
    """Replace every `nn.Linear` of a CPU model in fp32 or bf16 by a `TunedLinear` whose kernels were
    timed here, once per distinct shape; the plans by (in, out, bias). A layer whose plan is the plain
    layer alone stays as it is (its weight stays the checkpoint's shared pages)."""
    params = next(model.parameters(), None)
    if params is None or params.device.type != "cpu" or params.dtype not in (torch.float32, torch.bfloat16):
        return {}
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is torch.nn.Linear]
    plans: dict[tuple[int, int, bool], LinearPlan] = {}
    for parent, name, child in targets:
        shape = (child.in_features, child.out_features, child.bias is not None)
        try:
            plan = plans.get(shape)
            if plan is None:
                plan = plans[shape] = plan_linear(child, batch_hint)
            if plan.kernels() != {"linear"}:
                setattr(parent, name, TunedLinear(child, plan, batch_hint=batch_hint))
        except RuntimeError as exc:  # an unusual shape or build: keep the plain layer
            log.warning("could not tune linear layer %s (%s); it stays plain", name, exc)
    for (k, n, _), plan in plans.items():
        log.info("linear %d -> %d: %s (us at %s rows: %s)", k, n, plan.describe(), TUNE_ROWS, plan.timings_us)
    return plans


class PackedLinear(TunedLinear):
    """An `nn.Linear` whose weight is reordered for oneDNN once, always called packed; same outputs."""

    def __init__(self, linear: torch.nn.Linear, batch_hint: int) -> None:
        super().__init__(linear, LinearPlan("packed", "packed", 0, {}), batch_hint=batch_hint)
