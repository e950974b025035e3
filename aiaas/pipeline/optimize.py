"""Transformations of a stored artifact into a new one: quantize, cast, ONNX Runtime graph optimization,
format conversion. Each works on the parent's artifact bytes alone (no original module needed).

| transformation | TorchScript parent | torch.export parent | ONNX parent |
|---|---|---|---|
| `int8-dynamic` | graph-mode `quantize_dynamic_jit` (Linear) | torchao `quantize_` (int8 dynamic), re-exported (`aiaas.pipeline.quantize_export`) | `onnxruntime.quantization.quantize_dynamic` (7-bit weights, exact on every CPU) |
| `fp16` / `bf16` | module cast, wrapped in input/output casts | same, re-exported | fp16: `convert_float_to_float16(keep_io_types)`; bf16 refused |
| `ort-optimize` | refused | refused | `SessionOptions.optimized_model_filepath` |
| `to-onnx` | legacy exporter (dynamic batch axis) | dynamo exporter | refused |

Every result keeps its parent's format. fp16/bf16 versions keep the parent's signature: inputs and
outputs stay FP32 and the casts happen inside the model, so clients do not change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence

import torch

from aiaas.errors import InvalidArgument
from aiaas.pipeline.artifacts import (
    ArtifactFormat,
    check_onnx,
    first_line,
    load_torch_export,
    load_torchscript,
)
from aiaas.pipeline.export import batch_dynamic_shapes, exportable_batch, program_bytes, quiet_export
from aiaas.pipeline.quantize_export import quantize_int8_dynamic
from aiaas.pipeline.signature import FLOAT_DATATYPES, Signature, generate_inputs, torch_dtype

TRANSFORMATIONS = ("int8-dynamic", "fp16", "bf16", "ort-optimize", "to-onnx")
ORT_LEVELS = ("basic", "extended", "all")


@dataclasses.dataclass(frozen=True)
class Transformed:
    format: ArtifactFormat
    data: bytes
    # Recorded as the version's lineage transformation, e.g. "quantize:int8-dynamic".
    lineage: str


class CastWrapper(torch.nn.Module):
    """Runs `inner` in a lower precision while the caller keeps its original datatypes."""

    def __init__(self, inner: torch.nn.Module, dtype: torch.dtype, float_inputs: Sequence[bool],
                 output_dtypes: Sequence[torch.dtype]) -> None:
        super().__init__()
        self.inner = inner
        self.dtype = dtype
        self.float_inputs = list(float_inputs)
        self.output_dtypes = list(output_dtypes)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        cast = [x.to(self.dtype) if f else x for x, f in zip(inputs, self.float_inputs, strict=True)]
        out = self.inner(*cast)
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        restored = tuple(o.to(d) for o, d in zip(outs, self.output_dtypes, strict=True))
        return restored[0] if len(restored) == 1 else restored


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # onnxruntime.quantization logs advice through the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _example(signature: Signature) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(a) for a in generate_inputs(signature, 2, seed=1))


def _save_torchscript(module: torch.jit.ScriptModule) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()


def _quantize_torchscript(module: torch.jit.ScriptModule) -> bytes:
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic_jit

    with quiet_export():
        quantized = quantize_dynamic_jit(module, {"": default_dynamic_qconfig})
    if "quantized::" not in str(quantized.graph) and "quantized::" not in str(quantized.inlined_graph):
        raise InvalidArgument("int8-dynamic found no Linear layer to quantize in this model")
    return _save_torchscript(quantized)


def _cast_wrapper(inner: torch.nn.Module, signature: Signature, dtype: torch.dtype) -> CastWrapper:
    float_inputs = [s.datatype in FLOAT_DATATYPES for s in signature.inputs]
    return CastWrapper(inner.to(dtype), dtype, float_inputs, [torch_dtype(s.datatype) for s in signature.outputs])


def _onnx_file_op(data: bytes, op: str, level: str = "extended") -> bytes:
    import onnxruntime as ort

    data = check_onnx(data)

    with tempfile.TemporaryDirectory(prefix="aiaas-ort-") as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
        with open(src, "wb") as f:
            f.write(data)
        if op == "int8-dynamic":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # 7-bit weights (reduce_range): x86 CPUs without VNNI multiply u8 activations by s8 weights
            # with VPMADDUBSW, whose int16 pair sums saturate for 8-bit weights; the result would then
            # depend on the CPU that serves it. With |w| <= 64 every kernel computes the exact integers.
            with _quiet_root_logger():
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8, reduce_range=True)
        elif op == "fp16":
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            with _quiet_root_logger():
                onnx.save(convert_float_to_float16(onnx.load(src), keep_io_types=True), dst)
        else:
            options = ort.SessionOptions()
            options.graph_optimization_level = {
                "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            }[level]
            options.optimized_model_filepath = dst
            ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])
        with open(dst, "rb") as f:
            return f.read()


def _to_onnx(fmt: ArtifactFormat, data: bytes, signature: Signature) -> bytes:
    example = _example(signature)
    input_names = [s.name for s in signature.inputs]
    output_names = [s.name for s in signature.outputs]
    with tempfile.TemporaryDirectory(prefix="aiaas-onnx-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        with quiet_export():
            if fmt is ArtifactFormat.TORCHSCRIPT:
                axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
                torch.onnx.export(load_torchscript(data), example, path, input_names=input_names,
                                  output_names=output_names, dynamic_axes=axes, dynamo=False)
            else:
                module = load_torch_export(data).module()
                args = exportable_batch(example)
                torch.onnx.export(module, args, path, input_names=input_names, output_names=output_names,
                                  dynamic_shapes=batch_dynamic_shapes(args), dynamo=True, external_data=False)
        with open(path, "rb") as f:
            return f.read()


def _transform_torch(fmt: ArtifactFormat, data: bytes, signature: Signature, transformation: str) -> Transformed:
    if transformation == "int8-dynamic":
        if fmt is ArtifactFormat.TORCHSCRIPT:
            return Transformed(fmt, _quantize_torchscript(load_torchscript(data)), "quantize:int8-dynamic")
        return Transformed(fmt, quantize_int8_dynamic(load_torch_export(data), _example(signature)),
                           "quantize:int8-dynamic")
    if transformation in ("fp16", "bf16"):
        dtype = torch.float16 if transformation == "fp16" else torch.bfloat16
        example = _example(signature)
        if fmt is ArtifactFormat.TORCHSCRIPT:
            wrapper = _cast_wrapper(load_torchscript(data), signature, dtype)
            with quiet_export(), torch.no_grad():
                out = _save_torchscript(torch.jit.trace(wrapper, example, check_trace=False))
        else:
            wrapper = _cast_wrapper(load_torch_export(data).module(), signature, dtype)
            args = exportable_batch(example)
            with quiet_export():
                program = torch.export.export(wrapper, args, dynamic_shapes=batch_dynamic_shapes(args, varargs=True))
            out = program_bytes(program)
        return Transformed(fmt, out, f"cast:{transformation}")
    if transformation == "to-onnx":
        return Transformed(ArtifactFormat.ONNX, _to_onnx(fmt, data, signature), "convert:onnx")
    raise InvalidArgument(f"{transformation} applies to ONNX versions only; this version is {fmt.value}")


def transform(
    fmt: ArtifactFormat, data: bytes, signature: Signature, transformation: str, *, ort_level: str = "extended"
) -> Transformed:
    """Apply one named transformation to an artifact; InvalidArgument when it does not apply."""
    if transformation not in TRANSFORMATIONS:
        raise InvalidArgument(f"unknown transformation {transformation!r}; choose one of {', '.join(TRANSFORMATIONS)}")
    if ort_level not in ORT_LEVELS:
        raise InvalidArgument(f"ort level must be one of {', '.join(ORT_LEVELS)}")
    try:
        if fmt in (ArtifactFormat.TORCHSCRIPT, ArtifactFormat.TORCH_EXPORT):
            return _transform_torch(fmt, data, signature, transformation)
        if fmt is ArtifactFormat.ONNX:
            if transformation in ("bf16", "to-onnx"):
                raise InvalidArgument(f"{transformation} does not apply to ONNX versions")
            lineage = {"int8-dynamic": "quantize:int8-dynamic", "fp16": "cast:fp16"}.get(
                transformation, f"ort-optimize:{ort_level}"
            )
            return Transformed(fmt, _onnx_file_op(data, transformation, ort_level), lineage)
    except InvalidArgument:
        raise
    except Exception as exc:
        raise InvalidArgument(f"{transformation} failed on this {fmt.value} version: {first_line(exc)}") from exc
    raise InvalidArgument(f"cannot transform a {fmt.value} artifact")
