"""TelemetryReporter against a real grpc.aio Monitor endpoint: batching, bounds, monitor down."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from aiaas.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.common.reporting import RequestRecord, TelemetryReporter
from tests.support.servers import free_port


class _Collector(monitor_pb2_grpc.MonitorServicer):
    def __init__(self, delay_s: float = 0.0) -> None:
        self.requests: list[monitor_pb2.ReportRequest] = []
        self.delay_s = delay_s

    async def Report(self, request: monitor_pb2.ReportRequest, context: grpc.aio.ServicerContext
                     ) -> monitor_pb2.ReportResponse:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.requests.append(request)
        return monitor_pb2.ReportResponse(accepted=len(request.records))

    @property
    def records(self) -> list[monitor_pb2.RequestRecord]:
        return [r for req in self.requests for r in req.records]


async def _serve(collector: _Collector, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    monitor_pb2_grpc.add_MonitorServicer_to_server(collector, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


def _rec(i: int, status: str = "OK") -> RequestRecord:
    return RequestRecord(source="gateway", model="m", version=1, alias="production", status=status,
                         latency_us=1000 + i, queue_us=10, compute_us=900, batch_size=4, key_id="k1")


async def test_records_arrive_in_batches_with_every_field() -> None:
    collector = _Collector()
    server, port = await _serve(collector)
    reporter = TelemetryReporter(f"127.0.0.1:{port}", source="gateway", flush_interval_s=0.05, max_batch=300)
    await reporter.start()
    try:
        for i in range(1000):
            reporter.record(_rec(i))
        deadline = time.monotonic() + 10
        while reporter.sent < 1000 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        await reporter.close()
        await server.stop(None)
    assert reporter.sent == 1000 and reporter.dropped == 0
    records = collector.records
    assert len(records) == 1000
    assert max(len(r.records) for r in collector.requests) <= 300
    assert sorted(r.latency_us for r in records) == list(range(1000, 2000))
    first = records[0]
    assert (first.source, first.model, first.version, first.alias, first.status) == (
        "gateway", "m", 1, "production", "OK")
    assert (first.queue_us, first.compute_us, first.batch_size, first.key_id) == (10, 900, 4, "k1")
    assert first.time_ns > 0


async def test_monitor_down_drops_and_counts_without_blocking() -> None:
    port = free_port()  # nothing listens here
    reporter = TelemetryReporter(f"127.0.0.1:{port}", source="inference", flush_interval_s=0.02,
                                 max_buffer=500, timeout_s=0.2)
    await reporter.start()
    try:
        started = time.perf_counter()
        for i in range(5000):
            reporter.record(_rec(i))
        elapsed = time.perf_counter() - started
        assert elapsed < 0.5, f"record() took {elapsed:.3f}s for 5000 records"
        assert len(reporter._records) <= 500
        await asyncio.sleep(0.5)
    finally:
        await reporter.close()
    assert reporter.sent == 0
    assert reporter.dropped == 5000


async def test_slow_monitor_never_grows_the_buffer_past_its_bound() -> None:
    collector = _Collector(delay_s=5.0)
    server, port = await _serve(collector)
    reporter = TelemetryReporter(f"127.0.0.1:{port}", source="gateway", flush_interval_s=0.01,
                                 max_buffer=100, timeout_s=0.1)
    await reporter.start()
    try:
        for i in range(2000):
            reporter.record(_rec(i))
            if i % 100 == 0:
                await asyncio.sleep(0.001)
            assert len(reporter._records) <= 100
        await asyncio.sleep(0.3)
    finally:
        await reporter.close()
        await server.stop(None)
    assert reporter.sent + reporter.dropped == 2000
    assert reporter.dropped > 0


async def test_recovers_when_the_monitor_comes_back() -> None:
    port = free_port()
    reporter = TelemetryReporter(f"127.0.0.1:{port}", source="gateway", flush_interval_s=0.02, timeout_s=0.2)
    await reporter.start()
    collector = _Collector()
    server = None
    try:
        for i in range(50):
            reporter.record(_rec(i))
        await asyncio.sleep(0.3)
        assert reporter.dropped == 50
        server, _ = await _serve(collector, port)
        deadline = time.monotonic() + 15
        while reporter.sent < 10 and time.monotonic() < deadline:
            reporter.record(_rec(1))
            await asyncio.sleep(0.05)
    finally:
        await reporter.close()
        if server is not None:
            await server.stop(None)
    assert reporter.sent >= 10
    assert any(req.dropped >= 50 for req in collector.requests)


async def test_no_target_counts_drops_and_start_is_a_no_op() -> None:
    reporter = TelemetryReporter(None, source="gateway")
    await reporter.start()
    reporter.record(_rec(0))
    reporter.sample_inputs("m", 1, {"x": np.zeros((2, 3), np.float32)})
    reporter.report_shadow_diff("m", 1, 2, 0.5, True)
    await reporter.close()
    assert reporter.dropped == 1 and reporter.sent == 0


async def test_input_samples_and_shadow_diffs_are_bounded_and_sent() -> None:
    collector = _Collector()
    server, port = await _serve(collector)
    reporter = TelemetryReporter(f"127.0.0.1:{port}", source="gateway", flush_interval_s=0.05,
                                 samples_per_second=5)
    await reporter.start()
    try:
        x = np.arange(100 * 80, dtype=np.float64).reshape(100, 80)
        for _ in range(50):
            reporter.sample_inputs("m", 3, {"x": x, "ids": np.arange(7, dtype=np.int64),
                                            "text": np.array([b"a"], dtype=object)})
        reporter.report_shadow_diff("m", 3, 4, 0.25, True)
        await reporter.flush()
    finally:
        await reporter.close()
        await server.stop(None)
    samples = [s for req in collector.requests for s in req.samples]
    by_input = {s.input for s in samples}
    assert by_input == {"x", "ids"}
    xs = [s for s in samples if s.input == "x"]
    assert 1 <= len(xs) <= 6  # the token bucket, not the 50 offers, decides
    first = xs[0]
    assert (first.rows, first.cols) == (32, 64)
    values = np.frombuffer(first.values_f32, dtype="<f4").reshape(32, 64)
    np.testing.assert_array_equal(values, x[:32, :64].astype(np.float32))
    ids = next(s for s in samples if s.input == "ids")
    assert (ids.rows, ids.cols) == (7, 1)
    diffs = [d for req in collector.requests for d in req.shadow_diffs]
    assert len(diffs) == 1 and diffs[0].mismatched and diffs[0].shadow_version == 4


@pytest.mark.parametrize("bad", [{"x": "not an array"}, {"x": np.zeros((0, 3))}])
async def test_sample_inputs_never_raises(bad: dict) -> None:
    reporter = TelemetryReporter("127.0.0.1:1", source="gateway")
    reporter.sample_inputs("m", 1, bad)
