"""Artifact formats and runners: load an artifact through the artifact gate and call it on numpy arrays.

Every loader here goes through `aiaas.artifact_gate` (the same checks the registry runs at upload
and inference runs at load): nothing is unpickled, and a graph calling file or I/O operators is
refused before it runs. A refusal is an InvalidArgument naming what was found.

A runner takes the inputs in signature order and returns the outputs in signature order, so the
parity gate can compare an eager module, a TorchScript archive, a `torch.export` program and an
ONNX model the same way. An artifact runs through `aiaas.runtime.load_model`, the loader that
serves it, with the version's signature: outputs are matched and typed exactly as served. BF16
tensors are float32 values on this side (as `aiaas.pipeline.signature` generates them); they
cross into the runtime as bit patterns and come back as float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from aiaas import artifact_gate, runtime
from aiaas.errors import InvalidArgument
from aiaas.formats import ArtifactFormat
from aiaas.pipeline.signature import Signature

Runner = Callable[[Sequence[np.ndarray]], list[np.ndarray]]


def first_line(exc: BaseException) -> str:
    """An exception's first line, for a report (torch and onnxruntime messages run long)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _outputs_to_numpy(result: object) -> list[np.ndarray]:
    if isinstance(result, torch.Tensor):
        result = (result,)
    if not isinstance(result, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in result):
        raise InvalidArgument(f"the model must return a tensor or a tuple of tensors, got {type(result).__name__}")
    return [t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy() for t in result]


def module_runner(module: Callable[..., object]) -> Runner:
    """Run an eager `nn.Module`, a ScriptModule or an exported program's module under no_grad."""

    def run(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            return _outputs_to_numpy(module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs)))

    return run


def load_torchscript(data: bytes) -> torch.jit.ScriptModule:
    try:
        return artifact_gate.load_torchscript(data, map_location="cpu")
    except artifact_gate.UnsafeArtifact as exc:
        raise InvalidArgument(f"refused: {exc}") from None


def load_torch_export(data: bytes) -> torch.export.ExportedProgram:
    try:
        return artifact_gate.load_torch_export(data)
    except artifact_gate.UnsafeArtifact as exc:
        raise InvalidArgument(f"refused: {exc}") from None


def check_onnx(data: bytes) -> bytes:
    """The ONNX bytes, once the gate has checked them (no external data, no custom op domains)."""
    try:
        return artifact_gate.onnx_model_bytes(data)
    except artifact_gate.UnsafeArtifact as exc:
        raise InvalidArgument(f"refused: {exc}") from None


def load_runner(fmt: ArtifactFormat, data: bytes, signature: Signature) -> Runner:
    """The served runtime on the pipeline's calling convention (torch threads left as they are; ONNX: one)."""
    if not fmt.servable:
        raise InvalidArgument(f"a {fmt.value} artifact holds weights only and cannot run by itself")
    model = runtime.load_model(data, fmt.value, signature.inputs, signature.outputs)
    bf16_in = [s.datatype == "BF16" for s in model.inputs]
    bf16_out = [s.datatype == "BF16" for s in model.outputs]

    def run(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(model.inputs):
            raise InvalidArgument(f"{len(inputs)} inputs given, the signature has {len(model.inputs)}")
        feeds = {
            sig.name: runtime.bf16_bits(a) if bf16 and a.dtype != np.uint16 else np.ascontiguousarray(a)
            for sig, bf16, a in zip(model.inputs, bf16_in, inputs, strict=True)
        }
        outputs, _, _, _ = model.run(feeds)
        return [runtime.bf16_floats(outputs[s.name]) if bf16 else outputs[s.name]
                for s, bf16 in zip(model.outputs, bf16_out, strict=True)]

    return run

