"""Many generations on one `aiaas.inference.v1.Generations/StreamGenerations` stream per channel.

A generation through `ModelStreamInfer` is a stream of its own and one gRPC message per token to
read; on the multiplexed stream the gateway starts each generation by tag and reads what an
engine step produced for all of them in one message (services/inference/generations.py). One
task per stream reads the messages and hands each event to its generation's queue; a reader that
falls behind (a slow HTTP client) never holds up the others: its queue grows, by at most its own
generation's tokens.

The stream is opened on first use and again after it fails; its failure ends every generation on
it with that failure (what a failed `ModelStreamInfer` call of each would have said). A replica
that does not serve the method (an older inference service) answers UNIMPLEMENTED to `GetLimits`,
which the caller asks first (upstream.py): it then uses `ModelStreamInfer` there.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from aiaas.inference.v1 import inference_pb2 as pb

log = logging.getLogger("aiaas.gateway.generation_mux")

METHOD = "/aiaas.inference.v1.Generations/StreamGenerations"
LIMITS_METHOD = "/aiaas.inference.v1.Generations/GetLimits"
# Seconds a generation may outlive its own timeout at the replica before the gateway gives up on
# it (the replica ends it with DEADLINE_EXCEEDED itself; this covers a replica that went quiet).
TIMEOUT_GRACE_S = 2.0


class StreamFailed(Exception):
    """The multiplexed stream itself failed: every generation on it ends with this."""

    def __init__(self, error: grpc.aio.AioRpcError | None, message: str = "") -> None:
        super().__init__(message or (error.details() if error is not None else "the stream ended"))
        self.rpc_error = error


class TimedOut(Exception):
    """A generation got nothing past its timeout (and the grace): the replica went quiet."""


class Generation:
    """One generation on a multiplexed stream: its events, in order, then the end."""

    __slots__ = ("_events", "_timer", "_waiter", "done", "tag")

    def __init__(self, tag: int) -> None:
        self.tag = tag
        self._events: collections.deque[pb.GenerationEvent | BaseException] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.done = False  # its last event (or a failure) has been read

    def put(self, item: pb.GenerationEvent | BaseException) -> None:
        self._events.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> pb.GenerationEvent:
        """The next event; raises `StreamFailed` / `TimedOut` when the generation ended that way."""
        while not self._events:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._events.popleft()
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if item.last:
            self.done = True
        return item

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class GenerationMux:
    """The multiplexed stream of one channel to one replica (opened lazily, reopened after a failure)."""

    def __init__(self, open_call: Callable[[], Any]) -> None:
        self._open_call = open_call  # () -> a stream_stream call with the gateway's identity
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._failures: dict[int, StreamFailed] = {}  # id(call) -> how it ended, for a write that lost the race
        self._open: dict[int, Generation] = {}
        self._tags = itertools.count(1)
        self._writing = asyncio.Lock()  # grpc.aio: one write at a time per call
        self._opening = asyncio.Lock()  # one stream opened at a time

    @property
    def running(self) -> int:
        return len(self._open)

    async def _ready_call(self) -> Any:
        """The open stream; a new one waits for the replica's initial metadata first, so that a
        replica without the method says UNIMPLEMENTED before anything is written (a write racing
        the refusal ends the call with a status that says nothing: "Internal error from Core")."""
        if self._call is not None:
            return self._call
        async with self._opening:
            if self._call is not None:
                return self._call
            call = self._open_call()
            try:
                await call.initial_metadata()
            except grpc.aio.AioRpcError as exc:
                raise StreamFailed(exc) from None
            if call.done():
                code = await call.code()
                if code != grpc.StatusCode.OK:
                    raise StreamFailed(grpc.aio.AioRpcError(code, await call.initial_metadata(),
                                                            await call.trailing_metadata(), await call.details()))
                raise StreamFailed(None, "the replica ended the generation stream at once")
            self._call = call
            self._reader = asyncio.get_running_loop().create_task(self._read(call))
            return call

    async def start(self, request: bytes, *, timeout: float, request_id: str = "",
                    traceparent: str = "") -> Generation:
        """Start a generation (`request`: a serialized ModelInferRequest); raises `StreamFailed`
        when the stream cannot take it."""
        call = await self._ready_call()
        tag = next(self._tags)
        generation = Generation(tag)
        self._open[tag] = generation
        loop = asyncio.get_running_loop()
        generation._timer = loop.call_later(timeout + TIMEOUT_GRACE_S, self._time_out, generation)
        message = pb.StreamGenerationsRequest(tag=tag, request=request, timeout_s=max(timeout, 1e-3),
                                              request_id=request_id, traceparent=traceparent)
        reader = self._reader
        try:
            async with self._writing:
                await call.write(message)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            # The call ended (a write says little about why: "Internal error from Core"); its
            # reader has, or soon will have, its status.
            self._forget(generation)
            if reader is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(reader), 5.0)
            failure = self._failures.pop(id(call), None)
            if failure is not None:
                raise failure from None
            raise StreamFailed(exc if isinstance(exc, grpc.aio.AioRpcError) else None,
                               f"the generation stream closed: {exc}") from None
        return generation

    def cancel(self, generation: Generation) -> None:
        """Stop a generation that has not ended (its KV cache is freed on the replica)."""
        self._forget(generation)
        if generation.done or self._call is None or self._call.done():
            return
        call = self._call
        task = asyncio.get_running_loop().create_task(self._write_cancel(call, generation.tag))
        task.add_done_callback(_ignore_result)

    async def _write_cancel(self, call: Any, tag: int) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            async with self._writing:
                await call.write(pb.StreamGenerationsRequest(tag=tag))

    def _forget(self, generation: Generation) -> None:
        generation.close()
        self._open.pop(generation.tag, None)

    def _time_out(self, generation: Generation) -> None:
        if self._open.pop(generation.tag, None) is not None:
            generation.put(TimedOut(f"no answer from the replica within the generation's timeout "
                                    f"(+{TIMEOUT_GRACE_S:g} s)"))
            self.cancel(generation)

    async def _read(self, call: Any) -> None:
        failure: StreamFailed
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    failure = StreamFailed(None, "the replica ended the generation stream")
                    break
                opened = self._open
                for event in message.events:
                    generation = opened.get(event.tag)
                    if generation is None:
                        continue  # cancelled or timed out here: its late events are dropped
                    generation.put(event)
                    if event.last:
                        generation.close()
                        del opened[event.tag]
        except grpc.aio.AioRpcError as exc:
            failure = StreamFailed(exc)
        except asyncio.CancelledError:
            failure = StreamFailed(None, "the gateway closed the generation stream")
            raise
        except Exception as exc:
            log.exception("reading the generation stream failed")
            failure = StreamFailed(None, f"reading the generation stream failed: {exc}")
        finally:
            if self._call is call:
                self._call = None
            self._failures = {id(call): failure}  # only the latest call's: bounded
            ended = list(self._open.values())
            self._open.clear()
            for generation in ended:
                generation.close()
                generation.put(failure)
            if ended and failure.rpc_error is not None:
                log.warning("generation stream failed with %d generation(s) on it: %s", len(ended), failure)

    async def close(self) -> None:
        call, reader = self._call, self._reader
        self._call = None
        if call is not None and not call.done():
            call.cancel()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


def _ignore_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def forwarded(metadata: Sequence[tuple[str, str]], key: str) -> str:
    return next((v for k, v in metadata if k == key), "")
