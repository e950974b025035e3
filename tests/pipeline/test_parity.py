"""The parity gate's numbers, on plain arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from aiaas.pipeline.parity import (
    ParityRefused,
    Tolerances,
    compare_outputs,
    default_tolerances,
    gate,
    run_parity,
)

TOL = Tolerances(atol=1e-3, rtol=1e-3, min_cosine=0.999, min_top1=0.9)
RNG = np.random.default_rng(0)
SCORES = RNG.normal(size=(100, 5)).astype(np.float32)


def test_identical_outputs_pass() -> None:
    result = compare_outputs(["y"], [SCORES], [SCORES.copy()], TOL)
    assert result["passed"] and result["max_abs_err"] == 0.0 and result["max_rel_err"] == 0.0
    assert result["cosine"] == pytest.approx(1.0) and result["top1_agreement"] == 1.0


def test_top1_disagreement_fails() -> None:
    flipped = SCORES.copy()
    flipped[:20] = -flipped[:20]
    result = compare_outputs(["y"], [SCORES], [flipped], TOL)
    assert not result["passed"]
    assert result["top1_agreement"] < 0.9
    assert any("top-1 agreement" in f for f in result["failures"])
    assert any("cosine" in f for f in result["failures"])


def test_small_noise_within_tolerance_passes_and_is_measured() -> None:
    noisy = SCORES + np.float32(1e-4)
    result = compare_outputs(["y"], [SCORES], [noisy], TOL)
    assert result["passed"] and result["max_abs_err"] == pytest.approx(1e-4, rel=1e-2)
    assert 0 < result["max_rel_err"] < 1


def test_non_finite_candidate_fails() -> None:
    broken = SCORES.copy()
    broken[3, 2] = np.nan
    result = compare_outputs(["y"], [SCORES], [broken], TOL)
    assert not result["passed"] and result["violations"] >= 1


def test_shape_mismatch_fails() -> None:
    result = compare_outputs(["y"], [SCORES], [SCORES[:, :4]], TOL)
    assert not result["passed"] and "shape" in result["failures"][0]


def test_regression_output_has_no_top1() -> None:
    values = RNG.normal(size=(10, 1))
    assert compare_outputs(["v"], [values], [values], TOL)["top1_agreement"] is None


def _const(value: np.ndarray):  # type: ignore[no-untyped-def]
    def run(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [value[: len(inputs[0])]]
    return run


def _crash(inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    raise RuntimeError("kernel not implemented\nmore")


def test_candidate_that_cannot_run_fails_with_the_reason() -> None:
    report = run_parity(_const(SCORES), _crash, [SCORES], ["y"], TOL, transformation="cast:fp16",
                        sample_source="generated", parent_size=10, candidate_size=5)
    assert not report["passed"]
    assert report["failures"] == ["candidate failed to run: kernel not implemented"]


def test_gate_refuses_unless_forced() -> None:
    report = run_parity(_const(SCORES), _const(-SCORES), [SCORES], ["y"], TOL, transformation="x",
                        sample_source="user", parent_size=10, candidate_size=5, latency_batches=(1, 4))
    assert set(report["latency_ms"]) == {"1", "4"} and report["size_bytes"]["ratio"] == 0.5
    with pytest.raises(ParityRefused) as refused:
        gate(report, force=False)
    assert refused.value.report is report
    assert gate(report, force=True)["forced"] is True


def test_lossy_steps_are_gated_on_cosine_and_top1_only() -> None:
    scaled = SCORES * 40
    lossy = default_tolerances("quantize:int8-dynamic")
    # An error that grows with the logits' scale fails an absolute bound, not a lossy step's gate.
    result = compare_outputs(["y"], [scaled], [scaled * 1.01], lossy)
    assert result["passed"] and result["max_abs_err"] > 0.1
    assert not compare_outputs(["y"], [scaled], [scaled * 1.01], lossy.with_overrides(atol=0.1, rtol=0.0))["passed"]
    nan = scaled.copy()
    nan[0, 0] = np.nan
    assert "not finite" in compare_outputs(["y"], [scaled], [nan], lossy)["failures"][0]


def test_default_tolerances_follow_the_transformation() -> None:
    assert default_tolerances("quantize:int8-dynamic") == default_tolerances("quantize")
    assert default_tolerances("cast:bf16").min_cosine < default_tolerances("cast:fp16").min_cosine
    assert default_tolerances("export:onnx") == default_tolerances("export")
    assert default_tolerances("something:new") == default_tolerances("export")
