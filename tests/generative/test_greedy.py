"""Greedy outputs equal transformers' `generate` token for token: alone, batched, in chunks, after preemption."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import AutoModelForCausalLM

from services.inference.generative import FinishReason, GenerationRequest, GenerativeEngine, SamplingParams
from tests.generative.conftest import generate

GREEDY = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)


def _submit_all(engine: Any, prompts: list[list[int]], params: SamplingParams = GREEDY, tag: str = "r") -> list[Any]:
    return [engine.submit(GenerationRequest(f"{tag}{i}", prompt_token_ids=tuple(p), params=params))
            for i, p in enumerate(prompts)]


def test_alone_each_request_equals_generate(make_engine: Any, reference: Any, prompt_ids: list[list[int]]) -> None:
    engine = make_engine()
    for i, prompt in enumerate(prompt_ids):
        result = engine.submit(GenerationRequest(f"alone{i}", prompt_token_ids=tuple(prompt), params=GREEDY)).result(60)
        assert list(result.token_ids) == generate(reference, prompt, 48), f"prompt {i}"
        assert result.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("config", [
    {},  # everything in one step: decodes and whole prompts together
    {"max_num_batched_tokens": 16},  # long prompts prefilled in chunks, beside the decodes
    {"max_num_seqs": 2},  # sequences join as others leave
], ids=["one-pass", "chunked-prefill", "two-at-a-time"])
def test_batched_requests_equal_generate(make_engine: Any, reference: Any, prompt_ids: list[list[int]],
                                         config: dict[str, int]) -> None:
    engine = make_engine(**config)
    results = [h.result(120) for h in _submit_all(engine, prompt_ids)]
    for i, (prompt, result) in enumerate(zip(prompt_ids, results, strict=True)):
        assert list(result.token_ids) == generate(reference, prompt, 48), f"prompt {i}"
    steps = engine.step_metrics()
    if config.get("max_num_batched_tokens"):
        assert all(s.prefill_tokens + s.decode_tokens <= 16 for s in steps)
        assert any(s.num_decode_seqs and s.prefill_tokens for s in steps), "prefill chunks ran beside decodes"
    assert max(s.num_seqs for s in steps) == min(len(prompt_ids), config.get("max_num_seqs", 64))


def test_preempted_sequences_are_recomputed_exactly(make_engine: Any, reference: Any,
                                                    prompt_ids: list[list[int]]) -> None:
    # 10 blocks of 16 tokens for 12 sequences that each grow past 50 tokens: some must give their blocks back.
    engine = make_engine(kv_cache_tokens=160, block_size=16)
    prompts = (prompt_ids[:5] * 3)[:12]
    results = [h.result(180) for h in _submit_all(engine, prompts, SamplingParams(max_tokens=40, temperature=0,
                                                                                    ignore_eos=True))]
    steps = engine.step_metrics()
    assert sum(s.preemptions for s in steps) > 0
    assert sum(r.metrics.preemptions for r in results if r.metrics) == sum(s.preemptions for s in steps)
    for prompt, result in zip(prompts, results, strict=True):
        assert list(result.token_ids) == generate(reference, prompt, 40)


def test_eos_stops_like_generate(checkpoint: Any, tokenizer: Any, reference: Any,
                                 prompt_ids: list[list[int]]) -> None:
    """With an EOS the model does produce, the engine stops exactly where `generate` stops."""
    prompt = prompt_ids[1]
    free_run = generate(reference, prompt, 30)
    eos = free_run[12]  # the checkpoint's own EOS never comes out of this random model
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), local_files_only=True)
    model.generation_config.eos_token_id = eos
    engine = GenerativeEngine(model, tokenizer)
    try:
        result = engine.submit(GenerationRequest("eos", prompt_token_ids=tuple(prompt),
                                                 params=SamplingParams(max_tokens=30, temperature=0)))
        while engine.has_unfinished():
            engine.step()
        outcome = result.result(0)
    finally:
        engine.close()
    expected = generate(reference, prompt, 30, ignore_eos=False, eos_token_id=eos)
    assert list(outcome.token_ids) == expected == free_run[: free_run.index(eos) + 1]
    assert outcome.finish_reason is FinishReason.STOP and outcome.stop_reason is None
