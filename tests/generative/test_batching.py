"""Continuous batching: requests join and leave every step, within the KV budget; cancel and timeout."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from aiaas.errors import ErrorCode, InvalidArgument, ResourceExhausted
from services.inference.generative import FinishReason, GenerationChunk, GenerationRequest, SamplingParams
from tests.generative.conftest import generate


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def _request(request_id: str, prompt: list[int], n: int, **kwargs: Any) -> GenerationRequest:
    return GenerationRequest(request_id, prompt_token_ids=tuple(prompt), params=_greedy(n), **kwargs)


def test_short_request_arriving_during_a_long_decode_finishes_first(make_engine: Any,
                                                                    prompt_ids: list[list[int]]) -> None:
    engine = make_engine(start=False)
    chunks: dict[str, list[GenerationChunk]] = {"long": [], "short": []}
    engine.submit(_request("long", prompt_ids[2], 200), sink=chunks["long"].append)
    for _ in range(10):
        engine.step()
    assert len(chunks["long"]) == 10
    engine.submit(_request("short", prompt_ids[0], 5), sink=chunks["short"].append)
    steps = 0
    while not chunks["short"] or not chunks["short"][-1].finished:
        engine.step()
        steps += 1
    assert steps == 5  # admitted at once, then one token per step: it did not wait for the long one
    assert len(chunks["long"]) == 15 and not chunks["long"][-1].finished
    assert [s.num_seqs for s in engine.step_metrics()[10:15]] == [2, 2, 2, 2, 2]
    joined = engine.step_metrics()[10]
    assert (joined.num_prefill_seqs, joined.num_decode_seqs) == (1, 1)  # its prefill ran beside the decode


def test_short_request_overtakes_a_long_stream_in_real_time(make_engine: Any, prompt_ids: list[list[int]]) -> None:
    engine = make_engine()
    finished: list[str] = []
    started = threading.Event()

    def sink(chunk: GenerationChunk) -> None:
        started.set()
        if chunk.finished:
            finished.append(chunk.request_id)

    engine.submit(_request("long", prompt_ids[2], 400), sink=sink)
    assert started.wait(60), "the long request produced no token"
    short = engine.submit(_request("short", prompt_ids[0], 8))
    assert short.result(60).finish_reason is FinishReason.LENGTH
    finished_when_short_done = list(finished)
    deadline = time.monotonic() + 120
    while len(finished) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert finished_when_short_done == [] and finished == ["long"]


def test_kv_budget_holds_under_64_concurrent_streams(make_engine: Any, reference: Any,
                                                     prompt_ids: list[list[int]]) -> None:
    budget_tokens = 512  # 32 blocks of 16: far less than 64 streams of up to 130 tokens want
    engine = make_engine(kv_cache_tokens=budget_tokens, block_size=16)
    # tokens x (keys, values) x layers x kv heads x head dim x fp32 bytes
    assert engine.cache.nbytes == budget_tokens * 2 * 2 * 2 * 16 * 4
    prompts = [prompt_ids[i % 5] for i in range(64)]
    lengths = [24 + (i % 5) * 4 for i in range(64)]

    async def stream(i: int) -> tuple[list[int], FinishReason | None]:
        tokens: list[int] = []
        reason = None
        async for chunk in engine.submit(_request(f"s{i}", prompts[i], lengths[i])):
            tokens.extend(chunk.token_ids)
            reason = chunk.finish_reason
        return tokens, reason

    async def run_all() -> list[tuple[list[int], FinishReason | None]]:
        return await asyncio.gather(*(stream(i) for i in range(64)))

    outcomes = asyncio.run(run_all())
    steps = engine.step_metrics()
    assert all(s.kv_blocks_used <= s.kv_blocks_total == 32 for s in steps)
    assert max(s.kv_blocks_used for s in steps) >= 28, "the budget was used, not left idle"
    assert max(s.waiting for s in steps) > 0, "requests waited in the queue for room"
    assert engine.pool.num_used == 0 and engine.pool.num_free == 32
    expected = {(i % 5, lengths[i]): None for i in range(64)}
    for key in expected:
        expected[key] = generate(reference, prompt_ids[key[0]], key[1])  # type: ignore[assignment]
    for i, (tokens, reason) in enumerate(outcomes):
        assert reason is FinishReason.LENGTH
        assert tokens == expected[(i % 5, lengths[i])], f"stream {i}"


def test_cancelling_a_stream_frees_its_blocks_for_a_waiting_request(make_engine: Any,
                                                                    prompt_ids: list[list[int]]) -> None:
    engine = make_engine(start=False, kv_cache_tokens=64, block_size=16)  # 4 blocks
    first = engine.submit(_request("first", prompt_ids[2], 16))  # a 44-token prompt: 3 blocks
    waiting = engine.submit(_request("waiting", prompt_ids[4], 4))  # 17 tokens: 2 blocks, 1 is free
    engine.step()
    engine.step()
    assert engine.pool.num_used == 3 and engine.queued == 1
    first.cancel()
    engine.step()  # the cancel frees the blocks before scheduling: the waiting request is admitted
    assert engine.queued == 0
    chunks = list(first)
    assert chunks[-1].finish_reason is FinishReason.CANCELLED and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2
    while engine.has_unfinished():
        engine.step()
    assert waiting.result(0).finish_reason is FinishReason.LENGTH
    assert engine.pool.num_used == 0


async def test_a_reader_that_goes_away_cancels_its_request(make_engine: Any, prompt_ids: list[list[int]]) -> None:
    engine = make_engine(kv_cache_tokens=256)
    handle = engine.submit(_request("gone", prompt_ids[2], 200))
    got_one = asyncio.Event()

    async def read() -> None:
        async for _ in handle:
            got_one.set()

    reader = asyncio.create_task(read())
    await asyncio.wait_for(got_one.wait(), 60)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    deadline = time.monotonic() + 60
    while engine.has_unfinished() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not engine.has_unfinished()
    assert engine.pool.num_used == 0
    last = list(handle)[-1]
    assert last.finish_reason is FinishReason.CANCELLED


def test_cancelling_a_queued_request(make_engine: Any, prompt_ids: list[list[int]]) -> None:
    engine = make_engine(start=False, max_num_seqs=1)
    running = engine.submit(_request("running", prompt_ids[0], 4))
    queued = engine.submit(_request("queued", prompt_ids[1], 4))
    engine.step()
    queued.cancel()
    engine.step()
    assert [c.finish_reason for c in queued] == [FinishReason.CANCELLED]
    assert engine.queued == 0
    while engine.has_unfinished():
        engine.step()
    assert running.result(0).finish_reason is FinishReason.LENGTH


def test_queue_timeout_answers_unavailable(make_engine: Any, prompt_ids: list[list[int]]) -> None:
    engine = make_engine(start=False, max_num_seqs=1)
    engine.submit(_request("busy", prompt_ids[0], 50))
    late = engine.submit(_request("late", prompt_ids[1], 4, timeout_s=0.05))
    engine.step()
    time.sleep(0.1)
    engine.step()
    result = late.result(0)
    assert result.finish_reason is FinishReason.TIMEOUT
    assert result.error_code is ErrorCode.UNAVAILABLE and result.error_message == "Request timeout expired"
    assert result.usage is not None and result.usage.completion_tokens == 0
    assert result.metrics is not None and result.metrics.queue_s >= 0.05
    assert engine.queued == 0


def test_a_full_queue_refuses_at_once(make_engine: Any, prompt_ids: list[list[int]]) -> None:
    engine = make_engine(start=False, max_queue_size=2)
    engine.submit(_request("a", prompt_ids[0], 4))
    engine.submit(_request("b", prompt_ids[0], 4))
    with pytest.raises(ResourceExhausted, match="queue is full"):
        engine.submit(_request("c", prompt_ids[0], 4))
    engine.step()  # both admitted: the queue has room again
    engine.submit(_request("c", prompt_ids[0], 4))


def test_requests_that_could_never_fit_are_refused(make_engine: Any, prompt_ids: list[list[int]]) -> None:
    engine = make_engine(start=False, kv_cache_tokens=64, block_size=16)
    with pytest.raises(InvalidArgument, match="exceeds the 64 tokens"):
        engine.submit(_request("big", prompt_ids[2], 30))  # 44 + 30 > 64
    with pytest.raises(InvalidArgument, match="at most 64"):
        engine.submit(_request("huge", prompt_ids[5], 1))  # a 91-token prompt
    with pytest.raises(InvalidArgument, match="already in use"):
        engine.submit(_request("dup", prompt_ids[0], 4))
        engine.submit(_request("dup", prompt_ids[0], 4))
