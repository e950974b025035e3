"""Sampling parameters: seeded sampling reproduces `generate(do_sample=True)`; penalties; validation."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aiaas.errors import InvalidArgument
from services.inference.generative import GenerationRequest, SamplingParams
from services.inference.generative.sampling import greedy_tokens
from tests.generative.conftest import generate


def _run_all(engine: Any, requests: list[GenerationRequest]) -> list[list[int]]:
    handles = [engine.submit(r) for r in requests]
    while engine.has_unfinished():
        engine.step()
    return [list(h.result(0).token_ids) for h in handles]


def _sampled(reference: Any, prompt: list[int], n: int, seed: int, **kwargs: Any) -> list[int]:
    torch.manual_seed(seed)  # generate draws from torch's default generator
    # generate's own default is top_k=50; 0 turns it off, as in SamplingParams
    return generate(reference, prompt, n, do_sample=True, **{"top_k": 0, **kwargs})


@pytest.mark.parametrize("knobs", [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_k": 20},
    {"temperature": 1.3, "top_p": 0.8},
    {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.2},
], ids=["plain", "top-k", "top-p", "all"])
def test_seeded_sampling_equals_generate_alone_and_batched(make_engine: Any, reference: Any,
                                                           prompt_ids: list[list[int]], knobs: dict[str, Any]) -> None:
    engine = make_engine(start=False)
    params = SamplingParams(max_tokens=24, ignore_eos=True, seed=7, **knobs)
    expected = _sampled(reference, prompt_ids[2], 24, 7, **knobs)
    alone = _run_all(engine, [GenerationRequest("alone", prompt_token_ids=tuple(prompt_ids[2]), params=params)])
    others = [GenerationRequest(f"o{i}", prompt_token_ids=tuple(p), params=SamplingParams(max_tokens=30, seed=i))
              for i, p in enumerate(prompt_ids)]
    batched = _run_all(engine, [*others[:3],
                                GenerationRequest("batched", prompt_token_ids=tuple(prompt_ids[2]), params=params),
                                *others[3:]])
    assert alone[0] == expected
    assert batched[3] == expected


def test_different_seeds_sample_differently(make_engine: Any, prompt_ids: list[list[int]]) -> None:
    engine = make_engine(start=False)
    runs = _run_all(engine, [GenerationRequest(f"s{seed}", prompt_token_ids=tuple(prompt_ids[0]),
                                               params=SamplingParams(max_tokens=16, seed=seed, ignore_eos=True))
                             for seed in range(4)])
    assert len({tuple(r) for r in runs}) == 4


def test_top_k_1_is_greedy(make_engine: Any, reference: Any, prompt_ids: list[list[int]]) -> None:
    engine = make_engine(start=False)
    [tokens] = _run_all(engine, [GenerationRequest("k1", prompt_token_ids=tuple(prompt_ids[1]),
                                                   params=SamplingParams(max_tokens=20, top_k=1, ignore_eos=True))])
    assert tokens == generate(reference, prompt_ids[1], 20)


def test_greedy_repetition_penalty_equals_generate(make_engine: Any, reference: Any,
                                                   prompt_ids: list[list[int]]) -> None:
    engine = make_engine(start=False)
    plain = generate(reference, prompt_ids[0], 30)
    [tokens] = _run_all(engine, [GenerationRequest("rp", prompt_token_ids=tuple(prompt_ids[0]), params=SamplingParams(
        max_tokens=30, temperature=0, repetition_penalty=1.5, ignore_eos=True))])
    assert tokens == generate(reference, prompt_ids[0], 30, repetition_penalty=1.5)
    assert tokens != plain  # the random model repeats itself; the penalty changes that
    assert len(set(tokens)) > len(set(plain))


@pytest.mark.parametrize("bad, message", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"stop": ("",)}, "stop strings"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids"),
    ({"seed": 1.5}, "seed"),
])
def test_bad_sampling_parameters_are_refused(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        SamplingParams(**bad)


def test_bad_requests_are_refused(make_engine: Any) -> None:
    engine = make_engine(start=False)
    with pytest.raises(InvalidArgument, match="exactly one of prompt"):
        GenerationRequest("r")
    with pytest.raises(InvalidArgument, match="exactly one of prompt"):
        GenerationRequest("r", prompt="a", prompt_token_ids=(1,))
    with pytest.raises(InvalidArgument, match="request_id"):
        GenerationRequest("", prompt="a")
    with pytest.raises(InvalidArgument, match="timeout_s"):
        GenerationRequest("r", prompt="a", timeout_s=-1)
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        engine.submit(GenerationRequest("r", prompt_token_ids=(1, 10_000)))
    with pytest.raises(InvalidArgument, match="prompt is empty"):
        engine.submit(GenerationRequest("r", prompt="", add_special_tokens=False))
    with pytest.raises(InvalidArgument, match="min_tokens"):
        engine.submit(GenerationRequest("r", prompt="a", params=SamplingParams(max_tokens=None, min_tokens=10_000)))


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 6), vocab=st.integers(1, 300), data=st.data())
def test_greedy_tokens_are_torch_argmax_ties_nan_and_inf_included(rows: int, vocab: int, data: Any) -> None:
    # Few distinct values, so ties are common; NaN and +-inf mixed in.
    values = st.sampled_from([0.0, 1.0, -1.0, 2.5, float("inf"), float("-inf"), float("nan")])
    flat = data.draw(st.lists(values, min_size=rows * vocab, max_size=rows * vocab))
    logits = torch.tensor(flat, dtype=torch.float32).view(rows, vocab)
    assert greedy_tokens(logits) == logits.argmax(dim=-1).tolist()
    wide = torch.randn(rows, 32000)
    assert greedy_tokens(wide) == wide.argmax(dim=-1).tolist()
