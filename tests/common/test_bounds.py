"""Bounds every service gets from services.common (issue 10): malformed protobuf is INVALID_ARGUMENT,
status messages stay small enough for a client to read, the /metrics endpoint binds the service's
--host, and the per-connection server options (stream cap, idle close) are in force.

Real registry and monitor processes for what a caller sees; an in-process ServiceApp (a real
grpc.aio server with its interceptor) where a handler must be made to fail on purpose.
"""

from __future__ import annotations

import asyncio
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from aiaas.monitor.v1 import monitor_pb2
from aiaas.registry.v1 import registry_pb2
from services.common.errors import InvalidArgument
from services.common.interceptors import MAX_STATUS_MESSAGE_BYTES, bounded_message
from services.common.server import ServiceApp, server_options
from services.common.settings import ServerSettings, load_settings
from tests.inference.conftest import start_registry
from tests.support.procs import ServiceProcess
from tests.support.servers import free_port

REGISTRY = "aiaas.registry.v1.ModelRegistry"
MONITOR = "aiaas.monitor.v1.Monitor"
# Field 1, length-delimited, says 5 bytes follow; 2 do: no protobuf parser accepts it.
TRUNCATED = b"\x0a\x05ab"
PROBE = "test.v1.Bounds"


@dataclass
class Services:
    registry: ServiceProcess
    monitor: ServiceProcess
    metrics_port: int


@pytest.fixture(scope="module")
def services() -> Iterator[Services]:
    with tempfile.TemporaryDirectory() as tmp:
        registry = start_registry(Path(tmp))
        metrics_port = free_port()
        monitor = ServiceProcess("monitor", ["--registry-url", "", "--metrics-port", str(metrics_port)]).start()
        yield Services(registry, monitor, metrics_port)
        monitor.stop()
        registry.stop()


def _wire_length(message: str) -> int:
    """Bytes of `message` in the percent-encoded `grpc-message` trailer."""
    data = message.encode()
    return sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in data)


# Malformed protobuf ------------------------------------------------------------------------------

@pytest.mark.parametrize("service, method, kind", [
    (REGISTRY, "GetModel", "unary"),
    (REGISTRY, "UploadVersion", "client_stream"),
    (REGISTRY, "WatchModels", "server_stream"),
    (MONITOR, "Report", "unary"),
])
def test_malformed_protobuf_is_invalid_argument_naming_the_method(services: Services, service: str, method: str,
                                                                  kind: str) -> None:
    address = services.registry.address if service == REGISTRY else services.monitor.address
    path = f"/{service}/{method}"
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as caught:
        if kind == "unary":
            channel.unary_unary(path)(TRUNCATED, timeout=10)
        elif kind == "client_stream":
            channel.stream_unary(path)(iter([TRUNCATED]), timeout=10)
        else:
            list(channel.unary_stream(path)(TRUNCATED, timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert caught.value.details() == (
        f"malformed request to {path}: 4 bytes that do not parse as aiaas.{service.split('.')[1]}.v1.{method}Request"
    )


def test_services_answer_normally_after_malformed_requests(services: Services) -> None:
    with grpc.insecure_channel(services.monitor.address) as channel:
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                channel.unary_unary(f"/{MONITOR}/Report")(TRUNCATED, timeout=10)
        reply = channel.unary_unary(f"/{MONITOR}/ListSLOs", request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=monitor_pb2.ListSLOsResponse.FromString)(
            monitor_pb2.ListSLOsRequest(), timeout=10)
        assert isinstance(reply, monitor_pb2.ListSLOsResponse)


# Bounded status messages -------------------------------------------------------------------------

def test_an_error_echoing_a_huge_name_reaches_the_client_bounded(services: Services) -> None:
    """Before: a 50,000-character name echoed in the error made a trailer the client refused
    ("Stream removed", RESOURCE_EXHAUSTED). Now the caller reads its INVALID_ARGUMENT / NOT_FOUND."""
    name = "m" * 50_000
    with grpc.insecure_channel(services.registry.address) as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(f"/{REGISTRY}/GetModel", request_serializer=lambda m: m.SerializeToString())(
            registry_pb2.GetModelRequest(name=name), timeout=10)
    assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), caught.value.details()
    assert "Stream removed" not in caught.value.details()
    assert _wire_length(caught.value.details()) <= MAX_STATUS_MESSAGE_BYTES


async def fail_with(request: bytes, context: Any) -> bytes:
    names = [f"{request.decode()}_{i}" for i in range(5000)]
    raise InvalidArgument(f"model 'wide' expects input(s) {names}")


def add_bounds_probe(_servicer: object, server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(PROBE, {
        "Fail": grpc.unary_unary_rpc_method_handler(fail_with),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
    }),))


_running: list[int] = [0, 0]  # now, most at once


async def slow(request: bytes, context: Any) -> bytes:
    _running[0] += 1
    _running[1] = max(_running[1], _running[0])
    try:
        await asyncio.sleep(0.2)
        return b"done"
    finally:
        _running[0] -= 1


@pytest.fixture
async def probe() -> AsyncIterator[ServiceApp]:
    settings = ServerSettings(host="127.0.0.1", port=0, require_identity=False, grace_period_s=0.5, max_concurrent_streams=2,
                              max_connection_idle_ms=300)
    app = ServiceApp("bounds", settings, configure_process=False)
    app.add_service(PROBE, add_bounds_probe, None)
    await app.start()
    yield app
    await app.server.stop(None)


@pytest.mark.parametrize("prefix", ["input", "entrée", "входной_тензор", "输入🙂"])
async def test_a_5000_name_error_is_cut_to_a_readable_message(probe: ServiceApp, prefix: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{probe.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(f"/{PROBE}/Fail")(prefix.encode(), timeout=10)
    details = caught.value.details()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"model 'wide' expects input(s) ['{prefix}_0', '{prefix}_1'")
    assert details.endswith(" more characters)")
    assert _wire_length(details) <= MAX_STATUS_MESSAGE_BYTES
    full = len(f"model 'wide' expects input(s) {[f'{prefix}_{i}' for i in range(5000)]}")
    left_out = int(details.rsplit("(", 1)[1].split()[0])
    assert len(details.rsplit("... (", 1)[0]) + left_out == full


def test_bounded_message_keeps_short_messages_and_valid_utf8() -> None:
    assert bounded_message("model 'm' not found") == "model 'm' not found"
    exact = "x" * MAX_STATUS_MESSAGE_BYTES
    assert bounded_message(exact) == exact
    assert bounded_message(exact + "y").endswith("... (41 more characters)")
    # A lone surrogate cannot be sent as UTF-8: it becomes "?" instead of failing the call.
    assert bounded_message("bad \ud800 name") == "bad ? name"
    cut = bounded_message("é" * 5000)
    cut.encode("utf-8")
    assert cut.startswith("é" * 300) and _wire_length(cut) <= MAX_STATUS_MESSAGE_BYTES
    # Percent signs and newlines cost three bytes on the wire, and are counted so.
    assert _wire_length(bounded_message("%\n" * 2000)) <= MAX_STATUS_MESSAGE_BYTES


# Connection caps ---------------------------------------------------------------------------------

async def test_one_connection_runs_at_most_max_concurrent_streams_calls(probe: ServiceApp) -> None:
    _running[:] = [0, 0]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{probe.port}") as channel:
        call = channel.unary_unary(f"/{PROBE}/Slow")
        # The first call opens the connection and brings the server's SETTINGS (the cap): streams
        # opened before the client knows it may be refused (REFUSED_STREAM) rather than queued.
        assert await call(b"", timeout=10) == b"done"
        _running[:] = [0, 0]
        answers = await asyncio.gather(*(call(b"", timeout=10) for _ in range(6)))
    assert answers == [b"done"] * 6
    assert _running[1] == 2


async def test_an_idle_connection_is_closed_by_the_server(probe: ServiceApp) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{probe.port}") as channel:
        assert await channel.unary_unary(f"/{PROBE}/Slow")(b"", timeout=10) == b"done"
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        # max_connection_idle_ms=300: the server sends GOAWAY and the channel goes back to IDLE.
        for _ in range(100):
            if channel.get_state() == grpc.ChannelConnectivity.IDLE:
                break
            await asyncio.sleep(0.05)
        assert channel.get_state() == grpc.ChannelConnectivity.IDLE
        assert await channel.unary_unary(f"/{PROBE}/Slow")(b"", timeout=10) == b"done"


def test_connection_settings_come_from_flags_and_service_environment() -> None:
    settings = load_settings(
        ServerSettings, ["--max-concurrent-streams", "32"], service="gateway",
        environ={"AIAAS_GATEWAY_KEEPALIVE_TIME_MS": "15000", "AIAAS_MAX_CONCURRENT_STREAMS": "8",
                 "AIAAS_MAX_CONNECTION_AGE_MS": "600000", "AIAAS_KEEPALIVE_PERMIT_WITHOUT_CALLS": "false"},
    )
    options = dict(server_options(settings, max_receive_bytes=4 << 20))
    assert options["grpc.max_concurrent_streams"] == 32
    assert options["grpc.keepalive_time_ms"] == 15000
    assert options["grpc.keepalive_permit_without_calls"] == 0
    assert options["grpc.max_connection_age_ms"] == 600000
    assert options["grpc.max_connection_age_grace_ms"] == settings.max_connection_age_grace_ms
    assert options["grpc.max_receive_message_length"] == 4 << 20
    assert options["grpc.max_send_message_length"] == settings.max_message_bytes
    assert "grpc.max_connection_age_ms" not in dict(server_options(ServerSettings(), 1 << 20))


def test_connection_settings_are_validated() -> None:
    for bad in (["--max-concurrent-streams", "0"], ["--keepalive-time-ms", "10"], ["--max-connection-idle-ms", "-1"]):
        with pytest.raises(InvalidArgument):
            load_settings(ServerSettings, bad, service="gateway", environ={})


# Telemetry endpoint ------------------------------------------------------------------------------

def test_metrics_endpoint_binds_the_service_host_only(services: Services) -> None:
    listening = [c for c in psutil.Process(services.monitor.proc.pid).net_connections(kind="tcp")  # type: ignore[union-attr]
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == services.metrics_port]
    assert [c.laddr.ip for c in listening] == ["127.0.0.1"]
    with urllib.request.urlopen(f"http://127.0.0.1:{services.metrics_port}/metrics", timeout=10) as reply:
        assert reply.status == 200
