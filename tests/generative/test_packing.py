"""Packed linear weights (oneDNN's blocked layout): the same outputs as `nn.Linear`, the same tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.inference.generative import EngineConfig, GenerationRequest, GenerativeEngine, SamplingParams
from services.inference.generative.packing import (
    TUNE_ROWS,
    LinearPlan,
    PackedLinear,
    TunedLinear,
    candidate_kernels,
    pack_linears,
    packable_dtypes,
    plan_linear,
    tune_linears,
)

# bf16 packs only where the CPU's oneDNN has a bf16 path (AVX-512 or AVX-NE-CONVERT); fp32 everywhere.
BF16_PACKS = torch.bfloat16 in packable_dtypes()


@pytest.mark.parametrize("dtype", packable_dtypes())
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_linear_gives_the_same_bits_for_any_batch(dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200, bias=bias).to(dtype)
    packed = PackedLinear(linear, batch_hint=16)
    for shape in [(1, 96), (7, 96), (1, 33, 96), (2, 513, 96)]:
        x = torch.randn(shape, dtype=dtype)
        expected = linear(x)
        got = packed(x)
        assert got.shape == expected.shape
        if dtype is torch.bfloat16:
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected)


def test_only_cpu_bf16_and_fp32_linears_are_packed() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(8, 4)))
    assert pack_linears(model.to(torch.float16)) == 0
    assert pack_linears(model.to(torch.bfloat16)) == (2 if BF16_PACKS else 0)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert model(x).shape == (3, 4)  # packed or not, it still runs in bf16
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(8, 4)))
    assert pack_linears(plain) == 2  # fp32: wherever oneDNN is
    assert isinstance(plain[0], PackedLinear) and isinstance(plain[2][0], PackedLinear)
    assert pack_linears(plain) == 0  # nothing left to pack


def test_bf16_packs_exactly_where_the_cpu_has_a_bf16_path() -> None:
    linear = torch.nn.Linear(16, 16).to(torch.bfloat16)
    if BF16_PACKS:
        PackedLinear(linear, batch_hint=4)
    else:  # what pack_linears avoids: oneDNN refuses the reorder on this CPU
        with pytest.raises(RuntimeError, match="bf16"):
            PackedLinear(linear, batch_hint=4)


def test_packed_and_plain_engines_make_the_same_tokens(checkpoint: Path, prompt_ids: list[list[int]]) -> None:
    outputs = []
    dtype = torch.bfloat16 if BF16_PACKS else torch.float32
    for pack in (True, False):
        engine = GenerativeEngine.from_pretrained(checkpoint, EngineConfig(kv_cache_tokens=4096, pack_weights=pack),
                                                  dtype=dtype)
        assert bool(engine.runner.linear_plans) is pack  # every linear shape timed, or none
        engine.start()
        try:
            handles = [engine.submit(GenerationRequest(f"p{i}", prompt_token_ids=ids,
                                                       params=SamplingParams(max_tokens=12, ignore_eos=True,
                                                                             temperature=0.0)))
                       for i, ids in enumerate(prompt_ids)]
            outputs.append([h.result(timeout=60).token_ids for h in handles])
        finally:
            engine.close()
    assert outputs[0] == outputs[1]
    assert all(len(tokens) == 12 for tokens in outputs[0])


@pytest.mark.parametrize("bias", [True, False])
def test_every_kernel_of_a_tuned_linear_computes_the_layer(bias: bool) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80, bias=bias)
    kernels = set(candidate_kernels(torch.float32))
    assert {"linear", "mm"} <= kernels
    tuned = TunedLinear(linear, LinearPlan("linear", "linear", 0, {}), kernels=kernels, batch_hint=8)
    with torch.inference_mode():
        for shape in ((1, 48), (7, 48), (1, 5, 48), (2, 3, 48)):
            x = torch.randn(*shape)
            want = linear(x)
            for kernel in kernels:
                got = tuned.run(kernel, x)
                assert got.shape == want.shape, kernel
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=kernel)


def test_a_plan_follows_its_own_timings_and_keeps_only_the_weights_it_uses() -> None:
    linear = torch.nn.Linear(256, 2048)
    plan = plan_linear(linear)
    times = plan.timings_us
    assert set(times) == set(candidate_kernels(torch.float32))
    assert all(len(t) == len(TUNE_ROWS) and min(t) > 0 for t in times.values())
    assert plan.small == min(times, key=lambda k: times[k][0])  # the fastest at one row
    assert plan.large == min(times, key=lambda k: times[k][-1])  # the fastest at the most rows
    assert (plan.cut == 0) is (plan.small == plan.large)
    tuned = TunedLinear(linear, plan)
    for kernel, tensor in (("linear", tuned.weight), ("packed", tuned.packed), ("mm", tuned.weight_t)):
        assert (tensor.numel() > 0) is (kernel in plan.kernels()), kernel
    # A forced plan: the small kernel below the cut, the large one from it (counted by calls).
    calls: list[str] = []
    forced = TunedLinear(linear, LinearPlan("mm", "linear", 4, {}))
    forced.run = lambda kernel, x: calls.append(kernel) or TunedLinear.run(forced, kernel, x)  # type: ignore[method-assign]
    with torch.inference_mode():
        for rows in (1, 3, 4, 9):
            torch.testing.assert_close(forced(torch.ones(rows, 256)), linear(torch.ones(rows, 256)),
                                       rtol=1e-5, atol=1e-5)
    assert calls == ["mm", "mm", "linear", "linear"]


def test_tuning_times_each_shape_once_and_keeps_the_model_s_outputs() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                torch.nn.Linear(64, 64), torch.nn.Linear(64, 8, bias=False))
    x = torch.randn(5, 32)
    with torch.inference_mode():
        want = model(x)
        plans = tune_linears(model, batch_hint=8)
        got = model(x)
    assert set(plans) == {(32, 64, True), (64, 64, True), (64, 8, False)}
    tuned = [m for m in model if isinstance(m, TunedLinear)]
    plain = [m for m in model if type(m) is torch.nn.Linear]
    assert len(tuned) + len(plain) == 4
    assert all(plans[(m.in_features, m.out_features, m.bias is not None)].kernels() == {"linear"} for m in plain)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert tune_linears(torch.nn.Sequential(torch.nn.Linear(4, 4).to(torch.float16))) == {}
