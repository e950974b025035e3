"""`LoadedVersion.generate` over a real `GenerativeExecutor` (a sandboxed worker process running the engine),
in this test process as the service: each request ends in the statistics and in one `RequestRecord`
with its `GenerationStats`; a drain waits for running generations; an abandoned generation is
cancelled and counted; thread mode is refused with a clear message."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from aiaas import manifest
from aiaas.serving import ServingConfig
from services.common.errors import FailedPrecondition
from services.inference.core import LoadedVersion
from services.inference.entities import RequestRecord, VersionSpec, VersionState
from services.inference.generate_protocol import INPUTS, OUTPUTS
from services.inference.generative_workers import GenerativeExecutor, engine_config
from services.inference.settings import InferenceSettings
from tests.generative.models import write_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_checkpoint(tmp_path_factory.mktemp("executor") / "tiny-llama")
    for file in path.iterdir():  # readable by the worker's unprivileged user, as the artifact cache leaves it
        file.chmod(0o444)
    return path


def spec_for(checkpoint: Path, **serving: Any) -> VersionSpec:
    files, _ = manifest.scan(checkpoint)
    return VersionSpec(model="lm", version=1, format="hf_causal_lm", inputs=INPUTS, outputs=OUTPUTS,
                       serving=ServingConfig(**serving), sha256=manifest.digest(files)[0], files=files)


def message(prompt: str, max_tokens: int) -> dict[str, Any]:
    params = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}
    return {"request": {"prompt": prompt, "params": params}, "messages": None}


async def collect(chunks: AsyncIterator[Any]) -> list[Any]:
    return [chunk async for chunk in chunks]


async def _scenario(checkpoint: Path) -> None:
    records: list[RequestRecord] = []
    spec = spec_for(checkpoint, kv_cache_tokens=1024, max_num_seqs=4)
    lv = LoadedVersion(spec, records.append)
    executor = GenerativeExecutor(spec, checkpoint, InferenceSettings(torch_threads=1, grace_period_s=2))
    await executor.start()
    lv.executor, lv.state = executor, VersionState.READY
    assert lv.generative

    chunks = await collect(lv.generate(message("The quick brown fox", 8)))
    last = chunks[-1]
    assert last.finished and last.error is None and sum(c.tokens for c in chunks) == 8
    (record,) = records
    assert (record.model, record.version, record.status) == ("lm", 1, "OK")
    stats = record.generation
    assert stats is not None
    assert (stats.completion_tokens, stats.finish_reason) == (8, "length")
    assert stats.prompt_tokens == last.prompt_tokens > 1
    assert 0 < stats.ttft_us <= stats.generation_us + record.queue_ns // 1000
    assert 0 < stats.itl_mean_us <= stats.itl_max_us
    assert 0.0 <= stats.kv_cache_usage <= 1.0
    assert (lv.stats.success_count, lv.stats.fail_count, lv.in_flight) == (1, 0, 0)

    # A caller that stops reading cancels the generation in the worker; it counts as CANCELLED.
    abandoned = lv.generate(message("x", 400))
    assert not (await anext(abandoned)).finished
    await abandoned.aclose()
    assert records[-1].status == "CANCELLED" and lv.in_flight == 0 and lv.stats.fail_count == 1

    # A drain waits for the running generation, which finishes whole.
    running = asyncio.create_task(collect(lv.generate(message("def fibonacci(n):", 120))))
    await asyncio.sleep(0)
    assert lv.in_flight == 1
    drained = await lv.drain_and_close(timeout_s=120)
    finished = await running
    assert drained and finished[-1].finish_reason == "length" and sum(c.tokens for c in finished) == 120
    assert records[-1].status == "OK" and executor.pool.pids == []


def test_generations_are_counted_reported_cancelled_and_drained(checkpoint: Path) -> None:
    asyncio.run(_scenario(checkpoint))


def test_thread_mode_and_bad_engine_sizes_are_refused_before_loading(checkpoint: Path) -> None:
    with pytest.raises(FailedPrecondition, match="worker_mode=process"):
        engine_config(spec_for(checkpoint), InferenceSettings(worker_mode="thread"))
    with pytest.raises(FailedPrecondition, match="kv_cache_tokens"):
        engine_config(spec_for(checkpoint, kv_cache_tokens=8), InferenceSettings())
    fields = engine_config(spec_for(checkpoint, kv_cache_tokens=2048, max_num_seqs=3, max_queue_size=7,
                                    default_timeout_us=1_500_000), InferenceSettings())
    assert fields == {"kv_cache_tokens": 2048, "max_num_seqs": 3, "max_queue_size": 7, "default_timeout_s": 1.5,
                      "pack_weights": True, "compute_dtype": "auto"}
    assert engine_config(spec_for(checkpoint), InferenceSettings(pack_weights=False))["pack_weights"] is False
    assert engine_config(spec_for(checkpoint),
                         InferenceSettings(lm_compute_dtype="checkpoint"))["compute_dtype"] == "checkpoint"


def test_engine_vllm_is_refused_with_a_reason_where_it_cannot_run(checkpoint: Path, tmp_path: Path) -> None:
    """Without vLLM here, with a vllm_python that is not there, under worker_sandbox=require, with an
    interpreter that cannot import vllm (a real worker process says so), with a pickle in the checkpoint."""
    spec = spec_for(checkpoint, engine="vllm")
    with pytest.raises(FailedPrecondition, match="has no vllm: install it .* vllm_python"):
        GenerativeExecutor(spec, checkpoint, InferenceSettings())
    with pytest.raises(FailedPrecondition, match="is not an executable file"):
        GenerativeExecutor(spec, checkpoint, InferenceSettings(vllm_python=str(tmp_path / "nope")))
    with pytest.raises(FailedPrecondition, match="worker_sandbox=require"):
        GenerativeExecutor(spec, checkpoint, InferenceSettings(worker_sandbox="require", vllm_python=sys.executable))

    async def start(path: Path) -> None:
        executor = GenerativeExecutor(spec, path, InferenceSettings(vllm_python=sys.executable))
        try:
            await executor.start()
        finally:
            await executor.close()

    with pytest.raises(FailedPrecondition, match=r"cannot import vllm .*pip install 'aiaas\[vllm\]'"):
        asyncio.run(start(checkpoint))
    pickled = tmp_path / "pickled"
    shutil.copytree(checkpoint, pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(FailedPrecondition, match="checkpoint is refused"):
        asyncio.run(start(pickled))
