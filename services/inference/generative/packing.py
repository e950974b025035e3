"""Linear layers with their weights reordered once into oneDNN's blocked layout (CPU, bf16 and fp32).

`nn.Linear` on CPU hands oneDNN a plain row-major weight, which it re-blocks on every call; for
the small batches of decode steps that costs more than the multiplication. This is what
torch.compile's freezing does for CPU: reorder once (`mkldnn._reorder_linear_weight`) and call the
packed kernel (`mkldnn._linear_pointwise`). The outputs are the same bits as `nn.Linear`'s in bf16,
equal within float rounding in fp32 (tests/generative/test_packing.py checks both); measured on 2 EPYC cores, bf16, one thread, the tiny
Llama's output layer (256 -> 32000) takes 0.43 ms instead of 2.1 ms for one row and 1.1 ms
instead of 2.5 ms for eight (docs/generative.md).

The price: a packed weight is a private copy per instance, where the checkpoint's own tensors
are memory-mapped pages the instances of a version share. `EngineConfig.pack_weights` turns it off.
"""

from __future__ import annotations

import logging

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


class PackedLinear(torch.nn.Module):
    """An `nn.Linear` whose weight is reordered for oneDNN once; same inputs, same outputs."""

    def __init__(self, linear: torch.nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


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
