"""Decoupled (generative) models through the gateway, in process, driven by `tritonclient.grpc.aio`
over replica doubles: every response relayed in order up to the final one, retries only before the
first response, the client's cancel reaching the replica, unary calls, token quotas, telemetry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as tca

from services.gateway.generation import text_output
from tests.gateway.generative_stack import GenStack, gen_stack
from tests.gateway.test_forwarding import inputs

__all__ = ["gen_stack"]


def prompt(text: str, *, stream: bool = True) -> list[tca.InferInput]:
    text_input = tca.InferInput("text_input", [1], "BYTES")
    text_input.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    streaming = tca.InferInput("stream", [1], "BOOL")
    streaming.set_data_from_numpy(np.array([stream], dtype=bool))
    return [text_input, streaming]


def request(text: str, request_id: str, model: str = "gen", **parameters: Any) -> dict[str, Any]:
    return {"model_name": model, "inputs": prompt(text), "request_id": request_id, "parameters": parameters}


async def collect(stack: GenStack, *items: dict[str, Any], token: str | None = None,
                  headers: dict[str, str] | None = None) -> list[tuple[Any, Any]]:
    async def requests() -> AsyncIterator[dict[str, Any]]:
        for item in items:
            yield item

    async with tca.InferenceServerClient(stack.address) as client:
        return [answer async for answer in client.stream_infer(
            requests(), headers={**stack.headers(token), **(headers or {})})]


def parameter(result: Any, name: str) -> Any:
    value = result.get_response().parameters[name]
    return getattr(value, value.WhichOneof("parameter_choice"))


async def test_every_response_is_relayed_in_order_until_the_final_one(gen_stack: GenStack) -> None:
    answers = await collect(gen_stack, request("one two three four", "a", max_tokens=3),
                            request("five six", "b"), {"model_name": "m", "inputs": inputs([7.0]), "request_id": "c"})
    assert all(error is None for _, error in answers)
    seen = [(r.get_response().id, text_output(r.get_response()), r.get_response().parameters["completion_tokens"]
             .int64_param) for r, _ in answers[:-1]]
    assert seen == [("a", "one", 1), ("a", " two", 2), ("a", " three", 3), ("a", "", 3),
                    ("b", "five", 1), ("b", " six", 2), ("b", "", 2)]
    finals = [r for r, _ in answers[:-1] if "triton_final_response" in r.get_response().parameters]
    assert [(parameter(r, "finish_reason"), parameter(r, "prompt_tokens")) for r in finals] == [("length", 4),
                                                                                               ("stop", 2)]
    tensor, _ = answers[-1]
    assert tensor.get_response().id == "c" and tensor.as_numpy("y").tolist() == [[7.0]]
    # Each generation went to one replica on a ModelStreamInfer call of its own; its kind was asked once.
    assert sorted(r.id for replica in gen_stack.replicas for r in replica.generated) == ["a", "b"]
    assert sum(replica.config_requests for replica in gen_stack.replicas) == 2  # "gen" and "m", once each


async def test_aliases_and_versions_route_generations(gen_stack: GenStack) -> None:
    answers = await collect(gen_stack, request("x y", "canary", model="gen:canary"),
                            {**request("x y", "pinned"), "model_version": "2"}, request("x y", "default"))
    versions = {r.get_response().id: r.get_response().model_version for r, _ in answers}
    assert versions == {"canary": "2", "pinned": "2", "default": "1"}


async def test_unary_infer_of_a_generative_model_returns_the_whole_text(gen_stack: GenStack) -> None:
    async with tca.InferenceServerClient(gen_stack.address) as client:
        result = await client.infer("gen", prompt("alpha beta gamma", stream=False), headers=gen_stack.headers(),
                                    parameters={"max_tokens": 2})
    assert text_output(result.get_response()) == "alpha beta"
    assert parameter(result, "prompt_tokens") == 3 and parameter(result, "completion_tokens") == 2


async def test_a_unary_generation_is_charged_before_its_kind_is_known(gen_stack: GenStack) -> None:
    headers = gen_stack.headers(gen_stack.thrifty_token)
    words = " ".join(f"w{i}" for i in range(20))
    async with tca.InferenceServerClient(gen_stack.address) as client:
        # The gateway has not learnt that "gen" is generative yet: the answer's usage says so.
        await client.infer("gen", prompt(words, stream=False), headers=headers, parameters={"max_tokens": 4})
        await gen_stack.plane.kinds.decoupled("gen", 1, ("gen:production", ""))
        with pytest.raises(Exception, match="token quota exceeded"):
            await client.infer("gen", prompt("a", stream=False), headers=headers)


async def test_a_refusing_replica_hands_the_generation_to_another(gen_stack: GenStack) -> None:
    busy, idle = gen_stack.replicas
    busy.fail_with, busy.fail_as_application = grpc.StatusCode.RESOURCE_EXHAUSTED, True
    idle.fail_with, idle.fail_as_application = None, False
    for i in range(4):
        answers = await collect(gen_stack, request("p q", f"r{i}"))
        assert [error for _, error in answers] == [None] * 3
    assert [r.id for r in idle.generated] == ["r0", "r1", "r2", "r3"] and not busy.generated
    # Every replica refusing: the replica's own answer, in-band and final (the stream goes on).
    idle.fail_with, idle.fail_as_application = grpc.StatusCode.RESOURCE_EXHAUSTED, True
    answers = await collect(gen_stack, request("p q", "refused"), request("p q", "next"))
    assert ["replica says no" in error.message() for _, error in answers] == [True, True]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(gen_stack, request("p q", "status"), headers={"triton_grpc_error": "true"})
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_cancelling_the_stream_cancels_the_generation_upstream(gen_stack: GenStack) -> None:
    for replica in gen_stack.replicas:
        replica.token_delay_s = 0.05
    words = " ".join(f"w{i}" for i in range(200))

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield request(words, "long", max_tokens=200)
        await asyncio.sleep(30)

    async with tca.InferenceServerClient(gen_stack.address) as client:
        got = 0
        async for _result, error in client.stream_infer(requests(), headers=gen_stack.headers()):
            assert error is None
            got += 1
            if got == 3:
                break
    for _ in range(200):
        if any(r.cancelled for r in gen_stack.replicas):
            break
        await asyncio.sleep(0.02)
    assert [r.cancelled for r in gen_stack.replicas if r.generated] == [["long"]]
    assert not any(r.finished for r in gen_stack.replicas)


async def test_token_quota_refuses_once_used_up_and_charges_the_usage(gen_stack: GenStack) -> None:
    twelve = " ".join(f"t{i}" for i in range(12))
    first = await collect(gen_stack, request(twelve, "1", max_tokens=4), token=gen_stack.thrifty_token)
    assert first[-1][1] is None  # 12 prompt + 4 completion tokens of 20: admitted
    second = await collect(gen_stack, request(twelve, "2", max_tokens=4), token=gen_stack.thrifty_token)
    assert second[-1][1] is None  # 4 tokens left: admitted, the bucket goes below zero
    (_, error), = await collect(gen_stack, request(twelve, "3"), token=gen_stack.thrifty_token)
    assert "token quota exceeded" in error.message() and "retry after" in error.message()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(gen_stack, request("a", "4"), token=gen_stack.thrifty_token,
                      headers={"triton_grpc_error": "true"})
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Unary calls are held to it too; another key is not.
    async with tca.InferenceServerClient(gen_stack.address) as client:
        with pytest.raises(Exception, match="token quota exceeded"):
            await client.infer("gen", prompt("a", stream=False), headers=gen_stack.headers(gen_stack.thrifty_token))
        await client.infer("gen", prompt("a", stream=False), headers=gen_stack.headers())
        # Tensor models carry no tokens: the key still infers them.
        await client.infer("m", inputs([1.0]), headers=gen_stack.headers(gen_stack.thrifty_token))


async def test_generations_reach_the_monitor_with_their_usage_and_alias(gen_stack: GenStack) -> None:
    await collect(gen_stack, request("a b c d e", "g1", max_tokens=3), request("a b", "g2", model="gen:canary"))
    await gen_stack.reporter.flush()
    # The two ran side by side: the shorter one may finish first.
    records = sorted((r for r in gen_stack.monitor.records() if r.model == "gen"), key=lambda r: r.version)
    assert [(r.alias, r.version, r.status) for r in records] == [("production", 1, "OK"), ("canary", 2, "OK")]
    first, second = (r.generation for r in records)
    assert (first.prompt_tokens, first.completion_tokens, first.finish_reason) == (5, 3, "length")
    assert (second.prompt_tokens, second.completion_tokens, second.finish_reason) == (2, 2, "stop")
    assert first.ttft_us > 0 and first.itl_max_us >= first.itl_mean_us > 0


async def test_a_generation_on_a_stream_gets_the_generation_deadline(gen_stack: GenStack) -> None:
    gen_stack.plane.generation_timeout_s = 120.0
    await collect(gen_stack, request("a b", "deadline"), {"model_name": "m", "inputs": inputs([1.0])})
    remaining = [seen.time_remaining for replica in gen_stack.replicas for seen in replica.seen]
    # The generation: generation_timeout_s; the tensor request beside it: default_timeout_s (5 s).
    short, long = sorted(r or 0.0 for r in remaining)
    assert 4 < short <= 5.5 and 115 < long <= 121


async def test_a_replica_without_the_generation_stream_gets_model_stream_infer_and_no_try_is_lost(
        gen_stack: GenStack) -> None:
    # The doubles serve only the Triton protocol, like an inference service older than
    # aiaas.inference.v1.Generations: their UNIMPLEMENTED to GetLimits sends the generation on a
    # ModelStreamInfer call of its own, without it counting as one of the request's tries.
    replicas = gen_stack.plane.upstream.balancer.replicas
    for replica in replicas:
        replica.transport.mux_supported = None  # not asked yet
    attempts, gen_stack.plane.upstream.max_attempts = gen_stack.plane.upstream.max_attempts, 1
    try:
        answers = await collect(gen_stack, request("p q", "only-try"))
    finally:
        gen_stack.plane.upstream.max_attempts = attempts
    assert [error for _, error in answers] == [None] * 3
    assert [r.id for replica in gen_stack.replicas for r in replica.generated] == ["only-try"]
    (asked,) = [replica.address for replica in gen_stack.replicas if replica.generated]
    # The replica asked knows it (False); the other one was not asked (None).
    assert {r.address: r.transport.mux_supported for r in replicas} == {
        r.address: False if r.address == asked else None for r in gen_stack.replicas}
