"""The LLM benchmark's clients and stack against the real services: registry, inference and gateway as
processes (bench_llm_service.aiaas_stack) serving a tiny Llama made here; every door streams every token."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.bench_llm_service import AiaasStack, aiaas_stack, text_prompts
from bench.openai_load import openai_stream, triton_stream
from tests.generative.models import build_llama, train_tokenizer

MODEL = "bench-llm"
PROMPT_TOKENS = 24
NEW = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AiaasStack, list[str]]]:
    tokenizer = train_tokenizer()
    checkpoint = tmp_path_factory.mktemp("checkpoint")
    build_llama(tokenizer).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    texts, _ = text_prompts(tokenizer, 6, PROMPT_TOKENS)
    with aiaas_stack(Path(checkpoint), tmp_path_factory.mktemp("stack"), threads=1, max_num_seqs=8,
                     kv_cache_tokens=1024, name=MODEL) as stack:
        yield stack, texts


def test_every_door_streams_exactly_max_tokens(served: tuple[AiaasStack, list[str]]) -> None:
    stack, texts = served
    results = {
        "direct": asyncio.run(triton_stream(stack.direct, f"{MODEL}:production", texts, concurrency=3, requests=6,
                                            max_tokens=NEW, warmup=2)),
        "gateway grpc": asyncio.run(triton_stream(stack.gateway, MODEL, texts, concurrency=3, requests=6,
                                                  max_tokens=NEW, warmup=2, api_key=stack.token)),
        "gateway openai": asyncio.run(openai_stream(stack.openai_url, MODEL, texts, concurrency=3, requests=6,
                                                    max_tokens=NEW, warmup=2, api_key=stack.token)),
    }
    for door, result in results.items():
        assert (result.errors, result.error_samples) == (0, []), door
        assert result.requests == 6 and result.out_tokens == 6 * NEW, door
        assert result.prompt_tokens_p50 == PROMPT_TOKENS, door  # the text re-tokenizes to the same length
        assert 0 < result.ttft_p50_ms <= result.e2e_p50_ms and result.itl_p50_ms > 0, door  # token by token


def test_a_bad_key_fails_every_request_and_says_why(served: tuple[AiaasStack, list[str]]) -> None:
    stack, texts = served
    bad = "aiaas_abcd1234_not-a-key"
    http = asyncio.run(openai_stream(stack.openai_url, MODEL, texts, concurrency=2, requests=3, max_tokens=NEW,
                                     warmup=0, api_key=bad))
    rpc = asyncio.run(triton_stream(stack.gateway, MODEL, texts, concurrency=2, requests=3, max_tokens=NEW,
                                    warmup=0, api_key=bad))
    assert (http.requests, http.errors, rpc.requests, rpc.errors) == (0, 3, 0, 3)
    assert all("HTTP 401" in e for e in http.error_samples), http.error_samples
    # The gateway refuses the stream before reading it; a request still being sent can lose that race
    # in grpc-core, which then reports its own INTERNAL instead of the server's status.
    assert any(e.startswith("RuntimeError('UNAUTHENTICATED") for e in rpc.error_samples), rpc.error_samples
    assert all(e.startswith(("RuntimeError('UNAUTHENTICATED", "RuntimeError('INTERNAL: Internal error from Core"))
               for e in rpc.error_samples), rpc.error_samples
