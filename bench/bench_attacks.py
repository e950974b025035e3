"""Peak RSS of each service under the attacks of issue 10, and a normal request's latency after.

Run: .venv/bin/python -m bench.bench_attacks [--quick]

Starts a registry, one inference replica (thread workers) and one gateway (auth on) as real
processes, as the gateway tests do, registers a small MLP and a BYTES identity model, then sends each attack in turn:

- header-only: key-less ModelInfer calls to the gateway that send headers and never a body;
- oversized: concurrent key-less, then one keyed, ModelInfer message over the gateway's cap;
- BYTES shape lie: a 27-byte ModelInfer declaring a BYTES input of shape [1, 67108864],
  to inference directly and through the gateway;
- registry chunk: one UploadVersion chunk of 200 MiB;
- header-only uploads: UploadVersion streams that send their header and then nothing.

For every attack it prints, per service, RSS before, the peak while it ran (sampled every
5 ms), RSS 1 s after, open file descriptors after, and the latency of a normal request to the
attacked service while the attack is open and after it ended. It only reports: whatever the
services do today is what it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import grpc
import numpy as np
import psutil
from tritonclient.grpc import service_pb2 as pb

from aiaas.gateway_client import GatewayClient
from aiaas.registry.v1 import registry_pb2 as rpb
from tests.gateway.stack import (
    ADMIN_TOKEN,
    start_gateway,
    start_inference_replica,
    start_registry,
    wait_model,
)
from tests.inference import models
from tests.inference.conftest import Registry
from tests.support.procs import ServiceProcess

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
UPLOAD = "/aiaas.registry.v1.ModelRegistry/UploadVersion"
LIST_MODELS = "/aiaas.registry.v1.ModelRegistry/ListModels"
MIB = 1 << 20


class Sampler:
    """Peak RSS of some processes, sampled on a thread."""

    def __init__(self, services: dict[str, ServiceProcess]) -> None:
        self.processes = {name: psutil.Process(s.proc.pid) for name, s in services.items()  # type: ignore[union-attr]
                          if s.proc is not None}
        self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, process in self.processes.items():
                try:
                    self.peak[name] = max(self.peak[name], process.memory_info().rss)
                except psutil.Error:
                    pass
            self._stop.wait(0.005)

    def rss(self) -> dict[str, int]:
        return {name: p.memory_info().rss for name, p in self.processes.items()}

    def fds(self) -> dict[str, int]:
        return {name: p.num_fds() for name, p in self.processes.items()}

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Outcome:
    name: str
    target: str
    codes: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)
    before: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)
    during: str = "-"
    after_request: str = "-"
    seconds: float = 0.0


def count_codes(results: list[object]) -> tuple[dict[str, int], dict[str, str]]:
    """How many calls ended with each status, and one message per status."""
    codes: dict[str, int] = {}
    examples: dict[str, str] = {}
    for result in results:
        if isinstance(result, grpc.aio.AioRpcError):
            name, detail = result.code().name, result.details() or ""
        elif isinstance(result, BaseException):
            name, detail = type(result).__name__, str(result)
        else:
            name, detail = "OK", ""
        codes[name] = codes.get(name, 0) + 1
        examples.setdefault(name, detail[:160])
    return codes, examples


class Silent:
    """A request stream that sends `first` (if any), then nothing until `release` is set."""

    def __init__(self, release: asyncio.Event, first: bytes | None = None) -> None:
        self.release = release
        self.first = first

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        if self.first is not None:
            first, self.first = self.first, None
            return first
        await self.release.wait()
        raise StopAsyncIteration


def infer_request(name: str, datatype: str = "FP32", shape: tuple[int, ...] = (1, 4), raw: bytes | None = None,
                  input_name: str = "input") -> bytes:
    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name=input_name, datatype=datatype, shape=list(shape))
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes() if raw is None else raw)
    return request.SerializeToString()


@dataclass
class Stack:
    registry: Registry
    replica: ServiceProcess
    gateway: ServiceProcess
    token: str

    @property
    def services(self) -> dict[str, ServiceProcess]:
        return {"gateway": self.gateway, "inference": self.replica, "registry": self.registry.proc}

    def address(self, target: str) -> str:
        return self.services[target].address


def normal_request(target: str, token: str) -> tuple[str, bytes, tuple[tuple[str, str], ...]]:
    """Method, request and metadata of one ordinary call to `target`."""
    if target == "registry":
        return LIST_MODELS, rpb.ListModelsRequest().SerializeToString(), ()
    if target == "gateway":
        return MODEL_INFER, infer_request("tiny"), (("authorization", f"Bearer {token}"),)
    return MODEL_INFER, infer_request("tiny:production"), ()


async def time_one(address: str, target: str, token: str) -> str:
    method, payload, metadata = normal_request(target, token)
    async with grpc.aio.insecure_channel(address) as channel:
        started = time.perf_counter()
        try:
            await channel.unary_unary(method)(payload, metadata=metadata, timeout=60)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name} after {(time.perf_counter() - started) * 1e3:.0f} ms"
        return f"{(time.perf_counter() - started) * 1e3:.1f} ms"


def probe(address: str, target: str, token: str) -> str:
    """One normal request from a process of its own: the attacking process's loop is busy."""
    done = subprocess.run([sys.executable, "-m", "bench.bench_attacks", "--probe", address, target, token],
                          capture_output=True, text=True, timeout=180, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    return done.stdout.strip() or f"probe failed: {done.stderr.strip()[-200:]}"


async def run_attack(stack: Stack, name: str, target: str,
                     attack: Callable[[], Awaitable[list[object]]], settle_s: float = 1.0) -> Outcome:
    outcome = Outcome(name, target)
    address = stack.address(target)
    with Sampler(stack.services) as sampler:
        outcome.before = sampler.rss()
        started = time.perf_counter()
        running = asyncio.ensure_future(attack())
        await asyncio.sleep(settle_s)  # let the attack land, then try a normal request next to it
        outcome.during = await asyncio.to_thread(probe, address, target, stack.token)
        outcome.codes, outcome.examples = count_codes(await running)
        outcome.seconds = time.perf_counter() - started
        await asyncio.sleep(1.0)
        outcome.peak = dict(sampler.peak)
    outcome.after = sampler.rss()
    outcome.fds = sampler.fds()
    outcome.after_request = await asyncio.to_thread(probe, address, target, stack.token)
    return outcome


async def many_calls(address: str, count: int, open_call: Callable[[grpc.aio.Channel], Awaitable[object]],
                     per_channel: int = 200, release: asyncio.Event | None = None) -> list[object]:
    # One connection per channel (not grpc's shared one), each under the per-connection stream cap.
    options = [("grpc.max_send_message_length", -1), ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(max(1, -(-count // per_channel)))]
    try:
        calls = [open_call(channels[i // per_channel]) for i in range(count)]
        return list(await asyncio.gather(*calls, return_exceptions=True))
    finally:
        if release is not None:
            release.set()  # silent request streams end before their channels close
            await asyncio.sleep(0.1)
        for channel in channels:
            await channel.close()


def attacks(stack: Stack, scale: float, hold_s: float) -> list[tuple[str, str, Callable[[], Awaitable[list[object]]]]]:
    gateway, inference, registry = (stack.address(t) for t in ("gateway", "inference", "registry"))
    keyed = (("authorization", f"Bearer {stack.token}"),)
    header_only = int(10_000 * scale)
    oversized = b"\x0a" * (200 * MIB)
    lie_direct = infer_request("words:production", "BYTES", (1, 67108864), b"\0" * 4, "INPUT0")
    lie_gateway = infer_request("words", "BYTES", (1, 67108864), b"\0" * 4, "INPUT0")
    spec = rpb.TensorSpec(name="x", datatype="FP32", shape=[-1, 4])
    upload_header = rpb.UploadVersionRequest(header=rpb.UploadVersionHeader(
        model="attack", format=rpb.ARTIFACT_FORMAT_ONNX, artifact_sha256=hashlib.sha256(b"x").hexdigest(),
        artifact_size=MIB, create_model=True, actor="bench", signature=rpb.Signature(inputs=[spec], outputs=[spec]),
        serving_config=rpb.ServingConfig(max_batch_size=8, device="cpu"))).SerializeToString()
    big_chunk = rpb.UploadVersionRequest(chunk=b"\0" * (200 * MIB)).SerializeToString()

    def stream(address: str, method: str, count: int, first: bytes | None = None) -> Callable[[], Awaitable[list[object]]]:
        async def attack() -> list[object]:
            release = asyncio.Event()
            return await many_calls(address, count, lambda ch: ch.stream_unary(method)(
                Silent(release, first), timeout=hold_s), release=release)

        return attack

    def unary(address: str, payload: bytes, count: int,
              metadata: tuple[tuple[str, str], ...] = ()) -> Callable[[], Awaitable[list[object]]]:
        return lambda: many_calls(address, count, lambda ch: ch.unary_unary(MODEL_INFER)(
            payload, metadata=metadata, timeout=hold_s))

    async def chunk_upload() -> list[object]:
        async def messages() -> AsyncIterator[bytes]:
            yield upload_header
            yield big_chunk
        return await many_calls(registry, 1, lambda ch: ch.stream_unary(UPLOAD)(messages(), timeout=hold_s))

    return [
        (f"{header_only} header-only key-less ModelInfer", "gateway", stream(gateway, MODEL_INFER, header_only)),
        ("4 x 200 MiB key-less ModelInfer", "gateway", unary(gateway, oversized, 4)),
        ("1 x 200 MiB keyed ModelInfer", "gateway", unary(gateway, oversized, 1, keyed)),
        ("3 x BYTES shape lie [1, 67108864]", "inference", unary(inference, lie_direct, 3)),
        ("3 x BYTES shape lie, keyed", "gateway", unary(gateway, lie_gateway, 3, keyed)),
        ("1 x 200 MiB UploadVersion chunk", "registry", chunk_upload),
        (f"{header_only // 10} header-only uploads", "registry",
         stream(registry, UPLOAD, header_only // 10, upload_header)),
    ]


def print_outcome(outcome: Outcome) -> None:
    codes = ", ".join(f"{k} {v}" for k, v in sorted(outcome.codes.items()))
    print(f"\n{outcome.name} -> {outcome.target}   [{codes}; {outcome.seconds:.1f} s]")
    for code, example in sorted(outcome.examples.items()):
        if example:
            print(f"  {code}: {example}")
    for service in outcome.before:
        print(f"  {service:<9} RSS {outcome.before[service] / MIB:7.0f} MiB -> peak {outcome.peak[service] / MIB:7.0f}"
              f" -> after {outcome.after[service] / MIB:7.0f} MiB   fds {outcome.fds[service]:>6}")
    print(f"  normal {outcome.target} request (own process, new connection): during {outcome.during}, "
          f"after {outcome.after_request}")


async def run_all(stack: Stack, scale: float, hold_s: float) -> None:
    for name, target, attack in attacks(stack, scale, hold_s):
        print_outcome(await run_attack(stack, name, target, attack))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tenth of the header-only calls")
    parser.add_argument("--hold-s", type=float, default=10.0, help="client deadline of every attack call")
    parser.add_argument("--probe", nargs=3, metavar=("ADDRESS", "TARGET", "TOKEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(asyncio.run(time_one(*args.probe)))
        return
    scale = 0.1 if args.quick else 1.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        registry = Registry(start_registry(root))
        artifact = models.write_mlp(root, "torchscript", sizes=(4, 8, 3), seed=1)
        registry.register("tiny", artifact, alias="production", max_batch_size=8)
        registry.register("words", models.write_identity(root, "onnx", "BYTES"), alias="production", max_batch_size=8)
        replica = start_inference_replica(registry, root / "cache")
        wait_model(replica, "tiny")
        wait_model(replica, "words")
        gateway = start_gateway(registry, [replica], None, "--log-level", "warning")
        try:
            with GatewayClient(gateway.address, api_key=ADMIN_TOKEN) as admin:
                _, token = admin.create_key("bench", models=["tiny", "words"], roles=["infer"])
            print("attack benchmark: registry, one inference replica, one gateway; RSS per process, one run")
            asyncio.run(run_all(Stack(registry, replica, gateway, token), scale, args.hold_s))
        finally:
            gateway.stop()
            replica.stop()
            registry.close()
            registry.proc.stop()


if __name__ == "__main__":
    main()
