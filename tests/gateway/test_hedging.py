"""Per-try timeouts and hedged tries, in process: `InferenceUpstream` forwarding ModelInfer bytes to
echo replicas (upstream_double.py) of which one is slow or stalled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from services.common.errors import DeadlineExceeded
from services.gateway.balancer import Balancer, Replica
from services.gateway.try_timeout import TryTimeouts
from services.gateway.upstream import InferenceUpstream
from tests.gateway.upstream_double import EchoReplica


def infer_request(value: float) -> bytes:
    request = pb.ModelInferRequest(model_name="m", model_version="1",
                                   raw_input_contents=[np.array([value], np.float32).tobytes()])
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
    return request.SerializeToString()


def echoed(answer: bytes) -> float:
    return float(np.frombuffer(pb.ModelInferResponse.FromString(answer).raw_output_contents[0], np.float32)[0])


@pytest.fixture
async def replicas() -> AsyncIterator[list[EchoReplica]]:
    started = [await EchoReplica().start(), await EchoReplica().start(), await EchoReplica().start()]
    yield started
    for replica in started:
        await replica.stop()


async def pool(replicas: list[EchoReplica], try_timeouts: TryTimeouts, **balancer: float) -> InferenceUpstream:
    upstream = InferenceUpstream([r.address for r in replicas], Balancer(**balancer),  # type: ignore[arg-type]
                                 max_message_bytes=1 << 20, try_timeouts=try_timeouts)
    await upstream.start()
    return upstream


def replica_of(upstream: InferenceUpstream, echo: EchoReplica) -> Replica:
    return next(r for r in upstream.balancer.replicas if r.address == echo.address)


async def test_a_stalled_try_is_hedged_and_counted_against_its_replica(replicas: list[EchoReplica]) -> None:
    stalled, fast = replicas[0], replicas[1]
    upstream = await pool(replicas[:2], TryTimeouts(floor_s=0.2, p99_factor=3.0), eject_after=3, eject_base_s=30.0)
    try:
        for i in range(40):  # both fast: the per-try timeout settles at the floor
            assert echoed(await upstream.call("ModelInfer", infer_request(i), timeout=10.0)) == i
        assert upstream.pool_latency.p99() is not None
        stalled.delay_s = 60.0  # as good as hung
        seen_before = len(stalled.seen)
        slow_one = replica_of(upstream, stalled)
        calls = 0
        while not slow_one.ejected(time.monotonic()):
            calls += 1
            assert calls <= 20, "the stalled replica was never ejected"
            started = time.monotonic()
            assert echoed(await upstream.call("ModelInfer", infer_request(calls), timeout=10.0)) == calls
            assert time.monotonic() - started < 2.0  # the floor (0.2 s) and the hedge, not the 60 s stall
        assert slow_one.ejections == 1 and not slow_one.down  # stalls: its transport is fine
        assert replica_of(upstream, fast).consecutive_failures == 0
        assert len(stalled.seen) - seen_before >= 3  # three stalls in a row eject it
        seen_by_fast, seen_by_stalled = len(fast.seen), len(stalled.seen)
        for i in range(5):  # ejected: nothing is sent to it, nothing waits on it
            await upstream.call("ModelInfer", infer_request(i), timeout=10.0)
        assert (len(fast.seen), len(stalled.seen)) == (seen_by_fast + 5, seen_by_stalled)
        await asyncio.sleep(0.05)
        assert slow_one.outstanding == 0  # the stalled tries were cancelled once the hedge won
    finally:
        await upstream.close()


async def test_a_slow_answer_that_comes_first_wins_and_counts_nothing(replicas: list[EchoReplica]) -> None:
    for replica in replicas[:2]:
        replica.delay_s = 0.5
    upstream = await pool(replicas[:2], TryTimeouts.parse("0.1", floor_s=0.1))
    try:
        started = time.monotonic()
        assert echoed(await upstream.call("ModelInfer", infer_request(7), timeout=10.0)) == 7
        assert time.monotonic() - started < 0.58  # the first try's answer, not the hedge's (0.6 s)
        assert [len(r.seen) for r in replicas[:2]] == [1, 1]  # it was hedged all the same
        assert all(r.consecutive_failures == 0 and r.ejections == 0 for r in upstream.balancer.replicas)
    finally:
        await upstream.close()


async def test_a_hedge_that_fails_is_followed_by_another(replicas: list[EchoReplica]) -> None:
    stalled, gone, fast = replicas
    stalled.delay_s = 60.0
    upstream = await pool(replicas, TryTimeouts.parse("0.2", floor_s=0.1), eject_after=3)
    await gone.stop()
    try:
        for replica in upstream.balancer.replicas:
            replica.outstanding = 0 if replica.address == stalled.address else 1  # the stalled one first
        started = time.monotonic()
        assert echoed(await upstream.call("ModelInfer", infer_request(3), timeout=10.0)) == 3
        assert time.monotonic() - started < 1.5
        assert len(stalled.seen) == 1 and len(fast.seen) == 1
        assert replica_of(upstream, gone).down and replica_of(upstream, stalled).consecutive_failures == 1
    finally:
        await upstream.close()


async def test_no_hedge_when_the_deadline_is_nearly_over(replicas: list[EchoReplica]) -> None:
    for replica in replicas[:2]:
        replica.delay_s = 1.0
    upstream = await pool(replicas[:2], TryTimeouts.parse("0.2", floor_s=0.25))
    try:
        with pytest.raises(DeadlineExceeded):
            await upstream.call("ModelInfer", infer_request(1), timeout=0.4)  # 0.2 s left after the try
        assert sum(len(r.seen) for r in replicas[:2]) == 1
        assert await upstream.call("ModelInfer", infer_request(2), timeout=3.0)  # 2.8 s left: hedged
        assert sum(len(r.seen) for r in replicas[:2]) == 3
    finally:
        await upstream.close()


async def test_a_lone_replica_is_waited_for(replicas: list[EchoReplica]) -> None:
    replicas[0].delay_s = 0.4
    upstream = await pool(replicas[:1], TryTimeouts.parse("0.1", floor_s=0.1))
    try:
        assert echoed(await upstream.call("ModelInfer", infer_request(4), timeout=5.0)) == 4
        assert len(replicas[0].seen) == 1
        assert upstream.balancer.replicas[0].consecutive_failures == 0
    finally:
        await upstream.close()


async def test_reads_and_the_off_setting_are_not_hedged(replicas: list[EchoReplica]) -> None:
    for replica in replicas[:2]:
        replica.delay_s = 0.3
    upstream = await pool(replicas[:2], TryTimeouts.parse("off"))
    try:
        await upstream.call("ModelInfer", infer_request(1), timeout=5.0)
        assert sum(len(r.seen) for r in replicas[:2]) == 1
    finally:
        await upstream.close()
    upstream = await pool(replicas[:2], TryTimeouts.parse("0.05", floor_s=0.05))
    try:
        request = pb.ModelReadyRequest(name="m", version="1").SerializeToString()
        replicas[0].seen.clear()
        replicas[1].seen.clear()
        await upstream.call("ModelReady", request, timeout=5.0)
        assert sum(len(r.seen) for r in replicas[:2]) == 1
    finally:
        await upstream.close()


async def test_a_caller_gone_cancels_every_try_and_counts_nothing(replicas: list[EchoReplica]) -> None:
    for replica in replicas[:2]:
        replica.delay_s = 60.0
    upstream = await pool(replicas[:2], TryTimeouts.parse("0.1", floor_s=0.1))
    try:
        call = asyncio.ensure_future(upstream.call("ModelInfer", infer_request(1), timeout=30.0))
        deadline = time.monotonic() + 10.0
        while sum(len(r.seen) for r in replicas[:2]) < 2:  # the first try and its hedge
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert sorted(r.outstanding for r in upstream.balancer.replicas) == [1, 1]
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert all(r.outstanding == 0 and r.consecutive_failures == 0 for r in upstream.balancer.replicas)
    finally:
        await upstream.close()
