"""What the gateway adds over calling inference directly: p50 and p99 at concurrency 1 and 64.

Run: .venv/bin/python -m bench.bench_gateway [--quick]

Starts a registry, one inference replica (thread workers) and one gateway (auth on, no
quotas) as real processes, registers a small MLP (4 -> 8 -> 3, batch 1), and sends the same
prebuilt ModelInfer bytes through a raw gRPC channel, alternating rounds between inference
directly (`tiny:production`, what the gateway forwards) and the gateway (`tiny` with an API
key), so both see the same machine load. A third row goes through a bare grpc.aio proxy
(a generic handler that forwards bytes, nothing else): the cost of one Python gRPC hop, the
floor under anything a Python gateway adds. A fourth row goes through a second, identical stack
whose services talk mTLS to each other (each with its own certificate, identities required, as in
production): the cost of TLS on the gateway -> inference hop, as a ratio to the plaintext gateway.
Every figure comes from this one run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from aiaas.gateway_client import GatewayClient
from tests.gateway.stack import (
    ADMIN_TOKEN,
    FOLLOW,
    PEPPER,
    start_gateway,
    start_inference_replica,
    start_registry,
    wait_model,
)
from tests.inference import models
from tests.inference.conftest import Registry, inference_args
from tests.support.identity import make_pki
from tests.support.procs import ServiceProcess
from tests.support.servers import free_port, wait_for_port

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def request_bytes(name: str) -> bytes:
    request = pb.ModelInferRequest(model_name=name, raw_input_contents=[np.ones((1, 4), np.float32).tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    return request.SerializeToString()


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(address: str, payload: bytes, metadata: tuple[tuple[str, str], ...], concurrency: int,
                  per_worker: int) -> list[float]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD)
        for _ in range(20):
            await call(payload, metadata=metadata, timeout=10)
        samples: list[float] = []

        async def worker() -> None:
            for _ in range(per_worker):
                started = time.perf_counter_ns()
                await call(payload, metadata=metadata, timeout=10)
                samples.append((time.perf_counter_ns() - started) / 1e3)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return samples


async def bare_proxy(port: int, target: str) -> None:
    """The reference hop: forward ModelInfer bytes with grpc.aio and do nothing else."""
    channel = grpc.aio.insecure_channel(target)
    forward = channel.unary_unary(METHOD)

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await forward(request, timeout=context.time_remaining())  # type: ignore[no-any-return]

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def compare(direct: str, bare: str, gateway: str, token: str, concurrency: int, requests: int,
                  rounds: int, mtls_gateway: str, mtls_token: str) -> None:
    direct_payload, gateway_payload = request_bytes("tiny:production"), request_bytes("tiny")
    auth = (("authorization", f"Bearer {token}"),)
    mtls_auth = (("authorization", f"Bearer {mtls_token}"),)
    per_worker = max(1, requests // rounds // concurrency)
    samples: dict[str, list[float]] = {"direct": [], "bare": [], "gateway": [], "mtls": []}
    elapsed: dict[str, float] = {"gateway": 0.0, "mtls": 0.0}
    for _ in range(rounds):
        samples["direct"] += await measure(direct, direct_payload, (), concurrency, per_worker)
        samples["bare"] += await measure(bare, direct_payload, (), concurrency, per_worker)
        started = time.perf_counter()
        samples["gateway"] += await measure(gateway, gateway_payload, auth, concurrency, per_worker)
        elapsed["gateway"] += time.perf_counter() - started
        started = time.perf_counter()
        samples["mtls"] += await measure(mtls_gateway, gateway_payload, mtls_auth, concurrency, per_worker)
        elapsed["mtls"] += time.perf_counter() - started
    p50 = {k: statistics.median(v) for k, v in samples.items()}
    p99 = {k: pct(v, 0.99) for k, v in samples.items()}
    print(f"concurrency {concurrency:>2}  ({len(samples['gateway'])} requests each way)")
    print(f"  inference direct      p50 {p50['direct']:8.1f} us   p99 {p99['direct']:8.1f} us")
    print(f"  bare grpc.aio proxy   p50 {p50['bare']:8.1f} us   p99 {p99['bare']:8.1f} us")
    print(f"  through gateway       p50 {p50['gateway']:8.1f} us   p99 {p99['gateway']:8.1f} us")
    print(f"  gateway adds          p50 {p50['gateway'] - p50['direct']:8.1f} us   "
          f"p99 {p99['gateway'] - p99['direct']:8.1f} us")
    print(f"  (one bare hop adds    p50 {p50['bare'] - p50['direct']:8.1f} us   "
          f"p99 {p99['bare'] - p99['direct']:8.1f} us)")
    rate = {k: len(samples[k]) / v for k, v in elapsed.items()}
    print(f"  gateway, mTLS inside  p50 {p50['mtls']:8.1f} us   p99 {p99['mtls']:8.1f} us")
    print(f"  mTLS / plaintext      p50 x{p50['mtls'] / p50['gateway']:.2f}   p99 x{p99['mtls'] / p99['gateway']:.2f}   "
          f"req/s {rate['mtls']:.0f} vs {rate['gateway']:.0f} (x{rate['mtls'] / rate['gateway']:.2f})")


def profile(gateway: ServiceProcess, token: str, out: Path, seconds: float, concurrency: int) -> None:
    """A py-spy flame graph (SVG) and the top frames (text) of the gateway under load at `concurrency`."""
    payload = request_bytes("tiny")
    auth = (("authorization", f"Bearer {token}"),)
    raw = out.with_suffix(".txt")
    assert gateway.proc is not None, "the gateway is not running"
    commands = {out: ["--format", "flamegraph"], raw: ["--format", "raw"]}
    for path, fmt in commands.items():
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(gateway.proc.pid),
                                "--duration", str(int(seconds)), "--rate", "500", "--nonblocking", *fmt,
                                "--output", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        done = asyncio.run(_load_until(time.monotonic() + seconds + 2, gateway.address, payload, auth, concurrency))
        _, err = spy.communicate(timeout=60)
        if spy.returncode != 0:
            raise SystemExit(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')[-500:]}")
        print(f"profile: {path} ({done} requests at concurrency {concurrency} while sampling)")
    print(top_frames(raw))
    raw.unlink()  # the flame graph keeps what matters; the raw samples run to hundreds of KB


async def _load_until(deadline: float, address: str, payload: bytes, auth: tuple[tuple[str, str], ...],
                      concurrency: int) -> int:
    count = 0
    while time.monotonic() < deadline:
        count += len(await measure(address, payload, auth, concurrency, 50))
    return count


def top_frames(raw: Path, limit: int = 25) -> str:
    """Self time by innermost Python frame from py-spy's raw output, idle waits left out."""
    own: dict[str, int] = {}
    busy = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        leaf = frames[-1]
        if "select" in leaf and "selectors.py" in leaf or leaf.startswith("Thread.run"):
            continue  # the event loop waiting, grpc's poller thread waiting
        n = int(count)
        busy += n
        key = leaf.split(" (")[0] + " " + leaf.rsplit("/", 1)[-1].rstrip(")")
        own[key] = own.get(key, 0) + n
    rows = sorted(own.items(), key=lambda kv: -kv[1])[:limit]
    lines = [f"  {100 * n / max(1, busy):5.1f}%  {k}" for k, n in rows]
    return f"self time of the busy samples ({busy}):\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--profile", type=Path, metavar="SVG",
                        help="only profile the gateway with py-spy under load (concurrency 16): a flame graph "
                             "there, and the top frames printed")
    parser.add_argument("--profile-seconds", type=float, default=15.0)
    parser.add_argument("--bare-proxy", nargs=2, metavar=("PORT", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_proxy:
        asyncio.run(bare_proxy(int(args.bare_proxy[0]), args.bare_proxy[1]))
        return
    scale = 0.2 if args.quick else 1.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        registry = Registry(start_registry(root))
        artifact = models.write_mlp(root, "torchscript", sizes=(4, 8, 3), seed=1)
        registry.register("tiny", artifact, alias="production", max_batch_size=8)
        replica = start_inference_replica(registry, root / "cache")
        wait_model(replica, "tiny")
        gateway = start_gateway(registry, [replica], None, "--log-level", "warning")
        # The same stack with mTLS between every service (identities required).
        pki = make_pki(root / "pki")
        tls_registry_proc = start_registry(root / "tls", env=pki.server_env("registry"))
        tls_registry = Registry(tls_registry_proc, pki.client("admin"))
        tls_registry.register("tiny", artifact, alias="production", max_batch_size=8)
        tls_replica = ServiceProcess("inference", args=inference_args(
            tls_registry, root / "tls-cache", "--worker-mode", "thread", follow=FOLLOW),
            env=pki.server_env("inference")).start(timeout=120)
        wait_model(tls_replica, "tiny")
        tls_gateway = ServiceProcess("gateway", args=[
            "--registry-url", tls_registry.address, "--inference-targets", f"localhost:{tls_replica.port}",
            "--key-pepper", PEPPER, "--bootstrap-admin-key", ADMIN_TOKEN, "--grace-period-s", "2",
            "--log-level", "warning"], env=pki.client_env("gateway")).start(timeout=60)
        bare_port = free_port()
        bare = subprocess.Popen([sys.executable, "-m", "bench.bench_gateway", "--bare-proxy", str(bare_port),
                                 replica.address])
        wait_for_port(bare_port)
        try:
            with GatewayClient(gateway.address, api_key=ADMIN_TOKEN) as admin:
                _, token = admin.create_key("bench", models=["tiny"], roles=["infer"])
            with GatewayClient(tls_gateway.address, api_key=ADMIN_TOKEN) as admin:
                _, tls_token = admin.create_key("bench", models=["tiny"], roles=["infer"])
            if args.profile:
                profile(gateway, token, args.profile, args.profile_seconds, 16)
                return
            print("gateway latency benchmark: small MLP (4-8-3), batch 1, raw gRPC client, one run\n")
            bare_address = f"127.0.0.1:{bare_port}"
            for concurrency, requests in ((1, 4000), (64, 25600)):
                asyncio.run(compare(replica.address, bare_address, gateway.address, token, concurrency,
                                    int(requests * scale), 4, tls_gateway.address, tls_token))
                print()
        finally:
            bare.kill()
            bare.wait()
            for proc in (tls_gateway, tls_replica):
                proc.stop()
            tls_registry.close()
            tls_registry_proc.stop()
            gateway.stop()
            replica.stop()
            registry.close()
            registry.proc.stop()


if __name__ == "__main__":
    main()
