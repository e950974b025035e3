"""Follows the registry's change feed into the gateway's caches (catalog, routes, API keys).

`WatchModels` from revision 0 sends a snapshot (staged, then swapped in at SNAPSHOT_DONE), then
live events: an alias move, a route change or a revoked key takes effect as soon as it arrives.
The stream itself (resume from the last applied revision, resync from 0 when told to, backoff,
metrics) is services.common.feed_follower.FeedFollower.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from aiaas.api_keys import stored_key_from_bytes
from aiaas.gateway.v1 import gateway_pb2
from aiaas.records import API_KEY, ROUTE
from aiaas.registry.v1 import registry_pb2 as rpb
from services.common.feed_follower import FeedFollower
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


class RegistryFeed(FeedFollower):
    """The gateway's caches fed by `services.common.feed_follower.FeedFollower` (which handles the
    stream: snapshot staged until SNAPSHOT_DONE, resume, resync, backoff, metrics)."""

    def __init__(self, channel: grpc.aio.Channel, catalog: Catalog, ring: KeyRing, *, address: str = "") -> None:
        super().__init__(channel, name="gateway", on_snapshot=self._swap_in, on_event=self._apply, address=address)
        self.catalog = catalog
        self.ring = ring
        self._builder = CacheBuilder(catalog, ring=ring)

    def _apply(self, event: rpb.ChangeEvent) -> None:
        self._builder.apply(event)

    def _swap_in(self, revision: int, events: Sequence[rpb.ChangeEvent]) -> None:
        staged = CacheBuilder(Catalog(self.catalog.default_alias), keys={})
        for event in events:
            staged.apply(event)
        self.catalog.models = staged.catalog.models
        self.catalog.routes = staged.catalog.routes
        self.catalog.route_revisions = staged.catalog.route_revisions
        self.ring.replace_all(staged.keys or {})
        log.info("registry snapshot at revision %d: %d models, %d routes, %d keys", revision,
                 len(self.catalog.models), len(self.catalog.routes), len(staged.keys or {}))
