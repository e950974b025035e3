"""Follows the registry's change feed into the gateway's caches (catalog, routes, API keys).

`WatchModels` from revision 0 sends a snapshot (staged, then swapped in at SNAPSHOT_DONE), then
live events: an alias move, a route change or a revoked key takes effect as soon as it arrives.
The stream resumes from the last revision after a failure, and resyncs from 0 when told to.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from aiaas.api_keys import stored_key_from_bytes
from aiaas.gateway.v1 import gateway_pb2
from aiaas.records import API_KEY, ROUTE
from aiaas.registry.v1 import registry_pb2 as rpb
from aiaas.registry.v1 import registry_pb2_grpc as rpb_grpc
from services.gateway.convert import route_from_pb
from services.gateway.entities import ApiKeyEntry
from services.gateway.keys import KeyRing
from services.gateway.router import Catalog

log = logging.getLogger("aiaas.gateway.feed")

KEY_KIND = API_KEY.kind
ROUTE_KIND = ROUTE.kind
E = rpb.ChangeEventType


class CacheBuilder:
    """Applies feed events to a catalog and a set of keys."""

    def __init__(self, catalog: Catalog, keys: dict[str, ApiKeyEntry] | None = None, ring: KeyRing | None = None):
        self.catalog = catalog
        self.keys = keys
        self.ring = ring

    def apply(self, event: rpb.ChangeEvent) -> None:
        kind = event.type
        if kind == E.CHANGE_EVENT_TYPE_MODEL_CREATED:
            self.catalog.model(event.model)
        elif kind == E.CHANGE_EVENT_TYPE_MODEL_DELETED:
            self.catalog.remove_model(event.model)
        elif kind == E.CHANGE_EVENT_TYPE_VERSION_CREATED:
            self.catalog.add_version(event.model, event.version)
        elif kind == E.CHANGE_EVENT_TYPE_VERSION_DELETED:
            self.catalog.remove_version(event.model, event.version)
        elif kind == E.CHANGE_EVENT_TYPE_ALIAS_MOVED:
            self.catalog.move_alias(event.model, event.alias, event.version)
        elif kind == E.CHANGE_EVENT_TYPE_ALIAS_DELETED:
            self.catalog.move_alias(event.model, event.alias, 0)
        elif kind == E.CHANGE_EVENT_TYPE_RECORD_PUT:
            self._put_record(event.record)
        elif kind == E.CHANGE_EVENT_TYPE_RECORD_DELETED:
            self._delete_record(event.record)

    def _put_record(self, record: rpb.Record) -> None:
        try:
            if record.kind == KEY_KIND:
                entry = stored_key_from_bytes(record.data)
                if self.keys is not None:
                    self.keys[entry.key_id] = entry
                if self.ring is not None:
                    self.ring.put(entry)
            elif record.kind == ROUTE_KIND:
                self.catalog.put_route(route_from_pb(gateway_pb2.Route.FromString(record.data)), record.revision)
        except Exception:  # one unreadable record must not stop the feed
            log.exception("ignoring unreadable %s record %r", record.kind, record.name)

    def _delete_record(self, record: rpb.Record) -> None:
        if record.kind == KEY_KIND:
            if self.keys is not None:
                self.keys.pop(record.name, None)
            if self.ring is not None:
                self.ring.remove(record.name)
        elif record.kind == ROUTE_KIND:
            self.catalog.remove_route(record.name)


class RegistryFeed:
    def __init__(self, channel: grpc.aio.Channel, catalog: Catalog, ring: KeyRing) -> None:
        self.stub = rpb_grpc.ModelRegistryStub(channel)
        self.catalog = catalog
        self.ring = ring
        self.revision = 0
        self.synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._live = CacheBuilder(catalog, ring=ring)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="gateway-registry-feed")

    async def wait_synced(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.synced.wait(), timeout)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._follow()
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    log.warning("registry feed asks for a resync: %s", exc.details())
                    self.revision = 0
                elif self.synced.is_set():
                    log.warning("registry feed interrupted (%s); serving from cache", exc.code().name)
                else:
                    log.info("waiting for the registry at its feed (%s)", exc.code().name)
            except Exception:  # the follower survives anything and retries
                log.exception("registry feed failed")
            else:
                backoff = 0.1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _follow(self) -> None:
        staged: CacheBuilder | None = None
        if self.revision == 0:
            staged = CacheBuilder(Catalog(self.catalog.default_alias), keys={})
        call = self.stub.WatchModels(rpb.WatchModelsRequest(after_revision=self.revision))
        async for response in call:
            event = response.event
            if event.type == E.CHANGE_EVENT_TYPE_SNAPSHOT_DONE:
                if staged is not None:
                    self._swap_in(staged)
                    staged = None
                self.synced.set()
            elif staged is not None and event.snapshot:
                # The revision moves only once the whole snapshot is in: a break restarts it.
                staged.apply(event)
                continue
            else:
                if staged is not None:
                    # Live events before SNAPSHOT_DONE (an older registry): take the snapshot as is.
                    self._swap_in(staged)
                    staged = None
                self._live.apply(event)
                self.synced.set()
            self.revision = max(self.revision, event.revision)

    def _swap_in(self, staged: CacheBuilder) -> None:
        self.catalog.models = staged.catalog.models
        self.catalog.routes = staged.catalog.routes
        self.catalog.route_revisions = staged.catalog.route_revisions
        self.ring.replace_all(staged.keys or {})
        log.info("registry snapshot at revision %d: %d models, %d routes, %d keys", self.revision,
                 len(self.catalog.models), len(self.catalog.routes), len(staged.keys or {}))
