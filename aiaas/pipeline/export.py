"""Export an `nn.Module` to a servable artifact with a variable batch dimension.

`torch.export` is the default format: a `.pt2` the artifact gate rebuilds without unpickling
anything. TorchScript (deprecated in torch 2.13, still selectable) is traced (`torch.jit.trace`): data-dependent control flow is frozen into the trace,
which the parity gate then catches. `torch.export` and ONNX (the dynamo exporter) mark dimension 0
of every input as one shared dynamic `batch` dimension.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence

import torch

from aiaas.errors import InvalidArgument
from aiaas.pipeline.artifacts import ArtifactFormat, first_line

# torch.export refuses a dynamic dimension whose example is 0 or 1 ("specialization").
_MIN_EXPORT_BATCH = 2
MAX_EXPORT_BATCH = 1 << 20


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Torch's exporters narrate their progress and deprecations; the pipeline reports its own."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def exportable_batch(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if inputs[0].shape[0] >= _MIN_EXPORT_BATCH:
        return tuple(inputs)
    repeats = _MIN_EXPORT_BATCH
    return tuple(t.repeat(repeats, *([1] * (t.dim() - 1))) if t.shape[0] == 1 else t for t in inputs)


def batch_dynamic_shapes(inputs: Sequence[torch.Tensor], *, varargs: bool = False) -> tuple[object, ...]:
    """Dimension 0 of every input is one shared dynamic `batch`; `varargs` for `forward(*inputs)`."""
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    shapes = tuple({0: batch} for _ in inputs)
    return (shapes,) if varargs else shapes


def to_torchscript(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> bytes:
    with quiet_export(), torch.no_grad():
        traced = torch.jit.trace(module, tuple(inputs), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def program_bytes(program: torch.export.ExportedProgram) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def to_torch_export(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> bytes:
    args = exportable_batch(inputs)
    with quiet_export():
        program = torch.export.export(module, args, dynamic_shapes=batch_dynamic_shapes(args))
    return program_bytes(program)


def to_onnx(
    module: torch.nn.Module, inputs: Sequence[torch.Tensor], input_names: Sequence[str], output_names: Sequence[str]
) -> bytes:
    args = exportable_batch(inputs)
    with tempfile.TemporaryDirectory(prefix="aiaas-onnx-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        with quiet_export():
            torch.onnx.export(
                module, args, path, input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=batch_dynamic_shapes(args), dynamo=True, external_data=False, verbose=False,
            )
        with open(path, "rb") as f:
            return f.read()


def export_module(
    module: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    fmt: ArtifactFormat,
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> bytes:
    """Serialize `module` in `fmt`; raises InvalidArgument with the exporter's reason when it cannot."""
    try:
        if fmt is ArtifactFormat.TORCHSCRIPT:
            return to_torchscript(module, inputs)
        if fmt is ArtifactFormat.TORCH_EXPORT:
            return to_torch_export(module, inputs)
        if fmt is ArtifactFormat.ONNX:
            return to_onnx(module, inputs, input_names, output_names)
    except InvalidArgument:
        raise
    except Exception as exc:
        raise InvalidArgument(f"cannot export to {fmt.value}: {first_line(exc)}") from exc
    raise InvalidArgument(f"cannot export a module to {fmt.value}")
