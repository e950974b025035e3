"""Engine micro-benchmark: what the batcher and the worker IPC add on top of calling the model.

Run: .venv/bin/python -m bench.bench_engine [--quick] [--device cuda:0]

1. Latency at concurrency 1 on a 10-50-10 MLP: the model called directly (hot loop, and with an
   idle gap before each call, as a server sees it), the in-process thread runner, the worker
   pool round trip (shared memory + pipe), and batcher + worker pool.
2. Throughput at concurrency 64 (one row per request) on a 256-2048-2048-256 MLP: the model
   called in-process on batches of 32, against batcher + worker pool(s).
Every figure comes from this one run; the ratios are what matter on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable

import numpy as np
import torch

from aiaas.runtime import load_model
from services.inference.batcher import BatchingConfig, DynamicBatcher
from services.inference.workers import InProcessRunner, WorkerPool
from tests.inference.models import Artifact, write_mlp


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _row(label: str, samples_us: list[float], base: float | None = None) -> str:
    p50 = statistics.median(samples_us)
    extra = f"  (+{p50 - base:6.1f} us over direct)" if base is not None else ""
    return f"  {label:<34} p50 {p50:7.1f} us  p90 {_pct(samples_us, 0.9):7.1f} us{extra}"


async def _time_calls(call: Callable[[], Awaitable[object]], n: int, gap_s: float = 0.0) -> list[float]:
    for _ in range(max(20, n // 10)):
        await call()
    samples = []
    for _ in range(n):
        if gap_s:
            time.sleep(gap_s)  # noqa: ASYNC251 - an idle gap (loop included), like the wait for the next request
        t0 = time.perf_counter_ns()
        await call()
        samples.append((time.perf_counter_ns() - t0) / 1e3)
    return samples


def _kwargs(artifact: Artifact, **extra: object) -> dict:
    return dict(artifact_path=artifact.path, format=artifact.format, inputs=artifact.inputs,
                outputs=artifact.outputs, **extra)  # fmt: skip


async def latency(directory: str, n: int, device: str) -> None:
    artifact = write_mlp(directory, "torchscript", (10, 50, 10))
    x = {"input": np.random.default_rng(0).standard_normal((1, 10)).astype(np.float32)}
    model = load_model(
        artifact.path, artifact.format, artifact.inputs, artifact.outputs, device=device, threads=1
    )

    async def direct() -> object:
        return model.run(x)

    print("c=1 latency, 10-50-10 MLP, 1 row")
    hot = await _time_calls(direct, n)
    gap = 0.0005
    cold = await _time_calls(direct, n // 2, gap)
    base = statistics.median(cold)
    print(_row("direct model call (hot loop)", hot))
    print(_row("direct model call (0.5 ms idle gap)", cold))

    runner = InProcessRunner(**_kwargs(artifact, max_batch_size=8, torch_threads=1, device=device))
    await runner.start()
    print(_row("in-process thread runner", await _time_calls(lambda: runner.run_batch(x), n // 2, gap), base))
    await runner.close()

    pool = WorkerPool(**_kwargs(artifact, max_batch_size=8, torch_threads=1, device=device))
    await pool.start()
    print(_row("worker pool round trip", await _time_calls(lambda: pool.run_batch(x), n // 2, gap), base))
    batcher = DynamicBatcher(pool.run_batch, BatchingConfig(max_batch_size=8))
    print(_row("batcher + worker pool", await _time_calls(lambda: batcher.submit(x), n // 2, gap), base))
    hot_batched = await _time_calls(lambda: batcher.submit(x), n)
    print(_row("batcher + worker pool (hot loop)", hot_batched, statistics.median(hot)))
    await batcher.close()
    await pool.close()


async def _drive(submit: Callable[[dict], Awaitable[object]], concurrency: int, seconds: float) -> float:
    x = {"input": np.random.default_rng(1).standard_normal((1, 256)).astype(np.float32)}
    done = 0
    stop = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await submit(x)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def throughput(directory: str, seconds: float, device: str) -> None:
    artifact = write_mlp(directory, "torchscript", (256, 2048, 2048, 256))
    model = load_model(artifact.path, artifact.format, artifact.inputs, artifact.outputs, device=device)
    batch = {"input": np.random.default_rng(2).standard_normal((32, 256)).astype(np.float32)}
    print("\nc=64 throughput, 256-2048-2048-256 MLP, 1 row per request")
    direct = 0.0
    for threads in (1, 2):  # the better of the two is the baseline (2 threads suffer most from contention)
        torch.set_num_threads(threads)
        for _ in range(5):
            model.run(batch)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model.run(batch)
            count += 32
        rate = count / (time.perf_counter() - started)
        direct = max(direct, rate)
        print(f"  {f'direct in-process, batch 32, {threads} thread(s)':<44} {rate:8.0f} rows/s")
    for instances, threads in ((1, 1), (1, 2), (2, 1)):
        pool = WorkerPool(**_kwargs(artifact, max_batch_size=32, instance_count=instances,
                                    torch_threads=threads, device=device))  # fmt: skip
        await pool.start()
        await pool.warmup([32])
        config = BatchingConfig(max_batch_size=32, max_concurrent_batches=instances)
        batcher = DynamicBatcher(pool.run_batch, config)
        await _drive(batcher.submit, 64, 0.5)
        rate = await _drive(batcher.submit, 64, seconds)
        label = f"batcher + {instances} worker(s) x {threads} thread(s)"
        print(f"  {label:<44} {rate:8.0f} rows/s  ({rate / direct:.2f} of direct)")
        await batcher.close()
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(latency(directory, 600 if args.quick else 3000, args.device))
        asyncio.run(throughput(directory, 2.0 if args.quick else 5.0, args.device))


if __name__ == "__main__":
    main()
