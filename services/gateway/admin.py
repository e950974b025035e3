"""The admin plane's domain: API keys and routes, persisted as registry records and audited.

Every write goes to the registry (compare-and-set on the record's revision), is applied to this
replica's cache at once, and reaches the other replicas through the change feed. A caller only
grants, sees and changes what is within its own key (`keys.check_grant`, `keys.may_manage`, the
models of routes). The bootstrap admin token becomes a stored key at first start, so it is
revoked like any other and stays revoked.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import time
from typing import Any, Protocol

from aiaas.api_keys import hash_secret, make_key, parse_token, stored_key_from_bytes, stored_key_to_bytes
from aiaas.records import API_KEY, ROUTE
from services.common.errors import Aborted, InvalidArgument, NotFound, PermissionDenied
from services.gateway.entities import ApiKeyEntry, Caller, QuotaSpec, Role, Route
from services.gateway.keys import KeyRing, check_grant, check_manage, may_manage
from services.gateway.records import StoredRecord
from services.gateway.router import Catalog


class RecordStore(Protocol):
    async def put(self, kind: str, name: str, data: bytes, *, expected_revision: int, actor: str) -> StoredRecord: ...
    async def get(self, kind: str, name: str) -> StoredRecord: ...
    async def list(self, kind: str) -> list[StoredRecord]: ...
    async def delete(self, kind: str, name: str, *, actor: str) -> None: ...
    async def audit(self, *, actor: str, action: str, model: str = "", details: dict[str, Any] | None = None) -> None: ...


log = logging.getLogger("aiaas.gateway.admin")

BOOTSTRAP_ACTOR = "gateway-bootstrap"


def actor_of(caller: Caller) -> str:
    return f"gateway-key:{caller.key_id}"


def check_model(caller: Caller, model: str) -> None:
    if not caller.may_see(model):
        raise PermissionDenied(f"API key {caller.key_id} may not manage the route of model {model!r}")


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
        """A new key within the caller's own: unset models and expiry are the caller's."""
        if expire_time is not None and expire_time <= time.time():
            raise InvalidArgument("expire_time is in the past")
        models = models or caller.models
        roles = roles or frozenset({Role.INFER, Role.READ})
        expire_time = expire_time if expire_time is not None else caller.expire_time
        check_grant(caller, models=models, roles=roles, expire_time=expire_time)
        entry, token = make_key(
            self.ring.pepper, name=name, models=models, roles=roles,
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

    def list_keys(self, caller: Caller, include_inactive: bool) -> list[ApiKeyEntry]:
        """The keys the caller may manage (its own, and those within its scope)."""
        now = time.time()
        return [e for e in self.ring.entries() if (include_inactive or e.active(now)) and may_manage(caller, e)]

    async def _update_key(self, caller: Caller, key_id: str, action: str, reason: str, **changes: Any) -> ApiKeyEntry:
        try:
            record = await self.store.get(API_KEY.kind, key_id)
        except NotFound:
            raise NotFound(f"API key {key_id!r} not found") from None
        current = stored_key_from_bytes(record.data)
        check_manage(caller, current, action.rpartition(".")[2])
        entry = dataclasses.replace(current, **changes)
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
        at = time.time() if expire_time is None else expire_time
        if caller.expire_time is not None and at > caller.expire_time:
            raise PermissionDenied(f"API key {caller.key_id} may not set an expiry after its own")
        return await self._update_key(caller, key_id, "gateway.key.expire", "", expire_time=at)

    async def ensure_bootstrap_key(self, token: str) -> ApiKeyEntry:
        """The bootstrap admin token as a stored key: written (hashed) when its key id has no record yet.

        Call once the registry's snapshot is in the ring. A record that exists wins, whatever the
        token says: once revoked or expired, the bootstrap key stays off across restarts."""
        key_id, secret = parse_token(token)
        entry = self.ring.get(key_id) or await self._store_bootstrap_key(key_id, secret)
        # The feed may have brought the record (or a newer revision of it) meanwhile: it wins.
        if self.ring.get(key_id) is None:
            self.ring.put(entry)
        entry = self.ring.get(key_id) or entry
        if not entry.active(time.time()):
            log.warning("bootstrap admin key %s is %s: the token given at start is refused", key_id,
                        "revoked" if entry.revoked else "expired")
        elif not hmac.compare_digest(hash_secret(self.ring.pepper, entry.salt, secret), entry.secret_hash):
            log.warning("API key %s in the registry is not the bootstrap token given at start: the token is refused",
                        key_id)
        return entry

    async def _store_bootstrap_key(self, key_id: str, secret: str) -> ApiKeyEntry:
        try:
            return stored_key_from_bytes((await self.store.get(API_KEY.kind, key_id)).data)
        except NotFound:
            pass
        entry, _ = make_key(self.ring.pepper, name="bootstrap admin", roles=frozenset({Role.ADMIN}),
                            key_id=key_id, secret=secret, created_by="bootstrap")
        try:
            await self.store.put(API_KEY.kind, key_id, stored_key_to_bytes(entry), expected_revision=0,
                                 actor=BOOTSTRAP_ACTOR)
        except Aborted:
            # Another replica starting with the same token wrote it first.
            return stored_key_from_bytes((await self.store.get(API_KEY.kind, key_id)).data)
        await self.store.audit(actor=BOOTSTRAP_ACTOR, action="gateway.key.create", details={
            "key_id": key_id, "name": entry.name, "models": ["*"], "roles": ["admin"]})
        log.info("bootstrap admin key %s stored in the registry; once you have an admin key of your own, "
                 "revoke it (`aiaas keys revoke %s`)", key_id, key_id)
        return entry

    # Routes -------------------------------------------------------------------------------

    async def set_route(self, caller: Caller, route: Route, expected_revision: int, reason: str) -> tuple[Route, int]:
        check_model(caller, route.model)
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

    async def get_route(self, caller: Caller, model: str) -> tuple[Route, int, dict[str, int]]:
        check_model(caller, model)
        try:
            record = await self.store.get(ROUTE.kind, model)
        except NotFound:
            raise NotFound(f"model {model!r} has no route (it serves its '{self.catalog.default_alias}' alias)") from None
        route: Route = self.decode_route(record.data)
        aliases = [s.alias for s in route.splits] + [s.alias for s in route.shadows]
        resolved = {alias: self.catalog.target_version(model, alias, 0) for alias in aliases if alias}
        return route, record.revision, resolved

    async def list_routes(self, caller: Caller) -> list[Route]:
        routes = [self.decode_route(r.data) for r in sorted(await self.store.list(ROUTE.kind), key=lambda r: r.name)]
        return [route for route in routes if caller.may_see(route.model)]

    async def delete_route(self, caller: Caller, model: str, reason: str) -> None:
        check_model(caller, model)
        await self.store.delete(ROUTE.kind, model, actor=actor_of(caller))
        self.catalog.remove_route(model)
        await self.store.audit(actor=actor_of(caller), action="gateway.route.delete", model=model,
                               details={"reason": reason})
