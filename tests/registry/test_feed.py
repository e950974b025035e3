"""The change feed's live side (FeedHub.watch) over the real store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from services.common.errors import FailedPrecondition, Unavailable
from services.registry.core import RegistryCore
from services.registry.entities import ChangeEvent, ChangeType
from services.registry.feed import FeedHub
from services.registry.sql_store import SqlRegistryStore
from tests.registry.conftest import spec_for
from tests.support.blobs import onnx_blob


async def _next(stream: AsyncIterator[ChangeEvent], timeout: float = 5.0) -> ChangeEvent:
    return await asyncio.wait_for(anext(stream), timeout)


async def _close(stream: AsyncIterator[ChangeEvent]) -> None:
    """FeedHub.watch is an async generator (declared as an AsyncIterator): closing it leaves the hub."""
    assert isinstance(stream, AsyncGenerator)
    await stream.aclose()


async def _until(stream: AsyncIterator[ChangeEvent], kind: ChangeType) -> list[ChangeEvent]:
    seen = []
    while True:
        event = await _next(stream)
        seen.append(event)
        if event.type is kind:
            return seen


async def test_snapshot_then_live_events_arrive_promptly(core: RegistryCore, store: SqlRegistryStore) -> None:
    await asyncio.to_thread(core.upload_bytes, spec_for("m", onnx_blob("1")), onnx_blob("1"))
    await asyncio.to_thread(core.set_alias, "m", "production", 1)
    await asyncio.to_thread(core.put_record, "route", "r", b"data")
    hub = FeedHub(store, poll_s=30.0, heartbeat_s=30.0)  # only the in-process notify can wake it
    await hub.start()
    stream = hub.watch(0)
    snapshot = await _until(stream, ChangeType.SNAPSHOT_DONE)
    assert [(e.type, e.model, e.version, e.alias) for e in snapshot[:-1]] == [
        (ChangeType.MODEL_CREATED, "m", 0, ""), (ChangeType.VERSION_CREATED, "m", 1, ""),
        (ChangeType.ALIAS_MOVED, "m", 1, "production"), (ChangeType.RECORD_PUT, "", 0, "")]
    assert snapshot[3].record is not None and snapshot[3].record.data == b"data"
    assert {e.revision for e in snapshot} == {4} and all(e.snapshot for e in snapshot[:-1])
    waiting = asyncio.ensure_future(_next(stream))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await asyncio.to_thread(core.upload_bytes, spec_for("m", onnx_blob("2")), onnx_blob("2"))
    event = await waiting
    assert (event.type, event.version, event.revision) == (ChangeType.VERSION_CREATED, 2, 5)
    assert time.monotonic() - started < 0.5
    await _close(stream)
    await hub.close()


async def test_resume_gets_exactly_the_missed_events_in_order(core: RegistryCore, store: SqlRegistryStore) -> None:
    await asyncio.to_thread(core.create_model, "m")
    hub = FeedHub(store, heartbeat_s=30.0)
    await hub.start()
    for i in range(1, 4):
        await asyncio.to_thread(core.upload_bytes, spec_for("m", onnx_blob(bytes([i]))), onnx_blob(bytes([i])))
    await asyncio.to_thread(core.set_alias, "m", "canary", 3)
    stream = hub.watch(2)
    got = [await _next(stream) for _ in range(3)]
    assert [(e.revision, e.type, e.version) for e in got] == [
        (3, ChangeType.VERSION_CREATED, 2), (4, ChangeType.VERSION_CREATED, 3), (5, ChangeType.ALIAS_MOVED, 3)]
    assert got[2].from_version == 0 and got[2].alias == "canary"
    await _close(stream)
    await hub.close()


async def test_a_watcher_too_far_behind_must_resync(core: RegistryCore, store: SqlRegistryStore) -> None:
    hub = FeedHub(store)
    await hub.start()
    for i in range(60):  # retention is 50
        await asyncio.to_thread(core.put_record, "kv", f"k{i}", b"")
    with pytest.raises(FailedPrecondition, match="resync required: events after revision 3 are no longer kept"):
        await _next(hub.watch(3))
    with pytest.raises(FailedPrecondition, match="resync required: revision 999 is ahead"):
        await _next(hub.watch(999))
    assert (await _next(hub.watch(59))).revision == 60
    await hub.close()


async def test_model_filter_heartbeat_and_close(core: RegistryCore, store: SqlRegistryStore) -> None:
    hub = FeedHub(store, heartbeat_s=0.2)
    await hub.start()
    await asyncio.to_thread(core.create_model, "a")
    await asyncio.to_thread(core.create_model, "b")
    await asyncio.to_thread(core.put_record, "kv", "k", b"")
    stream = hub.watch(0, ["b"])
    snapshot = await _until(stream, ChangeType.SNAPSHOT_DONE)
    assert [(e.type, e.model) for e in snapshot] == [(ChangeType.MODEL_CREATED, "b"), (ChangeType.SNAPSHOT_DONE, "")]
    await asyncio.to_thread(core.create_model, "c")
    beat = await _next(stream)
    assert beat.type is ChangeType.HEARTBEAT and beat.revision == 4  # skipped "c" but advanced past it
    pending = asyncio.ensure_future(_next(stream))
    await asyncio.sleep(0.05)
    await hub.close()
    with pytest.raises(Unavailable, match="shutting down"):
        await pending


async def test_commits_by_another_replica_are_seen_by_polling(database_url: str, core: RegistryCore) -> None:
    other = SqlRegistryStore(database_url)  # a second replica's store on the same database
    hub = FeedHub(core.store, poll_s=0.05, heartbeat_s=30.0)
    await hub.start()
    stream = hub.watch(0)
    await _until(stream, ChangeType.SNAPSHOT_DONE)
    waiting = asyncio.ensure_future(_next(stream))
    await asyncio.sleep(0.05)
    await asyncio.to_thread(other.create_model, "elsewhere", "", {}, "x")
    event = await asyncio.wait_for(waiting, 2.0)
    assert (event.type, event.model) == (ChangeType.MODEL_CREATED, "elsewhere")
    await _close(stream)
    await hub.close()
    other.close()
