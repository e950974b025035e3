"""The gateway's servicer and forwarding, in process, driven by `tritonclient.grpc.aio`: versions
and trailing metadata, auth codes, retries on another replica, ejection, deadlines, trace
context, streams, shadows. Upstream replicas are small echo servers (see upstream_double.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as tca
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from aiaas.api_keys import make_key
from aiaas.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.common.reporting import TelemetryReporter
from services.common.server import ServiceApp
from services.gateway.balancer import Balancer
from services.gateway.dataplane import DataPlane
from services.gateway.entities import QuotaSpec, Role, Route, RouteSplit, ShadowTarget
from services.gateway.keys import KeyRing
from services.gateway.quotas import QuotaEnforcer
from services.gateway.router import Catalog
from services.gateway.servicer import INFERENCE_SERVICE, InferenceProxy, add_inference_proxy
from services.gateway.settings import GatewaySettings
from services.gateway.upstream import InferenceUpstream
from tests.gateway.upstream_double import EchoReplica

PEPPER = b"pepper"


@dataclass
class Stack:
    address: str
    replicas: list[EchoReplica]
    plane: DataPlane
    upstream: InferenceUpstream
    catalog: Catalog
    ring: KeyRing
    token: str
    narrow_token: str

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {token or self.token}"}


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    aliases = {"production": "1", "canary": "2"}
    replicas = [await EchoReplica({"3": 0.5}, aliases=aliases).start(),
                await EchoReplica({"3": 0.5}, aliases=aliases).start()]
    catalog = Catalog()
    for version in (1, 2, 3):
        catalog.add_version("m", version)
    catalog.move_alias("m", "production", 1)
    catalog.move_alias("m", "canary", 2)
    catalog.add_version("other", 1)
    ring = KeyRing(PEPPER)
    entry, token = make_key(PEPPER, roles=frozenset({Role.INFER, Role.READ}))
    narrow, narrow_token = make_key(PEPPER, models=("other",), roles=frozenset({Role.INFER}))
    ring.put(entry)
    ring.put(narrow)
    balancer = Balancer(eject_after=2)
    upstream = InferenceUpstream([r.address for r in replicas], balancer, max_message_bytes=64 << 20)
    await upstream.start()
    plane = DataPlane(catalog=catalog, ring=ring, quotas=QuotaEnforcer(), upstream=upstream, default_timeout_s=5.0)
    app = ServiceApp("gateway", GatewaySettings(host="127.0.0.1", port=0, require_identity=False, key_pepper="x"), configure_process=False)
    app.add_service(INFERENCE_SERVICE, add_inference_proxy, InferenceProxy(plane))
    port = await app.start()
    yield Stack(f"127.0.0.1:{port}", replicas, plane, upstream, catalog, ring, token, narrow_token)
    await app.server.stop(0)
    await upstream.close()
    for replica in replicas:
        await replica.stop()


def inputs(values: list[float]) -> list[tca.InferInput]:
    data = np.array([values], dtype=np.float32)
    tensor = tca.InferInput("x", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return [tensor]


async def test_infer_serves_the_routed_version_and_says_so(stack: Stack) -> None:
    async with tca.InferenceServerClient(stack.address) as client:
        result = await client.infer("m", inputs([1, 2]), headers=stack.headers(), request_id="r1")
        assert result.get_response().model_version == "1" and result.get_response().id == "r1"
        np.testing.assert_array_equal(result.as_numpy("y"), [[1, 2]])
        assert (await client.infer("m", inputs([1]), model_version="2",
                                   headers=stack.headers())).get_response().model_version == "2"
        assert (await client.infer("m:canary", inputs([1]), headers=stack.headers())).get_response().model_version == "2"
        header = {**stack.headers(), "x-model-alias": "canary"}
        assert (await client.infer("m", inputs([1]), headers=header)).get_response().model_version == "2"
        by_parameter = await client.infer("m", inputs([1]), headers=stack.headers(), parameters={"alias": "canary"})
        assert by_parameter.get_response().model_version == "2"


async def test_trailing_metadata_with_a_raw_channel(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.address) as channel:
        call = channel.unary_unary(f"/{INFERENCE_SERVICE}/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        request = pb.ModelInferRequest(model_name="m", raw_input_contents=[np.zeros(2, np.float32).tobytes()])
        request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
        pending = call(request, metadata=tuple(stack.headers().items()))
        await pending
        trailing = dict(await pending.trailing_metadata())
        assert trailing["model-version"] == "1" and trailing["model-alias"] == "production"


@pytest.mark.parametrize("headers, code, text", [
    ({}, "UNAUTHENTICATED", "missing API key"),
    ({"authorization": "Bearer aiaas_abcd1234_nope"}, "UNAUTHENTICATED", "invalid API key"),
    ({"authorization": "Token x"}, "UNAUTHENTICATED", "malformed"),
])
async def test_auth_failures(stack: Stack, headers: dict[str, str], code: str, text: str) -> None:
    async with tca.InferenceServerClient(stack.address) as client:
        with pytest.raises(InferenceServerException) as info:
            await client.infer("m", inputs([1]), headers=headers)
        assert info.value.status() == f"StatusCode.{code}" and text in info.value.message()


async def test_scope_failures_and_unknown_models(stack: Stack) -> None:
    async with tca.InferenceServerClient(stack.address) as client:
        with pytest.raises(InferenceServerException) as info:
            await client.infer("m", inputs([1]), headers=stack.headers(stack.narrow_token))
        assert info.value.status() == "StatusCode.PERMISSION_DENIED"
        with pytest.raises(InferenceServerException) as info:
            await client.is_model_ready("other", headers=stack.headers(stack.narrow_token))
        assert info.value.status() == "StatusCode.PERMISSION_DENIED" and "'read'" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            await client.infer("nope", inputs([1]), headers=stack.headers())
        assert info.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as info:
            await client.infer("m", inputs([1]), model_version="9", headers=stack.headers())
        assert info.value.status() == "StatusCode.NOT_FOUND"


async def test_a_dead_replica_costs_no_request_and_is_ejected(stack: Stack) -> None:
    await stack.replicas[0].stop()
    async with tca.InferenceServerClient(stack.address) as client:
        for _ in range(20):
            result = await client.infer("m", inputs([3]), headers=stack.headers())
            np.testing.assert_array_equal(result.as_numpy("y"), [[3]])
    dead = stack.upstream.balancer.replicas[0]
    assert dead.ejections >= 1
    assert len(stack.replicas[1].seen) == 20


async def test_unavailable_from_a_replica_is_retried_elsewhere(stack: Stack) -> None:
    stack.replicas[0].fail_with = grpc.StatusCode.UNAVAILABLE
    async with tca.InferenceServerClient(stack.address) as client:
        for _ in range(6):
            await client.infer("m", inputs([3]), headers=stack.headers())
    stack.replicas[0].fail_with = grpc.StatusCode.INVALID_ARGUMENT
    stack.replicas[1].fail_with = grpc.StatusCode.INVALID_ARGUMENT
    async with tca.InferenceServerClient(stack.address) as client:
        with pytest.raises(InferenceServerException) as info:
            await client.infer("m", inputs([3]), headers=stack.headers())
        # Not retried: the replica's own answer, passed on.
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and info.value.message() == "replica says no"


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
async def test_an_application_refusal_is_retried_elsewhere_and_never_ejects(
    stack: Stack, code: grpc.StatusCode
) -> None:
    busy, other = stack.replicas
    busy.fail_with, busy.fail_as_application = code, True  # "model loading", "queue full"
    async with tca.InferenceServerClient(stack.address) as client:
        for _ in range(6):
            await client.infer("m", inputs([3]), headers=stack.headers())
        other.fail_with, other.fail_as_application = code, True
        seen = len(busy.seen) + len(other.seen)
        with pytest.raises(InferenceServerException) as info:
            await client.infer("m", inputs([3]), headers=stack.headers())
        # Each replica asked once, then the answer passed through as it came.
        assert info.value.status() == f"StatusCode.{code.name}" and info.value.message() == "replica says no"
        assert len(busy.seen) + len(other.seen) == seen + 2
    assert all(r.ejections == 0 and r.reachable for r in stack.upstream.balancer.replicas)
    assert stack.upstream.reachable() and len(stack.upstream.balancer.healthy()) == 2


async def test_a_replica_without_the_model_yet_is_passed_over(stack: Stack) -> None:
    stack.replicas[0].fail_with = grpc.StatusCode.NOT_FOUND
    async with tca.InferenceServerClient(stack.address) as client:
        for _ in range(6):
            await client.infer("m", inputs([3]), headers=stack.headers())
        stack.replicas[1].fail_with = grpc.StatusCode.NOT_FOUND
        with pytest.raises(InferenceServerException) as info:
            await client.infer("m", inputs([3]), headers=stack.headers())
        assert info.value.status() == "StatusCode.NOT_FOUND"
    # NOT_FOUND is about one model, not the replica's health: nobody is ejected.
    assert all(r.ejections == 0 for r in stack.upstream.balancer.replicas)


async def test_deadline_request_id_and_trace_context_are_forwarded(stack: Stack) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with tca.InferenceServerClient(stack.address) as client:
        await client.infer("m", inputs([1]), headers={**stack.headers(), "traceparent": traceparent,
                                                      "x-request-id": "req-42"}, client_timeout=3.0)
    seen = [s for r in stack.replicas for s in r.seen][-1]
    assert seen.metadata["traceparent"] == traceparent and seen.metadata["x-request-id"] == "req-42"
    assert "authorization" not in seen.metadata
    # gRPC rounds deadlines on the wire: a few ms over the client timeout is normal.
    assert seen.time_remaining is not None and 1.0 < seen.time_remaining <= 3.05


async def test_the_callers_deadline_is_kept(stack: Stack) -> None:
    for replica in stack.replicas:
        replica.delay_s = 1.0
    async with tca.InferenceServerClient(stack.address) as client:
        with pytest.raises(InferenceServerException) as info:
            await client.infer("m", inputs([1]), headers=stack.headers(), client_timeout=0.2)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"


async def test_limits_are_checked_before_forwarding(stack: Stack) -> None:
    async with grpc.aio.insecure_channel(stack.address) as channel:
        call = channel.unary_unary(f"/{INFERENCE_SERVICE}/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        request = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\0" * 5])
        request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(request, metadata=tuple(stack.headers().items()))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "5 bytes of data" in info.value.details()
    assert not any(r.seen for r in stack.replicas)


async def test_quota_exhaustion_carries_retry_after(stack: Stack) -> None:
    stack.catalog.put_route(Route("m", quota=QuotaSpec(rps=1, burst=1)))
    async with grpc.aio.insecure_channel(stack.address) as channel:
        call = channel.unary_unary(f"/{INFERENCE_SERVICE}/ModelInfer",
                                   request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        request = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\0" * 4])
        request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
        await call(request, metadata=tuple(stack.headers().items()))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(request, metadata=tuple(stack.headers().items()))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        hint = dict(info.value.trailing_metadata() or ())["retry-after-ms"]
        assert 0 < int(hint) <= 1000 and f"retry after {hint} ms" in info.value.details()


async def test_stream_keeps_order_and_reports_errors_in_band(stack: Stack) -> None:
    async def requests() -> AsyncIterator[dict[str, object]]:
        for i in range(10):
            model = "nope" if i == 4 else "m"
            yield {"model_name": model, "inputs": inputs([float(i)]), "request_id": str(i)}

    async with tca.InferenceServerClient(stack.address) as client:
        answers = [item async for item in client.stream_infer(requests(), headers=stack.headers())]
    assert len(answers) == 10
    for i, (result, error) in enumerate(answers):
        if i == 4:
            assert result is None and "unknown model: 'nope'" in error.message()
        else:
            assert error is None and result.get_response().id == str(i)
            np.testing.assert_array_equal(result.as_numpy("y"), [[i]])


async def test_stream_without_a_key_is_refused(stack: Stack) -> None:
    async def requests() -> AsyncIterator[dict[str, object]]:
        yield {"model_name": "m", "inputs": inputs([1.0])}

    async with tca.InferenceServerClient(stack.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [item async for item in client.stream_infer(requests())]
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_shadows_never_change_the_answer_and_are_compared(stack: Stack) -> None:
    stack.catalog.put_route(Route("m", splits=(RouteSplit(alias="production", weight=1),),
                                  shadows=(ShadowTarget(version=3, sample_rate=1.0),
                                           ShadowTarget(alias="canary", sample_rate=1.0))))
    async with tca.InferenceServerClient(stack.address) as client:
        for i in range(10):
            result = await client.infer("m", inputs([float(i)]), headers=stack.headers())
            assert result.get_response().model_version == "1"
            np.testing.assert_array_equal(result.as_numpy("y"), [[i]])
    await stack.plane.shadows.drain()
    diverging = stack.plane.shadows.stats[("m", 1, 3)]
    agreeing = stack.plane.shadows.stats[("m", 1, 2)]
    assert (diverging.compared, diverging.mismatched, diverging.max_abs_diff) == (10, 10, 0.5)
    assert (agreeing.compared, agreeing.mismatched) == (10, 0)


async def test_model_ready_is_resolved_and_forwarded(stack: Stack) -> None:
    async with tca.InferenceServerClient(stack.address) as client:
        assert await client.is_model_ready("m", headers=stack.headers())
        assert await client.is_server_live()
        metadata = await client.get_server_metadata()
        assert metadata.name == "aiaas-gateway"
    assert [s.version for r in stack.replicas for s in r.seen] == ["1"]


async def test_concurrent_load_spreads_over_replicas(stack: Stack) -> None:
    async with tca.InferenceServerClient(stack.address) as client:
        await asyncio.gather(*(client.infer("m", inputs([1]), headers=stack.headers()) for _ in range(40)))
    counts = [len(r.seen) for r in stack.replicas]
    assert sum(counts) == 40 and min(counts) >= 10


async def test_a_dns_name_becomes_a_pool_of_addresses() -> None:
    replica = await EchoReplica(aliases={"production": "1"}).start()
    upstream = InferenceUpstream([f"dns:///localhost:{replica.port}"], Balancer(), max_message_bytes=1 << 20,
                                 dns_refresh_s=0.05)
    try:
        await upstream.start()
        addresses = {r.address for r in upstream.balancer.replicas}
        assert f"127.0.0.1:{replica.port}" in addresses
        request = pb.ModelInferRequest(model_name="m:production",
                                       raw_input_contents=[np.zeros(1, np.float32).tobytes()])
        request.inputs.add(name="x", datatype="FP32", shape=[1])
        # Some of the addresses (::1) may not listen: the call still lands on one that does.
        for _ in range(4):
            answer = pb.ModelInferResponse.FromString(
                await upstream.call("ModelInfer", request.SerializeToString(), timeout=5.0))
            assert answer.model_version == "1"
        await asyncio.sleep(0.2)
        assert {r.address for r in upstream.balancer.replicas} == addresses
    finally:
        await upstream.close()
        await replica.stop()


def test_bad_dns_targets_are_refused() -> None:
    from services.common.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="dns:///host:port"):
        InferenceUpstream(["dns:///nameonly"], Balancer(), max_message_bytes=1 << 20)


class _MonitorDouble(monitor_pb2_grpc.MonitorServicer):
    """Collects the ReportRequests a real TelemetryReporter sends."""

    def __init__(self) -> None:
        self.requests: list[monitor_pb2.ReportRequest] = []

    async def Report(self, request: monitor_pb2.ReportRequest, context: grpc.aio.ServicerContext
                     ) -> monitor_pb2.ReportResponse:
        self.requests.append(request)
        return monitor_pb2.ReportResponse(accepted=len(request.records))


def drift_inputs(rows: int) -> list[tca.InferInput]:
    x = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    ids = np.arange(rows, dtype=np.int64).reshape(rows, 1) + 100
    words = np.array([[b"a"]] * rows, dtype=np.object_)
    tensors = [tca.InferInput("x", [rows, 2], "FP32"), tca.InferInput("ids", [rows, 1], "INT64"),
               tca.InferInput("words", [rows, 1], "BYTES")]
    for tensor, data in zip(tensors, (x, ids, words), strict=True):
        tensor.set_data_from_numpy(data)
    return tensors


async def test_drift_samples_of_live_inputs_reach_the_monitor(stack: Stack) -> None:
    monitor = _MonitorDouble()
    server = grpc.aio.server()
    monitor_pb2_grpc.add_MonitorServicer_to_server(monitor, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    reporter = TelemetryReporter(f"127.0.0.1:{port}", source="gateway", flush_interval_s=60, model_metrics=False)
    await reporter.start()
    stack.plane.drift.reporter = reporter
    try:
        async with tca.InferenceServerClient(stack.address) as client:
            stack.plane.drift.rate = 0.0
            for _ in range(5):
                await client.infer("m", drift_inputs(3), headers=stack.headers())
            await asyncio.sleep(0.01)
            assert not reporter._samples and stack.plane.drift.pending == 0
            stack.plane.drift.rate = 1.0
            await client.infer("m", drift_inputs(3), headers=stack.headers())          # production -> 1
            await client.infer("m:canary", drift_inputs(2), headers=stack.headers())   # canary -> 2
        await asyncio.sleep(0.01)
        await reporter.flush()
    finally:
        await reporter.close()
        await server.stop(None)
    samples = [s for request in monitor.requests for s in request.samples]
    by_key = {(s.model, s.version, s.input): s for s in samples}
    assert set(by_key) == {("m", 1, "x"), ("m", 1, "ids"), ("m", 2, "x"), ("m", 2, "ids")}  # BYTES left out
    x1, ids2 = by_key[("m", 1, "x")], by_key[("m", 2, "ids")]
    assert (x1.rows, x1.cols) == (3, 2) and (ids2.rows, ids2.cols) == (2, 1)
    np.testing.assert_array_equal(np.frombuffer(x1.values_f32, "<f4"), np.arange(6, dtype=np.float32))
    np.testing.assert_array_equal(np.frombuffer(ids2.values_f32, "<f4"), [100, 101])


async def test_drift_sampling_is_bounded_and_off_without_a_monitor(stack: Stack) -> None:
    plane = DataPlane(catalog=stack.catalog, ring=stack.ring, quotas=QuotaEnforcer(), upstream=stack.upstream,
                      reporter=TelemetryReporter(None, source="gateway", model_metrics=False), drift_sample_rate=1.0)
    assert plane.drift.rate == 0.0  # nowhere to send samples: nothing is decoded
    reporter = TelemetryReporter("127.0.0.1:1", source="gateway", model_metrics=False)  # never started
    plane = DataPlane(catalog=stack.catalog, ring=stack.ring, quotas=QuotaEnforcer(), upstream=stack.upstream,
                      reporter=reporter, drift_sample_rate=1.0)
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[np.ones(2, np.float32).tobytes()])
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    resolution = stack.catalog.resolve("m", "", "", "")
    for _ in range(20):  # a burst: at most 8 wait for their loop turn, the rest are dropped
        plane.drift.maybe_sample(request, resolution.model, resolution.version)
    assert (plane.drift.pending, plane.drift.dropped, len(reporter._samples)) == (8, 12, 0)
    await asyncio.sleep(0)
    assert plane.drift.pending == 0 and len(reporter._samples) == 8
    assert {(s.model, s.version, s.input) for s in reporter._samples} == {("m", 1, "x")}
