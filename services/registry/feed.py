"""The change feed's live side: watchers wake when the feed advances, and resume by revision.

Events are rows written in the same transaction as the change (sql_store.py). A watcher
reads "events after my revision" from the store; between reads it waits on `FeedHub`, which
wakes it at once after a commit in this process and within `poll_s` after a commit by another
replica (it polls the head revision only while someone watches).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.common.outages import OutageLog
from services.registry import validation as check
from services.registry.entities import ChangeEvent, ChangeType
from services.registry.store import RegistryStore

log = logging.getLogger("aiaas.registry.feed")

BATCH = 500


def resync_required(detail: str) -> FailedPrecondition:
    return FailedPrecondition(f"resync required: {detail}; restart the watch from after_revision 0")


class FeedHub:
    def __init__(self, store: RegistryStore, *, poll_s: float = 0.25, heartbeat_s: float = 5.0) -> None:
        self.store = store
        self.poll_s = poll_s
        self.heartbeat_s = heartbeat_s
        self.head = 0
        self.watchers = 0
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: asyncio.Task[None] | None = None
        self._closed = False
        self._database = OutageLog(log, "database", user="feed poll")

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self.head = await asyncio.to_thread(self.store.head_revision)
        self.store.set_commit_listener(self.committed)
        self._poller = asyncio.create_task(self._poll(), name="registry-feed-poll")

    async def close(self) -> None:
        """Stop polling and end every watch (they get UNAVAILABLE and reconnect elsewhere)."""
        self._closed = True
        self.store.set_commit_listener(None)
        if self._changed is not None:
            self._changed.set()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    def committed(self, revision: int) -> None:
        """Called by the store after a commit, from any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._advance, revision)

    def _advance(self, revision: int) -> None:
        if revision > self.head and self._changed is not None:
            self.head = revision
            woken, self._changed = self._changed, asyncio.Event()
            woken.set()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            if not self.watchers:
                continue
            try:
                self._advance(await asyncio.to_thread(self.store.head_revision))
            except Exception as exc:  # noqa: BLE001 - one line a minute, not a traceback every poll_s
                self._database.failed(exc, consequence="watchers hear of other replicas' commits once it answers")
            else:
                self._database.recovered()

    async def _wait_past(self, revision: int, timeout: float) -> bool:
        """Wait until the head passes `revision`; False on timeout."""
        if self._closed or self._changed is None:
            raise Unavailable("the registry is shutting down; reconnect with your last revision")
        if self.head > revision:
            return True
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)
        if self._closed:
            raise Unavailable("the registry is shutting down; reconnect with your last revision")
        return self.head > revision

    async def watch(self, after_revision: int, models: Sequence[str] = ()) -> AsyncIterator[ChangeEvent]:
        """Snapshot (after_revision 0) or the events after `after_revision`, then live events and heartbeats."""
        if after_revision < 0:
            raise InvalidArgument(f"after_revision must be >= 0, got {after_revision}")
        wanted = frozenset(check.name(m) for m in models)

        def selected(event: ChangeEvent) -> bool:
            return not wanted or (event.record is None and event.model in wanted)

        self.watchers += 1
        try:
            if after_revision == 0:
                last, events = await asyncio.to_thread(self.store.snapshot)
                for event in events:
                    if selected(event):
                        yield event
                yield ChangeEvent(last, ChangeType.SNAPSHOT_DONE, datetime.now(UTC))
            else:
                head = await asyncio.to_thread(self.store.head_revision)
                if after_revision > head:
                    raise resync_required(f"revision {after_revision} is ahead of this registry's head {head} "
                                          "(was its database replaced?)")
                last = after_revision
            while True:
                batch = await asyncio.to_thread(self.store.events_after, last, BATCH)
                if batch:
                    if batch[0].revision != last + 1:
                        raise resync_required(f"events after revision {last} are no longer kept "
                                              f"(the oldest kept is {batch[0].revision})")
                    for event in batch:
                        last = event.revision
                        if selected(event):
                            yield event
                    continue
                if not await self._wait_past(last, self.heartbeat_s):
                    yield ChangeEvent(last, ChangeType.HEARTBEAT, datetime.now(UTC))
        finally:
            self.watchers -= 1
