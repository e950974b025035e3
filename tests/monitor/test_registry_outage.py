"""A real monitor following a real registry's change feed, through a registry outage.

The registry (SQLite, so a restart keeps its records and revisions) is SIGKILLed for a few
seconds while the monitor keeps evaluating and answering; then it comes back on the same port and
records are written at once. The monitor must converge on them (seen through its own RPCs) and
its log must hold one-line warnings only: no traceback, and not one line per retry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from aiaas.gateway.v1 import gateway_pb2
from aiaas.monitor.v1 import monitor_pb2 as pb
from aiaas.monitor.v1 import monitor_pb2_grpc
from aiaas.records import ROUTE, SLO
from services.common.registry_client import RegistryClient
from tests.support.procs import ServiceProcess
from tests.support.servers import free_port

OUTAGE_S = 4.0


def _registry(tmp: Path, port: int) -> ServiceProcess:
    return ServiceProcess("registry", ["--database-url", f"sqlite:///{tmp / 'registry.db'}",
                                       "--artifact-dir", str(tmp / "artifacts"), "--grace-period-s", "1"], port=port)


async def _put_slo(registry: RegistryClient, model: str, p99_ms: float) -> None:
    await registry.put_record(SLO.record(model, pb.SLO(model=model, p99_latency_ms=p99_ms)), expected_revision=-1,
                              actor="another-replica")


async def _put_route(registry: RegistryClient, model: str, production: int, canary: int) -> None:
    route = gateway_pb2.Route(model=model, splits=[gateway_pb2.RouteSplit(alias="production", weight=production),
                                                   gateway_pb2.RouteSplit(alias="canary", weight=canary)])
    await registry.put_record(ROUTE.record(model, route), expected_revision=-1, actor="operator")


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[tuple[Path, ServiceProcess, ServiceProcess]]:
    registry = _registry(tmp_path, free_port()).start()
    monitor = ServiceProcess("monitor", ["--registry-url", registry.address, "--evaluation-interval-s", "0.2",
                                         "--metrics-port", "0", "--grace-period-s", "1"])
    try:
        client = RegistryClient.connect(registry.address)
        try:  # in the registry before the monitor starts: it comes with the first snapshot
            await _put_slo(client, "seeded", 100)
        finally:
            await client.close()
        monitor.start()
        yield tmp_path, registry, monitor
    finally:
        monitor.stop()
        registry.stop()


async def test_monitor_rides_out_a_registry_outage_quietly_and_converges_after_it(
        processes: tuple[Path, ServiceProcess, ServiceProcess]) -> None:
    tmp, registry, monitor = processes
    channel = grpc.aio.insecure_channel(monitor.address)
    stub = monitor_pb2_grpc.MonitorStub(channel)

    async def slo_models() -> set[str]:
        return {s.model for s in (await stub.ListSLOs(pb.ListSLOsRequest(), timeout=5)).slos}

    async def has_canary(model: str) -> bool:
        try:
            status = await stub.GetCanaryStatus(pb.GetCanaryStatusRequest(model=model), timeout=5)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return False
        return status.status.model == model

    try:
        # The first snapshot (start-up waits a few seconds for it), then changes by others over the feed.
        async def snapshot_seen() -> bool:
            return await slo_models() == {"seeded"}

        await _eventually(snapshot_seen, 15, "the SLO written before the monitor started")
        client = RegistryClient.connect(registry.address)
        try:
            await _put_slo(client, "live", 50)
            await _put_route(client, "canaried", 90, 10)
            await client.delete_record(SLO.kind, "seeded", actor="another-replica")
        finally:
            await client.close()

        async def live_changes_seen() -> bool:
            return await slo_models() == {"live"} and await has_canary("canaried")

        await _eventually(live_changes_seen, 15, "SLO and route changes over the feed")
        assert "Traceback" not in monitor.log()

        registry.kill()  # SIGKILL: no goodbye on the feed
        outage_started = time.monotonic()
        # Meanwhile the monitor answers from what it holds; writes fail with a clear status.
        assert await slo_models() == {"live"} and await has_canary("canaried")
        for p99 in (10, 20):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.SetSLO(pb.SetSLORequest(slo=pb.SLO(model="during", p99_latency_ms=p99), actor="t"),
                                  timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "registry unreachable" in (caught.value.details() or "")
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_started)))  # the outage itself

        restarted = _registry(tmp, registry.port).start()
        try:
            client = RegistryClient.connect(restarted.address)
            try:  # written at once, while the monitor is still reconnecting
                await _put_slo(client, "after", 75)
                await _put_route(client, "late", 50, 50)
                await client.delete_record(ROUTE.kind, "canaried", actor="operator")
            finally:
                await client.close()

            async def converged() -> bool:
                return (await slo_models() == {"live", "after"} and await has_canary("late")
                        and not await has_canary("canaried"))

            await _eventually(converged, 30, "the monitor converging after the registry came back")
            # Writes go through again.
            await stub.SetSLO(pb.SetSLORequest(slo=pb.SLO(model="during", p99_latency_ms=30), actor="t"), timeout=10)
            await _eventually(lambda: _has_slo(stub, "during"), 10, "the SLO written through the monitor")
            log = monitor.log()
        finally:
            restarted.stop()
    finally:
        await channel.close()

    assert "Traceback" not in log, log
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    # One from the feed (lost at the kill), one from the registry client (the first failed SetSLO);
    # the reconnect attempts and the second failed write add none.
    assert len(warnings) == 2, "\n".join(warnings)
    unreachable = f"registry at {registry.address} unreachable: UNAVAILABLE: "
    assert all(unreachable in line for line in warnings), "\n".join(warnings)
    assert sum("monitor feed: " in line and "serving from cache" in line for line in warnings) == 1
    back = [line for line in log.splitlines() if " INFO " in line and "answers again after" in line]
    assert any("monitor feed: " in line for line in back) and len(back) == 2, "\n".join(back)


async def _has_slo(stub: monitor_pb2_grpc.MonitorStub, model: str) -> bool:
    reply = await stub.ListSLOs(pb.ListSLOsRequest(model=model), timeout=5)
    return [s.model for s in reply.slos] == [model]
