"""`aiaas.inference.v1.Generations/StreamGenerations` against the real inference service: many
generations on one stream, the events of one engine step in one message, each generation's text
what transformers' greedy `generate` makes, cancellation, and errors that end only their own
generation (services/inference/generations.py)."""

from __future__ import annotations

import asyncio
import collections
import struct
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2

from aiaas.inference.v1 import inference_pb2 as pb
from services.gateway.balancer import Balancer
from services.gateway.upstream import InferenceUpstream
from tests.inference_generative.conftest import Stack

METHOD = "/aiaas.inference.v1.Generations/StreamGenerations"


def generate_request(model: str, prompt: str, request_id: str, **params: Any) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, datatype, raw in (("text_input", "BYTES", struct.pack("<I", len(prompt.encode())) + prompt.encode()),
                                ("stream", "BOOL", b"\x01")):
        tensor = request.inputs.add(name=name, datatype=datatype)
        tensor.shape.append(1)
        request.raw_input_contents.append(raw)
    for key, value in {"temperature": 0.0, **params}.items():  # greedy unless told otherwise
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        elif isinstance(value, float):
            request.parameters[key].double_param = value
        else:
            request.parameters[key].int64_param = value
    return request.SerializeToString()


class Events:
    """A StreamGenerations call: start and cancel generations, read events per tag."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = channel.stream_stream(METHOD, request_serializer=pb.StreamGenerationsRequest.SerializeToString,
                                          response_deserializer=pb.StreamGenerationsResponse.FromString)()
        self.by_tag: dict[int, list[pb.GenerationEvent]] = collections.defaultdict(list)
        self.messages: list[pb.StreamGenerationsResponse] = []

    async def start(self, tag: int, request: bytes, timeout_s: float = 60.0) -> None:
        await self.call.write(pb.StreamGenerationsRequest(tag=tag, request=request, timeout_s=timeout_s))

    async def cancel(self, tag: int) -> None:
        await self.call.write(pb.StreamGenerationsRequest(tag=tag))

    async def until_last(self, *tags: int, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while not all(self.by_tag[t] and self.by_tag[t][-1].last for t in tags):
                await self.read_one()

    async def read_one(self) -> pb.StreamGenerationsResponse:
        message = await self.call.read()
        assert message is not grpc.aio.EOF
        self.messages.append(message)
        for event in message.events:
            self.by_tag[event.tag].append(event)
        return message

    def text(self, tag: int) -> str:
        parts = []
        for event in self.by_tag[tag]:
            assert not event.error_code, event.error_message
            response = service_pb2.ModelStreamInferResponse.FromString(event.response).infer_response
            raw = response.raw_output_contents[0] if response.raw_output_contents else b""
            parts.append(raw[4:].decode())
        return "".join(parts)


PROMPTS = ["the cat sat", "a dog ran far", "one two three", "hello there friend"]


async def test_many_generations_on_one_stream_equal_generate_and_share_messages(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.inference.address) as channel:
        events = Events(channel)
        for tag, prompt in enumerate(PROMPTS, start=1):
            await events.start(tag, generate_request("tiny-llm", prompt, f"g{tag}", max_tokens=12, ignore_eos=True))
        await events.until_last(*range(1, len(PROMPTS) + 1))
        await events.call.done_writing()
        assert await events.call.read() is grpc.aio.EOF  # half-closed and every generation ended: it ends
    for tag, prompt in enumerate(PROMPTS, start=1):
        _, reference = stack.reference("tiny-llm", prompt, 12, exact_length=True)
        assert events.text(tag) == reference
        finals = [e for e in events.by_tag[tag] if e.last]
        assert finals == [events.by_tag[tag][-1]]
        final = service_pb2.ModelStreamInferResponse.FromString(finals[0].response).infer_response
        assert final.id == f"g{tag}" and final.parameters["triton_final_response"].bool_param
        assert final.parameters["completion_tokens"].int64_param == 12
    total = sum(len(m.events) for m in events.messages)
    # Tokens of the same engine step travel together: far fewer messages than events.
    assert len(events.messages) < total / 2, (len(events.messages), total)
    assert max(len({e.tag for e in m.events}) for m in events.messages) >= 2


async def test_a_cancelled_generation_stops_and_frees_its_place(stack: Stack) -> None:
    # one-seq-llm runs one sequence at a time: the second generation only runs once the first is gone.
    async with grpc.aio.insecure_channel(stack.inference.address) as channel:
        events = Events(channel)
        await events.start(1, generate_request("one-seq-llm", "a long one", "long", max_tokens=400, ignore_eos=True))
        async with asyncio.timeout(60):
            while not events.by_tag[1]:
                await events.read_one()
        await events.cancel(1)
        await events.start(2, generate_request("one-seq-llm", "short", "short", max_tokens=3, ignore_eos=True))
        await events.until_last(2, timeout=60)
        await events.call.done_writing()
        async with asyncio.timeout(30):
            while await events.call.read() is not grpc.aio.EOF:
                pass
    assert not any(e.last for e in events.by_tag[1])  # cancelled: no final response
    assert len(events.by_tag[1]) < 400
    assert events.by_tag[2][-1].last and not events.by_tag[2][-1].error_code


@pytest.mark.parametrize(("request_bytes", "code", "words"), [
    (generate_request("no-such-model", "x", "missing", max_tokens=2), "NOT_FOUND", "no-such-model"),
    (b"\xff\xff not a request", "INVALID_ARGUMENT", "not a serialized ModelInferRequest"),
    (generate_request("tiny-llm", "x", "bad", max_tokens=-1), "INVALID_ARGUMENT", "max_tokens"),
])
async def test_an_error_ends_only_its_generation(stack: Stack, request_bytes: bytes, code: str, words: str) -> None:
    async with grpc.aio.insecure_channel(stack.inference.address) as channel:
        events = Events(channel)
        await events.start(1, request_bytes)
        await events.start(2, generate_request("tiny-llm", "the cat sat", "fine", max_tokens=4, ignore_eos=True))
        await events.until_last(1, 2)
        await events.call.done_writing()
    (error,) = events.by_tag[1]
    assert error.last and error.error_code == code and words in error.error_message and not error.response
    _, reference = stack.reference("tiny-llm", "the cat sat", 4, exact_length=True)
    assert events.text(2) == reference


async def test_a_generation_past_its_timeout_is_cancelled_with_deadline_exceeded(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.inference.address) as channel:
        events = Events(channel)
        await events.start(1, generate_request("tiny-llm", "the cat sat", "slow", max_tokens=480, ignore_eos=True),
                           timeout_s=0.05)
        await events.until_last(1)
        await events.call.done_writing()
    last = events.by_tag[1][-1]
    assert last.error_code == "DEADLINE_EXCEEDED" and "within its 0.05 s" in last.error_message


async def test_a_tag_already_running_ends_the_stream_with_invalid_argument(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.inference.address) as channel:
        events = Events(channel)
        request = generate_request("tiny-llm", "the cat sat", "twice", max_tokens=400, ignore_eos=True)
        await events.start(7, request)
        await events.start(7, request)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with asyncio.timeout(60):
                while True:
                    await events.read_one()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tag 7 is already running" in (caught.value.details() or "")


# --- the gateway's side: InferenceUpstream.stream over the multiplexed stream (generation_mux.py) ---

async def test_the_gateways_upstream_multiplexes_generations_and_cancels_on_close(stack: Stack) -> None:
    upstream = InferenceUpstream([stack.inference.address], Balancer(), max_message_bytes=64 << 20)
    await upstream.start()
    try:
        async def text_of(tag: int, prompt: str) -> str:
            parts = []
            async for raw in upstream.stream(generate_request("tiny-llm", prompt, f"u{tag}", max_tokens=10,
                                                              ignore_eos=True), timeout=60):
                response = service_pb2.ModelStreamInferResponse.FromString(raw).infer_response
                parts.append(response.raw_output_contents[0][4:].decode())
            return "".join(parts)

        texts = await asyncio.gather(*(text_of(i, p) for i, p in enumerate(PROMPTS)))
        assert texts == [stack.reference("tiny-llm", p, 10, exact_length=True)[1] for p in PROMPTS]
        (replica,) = upstream.balancer.replicas
        assert replica.transport.mux_supported and replica.outstanding == 0
        assert all(mux.running == 0 for mux in replica.transport._muxes)

        # Closing a generation early cancels it on the replica: one-seq-llm, which runs one sequence
        # at a time, then runs the next one at once, not after the ~2,000 tokens left of the first.
        loop = asyncio.get_running_loop()
        long = upstream.stream(generate_request("one-seq-llm", "long", "cut", max_tokens=2000, ignore_eos=True),
                               timeout=120)
        arrivals = []
        for _ in range(21):
            await anext(long)
            arrivals.append(loop.time())
        per_response = (arrivals[-1] - arrivals[0]) / 20
        await long.aclose()
        assert all(mux.running == 0 for mux in replica.transport._muxes)
        started = loop.time()
        short = [raw async for raw in upstream.stream(
            generate_request("one-seq-llm", "short", "next", max_tokens=2, ignore_eos=True), timeout=120)]
        assert len(short) >= 1
        assert loop.time() - started < max(200 * per_response, 0.5), (loop.time() - started, per_response)
    finally:
        await upstream.close()


@pytest.mark.parametrize("timeout_s", [float("nan"), float("inf"), -1.0])
async def test_a_timeout_that_is_no_number_of_seconds_is_refused(stack: Stack, timeout_s: float) -> None:
    async with grpc.aio.insecure_channel(stack.inference.address) as channel:
        events = Events(channel)
        await events.call.write(pb.StreamGenerationsRequest(
            tag=1, request=generate_request("tiny-llm", "the cat sat", "odd", max_tokens=3, ignore_eos=True),
            timeout_s=timeout_s, request_id="r" * 10_000))
        await events.start(2, generate_request("tiny-llm", "the cat sat", "fine", max_tokens=3, ignore_eos=True))
        await events.until_last(1, 2)
        await events.call.done_writing()
    (error,) = events.by_tag[1]
    assert error.error_code == "INVALID_ARGUMENT" and "timeout_s must be a finite number" in error.error_message
    assert events.by_tag[2][-1].last and not events.by_tag[2][-1].error_code
