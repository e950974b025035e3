"""The monitor's cap on model names and series: a reporter cannot make it keep a series per name
it makes up. In process on a controlled clock (expiry, seeding from the windows), and against a
real monitor process fed by the real TelemetryReporter (what is kept, what is counted)."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from aiaas.monitor.v1 import monitor_pb2 as pb
from aiaas.monitor.v1 import monitor_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.reporting import UNKNOWN_MODEL, RequestRecord, TelemetryReporter
from services.monitor.entities import MetricsFilter, Report, Request
from services.monitor.metrics import BAD_NAME, OVER_MODEL_CAP, OVER_SERIES_CAP, RequestWindows
from services.monitor.prom import PrometheusExport
from services.monitor.settings import MonitorSettings
from services.monitor.windows import MemoryWindowStore
from tests.support.procs import ServiceProcess
from tests.support.servers import free_port

T0 = 1_800_000_000 * 10**9
RETENTION_S = 600.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1e9)


def windows(clock: Clock, store: MemoryWindowStore | None = None, registry: CollectorRegistry | None = None, *,
            max_models: int = 1000, max_series_per_model: int = 256) -> RequestWindows:
    settings = MonitorSettings(registry_url=None, retention_s=RETENTION_S, max_models=max_models,
                               max_series_per_model=max_series_per_model)
    return RequestWindows(settings, store or MemoryWindowStore(retention_s=RETENTION_S),
                          PrometheusExport(registry or CollectorRegistry()), clock)


def report(clock: Clock, *names: str, version: int = 1, alias: str = "production") -> Report:
    return Report(source="gateway", requests=[
        Request(source="gateway", model=name, version=version, alias=alias, status="OK", latency_us=1000,
                time_ns=clock.now) for name in names])


async def models_kept(w: RequestWindows) -> set[str]:
    return {m.key.model for m in await w.query(MetricsFilter(window_s=RETENTION_S))}


async def test_new_names_past_the_cap_are_refused_and_counted() -> None:
    clock = Clock()
    registry = CollectorRegistry()
    w = windows(clock, registry=registry, max_models=3, max_series_per_model=2)
    await w.ingest(report(clock, *(f"junk-{i}" for i in range(10))), clock.now)
    await w.ingest(report(clock, "junk-0", "junk-1", UNKNOWN_MODEL), clock.now)
    assert await models_kept(w) == {"junk-0", "junk-1", "junk-2", UNKNOWN_MODEL}
    # Known names keep counting; the 7 new ones were refused.
    counts = {m.key.model: m.count for m in await w.query(MetricsFilter(window_s=RETENTION_S))}
    assert counts == {"junk-0": 2, "junk-1": 2, "junk-2": 1, UNKNOWN_MODEL: 1}
    assert w.cap.refused == {OVER_MODEL_CAP: 7}
    # Versions and aliases of one name are capped too.
    for version in (1, 2, 3, 4):
        await w.ingest(report(clock, "junk-0", version=version, alias="a"), clock.now)
    assert {(m.key.version, m.key.alias) for m in await w.query(MetricsFilter(model="junk-0", window_s=RETENTION_S))
            } == {(1, "production"), (1, "a")}
    assert w.cap.refused[OVER_SERIES_CAP] == 3
    scraped = generate_latest(registry).decode()
    assert 'aiaas_monitor_records_refused_total{reason="model_cap"} 7.0' in scraped
    assert 'aiaas_monitor_records_refused_total{reason="series_cap"} 3.0' in scraped


async def test_a_name_that_would_break_series_keys_is_refused() -> None:
    clock = Clock()
    w = windows(clock)
    await w.ingest(report(clock, "a|7", "ok"), clock.now)
    await w.ingest(Report(source="gate|way", requests=[Request(source="", model="ok", version=1, alias="",
                                                               status="OK", latency_us=5, time_ns=clock.now)]),
                   clock.now)
    # Before, "gateway|a|7|1|production" decoded as version "7|1" and every query failed.
    assert await models_kept(w) == {"ok"}
    assert w.cap.refused == {BAD_NAME: 2}


async def test_names_quiet_for_the_retention_free_their_place() -> None:
    clock = Clock()
    w = windows(clock, max_models=2)
    await w.ingest(report(clock, "old-a", "old-b"), clock.now)
    await w.ingest(report(clock, "new"), clock.now)
    assert w.cap.refused == {OVER_MODEL_CAP: 1}
    clock.advance(RETENTION_S / 2)
    await w.ingest(report(clock, "old-a"), clock.now)
    clock.advance(RETENTION_S / 2 + 2)
    await w.ingest(report(clock, "new"), clock.now)  # old-b had nothing for the retention
    assert w.cap.refused == {OVER_MODEL_CAP: 1}
    assert await models_kept(w) == {"old-a", "new"}
    await w.ingest(report(clock, "another"), clock.now)  # old-a still counts
    assert w.cap.refused == {OVER_MODEL_CAP: 2}


async def test_the_cap_counts_series_already_in_the_windows() -> None:
    """A restarted replica (or one sharing Redis) starts from what the windows hold, not from zero."""
    clock = Clock()
    store = MemoryWindowStore(retention_s=RETENTION_S)
    await windows(clock, store, max_models=2).ingest(report(clock, "a", "b"), clock.now)
    fresh = windows(clock, store, max_models=2)
    await fresh.ingest(report(clock, "c", "a"), clock.now)
    assert fresh.cap.refused == {OVER_MODEL_CAP: 1} and fresh.cap.models == 2


def test_caps_must_be_positive() -> None:
    with pytest.raises(InvalidArgument, match="max_models"):
        MonitorSettings(registry_url=None, max_models=0).validate()
    with pytest.raises(InvalidArgument, match="max_series_per_model"):
        MonitorSettings(registry_url=None, max_series_per_model=0).validate()


@pytest.fixture(scope="module")
def monitor() -> Iterator[tuple[ServiceProcess, int]]:
    metrics_port = free_port()
    proc = ServiceProcess("monitor", ["--registry-url", "", "--metrics-port", str(metrics_port),
                                      "--max-models", "20", "--max-series-per-model", "4"]).start()
    try:
        yield proc, metrics_port
    finally:
        proc.stop()


async def test_a_real_monitor_keeps_at_most_max_models_names(monitor: tuple[ServiceProcess, int]) -> None:
    """The attack of issue 13: 300 made-up names each became a series kept for an hour."""
    proc, metrics_port = monitor
    reporter = TelemetryReporter(proc.address, source="gateway", max_buffer=10_000)
    await reporter.start()
    try:
        for i in range(300):
            reporter.record(RequestRecord("gateway", f"junk-{i}", 0, "", "PERMISSION_DENIED", 100))
        reporter.record(RequestRecord("gateway", UNKNOWN_MODEL, 0, "", "PERMISSION_DENIED", 100))
        reporter.record(RequestRecord("gateway", "x|1", 0, "", "OK", 100))
        await reporter.flush()
        assert reporter.sent == 302 and reporter.dropped == 0
    finally:
        await reporter.close()
    async with grpc.aio.insecure_channel(proc.address) as channel:
        reply = await monitor_pb2_grpc.MonitorStub(channel).QueryMetrics(pb.QueryMetricsRequest(window_seconds=600),
                                                                         timeout=10)
    names = {s.model for s in reply.series}
    assert len(names - {UNKNOWN_MODEL}) == 20 and UNKNOWN_MODEL in names
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
    refused = dict(re.findall(r'aiaas_monitor_records_refused_total\{reason="(\w+)"\} ([\d.]+)', text))
    assert refused == {"model_cap": "280.0", "bad_name": "1.0"}
    assert len(set(re.findall(r'aiaas_model_requests_total\{[^}]*model="([^"]+)"', text))) == 21
