"""The frontends' fast path to the inference core: `ModelInfer` calls over one Unix socket each.

A frontend process (`services.inference.frontend`) terminates gRPC for its share of the
connections and hands each `ModelInfer` on as the request's bytes, undecoded; the core parses it,
runs it through the one batcher of its version and answers the response's bytes. Everything else
(metadata, statistics, streams, health) goes to the core's internal gRPC server instead. The link
costs the core a frame read and a task per call where a gRPC call costs it HTTP/2 framing, flow
control and grpc.aio's per-call machinery (docs/inference.md, "Frontends").

Frames, both ways: a header `<IBQ` (payload length, kind, call id) and the payload.
- CALL (frontend -> core): `<qH` (the caller's remaining time in microseconds, -1 for none;
  the request id's length), the request id, the serialized ModelInferRequest.
- CANCEL (frontend -> core): empty; the caller went away, the core cancels the call.
- OK (core -> frontend): the serialized ModelInferResponse.
- ERROR (core -> frontend): JSON {"code": status name, "message": ..., "metadata": {...}}.

Both ends check every length against `max_frame` before buffering a payload. The socket lives in
a directory only the service's user can open (mode 0700); the frontend has authenticated and
authorized the caller before it sends a call.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import json
import logging
import struct
from collections.abc import Callable
from typing import Any, cast

from services.common.errors import AiaasError, Internal, Unavailable, error_for_status

log = logging.getLogger("aiaas.inference.link")

HEADER = struct.Struct("<IBQ")
CALL_HEADER = struct.Struct("<qH")
CALL, CANCEL, OK, ERROR = 1, 2, 3, 4
MAX_REQUEST_ID = 128
MAX_ERROR_BYTES = 16 * 1024


class LinkLost(Exception):
    """The link to the core closed: no answer will come (not an error the service answered)."""


class FrameReader:
    """Splits a byte stream into (kind, call id, payload) frames, refusing lengths past `max_frame`."""

    def __init__(self, max_frame: int, deliver: Callable[[int, int, bytes], None]) -> None:
        self._max = max_frame
        self._deliver = deliver
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        size = len(buffer)
        while size - start >= HEADER.size:
            length, kind, call_id = HEADER.unpack_from(buffer, start)
            if length > self._max:
                raise ValueError(f"frame of {length} bytes is over the link's limit of {self._max}")
            end = start + HEADER.size + length
            if end > size:
                break
            payload = bytes(buffer[start + HEADER.size:end])
            start = end
            self._deliver(kind, call_id, payload)
        if start:
            del buffer[:start]


def frame(kind: int, call_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload), kind, call_id) + payload


def error_payload(exc: AiaasError) -> bytes:
    data = json.dumps({"code": exc.code.status_name, "message": exc.message[:4096],
                       "metadata": exc.metadata}).encode()
    return data[:MAX_ERROR_BYTES]


def error_from_payload(payload: bytes) -> AiaasError:
    try:
        fields = json.loads(payload)
        cls = error_for_status(str(fields["code"]))
        metadata = {str(k): str(v) for k, v in dict(fields.get("metadata") or {}).items()}
        return cls(str(fields["message"]), metadata=metadata)
    except (ValueError, KeyError, TypeError):
        return Internal("the inference core sent an unreadable error")


class _FramedProtocol(asyncio.Protocol, abc.ABC):
    """One end of a link: frames in through `_on_frame`; a malformed stream closes the link."""

    _side = "link"

    def __init__(self, max_frame: int) -> None:
        self._reader = FrameReader(max_frame, self._on_frame)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass, hence no isinstance check).
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._reader.feed(data)
        except ValueError as exc:
            log.error("%s broken: %s", self._side, exc)
            if self._transport is not None:
                self._transport.close()

    @abc.abstractmethod
    def _on_frame(self, kind: int, call_id: int, payload: bytes) -> None:
        """One whole frame from the other end (each side handles its own kinds)."""


class LinkClient(_FramedProtocol):
    """A frontend's end: `call(request bytes)` -> response bytes, or the core's error raised."""

    _side = "inference core link"

    def __init__(self, max_frame: int, on_lost: Callable[[], None] | None = None) -> None:
        super().__init__(max_frame)
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._ids = itertools.count(1)
        self._on_lost = on_lost
        self._max = max_frame

    @classmethod
    async def connect(cls, path: str, max_frame: int, on_lost: Callable[[], None] | None = None) -> LinkClient:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_unix_connection(lambda: cls(max_frame, on_lost), path)
        return protocol

    def _on_frame(self, kind: int, call_id: int, payload: bytes) -> None:
        future = self._pending.pop(call_id, None)
        if future is None or future.done():
            return  # cancelled here meanwhile
        if kind == OK:
            future.set_result(payload)
        else:
            future.set_exception(error_from_payload(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(LinkLost("the inference core went away during the call; retry"))
        if self._on_lost is not None:
            self._on_lost()

    async def call(self, request: bytes, remaining_s: float | None, request_id: str) -> bytes:
        transport = self._transport
        if transport is None:
            raise LinkLost("this frontend lost its inference core; retry")
        rid = request_id.encode()[:MAX_REQUEST_ID]
        body_len = CALL_HEADER.size + len(rid) + len(request)
        if body_len > self._max:
            raise Internal(f"request of {len(request)} bytes does not fit the core link")
        call_id = next(self._ids)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        remaining_us = -1 if remaining_s is None else max(1, int(remaining_s * 1e6))
        transport.writelines((HEADER.pack(body_len, CALL, call_id), CALL_HEADER.pack(remaining_us, len(rid)),
                              rid, request))
        try:
            return await future
        except asyncio.CancelledError:
            if self._pending.pop(call_id, None) is not None and self._transport is not None:
                self._transport.write(frame(CANCEL, call_id))
            raise

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


# What the core runs per call: (request bytes, remaining seconds or None, request id) -> response bytes.
Handler = Callable[[bytes, "float | None", str], Any]


class LinkServerProtocol(_FramedProtocol):
    """The core's end of one frontend's link: a task per CALL, cancelled by CANCEL or a lost link."""

    _side = "frontend link"

    def __init__(self, handler: Handler, max_frame: int, max_calls: int) -> None:
        super().__init__(max_frame)
        self._handler = handler
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._max_calls = max_calls

    def _on_frame(self, kind: int, call_id: int, payload: bytes) -> None:
        if kind == CANCEL:
            task = self._tasks.get(call_id)
            if task is not None:
                task.cancel()
            return
        if kind != CALL or len(payload) < CALL_HEADER.size:
            raise ValueError(f"unexpected frame kind {kind} of {len(payload)} bytes")
        if len(self._tasks) >= self._max_calls:
            self._answer_error(call_id, Unavailable(
                f"this replica has {self._max_calls} calls in flight from one frontend; retry"))
            return
        remaining_us, rid_len = CALL_HEADER.unpack_from(payload)
        start = CALL_HEADER.size + rid_len
        request_id = payload[CALL_HEADER.size:start].decode("utf-8", "replace")
        remaining_s = None if remaining_us < 0 else remaining_us / 1e6
        task = asyncio.get_running_loop().create_task(self._run(call_id, payload[start:], remaining_s, request_id))
        self._tasks[call_id] = task

    async def _run(self, call_id: int, request: bytes, remaining_s: float | None, request_id: str) -> None:
        try:
            response = await self._handler(request, remaining_s, request_id)
        except AiaasError as exc:
            self._answer_error(call_id, exc)
        except asyncio.CancelledError:
            pass  # the caller went away (or the link did): nothing to answer
        except Exception:
            log.exception("link call %d (request id %s) failed", call_id, request_id)
            self._answer_error(call_id, Internal(f"internal error (request id {request_id}); see the server log"))
        else:
            if self._transport is not None:
                self._transport.writelines((HEADER.pack(len(response), OK, call_id), response))
        finally:
            self._tasks.pop(call_id, None)

    def _answer_error(self, call_id: int, exc: AiaasError) -> None:
        if self._transport is not None:
            self._transport.write(frame(ERROR, call_id, error_payload(exc)))

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        for task in list(self._tasks.values()):
            task.cancel()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)
