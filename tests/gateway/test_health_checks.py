"""Active health checks of the inference replicas (issue 12): in process against echo replicas that
serve grpc.health.v1, then with real processes: an inference replica killed and started again on
the same port gets traffic from the gateway within 2 s of its health saying SERVING."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from services.gateway.balancer import Balancer, Replica
from services.gateway.upstream import InferenceUpstream
from tests.gateway.load import ClosedLoop, served, serving, wait_for
from tests.gateway.stack import MlpStack, mlp_behind_a_gateway
from tests.gateway.test_hedging import infer_request
from tests.gateway.upstream_double import EchoReplica

INTERVAL_S = 0.2


@pytest.fixture
async def replicas() -> AsyncIterator[list[EchoReplica]]:
    started = [await EchoReplica(health_service=True).start(), await EchoReplica(health_service=True).start()]
    yield started
    for replica in started:
        await replica.stop()


async def checked_pool(addresses: list[str]) -> InferenceUpstream:
    upstream = InferenceUpstream(addresses, Balancer(eject_after=3, eject_base_s=1.0, eject_max_s=30.0),
                                 max_message_bytes=1 << 20, health_check_interval_s=INTERVAL_S,
                                 health_check_timeout_s=0.5)
    await upstream.start()
    return upstream


async def poll(condition: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until `condition` holds, checked every 10 ms; fails the test after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "condition not met in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def replica_of(upstream: InferenceUpstream, echo: EchoReplica) -> Replica:
    return next(r for r in upstream.balancer.replicas if r.address == echo.address)


async def test_a_replica_back_on_its_port_is_found_by_its_health_check(replicas: list[EchoReplica]) -> None:
    back, other = replicas
    upstream = await checked_pool([back.address, other.address])
    replica = replica_of(upstream, back)
    try:
        await back.stop()
        await poll(lambda: replica.ejected(time.monotonic()) and not replica.reachable)
        await asyncio.sleep(3.0)  # refused again and again: ejected for longer and longer
        assert replica.ejected_until - time.monotonic() > 10.0
        await back.start(back.port)
        took = await poll(lambda: replica in upstream.balancer.healthy())
        print(f"\nin process: back in the pool {took:.2f}s after SERVING (checks every {INTERVAL_S}s)")
        assert took < 1.0
        other.delay_s = 0.5  # busy: the least outstanding goes to the one that is back
        answers = await asyncio.gather(*(upstream.call("ModelInfer", infer_request(i), timeout=5.0) for i in range(4)))
        assert len(answers) == 4 and back.seen
    finally:
        await upstream.close()


async def test_not_serving_ejects_at_once_and_serving_brings_it_back(replicas: list[EchoReplica]) -> None:
    draining, other = replicas
    upstream = await checked_pool([draining.address, other.address])
    replica = replica_of(upstream, draining)
    try:
        await draining.set_serving(False)
        assert await poll(lambda: replica.ejected(time.monotonic())) < 1.0
        for i in range(6):
            await upstream.call("ModelInfer", infer_request(i), timeout=5.0)
        assert not draining.seen and len(other.seen) == 6
        await draining.set_serving(True)
        assert await poll(lambda: not replica.ejected(time.monotonic())) < 1.0
    finally:
        await upstream.close()


async def test_a_replica_without_the_health_service_is_left_unchecked(replicas: list[EchoReplica]) -> None:
    plain = await EchoReplica().start()  # UNIMPLEMENTED: no verdict, no ejection
    upstream = await checked_pool([plain.address, replicas[0].address])
    try:
        assert upstream.health is not None
        unchecked, checked = upstream.balancer.replicas
        await poll(lambda: not upstream.health.watching(unchecked))  # type: ignore[union-attr]
        await asyncio.sleep(3 * INTERVAL_S)
        assert upstream.health.watching(checked)
        assert unchecked.consecutive_failures == 0 and not unchecked.ejected(time.monotonic())
    finally:
        await upstream.close()
        await plain.stop()


async def test_checks_stop_when_a_replica_leaves_the_pool_and_on_close(replicas: list[EchoReplica]) -> None:
    upstream = await checked_pool([r.address for r in replicas])
    health = upstream.health
    assert health is not None
    leaving, staying = upstream.balancer.replicas
    assert health.watching(leaving) and health.watching(staying)
    upstream._apply([staying.address])  # what a DNS refresh that lost an address does
    assert not health.watching(leaving) and health.watching(staying)
    await upstream.close()
    assert not health.watching(staying)
    checks = [t for t in asyncio.all_tasks() if t.get_name().startswith("gateway-health-")]
    assert checks == []


# Real processes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlpStack]:
    with mlp_behind_a_gateway(tmp_path_factory) as started:  # default settings: checks every 0.5 s
        yield started


def test_a_restarted_replica_gets_traffic_within_2s_of_serving(stack: MlpStack) -> None:
    restarted = stack.replicas[1]
    with ClosedLoop(stack.gateway.address, stack.token) as load:
        wait_for(lambda: served(restarted.address) > 10, timeout=30)
        restarted.kill()
        # Down long enough that without health checks its ejection (doubling up to 30 s) and the
        # channel's reconnect backoff (growing to 120 s) would keep it out well past its return.
        time.sleep(5.0)
        restarted.start(wait=False)
        serving_at = wait_for(lambda: serving(restarted.address), timeout=120)
        traffic_at = wait_for(lambda: served(restarted.address) > 0, timeout=30)
    took = traffic_at - serving_at
    print(f"\nrestarted replica: traffic {took:.2f}s after its health said SERVING; through the gateway: "
          f"sent={load.sent} failed={len(load.failures)} p99={load.p99():.3f}s")
    assert took < 2.0
    assert load.failures == []
