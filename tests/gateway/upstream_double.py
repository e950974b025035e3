"""A small KServe v2 server for forwarding tests: echoes its inputs as outputs, records what it saw.

It stands in for an inference replica where the test is about the gateway's forwarding
(retries, deadlines, metadata, streams); the end-to-end tests use real inference processes.
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb

from services.common.interceptors import APP_STATUS_KEY

SERVICE = "inference.GRPCInferenceService"


@dataclasses.dataclass
class Seen:
    version: str
    metadata: dict[str, str]
    time_remaining: float | None


class EchoReplica:
    """`ModelInfer` returns input 0 as output "y" (plus `offset_by_version[version]`)."""

    def __init__(self, offset_by_version: dict[str, float] | None = None, delay_s: float = 0.0,
                 aliases: dict[str, str] | None = None, health_service: bool = False) -> None:
        self.offset_by_version = offset_by_version or {}
        # `model:alias` names resolve through this map, as on a real inference replica.
        self.aliases = aliases or {}
        self.delay_s = delay_s
        self.seen: list[Seen] = []
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.fail_with: grpc.StatusCode | None = None
        # Whether `fail_with` is marked as the application's answer, as every aiaas service marks it.
        self.fail_as_application = False
        # Serve grpc.health.v1 (service "" SERVING once started), as every aiaas service does.
        self.health_service = health_service
        self.health: health.aio.HealthServicer | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _resolve(self, name: str, version: str) -> tuple[str, str]:
        model, _, alias = name.partition(":")
        return (model, self.aliases.get(alias, "")) if alias else (model, version)

    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        model, version = self._resolve(request.model_name, request.model_version)
        self.seen.append(Seen(version, {k: str(v) for k, v in context.invocation_metadata() or ()},
                              context.time_remaining()))
        if self.fail_with is not None:
            if self.fail_as_application:
                context.set_trailing_metadata(((APP_STATUS_KEY, self.fail_with.name),))
            await context.abort(self.fail_with, "replica says no")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        data = np.frombuffer(request.raw_input_contents[0], dtype=np.float32)
        data = data + np.float32(self.offset_by_version.get(version, 0.0))
        response = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id)
        out = response.outputs.add(name="y", datatype="FP32")
        out.shape.extend(request.inputs[0].shape)
        response.raw_output_contents.append(data.astype(np.float32).tobytes())
        return response

    async def _ready(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        self.seen.append(Seen(self._resolve(request.name, request.version)[1], {}, None))
        return pb.ModelReadyResponse(ready=True)

    async def start(self, port: int = 0) -> EchoReplica:
        self.server = grpc.aio.server()
        handlers = {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                self._infer, request_deserializer=pb.ModelInferRequest.FromString,
                response_serializer=pb.ModelInferResponse.SerializeToString),
            "ModelReady": grpc.unary_unary_rpc_method_handler(
                self._ready, request_deserializer=pb.ModelReadyRequest.FromString,
                response_serializer=pb.ModelReadyResponse.SerializeToString),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        if self.health_service:
            self.health = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()
        if self.health is not None:
            await self.set_serving(True)
        return self

    async def set_serving(self, serving: bool) -> None:
        if self.health is not None:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            await self.health.set("", status)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
