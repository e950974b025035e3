"""API keys as every tool sees them: the token format, salted hashing, roles, quotas, the key entry,
and its protobuf and stored-record codecs.

A token is `aiaas_<key_id>_<secret>`. The key id is public and finds the entry; the secret is
checked in constant time against HMAC-SHA256(pepper, salt || secret). Secrets are 256-bit
random values, so a fast keyed hash is enough (no password stretching needed) and keeps
authentication in the microseconds on every request. The gateway authenticates with these
(`services/gateway/keys.py`); an operator tool mints a key and writes its `api_key` record with
them, without the server code.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable, Sequence

from google.protobuf import timestamp_pb2

from aiaas.errors import InvalidArgument, Unauthenticated
from aiaas.gateway.v1 import gateway_pb2 as gw
from aiaas.records import API_KEY
from aiaas.registry.v1 import registry_pb2

TOKEN_PREFIX = "aiaas"
HASH_SCHEME = "hmac-sha256-v1"
KEY_ID_RE = re.compile(r"^[a-z0-9]{4,40}$")


class Role(enum.Enum):
    INFER = "infer"
    READ = "read"
    ADMIN = "admin"
    # May set a request's `priority` parameter; every other key gets the model's default level.
    PRIORITY = "priority"


ROLE_TO_PB = {Role.INFER: gw.ROLE_INFER, Role.READ: gw.ROLE_READ, Role.ADMIN: gw.ROLE_ADMIN,
              Role.PRIORITY: gw.ROLE_PRIORITY}
ROLE_FROM_PB = {v: k for k, v in ROLE_TO_PB.items()}
ROLE_NAMES = {role.value: role for role in Role}


@dataclasses.dataclass(frozen=True)
class QuotaSpec:
    """A token bucket: `rps` refilled per second up to `burst`. rps 0 means unlimited."""

    rps: float = 0.0
    burst: int = 0
    # Prompt + completion tokens of generative requests per minute; 0 means unlimited.
    tokens_per_minute: float = 0.0

    @property
    def unlimited(self) -> bool:
        """No limit on requests (tokens are `tokens_unlimited`)."""
        return self.rps <= 0

    @property
    def tokens_unlimited(self) -> bool:
        return self.tokens_per_minute <= 0

    @property
    def capacity(self) -> float:
        return float(self.burst) if self.burst > 0 else max(1.0, self.rps)


@dataclasses.dataclass(frozen=True)
class ApiKeyEntry:
    """One API key as the gateway keeps it: the public fields plus the salted hash."""

    key_id: str
    name: str = ""
    models: tuple[str, ...] = ("*",)
    roles: frozenset[Role] = frozenset({Role.INFER, Role.READ})
    quota: QuotaSpec | None = None
    create_time: float = 0.0
    expire_time: float | None = None
    revoked: bool = False
    revoke_time: float | None = None
    created_by: str = ""
    salt: bytes = b""
    secret_hash: bytes = b""

    def active(self, now: float) -> bool:
        return not self.revoked and (self.expire_time is None or now < self.expire_time)


# Scopes: what one key may grant another -----------------------------------------------------

_GLOB_CHARS = frozenset("*?[")


def _literal_prefix(pattern: str) -> str:
    for index, char in enumerate(pattern):
        if char in _GLOB_CHARS:
            return pattern[:index]
    return pattern


def pattern_within(inner: str, outer: str) -> bool:
    """Whether every model name the fnmatch pattern `inner` matches is also matched by `outer`.

    Decided exactly when `outer` is `*`, the patterns are equal, `inner` is a plain name, or
    `outer` is a plain prefix followed by `*`; any other pair answers False, so a scope that
    cannot be shown to be narrower is never granted."""
    if set(outer) == {"*"} or inner == outer:
        return True
    if not _GLOB_CHARS.intersection(inner):
        return fnmatch.fnmatchcase(inner, outer)
    prefix = outer[:-1]
    if outer.endswith("*") and not _GLOB_CHARS.intersection(prefix):
        return _literal_prefix(inner).startswith(prefix)
    return False


def models_beyond(inner: Iterable[str], outer: Sequence[str]) -> list[str]:
    """The patterns of `inner` that no pattern of `outer` covers (empty: `inner` is within `outer`)."""
    return [pattern for pattern in inner if not any(pattern_within(pattern, o) for o in outer)]


def roles_beyond(inner: Iterable[Role], outer: frozenset[Role]) -> list[Role]:
    """The roles of `inner` that `outer` does not hold (admin holds every role)."""
    if Role.ADMIN in outer:
        return []
    return sorted((role for role in inner if role not in outer), key=lambda role: role.value)


# Tokens and hashes --------------------------------------------------------------------------

def new_key_id() -> str:
    return secrets.token_hex(8)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def format_token(key_id: str, secret: str) -> str:
    return f"{TOKEN_PREFIX}_{key_id}_{secret}"


def parse_token(token: str) -> tuple[str, str]:
    """Split a token into (key_id, secret); raises Unauthenticated when malformed."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not KEY_ID_RE.match(parts[1]) or not parts[2]:
        raise Unauthenticated("malformed API key: expected `aiaas_<id>_<secret>`")
    return parts[1], parts[2]


def hash_secret(pepper: bytes, salt: bytes, secret: str) -> bytes:
    return hmac.new(pepper, salt + secret.encode(), hashlib.sha256).digest()


def make_key(
    pepper: bytes, *, name: str = "", models: tuple[str, ...] = ("*",),
    roles: frozenset[Role] = frozenset({Role.INFER, Role.READ}), created_by: str = "",
    expire_time: float | None = None, key_id: str | None = None, secret: str | None = None,
    quota: QuotaSpec | None = None,
) -> tuple[ApiKeyEntry, str]:
    """Make a new key entry and its token (the only time the secret exists in the clear)."""
    key_id = key_id or new_key_id()
    if not KEY_ID_RE.match(key_id):
        raise InvalidArgument(f"key id {key_id!r} must be 4 to 40 lowercase letters or digits")
    secret = secret or new_secret()
    salt = secrets.token_bytes(16)
    for pattern in models:
        if not pattern or len(pattern) > 200:
            raise InvalidArgument("model patterns must be 1 to 200 characters")
    if not roles:
        raise InvalidArgument("a key needs at least one role")
    entry = ApiKeyEntry(
        key_id=key_id, name=name, models=tuple(models) or ("*",), roles=frozenset(roles), quota=quota,
        create_time=time.time(), expire_time=expire_time, created_by=created_by,
        salt=salt, secret_hash=hash_secret(pepper, salt, secret),
    )
    return entry, format_token(key_id, secret)


# Protobuf codecs ----------------------------------------------------------------------------

def time_to_pb(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def time_from_pb(message: object, field: str) -> float | None:
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    return float(getattr(message, field).ToNanoseconds()) / 1e9


def quota_from_pb(message: object, field: str = "quota") -> QuotaSpec | None:
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    quota = getattr(message, field)
    if quota.requests_per_second < 0:
        raise InvalidArgument("quota requests_per_second must be >= 0")
    if quota.tokens_per_minute < 0:
        raise InvalidArgument("quota tokens_per_minute must be >= 0")
    return QuotaSpec(rps=quota.requests_per_second, burst=quota.burst, tokens_per_minute=quota.tokens_per_minute)


def quota_to_pb(quota: QuotaSpec) -> gw.Quota:
    return gw.Quota(requests_per_second=quota.rps, burst=quota.burst, tokens_per_minute=quota.tokens_per_minute)


def roles_from_pb(roles: Iterable[int]) -> frozenset[Role]:
    found = set()
    for value in roles:
        role = ROLE_FROM_PB.get(value)  # type: ignore[call-overload]
        if role is None:
            raise InvalidArgument(f"unknown role {value}")
        found.add(role)
    return frozenset(found)


def key_to_pb(entry: ApiKeyEntry) -> gw.ApiKey:
    key = gw.ApiKey(
        key_id=entry.key_id, name=entry.name, models=list(entry.models),
        roles=sorted(ROLE_TO_PB[r] for r in entry.roles), revoked=entry.revoked, created_by=entry.created_by,
    )
    if entry.quota is not None:
        key.quota.CopyFrom(quota_to_pb(entry.quota))
    for field, value in (("create_time", entry.create_time), ("expire_time", entry.expire_time),
                         ("revoke_time", entry.revoke_time)):
        stamp = time_to_pb(value)
        if stamp is not None:
            getattr(key, field).CopyFrom(stamp)
    return key


def key_from_pb(key: gw.ApiKey, salt: bytes = b"", secret_hash: bytes = b"") -> ApiKeyEntry:
    return ApiKeyEntry(
        key_id=key.key_id, name=key.name, models=tuple(key.models) or ("*",), roles=roles_from_pb(key.roles),
        quota=quota_from_pb(key), create_time=time_from_pb(key, "create_time") or 0.0,
        expire_time=time_from_pb(key, "expire_time"), revoked=key.revoked,
        revoke_time=time_from_pb(key, "revoke_time"), created_by=key.created_by, salt=salt, secret_hash=secret_hash,
    )


def stored_key(entry: ApiKeyEntry) -> gw.StoredApiKey:
    return gw.StoredApiKey(key=key_to_pb(entry), salt=entry.salt, secret_hash=entry.secret_hash,
                           hash_scheme=HASH_SCHEME)


def stored_key_record(entry: ApiKeyEntry) -> registry_pb2.Record:
    """The registry Record that keeps the key: kind `api_key`, named by its key id."""
    return API_KEY.record(entry.key_id, stored_key(entry))


def stored_key_to_bytes(entry: ApiKeyEntry) -> bytes:
    return API_KEY.encode(stored_key(entry))


def stored_key_from_bytes(data: bytes, name: str = "") -> ApiKeyEntry:
    stored = API_KEY.decode(data, name)
    if stored.hash_scheme != HASH_SCHEME:
        raise InvalidArgument(f"API key {stored.key.key_id}: unknown hash scheme {stored.hash_scheme!r}")
    return key_from_pb(stored.key, stored.salt, stored.secret_hash)
