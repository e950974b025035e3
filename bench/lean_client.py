"""The lean closed-loop load generator every server in the side-by-side gets (`bench.side_by_side`).

A bare grpc.aio channel sends pre-built, pre-serialized requests (one row of raw FP32 each) and
reads the answers as bytes: no client library, no per-request encoding, so that client cost does not
decide a comparison on a few shared cores (the approach of shared/peers/v2_lean_client.py). KServe
v2 servers (aiaas, Triton, MLServer) get `ModelInfer`; TorchServe gets its own `Predictions`, whose
request is encoded here by hand (three protobuf fields), so no generated stubs are needed.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from services.gateway.wire import length_delimited

KSERVE_INFER = "/inference.GRPCInferenceService/ModelInfer"
TORCHSERVE_PREDICT = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"
DISTINCT_REQUESTS = 64
MAX_MESSAGE = 64 << 20


_field = length_delimited  # the gateway's own protobuf field writer


def torchserve_request(model: str, data: bytes) -> bytes:
    """PredictionsRequest{model_name=1, input=3 (map<string, bytes>): {"data": data}}."""
    entry = _field(1, b"data") + _field(2, data)
    return _field(1, model.encode()) + _field(3, entry)


def torchserve_prediction(reply: bytes) -> bytes:
    """PredictionResponse.prediction (field 1, bytes) from its wire form."""
    index = 0
    while index < len(reply):
        key, index = _read_varint(reply, index)
        if key & 7 != 2:
            raise ValueError(f"unexpected wire type in PredictionResponse: {key & 7}")
        size, index = _read_varint(reply, index)
        if key >> 3 == 1:
            return reply[index:index + size]
        index += size
    return b""


def _read_varint(data: bytes, index: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        byte = data[index]
        index += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index
        shift += 7
    raise ValueError("varint too long")


def kserve_request(model: str, input_name: str, x: np.ndarray) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype(np.float32).tobytes())
    return request.SerializeToString()  # type: ignore[no-any-return]


def kserve_output(reply: bytes) -> np.ndarray:
    response = service_pb2.ModelInferResponse.FromString(reply)
    tensor = response.outputs[0]
    if response.raw_output_contents:
        return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(tuple(tensor.shape))
    return np.asarray(tensor.contents.fp32_contents, np.float32).reshape(tuple(tensor.shape))


class Target:
    """One server and model as the load generator sees it: a method and a request builder."""

    def __init__(self, label: str, address: str, model: str, features: int, protocol: str = "kserve",
                 input_name: str = "x", metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.label = label
        self.address = address
        self.model = model
        self.features = features
        self.protocol = protocol
        self.input_name = input_name
        self.metadata = tuple(metadata) or None

    @property
    def method(self) -> str:
        return TORCHSERVE_PREDICT if self.protocol == "torchserve" else KSERVE_INFER

    def request(self, x: np.ndarray) -> bytes:
        if self.protocol == "torchserve":
            return torchserve_request(self.model, x.astype(np.float32).tobytes())
        return kserve_request(self.model, self.input_name, x)

    def output(self, reply: bytes, rows: int) -> np.ndarray:
        if self.protocol == "torchserve":
            return np.frombuffer(torchserve_prediction(reply), np.float32).reshape(rows, -1)
        return kserve_output(reply)


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def tree_cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) of these processes and everything under them, as /proc has it now:
    a server's whole cost, its worker, frontend and helper processes included."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for proc in procs:
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
    return total


async def _closed_loop(call: Callable[[int], Awaitable[Any]], n: int, concurrency: int,
                       deadline: float) -> tuple[list[float | None], list[str]]:
    counter = itertools.count()
    latencies: list[float | None] = []
    errors: list[str] = []

    async def worker() -> None:
        while True:
            index = next(counter)
            if index >= n or time.perf_counter() > deadline:
                return
            started = time.perf_counter()
            try:
                await call(index)
                latencies.append(time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                if len(errors) < 3:
                    errors.append(repr(exc)[:200])
                latencies.append(None)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


async def check(target: Target, x: np.ndarray) -> np.ndarray:
    """One request with `x`; the output, for comparing with the model run in this process."""
    async with grpc.aio.insecure_channel(target.address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE)]) as channel:
        reply = await channel.unary_unary(target.method)(target.request(x), timeout=30, metadata=target.metadata)
    return target.output(reply, x.shape[0])


async def run(target: Target, concurrency: int, n: int, *, warmup: int = 200, cap_s: float = 20.0,
              connections: int = 1, server_pids: Sequence[int] = ()) -> dict[str, Any]:
    """`n` single-row requests from `concurrency` closed-loop callers (after `warmup` unmeasured ones),
    spread in turn over `connections` TCP connections (a fleet of clients opens many; a server that
    accepts on several cores gets each connection on one of them). With `server_pids`, the servers'
    CPU over the measured window (their process trees, /proc) is reported per answered request."""
    rng = np.random.default_rng(0)
    payloads = [target.request(rng.standard_normal((1, target.features), dtype=np.float32))
                for _ in range(DISTINCT_REQUESTS)]
    options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target.address, options=options) for _ in range(max(1, connections))]
    try:
        methods = [channel.unary_unary(target.method) for channel in channels]
        metadata = target.metadata
        count = len(methods)

        async def call(index: int) -> None:
            reply = await methods[index % count](payloads[index % DISTINCT_REQUESTS], timeout=30, metadata=metadata)
            if not reply:
                raise RuntimeError("empty answer")

        await _closed_loop(call, warmup, concurrency, time.perf_counter() + cap_s)
        server0 = tree_cpu_seconds(server_pids) if server_pids else 0.0
        cpu0, started = cpu_seconds(), time.perf_counter()
        latencies, errors = await _closed_loop(call, n, concurrency, started + cap_s)
        wall, cpu1 = time.perf_counter() - started, cpu_seconds()
        server_s = tree_cpu_seconds(server_pids) - server0 if server_pids else None
    finally:
        for channel in channels:
            await channel.close()
    ok = sorted(x for x in latencies if x is not None)

    def pct(q: float) -> float:
        return ok[min(len(ok) - 1, int(q * len(ok)))] * 1e3 if ok else float("nan")

    return {"label": target.label, "model": target.model, "concurrency": concurrency, "ok": len(ok),
            "rps": len(ok) / wall, "p50_ms": pct(0.5), "p99_ms": pct(0.99), "errors": len(latencies) - len(ok),
            "error_samples": errors, "client_cores": (cpu1 - cpu0) / wall, "connections": count,
            "server_cpu_us": server_s / len(ok) * 1e6 if server_s is not None and ok else None,
            "server_cores": server_s / wall if server_s is not None else None}
