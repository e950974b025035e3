"""The caller's side of one request: a thread-safe queue of its chunks, read blocking or with `async for`.

The engine thread puts chunks; a reader in any thread takes them with `get` / iteration, and a
reader on an event loop with `async for` (the engine thread wakes it with `call_soon_threadsafe`,
nothing polls). An async reader that stops early (its task cancelled, the client gone) cancels the
request, which frees its KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator

from services.inference.generative.entities import GenerationChunk, GenerationResult


class GenerationHandle:
    def __init__(self, request_id: str, cancel: Callable[[str], None],
                 defer_wake: Callable[[Callable[[], None]], None] | None = None) -> None:
        self.request_id = request_id
        self._cancel = cancel
        # The engine wakes async readers once per step, after all its chunks are out, rather than
        # have each reader's loop take the GIL from the engine thread in the middle of a step.
        self._defer_wake = defer_wake
        self._chunks: deque[GenerationChunk] = deque()
        self._cond = threading.Condition()
        self._wakers: list[Callable[[], None]] = []
        self._finished = False  # the last chunk has been put
        self._done = False  # the last chunk has been taken

    def put(self, chunk: GenerationChunk) -> None:
        """Called by the engine: one more chunk (the last one has a finish_reason)."""
        with self._cond:
            self._chunks.append(chunk)
            self._finished = self._finished or chunk.finished
            self._cond.notify_all()
            wakers, self._wakers = self._wakers, []
        for wake in wakers:
            if self._defer_wake is not None:
                self._defer_wake(wake)
            else:
                wake()

    def cancel(self) -> None:
        self._cancel(self.request_id)

    def get(self, timeout: float | None = None) -> GenerationChunk:
        """The next chunk; TimeoutError if none came within `timeout`, StopIteration after the last."""
        with self._cond:
            if self._done:
                raise StopIteration
            if not self._cond.wait_for(lambda: self._chunks, timeout):
                raise TimeoutError(f"no chunk of request '{self.request_id}' within {timeout} s")
            return self._take()

    def _take(self) -> GenerationChunk:
        chunk = self._chunks.popleft()
        self._done = chunk.finished
        return chunk

    def __iter__(self) -> Iterator[GenerationChunk]:
        while True:
            try:
                yield self.get()
            except StopIteration:
                return

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the end and fold the chunks (those not yet taken) into one result."""
        chunks = []
        while True:
            try:
                chunks.append(self.get(timeout))
            except StopIteration:
                return GenerationResult.from_chunks(chunks)

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[GenerationChunk]:
        loop = asyncio.get_running_loop()
        try:
            while True:
                event: asyncio.Event | None = None
                with self._cond:
                    if self._done:
                        return
                    if self._chunks:
                        chunk = self._take()
                    else:
                        event = asyncio.Event()
                        self._wakers.append(functools.partial(_wake, loop, event))
                if event is not None:
                    await event.wait()
                    continue
                yield chunk
        finally:
            if not self._done:
                self.cancel()


def _wake(loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
    try:
        loop.call_soon_threadsafe(event.set)
    except RuntimeError:  # the reader's loop is closed: nobody is waiting any more
        return
