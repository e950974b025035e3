"""The gateway's side of API keys: the key ring that authenticates callers, role checks, and the
rule that no key grants more than it holds.

The token format, hashing and key entries are the client vocabulary's (`aiaas/api_keys.py`); a
repeat caller skips the hash through a cache of headers already verified, emptied whenever a key
changes, so a revoked key fails on its next request (streams re-check every request).
"""

from __future__ import annotations

import hmac
import time

from aiaas.api_keys import ApiKeyEntry, Role, hash_secret, models_beyond, parse_token, roles_beyond
from services.common.errors import PermissionDenied, Unauthenticated
from services.gateway.entities import ANONYMOUS, Caller

# Compared against when the key id is unknown, so both paths cost the same.
_DUMMY_HASH = bytes(32)


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("missing API key: send `authorization: Bearer <key>`")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("malformed authorization header: expected `Bearer <key>`")
    return token.strip()


class KeyRing:
    """Every known key, by id; replaced entry by entry as the registry's feed reports changes."""

    def __init__(self, pepper: bytes, *, enabled: bool = True) -> None:
        self.pepper = pepper
        self.enabled = enabled
        self._keys: dict[str, ApiKeyEntry] = {}
        # Headers already verified, with the entry they matched: a repeat caller skips the hash.
        self._verified: dict[str, tuple[ApiKeyEntry, Caller]] = {}

    def put(self, entry: ApiKeyEntry) -> None:
        self._keys[entry.key_id] = entry
        self._verified.clear()

    def remove(self, key_id: str) -> None:
        self._keys.pop(key_id, None)
        self._verified.clear()

    def replace_all(self, entries: dict[str, ApiKeyEntry]) -> None:
        self._keys = dict(entries)
        self._verified.clear()

    def get(self, key_id: str) -> ApiKeyEntry | None:
        return self._keys.get(key_id)

    def entries(self) -> list[ApiKeyEntry]:
        return sorted(self._keys.values(), key=lambda e: e.key_id)

    def authenticate(self, authorization: str | None, now: float | None = None) -> Caller:
        """The caller behind an `authorization` header; Unauthenticated when missing or bad."""
        if not self.enabled:
            return ANONYMOUS
        now = time.time() if now is None else now
        if authorization is not None:
            verified = self._verified.get(authorization)
            if verified is not None and verified[0].active(now):
                return verified[1]
        key_id, secret = parse_token(bearer_token(authorization))
        entry = self._keys.get(key_id)
        expected = entry.secret_hash if entry is not None else _DUMMY_HASH
        salt = entry.salt if entry is not None else b"\0" * 16
        matches = hmac.compare_digest(hash_secret(self.pepper, salt, secret), expected)
        if entry is None or not matches:
            raise Unauthenticated("invalid API key")
        if entry.revoked:
            raise Unauthenticated("API key revoked")
        if not entry.active(now):
            raise Unauthenticated("API key expired")
        caller = Caller(key_id=entry.key_id, models=entry.models, roles=entry.roles, quota=entry.quota,
                        expire_time=entry.expire_time)
        if authorization is not None:
            if len(self._verified) >= 10_000:
                self._verified.clear()
            self._verified[authorization] = (entry, caller)
        return caller


def authorize(caller: Caller, role: Role, model: str | None = None) -> None:
    """PermissionDenied unless the caller holds `role` (and may use `model`, when given)."""
    if not caller.has_role(role):
        raise PermissionDenied(f"API key {caller.key_id} lacks the {role.value!r} role")
    if model is not None and not caller.may_see(model):
        raise PermissionDenied(f"API key {caller.key_id} may not use model {model!r}")



def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def scope_excess(caller: Caller, models: tuple[str, ...], roles: frozenset[Role]) -> list[str]:
    """What of `roles` and `models` the caller does not hold (admin holds every role; a pattern
    counts as held only when one of the caller's patterns provably covers it)."""
    excess: list[str] = []
    extra_roles = roles_beyond(roles, caller.roles)
    if extra_roles:
        excess.append("roles " + ", ".join(repr(role.value) for role in extra_roles))
    extra_models = models_beyond(models, caller.models)
    if extra_models:
        excess.append("models " + ", ".join(repr(m) for m in extra_models)
                      + f" (outside its scope {', '.join(repr(m) for m in caller.models)})")
    return excess


def check_grant(caller: Caller, *, models: tuple[str, ...], roles: frozenset[Role],
                expire_time: float | None) -> None:
    """PermissionDenied unless a new key with these roles, models and expiry is within what `caller` holds.

    A key hands on only what it has: roles it holds, model patterns inside its own (a scoped key
    never grants `*`), and a lifetime that ends no later than its own. The message names what exceeds."""
    excess = scope_excess(caller, models, roles)
    if caller.expire_time is not None and (expire_time is None or expire_time > caller.expire_time):
        ends = "never" if expire_time is None else _utc(expire_time)
        excess.append(f"an expiry of {ends} (after its own, {_utc(caller.expire_time)})")
    if excess:
        raise PermissionDenied(f"API key {caller.key_id} may not create a key with more than it holds: "
                               + "; ".join(excess))


def may_manage(caller: Caller, entry: ApiKeyEntry) -> bool:
    """Whether `caller` may see, revoke or re-time `entry`: its own key, or one it could have made."""
    return entry.key_id == caller.key_id or not scope_excess(caller, entry.models, entry.roles)


def check_manage(caller: Caller, entry: ApiKeyEntry, action: str) -> None:
    """PermissionDenied unless `may_manage`: a key scoped to some models cannot revoke a broader key."""
    if not may_manage(caller, entry):
        raise PermissionDenied(f"API key {caller.key_id} may not {action} API key {entry.key_id}, which holds "
                               + "; ".join(scope_excess(caller, entry.models, entry.roles)))
