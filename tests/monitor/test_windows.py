"""Sliding windows: exact counts and percentiles within a bin's tolerance, memory and Redis alike."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator

import numpy as np
import pytest

from services.common.errors import Unavailable
from services.monitor.entities import Request, SeriesKey
from services.monitor.windows import (
    GAMMA,
    NS_REQUESTS,
    Increments,
    MemoryWindowStore,
    RedisWindowStore,
    add_request,
    bin_value_us,
    latency_bin,
    summarize,
)
from tests.support.servers import RedisServer

TOLERANCE = GAMMA**0.5 - 1 + 1e-9


def test_latency_bins_bracket_their_values() -> None:
    for us in [1, 2, 3, 10, 999, 1000, 1001, 123_456, 10**9]:
        index = latency_bin(us)
        assert GAMMA ** (index - 1) <= us * (1 + 1e-12) and us < GAMMA**index * (1 + 1e-12)
        assert abs(bin_value_us(index) - us) / us <= TOLERANCE
    assert latency_bin(0) == 0 and bin_value_us(0) == 0.0


def _requests(latencies_us: np.ndarray, now_ns: int, **kw: object) -> list[Request]:
    base = {"source": "gateway", "model": "m", "version": 1, "alias": "production", "status": "OK"}
    base.update(kw)
    return [Request(latency_us=int(v), time_ns=now_ns, **base) for v in latencies_us]  # type: ignore[arg-type]


def test_summary_matches_numpy_within_tolerance() -> None:
    rng = np.random.default_rng(7)
    latencies = rng.lognormal(mean=np.log(5000), sigma=0.6, size=5000).astype(np.int64) + 1
    increments: Increments = {}
    now = time.time_ns()
    for req in _requests(latencies, now, queue_us=100, compute_us=400, batch_size=8):
        add_request(increments, req, 1.0)
    for req in _requests(np.full(50, 2000), now, status="INTERNAL"):
        add_request(increments, req, 1.0)
    for req in _requests(np.full(25, 100), now, status="INVALID_ARGUMENT"):
        add_request(increments, req, 1.0)
    (fields,) = increments.values()
    m = summarize(SeriesKey("m", 1, "production", "gateway"), fields, 60.0, 10.0)
    everything = np.concatenate([latencies, np.full(50, 2000), np.full(25, 100)])
    assert m.count == 5075 and m.errors == 50
    assert m.status_counts == {"OK": 5000, "INTERNAL": 50, "INVALID_ARGUMENT": 25}
    assert m.error_rate == pytest.approx(50 / 5075)
    assert m.rate_per_s == pytest.approx(507.5)
    for q, got in ((50, m.latency.p50_ms), (90, m.latency.p90_ms), (99, m.latency.p99_ms)):
        exact = np.percentile(everything, q, method="inverted_cdf") / 1000
        assert abs(got - exact) / exact <= TOLERANCE, (q, got, exact)
    assert m.latency.mean_ms == pytest.approx(everything.mean() / 1000)
    assert m.queue.p50_ms == pytest.approx(0.1, rel=TOLERANCE)
    assert m.compute.mean_ms == pytest.approx(0.4)
    assert m.batch_sizes == {8: 5000} and m.mean_batch_size == 8


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[object]:
    if request.param == "memory":
        yield MemoryWindowStore(bucket_s=1.0, retention_s=600)
        return
    redis_server = request.getfixturevalue("redis_server")
    prefix = f"test:{time.time_ns()}"
    s = RedisWindowStore(redis_server.url, bucket_s=1.0, retention_s=600, prefix=prefix)
    yield s
    await s.close()


async def test_store_sums_buckets_inside_the_window_only(store: MemoryWindowStore) -> None:
    a, b = "gateway|m|1|production", "inference|m|1|"
    inc: Increments = {(a, 100): Counter(n=3, ls=30), (a, 101): Counter(n=2), (a, 90): Counter(n=50),
                       (b, 101): Counter(n=7)}
    await store.add(NS_REQUESTS, inc)
    await store.add(NS_REQUESTS, {(a, 101): Counter(n=1)})  # a second replica adds to the same bucket
    assert await store.series(NS_REQUESTS, 95) == [a, b]
    assert await store.series(NS_REQUESTS, 102) == []
    got = await store.read(NS_REQUESTS, [a, b, "gateway|none|1|"], 95, 105)
    assert got[a][0]["n"] == 6 and got[a][0]["ls"] == 30 and got[a][1] == 100
    assert got[b][0]["n"] == 7 and got[b][1] == 101
    assert got["gateway|none|1|"] == (Counter(), -1)


async def test_store_meta_set_if_absent(store: MemoryWindowStore) -> None:
    await store.put_meta("load:m|1", {"loaded_ns": 10, "load_us": 5})
    await store.put_meta("load:m|1", {"first_ns": 20}, only_if_absent=True)
    await store.put_meta("load:m|1", {"first_ns": 30}, only_if_absent=True)
    assert (await store.get_meta(["load:m|1"]))["load:m|1"] == {"loaded_ns": 10, "load_us": 5, "first_ns": 20}
    await store.delete_meta_field("load:m|1", "first_ns")
    assert "first_ns" not in (await store.get_meta(["load:m|1"]))["load:m|1"]


async def test_redis_down_is_unavailable_not_internal() -> None:
    from tests.support.servers import free_port

    store = RedisWindowStore(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(Unavailable, match="Redis"):
        await store.add(NS_REQUESTS, {("gateway|m|1|", 1): Counter(n=1)})
    with pytest.raises(Unavailable):
        await store.series(NS_REQUESTS, 0)
    await store.close()


async def test_a_redis_outage_is_one_warning_line_and_one_when_it_answers(caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer().start()
    store = RedisWindowStore(server.url)
    caplog.set_level(logging.INFO, logger="aiaas.monitor.windows")
    try:
        await store.add(NS_REQUESTS, {("gateway|m|1|", 1): Counter(n=1)})
        server.stop()
        for _ in range(20):  # an evaluation loop and the Report RPCs keep calling
            with pytest.raises(Unavailable, match="window store"):
                await store.series(NS_REQUESTS, 0)
        assert store.outage.down and store.outage.failures == 20
        server.start()  # the same port, empty (no persistence)
        deadline = time.monotonic() + 20
        while True:
            try:
                await store.add(NS_REQUESTS, {("gateway|m|2|", 1): Counter(n=1)})
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        assert await store.series(NS_REQUESTS, 0) == ["gateway|m|2|"]
    finally:
        await store.close()
        server.close()
    lines = [r for r in caplog.records if r.name == "aiaas.monitor.windows"]
    assert [(r.levelno, r.exc_info) for r in lines] == [(logging.WARNING, None), (logging.INFO, None)]
    assert lines[0].getMessage().startswith(f"window store (Redis) at 127.0.0.1:{server.port} unreachable: ")
    assert "\n" not in lines[0].getMessage() and "answers again" in lines[1].getMessage()


def test_generation_figures_match_numpy_within_tolerance() -> None:
    """TTFT and inter-token percentiles, token sums and rates, KV use, preemptions, finish reasons."""
    from services.monitor.entities import Generation

    rng = np.random.default_rng(3)
    ttft = (rng.lognormal(np.log(80_000), 0.5, 2000) + 1).astype(np.int64)
    itl = (rng.lognormal(np.log(25_000), 0.3, 2000) + 1).astype(np.int64)
    completion = rng.integers(2, 65, 2000)
    prompt = rng.integers(1, 129, 2000)
    usage = rng.uniform(0, 1, 2000)
    now = time.time_ns()
    increments: Increments = {}
    for i in range(2000):
        gen = Generation(prompt_tokens=int(prompt[i]), completion_tokens=int(completion[i]), ttft_us=int(ttft[i]),
                         itl_mean_us=int(itl[i]), preemptions=i % 7 == 0, kv_cache_usage=float(usage[i]),
                         finish_reason="length" if i % 4 else "stop")
        add_request(increments, Request("inference", "lm", 1, "", "OK", latency_us=500_000, time_ns=now,
                                        generation=gen), 1.0)
    # A request that produced no token counts as a request, but not in TTFT or inter-token figures.
    add_request(increments, Request("inference", "lm", 1, "", "UNAVAILABLE", 10, time_ns=now,
                                    generation=Generation(prompt_tokens=5, completion_tokens=0,
                                                          finish_reason="timeout")), 1.0)
    add_request(increments, Request("inference", "lm", 1, "", "OK", 10, time_ns=now), 1.0)  # a tensor request
    (fields,) = increments.values()
    m = summarize(SeriesKey("lm", 1, "", "inference"), fields, 60.0, 20.0)
    g = m.generation
    assert g is not None and m.count == 2002 and g.count == 2001
    for q, got in ((50, g.ttft.p50_ms), (99, g.ttft.p99_ms)):
        exact = np.percentile(ttft, q, method="inverted_cdf") / 1000
        assert abs(got - exact) / exact <= TOLERANCE, (q, got, exact)
    for q, got in ((50, g.inter_token.p50_ms), (99, g.inter_token.p99_ms)):
        exact = np.percentile(itl, q, method="inverted_cdf") / 1000
        assert abs(got - exact) / exact <= TOLERANCE, (q, got, exact)
    assert g.ttft.mean_ms == pytest.approx(ttft.mean() / 1000)
    assert (g.prompt_tokens, g.completion_tokens) == (int(prompt.sum()) + 5, int(completion.sum()))
    assert g.output_tokens_per_s == pytest.approx(completion.sum() / 20.0)
    assert g.mean_kv_cache_usage == pytest.approx(usage.sum() / 2001, abs=1e-3)
    assert g.preemptions == sum(1 for i in range(2000) if i % 7 == 0)
    assert g.finish_reasons == {"length": 1500, "stop": 500, "timeout": 1}
    tensor_only: Increments = {}
    add_request(tensor_only, Request("inference", "m", 1, "", "OK", 10, time_ns=now), 1.0)
    assert summarize(SeriesKey("m", 1, "", "inference"), next(iter(tensor_only.values())), 60, 1).generation is None
