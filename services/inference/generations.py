"""`aiaas.inference.v1.Generations`: many generations on one stream, their responses in batches.

`ModelStreamInfer` answers one gRPC message per token of each generation; behind the gateway,
whose every generation is one stream to a replica, that is one message to write here and one to
read there per token, each a few tens of microseconds of grpc.aio. On this stream the gateway
starts (and cancels) its generations by tag, and what one engine step produced for all of them
leaves in one message: the per-token cost is the encoding of one event.

Each generation runs exactly as a `ModelStreamInfer` request with `stream` true would
(`InferenceServicer.generate_into`): same validation, same responses, byte for byte, each wrapped
in an event with its tag; an error ends that generation as an event with the status name and the
message, and the stream goes on. Bounded: at most `MAX_GENERATIONS` run per stream (the stream is
not read further meanwhile, so a fast sender backs up in HTTP/2 flow control), and a message
carries at most `MAX_EVENTS` events.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from aiaas.inference.v1 import inference_pb2 as pb
from aiaas.inference.v1 import inference_pb2_grpc as pb_grpc
from services.common.context import request_id_var
from services.common.errors import AiaasError, DeadlineExceeded, ErrorCode, InvalidArgument
from services.inference.servicer import InferenceServicer

log = logging.getLogger("aiaas.inference.generations")

SERVICE_NAME = "aiaas.inference.v1.Generations"
# Generations running on one stream at once (an engine queues at most 1,024 by default); the next
# start waits: the stream is not read meanwhile.
MAX_GENERATIONS = 1024
# Events in one response message (each is a token's response: well under 1 KiB).
MAX_EVENTS = 512
# Characters of a caller's request id kept (it goes into the logs).
MAX_REQUEST_ID = 128


class GenerationsServicer(pb_grpc.GenerationsServicer):
    def __init__(self, inference: InferenceServicer) -> None:
        self._inference = inference
        self._draining = False
        self._wakes: set[asyncio.Event] = set()  # each open stream's writer

    def begin_drain(self) -> None:
        """Shutting down: new generations are refused (UNAVAILABLE: the caller tries another
        replica), running ones finish, and each stream ends once it has none."""
        self._draining = True
        for wake in self._wakes:
            wake.set()

    async def GetLimits(self, request: pb.GetLimitsRequest, context: grpc.aio.ServicerContext) -> pb.GetLimitsResponse:
        return pb.GetLimitsResponse(max_generations=MAX_GENERATIONS, max_events=MAX_EVENTS)

    async def StreamGenerations(self, request_iterator: AsyncIterator[pb.StreamGenerationsRequest],
                                context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StreamGenerationsResponse]:
        # At once: the caller waits for it before its first start (its handshake: a server without
        # this method answers UNIMPLEMENTED instead).
        await context.send_initial_metadata(())
        stream = _Stream(self._inference)
        reader = asyncio.get_running_loop().create_task(stream.read(request_iterator, lambda: self._draining))
        self._wakes.add(stream.ready)
        try:
            while True:
                await stream.ready.wait()
                stream.ready.clear()
                # One turn of the loop more: the other generations woken by the same engine step
                # emit their events too, and leave in this message.
                await asyncio.sleep(0)
                outbox = stream.outbox
                while outbox:
                    batch = outbox[:MAX_EVENTS]
                    del outbox[:MAX_EVENTS]
                    yield pb.StreamGenerationsResponse(events=batch)
                idle = not stream.running and not outbox
                if reader.done():
                    failure = None if reader.cancelled() else reader.exception()
                    if failure is not None:
                        raise failure
                    if idle:
                        return  # the caller half-closed and every generation has ended
                if self._draining and idle:
                    return  # shutting down: the caller reopens elsewhere
        finally:
            self._wakes.discard(stream.ready)
            reader.cancel()
            stream.cancel_all()


class _Stream:
    """The generations of one StreamGenerations call and the events not written yet."""

    def __init__(self, inference: InferenceServicer) -> None:
        self._inference = inference
        self.outbox: list[pb.GenerationEvent] = []
        self.ready = asyncio.Event()  # the writer has something to do
        self.running: dict[int, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(MAX_GENERATIONS)
        self._request_id = request_id_var.get()

    def emit(self, event: pb.GenerationEvent) -> None:
        self.outbox.append(event)
        self.ready.set()

    async def read(self, requests: AsyncIterator[pb.StreamGenerationsRequest], draining: Callable[[], bool]) -> None:
        """Start and cancel generations as the caller asks, until it half-closes."""
        loop = asyncio.get_running_loop()
        try:
            async for message in requests:
                tag = message.tag
                if not message.request:  # a cancel; a tag already ended is no error
                    task = self.running.get(tag)
                    if task is not None:
                        task.cancel()
                    continue
                if tag in self.running:
                    raise InvalidArgument(f"generation tag {tag} is already running on this stream")
                if draining():
                    self.emit(error_event(tag, ErrorCode.UNAVAILABLE,
                                          "this inference replica is shutting down; retry on another one"))
                    continue
                await self._slots.acquire()
                self.running[tag] = loop.create_task(self._run(tag, message))
        finally:
            self.ready.set()

    async def _run(self, tag: int, message: pb.StreamGenerationsRequest) -> None:
        request_id_var.set(message.request_id[:MAX_REQUEST_ID] or f"{self._request_id}/{tag}")
        emit = self.emit

        def send(response: service_pb2.ModelInferResponse, last: bool) -> None:
            wrapped = service_pb2.ModelStreamInferResponse(infer_response=response).SerializeToString()
            emit(pb.GenerationEvent(tag=tag, response=wrapped, last=last))

        try:
            if not (math.isfinite(message.timeout_s) and message.timeout_s >= 0):
                raise InvalidArgument(f"timeout_s must be a finite number of seconds >= 0 (0: none), "
                                      f"got {message.timeout_s!r}")
            limit = message.timeout_s or None
            try:
                request = service_pb2.ModelInferRequest.FromString(message.request)
            except DecodeError:
                raise InvalidArgument("the generation's request is not a serialized ModelInferRequest") from None
            try:
                async with asyncio.timeout(limit):
                    await self._inference.generate_into(request, send)
            except TimeoutError:
                raise DeadlineExceeded(f"the generation did not finish within its {message.timeout_s:g} s; "
                                       "it was cancelled") from None
        except AiaasError as exc:
            emit(error_event(tag, exc.code, exc.message))
        except asyncio.CancelledError:
            raise  # cancelled by the caller (who expects nothing more) or with the stream
        except Exception:
            log.exception("generation %d on a StreamGenerations stream failed", tag)
            emit(error_event(tag, ErrorCode.INTERNAL,
                             f"internal error (request id {request_id_var.get()}); see the server log"))
        finally:
            self.running.pop(tag, None)
            self._slots.release()
            self.ready.set()  # the writer notices the last generation's end, with or without an event

    def cancel_all(self) -> None:
        for task in list(self.running.values()):
            task.cancel()


def error_event(tag: int, code: ErrorCode, message: str) -> pb.GenerationEvent:
    return pb.GenerationEvent(tag=tag, last=True, error_code=code.status_name, error_message=message)


def add_to_server(servicer: Any, server: Any) -> None:
    pb_grpc.add_GenerationsServicer_to_server(servicer, server)


