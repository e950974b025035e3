"""The generate protocol through a real inference service: greedy outputs equal transformers `generate`,
unary and streamed (tritonclient), exact max_tokens and stop strings, chat messages, refusals that
name the bad parameter, and the decoupled model configuration (docs/generative.md, "Serving protocol")."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import grpc
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.inference_generative.calls import Stream, infer, inputs
from tests.inference_generative.conftest import Stack

PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Il était une fois un petit chat", "x",
           "for i in range(10):\n    print(i", "Continuous batching lets sequences join and leave the batch. " * 3]


def test_unary_greedy_output_equals_generate(stack: Stack) -> None:
    client = stack.client()
    for prompt in PROMPTS[:3]:
        tokens, text = stack.reference("tiny-llm", prompt, 24)
        answer = infer(client, "tiny-llm", prompt, max_tokens=24, temperature=0)
        assert answer.text == text, prompt
        assert answer.params["completion_tokens"] == len(tokens)
        assert answer.params["prompt_tokens"] == stack.prompt_tokens(prompt)
        assert answer.params["triton_final_response"] is True
        assert answer.params["finish_reason"] == ("length" if len(tokens) == 24 else "stop")


def test_concurrent_greedy_outputs_equal_generate(stack: Stack) -> None:
    prompts = PROMPTS * 2
    expected = [stack.reference("tiny-llm", p, 32, exact_length=True)[1] for p in prompts]

    def one(prompt: str) -> str:
        return infer(triton.InferenceServerClient(stack.inference.address), "tiny-llm", prompt, max_tokens=32,
                     temperature=0, ignore_eos=True).text

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(one, prompts))
    assert answers == expected


def test_tritonclient_streams_chunks_then_a_final_response(stack: Stack) -> None:
    prompt = PROMPTS[1]
    tokens, text = stack.reference("tiny-llm", prompt, 20, exact_length=True)
    stream = Stream(stack.client())
    try:
        stream.send("tiny-llm", prompt, request_id="s1", max_tokens=20, temperature=0, ignore_eos=True)
        answers = stream.until_final()
    finally:
        stream.close()
    assert len(answers) >= 5, "one response per chunk of text"
    assert all(a.id == "s1" for a in answers)
    assert all(not a.final for a in answers[:-1])
    assert "".join(a.text for a in answers) == text
    counts = [a.params["completion_tokens"] for a in answers]
    assert counts == sorted(counts) and counts[-1] == len(tokens) == 20
    last = answers[-1].params
    assert (last["finish_reason"], last["prompt_tokens"]) == ("length", stack.prompt_tokens(prompt))


def test_stream_false_on_the_stream_answers_once(stack: Stack) -> None:
    _, text = stack.reference("tiny-llm", PROMPTS[0], 12, exact_length=True)
    stream = Stream(stack.client())
    try:
        stream.send("tiny-llm", PROMPTS[0], stream=False, max_tokens=12, temperature=0, ignore_eos=True)
        answers = stream.until_final()
    finally:
        stream.close()
    assert len(answers) == 1
    assert answers[0].text == text and answers[0].params["completion_tokens"] == 12


def test_sampling_parameters_input_and_exclude_input_in_output(stack: Stack) -> None:
    prompt = PROMPTS[2]
    _, text = stack.reference("tiny-llm", prompt, 10, exact_length=True)
    # Triton's vLLM examples send numbers as strings; request parameters win over sampling_parameters.
    tensors = inputs(prompt, sampling={"max_tokens": "3", "temperature": "0", "ignore_eos": True},
                     exclude_input=False)
    answer = infer(stack.client(), "tiny-llm", tensors=tensors, max_tokens=10)
    assert answer.text == prompt + text
    assert answer.params["completion_tokens"] == 10


def test_max_tokens_and_stop_strings_are_exact(stack: Stack) -> None:
    client = stack.client()
    prompt = PROMPTS[0]
    tokens, text = stack.reference("tiny-llm", prompt, 40, exact_length=True)
    for n in (1, 7):
        answer = infer(client, "tiny-llm", prompt, max_tokens=n, temperature=0, ignore_eos=True)
        assert answer.text == stack.tokenizer.decode(tokens[:n], skip_special_tokens=True)
        assert (answer.params["completion_tokens"], answer.params["finish_reason"]) == (n, "length")
    # A stop string from the middle of the reference text: the output ends exactly before it.
    start = len(text) // 2
    stop = text[start:start + 3]
    expected = text[:text.index(stop)]
    for stream in (False, True):
        if stream:
            events = Stream(client)
            try:
                events.send("tiny-llm", prompt, max_tokens=40, temperature=0, ignore_eos=True, stop=stop)
                answers = events.until_final()
            finally:
                events.close()
            got, last = "".join(a.text for a in answers), answers[-1].params
        else:
            answer = infer(client, "tiny-llm", prompt, max_tokens=40, temperature=0, ignore_eos=True,
                           stop=f'["zzzz", {stop!r}]'.replace("'", '"'))
            got, last = answer.text, answer.params
        assert got == expected
        assert (last["finish_reason"], last["stop_reason"]) == ("stop", stop)
        assert last["completion_tokens"] < 40


def test_chat_messages_use_the_tokenizer_chat_template(stack: Stack) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]
    prompt = stack.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    _, text = stack.reference("tiny-llm", prompt, 16, add_special_tokens=False, exact_length=True)
    answer = infer(stack.client(), "tiny-llm", tensors=inputs(messages=messages), max_tokens=16, temperature=0,
                   ignore_eos=True)
    assert answer.text == text


@pytest.mark.parametrize(("tensors", "params", "named"), [
    (None, {"temperature": -1.0}, "temperature"),
    (None, {"max_tokens": 0}, "max_tokens"),
    (None, {"top_p": 1.5}, "top_p"),
    (None, {"max_tokens": "many"}, "max_tokens"),
    (None, {"stop_token_ids": "[1, -2]"}, "stop_token_ids"),
    (None, {"seed": 1.5}, "seed"),
    (None, {"max_new_tokens": 4}, "max_new_tokens"),
    (None, {"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    (None, {"max_tokens": 100000}, "max_tokens"),  # refused by the worker: longer than a sequence may be
    ("no-text", {}, "text_input"),
    ("bad-json", {}, "sampling_parameters"),
    ("unknown-field", {}, "best_of"),
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(v))
def test_bad_parameters_are_invalid_argument_naming_them(stack: Stack, tensors: str | None,
                                                         params: dict[str, Any], named: str) -> None:
    chosen = {
        None: inputs("The quick brown fox"),
        "no-text": inputs(stream=False),
        "bad-json": inputs("hi", sampling=None) + _raw_sampling("{not json"),
        "unknown-field": inputs("hi", sampling={"best_of": 2}),
    }[tensors]
    with pytest.raises(InferenceServerException) as caught:
        infer(stack.client(), "tiny-llm", tensors=chosen, **params)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert named in caught.value.message()


def _raw_sampling(text: str) -> list[object]:
    import numpy as np

    tensor = triton.InferInput("sampling_parameters", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=object))
    return [tensor]


def test_a_bad_request_on_a_stream_is_answered_in_band_and_the_stream_goes_on(stack: Stack) -> None:
    stream = Stream(stack.client())
    try:
        stream.send("tiny-llm", "hello", temperature=-2.0)
        error = stream.next()
        assert isinstance(error, InferenceServerException) and "temperature" in error.message()
        stream.send("tiny-llm", "hello", max_tokens=3, temperature=0, ignore_eos=True)
        assert stream.until_final()[-1].params["completion_tokens"] == 3
    finally:
        stream.close()


def test_model_config_and_metadata_describe_a_decoupled_generative_model(stack: Stack) -> None:
    client = stack.client()
    config = client.get_model_config("tiny-llm").config
    assert config.model_transaction_policy.decoupled is True
    assert config.max_batch_size == 0
    assert config.platform == "hf_causal_lm"
    assert [t.name for t in config.input] == ["text_input", "messages", "stream", "sampling_parameters",
                                              "exclude_input_in_output"]
    assert [t.name for t in config.output] == ["text_output"]
    metadata = client.get_model_metadata("tiny-llm")
    assert metadata.platform == "hf_causal_lm"
    assert [(t.name, t.datatype) for t in metadata.outputs] == [("text_output", "BYTES")]
    stats = client.get_inference_statistics("tiny-llm").model_stats[0]
    assert stats.inference_stats.success.count >= 1
    assert stats.inference_stats.fail.count >= 1  # the refused requests above count as failures


def test_a_deadline_shorter_than_the_generation_is_deadline_exceeded(stack: Stack) -> None:
    with pytest.raises(InferenceServerException) as caught:
        infer(stack.client(), "one-seq-llm", "x", timeout_s=0.3, max_tokens=1500, temperature=0, ignore_eos=True)
    assert caught.value.status() == str(grpc.StatusCode.DEADLINE_EXCEEDED)
