"""Thin gRPC servicers: the public `inference.GRPCInferenceService` proxy and `GatewayAdmin`.

The inference service is registered by hand under its Triton method paths with identity
(de)serializers: request and response bytes pass through untouched (see dataplane.py).

Every unary method is served as stream-unary (the same wire format, so unary clients such as
tritonclient see no difference) so that the gateway checks the caller's `authorization`
metadata before it reads the request body (`BodyGate`): a caller without a valid key is
refused at once, before a byte of its message is buffered, and a keyed caller that never
sends its message is cut off after `body_timeout_s` instead of holding a call slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import propagate, trace
from tritonclient.grpc import service_pb2 as pb

from aiaas.gateway.v1 import gateway_pb2 as gw
from aiaas.gateway.v1 import gateway_pb2_grpc as gw_grpc
from services.common.context import request_id_var
from services.common.errors import AiaasError, DeadlineExceeded, InvalidArgument
from services.gateway import convert
from services.gateway.admin import GatewayAdmin
from services.gateway.dataplane import CallInfo, DataPlane
from services.gateway.entities import Caller, Role
from services.gateway.feedback import FeedbackDesk, Label
from services.gateway.keys import KeyRing, authorize

INFERENCE_SERVICE = "inference.GRPCInferenceService"
_MODEL_INFER = f"/{INFERENCE_SERVICE}/ModelInfer"
_TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
EXTENSIONS = ("model_repository", "schedule_policy", "model_configuration", "binary_tensor_data", "parameters",
              "statistics")
DEFAULT_BODY_TIMEOUT_S = 10.0


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


class BodyGate:
    """Reads a unary call's one request message only after the caller's metadata passed."""

    def __init__(self, ring: KeyRing, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        self.ring = ring
        self.body_timeout_s = body_timeout_s

    def authenticate(self, context: grpc.aio.ServicerContext) -> Caller:
        """The caller behind the call's `authorization` metadata; Unauthenticated when missing or bad."""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                return self.ring.authenticate(str(value))
        return self.ring.authenticate(None)

    async def read(self, context: grpc.aio.ServicerContext, method: str) -> Any:
        """The call's one request message, within `body_timeout_s` of asking for it."""
        try:
            async with asyncio.timeout(self.body_timeout_s):
                request = await context.read()
                # A unary client half-closes right after its message: the second read is EOF.
                extra = await context.read() if request is not grpc.aio.EOF else grpc.aio.EOF
        except TimeoutError:
            raise DeadlineExceeded(
                f"{method}: the request message did not arrive within {self.body_timeout_s:g}s "
                "(the gateway's body_timeout_s)"
            ) from None
        if request is grpc.aio.EOF:
            raise InvalidArgument(f"{method}: the call ended without a request message")
        if extra is not grpc.aio.EOF:
            raise InvalidArgument(f"{method} takes one request message; the call sent more")
        return request

    def guard(self, handler: grpc.RpcMethodHandler, method: str, *,
              authenticate: bool = True) -> grpc.RpcMethodHandler:
        """A unary-unary `handler` served as stream-unary: authenticate, then read its message."""
        fn = handler.unary_unary
        if fn is None:
            return handler

        async def handle(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            if authenticate:
                self.authenticate(context)
            return await fn(await self.read(context, method), context)

        return grpc.stream_unary_rpc_method_handler(
            handle, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def adding(self, add_to_server: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
        """A generated `add_..._to_server` whose handlers come back guarded (see `guard`)."""
        def add(servicer: Any, server: Any) -> None:
            add_to_server(servicer, _GuardedRegistrar(server, self))

        return add


class _GuardedRegistrar:
    """What a generated `add_..._to_server` sees instead of the server: its unary handlers get guarded."""

    def __init__(self, server: Any, gate: BodyGate) -> None:
        self._server = server
        self._gate = gate

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_GuardedGenericHandler(h, self._gate) for h in handlers))

    def add_registered_method_handlers(self, service_name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(service_name, {
            name: self._gate.guard(h, f"/{service_name}/{name}") for name, h in handlers.items()
        })


class _GuardedGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, gate: BodyGate) -> None:
        self._inner = inner
        self._gate = gate
        # One guarded handler per method, so the interceptor's per-method cache keeps hitting.
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._gate.guard(handler, method))
            self._guarded[method] = cached
        return cached[1]


def _served_by(context: grpc.aio.ServicerContext, version: int, alias: str) -> None:
    context.set_trailing_metadata((("model-version", str(version)), ("model-alias", alias)))


class InferenceProxy:
    def __init__(self, plane: DataPlane, *, name: str = "aiaas-gateway", version: str = "",
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        self.plane = plane
        self.gate = BodyGate(plane.ring, body_timeout_s)
        self._metadata = pb.ServerMetadataResponse(name=name, version=version, extensions=EXTENSIONS)
        self._live = pb.ServerLiveResponse(live=True).SerializeToString()

    async def ServerLive(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._live

    async def ServerReady(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self.plane.server_ready()

    async def ServerMetadata(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._metadata.SerializeToString()

    async def ModelInfer(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        info = call_info(context)
        try:
            caller = self.plane.ring.authenticate(info.authorization)
        except AiaasError as exc:
            # The data plane's own record of a refused call (what `DataPlane.infer` reports).
            self.plane._report(None, None, exc.code.name, started)
            raise
        raw = await self.gate.read(context, _MODEL_INFER)
        info.timeout = context.time_remaining()
        try:
            response, resolution = await self.plane.infer_as(caller, raw, info, started)
        except DecodeError:
            raise InvalidArgument(
                f"malformed request to {_MODEL_INFER}: {len(raw)} bytes that do not parse as "
                "inference.ModelInferRequest"
            ) from None
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
        def keyed(name: str, fn: Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]) -> Any:
            return self.gate.guard(grpc.unary_unary_rpc_method_handler(fn), f"/{INFERENCE_SERVICE}/{name}")

        return {
            # Open to every caller and their request is empty: answered without reading a body.
            "ServerLive": _bodiless(self.ServerLive),
            "ServerReady": _bodiless(self.ServerReady),
            "ServerMetadata": _bodiless(self.ServerMetadata),
            "ModelReady": keyed("ModelReady", self._model_read("ModelReady")),
            "ModelMetadata": keyed("ModelMetadata", self._model_read("ModelMetadata")),
            "ModelConfig": keyed("ModelConfig", self._model_read("ModelConfig")),
            "ModelInfer": grpc.stream_unary_rpc_method_handler(self.ModelInfer),
            # Authenticated before the first read, and again for every request, by the data plane.
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self.ModelStreamInfer),
            "ModelStatistics": keyed("ModelStatistics", self.ModelStatistics),
            "RepositoryIndex": keyed("RepositoryIndex", self.RepositoryIndex),
            "RepositoryModelLoad": keyed("RepositoryModelLoad", self.RepositoryChange),
            "RepositoryModelUnload": keyed("RepositoryModelUnload", self.RepositoryChange),
        }


def _bodiless(fn: Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]) -> grpc.RpcMethodHandler:
    """A method whose request carries nothing: answered at once, its body (if any) never read."""
    async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        return await fn(b"", context)

    return grpc.stream_unary_rpc_method_handler(handle)


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
        caller = self._admin(context)
        keys = self.admin.list_keys(caller, request.include_inactive)
        return gw.ListApiKeysResponse(keys=[convert.key_to_pb(e) for e in keys])

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
        caller = self._admin(context)
        route, revision, resolved = await self.admin.get_route(caller, request.model)
        return gw.GetRouteResponse(route=convert.route_to_pb(route), revision=revision, resolved=resolved)

    async def ListRoutes(self, request: gw.ListRoutesRequest, context: Any) -> gw.ListRoutesResponse:
        caller = self._admin(context)
        return gw.ListRoutesResponse(routes=[convert.route_to_pb(r) for r in await self.admin.list_routes(caller)])

    async def DeleteRoute(self, request: gw.DeleteRouteRequest, context: Any) -> gw.DeleteRouteResponse:
        caller = self._admin(context)
        await self.admin.delete_route(caller, request.model, request.reason)
        return gw.DeleteRouteResponse()


def _label(label: gw.Label) -> Label:
    kind = label.WhichOneof("value")
    if kind == "class_id":
        return int(label.class_id)
    if kind == "number":
        return float(label.number)
    if kind == "text":
        return str(label.text)
    raise InvalidArgument("a label needs one of class_id, number or text")


class FeedbackServicer(gw_grpc.FeedbackServicer):
    def __init__(self, desk: FeedbackDesk, ring: KeyRing) -> None:
        self.desk = desk
        self.ring = ring

    async def SendFeedback(self, request: gw.SendFeedbackRequest, context: Any) -> gw.SendFeedbackResponse:
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        caller = self.ring.authenticate(str(authorization) if authorization else None)
        labels = [_label(label) for label in request.labels]
        result = await self.desk.give(caller, request.model, request.request_id, labels,
                                      request.score if request.HasField("score") else None)
        return gw.SendFeedbackResponse(
            version=result.prediction.version, alias=result.prediction.alias, class_labels=result.class_labels,
            correct=result.correct, value_labels=result.value_labels, mean_abs_error=result.mean_abs_error,
            predicted=[str(p) for p in result.prediction.rows],
        )
