"""The control plane as the monitor sees it: SLOs, baselines, routes and the audit log.

Reads are pushed, not polled: `follow(listener)` hands the listener the whole state once
(`control_replaced`), then every change as it happens (`slo_changed`, `baseline_changed`,
`route_changed`). Writes go through the plane's methods; the writer also updates its own view at
once, so a change is seen twice (the second time with the same revision). Baseline and route
changes carry the record's revision: a listener ignores one older than what it already holds.

`RegistryControlPlane` (services/monitor/registry_link.py) keeps them in the registry as Records
(kinds "slo", "baseline", "route") and follows its change feed; `MemoryControlPlane` keeps them
in this process, for a monitor run without a registry and for unit tests of the core.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from services.common.errors import Aborted, NotFound
from services.monitor.entities import SLO, Baseline, RouteSplit, RouteView

VersionKey = tuple[str, int]


@dataclasses.dataclass
class ControlState:
    """Everything the monitor reads from the control plane, with each baseline's revision."""

    slos: dict[str, SLO] = dataclasses.field(default_factory=dict)
    baselines: dict[VersionKey, tuple[Baseline, int]] = dataclasses.field(default_factory=dict)
    routes: dict[str, RouteView] = dataclasses.field(default_factory=dict)


class ControlListener(Protocol):
    def control_replaced(self, state: ControlState) -> None: ...

    def slo_changed(self, model: str, slo: SLO | None) -> None:
        """`slo` None: deleted."""
        ...

    def baseline_changed(self, key: VersionKey, baseline: Baseline | None, revision: int) -> None:
        """`baseline` None: deleted (at `revision`)."""
        ...

    def route_changed(self, model: str, route: RouteView | None, revision: int) -> None:
        """`route` None: deleted (at `revision`)."""
        ...


class ControlPlane(Protocol):
    def follow(self, listener: ControlListener) -> None:
        """Start telling `listener` the state, then each change (inside the running event loop)."""
        ...

    async def wait_synced(self, timeout: float) -> bool:
        """Whether the listener got the whole state within `timeout` seconds."""
        ...

    async def put_slo(self, slo: SLO, actor: str) -> SLO: ...

    async def delete_slo(self, model: str, actor: str) -> None: ...

    async def get_baseline(self, model: str, version: int) -> tuple[Baseline, int] | None: ...

    async def put_baseline(self, baseline: Baseline, expected_revision: int, actor: str) -> int:
        """Write a baseline (compare-and-set: -1 none, 0 must not exist); return its revision."""
        ...

    async def get_route(self, model: str) -> RouteView | None: ...

    async def set_split_weight(self, model: str, alias: str, weight: int, expected_revision: int,
                               actor: str) -> RouteView:
        """Rewrite one split's weight; raise Aborted when the route changed since expected_revision."""
        ...

    async def append_audit(self, action: str, model: str, version: int, details: dict[str, Any],
                           actor: str) -> None: ...

    async def close(self) -> None: ...


class MemoryControlPlane:
    """The control plane in this process; `listener` hears of every write at once (None: nobody follows)."""

    def __init__(self) -> None:
        self.slos: dict[str, SLO] = {}
        self.baselines: dict[VersionKey, tuple[Baseline, int]] = {}
        self.routes: dict[str, RouteView] = {}
        self.audit: list[dict[str, Any]] = []
        self.listener: ControlListener | None = None
        self._revision = 0

    def _next(self) -> int:
        self._revision += 1
        return self._revision

    def follow(self, listener: ControlListener) -> None:
        self.listener = listener
        listener.control_replaced(ControlState(dict(self.slos), dict(self.baselines), dict(self.routes)))

    async def wait_synced(self, timeout: float) -> bool:
        return self.listener is not None

    async def put_slo(self, slo: SLO, actor: str) -> SLO:
        self.slos[slo.model] = slo
        self._next()
        if self.listener is not None:
            self.listener.slo_changed(slo.model, slo)
        return slo

    async def delete_slo(self, model: str, actor: str) -> None:
        if self.slos.pop(model, None) is None:
            raise NotFound(f"no SLO for model {model!r}")
        self._next()
        if self.listener is not None:
            self.listener.slo_changed(model, None)

    async def get_baseline(self, model: str, version: int) -> tuple[Baseline, int] | None:
        return self.baselines.get((model, version))

    async def put_baseline(self, baseline: Baseline, expected_revision: int, actor: str) -> int:
        key = (baseline.model, baseline.version)
        current = self.baselines.get(key)
        have = current[1] if current else 0
        if expected_revision >= 0 and expected_revision != have:
            raise Aborted(f"baseline {baseline.model}/{baseline.version} changed (revision {have})")
        revision = self._next()
        self.baselines[key] = (baseline, revision)
        if self.listener is not None:
            self.listener.baseline_changed(key, baseline, revision)
        return revision

    def put_route(self, model: str, splits: list[tuple[str, int]]) -> RouteView:
        """Write a route as the gateway's admin API would (the monitor only rewrites weights)."""
        route = RouteView(model=model, splits=tuple(RouteSplit(alias=a, version=0, weight=w) for a, w in splits),
                          revision=self._next())
        self._put_route(route)
        return route

    def _put_route(self, route: RouteView) -> None:
        self.routes[route.model] = route
        if self.listener is not None:
            self.listener.route_changed(route.model, route, route.revision)

    async def get_route(self, model: str) -> RouteView | None:
        return self.routes.get(model)

    async def set_split_weight(self, model: str, alias: str, weight: int, expected_revision: int,
                               actor: str) -> RouteView:
        route = self.routes.get(model)
        if route is None:
            raise NotFound(f"no route for model {model!r}")
        if route.revision != expected_revision:
            raise Aborted(f"route {model!r} changed (revision {route.revision})")
        splits = tuple(dataclasses.replace(s, weight=weight) if s.alias == alias else s for s in route.splits)
        self._put_route(RouteView(model=model, splits=splits, revision=self._next()))
        return self.routes[model]

    async def append_audit(self, action: str, model: str, version: int, details: dict[str, Any],
                           actor: str) -> None:
        self.audit.append({"action": action, "model": model, "version": version, "details": details,
                           "actor": actor})

    async def close(self) -> None:
        return None
