"""The dtype a generative model computes in: the checkpoint's, or fp32 where the CPU has no native 16-bit path.

The expectations follow this machine's CPU: `native_half` asks oneDNN, the same question the
engine asks, and the test checks the engine acts on the answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from aiaas.errors import InvalidArgument
from services.inference.generative import EngineConfig, GenerationRequest, GenerativeEngine, SamplingParams
from services.inference.generative.packing import compute_dtype, native_half
from services.inference.settings import InferenceSettings
from tests.generative.conftest import generate
from tests.generative.models import build_llama, train_tokenizer


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_auto_widens_a_16_bit_checkpoint_only_where_the_cpu_lacks_it(half: torch.dtype) -> None:
    expected = half if native_half(half) else torch.float32
    assert compute_dtype(half, "auto", "cpu") == expected
    assert compute_dtype(torch.float32, "auto", "cpu") == torch.float32
    assert compute_dtype(half, "auto", "cuda") == half  # a GPU keeps the checkpoint's dtype
    assert compute_dtype(half, "checkpoint", "cpu") == half
    assert compute_dtype(half, "float32", "cpu") == torch.float32
    assert compute_dtype(torch.float32, "bfloat16", "cpu") == torch.bfloat16


def test_a_bad_setting_is_refused_where_it_is_read() -> None:
    with pytest.raises(InvalidArgument, match="compute_dtype must be one of auto, checkpoint"):
        EngineConfig(compute_dtype="fp8")
    with pytest.raises(InvalidArgument, match="lm_compute_dtype must be one of"):
        InferenceSettings(lm_compute_dtype="int4").validate()
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        compute_dtype(torch.bfloat16, "half")


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama-bf16")
    tokenizer = train_tokenizer()
    build_llama(tokenizer).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _engine(checkpoint: Path, setting: str) -> GenerativeEngine:
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), local_files_only=True, dtype="auto")
    assert model.dtype == torch.bfloat16
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)
    return GenerativeEngine(model, tokenizer, EngineConfig(compute_dtype=setting, kv_cache_tokens=1024))


@pytest.mark.parametrize("setting", ["auto", "checkpoint", "float32"])
def test_the_engine_computes_in_the_chosen_dtype_and_matches_generate_in_it(bf16_checkpoint: Path,
                                                                           setting: str) -> None:
    engine = _engine(bf16_checkpoint, setting)
    try:
        want = compute_dtype(torch.bfloat16, setting, "cpu")
        assert engine.compute_dtype == want
        weights = {p.dtype for p in engine.runner.model.parameters()}
        packed = [m for m in engine.runner.model.modules() if hasattr(m, "packed")]
        assert weights <= {want}, weights
        assert engine.cache.keys[0].dtype == want  # the KV cache holds what the model computes
        for module in packed:
            assert module.packed.dtype == want
        reference: Any = AutoModelForCausalLM.from_pretrained(str(bf16_checkpoint), local_files_only=True,
                                                              dtype=want).eval()
        prompt = engine.tokenizer("The quick brown fox")["input_ids"]
        engine.start()
        result = engine.submit(GenerationRequest("r", prompt_token_ids=tuple(prompt),
                                                 params=SamplingParams(max_tokens=24, temperature=0,
                                                                       ignore_eos=True))).result(60)
        assert list(result.token_ids) == generate(reference, prompt, 24)
    finally:
        engine.close()
