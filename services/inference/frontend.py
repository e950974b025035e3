"""One frontend process of the inference service: `python -m services.inference.frontend DIR`.

Started by the core (`frontends.FrontendPool`), never by hand. It accepts gRPC on the service's
port next to the core (SO_REUSEPORT: the kernel spreads connections over the processes),
authenticates and authorizes every call with the service's own settings (TLS, mTLS, identity
tokens, the policy), and hands it to the core: `ModelInfer` as bytes over the fast link
(`services.inference.link`), every other RPC (metadata, statistics, generate streams, health,
reflection) through the core's internal gRPC server with the caller's verified identity attached.
So the models, the batchers, the statistics and the health all stay in the core, once.

It imports no model code (no numpy, no torch). It exits when the core's link closes, and drains
its calls on SIGTERM within the grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from services.common import eventloop
from services.common.context import caller_var, request_id_var
from services.common.interceptors import ServiceInterceptor
from services.common.logs import configure_logging
from services.common.server import build_guard, server_credentials, server_options
from services.common.settings import ServerSettings
from services.common.telemetry import configure_telemetry
from services.inference.link import LinkClient, LinkLost

log = logging.getLogger("aiaas.inference.frontend")

SERVICE = "inference.GRPCInferenceService"
GENERATIONS = "aiaas.inference.v1.Generations"  # generations.SERVICE_NAME (not imported: it loads the servicer)
MODEL_INFER = f"/{SERVICE}/ModelInfer"
# Metadata the frontend sets on a proxied call: the caller it verified ("<name> <via>").
CALLER_KEY = "aiaas-frontend-caller"
LINK_SOCKET = "link.sock"
CORE_SOCKET = "core.sock"
SETTINGS_FILE = "settings.json"
READY_LINE = "frontend-ready"
_MAX_METHODS = 256
# Metadata grpc sets itself on the proxied call, or that only the frontend may set.
_DROPPED = frozenset({"user-agent", "content-type", "te", "authority", CALLER_KEY})


# The RPCs the core serves whose calls stream (client streaming, server streaming); every other
# method of these services is unary. Spelled out rather than read from tritonclient's descriptors,
# which would import numpy into every frontend.
_STREAMING = {
    f"/{SERVICE}/ModelStreamInfer": (True, True),
    f"/{GENERATIONS}/StreamGenerations": (True, True),
    "/grpc.health.v1.Health/Watch": (False, True),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": (True, True),
}
_PROXIED_PREFIXES = (f"/{SERVICE}/", f"/{GENERATIONS}/", "/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/")


def method_shape(method: str) -> tuple[bool, bool] | None:
    """(client streaming, server streaming) of a method the core serves; None for any other path."""
    if not method.startswith(_PROXIED_PREFIXES) or method.count("/") != 2:
        return None
    return _STREAMING.get(method, (False, False))


def forwarded_metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
    """The caller's metadata for the core, plus who the caller is (as this frontend verified it)."""
    kept = tuple((k, v) for k, v in (context.invocation_metadata() or ())
                 if not k.startswith((":", "grpc-")) and k not in _DROPPED)
    return (*kept, (CALLER_KEY, caller_var.get()))


async def _abort_from(context: grpc.aio.ServicerContext, error: grpc.aio.AioRpcError) -> None:
    trailing = error.trailing_metadata()
    if trailing:
        context.set_trailing_metadata(tuple(trailing))
    await context.abort(error.code(), error.details() or "")


class Proxy(grpc.GenericRpcHandler):
    """Every RPC but ModelInfer, passed to the core's internal server as bytes, both ways."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            shape = method_shape(method)
            if shape is None:
                return None
            if len(self._handlers) >= _MAX_METHODS:
                return self._handler(method, *shape)  # a caller inventing method names: not cached
            handler = self._handlers[method] = self._handler(method, *shape)
        return handler

    def _handler(self, method: str, client_streaming: bool, server_streaming: bool) -> grpc.RpcMethodHandler:
        channel = self._channel
        if not client_streaming and not server_streaming:
            call = channel.unary_unary(method)

            async def unary_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                try:
                    return await call(request, timeout=context.time_remaining(),  # type: ignore[no-any-return]
                                      metadata=forwarded_metadata(context))
                except grpc.aio.AioRpcError as error:
                    await _abort_from(context, error)
                    raise

            return grpc.unary_unary_rpc_method_handler(unary_unary)
        # Both streaming shapes take one request argument (a message or an iterator) and yield.
        streaming = channel.stream_stream(method) if client_streaming else channel.unary_stream(method)

        async def relay(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            call = streaming(request, timeout=context.time_remaining(), metadata=forwarded_metadata(context))
            try:
                # The core's initial metadata as soon as it comes, not with the first response: a
                # caller may wait for it before writing (the Generations stream's handshake).
                initial = await call.initial_metadata()
                await context.send_initial_metadata(tuple(initial or ()))
                async for response in call:
                    yield response
            except grpc.aio.AioRpcError as error:
                await _abort_from(context, error)
            finally:
                if not call.done():
                    call.cancel()

        if not client_streaming:
            return grpc.unary_stream_rpc_method_handler(relay)
        return grpc.stream_stream_rpc_method_handler(relay)


def model_infer_handler(link: LinkClient) -> grpc.RpcMethodHandler:
    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await link.call(request, context.time_remaining(), request_id_var.get())
        except LinkLost as exc:
            # Not an answer of the service (no app-status trailer): a caller balancing over
            # replicas treats it as a transport failure and retries elsewhere.
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise

    return grpc.unary_unary_rpc_method_handler(model_infer)


class _Methods(grpc.GenericRpcHandler):
    def __init__(self, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._handlers = handlers

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)


def load_frontend_settings(directory: Path) -> ServerSettings:
    """The core's settings as it wrote them (ServerSettings' fields; the rest is the core's business)."""
    fields = json.loads((directory / SETTINGS_FILE).read_text())
    names = {f.name for f in dataclasses.fields(ServerSettings)}
    return ServerSettings(**{k: v for k, v in fields.items() if k in names})


async def serve(directory: Path, port: int, max_receive_bytes: int) -> int:
    settings = load_frontend_settings(directory)
    configure_logging("inference-frontend", settings.log_level, settings.log_json)
    # The core exports the service's metrics (it counts the calls it serves for frontends too).
    tracing = configure_telemetry("inference", otlp_endpoint=settings.otlp_endpoint, metrics_port=0,
                                  metrics_host=settings.host)
    stopping = asyncio.Event()
    lost = asyncio.Event()
    link = await LinkClient.connect(str(directory / LINK_SOCKET), max_receive_bytes + 4096, on_lost=lost.set)
    channel = grpc.aio.insecure_channel(f"unix:{directory / CORE_SOCKET}", options=[
        ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
    interceptor = ServiceInterceptor("inference", tracing=tracing, guard=build_guard("inference", settings))
    server = grpc.aio.server(options=server_options(settings, max_receive_bytes, reuse_port=True),
                             maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
    server.add_generic_rpc_handlers((
        interceptor.wrap_generic(_Methods({MODEL_INFER: model_infer_handler(link)})),
        interceptor.wrap_generic(Proxy(channel)),
    ))
    address = f"{settings.host}:{port}"
    credentials = server_credentials(settings)
    bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if bound != port:
        log.error("frontend could not bind %s", address)
        return 1
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    print(READY_LINE, flush=True)
    waits = {loop.create_task(stopping.wait()), loop.create_task(lost.wait())}
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    code = 0 if stopping.is_set() else 1
    if code:
        log.error("frontend %d lost the inference core; exiting", os.getpid())
    await server.stop(settings.grace_period_s if code == 0 else 0)
    link.close()
    await channel.close()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-receive-bytes", type=int, required=True)
    args = parser.parse_args(argv)
    return eventloop.run(serve(args.directory, args.port, args.max_receive_bytes))


if __name__ == "__main__":
    sys.exit(main())
