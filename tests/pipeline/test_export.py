"""Export to each format: the batch dimension stays variable and the artifact matches the module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aiaas.pipeline.artifacts import ArtifactFormat, load_runner, module_runner
from aiaas.pipeline.parity import ParityRefused
from aiaas.pipeline.signature import ServingConfig, TensorSpec
from aiaas.pipeline.steps import export_candidate
from services.common.errors import InvalidArgument
from tests.pipeline.models import SignBranch, TwoInTwoOut, mlp

SERVING = ServingConfig(max_batch_size=8)


@pytest.mark.parametrize("fmt", list(ArtifactFormat)[:3], ids=lambda f: f.value)
def test_export_keeps_batch_variable_and_matches(fmt: ArtifactFormat) -> None:
    module = mlp()
    # A batch of 1 as the example: exporters must still leave the batch dimension free.
    candidate = export_candidate(module, torch.randn(1, 10), fmt, serving=SERVING, measure_latency=False)
    assert candidate.signature.inputs == (TensorSpec("INPUT0", "FP32", (-1, 10)),)
    assert candidate.signature.outputs == (TensorSpec("OUTPUT0", "FP32", (-1, 10)),)
    assert candidate.transformation == f"export:{fmt.value}"
    runner = load_runner(fmt, candidate.data, candidate.signature)
    for batch in (1, 3, 17):
        x = np.random.default_rng(batch).normal(size=(batch, 10)).astype(np.float32)
        np.testing.assert_allclose(runner([x])[0], module_runner(module)([x])[0], atol=1e-5)
    report = candidate.report
    assert report["passed"] and not report["forced"]
    assert report["max_abs_err"] < 1e-4 and report["cosine"] > 0.99999 and report["top1_agreement"] == 1.0
    assert report["sample_source"] == "generated" and report["samples"] == 64


def test_names_and_multiple_inputs_outputs() -> None:
    candidate = export_candidate(
        TwoInTwoOut().eval(), (torch.randn(2, 6), torch.randn(2, 3)), ArtifactFormat.ONNX, serving=SERVING,
        input_names=["x", "y"], output_names=["h", "total"], measure_latency=False,
    )
    assert [s.name for s in candidate.signature.inputs] == ["x", "y"]
    assert candidate.signature.outputs == (TensorSpec("h", "FP32", (-1, 4)), TensorSpec("total", "FP32", (-1, 1)))
    assert set(candidate.report["outputs"]) == {"h", "total"}
    # One column is no class score: no top-1 for `total`.
    assert "top1_agreement" not in candidate.report["outputs"]["total"]


def test_latency_measured_at_batch_one_and_max_batch() -> None:
    candidate = export_candidate(mlp(), torch.randn(4, 10), ArtifactFormat.TORCHSCRIPT, serving=SERVING)
    latency = candidate.report["latency_ms"]
    assert set(latency) == {"1", "8"}
    assert all(v["parent"] > 0 and v["candidate"] > 0 and v["speedup"] > 0 for v in latency.values())
    size = candidate.report["size_bytes"]
    assert size["candidate"] == len(candidate.data) and size["parent"] == sum(
        p.numel() * 4 for p in mlp().parameters()
    )


# The trace follows the example's branch (sum > 0); the sample takes the other one.
ONE_BRANCH = torch.ones(2, 4)
OTHER_BRANCH = [-np.ones((8, 4), np.float32)]


def test_gate_refuses_a_broken_trace_with_its_report() -> None:
    with pytest.raises(ParityRefused) as refused:
        export_candidate(SignBranch().eval(), ONE_BRANCH, ArtifactFormat.TORCHSCRIPT, serving=SERVING,
                         sample=OTHER_BRANCH, measure_latency=False)
    report = refused.value.report
    assert report["passed"] is False and report["violations"] > 0 and report["failures"]
    assert "parity gate refused" in refused.value.message


def test_torch_export_refuses_data_dependent_control_flow_instead_of_freezing_it() -> None:
    with pytest.raises(InvalidArgument, match="cannot export to torch_export"):
        export_candidate(SignBranch().eval(), ONE_BRANCH, ArtifactFormat.TORCH_EXPORT, serving=SERVING,
                         measure_latency=False)


def test_forced_candidate_is_marked() -> None:
    candidate = export_candidate(SignBranch().eval(), ONE_BRANCH, ArtifactFormat.TORCHSCRIPT,
                                 serving=SERVING, sample=OTHER_BRANCH, force=True, measure_latency=False)
    assert candidate.report["passed"] is False and candidate.report["forced"] is True


def test_user_sample_is_checked_and_used() -> None:
    sample = [np.ones((5, 10), np.float32)]
    candidate = export_candidate(mlp(), torch.randn(2, 10), ArtifactFormat.TORCHSCRIPT, serving=SERVING,
                                 sample=sample, measure_latency=False)
    assert candidate.report["sample_source"] == "user" and candidate.report["samples"] == 5
    with pytest.raises(InvalidArgument, match="expected"):
        export_candidate(mlp(), torch.randn(2, 10), ArtifactFormat.TORCHSCRIPT, serving=SERVING,
                         sample=[np.ones((5, 9), np.float32)], measure_latency=False)


@pytest.mark.parametrize("bad", [3.0, (), {"x": torch.ones(1)}, torch.tensor(1.0)])
def test_bad_example_inputs_are_refused(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        export_candidate(mlp(), bad, ArtifactFormat.TORCHSCRIPT, serving=SERVING, measure_latency=False)


def test_unknown_format_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="unknown format"):
        ArtifactFormat.parse("tensorflow")
    assert ArtifactFormat.parse("pt2") is ArtifactFormat.TORCH_EXPORT
