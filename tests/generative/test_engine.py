"""The engine as a worker runs it: plain-value messages, metrics, close, and a failing model step."""

from __future__ import annotations

import json
import queue
import time
from typing import Any

import pytest

from aiaas.errors import ErrorCode, InvalidArgument, Unavailable
from services.inference.generative import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
)


def test_requests_and_chunks_cross_a_pipe_as_json(make_engine: Any, tokenizer: Any) -> None:
    """What a worker process does: JSON in, JSON chunks out through a sink, no pickles."""
    engine = make_engine()
    outbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    request = GenerationRequest("json", prompt="The quick brown fox", timeout_s=30,
                                params=SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=3,
                                                      stop=("zzz",), stop_token_ids=(5,)))
    wire = json.dumps(request.to_message())
    engine.submit(GenerationRequest.from_message(json.loads(wire)),
                  sink=lambda chunk: outbox.put(json.dumps(chunk.to_message()).encode()))
    chunks: list[GenerationChunk] = []
    while not chunks or not chunks[-1].finished:
        chunks.append(GenerationChunk.from_message(json.loads(outbox.get(timeout=60))))
    result = GenerationResult.from_chunks(chunks)
    assert result.usage is not None and result.usage.prompt_tokens == len(tokenizer("The quick brown fox")["input_ids"])
    assert result.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert result.usage.completion_tokens == len(result.token_ids) <= 12
    assert result.metrics is not None and len(result.metrics.inter_token_s) == len(result.token_ids) - 1
    with pytest.raises(InvalidArgument, match="unknown sampling parameters: best_of"):
        GenerationRequest.from_message({**request.to_message(), "params": {"best_of": 2}})


def test_request_and_step_metrics_add_up(make_engine: Any, prompt_ids: list[list[int]]) -> None:
    engine = make_engine(max_num_batched_tokens=32)
    handles = [engine.submit(GenerationRequest(f"m{i}", prompt_token_ids=tuple(p),
                                               params=SamplingParams(max_tokens=10 + i, temperature=0, ignore_eos=True)))
               for i, p in enumerate(prompt_ids)]
    results = [h.result(60) for h in handles]
    steps = engine.step_metrics()
    assert sum(s.sampled_tokens for s in steps) == sum(len(r.token_ids) for r in results)
    assert sum(s.prefill_tokens for s in steps) == sum(len(p) for p in prompt_ids)
    assert sum(s.finished for s in steps) == len(results)
    assert [s.step for s in steps] == list(range(1, len(steps) + 1))
    assert all(s.kv_blocks_used <= s.kv_blocks_total and s.duration_s > 0 for s in steps)
    for r in results:
        m = r.metrics
        assert m is not None and m.ttft_s is not None
        assert 0 <= m.queue_s <= m.ttft_s <= m.e2e_s
        assert len(m.inter_token_s) == m.completion_tokens - 1 and all(g >= 0 for g in m.inter_token_s)
        assert m.ttft_s + sum(m.inter_token_s) <= m.e2e_s + 1e-9


def test_close_ends_what_is_left_and_refuses_new_requests(make_engine: Any, prompt_ids: list[list[int]]) -> None:
    engine = make_engine(start=False, max_num_seqs=1)
    running = engine.submit(GenerationRequest("a", prompt_token_ids=tuple(prompt_ids[0]),
                                              params=SamplingParams(max_tokens=50, ignore_eos=True)))
    queued = engine.submit(GenerationRequest("b", prompt_token_ids=tuple(prompt_ids[0])))
    engine.step()
    engine.close()
    for handle in (running, queued):
        result = handle.result(0)
        assert result.finish_reason is FinishReason.ERROR and result.error_code is ErrorCode.UNAVAILABLE
    assert engine.pool.num_used == 0 and engine.queued == 0
    with pytest.raises(Unavailable, match="closing"):
        engine.submit(GenerationRequest("c", prompt_token_ids=tuple(prompt_ids[0])))


def test_a_failing_model_step_fails_every_request_and_the_engine_goes_on(make_engine: Any,
                                                                         prompt_ids: list[list[int]]) -> None:
    engine = make_engine()
    execute = engine.runner.execute

    def broken(*args: Any) -> Any:
        raise RuntimeError("the model fell over")

    engine.runner.execute = broken
    failed = engine.submit(GenerationRequest("f", prompt_token_ids=tuple(prompt_ids[0]))).result(60)
    assert failed.finish_reason is FinishReason.ERROR and failed.error_code is ErrorCode.INTERNAL
    assert "the model fell over" not in failed.error_message  # no internals leak to the caller
    assert engine.pool.num_used == 0
    engine.runner.execute = execute
    ok = engine.submit(GenerationRequest("ok", prompt_token_ids=tuple(prompt_ids[0]),
                                         params=SamplingParams(max_tokens=3))).result(60)
    assert ok.finish_reason in (FinishReason.LENGTH, FinishReason.STOP)


def test_a_failing_sink_loses_its_request_only(make_engine: Any, prompt_ids: list[list[int]]) -> None:
    engine = make_engine()
    seen: list[GenerationChunk] = []

    def broken_pipe(chunk: GenerationChunk) -> None:
        seen.append(chunk)
        if len(seen) == 3:
            raise BrokenPipeError("the service went away")

    engine.submit(GenerationRequest("dropped", prompt_token_ids=tuple(prompt_ids[2]),
                                    params=SamplingParams(max_tokens=200, ignore_eos=True)), sink=broken_pipe)
    other = engine.submit(GenerationRequest("other", prompt_token_ids=tuple(prompt_ids[0]),
                                            params=SamplingParams(max_tokens=20, ignore_eos=True)))
    assert other.result(60).finish_reason is FinishReason.LENGTH
    deadline = time.monotonic() + 60
    while engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.has_unfinished() and engine.pool.num_used == 0
    assert len(seen) == 3


def test_closing_a_running_engine_ends_streams_with_unavailable(make_engine: Any,
                                                                prompt_ids: list[list[int]]) -> None:
    engine = make_engine()
    handle = engine.submit(GenerationRequest("long", prompt_token_ids=tuple(prompt_ids[2]),
                                             params=SamplingParams(max_tokens=400, ignore_eos=True)))
    first = handle.get(timeout=60)
    assert first.token_ids and not first.finished
    engine.close(grace_s=0)
    last = list(handle)[-1]
    assert last.finish_reason is FinishReason.ERROR and last.error_code is ErrorCode.UNAVAILABLE
    assert not engine.has_unfinished() and engine.pool.num_used == 0


def test_close_with_grace_lets_running_requests_finish(make_engine: Any, prompt_ids: list[list[int]]) -> None:
    engine = make_engine()
    handle = engine.submit(GenerationRequest("graceful", prompt_token_ids=tuple(prompt_ids[0]),
                                             params=SamplingParams(max_tokens=30, ignore_eos=True)))
    engine.close(grace_s=60)
    result = handle.result(0)
    assert result.finish_reason is FinishReason.LENGTH and len(result.token_ids) == 30
