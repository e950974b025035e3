"""The OpenAI-compatible HTTP door (default port 8000, beside gRPC on 8001): `GET /v1/models`,
`POST /v1/completions`, `POST /v1/chat/completions`, with `stream: true` as server-sent events.

A thin transport over the data plane: the same API keys (`authorization: Bearer <key>`), scopes,
aliases (`model: "name:alias"`), canary splits, request and token quotas and telemetry as a
generation sent on gRPC (`DataPlane.open_generation`). Starlette on uvicorn, in the gateway's own
event loop; request bodies are bounded, connections limited (beyond the limit uvicorn answers 503),
and a client that goes away cancels its generation upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.common.context import request_id_var
from services.common.errors import AiaasError, Internal, Unavailable
from services.gateway.dataplane import CallInfo, DataPlane
from services.gateway.entities import Caller, Role
from services.gateway.generation import GenerationMeter, is_final, text_output
from services.gateway.keys import authorize
from services.gateway.openai_schema import Answer, OpenAIError, parse_request, sse

log = logging.getLogger("aiaas.gateway.openai")
T = TypeVar("T")

_DONE = b"data: [DONE]\n\n"
_TRACE_HEADERS = ("traceparent", "tracestate", "baggage")


def _error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class OpenAIDoor:
    """The HTTP routes; `serve` runs them on uvicorn in the running loop."""

    def __init__(self, plane: DataPlane, *, max_body_bytes: int = 4 << 20) -> None:
        self.plane = plane
        self.max_body_bytes = max_body_bytes
        self.app = Starlette(routes=[
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed})

    # Routes ------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        ready = bool(self.plane.ready())
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def list_models(self, request: Request) -> Response:
        try:
            caller = self._caller(request)
            names = [name for name in sorted(self.plane.catalog.models) if caller.may_see(name)]
            kinds = await asyncio.gather(*(self._generative(name) for name in names[:1024]))
        except AiaasError as exc:
            return _error_response(OpenAIError.of(exc))
        return JSONResponse({"object": "list", "data": [
            self._model_card(name) for name, generative in zip(names, kinds, strict=False) if generative
        ]})

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        try:
            caller = self._caller(request)
            model = name.partition(":")[0]
            if not caller.may_see(model) or model not in self.plane.catalog.models \
                    or not await self._generative(name):
                raise OpenAIError(404, f"The model {name!r} does not exist or is not a generative model "
                                       "this key may use", param="model")
        except AiaasError as exc:
            return _error_response(OpenAIError.of(exc))
        except OpenAIError as exc:
            return _error_response(exc)
        return JSONResponse(self._model_card(name))

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    # Generation ----------------------------------------------------------------------------------

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        started = time.perf_counter()
        try:
            try:
                caller = self._caller(request)
            except AiaasError as exc:
                self.plane._report(None, None, exc.code.name, started)
                raise
            ask = parse_request(await self._body(request), chat=chat)
            answer = Answer(ask)
            call = self._call_info(request)
            # The data plane's meter: it has counted each response before the door sees it.
            meter = GenerationMeter(started)
            responses, _ = await self.plane.open_generation(caller, ask.to_request(answer.object_id), call, started,
                                                            meter)
            try:
                # Not streamed, the first response is the whole answer: a client gone meanwhile cancels it.
                first = await _unless_gone(request, anext(responses))
            except BaseException as exc:
                await responses.aclose()  # type: ignore[attr-defined]
                if isinstance(exc, StopAsyncIteration):
                    raise Internal("the model ended its responses before the first one") from None
                raise
        except AiaasError as exc:
            return _error_response(OpenAIError.of(exc))
        except OpenAIError as exc:
            return _error_response(exc)
        except _ClientGone:
            return Response(status_code=499)
        if ask.stream:
            return StreamingResponse(self._events(answer, meter, first, responses), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-request-id": answer.object_id})
        return await self._whole(request, answer, meter, first, responses)

    async def _whole(self, request: Request, answer: Answer, meter: GenerationMeter, first: tuple[bytes, Any],
                     responses: AsyncIterator[tuple[bytes, Any]]) -> Response:
        """The non-streamed answer; a client that disconnects first cancels the generation."""
        async def collect() -> str:
            parts = [text_output(first[1].infer_response)]
            final = is_final(first[1].infer_response)
            async for _, message in responses:
                parts.append(text_output(message.infer_response))
                final = is_final(message.infer_response)
            if not final:
                raise Internal("the model ended its responses without a final one")
            return "".join(parts)

        try:
            text = await _unless_gone(request, collect())
            _check_finish(meter)
        except AiaasError as exc:
            return _error_response(OpenAIError.of(exc))
        except _ClientGone:
            return Response(status_code=499)
        finally:
            await responses.aclose()  # type: ignore[attr-defined]
        return JSONResponse(answer.whole(text, meter.finish_reason, meter.prompt_tokens, meter.completion_tokens),
                            headers={"x-request-id": answer.object_id})

    async def _events(self, answer: Answer, meter: GenerationMeter, first: tuple[bytes, Any],
                      responses: AsyncIterator[tuple[bytes, Any]]) -> AsyncIterator[bytes]:
        """Server-sent events: the chunks, the usage (when asked for), `[DONE]`; an error mid-stream
        is one `{"error": ...}` event. A client that goes away cancels the generation upstream."""
        try:
            if answer.ask.chat:
                yield sse(answer.chunk(None, role=True))
            final = False
            message = first[1]
            while True:
                final = is_final(message.infer_response)
                text = text_output(message.infer_response)
                if text:
                    yield answer.text_event(text)
                if final:
                    break
                try:
                    _, message = await anext(responses)
                except StopAsyncIteration:
                    break
            if not final:
                raise Internal("the model ended its responses without a final one")
            _check_finish(meter)
            yield sse(answer.chunk(None, meter.finish_reason))
            if answer.ask.include_usage:
                yield sse(answer.usage_chunk(meter.prompt_tokens, meter.completion_tokens))
            yield _DONE
        except AiaasError as exc:
            yield sse(OpenAIError.of(exc).body())
        finally:
            await responses.aclose()  # type: ignore[attr-defined]

    # Helpers -------------------------------------------------------------------------------------

    def _caller(self, request: Request) -> Caller:
        caller = self.plane.ring.authenticate(request.headers.get("authorization"))
        if not caller.has_role(Role.READ):
            authorize(caller, Role.INFER)  # listing models takes either role
        return caller

    async def _body(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise OpenAIError(413, f"request body of {declared} bytes is over the limit of {self.max_body_bytes}")
        chunks = bytearray()
        try:
            async for chunk in request.stream():
                chunks += chunk
                if len(chunks) > self.max_body_bytes:
                    raise OpenAIError(413, f"request body is over the limit of {self.max_body_bytes} bytes")
        except ClientDisconnect:
            raise OpenAIError(400, "the client went away before sending its request body") from None
        try:
            return json.loads(chunks)
        except (ValueError, UnicodeDecodeError) as exc:
            raise OpenAIError(400, f"the request body is not valid JSON: {exc}") from None

    def _call_info(self, request: Request) -> CallInfo:
        forward = [(name, value) for name in _TRACE_HEADERS if (value := request.headers.get(name))]
        request_id = request.headers.get("x-request-id") or request_id_var.get()
        if request_id:
            forward.append(("x-request-id", request_id[:128]))
        return CallInfo(authorization=request.headers.get("authorization"), forward=tuple(forward))

    async def _generative(self, name: str) -> bool:
        try:
            resolution = self.plane.catalog.resolve(name)
        except AiaasError:
            return False
        return await self.plane.kinds.decoupled(resolution.model, resolution.version, resolution.forward()) is True

    @staticmethod
    def _model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "aiaas"}

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return _error_response(OpenAIError(404, f"no route {request.method} {request.url.path}: the OpenAI door "
                                                "serves /v1/models, /v1/completions and /v1/chat/completions",
                                           code="not_found"))

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return _error_response(OpenAIError(405, f"{request.method} is not allowed on {request.url.path}",
                                           code="method_not_allowed"))


def _check_finish(meter: GenerationMeter) -> None:
    """A generation that ended other than by a stop condition or its length is an error."""
    if meter.finish_reason in ("stop", "length"):
        return
    if meter.finish_reason == "timeout":
        raise Unavailable("Request timeout expired: the model's queue was full for too long; retry later")
    raise Internal(f"the generation ended with {meter.finish_reason!r}")


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _unless_gone(request: Request, awaitable: Awaitable[T]) -> T:
    """`awaitable`'s result; `_ClientGone` (and `awaitable` cancelled) when the client goes away first."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        gone.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        raise _ClientGone
    return work.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (its body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Server(uvicorn.Server):
    """uvicorn in the gateway's loop: the gateway owns the process's signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class OpenAIServer:
    """The door's uvicorn server on its own port, started and stopped with the gateway."""

    def __init__(self, door: OpenAIDoor, *, host: str, port: int, max_connections: int = 1024,
                 keep_alive_s: float = 5.0, grace_period_s: float = 10.0, tls_cert: str | None = None,
                 tls_key: str | None = None, reuse_port: bool = False) -> None:
        """`reuse_port`: the gateway's processes accept on the same port (SO_REUSEPORT)."""
        self.door = door
        self.reuse_port = reuse_port
        self.host = host
        self.requested_port = port
        self.port = 0
        self.config = uvicorn.Config(
            door.app, host=host, port=port, lifespan="off", log_config=None, access_log=False,
            limit_concurrency=max_connections, timeout_keep_alive=int(max(1, keep_alive_s)),
            timeout_graceful_shutdown=int(max(1, grace_period_s)), h11_max_incomplete_event_size=64 * 1024,
            ssl_certfile=tls_cert, ssl_keyfile=tls_key, server_header=False,
        )
        self.server = _Server(self.config)
        self._socket: socket.socket | None = None
        self._main: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None

    def bind(self) -> int:
        """Bind the port (OSError when it is taken) without accepting yet; returns it."""
        if self._socket is not None:
            return self.port
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Inherited by accepted connections: without it each answer's second write (a response is
        # headers, then body or chunks) waits out the client's delayed ACK, ~40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self.port = sock.getsockname()[1]
        return self.port

    async def start(self) -> int:
        """Bind unless `bind` did, and serve; returns the bound port."""
        self.bind()
        sock = self._socket
        assert sock is not None
        sock.listen(2048)
        sock.setblocking(False)
        if not self.config.loaded:
            self.config.load()
        self.server.lifespan = self.config.lifespan_class(self.config)
        await self.server.startup(sockets=[sock])
        self._main = asyncio.get_running_loop().create_task(self.server.main_loop(), name="openai-door")
        log.info("OpenAI-compatible API listening on http%s://%s:%d/v1", "s" if self.config.is_ssl else "",
                 self.host, self.port)
        return self.port

    def begin_stop(self) -> None:
        """Stop accepting, and drain open requests within the grace period (in the background)."""
        if self._stopping is None and self._main is not None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(), name="openai-door-stop")

    async def stop(self) -> None:
        self.begin_stop()
        if self._stopping is not None:
            await self._stopping
        elif self._socket is not None:  # bound, never served
            self._socket.close()

    async def _stop(self) -> None:
        self.server.should_exit = True
        if self._main is not None:
            await self._main
        await self.server.shutdown(sockets=[self._socket] if self._socket is not None else None)
        if self._socket is not None:
            self._socket.close()
