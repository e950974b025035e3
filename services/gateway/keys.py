"""The gateway's side of API keys: the key ring that authenticates callers, and role checks.

The token format, hashing and key entries are the client vocabulary's (`aiaas/api_keys.py`); a
repeat caller skips the hash through a cache of headers already verified.
"""

from __future__ import annotations

import hmac
import time

from aiaas.api_keys import ApiKeyEntry, Role, hash_secret, make_key, parse_token
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

    def __init__(self, pepper: bytes, *, enabled: bool = True, bootstrap_token: str | None = None) -> None:
        self.pepper = pepper
        self.enabled = enabled
        self._keys: dict[str, ApiKeyEntry] = {}
        # Headers already verified, with the entry they matched: a repeat caller skips the hash.
        self._verified: dict[str, tuple[ApiKeyEntry, Caller]] = {}
        self._bootstrap: ApiKeyEntry | None = None
        if bootstrap_token:
            key_id, secret = parse_token(bootstrap_token)
            self._bootstrap, _ = make_key(
                pepper, name="bootstrap admin", roles=frozenset(Role), key_id=key_id, secret=secret,
                created_by="bootstrap",
            )

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
        if entry is None and self._bootstrap is not None and self._bootstrap.key_id == key_id:
            entry = self._bootstrap
        expected = entry.secret_hash if entry is not None else _DUMMY_HASH
        salt = entry.salt if entry is not None else b"\0" * 16
        matches = hmac.compare_digest(hash_secret(self.pepper, salt, secret), expected)
        if entry is None or not matches:
            raise Unauthenticated("invalid API key")
        if entry.revoked:
            raise Unauthenticated("API key revoked")
        if not entry.active(now):
            raise Unauthenticated("API key expired")
        caller = Caller(key_id=entry.key_id, models=entry.models, roles=entry.roles, quota=entry.quota)
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
