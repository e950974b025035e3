"""The one server interceptor: request context, error mapping, tracing and RPC metrics.

Every `AiaasError` maps to a status through `STATUS_BY_CODE`; anything else becomes INTERNAL
with a generic message (the traceback goes to the log, with the request id the caller sees).
Status messages are bounded (`bounded_message`), and request messages are parsed inside the
wrapper, so a malformed one is INVALID_ARGUMENT naming the method, not grpc's INTERNAL.
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace

from services.common.authz import Guard
from services.common.context import method_var, request_id_var, trace_id_var
from services.common.errors import AiaasError, ErrorCode, InvalidArgument

log = logging.getLogger("aiaas.rpc")

# The one status table: each code travels as the gRPC status of its name (aiaas.errors), and
# `aiaas.errors.error_from_rpc` reads the same naming backwards on the calling side.
STATUS_BY_CODE: dict[ErrorCode, grpc.StatusCode] = {code: grpc.StatusCode[code.status_name] for code in ErrorCode}

# Codes that mean the server failed (OpenTelemetry's rule); the rest are the caller's doing.
SERVER_FAULT_CODES = frozenset(
    {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
     grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED}
)

# Request ids for callers that send none: unique per process without a uuid per call.
_ID_PREFIX = os.urandom(4).hex() + "-"
_ID_COUNTER = itertools.count(1)

_UNTRACED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

# Trailing metadata on every status a service's own code raised (an `AiaasError`): the answer
# came from the application, so the server was reachable. A caller balancing over replicas (the
# gateway) tells "model loading" or "queue timeout" (UNAVAILABLE with this key) from a transport
# failure (UNAVAILABLE from grpc itself, without it). The value is the status name.
APP_STATUS_KEY = "aiaas-app-status"

# A status message travels percent-encoded in one trailer; clients refuse trailers past their
# metadata limit (8 KiB by default) and report "Stream removed". Longer messages are cut.
MAX_STATUS_MESSAGE_BYTES = 2048
# Bytes grpc sends as themselves in `grpc-message`; every other byte becomes `%XX`.
_PLAIN_BYTES = bytes(b for b in range(0x20, 0x7F) if b != 0x25)
_WIRE_COST = bytes(1 if b in _PLAIN_BYTES else 3 for b in range(256))
_MARKER_ROOM = 40

Deserializer = Callable[[bytes], Any]


def status_for(error: AiaasError) -> grpc.StatusCode:
    return STATUS_BY_CODE[error.code]


def bounded_message(message: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """`message` as valid UTF-8 whose encoded trailer stays within about `limit` bytes: a longer
    one is cut at a character boundary and says how many characters were left out."""
    data = message.encode("utf-8", "replace")  # a lone surrogate becomes "?"
    if len(data) + 2 * len(data.translate(None, _PLAIN_BYTES)) <= limit:
        return data.decode("utf-8")
    spent = list(itertools.accumulate(data.translate(_WIRE_COST)))
    kept = data[: bisect.bisect_right(spent, limit - _MARKER_ROOM)].decode("utf-8", "ignore")
    return f"{kept}... ({len(message) - len(kept)} more characters)"


def checked_deserializer(deserialize: Deserializer | None, method: str) -> Deserializer | None:
    """`deserialize`, raising InvalidArgument (naming the method and message type) on bytes that
    do not parse, instead of the DecodeError grpc would turn into INTERNAL."""
    if deserialize is None:
        return None
    message_type = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    type_name = message_type.full_name if message_type is not None else "its request type"

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            raise InvalidArgument(
                f"malformed request to {method}: {len(data)} bytes that do not parse as {type_name}"
            ) from None

    return parse


_RPC_DURATION: dict[str, Any] = {}


def rpc_duration_histogram(service: str) -> Any:
    """The service's one `rpc.server.duration` histogram, shared by every server of the process
    (the public one, the internal one its frontends call, the frontends' fast link)."""
    histogram = _RPC_DURATION.get(service)
    if histogram is None:
        histogram = _RPC_DURATION[service] = metrics.get_meter("aiaas." + service).create_histogram(
            "rpc.server.duration", unit="ms", description="Duration of inbound RPCs")
    return histogram


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, service: str, *, tracing: bool, guard: Guard | None = None) -> None:
        self.service = service
        self.tracing = tracing
        # Authentication + authorization of every call (None: a public service, e.g. the gateway,
        # which authenticates API keys itself).
        self.guard = guard
        self.tracer = trace.get_tracer("aiaas." + service)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self.rpc_duration = rpc_duration_histogram(service)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_UNTRACED_PREFIXES):
            return handler
        # Handlers are fixed per method: wrap each once, not on every call (hot path).
        return self.wrap_cached(handler, method)

    def wrap_generic(self, handler: grpc.GenericRpcHandler) -> grpc.GenericRpcHandler:
        """The same wrapping applied when a service is registered, with no per-call interceptor hop."""
        return _WrappedGenericHandler(handler, self)

    def wrap_cached(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap_handler(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        # grpc gets no request deserializer for single requests: the wrapper parses inside its
        # error mapping. Streamed requests are parsed by grpc on each read, inside the handler.
        parse = checked_deserializer(handler.request_deserializer, method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, parse),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method),
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, parse),
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, method),
            request_deserializer=parse,
            response_serializer=handler.response_serializer,
        )

    def _enter(self, context: grpc.aio.ServicerContext, method: str) -> tuple[Any, Any, dict[str, str]]:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        request_id_var.set(metadata.get("x-request-id") or f"{_ID_PREFIX}{next(_ID_COUNTER):x}")
        method_var.set(method)
        span = None
        token = None
        traceparent = metadata.get("traceparent")
        if self.tracing:
            parent = propagate.extract(metadata)
            span = self.tracer.start_span(method.lstrip("/"), context=parent, kind=trace.SpanKind.SERVER)
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            trace_id_var.set(format(span.get_span_context().trace_id, "032x"))
        elif traceparent:
            parts = traceparent.split("-")
            trace_id_var.set(parts[1] if len(parts) > 2 else "")
        return span, token, metadata

    async def _fail(self, context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
        if isinstance(exc, AiaasError):
            context.set_trailing_metadata((*exc.metadata.items(), (APP_STATUS_KEY, exc.code.status_name)))
            await context.abort(STATUS_BY_CODE[exc.code], bounded_message(exc.message))
        log.error("unexpected error in %s", method, exc_info=exc)
        await context.abort(
            grpc.StatusCode.INTERNAL, f"internal error (request id {request_id_var.get()}); see the server log"
        )

    def _finish(self, span: Any, token: Any, method: str, started: float, code: grpc.StatusCode) -> None:
        self.rpc_duration.record(
            (time.perf_counter() - started) * 1000.0, {"rpc.method": method, "rpc.grpc.status_code": code.name}
        )
        if span is not None:
            if code in SERVER_FAULT_CODES:
                span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            span.end()
        if token is not None:
            otel_context.detach(token)

    def _wrap_unary(self, fn: Callable[..., Any], method: str, parse: Deserializer | None = None) -> Callable[..., Any]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            span, token, metadata = self._enter(context, method)
            code = grpc.StatusCode.OK
            try:
                if parse is not None:
                    request = parse(request)
                if self.guard is not None:
                    self.guard.check(context, metadata, method, request if parse is not None else None)
                return await fn(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                code = context.code() if isinstance(context.code(), grpc.StatusCode) else grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 - the one place unexpected errors are mapped
                code = STATUS_BY_CODE[exc.code] if isinstance(exc, AiaasError) else grpc.StatusCode.INTERNAL
                await self._fail(context, exc, method)
            finally:
                self._finish(span, token, method, started, code)

        return wrapper

    def _wrap_stream(self, fn: Callable[..., Any], method: str, parse: Deserializer | None = None) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(fn):
            return self._wrap_unary(fn, method, parse)

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            span, token, metadata = self._enter(context, method)
            code = grpc.StatusCode.OK
            try:
                if parse is not None:
                    request = parse(request)
                if self.guard is not None:
                    self.guard.check(context, metadata, method, request if parse is not None else None)
                async for response in fn(request, context):
                    yield response
            except (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit):
                code = context.code() if isinstance(context.code(), grpc.StatusCode) else grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 - the one place unexpected errors are mapped
                code = STATUS_BY_CODE[exc.code] if isinstance(exc, AiaasError) else grpc.StatusCode.INTERNAL
                await self._fail(context, exc, method)
            finally:
                self._finish(span, token, method, started, code)

        return wrapper


class _WrappedGenericHandler(grpc.GenericRpcHandler):
    """A service's generic handler whose method handlers come back wrapped by the interceptor.

    grpc.aio runs server interceptors as an extra coroutine hop on every call; wrapping the
    handlers once at registration gives the same behaviour for a fraction of the cost.
    """

    def __init__(self, inner: grpc.GenericRpcHandler, interceptor: ServiceInterceptor) -> None:
        self._inner = inner
        self._interceptor = interceptor

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(_UNTRACED_PREFIXES):
            return handler
        return self._interceptor.wrap_cached(handler, method)
