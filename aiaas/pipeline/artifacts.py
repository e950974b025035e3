"""Artifact formats and runners: load an artifact through the artifact gate and call it on numpy arrays.

Every loader here goes through `aiaas.artifact_gate` (the same checks the registry runs at upload
and inference runs at load): nothing is unpickled, and a graph calling file or I/O operators is
refused before it runs. A refusal is an InvalidArgument naming what was found.

A runner takes the inputs in signature order and returns the outputs in signature order, so the
parity gate can compare an eager module, a TorchScript archive, a `torch.export` program and an
ONNX model the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from aiaas import artifact_gate
from aiaas.errors import InvalidArgument
from aiaas.formats import ArtifactFormat

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


def onnx_runner(data: bytes) -> Runner:
    import onnxruntime as ort

    data = check_onnx(data)

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The pipeline compares small runs on one thread (see parity.LATENCY_THREADS); serving sets its own.
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(session.run(None, dict(zip(names, inputs, strict=True))))

    return run


def load_runner(fmt: ArtifactFormat, data: bytes) -> Runner:
    if fmt is ArtifactFormat.TORCHSCRIPT:
        return module_runner(load_torchscript(data))
    if fmt is ArtifactFormat.TORCH_EXPORT:
        return module_runner(load_torch_export(data).module())
    if fmt is ArtifactFormat.ONNX:
        return onnx_runner(data)
    raise InvalidArgument(f"a {fmt.value} artifact holds weights only and cannot run by itself")
