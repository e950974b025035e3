"""Token buckets: in-process, shared through a real Redis by two enforcers, and Redis failures
(local buckets at 1/replicas while Redis is slow or down, open, closed)."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid

import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, NumberDataPoint
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.common.errors import ResourceExhausted, Unavailable
from services.gateway.entities import Caller, QuotaSpec, Role
from services.gateway.quotas import (
    LocalBuckets,
    LocalTokenBuckets,
    QuotaEnforcer,
    buckets_for,
    token_buckets_for,
)
from tests.support.servers import RedisServer, free_port


def caller(rps: float = 0.0, burst: int = 0) -> Caller:
    return Caller(key_id=uuid.uuid4().hex[:12], models=("*",), roles=frozenset({Role.INFER}),
                  quota=QuotaSpec(rps, burst) if rps else None)


def client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, socket_timeout=0.05, socket_connect_timeout=0.05, retry=Retry(NoBackoff(), 0))


def test_local_bucket_takes_refills_and_hints() -> None:
    buckets = LocalBuckets()
    spec = [("k", QuotaSpec(rps=10, burst=3))]
    assert [buckets.take(spec, now=100.0) for _ in range(3)] == [0, 0, 0]
    assert buckets.take(spec, now=100.0) == 100
    assert buckets.take(spec, now=100.05) == 50
    assert buckets.take(spec, now=100.1) == 0


def test_local_bucket_takes_from_all_or_none() -> None:
    buckets = LocalBuckets()
    wide, narrow = ("wide", QuotaSpec(rps=1, burst=5)), ("narrow", QuotaSpec(rps=1, burst=1))
    assert buckets.take([wide, narrow], now=0.0) == 0
    assert buckets.take([wide, narrow], now=0.0) > 0
    # The refused request took nothing from the wide bucket.
    assert [buckets.take([wide], now=0.0) for _ in range(4)] == [0, 0, 0, 0]


def test_buckets_come_from_key_model_and_defaults() -> None:
    unlimited = QuotaSpec()
    assert buckets_for(caller(), "m", None, unlimited, unlimited) == []
    c = caller(5, 5)
    names = [n for n, _ in buckets_for(c, "m", QuotaSpec(100, 10), unlimited, unlimited)]
    assert names == [f"aiaas:quota:key:{c.key_id}", "aiaas:quota:model:m"]
    assert len(buckets_for(caller(), "m", None, QuotaSpec(1, 1), unlimited)) == 1


async def test_in_process_enforcer_raises_with_retry_after() -> None:
    quotas = QuotaEnforcer()
    c = caller(rps=1, burst=2)
    await quotas.check(c, "m", None)
    await quotas.check(c, "m", None)
    with pytest.raises(ResourceExhausted) as info:
        await quotas.check(c, "m", None)
    assert 0 < int(info.value.metadata["retry-after-ms"]) <= 1000
    assert "retry after" in info.value.message


async def test_two_enforcers_share_one_redis_bucket(redis_server: RedisServer) -> None:
    one, two = client(redis_server.url), client(redis_server.url)
    try:
        first, second = QuotaEnforcer(redis=one), QuotaEnforcer(redis=two)
        c = caller(rps=2, burst=4)
        admitted = 0
        for enforcer in (first, second, first, second, first, second):
            try:
                await enforcer.check(c, "m", None)
                admitted += 1
            except ResourceExhausted as exc:
                hint = int(exc.metadata["retry-after-ms"])
        assert admitted == 4
        assert 0 < hint <= 500
        await asyncio.sleep(hint / 1000 + 0.05)
        await second.check(c, "m", None)
    finally:
        await one.aclose()
        await two.aclose()


async def test_model_quota_is_shared_across_keys(redis_server: RedisServer) -> None:
    redis = client(redis_server.url)
    try:
        quotas = QuotaEnforcer(redis=redis)
        model = f"m-{uuid.uuid4().hex[:6]}"
        await quotas.check(caller(), model, QuotaSpec(rps=0.5, burst=1))
        with pytest.raises(ResourceExhausted, match=f"model:{model}"):
            await quotas.check(caller(), model, QuotaSpec(rps=0.5, burst=1))
    finally:
        await redis.aclose()


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_unreachable_redis_fails_fast_in_the_configured_mode(mode: str) -> None:
    redis = client(f"redis://127.0.0.1:{free_port()}/0")
    try:
        quotas = QuotaEnforcer(redis=redis, failure_mode=mode, timeout_s=0.05, retry_after_s=5.0)
        c = caller(rps=1, burst=1)
        started = time.perf_counter()
        for _ in range(20):
            if mode == "open":
                await quotas.check(c, "m", None)
            else:
                with pytest.raises(Unavailable, match="quota store unreachable") as info:
                    await quotas.check(c, "m", None)
                assert info.value.metadata["retry-after-ms"] == "5000"
        assert time.perf_counter() - started < 0.5
        assert not quotas.store_healthy and quotas.store_failures == 20
    finally:
        await redis.aclose()


async def test_redis_stopped_and_restarted() -> None:
    server = RedisServer().start()
    redis = client(server.url)
    try:
        quotas = QuotaEnforcer(redis=redis, retry_after_s=0.2)
        c = caller(rps=1000, burst=1000)
        await quotas.check(c, "m", None)
        server.stop()
        await quotas.check(c, "m", None)
        assert quotas.store_failures == 1
        await quotas.check(c, "m", None)
        assert quotas.store_failures == 2
    finally:
        await redis.aclose()
        server.close()


def local_decisions(reader: InMemoryMetricReader) -> dict[str, int]:
    """The gateway.quota.local_decisions counter as exported through the OpenTelemetry SDK, by reason."""
    found: dict[str, int] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "gateway.quota.local_decisions":
                    for point in metric.data.data_points:
                        assert isinstance(point, NumberDataPoint) and point.attributes is not None
                        found[str(point.attributes["reason"])] = int(point.value)
    return found


async def admitted_of(quotas: QuotaEnforcer, c: Caller, n: int) -> tuple[int, int]:
    """Admitted requests out of n back to back, and the last refusal's retry-after hint."""
    admitted, hint = 0, 0
    for _ in range(n):
        try:
            await quotas.check(c, "m", None)
            admitted += 1
        except ResourceExhausted as exc:
            hint = int(exc.metadata["retry-after-ms"])
    return admitted, hint


async def test_redis_down_falls_back_to_a_local_bucket_and_counts_it() -> None:
    reader = InMemoryMetricReader()
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    redis = client(f"redis://127.0.0.1:{free_port()}/0")
    try:
        quotas = QuotaEnforcer(redis=redis, timeout_s=0.05, retry_after_s=5.0, meter=meter)
        assert quotas.failure_mode == "local"
        c = caller(rps=2, burst=4)
        admitted, hint = await admitted_of(quotas, c, 10)
        assert admitted == 4  # the key is still limited while Redis is down
        assert 0 < hint <= 500
        assert not quotas.store_healthy
        assert local_decisions(reader) == {"error": 10}
        assert quotas.local_decisions == {"timeout": 0, "error": 10}
    finally:
        await redis.aclose()


async def test_slow_redis_times_out_into_the_local_bucket() -> None:
    # A listener that accepts and never answers: every call runs into the 20 ms bound.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(16)
    reader = InMemoryMetricReader()
    redis = aioredis.Redis.from_url(f"redis://127.0.0.1:{blackhole.getsockname()[1]}/0", retry=Retry(NoBackoff(), 0))
    try:
        quotas = QuotaEnforcer(redis=redis, timeout_s=0.02, retry_after_s=5.0,
                               meter=MeterProvider(metric_readers=[reader]).get_meter("test"))
        started = time.perf_counter()
        admitted, _ = await admitted_of(quotas, caller(rps=2, burst=4), 6)
        assert admitted == 4
        assert time.perf_counter() - started < 1.0
        assert local_decisions(reader) == {"timeout": 6}
    finally:
        await redis.aclose()
        blackhole.close()


async def test_local_share_divides_by_gateway_replicas() -> None:
    redis = client(f"redis://127.0.0.1:{free_port()}/0")
    try:
        quotas = QuotaEnforcer(redis=redis, retry_after_s=5.0, replicas=2)
        admitted, hint = await admitted_of(quotas, caller(rps=2, burst=4), 6)
        assert admitted == 2  # burst 4 / 2 replicas
        assert 500 < hint <= 1000  # refilled at 2 / 2 = 1 per second
    finally:
        await redis.aclose()


async def test_redis_back_makes_decisions_shared_again() -> None:
    server = RedisServer().start()
    one, two = client(server.url), client(server.url)
    try:
        first = QuotaEnforcer(redis=one, retry_after_s=0.2)
        second = QuotaEnforcer(redis=two, retry_after_s=0.2)
        server.stop()
        c = caller(rps=2, burst=4)
        # Down: each gateway decides alone, so both admit a full burst.
        assert (await admitted_of(first, c, 5))[0] == 4
        assert (await admitted_of(second, c, 5))[0] == 4
        server.start()
        await asyncio.sleep(0.25)  # past the retry-after window
        c = caller(rps=2, burst=4)
        admitted = 0
        for enforcer in (first, second) * 4:
            try:
                await enforcer.check(c, "m", None)
                admitted += 1
            except ResourceExhausted:
                pass
        assert admitted == 4  # one bucket in Redis again, across both
        assert first.store_healthy and second.store_healthy
        assert first.local_decisions["error"] == 5 and second.local_decisions["error"] == 5
    finally:
        await one.aclose()
        await two.aclose()
        server.close()


def test_failure_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="failure_mode"):
        QuotaEnforcer(failure_mode="ajar")


# Token quotas (generative requests): checked before, charged after --------------------------

def token_caller(tokens_per_minute: float) -> Caller:
    return Caller(key_id=uuid.uuid4().hex[:12], models=("*",), roles=frozenset({Role.INFER}),
                  quota=QuotaSpec(tokens_per_minute=tokens_per_minute))


def test_token_buckets_come_from_key_model_and_defaults() -> None:
    c = token_caller(600)
    assert token_buckets_for(c, "m", None, 0, 0) == [(f"aiaas:tokens:key:{c.key_id}", QuotaSpec(10.0, 600))]
    assert token_buckets_for(caller(), "m", QuotaSpec(tokens_per_minute=60), 0, 0) == [
        ("aiaas:tokens:model:m", QuotaSpec(1.0, 60))]
    plain = caller()
    assert token_buckets_for(plain, "m", None, 120, 0) == [(f"aiaas:tokens:key:{plain.key_id}", QuotaSpec(2.0, 120))]
    assert token_buckets_for(caller(rps=5), "m", None, 0, 0) == []  # a request quota is no token quota


def test_local_token_bucket_admits_until_used_up_then_refills() -> None:
    buckets = LocalTokenBuckets()
    spec = [("k", QuotaSpec(rps=1.0, burst=60))]  # 60 tokens a minute
    assert buckets.wait_ms(spec, now=0.0) == 0
    buckets.charge(spec, 50, now=0.0)
    assert buckets.wait_ms(spec, now=0.0) == 0  # 10 left
    buckets.charge(spec, 30, now=0.0)  # a long answer: 20 below zero
    assert buckets.wait_ms(spec, now=0.0) == 21_000
    assert buckets.wait_ms(spec, now=21.0) == 0


async def test_token_quota_is_shared_through_redis_and_charged_by_usage(redis_server: RedisServer) -> None:
    one, two = client(redis_server.url), client(redis_server.url)
    try:
        first, second = QuotaEnforcer(redis=one), QuotaEnforcer(redis=two)
        c = token_caller(120)  # 2 tokens a second
        buckets = first.token_buckets(c, "m", None)
        await first.check_tokens(buckets)
        await first.charge_tokens(buckets, 100)
        await second.check_tokens(buckets)  # 20 left
        await second.charge_tokens(buckets, 30)  # 10 below zero
        with pytest.raises(ResourceExhausted, match="token quota exceeded") as info:
            await first.check_tokens(buckets)
        assert 5000 < int(info.value.metadata["retry-after-ms"]) <= 5500
        assert first.store_failures == second.store_failures == 0
    finally:
        await one.aclose()
        await two.aclose()


async def test_token_quota_falls_back_to_local_buckets_while_redis_is_away() -> None:
    redis = client(f"redis://127.0.0.1:{free_port()}/0")
    try:
        quotas = QuotaEnforcer(redis=redis, failure_mode="local", replicas=2, retry_after_s=5.0)
        buckets = quotas.token_buckets(token_caller(120), "m", None)  # 60 a minute for this replica
        await quotas.check_tokens(buckets)
        await quotas.charge_tokens(buckets, 61)
        with pytest.raises(ResourceExhausted, match="token quota exceeded"):
            await quotas.check_tokens(buckets)
        assert quotas.store_failures == 3
    finally:
        await redis.aclose()
