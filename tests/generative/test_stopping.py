"""Where a request stops: max_tokens, stop strings (cut exactly), stop token ids, EOS, min_tokens."""

from __future__ import annotations

from typing import Any

import pytest

from services.inference.generative import FinishReason, GenerationChunk, GenerationRequest, SamplingParams
from tests.generative.conftest import generate


def _run(engine: Any, prompt: list[int], **params: Any) -> tuple[list[GenerationChunk], Any]:
    chunks: list[GenerationChunk] = []
    handle = engine.submit(GenerationRequest("s", prompt_token_ids=tuple(prompt),
                                             params=SamplingParams(temperature=0, **params)), sink=chunks.append)
    while engine.has_unfinished():
        engine.step()
    del handle
    return chunks, _fold(chunks)


def _fold(chunks: list[GenerationChunk]) -> Any:
    from services.inference.generative import GenerationResult

    return GenerationResult.from_chunks(chunks)


@pytest.mark.parametrize("max_tokens", [1, 7, 33])
def test_max_tokens_is_exact(make_engine: Any, reference: Any, prompt_ids: list[list[int]], max_tokens: int) -> None:
    engine = make_engine(start=False)
    chunks, result = _run(engine, prompt_ids[1], max_tokens=max_tokens, ignore_eos=True)
    assert list(result.token_ids) == generate(reference, prompt_ids[1], max_tokens)
    assert len(chunks) == max_tokens and all(len(c.token_ids) == 1 for c in chunks)
    assert result.finish_reason is FinishReason.LENGTH
    assert result.usage.completion_tokens == max_tokens and result.usage.prompt_tokens == len(prompt_ids[1])


def _boundary_stop(tokenizer: Any, tokens: list[int], at: int) -> tuple[str, str]:
    """A 4-character stop string spanning two or more tokens, from character `at` of the text on; the text.

    The random model writes many bytes that are no valid UTF-8 (decoded as U+FFFD); the stop
    string is taken where there are none, so that its position does not depend on decoding a prefix.
    """
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    ends = [len(tokenizer.decode(tokens[: k + 1], skip_special_tokens=True)) for k in range(len(tokens))]
    for start in range(at, len(text) - 4):
        stop = text[start: start + 4]
        first_token = next(k for k, end in enumerate(ends) if end > start)
        if "\ufffd" not in stop and ends[first_token] < start + 4 and text.index(stop) == start:
            return stop, text
    raise AssertionError("no stop string candidate in the reference text")


@pytest.mark.parametrize("prompt_index, at", [(0, 8), (2, 20), (4, 40)])
def test_stop_string_cuts_the_text_exactly_before_it(make_engine: Any, reference: Any, tokenizer: Any,
                                                     prompt_ids: list[list[int]], prompt_index: int, at: int) -> None:
    prompt = prompt_ids[prompt_index]
    free_run = generate(reference, prompt, 60)
    stop, text = _boundary_stop(tokenizer, free_run, at)
    expected = text[: text.index(stop)]
    engine = make_engine(start=False)
    chunks, result = _run(engine, prompt, max_tokens=60, ignore_eos=True, stop=("never-there", stop))
    assert result.text == expected
    assert result.finish_reason is FinishReason.STOP and result.stop_reason == stop
    # It stopped at the token that completed the stop string, not later.
    produced = list(result.token_ids)
    assert produced == free_run[: len(produced)]
    assert stop in tokenizer.decode(produced, skip_special_tokens=True)
    assert stop not in tokenizer.decode(produced[:-1], skip_special_tokens=True)
    # No chunk ever sent text past the cut, even before the stop string was complete.
    sent = ""
    for chunk in chunks:
        sent += chunk.text
        assert expected.startswith(sent)


def test_text_that_only_looks_like_a_stop_string_is_released(make_engine: Any, reference: Any, tokenizer: Any,
                                                             prompt_ids: list[list[int]]) -> None:
    prompt = prompt_ids[2]
    free_run = generate(reference, prompt, 40)
    text = tokenizer.decode(free_run, skip_special_tokens=True)
    stop, _ = _boundary_stop(tokenizer, free_run, 10)
    stop = stop[:3] + "\x00never"  # starts like the text, never completes
    engine = make_engine(start=False)
    _, result = _run(engine, prompt, max_tokens=40, ignore_eos=True, stop=(stop,))
    assert result.finish_reason is FinishReason.LENGTH and result.text == text


def test_stop_token_id_ends_the_request(make_engine: Any, reference: Any, tokenizer: Any,
                                        prompt_ids: list[list[int]]) -> None:
    prompt = prompt_ids[0]
    free_run = generate(reference, prompt, 40)
    stop_id = free_run[15]
    first = free_run.index(stop_id)
    engine = make_engine(start=False)
    _, result = _run(engine, prompt, max_tokens=40, stop_token_ids=(stop_id,))
    assert list(result.token_ids) == free_run[: first + 1]
    assert result.finish_reason is FinishReason.STOP and result.stop_reason == stop_id
    assert result.text == tokenizer.decode(free_run[:first], skip_special_tokens=True)  # its own text is left out


def test_min_tokens_holds_back_stop_tokens(make_engine: Any, reference: Any, prompt_ids: list[list[int]]) -> None:
    prompt = prompt_ids[0]
    free_run = generate(reference, prompt, 40)
    stop_id = free_run[15]
    first = free_run.index(stop_id)
    engine = make_engine(start=False)
    _, result = _run(engine, prompt, max_tokens=40, min_tokens=first + 3, stop_token_ids=(stop_id,))
    produced = list(result.token_ids)
    assert len(produced) >= first + 3 and stop_id not in produced[: first + 3]
    assert result.finish_reason is (FinishReason.STOP if produced[-1] == stop_id else FinishReason.LENGTH)
    # transformers' MinNewTokensLengthLogitsProcessor does the holding back: the same as generate with it.
    expected = generate(reference, prompt, 40, ignore_eos=False, min_new_tokens=first + 3, eos_token_id=stop_id)
    assert produced == expected


def test_eos_is_ignored_on_request(make_engine: Any, reference: Any, prompt_ids: list[list[int]]) -> None:
    prompt = prompt_ids[1]
    free_run = generate(reference, prompt, 30)
    engine = make_engine(start=False)
    engine.eos_ids = frozenset({free_run[5]})
    _, stopped = _run(engine, prompt, max_tokens=30)
    assert stopped.finish_reason is FinishReason.STOP and len(stopped.token_ids) <= 6
    _, ignored = _run(engine, prompt, max_tokens=30, ignore_eos=True)
    assert ignored.finish_reason is FinishReason.LENGTH and list(ignored.token_ids) == free_run
