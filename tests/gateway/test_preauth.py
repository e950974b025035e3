"""Pre-auth abuse of the gateway (issue 10), rebuilt as an attacker would send it.

The gateway checks the `authorization` metadata before it reads a request body, reads a keyed
caller's body for at most `body_timeout_s`, and never receives a message over
`max_request_bytes`. In process: the gateway as `create_service` makes it (a real grpc.aio
server, a real registry process, an echo replica upstream), so header-only calls can be counted
against a small `max_concurrent_rpcs`. As a process: the gateway's RSS under oversized bodies.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca

from aiaas.api_keys import Role, make_key
from services.gateway.server import ADMIN_SERVICE, GatewayService, create_service
from services.gateway.servicer import INFERENCE_SERVICE
from services.gateway.settings import GatewaySettings
from tests.gateway.stack import ADMIN_TOKEN, PEPPER
from tests.gateway.upstream_double import EchoReplica
from tests.inference.conftest import start_registry
from tests.support.procs import ServiceProcess

MODEL_INFER = f"/{INFERENCE_SERVICE}/ModelInfer"
BODY_TIMEOUT_S = 0.5
MAX_RPCS = 100


@pytest.fixture(scope="module")
def registry() -> Iterator[ServiceProcess]:
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_registry(Path(tmp))
        yield proc
        proc.stop()


@dataclass
class Door:
    gateway: GatewayService
    replica: EchoReplica
    token: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"}


@pytest.fixture
async def door(registry: ServiceProcess) -> AsyncIterator[Door]:
    replica = await EchoReplica().start()
    settings = GatewaySettings(
        host="127.0.0.1", port=0, registry_url=registry.address, inference_targets=(replica.address,),
        key_pepper=PEPPER, max_concurrent_rpcs=MAX_RPCS, body_timeout_s=BODY_TIMEOUT_S,
        max_request_bytes=1 << 20, grace_period_s=0.5, openai_port=0,
    )
    gateway = create_service(settings, configure_process=False)
    gateway.wait_for_registry_s = 30
    await gateway.start()
    gateway.catalog.add_version("m", 1)
    gateway.catalog.move_alias("m", "production", 1)
    gateway.plane.signatures.put("m", 1, None)
    entry, token = make_key(PEPPER.encode(), roles=frozenset({Role.INFER, Role.READ}))
    gateway.ring.put(entry)
    yield Door(gateway, replica, token)
    await gateway.stop()
    await replica.stop()


async def _never_sends() -> AsyncIterator[bytes]:
    """A request stream that sends headers (the call) and never a message."""
    await asyncio.Event().wait()
    yield b""


def _inputs() -> list[tca.InferInput]:
    tensor = tca.InferInput("x", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.array([[1.0, 2.0]], dtype=np.float32))
    return [tensor]


async def _legitimate_infer(door: Door) -> float:
    started = time.perf_counter()
    async with tca.InferenceServerClient(door.address) as client:
        result = await client.infer("m", _inputs(), headers=door.headers(), client_timeout=5)
    np.testing.assert_array_equal(result.as_numpy("y"), [[1.0, 2.0]])
    return time.perf_counter() - started


async def _codes(calls: list[grpc.aio.StreamUnaryCall]) -> list[grpc.StatusCode]:
    codes = []
    for outcome in await asyncio.gather(*calls, return_exceptions=True):
        assert isinstance(outcome, grpc.aio.AioRpcError), outcome
        codes.append(outcome.code())
    return codes


async def test_header_only_calls_without_a_key_are_refused_at_once_and_do_not_starve_others(door: Door) -> None:
    """The attack: calls that send headers and never a body. Read as unary calls they held a slot
    each until `max_concurrent_rpcs` was spent and legitimate calls got RESOURCE_EXHAUSTED."""
    started = time.perf_counter()
    refused: list[grpc.StatusCode] = []
    async with grpc.aio.insecure_channel(door.address) as attacker:
        open_call = attacker.stream_unary(MODEL_INFER)
        for _wave in range(6):  # 300 calls in all, three times the server's call slots
            wave = [open_call(_never_sends(), timeout=5) for _ in range(50)]
            legitimate = asyncio.ensure_future(_legitimate_infer(door))
            refused += await _codes(wave)
            assert await legitimate < 2.0
    assert refused == [grpc.StatusCode.UNAUTHENTICATED] * 300
    assert time.perf_counter() - started < 15.0
    # Nothing of theirs reached inference: only the six legitimate requests did.
    assert len(door.replica.seen) == 6


async def test_a_keyed_caller_that_never_sends_its_body_is_cut_off(door: Door) -> None:
    headers = tuple(door.headers().items())
    async with grpc.aio.insecure_channel(door.address) as slow:
        started = time.perf_counter()
        calls = [slow.stream_unary(MODEL_INFER)(_never_sends(), metadata=headers, timeout=10) for _ in range(20)]
        legitimate = await _legitimate_infer(door)
        codes = await _codes(calls)
        waited = time.perf_counter() - started
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 20
        details = (await calls[0].details()) or ""
    assert "did not arrive within 0.5s" in details and "body_timeout_s" in details
    assert BODY_TIMEOUT_S <= waited < BODY_TIMEOUT_S + 3.0
    assert legitimate < 2.0


async def test_a_unary_method_refuses_a_second_message(door: Door) -> None:
    async def two() -> AsyncIterator[bytes]:
        yield b""
        yield b""

    async with grpc.aio.insecure_channel(door.address) as channel:
        call = channel.stream_unary(MODEL_INFER)(two(), metadata=tuple(door.headers().items()), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == f"{MODEL_INFER} takes one request message; the call sent more"


@pytest.mark.parametrize("method", [f"/{INFERENCE_SERVICE}/ModelMetadata", f"/{INFERENCE_SERVICE}/ModelStatistics",
                                    f"/{ADMIN_SERVICE}/ListApiKeys", f"/{ADMIN_SERVICE}/CreateApiKey"])
async def test_every_keyed_method_refuses_a_header_only_call_without_a_key(door: Door, method: str) -> None:
    async with grpc.aio.insecure_channel(door.address) as channel:
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.stream_unary(method)(_never_sends(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing API key" in (caught.value.details() or "")
    assert time.perf_counter() - started < 2.0


async def test_open_methods_answer_without_reading_a_body(door: Door) -> None:
    async with grpc.aio.insecure_channel(door.address) as channel:
        live = await channel.stream_unary(f"/{INFERENCE_SERVICE}/ServerLive")(_never_sends(), timeout=5)
    assert live == b"\x08\x01"  # ServerLiveResponse(live=True)


async def test_malformed_infer_request_with_a_key_is_invalid_argument(door: Door) -> None:
    async with grpc.aio.insecure_channel(door.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(MODEL_INFER)(b"\x0a\x05ab", metadata=tuple(door.headers().items()), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        f"malformed request to {MODEL_INFER}: 4 bytes that do not parse as inference.ModelInferRequest"
    )


async def test_tritonclient_unary_calls_work_unchanged(door: Door) -> None:
    async with tca.InferenceServerClient(door.address) as client:
        assert await client.is_server_live()
        assert await client.is_server_ready()
        assert (await client.get_server_metadata()).name == "aiaas-gateway"
        assert await client.is_model_ready("m", headers=door.headers())
    assert await _legitimate_infer(door) < 2.0


# Oversized bodies, measured on a gateway process ---------------------------------------------------

class PeakRss:
    """Highest RSS of a process, sampled every 5 ms on a thread while the block runs."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.before = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.005)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def grew_mib(self) -> float:
        return (self.peak - self.before) / 2**20


@pytest.fixture(scope="module")
def gateway_process(registry: ServiceProcess) -> Iterator[ServiceProcess]:
    """A gateway with a 1 MiB request cap; no inference replica is needed to refuse these calls."""
    proc = ServiceProcess("gateway", [
        "--registry-url", registry.address, "--inference-targets", "127.0.0.1:1", "--key-pepper", PEPPER,
        "--bootstrap-admin-key", ADMIN_TOKEN, "--max-request-bytes", str(1 << 20), "--grace-period-s", "1",
    ]).start(timeout=60)
    yield proc
    proc.stop()


def _send_concurrently(address: str, body: bytes, count: int,
                       metadata: tuple[tuple[str, str], ...] = ()) -> list[grpc.StatusCode]:
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) as channel:
        call = channel.unary_unary(MODEL_INFER)
        futures = [call.future(body, metadata=metadata, timeout=30) for _ in range(count)]
        codes = []
        for future in futures:
            with pytest.raises(grpc.RpcError) as caught:
                future.result()
            codes.append(caught.value.code())
        return codes


def test_oversized_key_less_requests_are_refused_without_buffering(gateway_process: ServiceProcess) -> None:
    """Before: 4 concurrent key-less 100 MiB calls took a gateway from 61 MiB to a 607 MiB peak
    (516 MiB still resident); the request cap was checked after reading the whole message."""
    with PeakRss(gateway_process.proc.pid) as rss:  # type: ignore[union-attr]
        codes = _send_concurrently(gateway_process.address, b"\x0a" * (100 << 20), 4)
    assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert rss.grew_mib < 48, f"gateway RSS grew {rss.grew_mib:.0f} MiB"
    with tc.InferenceServerClient(gateway_process.address) as client:
        assert client.is_server_live(client_timeout=2)


def test_a_keyed_request_over_the_cap_is_resource_exhausted(gateway_process: ServiceProcess) -> None:
    """grpc-core checks `max_receive_message_length` on the assembled message, so a keyed caller's
    oversized message is still read once before this refusal: what bounds that is who holds a key."""
    metadata = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(gateway_process.address, options=options) as channel, \
            pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(MODEL_INFER)(b"\x0a" * ((1 << 20) + 1), metadata=metadata, timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"({(1 << 20) + 1} vs. {1 << 20})" in (caught.value.details() or "")


def test_key_less_bodies_under_the_cap_are_not_read_either(registry: ServiceProcess) -> None:
    """Auth before the body: even messages the size cap would let in are never buffered without a key."""
    proc = start_gateway_with_cap(registry, 64 << 20)
    try:
        with PeakRss(proc.proc.pid) as rss:  # type: ignore[union-attr]
            codes = _send_concurrently(proc.address, b"\x0a" * (60 << 20), 4)
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 4
        assert rss.grew_mib < 48, f"gateway RSS grew {rss.grew_mib:.0f} MiB"
    finally:
        proc.stop()


def start_gateway_with_cap(registry: ServiceProcess, max_request_bytes: int) -> ServiceProcess:
    return ServiceProcess("gateway", [
        "--registry-url", registry.address, "--inference-targets", "127.0.0.1:1", "--key-pepper", PEPPER,
        "--max-request-bytes", str(max_request_bytes), "--grace-period-s", "1",
    ]).start(timeout=60)

