"""The wire between a generative worker and the service, without processes: the worker's per-step
chunk batches, the service's reading of them, the merging of chunks a slow reader let pile up, and
the default number of torch threads an engine gets.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from services.common.cpus import cgroup_quota_cores
from services.common.errors import Unavailable
from services.inference import _worker_replies as worker_side
from services.inference import generative_workers as service_side
from services.inference.generative import EngineConfig, GenerationRequest, GenerativeEngine, SamplingParams
from services.inference.settings import InferenceSettings
from tests.generative.models import write_checkpoint


class _Collect:
    """A `_Sender` stand-in that keeps what would go down the pipe (the real one needs a process)."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def send_bytes(self, data: bytes) -> None:
        self.messages.append(data)


def _wire(request_id: str, text: str, **last: Any) -> dict[str, Any]:
    wire: dict[str, Any] = {"id": request_id, "text": text, "tokens": 1}
    if last:
        wire.update({name: 0 for name in service_side._INT_FIELDS})
        wire.update({"stop": None, "error_code": None, "error": "", **last})
    return wire


def test_a_step_of_chunks_is_one_message_and_the_service_reads_every_chunk() -> None:
    sink = _Collect()
    batch = worker_side.ChunkBatch(sink)  # type: ignore[arg-type]
    for i in range(16):
        batch.add(_wire(f"g{i}", f" tok{i}"))
    batch.add(_wire("g16", "!", finish="length", completion_tokens=64))
    assert sink.messages == []  # nothing leaves before the round ends
    batch.flush()
    batch.flush()  # an empty round sends nothing
    assert len(sink.messages) == 1
    service_end, worker_end = multiprocessing.Pipe()
    worker_end.send_bytes(sink.messages[0])
    message = service_side._read_reply(service_end)
    assert message[0] == "chunks"
    parsed = [service_side.parse_chunk(wire) for wire in message[1]]
    assert [request_id for request_id, _ in parsed] == [f"g{i}" for i in range(17)]
    assert parsed[3][1].text == " tok3" and not parsed[3][1].finished
    assert parsed[-1][1].finish_reason == "length" and parsed[-1][1].completion_tokens == 64


def test_a_batch_that_would_pass_the_reply_limit_is_cut_into_several_messages() -> None:
    sink = _Collect()
    batch = worker_side.ChunkBatch(sink)  # type: ignore[arg-type]
    big = "\u00e9" * worker_side.MAX_TEXT_CHARS  # 6 bytes each once JSON-escaped
    for i in range(8):
        batch.add(_wire(f"g{i}", big))
    batch.flush()
    assert len(sink.messages) > 1
    assert all(len(m) <= service_side._MAX_REPLY_BYTES for m in sink.messages)
    ids = [wire["id"] for m in sink.messages for wire in json.loads(m)[1]]
    assert ids == [f"g{i}" for i in range(8)]  # every chunk, in order


def test_the_engine_hands_each_step_over_in_one_round(tmp_path: Path) -> None:
    """After-deliver runs once per round, after every chunk of that step: no request twice in a round."""
    rounds: list[list[str]] = []
    current: list[str] = []

    def sink(chunk: Any) -> None:
        current.append(chunk.request_id)

    def after_deliver() -> None:
        if current:
            rounds.append(list(current))
            current.clear()

    engine = GenerativeEngine.from_pretrained(write_checkpoint(tmp_path), EngineConfig(kv_cache_tokens=2048),
                                              after_deliver=after_deliver)
    try:
        for i in range(3):
            engine.submit(GenerationRequest(f"r{i}", prompt="The quick brown fox" * (i + 1),
                                            params=SamplingParams(max_tokens=6 + i, ignore_eos=True)), sink=sink)
        while engine.step() is not None or engine.has_unfinished():
            pass
    finally:
        engine.close()
    assert current == []  # nothing delivered after the last round
    assert all(len(r) == len(set(r)) for r in rounds)
    assert max(len(r) for r in rounds) == 3  # the three decode together
    assert sum(r.count("r2") for r in rounds) == 8 + 1 - 1  # one chunk per token (the last one ends it)


async def test_a_reader_that_falls_behind_gets_the_piled_up_chunks_merged() -> None:
    stream = service_side._Stream()
    for text in ("a", "b", "c"):
        stream.put(service_side.Chunk(text, 1))
    merged = await stream.take()
    assert isinstance(merged, service_side.Chunk)
    assert (merged.text, merged.tokens, merged.finished) == ("abc", 3, False)
    stream.put(service_side.Chunk("d", 1))
    stream.put(service_side.Chunk("e", 2, finish_reason="stop", completion_tokens=6))
    stream.put(service_side.Chunk("never", 1))  # nothing is merged past the last chunk
    last = await stream.take()
    assert isinstance(last, service_side.Chunk)
    assert (last.text, last.tokens, last.finish_reason, last.completion_tokens) == ("de", 3, "stop", 6)
    stream.put(service_side.Chunk("x", 1))
    stream.put(Unavailable("gone"))
    stream.put(service_side.Chunk("y", 1))
    first = await stream.take()
    assert isinstance(first, service_side.Chunk) and first.text == "neverx"  # stops at the error
    assert isinstance(await stream.take(), Unavailable)
    after = await stream.take()
    assert isinstance(after, service_side.Chunk) and after.text == "y"
    waiter = asyncio.ensure_future(stream.take())
    await asyncio.sleep(0.01)
    assert not waiter.done()  # an empty stream waits
    stream.put(service_side.Chunk("z", 1))
    assert (await asyncio.wait_for(waiter, 5)).text == "z"  # type: ignore[union-attr]


async def test_a_chunks_message_without_a_list_of_good_chunks_kills_the_worker() -> None:
    for bad in (["chunks", []], ["chunks", {"id": "g1"}], ["chunks", [_wire("g1", "ok"), {"id": "g2", "text": 3}]],
                ["chunks", [_wire("g1", "x", finish="nope")]]):
        pool = service_side.GenerativeWorkerPool(None, name="m/1", instance_count=1)  # type: ignore[arg-type]
        pool._closed = True  # no restart
        gen = service_side._GenWorker(pool, 0)
        service_end, worker_end = multiprocessing.Pipe()
        gen.conn, gen.alive = service_end, True
        stream = service_side._Stream()
        gen.streams["g1"] = stream
        asyncio.get_running_loop().add_reader(service_end.fileno(), gen._on_readable)
        worker_end.send_bytes(json.dumps(bad).encode())
        item = await asyncio.wait_for(stream.take(), 5)
        assert isinstance(item, Unavailable), bad  # nothing of the message was delivered
        assert not gen.alive and "broke the protocol" in gen.end_reason


@pytest.mark.parametrize(("threads", "instances", "cores", "expected"), [
    (0, 1, 2, 1), (0, 1, 16, 15), (0, 2, 16, 7), (0, 4, 2, 1), (3, 1, 2, 3), (0, 1, 1, 1),
])
def test_engine_threads_leave_a_core_to_the_frontend(threads: int, instances: int, cores: int,
                                                     expected: int) -> None:
    settings = InferenceSettings(torch_threads=threads)
    assert service_side.engine_threads(settings, instances, cores) == expected


def test_cgroup_quota_is_read_from_v2_then_v1(tmp_path: Path) -> None:
    v2, quota, period = tmp_path / "cpu.max", tmp_path / "quota", tmp_path / "period"
    missing = tmp_path / "missing"
    v2.write_text("150000 100000\n")
    assert cgroup_quota_cores(v2, missing, missing) == 1.5
    v2.write_text("max 100000\n")
    assert cgroup_quota_cores(v2, missing, missing) is None
    quota.write_text("-1\n")
    period.write_text("100000\n")
    assert cgroup_quota_cores(missing, quota, period) is None
    quota.write_text("250000\n")
    assert cgroup_quota_cores(missing, quota, period) == 2.5
    assert cgroup_quota_cores(missing, missing, missing) is None
