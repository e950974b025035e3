"""Transformations of a stored artifact: each result passes its gate and keeps the signature."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from aiaas import artifact_gate
from aiaas.pipeline.artifacts import ArtifactFormat, load_runner
from aiaas.pipeline.parity import ParityRefused, Tolerances
from aiaas.pipeline.signature import ServingConfig
from aiaas.pipeline.steps import Candidate, export_candidate, transform_candidate
from services.common.errors import InvalidArgument
from tests.pipeline.models import mlp

SERVING = ServingConfig(max_batch_size=8)
TS, EXPORT, ONNX = ArtifactFormat.TORCHSCRIPT, ArtifactFormat.TORCH_EXPORT, ArtifactFormat.ONNX


@pytest.fixture(scope="module")
def parents() -> dict[ArtifactFormat, Candidate]:
    return {fmt: export_candidate(mlp(), torch.randn(4, 10), fmt, serving=SERVING, measure_latency=False)
            for fmt in (TS, EXPORT, ONNX)}


@pytest.mark.parametrize(
    ("parent_format", "transformation", "result_format", "lineage"),
    [
        (TS, "int8-dynamic", TS, "quantize:int8-dynamic"),
        (TS, "fp16", TS, "cast:fp16"),
        (TS, "bf16", TS, "cast:bf16"),
        (TS, "to-onnx", ONNX, "convert:onnx"),
        (EXPORT, "int8-dynamic", EXPORT, "quantize:int8-dynamic"),
        (EXPORT, "fp16", EXPORT, "cast:fp16"),
        (ONNX, "int8-dynamic", ONNX, "quantize:int8-dynamic"),
        (ONNX, "fp16", ONNX, "cast:fp16"),
        (ONNX, "ort-optimize", ONNX, "ort-optimize:extended"),
    ],
)
def test_transformation_passes_its_gate(
    parents: dict[ArtifactFormat, Candidate], parent_format: ArtifactFormat, transformation: str,
    result_format: ArtifactFormat, lineage: str,
) -> None:
    parent = parents[parent_format]
    candidate = transform_candidate(parent.format, parent.data, parent.signature, SERVING, transformation,
                                    parent_version=3, measure_latency=False)
    assert candidate.format is result_format
    assert candidate.transformation == lineage and candidate.parent_version == 3
    report = candidate.report
    assert report["passed"], report["failures"]
    assert report["transformation"] == lineage and report["parent"]["version"] == 3
    assert report["top1_agreement"] >= 0.9 and report["cosine"] >= 0.99
    # Clients keep sending and receiving FP32 whatever the model runs in.
    assert candidate.signature == parent.signature
    x = np.random.default_rng(0).normal(size=(5, 10)).astype(np.float32)
    (out,) = load_runner(candidate.format, candidate.data, candidate.signature)([x])
    assert out.dtype == np.float32 and out.shape == (5, 10)
    if transformation == "int8-dynamic" and parent_format is not EXPORT:
        assert report["size_bytes"]["candidate"] < report["size_bytes"]["parent"]


def test_int8_of_an_export_is_torchao_int8_in_plain_aten(parents: dict[ArtifactFormat, Candidate]) -> None:
    parent = parents[EXPORT]
    candidate = transform_candidate(parent.format, parent.data, parent.signature, SERVING, "int8-dynamic",
                                    measure_latency=False)
    # What the gate (registry, inference) reads: no torchao operator, int8 matmuls, no pickle.
    operators = artifact_gate.check_artifact(candidate.data, "torch_export").operators
    assert "aten::_int_mm" in operators and not any(op.startswith("torchao::") for op in operators)
    assert "aten::linear" not in operators
    program = artifact_gate.load_torch_export(candidate.data)
    matrices = [t for t in program.state_dict.values() if t.dim() == 2 and t.shape[1] > 1]
    assert matrices and all(t.dtype == torch.int8 for t in matrices)
    # Provenance (stack traces naming this machine's paths) is not stored.
    with zipfile.ZipFile(io.BytesIO(candidate.data)) as archive:
        graph = next(archive.read(n) for n in archive.namelist() if n.endswith("models/model.json"))
    assert b"stack_trace" not in graph and b"site-packages" not in graph


def test_int8_of_an_onnx_version_computes_exact_integers_on_any_cpu(parents: dict[ArtifactFormat, Candidate]) -> None:
    parent = parents[ONNX]
    # Forced, so that a refusal by the parity gate does not hide which of the checks below fails.
    candidate = transform_candidate(parent.format, parent.data, parent.signature, SERVING, "int8-dynamic",
                                    force=True, measure_latency=False)
    model = onnx.load_from_string(candidate.data)
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    # 7-bit weights: u8 x s8 pair sums stay inside int16, where VPMADDUBSW (x86 without VNNI) saturates.
    assert weights and all(int(np.abs(w.astype(np.int32)).max()) <= 64 for w in weights)
    # ONNX Runtime on this CPU gives what the ONNX reference (exact integer arithmetic) gives.
    x = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    (served,) = load_runner(candidate.format, candidate.data, candidate.signature)([x])
    exact = ReferenceEvaluator(model).run(None, {candidate.signature.inputs[0].name: x})
    assert isinstance(exact, list)
    np.testing.assert_allclose(served, exact[0], rtol=0, atol=1e-6)


def test_int8_of_an_export_shrinks_a_model_whose_weights_dominate() -> None:
    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).eval()
    parent = export_candidate(wide, torch.randn(4, 256), EXPORT, serving=SERVING, measure_latency=False)
    report = transform_candidate(parent.format, parent.data, parent.signature, SERVING, "int8-dynamic",
                                 measure_latency=False).report
    assert report["passed"], report["failures"]
    assert report["size_bytes"]["ratio"] < 0.5


def test_report_compares_latency_against_parent(parents: dict[ArtifactFormat, Candidate]) -> None:
    parent = parents[TS]
    report = transform_candidate(parent.format, parent.data, parent.signature, SERVING, "int8-dynamic").report
    assert set(report["latency_ms"]) == {"1", "8"}
    for entry in report["latency_ms"].values():
        assert entry["speedup"] == pytest.approx(entry["parent"] / entry["candidate"])


def test_tight_tolerances_refuse_int8_with_a_report(parents: dict[ArtifactFormat, Candidate]) -> None:
    parent = parents[TS]
    with pytest.raises(ParityRefused) as refused:
        transform_candidate(parent.format, parent.data, parent.signature, SERVING, "int8-dynamic",
                            tolerances=Tolerances(atol=1e-6, rtol=0.0, min_cosine=0.999999, min_top1=1.0),
                            measure_latency=False)
    assert refused.value.report["passed"] is False
    assert any("outside atol" in f for f in refused.value.report["failures"])


@pytest.mark.parametrize(
    ("parent_format", "transformation", "message"),
    [
        (TS, "ort-optimize", "ONNX versions only"),
        (ONNX, "bf16", "does not apply to ONNX"),
        (ONNX, "to-onnx", "does not apply to ONNX"),
        (TS, "int4", "unknown transformation"),
    ],
)
def test_transformations_that_do_not_apply_are_refused(
    parents: dict[ArtifactFormat, Candidate], parent_format: ArtifactFormat, transformation: str, message: str
) -> None:
    parent = parents[parent_format]
    with pytest.raises(InvalidArgument, match=message):
        transform_candidate(parent.format, parent.data, parent.signature, SERVING, transformation)


@pytest.mark.parametrize("fmt", [TS, EXPORT], ids=lambda f: f.value)
def test_int8_without_linear_layers_is_refused(fmt: ArtifactFormat) -> None:
    conv = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 3), torch.nn.Flatten()).eval()
    parent = export_candidate(conv, torch.randn(2, 2, 5), fmt, serving=SERVING, measure_latency=False)
    with pytest.raises(InvalidArgument, match="no Linear layer"):
        transform_candidate(parent.format, parent.data, parent.signature, SERVING, "int8-dynamic")
