"""End to end: real registry, inference, gateway, monitor and Redis processes, driven with tritonclient.

The fleet runs as production does inside: mTLS between every service, each with its own
certificate (SPIFFE identity) and identities required by the authorization policy; the gateway's
public door stays keyed by API keys (off here).

One stack for the module (start-up is the expensive part). Tests run in file order; the last one
kills the monitor mid-load.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as tca

from aiaas.gateway.v1 import gateway_pb2
from aiaas.monitor.v1 import monitor_pb2 as pb
from aiaas.monitor.v1 import monitor_pb2_grpc
from aiaas.registry.v1 import registry_pb2
from tests.inference.conftest import Registry, inference_args, start_registry, wait_model
from tests.inference.models import Artifact, TensorSpec, _jit_save, write_fails_on_negative
from tests.support.identity import Pki, make_pki
from tests.support.procs import ServiceProcess
from tests.support.servers import RedisServer, free_port


class _Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def write_double(directory: Path) -> Artifact:
    path = directory / "double.pt"
    _jit_save(_Double(), path)
    return Artifact(str(path), "torchscript", (TensorSpec("x", "FP32", (-1, -1)),),
                    (TensorSpec("y", "FP32", (-1, -1)),), lambda i: {"y": i["x"] * 2})


@dataclass
class Stack:
    registry: Registry
    inference: ServiceProcess
    gateway: ServiceProcess
    monitor: ServiceProcess
    monitor_args: list[str] = field(default_factory=list)
    pki: Pki | None = None

    def monitor_stub(self) -> monitor_pb2_grpc.MonitorStub:
        assert self.pki is not None
        return monitor_pb2_grpc.MonitorStub(self.pki.client("admin").aio_channel(f"localhost:{self.monitor.port}"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e")
    pki = make_pki(tmp / "pki")
    registry_proc = start_registry(tmp, env=pki.server_env("registry"))
    registry = Registry(registry_proc, pki.client("admin"))
    double, broken = write_double(tmp), write_fails_on_negative(tmp)
    for model in ("steady", "drifty", "fraud"):
        registry.register(model, double, max_batch_size=16, max_queue_delay_us=500, alias="production")
    registry.register("fraud", broken, max_batch_size=16, max_queue_delay_us=500, alias="canary")

    monitor_port = free_port()
    monitor_args = ["--registry-url", registry.address, "--redis-url", redis_server.url, "--metrics-port", "0",
                    "--evaluation-interval-s", "0.25", "--canary-min-requests", "30",
                    "--drift-min-samples", "150", "--grace-period-s", "1"]
    monitor = ServiceProcess("monitor", monitor_args, port=monitor_port, env=pki.server_env("monitor"))
    inference = ServiceProcess("inference", inference_args(registry, tmp / "cache", "--monitor-url", monitor.address,
                                                           follow="production,canary"),
                               env=pki.server_env("inference"))
    gateway = ServiceProcess("gateway", ["--registry-url", registry.address, "--inference-targets",
                                         inference.address, "--monitor-url", monitor.address,
                                         "--no-auth-enabled", "--grace-period-s", "2"], env=pki.client_env("gateway"))
    procs = [monitor, inference, gateway]
    try:
        for proc in procs:
            proc.start(wait=False)
        monitor.wait_ready()
        inference.wait_ready(timeout=120)
        for model in ("steady", "drifty", "fraud"):
            wait_model(inference, model)
        gateway.wait_ready(timeout=60)
        _wait_served_through(gateway.address, ("steady", "drifty", "fraud"))
        built = Stack(registry, inference, gateway, monitor, monitor_args, pki)
        yield built
        procs.append(built.monitor)  # a test may have replaced the monitor with a new process
    finally:
        for proc in reversed(procs):
            proc.stop()
        registry.close()
        registry_proc.stop()


def _wait_served_through(gateway: str, models: tuple[str, ...], timeout: float = 60.0) -> None:
    """The gateway started beside inference: wait until it reaches every model (ModelReady goes
    through to inference and counts no request), so no test sees its first connection attempts."""
    import tritonclient.grpc as grpcclient

    deadline = time.monotonic() + timeout
    client = grpcclient.InferenceServerClient(gateway)
    try:
        for model in models:
            while True:
                with contextlib.suppress(Exception):  # not reachable yet: poll until the deadline
                    if client.is_model_ready(model, client_timeout=5):
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{model} not ready through the gateway after {timeout}s")
                time.sleep(0.1)
    finally:
        client.close()


@dataclass
class Outcome:
    ok: int = 0
    failed: int = 0
    versions: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def drive(address: str, model: str, *, requests: int = 0, seconds: float = 0.0, rows: int = 1,
                shift: float = 0.0, concurrency: int = 4, seed: int = 0, timeout_s: float = 30.0) -> Outcome:
    """Send inference requests through the gateway with tritonclient; count what came back."""
    client = tca.InferenceServerClient(address)
    rng = np.random.default_rng(seed)
    out = Outcome()
    left = requests
    deadline = time.monotonic() + seconds if seconds else float("inf")

    async def worker() -> None:
        nonlocal left
        while (left > 0 if requests else time.monotonic() < deadline):
            left -= 1
            x = (rng.standard_normal((rows, 4)) + shift).astype(np.float32)
            tensor = tca.InferInput("x", [rows, 4], "FP32")
            tensor.set_data_from_numpy(x)
            started = time.perf_counter()
            try:
                result = await client.infer(model, [tensor], client_timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - counted, and kept for the assertion message
                out.failed += 1
                out.errors.append(str(exc)[:200])
                continue
            out.latencies_ms.append((time.perf_counter() - started) * 1000)
            out.ok += 1
            version = result.get_response().model_version
            out.versions[version] = out.versions.get(version, 0) + 1

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return out


async def poll(check: object, timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = await check()  # type: ignore[operator]
        if last and not isinstance(last, str):  # a string: not yet, and why (for the message)
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} not seen after {timeout}s (last: {last!r})")


async def test_query_metrics_counts_every_request_exactly(stack: Stack) -> None:
    outcome = await drive(stack.gateway.address, "steady", requests=120, rows=2)
    assert (outcome.ok, outcome.failed) == (120, 0), outcome.errors[:3]
    stub = stack.monitor_stub()

    async def both_sources() -> dict[str, pb.SeriesMetrics] | None:
        reply = await stub.QueryMetrics(pb.QueryMetricsRequest(model="steady"), timeout=5)
        by_source = {s.source: s for s in reply.series}
        counts = {k: s.count for k, s in by_source.items()}
        return by_source if counts == {"gateway": 120, "inference": 120} else None

    series = await poll(both_sources, 10, "120 gateway and 120 inference records")
    gateway, inference = series["gateway"], series["inference"]  # type: ignore[index]
    assert (gateway.version, gateway.alias, gateway.errors, dict(gateway.status_counts)) == (1, "production", 0,
                                                                                             {"OK": 120})
    # The server's view of latency can only be shorter than what the client waited.
    assert gateway.latency.p50_ms <= sorted(outcome.latencies_ms)[60] * 1.05
    assert inference.latency.p99_ms <= gateway.latency.max_ms * 1.05
    assert inference.compute.mean_ms > 0 and inference.mean_batch_size >= 1
    assert sum(b.count for b in inference.batch_sizes) == 120
    assert inference.load_ms >= 0 and inference.first_response_ms > 0


async def test_shifted_inputs_raise_a_drift_alert_and_unshifted_do_not(stack: Stack) -> None:
    stub = stack.monitor_stub()
    reference = np.random.default_rng(5).standard_normal((4000, 4))
    sample = pb.FeatureSample(features=[pb.FeatureValues(feature=f"x[{j}]", values=reference[:, j].tolist())
                                        for j in range(4)])
    await stub.SetBaseline(pb.SetBaselineRequest(model="drifty", version=1, sample=sample, actor="test"), timeout=10)
    record = stack.registry.stub.GetRecord(registry_pb2.GetRecordRequest(kind="baseline", name="drifty/1"), timeout=5)
    assert len(pb.Baseline.FromString(record.record.data).histograms) == 4
    alerts = stub.WatchAlerts(pb.WatchAlertsRequest(model="drifty"))

    calm = await drive(stack.gateway.address, "drifty", seconds=3, rows=16, seed=1)
    assert calm.failed == 0

    async def enough_samples() -> list[pb.FeatureDrift] | None:
        reply = await stub.GetDrift(pb.GetDriftRequest(model="drifty", version=1), timeout=5)
        return list(reply.features) if all(f.samples >= 150 for f in reply.features) else None

    calm_drift: list[pb.FeatureDrift] = await poll(enough_samples, 10, "150 sampled values per feature")  # type: ignore[assignment]
    assert all(f.psi < 0.1 and not f.drifted for f in calm_drift), calm_drift
    await asyncio.sleep(1.0)  # a few evaluations over the calm data
    listed = await stub.ListAlerts(pb.ListAlertsRequest(model="drifty"), timeout=5)
    assert not listed.alerts

    # Shifted traffic until the alert fires (a busy machine samples more slowly), at most 30 s.
    shifted_load = asyncio.create_task(drive(stack.gateway.address, "drifty", seconds=30, rows=16, shift=2.0,
                                             seed=2))
    try:
        fired = await asyncio.wait_for(alerts.read(), 40)
    finally:
        alerts.cancel()
        shifted_load.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await shifted_load
    assert fired.alert.kind == pb.ALERT_KIND_DRIFT and fired.alert.state == pb.ALERT_STATE_FIRING
    assert fired.alert.version == 1 and fired.alert.value > 0.2 and fired.alert.details["feature"].startswith("x[")


async def test_broken_canary_is_rolled_back_while_production_serves(stack: Stack) -> None:
    route = gateway_pb2.Route(model="fraud", splits=[gateway_pb2.RouteSplit(alias="production", weight=50),
                                                      gateway_pb2.RouteSplit(alias="canary", weight=50)])
    stack.registry.stub.PutRecord(registry_pb2.PutRecordRequest(
        record=registry_pb2.Record(kind="route", name="fraud", data=route.SerializeToString()),
        expected_revision=-1, actor="test"), timeout=5)
    stub = stack.monitor_stub()
    alerts = stub.WatchAlerts(pb.WatchAlertsRequest(model="fraud"))

    def canary_weight() -> int:
        reply = stack.registry.stub.GetRecord(registry_pb2.GetRecordRequest(kind="route", name="fraud"), timeout=5)
        splits = gateway_pb2.Route.FromString(reply.record.data).splits
        return next(s.weight for s in splits if s.alias == "canary")

    async def rolled_back() -> bool:
        return canary_weight() == 0

    load = asyncio.create_task(drive(stack.gateway.address, "fraud", seconds=30, rows=1, concurrency=4, seed=3))
    try:
        await poll(rolled_back, 25, "the canary's weight set to 0")
    finally:
        load.cancel()
    fired = await asyncio.wait_for(alerts.read(), 10)
    alerts.cancel()
    assert fired.alert.kind == pb.ALERT_KIND_CANARY_ROLLBACK and fired.alert.version == 2
    assert "error rate" in fired.alert.summary

    events = stack.registry.stub.ListAuditEvents(registry_pb2.ListAuditEventsRequest(model="fraud"), timeout=5)
    rollback = [e for e in events.events if e.action == "canary.rollback"]
    assert len(rollback) == 1 and rollback[0].actor == "monitor" and rollback[0].version == 2
    assert "error rate" in rollback[0].details["reason"]
    status = (await stub.GetCanaryStatus(pb.GetCanaryStatusRequest(model="fraud"), timeout=5)).status
    assert status.rolled_back and status.verdict == pb.CANARY_VERDICT_ERROR_REGRESSION

    # Production keeps serving: once the gateway has the new route, nothing fails.
    async def production_only() -> bool | str:
        probe = await drive(stack.gateway.address, "fraud", requests=8, rows=1, seed=5, timeout_s=10)
        if probe.failed == 0 and set(probe.versions) == {"1"}:
            return True
        return f"versions {probe.versions}, {probe.failed} failed: {probe.errors[:2]}"  # for the assertion message

    await poll(production_only, 120, "fraud served by production alone")
    after = await drive(stack.gateway.address, "fraud", requests=80, rows=1, seed=4, timeout_s=10)
    assert (after.ok, after.failed) == (80, 0), after.errors[:3]
    assert set(after.versions) == {"1"}


async def test_an_alias_move_reaches_the_gateway_over_mtls(stack: Stack, tmp_path: Path) -> None:
    """Registry -> inference -> gateway, every hop mTLS: a new version moved to production serves."""
    version = stack.registry.register("steady", write_double(tmp_path), max_batch_size=16, alias="production")

    async def serving_new() -> bool:
        out = await drive(stack.gateway.address, "steady", requests=8, rows=1, concurrency=2)
        return out.failed == 0 and set(out.versions) == {str(version)}

    await poll(serving_new, 60, f"steady:production served by version {version}")


async def test_killing_the_monitor_mid_load_fails_no_request(stack: Stack) -> None:
    stub = stack.monitor_stub()
    slo = pb.SLO(model="steady", p99_latency_ms=500, max_error_rate=0.01, window_seconds=30)
    await stub.SetSLO(pb.SetSLORequest(slo=slo, actor="test"), timeout=5)
    record = stack.registry.stub.GetRecord(registry_pb2.GetRecordRequest(kind="slo", name="steady"), timeout=5)
    assert pb.SLO.FromString(record.record.data) == slo
    load = asyncio.create_task(drive(stack.gateway.address, "steady", seconds=4, rows=1, concurrency=4, seed=6))
    await asyncio.sleep(1.0)
    stack.monitor.kill()
    outcome = await load
    assert outcome.failed == 0, outcome.errors[:3]
    assert outcome.ok > 20
    # A new monitor on the same port: reports flow again, and the Redis windows kept the past.
    stack.monitor = ServiceProcess("monitor", stack.monitor_args, port=stack.monitor.port,
                                   env=stack.pki.server_env("monitor") if stack.pki else None).start()
    more = await drive(stack.gateway.address, "steady", requests=40, rows=1, seed=7)
    assert more.failed == 0
    stub = stack.monitor_stub()

    async def counted() -> int | None:
        reply = await stub.QueryMetrics(pb.QueryMetricsRequest(model="steady", source="gateway", merge=True),
                                        timeout=5)
        n = reply.series[0].count
        return n if n >= 120 + 40 else None

    await poll(counted, 15, "records after the monitor came back")
    # What the registry holds survives the monitor: SLOs and baselines.
    slos = await stub.ListSLOs(pb.ListSLOsRequest(), timeout=5)
    assert [s.model for s in slos.slos] == ["steady"]
    baseline = await stub.GetBaseline(pb.GetBaselineRequest(model="drifty", version=1), timeout=5)
    assert len(baseline.baseline.histograms) == 4
