"""Thin gRPC servicers: the public `inference.GRPCInferenceService` proxy and `GatewayAdmin`.

The inference service is registered by hand under its Triton method paths with identity
(de)serializers: request and response bytes pass through untouched (see dataplane.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import propagate, trace
from tritonclient.grpc import service_pb2 as pb

from aiaas.gateway.v1 import gateway_pb2 as gw
from aiaas.gateway.v1 import gateway_pb2_grpc as gw_grpc
from services.common.context import request_id_var
from services.gateway import convert
from services.gateway.admin import GatewayAdmin
from services.gateway.dataplane import CallInfo, DataPlane
from services.gateway.domain import Caller, Role
from services.gateway.keys import KeyRing, authorize

INFERENCE_SERVICE = "inference.GRPCInferenceService"
_TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
EXTENSIONS = ("model_repository", "schedule_policy", "model_configuration", "binary_tensor_data", "parameters",
              "statistics")


def call_info(context: grpc.aio.ServicerContext) -> CallInfo:
    info = CallInfo(timeout=context.time_remaining())
    forward: list[tuple[str, str]] = []
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            info.authorization = value
        elif key == "x-model-alias":
            info.alias = value
        elif key == "x-routing-key":
            info.routing_key = value
        elif key in _TRACE_HEADERS:
            forward.append((key, value))
        elif key == "triton_grpc_error":
            info.grpc_error = str(value).lower() == "true"
    if trace.get_current_span().get_span_context().is_valid:
        # The gateway traces this call: inference continues the gateway's span.
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        forward = [(k, v) for k, v in forward if k not in carrier] + list(carrier.items())
    request_id = request_id_var.get()
    if request_id:
        forward.append(("x-request-id", request_id))
    info.forward = tuple(forward)
    return info


def _served_by(context: grpc.aio.ServicerContext, version: int, alias: str) -> None:
    context.set_trailing_metadata((("model-version", str(version)), ("model-alias", alias)))


class InferenceProxy:
    def __init__(self, plane: DataPlane, *, name: str = "aiaas-gateway", version: str = "") -> None:
        self.plane = plane
        self._metadata = pb.ServerMetadataResponse(name=name, version=version, extensions=EXTENSIONS)
        self._live = pb.ServerLiveResponse(live=True).SerializeToString()

    async def ServerLive(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._live

    async def ServerReady(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self.plane.server_ready()

    async def ServerMetadata(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._metadata.SerializeToString()

    async def ModelInfer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        response, resolution = await self.plane.infer(raw, call_info(context))
        _served_by(context, resolution.version, resolution.alias)
        return response

    async def ModelStreamInfer(self, requests: AsyncIterator[bytes],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for response in self.plane.stream(requests, call_info(context)):
            yield response

    def _model_read(self, method: str) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            answer, resolution = await self.plane.model_read(method, raw, call_info(context))
            _served_by(context, resolution.version, resolution.alias)
            return answer

        return handle

    async def ModelStatistics(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self.plane.statistics(raw, call_info(context))

    async def RepositoryIndex(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self.plane.repository_index(raw, call_info(context))

    async def RepositoryChange(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self.plane.repository_change(call_info(context))

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        unary = grpc.unary_unary_rpc_method_handler
        return {
            "ServerLive": unary(self.ServerLive),
            "ServerReady": unary(self.ServerReady),
            "ServerMetadata": unary(self.ServerMetadata),
            "ModelReady": unary(self._model_read("ModelReady")),
            "ModelMetadata": unary(self._model_read("ModelMetadata")),
            "ModelConfig": unary(self._model_read("ModelConfig")),
            "ModelInfer": unary(self.ModelInfer),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self.ModelStreamInfer),
            "ModelStatistics": unary(self.ModelStatistics),
            "RepositoryIndex": unary(self.RepositoryIndex),
            "RepositoryModelLoad": unary(self.RepositoryChange),
            "RepositoryModelUnload": unary(self.RepositoryChange),
        }


def add_inference_proxy(proxy: InferenceProxy, server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(INFERENCE_SERVICE, proxy.handlers()),))


class GatewayAdminServicer(gw_grpc.GatewayAdminServicer):
    def __init__(self, admin: GatewayAdmin, ring: KeyRing) -> None:
        self.admin = admin
        self.ring = ring

    def _admin(self, context: grpc.aio.ServicerContext) -> Caller:
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        caller = self.ring.authenticate(str(authorization) if authorization else None)
        authorize(caller, Role.ADMIN)
        return caller

    async def CreateApiKey(self, request: gw.CreateApiKeyRequest, context: Any) -> gw.CreateApiKeyResponse:
        caller = self._admin(context)
        entry, token = await self.admin.create_key(
            caller, name=request.name, models=tuple(request.models), roles=convert.roles_from_pb(request.roles),
            quota=convert.quota_from_pb(request), expire_time=convert.time_from_pb(request, "expire_time"),
        )
        return gw.CreateApiKeyResponse(key=convert.key_to_pb(entry), token=token)

    async def ListApiKeys(self, request: gw.ListApiKeysRequest, context: Any) -> gw.ListApiKeysResponse:
        self._admin(context)
        return gw.ListApiKeysResponse(keys=[convert.key_to_pb(e) for e in self.admin.list_keys(request.include_inactive)])

    async def RevokeApiKey(self, request: gw.RevokeApiKeyRequest, context: Any) -> gw.RevokeApiKeyResponse:
        caller = self._admin(context)
        entry = await self.admin.revoke_key(caller, request.key_id, request.reason)
        return gw.RevokeApiKeyResponse(key=convert.key_to_pb(entry))

    async def ExpireApiKey(self, request: gw.ExpireApiKeyRequest, context: Any) -> gw.ExpireApiKeyResponse:
        caller = self._admin(context)
        entry = await self.admin.expire_key(caller, request.key_id, convert.time_from_pb(request, "expire_time"))
        return gw.ExpireApiKeyResponse(key=convert.key_to_pb(entry))

    async def SetRoute(self, request: gw.SetRouteRequest, context: Any) -> gw.SetRouteResponse:
        caller = self._admin(context)
        route, revision = await self.admin.set_route(
            caller, convert.route_from_pb(request.route), request.expected_revision, request.reason
        )
        return gw.SetRouteResponse(route=convert.route_to_pb(route), revision=revision)

    async def GetRoute(self, request: gw.GetRouteRequest, context: Any) -> gw.GetRouteResponse:
        self._admin(context)
        route, revision, resolved = await self.admin.get_route(request.model)
        return gw.GetRouteResponse(route=convert.route_to_pb(route), revision=revision, resolved=resolved)

    async def ListRoutes(self, request: gw.ListRoutesRequest, context: Any) -> gw.ListRoutesResponse:
        self._admin(context)
        return gw.ListRoutesResponse(routes=[convert.route_to_pb(r) for r in await self.admin.list_routes()])

    async def DeleteRoute(self, request: gw.DeleteRouteRequest, context: Any) -> gw.DeleteRouteResponse:
        caller = self._admin(context)
        await self.admin.delete_route(caller, request.model, request.reason)
        return gw.DeleteRouteResponse()
