"""Packed linear weights (oneDNN's blocked layout): the same outputs as `nn.Linear`, the same tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.inference.generative import EngineConfig, GenerationRequest, GenerativeEngine, SamplingParams
from services.inference.generative.packing import PackedLinear, pack_linears, packable_dtypes

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
        assert (engine.runner.packed_linears > 0) is pack
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
