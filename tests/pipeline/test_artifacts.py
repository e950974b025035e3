"""The parity gate runs an artifact through the runtime that serves it (`aiaas.runtime.load_model`):
same outputs, matched by the version's signature and typed as declared, from the artifact's bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aiaas.errors import InvalidArgument
from aiaas.formats import ArtifactFormat
from aiaas.pipeline.artifacts import load_runner
from aiaas.pipeline.signature import Signature
from aiaas.runtime import bf16_bits, bf16_floats, load_model
from tests.inference.models import Artifact, write_identity, write_mlp, write_two_in_two_out


def _served(artifact: Artifact, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    outputs, _, _, _ = load_model(artifact.path, artifact.format, artifact.inputs, artifact.outputs).run(inputs)
    return outputs


@pytest.mark.parametrize("fmt", ["torchscript", "torch_export", "onnx"])
def test_the_gate_runs_what_serving_runs(tmp_path: Path, fmt: str) -> None:
    artifact = write_mlp(tmp_path, fmt)
    x = np.random.default_rng(0).normal(size=(5, 10)).astype(np.float32)
    (got,) = load_runner(ArtifactFormat(fmt), Path(artifact.path).read_bytes(),
                         Signature(artifact.inputs, artifact.outputs))([x])
    served = _served(artifact, {artifact.inputs[0].name: x})[artifact.outputs[0].name]
    assert got.dtype == served.dtype == np.float32
    np.testing.assert_array_equal(got, served)


def test_outputs_follow_the_signature_not_the_models_order(tmp_path: Path) -> None:
    # The model returns a dict {difference, total}; the signature declares (total FP64, difference FP32).
    artifact = write_two_in_two_out(tmp_path)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.ones((2, 3), dtype=np.int32)
    runner = load_runner(ArtifactFormat.TORCHSCRIPT, Path(artifact.path).read_bytes(),
                         Signature(artifact.inputs, artifact.outputs))
    total, difference = runner([a, b])
    expected = artifact.expected({"a": a, "b": b})
    assert total.dtype == np.float64 and difference.dtype == np.float32
    np.testing.assert_array_equal(total, expected["total"])
    np.testing.assert_array_equal(difference, expected["difference"])
    with pytest.raises(InvalidArgument, match="1 inputs given, the signature has 2"):
        runner([a])


def test_bf16_is_float32_on_the_pipeline_side_and_bit_patterns_in_the_runtime(tmp_path: Path) -> None:
    artifact = write_identity(tmp_path, "torch_export", "BF16")
    x = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    (got,) = load_runner(ArtifactFormat.TORCH_EXPORT, Path(artifact.path).read_bytes(),
                         Signature(artifact.inputs, artifact.outputs))([x])
    served = _served(artifact, {"INPUT0": bf16_bits(x)})["OUTPUT0"]
    assert served.dtype == np.uint16 and got.dtype == np.float32
    np.testing.assert_array_equal(got, bf16_floats(served))
    np.testing.assert_allclose(got, x, rtol=2**-8)  # bfloat16 keeps 8 significant bits


def test_weights_only_formats_do_not_run(tmp_path: Path) -> None:
    artifact = write_mlp(tmp_path, "onnx")
    with pytest.raises(InvalidArgument, match="holds weights only"):
        load_runner(ArtifactFormat.SAFETENSORS, b"", Signature(artifact.inputs, artifact.outputs))
