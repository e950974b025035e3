"""What a Python gRPC server costs before it does any work: the floor under the inference service.

Run: .venv/bin/python -m bench.bench_grpc_floor [--reps 3] [--concurrency 1,16,64]

Three servers of `ModelInfer` on one machine, driven in turn by the side-by-side's lean client
(`bench/lean_client.py`, 8 connections, the tiny MLP's one-row request):

- `grpc.aio echo`: a bare grpc.aio server whose handler parses the request (as aiaas does) and
  answers a pre-built response of the tiny model's output shape: no model, no batching, no
  telemetry, on the event loop the services use (`AIAAS_EVENT_LOOP`, uvloop by default). The
  floor of any Python grpc.aio server on this machine.
- `grpc sync echo`: the same handler on grpc's thread-pool server (4 threads).
- `aiaas inference`: a real replica of the tiny MLP (max batch 32, 2 ms queue delay, one instance,
  one process on the port), registry and all.

For each: req/s, p50 and the server's CPU per call (its process and children, model worker
included, from /proc over the measured run). The last column is what aiaas spends per call above
the aio echo in the same run: its own protocol checks, batching, the worker round trip, the
response and telemetry.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent import futures
from pathlib import Path
from typing import Any

from bench import lean_client
from bench.side_by_side import MAX_BATCH, MODELS, QUEUE_DELAY_US

SERVICE = "inference.GRPCInferenceService"


def _handlers() -> tuple[Any, Any]:
    """(parse, response bytes) of the echo servers: the tiny model's one-row answer."""
    from tritonclient.grpc import service_pb2

    outputs = MODELS["tiny"][-1]
    response = service_pb2.ModelInferResponse(model_name="tiny", model_version="1")
    response.outputs.add(name="y", datatype="FP32", shape=[1, outputs])
    response.raw_output_contents.append(b"\0" * 4 * outputs)
    return service_pb2.ModelInferRequest.FromString, response.SerializeToString()


def serve_echo(port: int, kind: str) -> None:
    import grpc

    from services.common import eventloop

    parse, answer = _handlers()
    if kind == "aio":
        async def infer(request: Any, context: Any) -> bytes:
            return answer  # type: ignore[no-any-return]

        async def main() -> None:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
                "ModelInfer": grpc.unary_unary_rpc_method_handler(infer, request_deserializer=parse)}),))
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            print("ready", flush=True)
            await server.wait_for_termination()

        eventloop.run(main())  # the loop the services run on (uvloop by default)
        return

    def infer_sync(request: Any, context: Any) -> bytes:
        return answer  # type: ignore[no-any-return]

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(infer_sync, request_deserializer=parse)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()



def main(argv: list[str] | None = None) -> int:
    from bench.bench_inference import build_mlp, register
    from tests.support.procs import ServiceProcess
    from tests.support.servers import free_port

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests", type=int, default=100_000, help="per run (capped at --seconds)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_echo(int(args.serve[0]), args.serve[1])
        return 0
    levels = [int(c) for c in args.concurrency.split(",") if c]
    work = Path(tempfile.mkdtemp(prefix="aiaas-floor-"))
    started: list[Any] = []
    echoes: list[subprocess.Popen[bytes]] = []
    try:
        registry = ServiceProcess("registry", args=[
            "--database-url", f"sqlite:///{work}/registry.db", "--artifact-dir", str(work / "artifacts"),
            "--log-level", "warning"]).start()
        started.append(registry)
        build_mlp(MODELS["tiny"], work / "tiny.pt")
        register(registry.address, "tiny", work / "tiny.pt", MODELS["tiny"], MAX_BATCH, QUEUE_DELAY_US)
        inference = ServiceProcess("inference", args=[
            "--registry-url", registry.address, "--model-cache-dir", str(work / "cache"), "--frontends", "1",
            "--log-level", "warning"]).start(timeout=300)
        started.append(inference)
        inference.wait_ready("tiny", timeout=300)
        assert inference.proc is not None
        servers: dict[str, tuple[str, int]] = {}
        for label, kind in (("grpc.aio echo", "aio"), ("grpc sync echo", "sync")):
            port = free_port()
            echo = subprocess.Popen([sys.executable, "-m", "bench.bench_grpc_floor", "--serve", str(port), kind],
                                    stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
            echoes.append(echo)
            assert echo.stdout is not None
            if echo.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"{label} did not start")
            servers[label] = (f"127.0.0.1:{port}", echo.pid)
        servers["aiaas inference"] = (inference.address, inference.proc.pid)
        labels = list(servers)
        print(f"gRPC floor: {os.cpu_count()} cores, medians of {args.reps} alternating runs, lean client "
              f"(8 connections), tiny MLP one-row requests\n")
        print("| c | " + " | ".join(f"{label} req/s (p50 ms)" for label in labels) + " | "
              + " | ".join(f"{label} CPU/call" for label in labels) + " | aiaas above the aio echo |")
        print("|---" * (2 + 2 * len(labels)) + "|")
        for level in levels:
            runs: dict[str, list[tuple[float, float, float]]] = {label: [] for label in labels}
            for rep in range(args.reps):
                for label in labels[rep % len(labels):] + labels[:rep % len(labels)]:
                    address, pid = servers[label]
                    target = lean_client.Target(label, address, "tiny", MODELS["tiny"][0])
                    asyncio.run(lean_client.run(target, level, 300, connections=8, cap_s=1.0, warmup=50))
                    before = lean_client.tree_cpu_seconds([pid])
                    out = asyncio.run(lean_client.run(target, level, args.requests, connections=8,
                                                      cap_s=args.seconds))
                    spent = lean_client.tree_cpu_seconds([pid]) - before
                    if out["errors"]:
                        raise RuntimeError(f"{label}: {out['error_samples'][:1]}")
                    runs[label].append((out["rps"], out["p50_ms"], 1e6 * spent / max(1, out["ok"])))
            rps = {label: statistics.median(r[0] for r in rows) for label, rows in runs.items()}
            p50 = {label: statistics.median(r[1] for r in rows) for label, rows in runs.items()}
            cpu = {label: statistics.median(r[2] for r in rows) for label, rows in runs.items()}
            print(f"| {level} | " + " | ".join(f"{rps[label]:,.0f} ({p50[label]:.2f})" for label in labels) + " | "
                  + " | ".join(f"{cpu[label]:.0f} µs" for label in labels)
                  + f" | {cpu['aiaas inference'] - cpu['grpc.aio echo']:+.0f} µs |", flush=True)
    finally:
        for echo in echoes:
            echo.kill()
            echo.wait()
        for service in reversed(started):
            service.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
