"""Loading TorchScript, torch.export and ONNX artifacts, and calling them on numpy tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aiaas.runtime import load_model, parse_device
from services.common.errors import FailedPrecondition, Internal, InvalidArgument
from tests.inference.models import (
    random_array,
    write_fails_on_negative,
    write_identity,
    write_mlp,
    write_two_in_two_out,
)

FORMATS = ["torchscript", "torch_export", "onnx"]


@pytest.mark.parametrize("format", FORMATS)
def test_mlp_matches_its_reference(tmp_path: Path, format: str) -> None:
    artifact = write_mlp(tmp_path, format)
    model = load_model(artifact.path, artifact.format, artifact.inputs, artifact.outputs, threads=1)
    x = {"input": np.random.default_rng(0).standard_normal((7, 10)).astype(np.float32)}
    outputs, t_in, t_infer, t_out = model.run(x)
    assert outputs["output"].dtype == np.float32 and outputs["output"].shape == (7, 10)
    np.testing.assert_allclose(outputs["output"], artifact.expected(x)["output"], rtol=1e-5, atol=1e-5)
    assert t_in >= 0 and t_infer > 0 and t_out >= 0


def test_read_only_inputs_are_accepted(tmp_path: Path) -> None:
    artifact = write_mlp(tmp_path, "torchscript")
    model = load_model(artifact.path, artifact.format, artifact.inputs, artifact.outputs)
    x = np.frombuffer(np.ones(20, np.float32).tobytes(), np.float32).reshape(2, 10)
    assert model.run({"input": x})[0]["output"].shape == (2, 10)


def test_dict_outputs_are_matched_by_name_and_cast(tmp_path: Path) -> None:
    artifact = write_two_in_two_out(tmp_path)
    model = load_model(artifact.path, artifact.format, artifact.inputs, artifact.outputs)
    rng = np.random.default_rng(1)
    inputs = {
        "a": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.integers(-5, 5, (3, 4), dtype=np.int32),
    }
    outputs = model.run(inputs)[0]
    expected = artifact.expected(inputs)
    assert list(outputs) == ["total", "difference"]
    for name in expected:
        assert outputs[name].dtype == expected[name].dtype
        np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-6)


@pytest.mark.parametrize(
    "datatype",
    [
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BF16",
    ],
)
def test_torch_identity_every_datatype(tmp_path: Path, datatype: str) -> None:
    artifact = write_identity(tmp_path, "torchscript", datatype)
    model = load_model(artifact.path, artifact.format, artifact.inputs, artifact.outputs)
    x = random_array(datatype, (3, 5), np.random.default_rng(2))
    out = model.run({"INPUT0": x})[0]["OUTPUT0"]
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(out, x)


def test_onnx_bytes_identity(tmp_path: Path) -> None:
    artifact = write_identity(tmp_path, "onnx", "BYTES")
    model = load_model(artifact.path, artifact.format, artifact.inputs, artifact.outputs)
    x = np.array([[b"ab", b"", "\u00e9".encode()]], dtype=object)
    out = model.run({"INPUT0": x})[0]["OUTPUT0"]
    assert out.dtype == object and out.tolist() == x.tolist()
    with pytest.raises(InvalidArgument, match="UTF-8"):
        model.run({"INPUT0": np.array([[b"\xff"]], dtype=object)})


def test_model_errors_are_internal_with_the_cause(tmp_path: Path) -> None:
    artifact = write_fails_on_negative(tmp_path)
    model = load_model(artifact.path, artifact.format, artifact.inputs, artifact.outputs)
    with pytest.raises(Internal, match="negative input rejected by model"):
        model.run({"x": -np.ones((1, 2), np.float32)})


def test_load_failures_are_clear(tmp_path: Path) -> None:
    artifact = write_mlp(tmp_path, "onnx")
    with pytest.raises(FailedPrecondition, match="does not exist"):
        load_model(str(tmp_path / "missing.pt"), "torchscript", artifact.inputs, artifact.outputs)
    with pytest.raises(InvalidArgument, match="unknown model format 'pickle'"):
        load_model(artifact.path, "pickle", artifact.inputs, artifact.outputs)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    for format in FORMATS:
        with pytest.raises(InvalidArgument, match=f"cannot load {format} artifact"):
            load_model(str(garbage), format, artifact.inputs, artifact.outputs)
    renamed = [type(artifact.inputs[0])("wrong", "FP32", (-1, 10))]
    with pytest.raises(InvalidArgument, match=r"\['wrong'\] are not in the ONNX graph"):
        load_model(artifact.path, "onnx", renamed, artifact.outputs)
    bytes_spec = [type(artifact.inputs[0])("input", "BYTES", (-1,))]
    with pytest.raises(InvalidArgument, match="tensor 'input' is BYTES, which torch cannot hold"):
        load_model(write_mlp(tmp_path, "torchscript").path, "torchscript", bytes_spec, artifact.outputs)
    bf16_spec = [type(artifact.inputs[0])("input", "BF16", (-1, 10))]
    with pytest.raises(InvalidArgument, match="tensor 'input' is BF16, which onnxruntime cannot exchange"):
        load_model(artifact.path, "onnx", bf16_spec, artifact.outputs)


def test_devices() -> None:
    assert parse_device("") == "cpu" and parse_device("CPU") == "cpu"
    with pytest.raises(InvalidArgument, match="unknown device 'tpu:0'"):
        parse_device("tpu:0")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(FailedPrecondition, match="CUDA is not available"):
            parse_device("cuda:0")
