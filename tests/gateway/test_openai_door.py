"""The OpenAI-compatible door's own mechanics, in process with the official `openai` client, over
replica doubles of a decoupled model: listing, completions and chat (streamed and not), usage,
parameters as the serving protocol sends them, aliases, errors in OpenAI's shape and status codes,
token quotas, bounded bodies, and a client that goes away cancelling its generation upstream.
The end-to-end run against the real inference service is tests/lm/test_gateway_generation.py."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import openai
import pytest

from services.gateway.openai_door import OpenAIDoor, OpenAIServer
from tests.gateway.generative_stack import GenStack, gen_stack

__all__ = ["gen_stack"]


_CLIENTS: list[openai.AsyncOpenAI] = []


@pytest.fixture
async def door(gen_stack: GenStack) -> AsyncIterator[tuple[GenStack, str]]:
    server = OpenAIServer(OpenAIDoor(gen_stack.plane, max_body_bytes=8192), host="127.0.0.1", port=0,
                          max_connections=64, grace_period_s=1)
    port = await server.start()
    yield gen_stack, f"http://127.0.0.1:{port}/v1"
    while _CLIENTS:
        await _CLIENTS.pop().close()
    await server.stop()


def client(url: str, token: str) -> openai.AsyncOpenAI:
    api = openai.AsyncOpenAI(base_url=url, api_key=token, max_retries=0, timeout=20)
    _CLIENTS.append(api)
    return api


def sent(stack: GenStack) -> Any:
    """The one generate request the replicas got since the last call."""
    (request,) = [r for replica in stack.replicas for r in replica.generated]
    for replica in stack.replicas:
        replica.generated.clear()
    return request


def parameters(request: Any) -> dict[str, Any]:
    return {name: getattr(value, value.WhichOneof("parameter_choice")) for name, value in request.parameters.items()}


async def test_models_lists_the_generative_models_a_key_may_use(door: tuple[GenStack, str]) -> None:
    stack, url = door
    assert [m.id for m in (await client(url, stack.token).models.list()).data] == ["gen"]
    assert [m.id for m in (await client(url, stack.narrow_token).models.list()).data] == []
    assert (await client(url, stack.token).models.retrieve("gen:canary")).id == "gen:canary"
    with pytest.raises(openai.NotFoundError):
        await client(url, stack.token).models.retrieve("m")


async def test_completion_whole_and_streamed(door: tuple[GenStack, str]) -> None:
    stack, url = door
    api = client(url, stack.token)
    whole = await api.completions.create(model="gen", prompt="the quick brown fox jumps", max_tokens=3)
    assert whole.choices[0].text == "the quick brown" and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (5, 3, 8)
    assert whole.model == "gen" and whole.id.startswith("cmpl-") and whole.object == "text_completion"
    assert parameters(sent(stack)) == {"max_tokens": 3}
    chunks = [c async for c in await api.completions.create(
        model="gen", prompt="one two three", stream=True, stream_options={"include_usage": True})]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "one two three"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 3)
    assert all(c.usage is None for c in chunks[:-1])
    assert parameters(sent(stack)) == {}  # nothing asked: the model's defaults
    await stack.reporter.flush()
    records = [r for r in stack.monitor.records() if r.model == "gen"]
    assert [(r.status, r.generation.completion_tokens, r.generation.finish_reason) for r in records] == [
        ("OK", 3, "length"), ("OK", 3, "stop")]


async def test_chat_whole_and_streamed(door: tuple[GenStack, str]) -> None:
    stack, url = door
    api = client(url, stack.token)
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    whole = await api.chat.completions.create(model="gen", messages=messages, max_completion_tokens=2)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == "be brief"
    assert whole.object == "chat.completion" and whole.usage.total_tokens == 6
    request = sent(stack)
    assert [t.name for t in request.inputs] == ["messages", "stream"]
    assert json.loads(request.raw_input_contents[0][4:]) == [{"role": "system", "content": "be brief"},
                                                              {"role": "user", "content": "hello there"}]
    chunks = [c async for c in await api.chat.completions.create(model="gen", messages=messages, stream=True)]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "be brief hello there"
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].object == "chat.completion.chunk"
    assert request.raw_input_contents[1] == b"\x00" and sent(stack).raw_input_contents[1] == b"\x01"


async def test_sampling_parameters_reach_inference_as_the_protocol_names_them(door: tuple[GenStack, str]) -> None:
    stack, url = door
    await client(url, stack.token).completions.create(
        model="gen", prompt="a b c", max_tokens=7, temperature=0.5, top_p=0.9, stop=["x", "y"], seed=42,
        extra_body={"min_tokens": 2, "ignore_eos": True, "top_k": -1, "repetition_penalty": 1.1})
    assert parameters(sent(stack)) == {
        "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stop": '["x", "y"]', "seed": 42, "min_tokens": 2,
        "ignore_eos": True, "top_k": 0, "repetition_penalty": 1.1}


async def test_aliases_route_as_on_grpc(door: tuple[GenStack, str]) -> None:
    stack, url = door
    await client(url, stack.token).completions.create(model="gen:canary", prompt="a")
    assert sent(stack).model_name == "gen:canary"
    await client(url, stack.token).completions.create(model="gen", prompt="a")
    assert sent(stack).model_name == "gen:production"


@pytest.mark.parametrize("fields, param, text", [
    ({"n": 2}, "n", "one choice is generated per request"),
    ({"presence_penalty": 0.5}, "presence_penalty", "use repetition_penalty"),
    ({"temperature": 3}, "temperature", "temperature must be a number in [0, 2]"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be an integer from 1"),
    ({"stop": [""]}, "stop", "stop must be a string or a list"),
    ({"best_of": 3}, "best_of", "only one sequence"),
    ({"prompt": [1, 2, 3]}, "prompt", "token-id prompts"),
    ({"frobnicate": 1}, "frobnicate", "unknown or unsupported field(s): frobnicate"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream: true"),
])
async def test_bad_parameters_are_400_naming_the_field(door: tuple[GenStack, str], fields: dict[str, Any],
                                                       param: str, text: str) -> None:
    stack, url = door
    async with aiohttp.ClientSession() as http, http.post(
            f"{url}/completions", json={"model": "gen", "prompt": "a", **fields},
            headers={"authorization": f"Bearer {stack.token}"}) as answer:
        status, error = answer.status, (await answer.json())["error"]
    assert status == 400
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and text in error["message"] and error["type"] == "invalid_request_error"
    assert not any(replica.generated for replica in stack.replicas)


async def test_errors_have_openai_status_codes(door: tuple[GenStack, str]) -> None:
    stack, url = door
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        await client(url, "aiaas_abcd1234_wrong").completions.create(model="gen", prompt="a")
    assert unauthenticated.value.status_code == 401 and unauthenticated.value.code == "invalid_api_key"
    assert "invalid API key" in unauthenticated.value.message
    with pytest.raises(openai.PermissionDeniedError, match="may not use model 'gen'"):
        await client(url, stack.narrow_token).completions.create(model="gen", prompt="a")
    with pytest.raises(openai.NotFoundError, match="unknown model: 'nope'"):
        await client(url, stack.token).completions.create(model="nope", prompt="a")
    with pytest.raises(openai.BadRequestError, match="'m' .* is not a generative model"):
        await client(url, stack.token).chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
    for replica in stack.replicas:
        replica.fail_with = grpc.StatusCode.UNAVAILABLE
        replica.fail_as_application = True
    with pytest.raises(openai.InternalServerError) as unavailable:
        await client(url, stack.token).completions.create(model="gen", prompt="a")
    assert unavailable.value.status_code == 503
    headers = {"authorization": f"Bearer {stack.token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"{url}/completions", json={"model": "gen", "prompt": "x" * 10_000}) as large:
            assert large.status == 413 and (await large.json())["error"]["code"] == "request_too_large"
        async with http.post(f"{url}/completions", data=b"{not json") as garbled:
            assert garbled.status == 400 and "not valid JSON" in (await garbled.json())["error"]["message"]
        async with http.get(f"{url}/engines") as nowhere:
            assert nowhere.status == 404 and "serves /v1/models" in (await nowhere.json())["error"]["message"]


async def test_token_quota_is_429_once_used_up(door: tuple[GenStack, str]) -> None:
    stack, url = door
    api = client(url, stack.thrifty_token)
    words = " ".join(f"w{i}" for i in range(15))
    done = await api.completions.create(model="gen", prompt=words, max_tokens=10)
    assert done.usage.total_tokens == 25  # more than the 20 a minute: charged all the same
    with pytest.raises(openai.RateLimitError) as info:
        await api.completions.create(model="gen", prompt="a")
    assert info.value.code == "insufficient_quota" and "token quota exceeded" in info.value.message
    assert int(info.value.response.headers["retry-after"]) >= 1


async def test_a_client_going_away_cancels_its_generation(door: tuple[GenStack, str]) -> None:
    stack, url = door
    for replica in stack.replicas:
        replica.token_delay_s = 0.05
    words = " ".join(f"w{i}" for i in range(200))
    stream = await client(url, stack.token).completions.create(model="gen", prompt=words, max_tokens=200,
                                                                stream=True)
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    await stream.close()
    for _ in range(200):
        if any(r.cancelled for r in stack.replicas):
            break
        await asyncio.sleep(0.02)
    assert [r.cancelled for r in stack.replicas if r.generated] == [[sent(stack).id]]
    await stack.reporter.flush()
    record = next(r for r in stack.monitor.records() if r.model == "gen")
    assert record.status == "CANCELLED" and record.generation.finish_reason == "cancelled"
    assert record.generation.completion_tokens >= 3


async def test_answers_on_a_kept_alive_connection_do_not_wait_for_delayed_acks(door: tuple[GenStack, str]) -> None:
    _, url = door
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    took = []
    try:
        for _ in range(21):
            started = time.perf_counter()
            writer.write(b"GET /health HTTP/1.1\r\nHost: door\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            took.append(time.perf_counter() - started)
    finally:
        writer.close()
    # A response is two writes (headers, body): without TCP_NODELAY the second waits for the
    # client's delayed ACK, 40 ms or more on Linux, every time.
    assert statistics.median(took) < 0.025


async def test_a_client_going_away_before_a_whole_answer_cancels_its_generation(door: tuple[GenStack, str]) -> None:
    stack, url = door
    for replica in stack.replicas:
        replica.token_delay_s = 0.05  # the whole answer of 200 tokens: 10 s
    words = " ".join(f"w{i}" for i in range(200))
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {stack.token}"}) as http:
        with pytest.raises(TimeoutError):
            async with http.post(f"{url}/completions", json={"model": "gen", "prompt": words, "max_tokens": 200},
                                 timeout=aiohttp.ClientTimeout(total=0.5)) as answer:
                await answer.read()
    for _ in range(200):
        if any(r.cancelled for r in stack.replicas):
            break
        await asyncio.sleep(0.02)
    assert [r.cancelled for r in stack.replicas if r.generated] == [[sent(stack).id]]


async def test_a_model_no_replica_can_describe_yet_is_503_then_served(door: tuple[GenStack, str]) -> None:
    stack, url = door
    stack.plane.kinds.retry_s = 0.0
    for replica in stack.replicas:  # not loaded yet: every replica refuses, ModelConfig included
        replica.fail_with, replica.fail_as_application = grpc.StatusCode.UNAVAILABLE, True
    with pytest.raises(openai.InternalServerError, match="not ready on any inference replica yet") as info:
        await client(url, stack.token).completions.create(model="gen", prompt="a b")
    assert info.value.status_code == 503
    assert [m.id for m in (await client(url, stack.token).models.list()).data] == []
    for replica in stack.replicas:  # loaded: the next request learns its kind and is served
        replica.fail_with = None
    done = await client(url, stack.token).completions.create(model="gen", prompt="a b")
    assert done.choices[0].text == "a b"
    assert [m.id for m in (await client(url, stack.token).models.list()).data] == ["gen"]
