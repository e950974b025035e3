"""Plain domain types of the gateway: roles, quotas, keys, routes and callers (no grpc, no protobuf)."""

from __future__ import annotations

import dataclasses
import enum
import fnmatch


class Role(enum.Enum):
    INFER = "infer"
    READ = "read"
    ADMIN = "admin"


@dataclasses.dataclass(frozen=True)
class QuotaSpec:
    """A token bucket: `rps` refilled per second up to `burst`. rps 0 means unlimited."""

    rps: float = 0.0
    burst: int = 0

    @property
    def unlimited(self) -> bool:
        return self.rps <= 0

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


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who is calling, once authenticated."""

    key_id: str
    models: tuple[str, ...]
    roles: frozenset[Role]
    quota: QuotaSpec | None = None

    def has_role(self, role: Role) -> bool:
        return role in self.roles or Role.ADMIN in self.roles

    def may_see(self, model: str) -> bool:
        return any(pattern == "*" or fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


ANONYMOUS = Caller(key_id="anonymous", models=("*",), roles=frozenset(Role))


@dataclasses.dataclass(frozen=True)
class RouteSplit:
    alias: str = ""
    version: int = 0
    weight: int = 0


@dataclasses.dataclass(frozen=True)
class ShadowTarget:
    alias: str = ""
    version: int = 0
    sample_rate: float = 0.0


@dataclasses.dataclass(frozen=True)
class Route:
    model: str
    splits: tuple[RouteSplit, ...] = ()
    sticky: bool = False
    shadows: tuple[ShadowTarget, ...] = ()
    quota: QuotaSpec | None = None
