"""A gateway in process over two replica doubles that serve a decoupled model "gen" (and the tensor
model "m"), for the gateway's own mechanics of generations: decoupled forwarding, token quotas,
telemetry and the OpenAI door. The end-to-end tests run the real inference service instead."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import grpc
import pytest

from aiaas.api_keys import make_key
from aiaas.monitor.v1 import monitor_pb2, monitor_pb2_grpc
from services.common.reporting import TelemetryReporter
from services.common.server import ServiceApp
from services.gateway.balancer import Balancer
from services.gateway.dataplane import DataPlane
from services.gateway.entities import QuotaSpec, Role
from services.gateway.keys import KeyRing
from services.gateway.quotas import QuotaEnforcer
from services.gateway.router import Catalog
from services.gateway.servicer import INFERENCE_SERVICE, InferenceProxy, add_inference_proxy
from services.gateway.settings import GatewaySettings
from services.gateway.upstream import InferenceUpstream
from tests.gateway.upstream_double import EchoReplica

PEPPER = b"pepper"


class MonitorDouble(monitor_pb2_grpc.MonitorServicer):
    """Collects the ReportRequests a real TelemetryReporter sends."""

    def __init__(self) -> None:
        self.requests: list[monitor_pb2.ReportRequest] = []

    async def Report(self, request: monitor_pb2.ReportRequest, context: grpc.aio.ServicerContext
                     ) -> monitor_pb2.ReportResponse:
        self.requests.append(request)
        return monitor_pb2.ReportResponse(accepted=len(request.records))

    def records(self) -> list[monitor_pb2.RequestRecord]:
        return [record for request in self.requests for record in request.records]


@dataclasses.dataclass
class GenStack:
    address: str
    replicas: list[EchoReplica]
    plane: DataPlane
    catalog: Catalog
    ring: KeyRing
    reporter: TelemetryReporter
    monitor: MonitorDouble
    token: str
    # May infer "m" only.
    narrow_token: str
    # 20 tokens a minute.
    thrifty_token: str

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"authorization": f"Bearer {token or self.token}"}


@pytest.fixture
async def gen_stack() -> AsyncIterator[GenStack]:
    aliases = {"production": "1", "canary": "2"}
    replicas = [await EchoReplica(aliases=aliases, generative=("gen",)).start(),
                await EchoReplica(aliases=aliases, generative=("gen",)).start()]
    catalog = Catalog()
    for model in ("gen", "m"):
        for version in (1, 2):
            catalog.add_version(model, version)
        catalog.move_alias(model, "production", 1)
        catalog.move_alias(model, "canary", 2)
    ring = KeyRing(PEPPER)
    entry, token = make_key(PEPPER, roles=frozenset({Role.INFER, Role.READ}))
    narrow, narrow_token = make_key(PEPPER, models=("m",), roles=frozenset({Role.INFER}))
    thrifty, thrifty_token = make_key(PEPPER, roles=frozenset({Role.INFER}),
                                      quota=QuotaSpec(tokens_per_minute=20))
    for key in (entry, narrow, thrifty):
        ring.put(key)
    monitor = MonitorDouble()
    monitor_server = grpc.aio.server()
    monitor_pb2_grpc.add_MonitorServicer_to_server(monitor, monitor_server)
    monitor_port = monitor_server.add_insecure_port("127.0.0.1:0")
    await monitor_server.start()
    reporter = TelemetryReporter(f"127.0.0.1:{monitor_port}", source="gateway", flush_interval_s=60,
                                 model_metrics=False)
    await reporter.start()
    upstream = InferenceUpstream([r.address for r in replicas], Balancer(eject_after=2), max_message_bytes=64 << 20)
    await upstream.start()
    plane = DataPlane(catalog=catalog, ring=ring, quotas=QuotaEnforcer(), upstream=upstream, default_timeout_s=5.0,
                      reporter=reporter)
    app = ServiceApp("gateway", GatewaySettings(host="127.0.0.1", port=0, require_identity=False, key_pepper="x"),
                     configure_process=False)
    app.add_service(INFERENCE_SERVICE, add_inference_proxy, InferenceProxy(plane))
    port = await app.start()
    yield GenStack(f"127.0.0.1:{port}", replicas, plane, catalog, ring, reporter, monitor, token, narrow_token,
                   thrifty_token)
    await app.server.stop(0)
    await reporter.close()
    await monitor_server.stop(0)
    await upstream.close()
    for replica in replicas:
        await replica.stop()
