"""Real monitor processes sharing a real Redis, fed by the real TelemetryReporter over gRPC."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from aiaas.cli.monitor_cmds import TOP_COLUMNS, top_rows
from aiaas.monitor.v1 import monitor_pb2 as pb
from aiaas.monitor.v1 import monitor_pb2_grpc
from aiaas.monitor_client import series_to_dict
from services.common.reporting import GenerationStats, RequestRecord, TelemetryReporter
from services.monitor.windows import GAMMA
from tests.support.procs import ServiceProcess
from tests.support.servers import RedisServer, free_port

TOLERANCE = GAMMA**0.5 - 1 + 1e-6
FAST_EVAL = ["--registry-url", "", "--evaluation-interval-s", "0.2", "--slo-min-requests", "5"]


@pytest.fixture(scope="module")
def monitors(redis_server: RedisServer) -> Iterator[tuple[ServiceProcess, ServiceProcess, int]]:
    metrics_port = free_port()
    redis = ["--redis-url", redis_server.url]
    a = ServiceProcess("monitor", [*FAST_EVAL, *redis, "--metrics-port", str(metrics_port)])
    b = ServiceProcess("monitor", [*FAST_EVAL, *redis, "--metrics-port", "0"])
    a.start(wait=False)
    b.start(wait=False)
    try:
        a.wait_ready()
        b.wait_ready()
        yield a, b, metrics_port
    finally:
        a.stop()
        b.stop()


def _stub(proc: ServiceProcess) -> monitor_pb2_grpc.MonitorStub:
    return monitor_pb2_grpc.MonitorStub(grpc.aio.insecure_channel(proc.address))


async def _send(reporter: TelemetryReporter, records: list[RequestRecord]) -> None:
    for rec in records:
        reporter.record(rec)
    await reporter.flush()


async def test_figures_match_a_known_load_across_replicas(monitors: tuple[ServiceProcess, ServiceProcess, int]
                                                          ) -> None:
    a, b, metrics_port = monitors
    rng = np.random.default_rng(11)
    prod = (rng.lognormal(np.log(4000), 0.5, 3000) + 1).astype(int)
    canary = (rng.lognormal(np.log(9000), 0.3, 400) + 1).astype(int)
    records = [RequestRecord("gateway", "load", 1, "production", "OK", int(v), queue_us=300, compute_us=int(v) // 2,
                             batch_size=4, key_id="k") for v in prod]
    records += [RequestRecord("gateway", "load", 2, "canary", "INTERNAL" if i % 10 == 0 else "OK", int(v))
                for i, v in enumerate(canary)]
    records += [RequestRecord("gateway", "load", 1, "production", "INVALID_ARGUMENT", 50)] * 7
    # Half the load through each replica: they share the windows in Redis.
    ra = TelemetryReporter(a.address, source="gateway", max_buffer=100_000)
    rb = TelemetryReporter(b.address, source="gateway", max_buffer=100_000)
    await ra.start()
    await rb.start()
    try:
        await _send(ra, records[::2])
        await _send(rb, records[1::2])
        assert ra.dropped == rb.dropped == 0 and ra.sent + rb.sent == len(records)
    finally:
        await ra.close()
        await rb.close()

    for proc in (a, b):
        reply = await _stub(proc).QueryMetrics(pb.QueryMetricsRequest(model="load"), timeout=5)
        by_alias = {s.alias: s for s in reply.series}
        assert set(by_alias) == {"production", "canary"}
        p, c = by_alias["production"], by_alias["canary"]
        assert (p.count, p.errors, dict(p.status_counts)) == (3007, 0, {"OK": 3000, "INVALID_ARGUMENT": 7})
        assert (c.version, c.count, c.errors) == (2, 400, 40)
        assert c.error_rate == pytest.approx(0.1)
        for q, got in ((50, c.latency.p50_ms), (90, c.latency.p90_ms), (99, c.latency.p99_ms)):
            exact = np.percentile(canary, q, method="inverted_cdf") / 1000
            assert abs(got - exact) / exact <= TOLERANCE, (q, got, exact)
        everything = np.concatenate([prod, np.full(7, 50)])
        exact = np.percentile(everything, 99, method="inverted_cdf") / 1000
        assert abs(p.latency.p99_ms - exact) / exact <= TOLERANCE
        assert p.queue.p50_ms == pytest.approx(0.3, rel=TOLERANCE)
        assert [(x.batch_size, x.count) for x in p.batch_sizes] == [(4, 3000)]
    merged = (await _stub(b).QueryMetrics(pb.QueryMetricsRequest(model="load", merge=True), timeout=5)).series
    assert len(merged) == 1 and merged[0].count == 3407

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
    assert 'aiaas_model_requests_total{alias="canary",model="load",source="gateway",status="INTERNAL",version="2"}' \
        in text
    assert "aiaas_model_request_latency_seconds_bucket" in text


async def test_generation_figures_reach_queries_and_prometheus(monitors: tuple[ServiceProcess, ServiceProcess, int]
                                                             ) -> None:
    """Token counts, TTFT and inter-token latency of generative requests, as the inference service reports them."""
    a, _, metrics_port = monitors
    rng = np.random.default_rng(5)
    ttft = (rng.lognormal(np.log(60_000), 0.4, 300) + 1).astype(int)
    records = [RequestRecord("inference", "gen-lm", 3, "", "OK", 900_000, generation=GenerationStats(
        prompt_tokens=20, completion_tokens=64, ttft_us=int(v), itl_mean_us=15_000, itl_max_us=40_000,
        generation_us=945_000, preemptions=1 if i < 3 else 0, kv_cache_usage=0.5, finish_reason="length"))
        for i, v in enumerate(ttft)]
    reporter = TelemetryReporter(a.address, source="inference", max_buffer=10_000)
    await reporter.start()
    try:
        await _send(reporter, records)
    finally:
        await reporter.close()
    (series,) = (await _stub(a).QueryMetrics(pb.QueryMetricsRequest(model="gen-lm"), timeout=5)).series
    g = series.generation
    assert (g.count, g.prompt_tokens, g.completion_tokens, g.preemptions) == (300, 6000, 19200, 3)
    assert dict(g.finish_reasons) == {"length": 300} and g.mean_kv_cache_usage == pytest.approx(0.5)
    exact = np.percentile(ttft, 99, method="inverted_cdf") / 1000
    assert abs(g.ttft.p99_ms - exact) / exact <= TOLERANCE
    assert g.inter_token.p50_ms == pytest.approx(15, rel=TOLERANCE) and g.output_tokens_per_second > 0
    (row,) = top_rows([series_to_dict(series)])  # `aiaas top` shows TTFT and tokens/s for it
    ttft_cell, tokens_cell = row[TOP_COLUMNS.index("ttft_ms")], row[TOP_COLUMNS.index("tok/s")]
    assert float(ttft_cell) == pytest.approx(g.ttft.p50_ms, abs=0.05)
    assert float(tokens_cell) == pytest.approx(g.output_tokens_per_second, abs=0.05)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
    labels = 'alias="",model="gen-lm",source="inference",version="3"'
    assert f"aiaas_model_completion_tokens_total{{{labels}}} 19200.0" in text
    assert f"aiaas_model_time_to_first_token_seconds_count{{{labels}}} 300.0" in text


async def test_slo_breach_and_recovery_stream_two_alerts(monitors: tuple[ServiceProcess, ServiceProcess, int]
                                                         ) -> None:
    a, _, _ = monitors
    stub = _stub(a)
    slo = pb.SLO(model="slo-model", p99_latency_ms=20, window_seconds=2, min_requests=5)
    await stub.SetSLO(pb.SetSLORequest(slo=slo, actor="test"), timeout=5)
    listed = await stub.ListSLOs(pb.ListSLOsRequest(model="slo-model"), timeout=5)
    assert listed.slos[0].p99_latency_ms == 20 and not listed.slos[0].HasField("max_error_rate")
    stream = stub.WatchAlerts(pb.WatchAlertsRequest(model="slo-model"))
    reporter = TelemetryReporter(a.address, source="gateway", flush_interval_s=0.05)
    await reporter.start()
    try:
        def rec(latency_us: int) -> RequestRecord:
            return RequestRecord("gateway", "slo-model", 1, "production", "OK", latency_us)

        await _send(reporter, [rec(100_000) for _ in range(50)])
        fired = await asyncio.wait_for(stream.read(), 10)
        assert fired.alert.state == pb.ALERT_STATE_FIRING and fired.alert.kind == pb.ALERT_KIND_SLO_LATENCY
        assert fired.alert.value == pytest.approx(100, rel=TOLERANCE) and fired.alert.threshold == 20
        active = await stub.ListAlerts(pb.ListAlertsRequest(model="slo-model", active_only=True), timeout=5)
        assert [x.id for x in active.alerts] == [fired.alert.id]

        async def keep_fast() -> None:
            while True:
                await _send(reporter, [rec(2_000) for _ in range(20)])
                await asyncio.sleep(0.2)

        feeder = asyncio.create_task(keep_fast())
        try:
            resolved = await asyncio.wait_for(stream.read(), 15)
        finally:
            feeder.cancel()
        assert resolved.alert.state == pb.ALERT_STATE_RESOLVED and resolved.alert.id == fired.alert.id
        assert resolved.alert.value < 20
    finally:
        stream.cancel()
        await reporter.close()


async def test_bad_requests_get_clear_statuses(monitors: tuple[ServiceProcess, ServiceProcess, int]) -> None:
    a, _, _ = monitors
    stub = _stub(a)
    cases = [
        (stub.SetSLO(pb.SetSLORequest(slo=pb.SLO(model="x")), timeout=5), grpc.StatusCode.INVALID_ARGUMENT, "needs"),
        (stub.QueryMetrics(pb.QueryMetricsRequest(window_seconds=10**7), timeout=5),
         grpc.StatusCode.INVALID_ARGUMENT, "window"),
        (stub.GetCanaryStatus(pb.GetCanaryStatusRequest(model="none"), timeout=5), grpc.StatusCode.NOT_FOUND, "canary"),
        (stub.GetDrift(pb.GetDriftRequest(model="none", version=1), timeout=5), grpc.StatusCode.NOT_FOUND, "baseline"),
        (stub.DeleteSLO(pb.DeleteSLORequest(model="none"), timeout=5), grpc.StatusCode.NOT_FOUND, "SLO"),
        (stub.SetBaseline(pb.SetBaselineRequest(model="m", version=1), timeout=5),
         grpc.StatusCode.INVALID_ARGUMENT, "learn_from_requests"),
    ]
    for call, code, words in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == code and words in info.value.details()


def test_cli_top_slo_and_alerts(monitors: tuple[ServiceProcess, ServiceProcess, int],
                                capsys: pytest.CaptureFixture[str]) -> None:
    from aiaas.cli.main import main

    a, b, _ = monitors
    assert main(["top", "--url", b.address, "--model", "load", "--once"]) == 0
    out = capsys.readouterr().out
    header, *rows = out.strip().splitlines()[1:]
    assert header.split()[:4] == ["MODEL", "VERSION", "ALIAS", "SOURCE"]
    assert any(r.split()[:3] == ["load", "2", "canary"] and r.split()[-1] == "400" for r in rows)
    assert main(["top", "--url", b.address, "--model", "load", "--json"]) == 0
    series = json.loads(capsys.readouterr().out)
    assert {s["alias"]: s["count"] for s in series} == {"production": 3007, "canary": 400}
    assert main(["slo", "set", "cli-model", "--url", a.address, "--p99-ms", "75", "--window", "30"]) == 0
    capsys.readouterr()
    assert main(["slo", "list", "--url", a.address, "--json"]) == 0
    slos = {s["model"]: s for s in json.loads(capsys.readouterr().out)}
    assert slos["cli-model"]["p99_latency_ms"] == 75 and slos["cli-model"]["window_seconds"] == 30
    assert main(["slo", "set", "cli-model", "--url", a.address]) == 2
    assert main(["slo", "delete", "nothing", "--url", a.address]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["alerts", "--url", a.address, "--json"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)
