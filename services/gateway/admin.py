"""The admin plane's domain: API keys and routes, persisted as registry records and audited.

Every write goes to the registry (compare-and-set on the record's revision), is applied to this
replica's cache at once, and reaches the other replicas through the change feed.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Protocol

from aiaas.api_keys import make_key, stored_key_from_bytes, stored_key_to_bytes
from aiaas.records import API_KEY, ROUTE
from services.common.errors import InvalidArgument, NotFound
from services.gateway.entities import ApiKeyEntry, Caller, QuotaSpec, Role, Route
from services.gateway.keys import KeyRing
from services.gateway.records import StoredRecord
from services.gateway.router import Catalog


class RecordStore(Protocol):
    async def put(self, kind: str, name: str, data: bytes, *, expected_revision: int, actor: str) -> StoredRecord: ...
    async def get(self, kind: str, name: str) -> StoredRecord: ...
    async def list(self, kind: str) -> list[StoredRecord]: ...
    async def delete(self, kind: str, name: str, *, actor: str) -> None: ...
    async def audit(self, *, actor: str, action: str, model: str = "", details: dict[str, Any] | None = None) -> None: ...


def actor_of(caller: Caller) -> str:
    return f"gateway-key:{caller.key_id}"


class GatewayAdmin:
    def __init__(self, store: RecordStore, ring: KeyRing, catalog: Catalog,
                 encode_route: Any, decode_route: Any) -> None:
        self.store = store
        self.ring = ring
        self.catalog = catalog
        # Route <-> bytes (the gateway.v1 Route message); injected to keep protobuf out of here.
        self.encode_route = encode_route
        self.decode_route = decode_route

    # API keys -----------------------------------------------------------------------------

    async def create_key(self, caller: Caller, *, name: str, models: tuple[str, ...], roles: frozenset[Role],
                         quota: QuotaSpec | None, expire_time: float | None) -> tuple[ApiKeyEntry, str]:
        if expire_time is not None and expire_time <= time.time():
            raise InvalidArgument("expire_time is in the past")
        entry, token = make_key(
            self.ring.pepper, name=name, models=models or ("*",), roles=roles or frozenset({Role.INFER, Role.READ}),
            created_by=caller.key_id, expire_time=expire_time, quota=quota,
        )
        await self.store.put(API_KEY.kind, entry.key_id, stored_key_to_bytes(entry), expected_revision=0,
                             actor=actor_of(caller))
        self.ring.put(entry)
        await self.store.audit(actor=actor_of(caller), action="gateway.key.create", details={
            "key_id": entry.key_id, "name": name, "models": list(entry.models),
            "roles": sorted(r.value for r in entry.roles),
        })
        return entry, token

    def list_keys(self, include_inactive: bool) -> list[ApiKeyEntry]:
        now = time.time()
        return [e for e in self.ring.entries() if include_inactive or e.active(now)]

    async def _update_key(self, caller: Caller, key_id: str, action: str, reason: str, **changes: Any) -> ApiKeyEntry:
        try:
            record = await self.store.get(API_KEY.kind, key_id)
        except NotFound:
            raise NotFound(f"API key {key_id!r} not found") from None
        entry = dataclasses.replace(stored_key_from_bytes(record.data), **changes)
        await self.store.put(API_KEY.kind, key_id, stored_key_to_bytes(entry), expected_revision=record.revision,
                             actor=actor_of(caller))
        self.ring.put(entry)
        await self.store.audit(actor=actor_of(caller), action=action, details={
            "key_id": key_id, "reason": reason, **{k: v for k, v in changes.items() if isinstance(v, (str, float))},
        })
        return entry

    async def revoke_key(self, caller: Caller, key_id: str, reason: str) -> ApiKeyEntry:
        return await self._update_key(caller, key_id, "gateway.key.revoke", reason, revoked=True,
                                      revoke_time=time.time())

    async def expire_key(self, caller: Caller, key_id: str, expire_time: float | None) -> ApiKeyEntry:
        return await self._update_key(caller, key_id, "gateway.key.expire", "",
                                      expire_time=time.time() if expire_time is None else expire_time)

    # Routes -------------------------------------------------------------------------------

    async def set_route(self, caller: Caller, route: Route, expected_revision: int, reason: str) -> tuple[Route, int]:
        if route.model not in self.catalog.models:
            raise NotFound(f"Request for unknown model: '{route.model}' is not found")
        record = await self.store.put(
            ROUTE.kind, route.model, self.encode_route(route),
            expected_revision=expected_revision if expected_revision > 0 else -1, actor=actor_of(caller),
        )
        self.catalog.put_route(route, record.revision)
        await self.store.audit(actor=actor_of(caller), action="gateway.route.set", model=route.model, details={
            "reason": reason, "sticky": route.sticky,
            "splits": [{"alias": s.alias, "version": s.version, "weight": s.weight} for s in route.splits],
            "shadows": [{"alias": s.alias, "version": s.version, "sample_rate": s.sample_rate}
                        for s in route.shadows],
        })
        return route, record.revision

    async def get_route(self, model: str) -> tuple[Route, int, dict[str, int]]:
        try:
            record = await self.store.get(ROUTE.kind, model)
        except NotFound:
            raise NotFound(f"model {model!r} has no route (it serves its '{self.catalog.default_alias}' alias)") from None
        route: Route = self.decode_route(record.data)
        aliases = [s.alias for s in route.splits] + [s.alias for s in route.shadows]
        resolved = {alias: self.catalog.target_version(model, alias, 0) for alias in aliases if alias}
        return route, record.revision, resolved

    async def list_routes(self) -> list[Route]:
        return [self.decode_route(r.data) for r in sorted(await self.store.list(ROUTE.kind), key=lambda r: r.name)]

    async def delete_route(self, caller: Caller, model: str, reason: str) -> None:
        await self.store.delete(ROUTE.kind, model, actor=actor_of(caller))
        self.catalog.remove_route(model)
        await self.store.audit(actor=actor_of(caller), action="gateway.route.delete", model=model,
                               details={"reason": reason})
