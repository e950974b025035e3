"""Lean streaming load clients for LLM servers: closed loop, c workers, TTFT / ITL / output tokens per second.

Two clients share one closed loop (`run_load`): each of `concurrency` workers sends its next request
when its previous one has finished, until `requests` are done; a few warm-up requests go first and are
not measured. Every request asks for exactly `max_tokens` tokens, greedy (temperature 0, ignore_eos,
min_tokens), streamed.

* `openai_stream`: OpenAI-compatible `POST /v1/completions` over aiohttp (vLLM's server, the gateway's
  OpenAI door), `stream: true` with `stream_options.include_usage`; parses the SSE lines itself.
* `triton_stream`: Triton's decoupled `ModelStreamInfer` over a bare grpc.aio stream (the inference
  service directly, or the gateway's gRPC door), requests serialized once before the clock starts,
  per docs/generative.md "Serving protocol": `text_input` and `stream` inputs, parameters
  `max_tokens`, `min_tokens`, `ignore_eos`, `temperature`. One bidi stream per worker carries that
  worker's requests one after another (as `tritonclient`'s `start_stream` does).

TTFT = send -> first chunk with tokens; ITL = gaps between successive chunks with tokens (what the
client sees; a chunk may carry more than one token); out tok/s = completion tokens (as the server
counts them) / wall time of the measured part.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import grpc
from tritonclient.grpc import service_pb2 as pb

STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
REQUEST_TIMEOUT_S = 300.0


@dataclasses.dataclass
class Sample:
    """One finished request as the client saw it."""

    ttft: float
    gaps: list[float]
    completion_tokens: int
    prompt_tokens: int
    e2e: float


@dataclasses.dataclass
class LoadResult:
    concurrency: int
    requests: int
    errors: int
    error_samples: list[str]
    wall_s: float
    out_tokens: int
    out_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    e2e_p50_ms: float
    prompt_tokens_p50: float
    # Requests whose first chunk came after half their e2e time: the stream arrived in a lump.
    burst_requests: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


OneRequest = Callable[[int], Awaitable[Sample]]


async def run_load(one: Callable[[int], OneRequest], prompts: int, concurrency: int, requests: int,
                   warmup: int) -> LoadResult:
    """Closed loop: worker w calls `one(w)(i)` for the next request index i until `requests` are done.

    `one(w)` makes worker w's request function (so a worker may keep a stream open); `i % prompts`
    picks the prompt. Warm-up requests (`warmup`, spread over the workers) are not measured.
    """
    workers = [one(w) for w in range(concurrency)]
    await asyncio.gather(*(workers[w % concurrency](prompts - 1 - w) for w in range(warmup)))
    samples: list[Sample] = []
    errors: list[str] = []
    next_index = 0

    async def worker(request: OneRequest) -> None:
        nonlocal next_index
        while next_index < requests:
            i = next_index
            next_index += 1
            try:
                samples.append(await request(i % prompts))
            except Exception as exc:  # noqa: BLE001 - counted and shown, the run goes on
                errors.append(repr(exc)[:300])

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in workers))
    wall = time.perf_counter() - start
    tokens = sum(s.completion_tokens for s in samples)
    ttfts = [s.ttft for s in samples]
    gaps = [g for s in samples for g in s.gaps]
    return LoadResult(
        concurrency=concurrency, requests=len(samples), errors=len(errors), error_samples=errors[:3],
        wall_s=round(wall, 3), out_tokens=tokens, out_tok_s=round(tokens / wall, 1),
        ttft_p50_ms=round(pct(ttfts, 0.5) * 1e3, 2), ttft_p99_ms=round(pct(ttfts, 0.99) * 1e3, 2),
        itl_p50_ms=round(pct(gaps, 0.5) * 1e3, 2), itl_p99_ms=round(pct(gaps, 0.99) * 1e3, 2),
        e2e_p50_ms=round(pct([s.e2e for s in samples], 0.5) * 1e3, 1),
        prompt_tokens_p50=pct([s.prompt_tokens for s in samples], 0.5),
        burst_requests=sum(1 for s in samples if s.ttft > 0.5 * s.e2e))


# ---- OpenAI-compatible HTTP --------------------------------------------------------------------------------


def completion_body(model: str, prompt: str, max_tokens: int) -> bytes:
    return json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
                       "ignore_eos": True, "temperature": 0.0, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()


async def _sse_request(session: aiohttp.ClientSession, url: str, body: bytes) -> Sample:
    started = time.perf_counter()
    last = 0.0
    ttft: float | None = None
    gaps: list[float] = []
    usage: dict[str, Any] = {}
    async with session.post(url, data=body, headers={"content-type": "application/json"},
                            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
        buffer = b""
        async for data in response.content.iter_any():
            now = time.perf_counter()
            buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if chunk.get("error"):
                        raise RuntimeError(f"in-stream error: {str(chunk['error'])[:300]}")
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    if any(c.get("text") for c in chunk.get("choices") or ()):
                        if ttft is None:
                            ttft = now - started
                        else:
                            gaps.append(now - last)
                        last = now
    if ttft is None or not usage:
        raise RuntimeError(f"stream ended without {'text' if ttft is None else 'usage'}")
    return Sample(ttft, gaps, int(usage["completion_tokens"]), int(usage["prompt_tokens"]),
                  time.perf_counter() - started)


async def openai_stream(base_url: str, model: str, prompts: Sequence[str], *, concurrency: int, requests: int,
                        max_tokens: int = 64, warmup: int = 8, api_key: str | None = None) -> LoadResult:
    """Stream completions from `base_url` (e.g. http://127.0.0.1:8000/v1) at `concurrency`."""
    bodies = [completion_body(model, p, max_tokens) for p in prompts]
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/completions"
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        def one(_: int) -> OneRequest:
            return lambda i: _sse_request(session, url, bodies[i])

        return await run_load(one, len(bodies), concurrency, requests, min(warmup, concurrency))


# ---- Triton ModelStreamInfer over gRPC ---------------------------------------------------------------------


def stream_request(model: str, prompt: str, max_tokens: int, request_id: str = "") -> bytes:
    """A serialized ModelInferRequest for the generate protocol: exactly `max_tokens` greedy tokens, streamed."""
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    text = prompt.encode()
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    request.inputs.add(name="stream", datatype="BOOL", shape=[1])
    request.raw_input_contents.extend([struct.pack("<I", len(text)) + text, b"\x01"])
    request.parameters["max_tokens"].int64_param = max_tokens
    request.parameters["min_tokens"].int64_param = max_tokens
    request.parameters["ignore_eos"].bool_param = True
    request.parameters["temperature"].double_param = 0.0
    return request.SerializeToString()


class _StreamWorker:
    """One worker's bidi stream; its requests go one after another on it.

    Requests reach the stream through a queue that grpc's own request iterator drains, so a stream
    the server ends (a bad key, say) fails the read with the server's status, not a local write error.
    """

    def __init__(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...],
                 requests: Sequence[bytes]) -> None:
        self._open = channel.stream_stream(STREAM_METHOD, request_serializer=None,
                                           response_deserializer=pb.ModelStreamInferResponse.FromString)
        self._metadata = metadata
        self._requests = requests
        self._call: Any = None
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue()

    @staticmethod
    async def _drain(outbox: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
        while (request := await outbox.get()) is not None:
            yield request

    async def __call__(self, i: int) -> Sample:
        if self._call is None:
            self._outbox = asyncio.Queue()
            self._call = self._open(self._drain(self._outbox), metadata=self._metadata)
        call = self._call
        try:
            return await self._one(call, self._outbox, self._requests[i])
        except BaseException as exc:
            # The stream is unusable after a failure: the worker's next request opens a new one.
            self._call = None
            self._outbox.put_nowait(None)
            code = None
            if not isinstance(exc, asyncio.CancelledError):
                with contextlib.suppress(asyncio.TimeoutError):  # the status the server ended it with
                    code = await asyncio.wait_for(call.code(), 2.0)
            call.cancel()
            if code not in (None, grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                raise RuntimeError(f"{code.name}: {await call.details()}") from exc
            raise

    @staticmethod
    async def _one(call: Any, outbox: asyncio.Queue[bytes | None], request: bytes) -> Sample:
        started = last = time.perf_counter()
        outbox.put_nowait(request)
        ttft: float | None = None
        gaps: list[float] = []
        seen = 0
        while True:
            response = await asyncio.wait_for(call.read(), REQUEST_TIMEOUT_S)
            now = time.perf_counter()
            if response is grpc.aio.EOF:
                raise RuntimeError("stream closed before the final response")
            if response.error_message:
                raise RuntimeError(f"in-stream error: {response.error_message[:300]}")
            params = response.infer_response.parameters
            tokens = params["completion_tokens"].int64_param
            if tokens > seen:
                if ttft is None:
                    ttft = now - started
                else:
                    gaps.append(now - last)
                last, seen = now, tokens
            if params["triton_final_response"].bool_param:
                if ttft is None:
                    raise RuntimeError("final response without tokens")
                return Sample(ttft, gaps, tokens, params["prompt_tokens"].int64_param, now - started)

    async def close(self) -> None:
        if self._call is not None:
            self._outbox.put_nowait(None)  # ends the request iterator: the client half-closes
            self._call.cancel()


async def triton_stream(address: str, model: str, prompts: Sequence[str], *, concurrency: int, requests: int,
                        max_tokens: int = 64, warmup: int = 8, api_key: str | None = None) -> LoadResult:
    """Stream generations over `ModelStreamInfer` from `address` (host:port) at `concurrency`."""
    payloads = [stream_request(model, p, max_tokens, f"r{i}") for i, p in enumerate(prompts)]
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    options = [("grpc.max_receive_message_length", 16 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        workers: list[_StreamWorker] = []

        def one(_: int) -> OneRequest:
            workers.append(_StreamWorker(channel, metadata, payloads))
            return workers[-1]

        try:
            return await run_load(one, len(payloads), concurrency, requests, min(warmup, concurrency))
        finally:
            for w in workers:
                await w.close()
