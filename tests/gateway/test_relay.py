"""`ReadAhead`: a generation is read ahead while it waits its turn on a client's stream, then its
reader takes over the source (no task switch per token); order, errors and closing hold throughout."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.gateway.relay import ReadAhead


class Source:
    """An async generator standing in for a generation: records which task read each item and whether it closed."""

    def __init__(self, n: int, *, fail_after: int | None = None) -> None:
        self.n = n
        self.fail_after = fail_after
        self.readers: list[asyncio.Task[Any] | None] = []
        self.closed = asyncio.Event()
        self.gate = asyncio.Event()  # items past the first `ahead` wait for it
        self.ahead = n

    async def items(self) -> AsyncIterator[int]:
        try:
            for i in range(self.n):
                if i >= self.ahead:
                    await self.gate.wait()
                if self.fail_after is not None and i == self.fail_after:
                    raise RuntimeError("replica lost")
                self.readers.append(asyncio.current_task())
                yield i
                await asyncio.sleep(0)
        finally:
            self.closed.set()


async def test_it_reads_ahead_while_waiting_then_its_reader_reads_the_source_itself() -> None:
    source = Source(10)
    source.ahead = 4
    ahead = ReadAhead(source.items(), window=64)
    for _ in range(20):  # the generation before it on the stream is still being written
        await asyncio.sleep(0)
    assert len(source.readers) == 4  # read ahead (up to where the source had items)
    pump = source.readers[0]
    me = asyncio.current_task()
    source.gate.set()
    got = [item async for item in ahead]
    assert got == list(range(10))
    assert all(task is pump for task in source.readers[:4])
    assert source.readers[-1] is me  # handed over: the reader reads the source itself
    assert source.readers.count(pump) <= 5  # at most the item under way when the reader came
    assert source.closed.is_set()


async def test_a_full_window_is_drained_by_the_reader_before_the_handover() -> None:
    source = Source(50)
    ahead = ReadAhead(source.items(), window=3)
    for _ in range(20):
        await asyncio.sleep(0)
    assert 3 <= len(source.readers) <= 4  # the task waits on a full window
    assert [item async for item in ahead] == list(range(50))


async def test_errors_come_out_in_order_buffered_or_direct() -> None:
    for wait in (True, False):
        source = Source(5, fail_after=2)
        ahead = ReadAhead(source.items(), window=8)
        if wait:
            for _ in range(20):
                await asyncio.sleep(0)
        got = []
        with pytest.raises(RuntimeError, match="replica lost"):
            async for item in ahead:
                got.append(item)
        assert got == [0, 1]
        assert source.closed.is_set()


async def test_cancel_or_close_ends_the_source_before_and_after_the_handover() -> None:
    # Before: the reading task is cancelled and closes the source.
    source = Source(10)
    source.ahead = 2
    ahead = ReadAhead(source.items(), window=8)
    await asyncio.sleep(0)
    await ahead.aclose()
    assert source.closed.is_set()
    # After: the reader owns the source; cancel (from a finally, not awaited) and aclose close it.
    for how in ("cancel", "aclose"):
        source = Source(10)
        ahead = ReadAhead(source.items(), window=8)
        assert await ahead.__anext__() == 0
        assert await ahead.__anext__() == 1
        if how == "cancel":
            ahead.cancel()
        else:
            await ahead.aclose()
        await asyncio.wait_for(source.closed.wait(), 5)
        assert len(source.readers) < 10


async def test_a_reader_cancelled_at_the_handover_still_gets_the_source_closed() -> None:
    """The task handed over for a reader that was then cancelled: nobody reads the source; cancel closes it."""
    source = Source(10)
    source.ahead = 1
    ahead = ReadAhead(source.items(), window=8)
    for _ in range(10):
        await asyncio.sleep(0)
    reader = asyncio.ensure_future(ahead.__anext__())
    await asyncio.sleep(0)
    assert reader.done() and reader.result() == 0  # the buffered item
    reader = asyncio.ensure_future(ahead.__anext__())  # waits: the source has nothing yet
    for _ in range(5):
        await asyncio.sleep(0)
    assert not reader.done()
    reader.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await reader
    source.gate.set()  # the task reads the next item, sees a reader came, and hands over to nobody
    for _ in range(10):
        await asyncio.sleep(0)
    assert not source.closed.is_set()
    ahead.cancel()  # what the stream's writer does in its finally
    await asyncio.wait_for(source.closed.wait(), 5)
