"""Tiny model factories for tests: write TorchScript, torch.export (.pt2) and ONNX artifacts.

Each `write_*` returns an `Artifact`: where the file is, its format, its signature (full shapes,
dim 0 = -1 when batched) and a numpy reference `expected(inputs) -> outputs` to compare against.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aiaas.tensors import TensorSpec
from services.common.datatypes import KSERVE_TO_NUMPY


def _jit_save(module: torch.nn.Module, path: Path, example: torch.Tensor | None = None) -> None:
    """TorchScript is deprecated upstream but still a format users bring; keep test output readable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        compiled = torch.jit.trace(module, example) if example is not None else torch.jit.script(module)
        torch.jit.save(compiled, str(path))


@dataclasses.dataclass(frozen=True)
class Artifact:
    path: str
    format: str  # "torchscript" | "torch_export" | "onnx"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    expected: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class MLP(torch.nn.Module):
    def __init__(self, sizes: Sequence[int], seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        layers: list[torch.nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            linear = torch.nn.Linear(a, b)
            with torch.no_grad():
                linear.weight.copy_(torch.randn(b, a, generator=generator) / a**0.5)
                linear.bias.copy_(torch.randn(b, generator=generator) * 0.1)
            layers.append(linear)
            if i < len(sizes) - 2:
                layers.append(torch.nn.ReLU())
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _mlp_reference(module: MLP) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def expected(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {"output": module(torch.from_numpy(np.array(inputs["input"]))).numpy()}

    return expected


def _mlp_specs(sizes: Sequence[int]) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    return (TensorSpec("input", "FP32", (-1, sizes[0])),), (TensorSpec("output", "FP32", (-1, sizes[-1])),)


def write_mlp(
    directory: str | Path, format: str, sizes: Sequence[int] = (10, 50, 10), seed: int = 0
) -> Artifact:
    """An MLP with input 'input' [-1, sizes[0]] and output 'output' [-1, sizes[-1]], FP32."""
    module = MLP(sizes, seed).eval()
    example = torch.zeros(2, sizes[0])
    path = Path(directory) / f"mlp_{'x'.join(map(str, sizes))}.{_SUFFIX[format]}"
    if format == "torchscript":
        _jit_save(module, path, example)
    elif format == "torch_export":
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch}})
        torch.export.save(program, str(path))
    elif format == "onnx":
        _write_onnx_mlp(module, sizes, path)
    else:
        raise ValueError(format)
    inputs, outputs = _mlp_specs(sizes)
    return Artifact(str(path), format, inputs, outputs, _mlp_reference(module))


_SUFFIX = {"torchscript": "pt", "torch_export": "pt2", "onnx": "onnx"}


def _write_onnx_mlp(module: MLP, sizes: Sequence[int], path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    current = "input"
    linears = [m for m in module.net if isinstance(m, torch.nn.Linear)]
    for i, linear in enumerate(linears):
        w, b = f"w{i}", f"b{i}"
        inits.append(numpy_helper.from_array(linear.weight.detach().numpy().T.copy(), w))
        inits.append(numpy_helper.from_array(linear.bias.detach().numpy().copy(), b))
        out = "output" if i == len(linears) - 1 else f"h{i}"
        mm = f"mm{i}"
        nodes.append(helper.make_node("MatMul", [current, w], [mm]))
        nodes.append(helper.make_node("Add", [mm, b], [out if i == len(linears) - 1 else f"a{i}"]))
        if i < len(linears) - 1:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", sizes[-1]])],
        inits,
    )
    _save_onnx(graph, path)


def _save_onnx(graph: Any, path: Path) -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


class _Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def write_identity(
    directory: str | Path, format: str, datatype: str, shape: tuple[int, ...] = (-1, -1)
) -> Artifact:
    """'INPUT0' -> 'OUTPUT0' unchanged, of `datatype` (BYTES only as ONNX)."""
    path = Path(directory) / f"identity_{datatype.lower()}.{_SUFFIX[format]}"
    if format == "onnx":
        from onnx import TensorProto, helper

        elem = {"BYTES": TensorProto.STRING, "FP32": TensorProto.FLOAT, "FP16": TensorProto.FLOAT16,
                "FP64": TensorProto.DOUBLE, "INT64": TensorProto.INT64, "INT32": TensorProto.INT32,
                "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8}[datatype]  # fmt: skip
        dims = [f"d{i}" if d < 0 else d for i, d in enumerate(shape)]
        graph = helper.make_graph(
            [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
            "identity",
            [helper.make_tensor_value_info("INPUT0", elem, dims)],
            [helper.make_tensor_value_info("OUTPUT0", elem, dims)],
        )
        _save_onnx(graph, path)
    elif format == "torchscript":
        _jit_save(_Identity(), path)
    else:
        example = torch.zeros(2, 3, dtype=_torch_dtype(datatype))
        dynamic = {i: torch.export.Dim(f"d{i}", min=1, max=1024) for i, d in enumerate(shape) if d < 0}
        program = torch.export.export(_Identity(), (example,), dynamic_shapes={"x": dynamic})
        torch.export.save(program, str(path))
    spec_in = (TensorSpec("INPUT0", datatype, shape),)
    spec_out = (TensorSpec("OUTPUT0", datatype, shape),)
    return Artifact(str(path), format, spec_in, spec_out, lambda inputs: {"OUTPUT0": inputs["INPUT0"]})


def _torch_dtype(datatype: str) -> torch.dtype:
    from aiaas.runtime import torch_dtype

    return torch_dtype(datatype)


class _TwoInTwoOut(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"difference": a - b.to(a.dtype), "total": (a + b.to(a.dtype)).sum(dim=1).to(torch.float64)}


def write_two_in_two_out(directory: str | Path) -> Artifact:
    """TorchScript: a FP32 [-1, -1], b INT32 [-1, -1] -> dict {total FP64 [-1], difference FP32 [-1, -1]}."""
    path = Path(directory) / "two_in_two_out.pt"
    _jit_save(_TwoInTwoOut(), path)

    def expected(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        a, b = inputs["a"], inputs["b"].astype(np.float32)
        return {"total": (a + b).sum(axis=1).astype(np.float64), "difference": a - b}

    return Artifact(
        str(path),
        "torchscript",
        (TensorSpec("a", "FP32", (-1, -1)), TensorSpec("b", "INT32", (-1, -1))),
        (TensorSpec("total", "FP64", (-1,)), TensorSpec("difference", "FP32", (-1, -1))),
        expected,
    )


class _FailsOnNegative(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise RuntimeError("negative input rejected by model")
        return x * 2


def write_fails_on_negative(directory: str | Path) -> Artifact:
    """TorchScript that raises inside forward when any input is negative; else doubles x."""
    path = Path(directory) / "fails_on_negative.pt"
    _jit_save(_FailsOnNegative(), path)
    spec = (TensorSpec("x", "FP32", (-1, -1)),), (TensorSpec("y", "FP32", (-1, -1)),)
    return Artifact(str(path), "torchscript", spec[0], spec[1], lambda i: {"y": i["x"] * 2})


def random_array(datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random data of a KServe datatype (BF16 as uint16 bit patterns of finite values)."""
    if datatype == "BYTES":
        items = [rng.bytes(int(n)).hex().encode() for n in rng.integers(0, 12, size=int(np.prod(shape)))]
        result = np.empty(len(items), dtype=object)
        result[:] = items
        return result.reshape(shape)
    if datatype == "BF16":
        return (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    dtype = KSERVE_TO_NUMPY[datatype]
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


class _ManyIdentity(torch.nn.Module):
    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(x.clone() for x in xs)


def write_identity_many(directory: str | Path, datatypes: Sequence[str]) -> Artifact:
    """torch.export: inputs IN_<DT> [-1, -1] -> outputs OUT_<DT>, one pair per datatype, unchanged."""
    path = Path(directory) / "identity_many.pt2"
    examples = tuple(torch.zeros(2, 3, dtype=_torch_dtype(d)) for d in datatypes)
    batch, width = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("width", min=1, max=4096)
    dims = (tuple({0: batch, 1: width} for _ in datatypes),)
    torch.export.save(torch.export.export(_ManyIdentity(), examples, dynamic_shapes=dims), str(path))
    inputs = tuple(TensorSpec(f"IN_{d}", d, (-1, -1)) for d in datatypes)
    outputs = tuple(TensorSpec(f"OUT_{d}", d, (-1, -1)) for d in datatypes)
    return Artifact(
        str(path), "torch_export", inputs, outputs, lambda i: {f"OUT_{d}": i[f"IN_{d}"] for d in datatypes}
    )
