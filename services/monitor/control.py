"""The control plane as the monitor sees it: SLOs, baselines, routes and the audit log.

`RegistryControlPlane` (services/monitor/registry_link.py) keeps them in the registry as
Records (kinds "slo", "baseline", "route"); `MemoryControlPlane` keeps them in this process,
for a monitor run without a registry and for unit tests of the core.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from services.common.errors import Aborted, NotFound
from services.monitor.entities import SLO, Baseline, RouteSplit, RouteView


class ControlPlane(Protocol):
    async def list_slos(self) -> list[SLO]: ...

    async def put_slo(self, slo: SLO, actor: str) -> SLO: ...

    async def delete_slo(self, model: str, actor: str) -> None: ...

    async def list_baselines(self) -> list[tuple[Baseline, int]]: ...

    async def get_baseline(self, model: str, version: int) -> tuple[Baseline, int] | None: ...

    async def put_baseline(self, baseline: Baseline, expected_revision: int, actor: str) -> int:
        """Write a baseline (compare-and-set: -1 none, 0 must not exist); return its revision."""
        ...

    async def list_routes(self) -> list[RouteView]: ...

    async def set_split_weight(self, model: str, alias: str, weight: int, expected_revision: int,
                               actor: str) -> RouteView:
        """Rewrite one split's weight; raise Aborted when the route changed since expected_revision."""
        ...

    async def append_audit(self, action: str, model: str, version: int, details: dict[str, Any],
                           actor: str) -> None: ...

    async def close(self) -> None: ...


class MemoryControlPlane:
    def __init__(self) -> None:
        self.slos: dict[str, SLO] = {}
        self.baselines: dict[tuple[str, int], tuple[Baseline, int]] = {}
        self.routes: dict[str, RouteView] = {}
        self.audit: list[dict[str, Any]] = []
        self._revision = 0

    def _next(self) -> int:
        self._revision += 1
        return self._revision

    async def list_slos(self) -> list[SLO]:
        return [self.slos[m] for m in sorted(self.slos)]

    async def put_slo(self, slo: SLO, actor: str) -> SLO:
        self.slos[slo.model] = slo
        self._next()
        return slo

    async def delete_slo(self, model: str, actor: str) -> None:
        if self.slos.pop(model, None) is None:
            raise NotFound(f"no SLO for model {model!r}")

    async def list_baselines(self) -> list[tuple[Baseline, int]]:
        return [self.baselines[k] for k in sorted(self.baselines)]

    async def get_baseline(self, model: str, version: int) -> tuple[Baseline, int] | None:
        return self.baselines.get((model, version))

    async def put_baseline(self, baseline: Baseline, expected_revision: int, actor: str) -> int:
        current = self.baselines.get((baseline.model, baseline.version))
        have = current[1] if current else 0
        if expected_revision >= 0 and expected_revision != have:
            raise Aborted(f"baseline {baseline.model}/{baseline.version} changed (revision {have})")
        revision = self._next()
        self.baselines[(baseline.model, baseline.version)] = (baseline, revision)
        return revision

    def put_route(self, model: str, splits: list[tuple[str, int]]) -> RouteView:
        route = RouteView(model=model, splits=tuple(RouteSplit(alias=a, version=0, weight=w) for a, w in splits),
                          revision=self._next())
        self.routes[model] = route
        return route

    async def list_routes(self) -> list[RouteView]:
        return [self.routes[m] for m in sorted(self.routes)]

    async def set_split_weight(self, model: str, alias: str, weight: int, expected_revision: int,
                               actor: str) -> RouteView:
        route = self.routes.get(model)
        if route is None:
            raise NotFound(f"no route for model {model!r}")
        if route.revision != expected_revision:
            raise Aborted(f"route {model!r} changed (revision {route.revision})")
        splits = tuple(dataclasses.replace(s, weight=weight) if s.alias == alias else s for s in route.splits)
        self.routes[model] = RouteView(model=model, splits=splits, revision=self._next())
        return self.routes[model]

    async def append_audit(self, action: str, model: str, version: int, details: dict[str, Any],
                           actor: str) -> None:
        self.audit.append({"action": action, "model": model, "version": version, "details": details,
                           "actor": actor})

    async def close(self) -> None:
        return None
