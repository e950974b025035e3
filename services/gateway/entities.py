"""Plain domain types of the gateway: roles, quotas, keys, routes and callers (no grpc).

Roles, quotas and key entries are shared with the client tools that mint keys, so they are
defined once in `aiaas/api_keys.py` and named here with the gateway's own types.
"""

from __future__ import annotations

import dataclasses
import fnmatch

from aiaas.api_keys import ApiKeyEntry, QuotaSpec, Role

__all__ = ["ANONYMOUS", "ApiKeyEntry", "Caller", "QuotaSpec", "Role", "Route", "RouteSplit", "ShadowTarget"]


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who is calling, once authenticated."""

    key_id: str
    models: tuple[str, ...]
    roles: frozenset[Role]
    quota: QuotaSpec | None = None
    # When the caller's key stops working (None: never); a key it makes may not outlive it.
    expire_time: float | None = None

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
