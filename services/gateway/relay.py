"""Generations read ahead of their writer: `ReadAhead` (any async iterator, read by a task of its
own up to a window ahead) and `StreamRelay` (one generation's raw responses on a client's
ModelStreamInfer stream, its error in-band or as the stream's status)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from services.common.errors import AiaasError
from services.gateway.generation import stream_error


class StreamRelay:
    """One generation's responses on a client's stream: read from upstream as they come (up to
    `window` ahead of the client), while earlier requests of the stream are still being written;
    an error ends it in-band (final), or as the stream's status with `grpc_error`."""

    def __init__(self, responses: AsyncIterator[tuple[bytes, Any]], request: Any, grpc_error: bool,
                 window: int) -> None:
        self._ahead = ReadAhead(responses, window)
        self._request = request
        self._grpc_error = grpc_error

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for answer, _ in self._ahead:
                yield answer
        except AiaasError as exc:
            if self._grpc_error:
                raise
            yield stream_error(self._request, exc.message, final=True)

    def cancel(self) -> None:
        self._ahead.cancel()


class ReadAhead:
    """An async iterator read up to `window` items ahead by a task of its own until its reader
    starts; its errors come out in order; `aclose` cancels the reading (and so the generation behind it).

    The reading task exists so that a generation queued behind another on a client's stream runs
    (and buffers) while the one before it is written. Once its own reader asks for an item, the
    task hands over after the item it is reading: the reader drains what was buffered, then reads
    the source itself, so the tokens of the generation being written pay no task switch each.
    """

    _END = object()
    _HANDOVER = object()

    def __init__(self, source: AsyncIterator[Any], window: int) -> None:
        self._source = source
        self._queue: asyncio.Queue[Any] = asyncio.Queue(window)
        self._reader_waiting = False  # the reader has started: the task stops after its current item
        self._handed_over = False  # the task stopped for the reader, which now reads the source itself
        self._direct = False
        self._closing: asyncio.Task[None] | None = None
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        try:
            while not self._reader_waiting:
                try:
                    item = await self._source.__anext__()
                except StopAsyncIteration:
                    await self._queue.put(self._END)
                    return
                await self._queue.put(item)
            self._handed_over = True
            await self._queue.put(self._HANDOVER)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the reader, in order
            await self._queue.put(exc)
        finally:
            if not self._handed_over:
                await self._source.aclose()  # type: ignore[attr-defined]

    def __aiter__(self) -> ReadAhead:
        return self

    async def __anext__(self) -> Any:
        if self._direct:
            return await self._source.__anext__()
        self._reader_waiting = True
        item = await self._queue.get()
        if item is self._HANDOVER:
            self._direct = True
            return await self._source.__anext__()
        if item is self._END:
            self._queue.put_nowait(item)  # stays ended
            raise StopAsyncIteration
        if isinstance(item, Exception):
            raise item
        return item

    def cancel(self) -> None:
        self._task.cancel()  # a no-op once the task ended
        if self._handed_over and self._closing is None:  # the source is the reader's: close it here
            self._closing = asyncio.get_running_loop().create_task(self._close_source())

    async def _close_source(self) -> None:
        await self._source.aclose()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        if self._handed_over:
            self.cancel()
            assert self._closing is not None
            await asyncio.shield(self._closing)
            return
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
