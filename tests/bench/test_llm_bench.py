"""The LLM serving benchmark's own machinery: the closed load loop, the prompts, the ratios, and the
vLLM server wrapper's failure path (a real process that cannot start). The clients against the real
services are exercised in tests/lm/test_gateway_generation.py."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from bench.bench_llm_service import mean_rows, ratios, round_order, text_prompts
from bench.llm_peers import VllmUnavailable, vllm_env, vllm_server
from bench.openai_load import OneRequest, Sample, run_load, stream_request
from tests.generative.models import train_tokenizer


async def test_closed_loop_keeps_concurrency_counts_requests_and_errors() -> None:
    in_flight = peak = 0
    seen: list[int] = []

    def one(worker: int) -> OneRequest:
        async def request(i: int) -> Sample:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.05)
            in_flight -= 1
            seen.append(i)
            if len(seen) == 8:  # the 5th measured request fails
                raise RuntimeError("boom")
            return Sample(ttft=0.002, gaps=[0.001] * 3, completion_tokens=4, prompt_tokens=7, e2e=0.05)

        return request

    result = await run_load(one, prompts=4, concurrency=3, requests=10, warmup=3)
    assert peak == 3  # never more than `concurrency` in flight
    assert len(seen) == 13  # 3 warm-up + 10 measured
    assert sorted(seen[3:]) == sorted(i % 4 for i in range(10))
    assert result.requests == 9 and result.errors == 1 and "boom" in result.error_samples[0]
    assert result.out_tokens == 36 and result.ttft_p50_ms == 2.0 and result.itl_p50_ms == 1.0
    assert result.prompt_tokens_p50 == 7 and result.burst_requests == 0
    assert result.out_tok_s == pytest.approx(36 / result.wall_s, rel=0.02)  # wall_s is rounded to 1 ms


def test_prompts_retokenize_to_exactly_their_length() -> None:
    tokenizer = train_tokenizer()
    texts, ids = text_prompts(tokenizer, 12, 32)
    assert len(texts) == 12 and len(set(texts)) == 12
    for text, expected in zip(texts, ids, strict=True):
        assert len(expected) == 32 and expected[0] == tokenizer.bos_token_id
        assert tokenizer(text)["input_ids"] == expected


def test_stream_request_carries_the_generate_protocol_fields() -> None:
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest.FromString(stream_request("m", "héllo", 64, "r1"))
    assert [i.name for i in request.inputs] == ["text_input", "stream"]
    assert request.raw_input_contents[0] == len("héllo".encode()).to_bytes(4, "little") + "héllo".encode()
    assert request.raw_input_contents[1] == b"\x01"
    params = request.parameters
    assert params["max_tokens"].int64_param == params["min_tokens"].int64_param == 64
    assert params["ignore_eos"].bool_param and params["temperature"].double_param == 0.0


def test_ratios_judge_goals_and_carry_busy() -> None:
    rows = [{"row": "naive", "concurrency": 1, "out_tok_s": 100.0, "ttft_p50_ms": 10.0, "busy": False},
            {"row": "static 16", "concurrency": 16, "out_tok_s": 900.0, "busy": False},
            {"row": "aiaas grpc", "concurrency": 16, "out_tok_s": 1000.0, "busy": True},
            {"row": "aiaas grpc", "concurrency": 1, "out_tok_s": 150.0, "ttft_p50_ms": 20.0, "busy": False},
            {"row": "gateway openai", "concurrency": 1, "out_tok_s": 140.0, "ttft_p50_ms": 12.0, "busy": False}]
    found = {r["ratio"]: r for r in ratios(rows)}
    assert found["aiaas grpc c=16 / naive, out tok/s"] == {"ratio": "aiaas grpc c=16 / naive, out tok/s",
                                                             "value": 10.0, "goal": ">= 8", "met": True,
                                                             "busy": True}
    assert found["aiaas grpc c=16 / static 16, out tok/s"]["met"]
    assert not found["aiaas grpc c=1 TTFT p50 / bare generate first token"]["met"]  # 2.0x
    assert found["gateway openai c=1 TTFT p50 / bare generate first token"]["met"]  # 1.2x
    assert found["gateway openai / aiaas grpc c=1, out tok/s"]["value"] == 0.93
    assert not any("vLLM" in name for name in found)  # no vLLM row, no vLLM ratio
    rows += [{"row": "gateway openai", "concurrency": 16, "out_tok_s": 800.0, "busy": False},
             {"row": "vllm openai", "concurrency": 16, "out_tok_s": 1000.0, "busy": False}]
    with_vllm = [r["ratio"] for r in ratios(rows) if "vLLM" in r["ratio"]]
    assert with_vllm == ["gateway openai c=16 / vLLM c=16, out tok/s"]  # the same client only


def test_vllm_server_that_cannot_start_raises_and_leaves_nothing(tmp_path: Path) -> None:
    # A python without vllm: the server process exits at once; the wrapper says so and names its log.
    log = tmp_path / "server.log"
    started = time.monotonic()
    with pytest.raises(VllmUnavailable, match="exited with 1 while starting") as failure, \
            vllm_server(Path(sys.executable), tmp_path, log=log, startup_timeout_s=60):
        pass
    assert str(log) in str(failure.value) and "vllm" in log.read_text()
    assert time.monotonic() - started < 30


def test_vllm_env_keeps_sockets_on_loopback_and_both_cores() -> None:
    env = vllm_env(Path(sys.executable))
    assert env["VLLM_HOST_IP"] == env["VLLM_LOOPBACK_IP"] == "127.0.0.1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert "LD_PRELOAD" not in env or "libiomp5" in env["LD_PRELOAD"]


def test_rounds_go_abba_and_rows_average_their_rounds() -> None:
    doors = ["a", "b", "c"]
    assert [round_order(doors, r) for r in range(4)] == [doors, doors[::-1], doors[::-1], doors]
    base = {"foreign_cores": 0.0, "busy": False, "errors": 0, "ttft_p50_ms": 10.0}
    rows = [{**base, "row": "aiaas grpc", "concurrency": 16, "out_tok_s": 900.0},
            {**base, "row": "gateway openai", "concurrency": 16, "out_tok_s": 870.0, "ttft_p50_ms": 30.0},
            {**base, "row": "gateway openai", "concurrency": 16, "out_tok_s": 910.0, "busy": True,
             "foreign_cores": 0.4, "errors": 1},
            {**base, "row": "aiaas grpc", "concurrency": 16, "out_tok_s": 880.0},
            {**base, "row": "aiaas grpc", "concurrency": 64, "out_tok_s": 1500.0}]
    merged = {(r["row"], r["concurrency"]): r for r in mean_rows(rows)}
    assert len(merged) == 3
    assert merged["aiaas grpc", 16]["out_tok_s"] == 890.0 and merged["aiaas grpc", 16]["rounds_out_tok_s"] == [900.0, 880.0]
    door = merged["gateway openai", 16]
    assert (door["out_tok_s"], door["ttft_p50_ms"], door["errors"], door["busy"], door["foreign_cores"]) == (
        890.0, 20.0, 1, True, 0.4)
    assert merged["aiaas grpc", 64]["rounds_out_tok_s"] == [1500.0]
