"""API keys: token format, salted hashing, and the in-memory key ring that authenticates callers.

A token is `aiaas_<key_id>_<secret>`. The key id is public and finds the entry; the secret is
checked in constant time against HMAC-SHA256(pepper, salt || secret). Secrets are 256-bit
random values, so a fast keyed hash is enough (no password stretching needed) and keeps
authentication in the microseconds on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated
from services.gateway.domain import ANONYMOUS, ApiKeyEntry, Caller, Role

TOKEN_PREFIX = "aiaas"
HASH_SCHEME = "hmac-sha256-v1"
_KEY_ID_RE = re.compile(r"^[a-z0-9]{4,40}$")
# Compared against when the key id is unknown, so both paths cost the same.
_DUMMY_HASH = bytes(32)


def new_key_id() -> str:
    return secrets.token_hex(8)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def format_token(key_id: str, secret: str) -> str:
    return f"{TOKEN_PREFIX}_{key_id}_{secret}"


def parse_token(token: str) -> tuple[str, str]:
    """Split a token into (key_id, secret); raises Unauthenticated when malformed."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not _KEY_ID_RE.match(parts[1]) or not parts[2]:
        raise Unauthenticated("malformed API key: expected `aiaas_<id>_<secret>`")
    return parts[1], parts[2]


def hash_secret(pepper: bytes, salt: bytes, secret: str) -> bytes:
    return hmac.new(pepper, salt + secret.encode(), hashlib.sha256).digest()


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("missing API key: send `authorization: Bearer <key>`")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("malformed authorization header: expected `Bearer <key>`")
    return token.strip()


def make_key(
    pepper: bytes, *, name: str = "", models: tuple[str, ...] = ("*",),
    roles: frozenset[Role] = frozenset({Role.INFER, Role.READ}), created_by: str = "",
    expire_time: float | None = None, key_id: str | None = None, secret: str | None = None,
    **extra: object,
) -> tuple[ApiKeyEntry, str]:
    """Make a new key entry and its token (the only time the secret exists in the clear)."""
    key_id = key_id or new_key_id()
    if not _KEY_ID_RE.match(key_id):
        raise InvalidArgument(f"key id {key_id!r} must be 4 to 40 lowercase letters or digits")
    secret = secret or new_secret()
    salt = secrets.token_bytes(16)
    for pattern in models:
        if not pattern or len(pattern) > 200:
            raise InvalidArgument("model patterns must be 1 to 200 characters")
    if not roles:
        raise InvalidArgument("a key needs at least one role")
    entry = ApiKeyEntry(
        key_id=key_id, name=name, models=tuple(models) or ("*",), roles=frozenset(roles),
        create_time=time.time(), expire_time=expire_time, created_by=created_by,
        salt=salt, secret_hash=hash_secret(pepper, salt, secret), **extra,  # type: ignore[arg-type]
    )
    return entry, format_token(key_id, secret)


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
