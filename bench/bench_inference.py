"""Inference service benchmark: single-row requests at concurrency 1, 16 and 64, two MLPs.

    python -m bench.bench_inference [--quick] [--json results.json]

Starts a registry and an inference service as real processes, registers a 10-50-10 MLP and a
256-2048-2048-256 MLP (TorchScript), drives each with a tritonclient.grpc.aio load generator in
this process, and prints throughput, p50 / p99 latency, the mean batch the dynamic batcher
formed, and the ratio of served throughput to the same model's in-process throughput at batch 32,
measured in the same run (the ceiling a server could reach if serving cost nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODELS = {"mlp-small": (10, 50, 10), "mlp-large": (256, 2048, 2048, 256)}
CONCURRENCY = (1, 16, 64)


def build_mlp(sizes: tuple[int, ...], path: Path) -> None:
    import torch

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    torch.jit.save(torch.jit.script(torch.nn.Sequential(*layers[:-1]).eval()), str(path))


def in_process_rows_per_s(path: Path, features: int, batch: int, seconds: float, threads: int) -> float:
    """The model alone, in this process, at a fixed batch: the ceiling for serving it.

    The best of several short windows, so a neighbour's burst on a shared machine does not
    lower the ceiling (and flatter the ratio).
    """
    import torch

    from aiaas.artifact_gate import load_torchscript

    torch.set_num_threads(threads)
    model = load_torchscript(path)
    x = torch.randn(batch, features)
    best = 0.0
    with torch.inference_mode():
        for _ in range(20):
            model(x)
        finish = time.perf_counter() + seconds
        while time.perf_counter() < finish:
            n, started = 0, time.perf_counter()
            while time.perf_counter() - started < 0.25:
                model(x)
                n += 1
            best = max(best, n * batch / (time.perf_counter() - started))
    return best


def register(address: str, name: str, path: Path, sizes: tuple[int, ...], max_batch: int,
             max_queue_delay_us: int = 0, preferred: tuple[int, ...] = (), instances: int = 1,
             strict_queue_delay: bool = False) -> None:
    import grpc

    from aiaas.registry.v1 import registry_pb2, registry_pb2_grpc

    data = path.read_bytes()
    header = registry_pb2.UploadVersionHeader(
        model=name, format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, artifact_sha256=hashlib.sha256(data).hexdigest(),
        artifact_size=len(data), create_model=True, actor="bench",
        signature=registry_pb2.Signature(
            inputs=[registry_pb2.TensorSpec(name="x", datatype="FP32", shape=[-1, sizes[0]])],
            outputs=[registry_pb2.TensorSpec(name="y", datatype="FP32", shape=[-1, sizes[-1]])]),
        serving_config=registry_pb2.ServingConfig(max_batch_size=max_batch, instance_count=instances, device="cpu",
                                                  max_queue_size=4096, max_queue_delay_us=max_queue_delay_us,
                                                  preferred_batch_sizes=list(preferred),
                                                  strict_queue_delay=strict_queue_delay))

    def messages() -> Any:
        yield registry_pb2.UploadVersionRequest(header=header)
        for start in range(0, len(data), 1 << 20):
            yield registry_pb2.UploadVersionRequest(chunk=data[start:start + (1 << 20)])

    with grpc.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        version = stub.UploadVersion(messages(), timeout=120).version.version
        stub.SetAlias(registry_pb2.SetAliasRequest(model=name, alias="production", version=version,
                                                   expected_version=-1, actor="bench"), timeout=30)


async def drive(address: str, model: str, features: int, concurrency: int, seconds: float,
                warmup_s: float, runs: int) -> dict[str, Any]:
    """A closed loop of `concurrency` callers, each sending one single-row request at a time.

    After a warm-up, `runs` measured windows; the row reports the median window's throughput
    (as the Triton peer measurement did) and latency percentiles over every window.
    """
    import tritonclient.grpc.aio as tca

    client = tca.InferenceServerClient(address)
    x = np.random.default_rng(0).standard_normal((1, features), dtype=np.float32)
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop_at = 0.0

    async def caller() -> None:
        nonlocal errors
        tensor = tca.InferInput("x", [1, features], "FP32")
        tensor.set_data_from_numpy(x)
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                await client.infer(model, [tensor])
            except Exception:  # noqa: BLE001 - counted, the run goes on
                errors += 1
                continue
            if measuring:
                latencies.append(time.perf_counter() - started)

    stop_at = time.perf_counter() + warmup_s
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    before = await _stats(client, model)
    measuring, errors = True, 0
    rates = []
    for _ in range(runs):
        done = len(latencies)
        began = time.perf_counter()
        stop_at = began + seconds
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        rates.append((len(latencies) - done) / (time.perf_counter() - began))
    after = await _stats(client, model)
    await client.close()
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else float("nan")

    executions = after[1] - before[1]
    rates.sort()
    return {"model": model, "concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "rps": rates[len(rates) // 2], "rps_min": rates[0], "rps_max": rates[-1],
            "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "mean_ms": sum(latencies) / len(latencies) * 1e3 if latencies else float("nan"),
            "mean_batch": (after[0] - before[0]) / executions if executions else 0.0}


async def _stats(client: Any, model: str) -> tuple[int, int]:
    stats = (await client.get_inference_statistics(model)).model_stats[0]
    return stats.inference_count, stats.execution_count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (about 1 s per point)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measured window")
    parser.add_argument("--runs", type=int, default=3, help="measured windows per point (the median is reported)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--instances", type=int, default=1, help="model worker processes per version")
    parser.add_argument("--max-queue-delay-us", type=int, default=0,
                        help="batcher queue delay (0: batches form from what queued while the worker was busy)")
    parser.add_argument("--worker-threads", type=int, default=1,
                        help="torch threads in the model worker (more threads spin and steal the server's CPU)")
    parser.add_argument("--limit-threads", type=int, default=2, help="torch threads for the in-process limit")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)))
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--compare-strict", action="store_true",
                        help="also serve each model with strict_queue_delay (Triton's wait even when idle) and "
                             "alternate the two at every point: idle dispatch vs strict, same run")
    args = parser.parse_args(argv)
    seconds = 1.0 if args.quick else args.seconds
    warmup = 0.5 if args.quick else 2.0
    runs = 1 if args.quick else args.runs
    names = [n for n in args.models.split(",") if n]
    levels = [int(c) for c in args.concurrency.split(",") if c]

    from tests.support.procs import ServiceProcess

    tmp = Path(tempfile.mkdtemp(prefix="aiaas-bench-"))
    atexit.register(shutil.rmtree, tmp, True)
    limits: dict[str, float] = {}
    for name in names:
        build_mlp(MODELS[name], tmp / f"{name}.pt")
        limits[name] = in_process_rows_per_s(tmp / f"{name}.pt", MODELS[name][0], 32, 1.0 if args.quick else 2.0,
                                             args.limit_threads)
    registry = ServiceProcess("registry", args=["--database-url", f"sqlite:///{tmp}/registry.db",
                                                "--artifact-dir", str(tmp / "artifacts")]).start()
    inference = None
    rows: list[dict[str, Any]] = []
    try:
        for name in names:
            register(registry.address, name, tmp / f"{name}.pt", MODELS[name], args.max_batch,
                     args.max_queue_delay_us, instances=args.instances)
            if args.compare_strict:
                register(registry.address, f"{name}-strict", tmp / f"{name}.pt", MODELS[name], args.max_batch,
                         args.max_queue_delay_us, instances=args.instances, strict_queue_delay=True)
        inference = ServiceProcess("inference", args=[
            "--registry-url", registry.address, "--model-cache-dir", str(tmp / "cache"),
            "--torch-threads", str(args.worker_threads), "--log-level", "warning",
        ], env={"AIAAS_LOG_JSON": "false"}).start(timeout=300)
        for name in names:
            for concurrency in levels:
                variants = [name, f"{name}-strict"] if args.compare_strict else [name]
                measured = {}
                for variant in variants:
                    row = asyncio.run(drive(inference.address, variant, MODELS[name][0], concurrency, seconds,
                                            warmup, runs))
                    row["in_process_b32_rows_s"] = limits[name]
                    row["ratio_to_b32"] = row["rps"] / limits[name]
                    rows.append(row)
                    measured[variant] = row
                    print(_line(row), flush=True)
                if args.compare_strict:
                    idle, strict = measured[name], measured[f"{name}-strict"]
                    print(f"  idle dispatch / strict at c={concurrency}: req/s x{idle['rps'] / strict['rps']:.2f}, "
                          f"p50 x{idle['p50_ms'] / strict['p50_ms']:.2f}", flush=True)
    finally:
        if inference is not None:
            inference.stop()
        registry.stop()
    print()
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "limits": limits, "cpus": os.cpu_count()}, indent=1))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


def _line(row: dict[str, Any]) -> str:
    return (f"{row['model']:<10} c={row['concurrency']:<3} {row['rps']:8.0f} req/s  p50 {row['p50_ms']:6.2f} ms  "
            f"p99 {row['p99_ms']:6.2f} ms  batch {row['mean_batch']:5.1f}  errors {row['errors']}")


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | concurrency | req/s (median) | req/s min-max | p50 ms | p99 ms | mean ms | mean batch | errors | "
            "in-process b32 rows/s | served / b32 |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['model']} | {r['concurrency']} | {r['rps']:.0f} | {r['rps_min']:.0f}-{r['rps_max']:.0f} | "
                     f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['mean_ms']:.2f} | {r['mean_batch']:.1f} | {r['errors']} | "
                     f"{r['in_process_b32_rows_s']:.0f} | {r['ratio_to_b32']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
