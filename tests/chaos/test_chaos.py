"""The chaos suite (issue 12): one fleet, load through both gateways, and in turn the faults a fleet
meets: a replica killed and restarted, a replica hung (SIGSTOP) for 5 s, a replica overloaded,
aliases moved, Redis killed, the registry killed and restarted, the gateways' registry feed broken
in the middle of a snapshot.

Each scenario prints (and appends to the report) the requests sent, the failed ones by status,
and latency percentiles; each asserts that no request failed, since a healthy replica always
existed, that the fleet is whole again, and that the fault really happened and was recovered from.
Scenarios run in file order on the same fleet; each one leaves it as it found it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import redis

from aiaas.api_keys import make_key, stored_key_to_bytes
from aiaas.monitor.v1 import monitor_pb2
from aiaas.records import API_KEY, BASELINE, baseline_name
from aiaas.registry.v1 import registry_pb2 as rpb
from tests.chaos.fleet import FEED_RETENTION, MAX_BATCH, MAX_QUEUE, MODEL, Fleet, answer, register, run_flood
from tests.chaos.load import FleetLoad, LoadStats
from tests.chaos.report import ChaosReport, ScenarioResult
from tests.gateway.stack import PEPPER

pytestmark = pytest.mark.chaos

SNAPSHOT_LINE = "registry snapshot at revision"
RESYNC_LINE = "asks for a resync"


def load_on(fleet: Fleet) -> FleetLoad:
    return FleetLoad(fleet.gateway_addresses, MODEL, fleet.token, clients_per_gateway=2)


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Seconds until `check()` holds; fails the scenario after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await check():
            return round(time.monotonic() - started, 1)
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout}s")


def verdict(fleet: Fleet, report: ChaosReport, scenario: str, stats: LoadStats, **notes: Any) -> None:
    """Report the scenario, then: nothing failed, both gateways carried load, the fleet is whole."""
    result = ScenarioResult.of(scenario, stats, **notes)
    report.add(result)
    assert stats.failed == 0, f"{result.scenario}: {result.failed} failed; first: {stats.errors()}"
    assert all(stats.by_gateway().get(i, 0) >= 10 for i in range(len(fleet.gateways))), stats.by_gateway()
    assert not fleet.dead(), f"processes down after {result.scenario}: {fleet.dead()}"


async def test_sigkill_and_restart_an_inference_replica(fleet: Fleet, chaos_report: ChaosReport) -> None:
    async with load_on(fleet) as load:
        await load.wait_for(40)
        fleet.replicas[0].kill()
        await load.wait_for(40)  # served by the other replica meanwhile
        started = time.monotonic()
        await asyncio.to_thread(fleet.restart_replica, 0)
        restart_s = round(time.monotonic() - started, 1)

        async def taking_traffic() -> bool:
            return await asyncio.to_thread(fleet.served_by, 0) >= 20

        back_s = await until(taking_traffic, 60, "the restarted replica answering the gateways' requests")
    verdict(fleet, chaos_report, "SIGKILL + restart an inference replica", load.stats(),
            restart_to_serving_s=restart_s, traffic_back_after_s=back_s)


async def test_sigstop_an_inference_replica_for_5_s(fleet: Fleet, chaos_report: ChaosReport) -> None:
    """A hung replica: its connections stay open and nothing answers. The client's deadline (3 s)
    is shorter than the hang, so a request left waiting on it fails."""
    hung = fleet.replicas[1]
    async with load_on(fleet) as load:
        await load.wait_for(40)
        mark = load.mark()
        hung.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(5.0)
        finally:
            hung.signal(signal.SIGCONT)
        during = load.stats(mark)
        await load.wait_for(40)
    verdict(fleet, chaos_report, "SIGSTOP an inference replica for 5 s", load.stats(),
            during_the_hang=f"{during.sent} sent, {during.failed} failed {during.failed_by_status() or ''}".strip())


async def test_overload_one_inference_replica(fleet: Fleet, chaos_report: ChaosReport) -> None:
    """48 clients send 128-row requests straight at one replica: its queue (16) fills and its
    queued requests time out (1 s). The gateways' requests it refuses go to the other replica."""
    async with load_on(fleet) as load:
        await load.wait_for(20)
        flood = run_flood(fleet.replicas[0].address, seconds=8, concurrency=48, rows=MAX_BATCH)
        out, err = await asyncio.to_thread(flood.communicate, None, 90)
        assert flood.returncode == 0, err[-2000:]
        await load.wait_for(20)
    flooded: dict[str, int] = json.loads(out)
    refused = flooded.get("RESOURCE_EXHAUSTED", 0) + flooded.get("UNAVAILABLE", 0)
    verdict(fleet, chaos_report, "overload one inference replica", load.stats(), flood_answers=flooded,
            queue_limit=MAX_QUEUE)
    assert refused > 0, f"the flood never overloaded the replica: {flooded}"


async def test_move_aliases_under_load(fleet: Fleet, chaos_report: ChaosReport) -> None:
    """New versions uploaded and production moved to each (every replica loads it first), then
    moved back and forth within a second, then rolled back to version 1."""
    took: dict[str, float] = {}
    async with load_on(fleet) as load:
        await load.wait_for(20)
        v2 = await asyncio.to_thread(register, fleet.registry, fleet.versions[1])
        v3 = await asyncio.to_thread(register, fleet.registry, fleet.versions[2])
        for label, moves in ((f"to new v{v2}", [v2]), (f"to new v{v3}", [v3]),
                             (f"flap v{v2}/v{v3}/v{v2}", [v2, v3, v2]), ("back to v1", [1])):
            for version in moves:
                await asyncio.to_thread(fleet.registry.set_alias, MODEL, "production", version)
            target = str(moves[-1])

            async def serving(version: str = target) -> bool:
                return load.serving(version)

            took[label] = await until(serving, 90, f"both gateways serving v{target} after moving {label}")
    stats = load.stats()
    verdict(fleet, chaos_report, "move aliases under load", stats, seconds_until_served=took)
    assert {"1", str(v2), str(v3)} <= set(stats.versions()), stats.versions()


async def test_kill_redis(fleet: Fleet, chaos_report: ChaosReport) -> None:
    """Quotas live in Redis; while it is gone each gateway enforces its share locally, and once it
    is back the gateways use it again."""
    store = redis.Redis.from_url(fleet.redis.url, socket_timeout=5)

    async def buckets_in_redis() -> bool:
        try:
            return await asyncio.to_thread(lambda: any(True for _ in store.scan_iter("aiaas:quota:*")))
        except redis.RedisError:
            return False

    try:
        async with load_on(fleet) as load:
            await load.wait_for(20)
            await until(buckets_in_redis, 30, "quota buckets in Redis before the kill")
            assert fleet.redis.proc is not None
            fleet.redis.proc.kill()
            fleet.redis.proc.wait()
            mark = load.mark()
            await asyncio.sleep(4.0)
            await load.wait_for(20)
            during = load.stats(mark)
            await asyncio.to_thread(fleet.restart_redis)
            back_s = await until(buckets_in_redis, 30, "the gateways writing quota buckets to the new Redis")
            await load.wait_for(20)
    finally:
        store.close()
    verdict(fleet, chaos_report, "kill Redis (then start it again)", load.stats(), sent_while_down=during.sent,
            buckets_back_after_s=back_s)


async def test_kill_and_restart_the_registry(fleet: Fleet, chaos_report: ChaosReport) -> None:
    """Serving goes on from the caches while the registry is gone; once it is back, an alias move
    reaches every replica and gateway (their feeds resume)."""
    async with load_on(fleet) as load:
        await load.wait_for(20)
        fleet.registry_proc.kill()
        mark = load.mark()
        await asyncio.sleep(5.0)
        await load.wait_for(20)
        during = load.stats(mark)
        started = time.monotonic()
        await asyncio.to_thread(fleet.restart_registry)
        restart_s = round(time.monotonic() - started, 1)
        # A new version uploaded to the restarted registry and moved to: the feeds resumed.
        version = await asyncio.to_thread(register, fleet.registry, fleet.versions[1])
        await asyncio.to_thread(fleet.registry.set_alias, MODEL, "production", version)

        async def serving(target: str = str(version)) -> bool:
            return load.serving(target)

        moved_s = await until(serving, 90, "an alias move after the registry's restart reaching the fleet")
        await asyncio.to_thread(fleet.registry.set_alias, MODEL, "production", 1)
        await until(lambda: serving("1"), 90, "production back on v1")
    verdict(fleet, chaos_report, "kill -9 and restart the registry", load.stats(), sent_while_down=during.sent,
            registry_restart_s=restart_s, alias_move_served_after_s=moved_s)


def snapshot_size(fleet: Fleet) -> int:
    """Bytes of the registry's snapshot as the feed sends it (messages and their gRPC framing)."""
    call = fleet.registry.stub.WatchModels(rpb.WatchModelsRequest(after_revision=0), timeout=30)
    size = 0
    try:
        for response in call:
            size += response.ByteSize() + 5
            if response.event.type == rpb.ChangeEventType.CHANGE_EVENT_TYPE_SNAPSHOT_DONE:
                return size
    finally:
        call.cancel()
    raise AssertionError("the registry's feed ended before SNAPSHOT_DONE")


def put_padding(fleet: Fleet, count: int) -> None:
    """`count` baselines of other models (about 4 KB each): more changes than the feed keeps, and a
    snapshot large enough to be cut in its middle."""
    edges = np.linspace(-3, 3, 63).tolist()
    fractions = [1 / 64] * 64
    for i in range(count):
        baseline = monitor_pb2.Baseline(model=f"chaos-pad-{i:03d}", version=1, histograms=[
            monitor_pb2.FeatureHistogram(feature=f"input[{j}]", edges=edges, fractions=fractions, count=1000)
            for j in range(4)])
        fleet.registry.stub.PutRecord(rpb.PutRecordRequest(
            record=BASELINE.record(baseline_name(baseline.model, 1), baseline), expected_revision=-1,
            actor="chaos"), timeout=30)


def put_key(fleet: Fleet, name: str) -> str:
    """A new API key written straight to the registry (as another gateway would); returns its token."""
    entry, token = make_key(PEPPER.encode(), name=name, models=(MODEL,))
    fleet.registry.stub.PutRecord(rpb.PutRecordRequest(
        record=rpb.Record(kind=API_KEY.kind, name=entry.key_id, data=stored_key_to_bytes(entry)),
        expected_revision=0, actor="chaos"), timeout=30)
    return token


async def test_break_the_registry_feed_mid_snapshot(fleet: Fleet, chaos_report: ChaosReport) -> None:
    """The gateways lose the registry while more changes happen than the feed keeps, so coming back
    they must take a whole new snapshot; the first two snapshot streams are cut halfway. Meanwhile
    they serve from their caches; a half snapshot is never applied; the whole one brings a key
    created while they were away."""
    snapshots_before = [g.log().count(SNAPSHOT_LINE) for g in fleet.gateways]
    resyncs_before = [g.log().count(RESYNC_LINE) for g in fleet.gateways]
    async with load_on(fleet) as load:
        await load.wait_for(20)
        for proxy in fleet.feed_proxies:
            proxy.refuse()
        await asyncio.to_thread(put_padding, fleet, FEED_RETENTION + 20)
        new_token = await asyncio.to_thread(put_key, fleet, "chaos-feed")
        size = await asyncio.to_thread(snapshot_size, fleet)
        while_away = [await asyncio.to_thread(answer, a, new_token) for a in fleet.gateway_addresses]
        assert while_away == ["UNAUTHENTICATED"] * 2, f"the new key while the feeds were broken: {while_away}"
        for proxy in fleet.feed_proxies:
            proxy.cut_next(2, size // 2)
            proxy.relay()

        async def key_known_everywhere() -> bool:
            answers = [await asyncio.to_thread(answer, a, new_token) for a in fleet.gateway_addresses]
            return answers == ["OK"] * 2

        converged_s = await until(key_known_everywhere, 90, "the key made during the break known to both gateways")
        await load.wait_for(20)
    cuts = [[c.bytes_down for c in proxy.cuts()] for proxy in fleet.feed_proxies]
    snapshots = [g.log().count(SNAPSHOT_LINE) - n for g, n in zip(fleet.gateways, snapshots_before, strict=True)]
    resyncs = [g.log().count(RESYNC_LINE) - n for g, n in zip(fleet.gateways, resyncs_before, strict=True)]
    verdict(fleet, chaos_report, "break the registry feed mid-snapshot", load.stats(), snapshot_bytes=size,
            cut_after_bytes=cuts, resyncs=resyncs, snapshots_installed=snapshots, converged_after_s=converged_s)
    assert resyncs == [1, 1], f"resyncs asked for by the gateways: {resyncs}"
    for gateway_cuts, installed in zip(cuts, snapshots, strict=True):
        assert gateway_cuts and all(0 < c < size for c in gateway_cuts), cuts  # cut inside a snapshot
        assert installed == 1, f"{installed} snapshots installed after {len(gateway_cuts)} cut ones"
