"""The frontends' link to the inference core (services/inference/link.py) over a real Unix socket."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.inference.link import (
    CALL,
    OK,
    FrameReader,
    LinkClient,
    LinkLost,
    LinkServerProtocol,
    error_from_payload,
    error_payload,
    frame,
)


@settings(max_examples=60, deadline=None)
@given(payloads=st.lists(st.binary(max_size=300), max_size=12), cuts=st.lists(st.integers(0, 4000), max_size=8))
def test_frames_survive_any_split_of_the_stream(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(OK, i, p) for i, p in enumerate(payloads))
    got: list[tuple[int, int, bytes]] = []
    reader = FrameReader(1000, lambda kind, call_id, payload: got.append((kind, call_id, payload)))
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    for start, end in itertools.pairwise(points):
        reader.feed(stream[start:end])
    assert got == [(OK, i, p) for i, p in enumerate(payloads)]


def test_a_frame_over_the_limit_is_refused_before_it_is_buffered() -> None:
    reader = FrameReader(100, lambda *_: None)
    with pytest.raises(ValueError, match="over the link's limit"):
        reader.feed(frame(CALL, 1, b"x" * 101)[:20])  # the header alone says too much


def test_errors_keep_their_code_message_and_metadata() -> None:
    error = error_from_payload(error_payload(ResourceExhausted("queue full", metadata={"retry-after-ms": "5"})))
    assert isinstance(error, ResourceExhausted)
    assert error.message == "queue full" and error.metadata == {"retry-after-ms": "5"}
    assert error_from_payload(b"not json").code.status_name == "INTERNAL"


async def _pair(tmp_path: Path, handler: object, max_calls: int = 64) -> tuple[asyncio.AbstractServer, LinkClient]:
    path = str(tmp_path / "link.sock")
    server = await asyncio.get_running_loop().create_unix_server(
        lambda: LinkServerProtocol(handler, 1 << 16, max_calls), path)  # type: ignore[arg-type]
    return server, await LinkClient.connect(path, 1 << 16)


async def test_calls_answers_errors_and_cancellation_cross_the_link(tmp_path: Path) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(body: bytes, remaining_s: float | None, request_id: str) -> bytes:
        if body == b"bad":
            raise InvalidArgument(f"bad request {request_id}")
        if body == b"hang":
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return body[::-1] + f"|{remaining_s}".encode()

    server, client = await _pair(tmp_path, handler)
    try:
        answers = await asyncio.gather(*(client.call(f"req{i}".encode(), 2.0, "r") for i in range(50)))
        assert answers == [f"req{i}"[::-1].encode() + b"|2.0" for i in range(50)]
        assert await client.call(b"x", None, "r") == b"x|None"
        with pytest.raises(InvalidArgument, match="bad request rid-7"):
            await client.call(b"bad", 1.0, "rid-7")
        hanging = asyncio.create_task(client.call(b"hang", None, "r"))
        await asyncio.wait_for(started.wait(), 5)
        hanging.cancel()
        await asyncio.wait_for(cancelled.wait(), 5)  # the caller left: the core's call is cancelled
    finally:
        client.close()
        server.close()


async def test_calls_past_the_bound_are_refused_and_a_lost_core_fails_what_waits(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def handler(body: bytes, remaining_s: float | None, request_id: str) -> bytes:
        await release.wait()
        return body

    server, client = await _pair(tmp_path, handler, max_calls=2)
    waiting = [asyncio.create_task(client.call(b"a", None, "r")) for _ in range(2)]
    await asyncio.sleep(0.1)
    with pytest.raises(Unavailable, match="2 calls in flight"):
        await client.call(b"b", None, "r")
    release.set()
    assert await asyncio.gather(*waiting) == [b"a", b"a"]
    release.clear()
    pending = asyncio.create_task(client.call(b"c", None, "r"))
    await asyncio.sleep(0.1)
    server.close()
    for transport_owner in list(getattr(server, "_transports", [])):
        transport_owner.close()
    client.close()  # the link goes away with a call in flight
    with pytest.raises(LinkLost):
        await pending
    with pytest.raises(LinkLost):
        await client.call(b"d", None, "r")
